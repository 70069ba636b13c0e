"""Triton kernels against their torch references (interpreted on CPU, compiled on a GPU)."""

import pytest
import torch

from engine.attention import paged_decode_attention_ref, store_kv_ref

triton_attention = pytest.importorskip("engine.kernels.triton_attention", reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def make_cache(num_blocks, kv_heads, block_size, head_dim, dtype):
    shape = (num_blocks, kv_heads, block_size, head_dim)
    return (torch.randn(shape, dtype=dtype, device=DEVICE), torch.randn(shape, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 24])
def test_store_kv_matches_reference(dtype, head_dim):
    torch.manual_seed(0)
    k_cache, v_cache = make_cache(6, 2, 8, head_dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k = torch.randn(9, 2, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(9, 2, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.randperm(6 * 8, device=DEVICE)[:9]
    store_kv_ref(k, v, k_ref, v_ref, slots)
    triton_attention.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 11])
@pytest.mark.parametrize("group", [1, 4])
def test_paged_decode_attention_matches_reference(dtype, window, group):
    torch.manual_seed(1)
    kv_heads, block_size, head_dim, num_blocks = 2, 8, 32, 24
    k_cache, v_cache = make_cache(num_blocks, kv_heads, block_size, head_dim, dtype)
    context_lens = torch.tensor([1, 8, 9, 30, 45], dtype=torch.int32, device=DEVICE)
    max_blocks = 6
    # Random, non-contiguous block tables (padded with 0 past each sequence's blocks).
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(5, max_blocks, dtype=torch.int32)
    used = 0
    for row, n in enumerate(context_lens.tolist()):
        nb = -(-n // block_size)
        tables[row, :nb] = perm[used : used + nb]
        used = (used + nb) % (num_blocks - max_blocks)
    tables = tables.to(DEVICE)
    q = torch.randn(5, kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim**-0.5
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, context_lens, scale, window)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
