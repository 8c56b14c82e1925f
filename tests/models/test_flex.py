"""FlexAttention backend against the dense SDPA reference; annealing masks; backend selection."""

import pytest
import torch

from dlm.attention import BackendUnavailable, attend, resolve_backend
from dlm.attention import flex as flex_backend
from dlm.attention.layout import AnnealMask, AttentionLayout


def packed_positions(B: int, L: int, seed: int) -> torch.Tensor:
    """Random document boundaries per row (documents of length 1 included)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        starts = torch.rand(L, generator=g) < 0.08
        starts[0] = True
        starts[L // 2] = starts[L // 2 + 1] = True  # a one-token document
        idx = torch.arange(L)
        last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
        rows.append(idx - last_start)
    return torch.stack(rows)


LAYOUTS = {
    "causal": dict(causal=True),
    "bidirectional": dict(),
    "annealed": dict(anneal=AnnealMask(seed=3, step=40, p=0.37)),
}


# MHA below one 128 block, GQA across a block boundary
@pytest.mark.parametrize("H,Hkv,L", [(4, 4, 100), (6, 2, 130)])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_flex_matches_dense_reference(kind, H, Hkv, L):
    g = torch.Generator().manual_seed(L + H)
    q = torch.randn(2, H, L, 16, generator=g)
    k = torch.randn(2, Hkv, L, 16, generator=g)
    v = torch.randn(2, Hkv, L, 16, generator=g)
    layout = AttentionLayout.from_position_ids(packed_positions(2, L, seed=L), **LAYOUTS[kind])
    got = attend(q, k, v, layout, backend="flex")
    want = attend(q, k, v, layout, backend="sdpa")
    assert got.shape == (2, H, L, 16)
    assert (got - want).abs().max() < 1e-5


def test_flex_cpu_backward_is_refused_clearly():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_backend='sdpa'"):
        attend(q, q, q, AttentionLayout.single(1, 8), backend="flex")


def test_flex_bf16_within_tolerance():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    layout = AttentionLayout.from_position_ids(packed_positions(1, 64, seed=1))
    got = attend(q, k, v, layout, backend="flex").float()
    want = attend(q.float(), k.float(), v.float(), layout, backend="sdpa")
    assert ((got - want).abs().max() / want.abs().max()) < 1e-2


def test_block_mask_reused_across_layers_and_rebuilt_for_new_layout():
    layout = AttentionLayout.from_position_ids(packed_positions(1, 40, seed=2))
    assert flex_backend.block_mask(layout) is flex_backend.block_mask(layout)
    other = AttentionLayout.from_position_ids(packed_positions(1, 40, seed=3))
    assert flex_backend.block_mask(other) is not flex_backend.block_mask(layout)


def test_anneal_p0_is_causal_and_p1_is_full_within_documents():
    pos = packed_positions(2, 90, seed=4)
    causal = AttentionLayout.from_position_ids(pos, causal=True).dense_mask()
    full = AttentionLayout.from_position_ids(pos).dense_mask()
    p0 = AttentionLayout.from_position_ids(pos, anneal=AnnealMask(seed=1, step=0, p=0.0)).dense_mask()
    p1 = AttentionLayout.from_position_ids(pos, anneal=AnnealMask(seed=1, step=0, p=1.0)).dense_mask()
    assert torch.equal(p0, causal) and torch.equal(p1, full) and not torch.equal(causal, full)

    # in between: about p of the future entries open, the same ones for every row of the batch
    single = torch.zeros(2, 256, dtype=torch.long)
    single[:] = torch.arange(256)
    half = AttentionLayout.from_position_ids(single, anneal=AnnealMask(seed=1, step=7, p=0.3)).dense_mask()
    future = torch.triu(torch.ones(256, 256, dtype=torch.bool), diagonal=1)
    frac = half[0, 0][future].float().mean().item()
    assert abs(frac - 0.3) < 0.01 and torch.equal(half[0], half[1])
    # same through flex as through the dense mask
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 90, 8, generator=g) for _ in range(3))
    for p in (0.0, 1.0):
        lay = AttentionLayout.from_position_ids(pos, anneal=AnnealMask(seed=1, step=0, p=p))
        ref = AttentionLayout.from_position_ids(pos, causal=p == 0.0)
        assert (attend(q, k, v, lay, "flex") - attend(q, k, v, ref, "sdpa")).abs().max() < 1e-5


def test_backend_selection_errors():
    with pytest.raises(BackendUnavailable, match="'flash' cannot be used on cpu: .*CUDA"):
        resolve_backend("flash", "cpu", False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flashy", "cpu", False)
    assert resolve_backend("flex", "cpu", True) == "flex"
    assert resolve_backend("auto", "cpu", True) == "sdpa"
    assert flex_backend.ARBITRARY_MASK and flex_backend.available(torch.device("cpu")) is None
    assert "meta" in flex_backend.available(torch.device("meta"))
