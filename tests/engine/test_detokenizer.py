from engine.default_model.corpus import stories
from engine.default_model.tokenizer import train_tokenizer
from engine.detokenizer import Detokenizer


def test_incremental_text_equals_full_decode_including_multibyte(tmp_path):
    tok = train_tokenizer(stories(50, seed=3) + ["héllo wörld — ☃ snow"], 300, tmp_path)
    text = "A snowman ☃ said héllo — to the wörld."
    ids = tok.encode(text, add_special_tokens=False)
    detok = Detokenizer(tok)
    streamed = ""
    for t in ids:
        detok.append(t)
        piece = detok.delta(finished=False)
        assert "\ufffd" not in piece
        streamed += piece
    streamed += detok.delta(finished=True)
    assert streamed == text == tok.decode(ids)


def test_stop_string_across_tokens_is_cut_and_never_streamed(tmp_path):
    tok = train_tokenizer(stories(50, seed=3), 300, tmp_path)
    ids = tok.encode("Tom went to the park to play.", add_special_tokens=False)
    detok = Detokenizer(tok, stop=("park",))
    streamed = ""
    for t in ids:
        if detok.append(t):
            break
        streamed += detok.delta(finished=False)
    streamed += detok.delta(finished=True)
    assert detok.stopped and streamed == detok.text == "Tom went to the "
