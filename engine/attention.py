"""Attention over the paged KV cache: pure-torch reference versions and the dispatch.

On CUDA the Triton kernels in engine/kernels/ store K/V and run paged decode attention;
on CPU (and wherever Triton is missing) the torch functions here do the same work.
Cache views are [num_blocks, num_kv_heads, block_size, head_dim] (see proto/kv.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's prompt chunk inside a flattened batch."""

    query_start: int  # index of its first token in the flattened batch
    num_tokens: int  # tokens in this chunk
    start_pos: int  # position of its first token (tokens before it are in the cache)
    block_table: torch.Tensor  # [num_blocks_of_seq] int64 block ids


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch goes: decodes first, then prefill chunks."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32, padded with 0
    decode_context_lens: torch.Tensor  # [num_decodes] int32: tokens in cache incl. the new one
    prefills: list[PrefillSpan]


# ---- reference versions ---------------------------------------------------------------------


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new K/V rows into their slots. k, v: [N, H_kv, D]; slot_mapping: [N]."""
    block_size = k_cache.shape[2]
    block_ids = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k_cache[block_ids, :, offsets] = k
    v_cache[block_ids, :, offsets] = v


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence against its cached context. q: [B, H_q, D] -> [B, H_q, D]."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    ctx_len = max_blocks * block_size
    table = block_tables.long()
    # k, v: [B, H_kv, max_blocks * block_size, D]
    k = k_cache[table].transpose(1, 2).reshape(num_seqs, num_kv_heads, ctx_len, head_dim)
    v = v_cache[table].transpose(1, 2).reshape(num_seqs, num_kv_heads, ctx_len, head_dim)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, H_kv, G, T]
    pos = torch.arange(ctx_len, device=q.device)
    lens = context_lens.long()[:, None]
    masked = pos[None, :] >= lens
    if sliding_window is not None:
        masked |= pos[None, :] < lens - sliding_window
    scores.masked_fill_(masked[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(num_seqs, num_heads, head_dim)


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of one prompt chunk over its cached context plus itself.

    q: [n, H_q, D] for positions start_pos .. start_pos + n - 1, whose K/V are already
    stored. Returns [n, H_q, D].
    """
    n, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    ctx = span.start_pos + n
    blocks = span.block_table[: -(-ctx // block_size)]
    # k, v: [1, H_kv, ctx, D]
    k = k_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[None, :, :ctx]
    v = v_cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[None, :, :ctx]
    qh = q.transpose(0, 1)[None]  # [1, H_q, n, D]
    if span.start_pos == 0 and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(span.start_pos, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


# ---- dispatch ---------------------------------------------------------------------------------


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    from engine.kernels import triton_available

    return triton_available()


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if _use_triton(k):
        from engine.kernels.triton_attention import store_kv as store_kv_triton

        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention for a flattened batch whose K/V are already stored. q: [N, H_q, D]."""
    out = torch.empty_like(q)
    num_dec = meta.num_decode_tokens
    if num_dec:
        if _use_triton(q):
            from engine.kernels.triton_attention import paged_decode_attention

            out[:num_dec] = paged_decode_attention(
                q[:num_dec], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, sliding_window
            )
        else:
            out[:num_dec] = paged_decode_attention_ref(
                q[:num_dec], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, sliding_window
            )
    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.num_tokens)
        out[rows] = prefill_attention_ref(q[rows], k_cache, v_cache, span, scale, sliding_window)
    return out
