"""Triton kernels for the paged KV cache: storing new K/V and paged decode attention.

References: store_kv_ref and paged_decode_attention_ref in engine/attention.py; tests
compare the two (on CPU under TRITON_INTERPRET=1, compiled on a GPU). Cache views are
[num_blocks, num_kv_heads, block_size, head_dim] (see proto/kv.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_block,
    stride_c_head,
    stride_c_slot,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (token, kv head): copy one head_dim row of K and of V into its slot.
    tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + tok)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    k = tl.load(k_ptr + tok * stride_k_tok + head * stride_k_head + d, mask=d_mask)
    v = tl.load(v_ptr + tok * stride_v_tok + head * stride_v_head + d, mask=d_mask)
    dst = block * stride_c_block + head * stride_c_head + offset * stride_c_slot + d
    tl.store(k_cache_ptr + dst, k, mask=d_mask)
    tl.store(v_cache_ptr + dst, v, mask=d_mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v: [N, H_kv, D] (last dim contiguous); slot_mapping: [N] int64."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous()
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    scale,
    window,
    stride_q_seq,
    stride_q_head,
    stride_o_seq,
    stride_o_head,
    stride_c_block,
    stride_c_head,
    stride_c_slot,
    stride_table,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (sequence, query head): walk the sequence's blocks with an online
    # softmax, so the context is read once and never materialised.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    ctx = tl.load(context_lens_ptr + seq)
    start = 0
    if window > 0:
        start = tl.maximum(ctx - window, 0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    slots = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + seq * stride_q_seq + head * stride_q_head + d, mask=d_mask, other=0.0)
    q = q.to(tl.float32)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i in range(start // BLOCK_SIZE, tl.cdiv(ctx, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_table + i)
        pos = i * BLOCK_SIZE + slots
        valid = (pos < ctx) & (pos >= start)
        base = block * stride_c_block + kv_head * stride_c_head
        offs = base + slots[:, None] * stride_c_slot + d[None, :]
        mask2d = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=mask2d, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + offs, mask=mask2d, other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK_SIZE]
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [B, H_q, D]; block_tables: [B, max_blocks] int32; context_lens: [B] int32."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and block_tables.is_contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(num_seqs, num_heads)](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        scale,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
