"""Incremental detokenization with stop strings, for streaming text deltas.

Decoding token by token is wrong for byte-level and SentencePiece vocabularies (a
character can span tokens, a space can belong to the next token), so each step decodes a
short window of recent tokens and emits only the text that became final. Text that could
still turn out to be the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens kept before the newest ones when decoding a window: enough context for merges.
WINDOW_CONTEXT = 6


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # everything final so far (cut before a stop string once one is seen)
        self.prefix_offset = 0
        self.read_offset = 0
        self.num_emitted_chars = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str), "one list of ids decodes to one string"
        return text

    def append(self, token_id: int) -> bool:
        """Add one generated token; returns True when the text now contains a stop string."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset :])
        if window.endswith("\ufffd"):
            return False  # an incomplete character: wait for the tokens that finish it
        new_text = window[len(prefix) :]
        self.prefix_offset = max(0, len(self.token_ids) - WINDOW_CONTEXT)
        self.read_offset = len(self.token_ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new_text
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        return self.stopped

    def resume(self, token_ids: tuple[int, ...], emitted_text: str) -> None:
        """Continue a request another worker started: its generated tokens, of which the client
        has emitted_text. Afterwards the text is as if this detokenizer had seen them all."""
        for token_id in token_ids:
            if self.append(token_id):
                raise ValueError("the resumed tokens contain a stop string already: the request had finished")
        if not self.text.startswith(emitted_text):
            raise ValueError(
                f"resume.text is not the text of resume.token_ids: {emitted_text[-40:]!r} against {self.text[-40:]!r}"
            )
        self.num_emitted_chars = len(emitted_text)

    def delta(self, finished: bool) -> str:
        """Text not yet emitted; while running, the tail that might start a stop string waits."""
        end = len(self.text) if finished or not self.stop else max(0, len(self.text) - self.holdback)
        end = max(end, self.num_emitted_chars)
        out = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return out
