"""The mask-free CPU path (`sdpa_docs`) against the dense SDPA reference on random inputs,
forward and backward, and its place in backend selection."""

import pytest
import torch

import dlm.attention as attn
from dlm.attention import sdpa_docs
from dlm.attention.dense import sdpa_attention
from dlm.attention.layout import AnnealMask, AttentionLayout


def random_positions(B: int, L: int, p_start: float, seed: int) -> torch.Tensor:
    """[B, L] position ids; a new document starts with probability p_start at each token."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, L, generator=g) < p_start
    starts[:, 0] = True
    idx = torch.arange(L).expand(B, L)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def leaves(B, H, Hkv, L, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g).to(dtype).requires_grad_(True) for h in (H, Hkv, Hkv)]


def fwd_bwd(fn, q, k, v, layout, grad):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, layout)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("p_start", [0.0, 0.05, 0.3])  # one document per row, a few, many short ones
def test_matches_dense_reference(causal, heads, p_start):
    H, Hkv = heads
    B, L, D = 3, 37, 8
    layout = AttentionLayout.from_position_ids(random_positions(B, L, p_start, seed=H), causal=causal)
    q, k, v = leaves(B, H, Hkv, L, D, torch.float64, seed=Hkv)
    grad = torch.randn(B, H, L, D, dtype=torch.float64)
    got = fwd_bwd(sdpa_docs.attention, q, k, v, layout, grad)
    want = fwd_bwd(sdpa_attention, q, k, v, layout, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert "_dense" in layout.__dict__  # built by the reference only ...
    fresh = AttentionLayout.from_position_ids(layout.position_ids, causal=causal)
    sdpa_docs.attention(q, k, v, fresh)
    assert "_dense" not in fresh.__dict__  # ... never by the mask-free path


def test_fp32_and_padded_cu_seqlens():
    B, L = 2, 40
    pos = random_positions(B, L, 0.1, seed=7)
    flat = AttentionLayout.from_position_ids(pos)
    s = flat.cu_seqlens.tolist()
    padded = torch.tensor([s[0], s[1], s[1], *s[2:], s[-1]], dtype=torch.int32)  # zero-length segments
    layout = AttentionLayout.from_position_ids(pos, cu_seqlens=padded)
    q, k, v = leaves(B, 4, 2, L, 16, torch.float32, seed=1)
    grad = torch.randn(B, 4, L, 16)
    for a, b in zip(fwd_bwd(sdpa_docs.attention, q, k, v, layout, grad), fwd_bwd(sdpa_attention, q, k, v, flat, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_cu_seqlens_and_annealing_are_refused():
    q, k, v = leaves(1, 2, 2, 8, 4, torch.float32, seed=0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    short = AttentionLayout.from_position_ids(pos, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to 8"):
        sdpa_docs.attention(q, k, v, short)
    annealed = AttentionLayout.from_position_ids(pos, anneal=AnnealMask(seed=0, step=1, p=0.5))
    with pytest.raises(ValueError, match="annealing"):
        sdpa_docs.attention(q, k, v, annealed)


def test_auto_on_cpu_is_mask_free_unless_annealing(caplog):
    attn.resolve_backend.cache_clear()
    try:
        with caplog.at_level("INFO", logger="dlm.attention"):
            assert attn.resolve_backend("auto", "cpu", False) == "sdpa_docs"
            assert attn.resolve_backend("auto", "cpu", True) == "sdpa"
        assert "skipped sdpa_docs: it only supports document masks" in caplog.text
    finally:
        attn.resolve_backend.cache_clear()
