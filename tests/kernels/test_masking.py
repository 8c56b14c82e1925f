"""Token masking: Philox reference against published vectors, Triton (interpreter) bit-exact
against the reference, layout independence, Bernoulli(t) statistics, dispatcher errors."""

import pytest
import torch

from dlm.kernels.masking import mask_tokens, philox4x32

# Random123 known-answer tests for philox4x32_10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_reference_matches_random123(ctr, key, expected):
    out = philox4x32(*[torch.tensor([c]) for c in ctr], *key)
    assert tuple(int(o) for o in out) == expected


def _inputs(B, L, seed=0, all_rows=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (B, L), generator=g)
    maskable = torch.rand(B, L, generator=g) < 0.6
    t = torch.rand(B, generator=g).clamp_min(1e-3)
    if all_rows and B >= 3:
        maskable[0] = False  # nothing maskable
        maskable[1] = True  # everything maskable
        t[2] = 1.0  # every maskable token masked
    return ids, maskable, t


@pytest.mark.parametrize("B,L", [(1, 1), (3, 37), (5, 130), (2, 1025)])
def test_triton_bit_exact_vs_reference(B, L):
    ids, maskable, t = _inputs(B, L, seed=B * L)
    # sample ids large enough that sample_id * L crosses 2**32 (high counter word in use)
    sample_ids = torch.arange(B) * (2**33 // max(L, 1)) + 11
    for seed, mk in [(0, maskable), (2**40 + 12345, maskable), (1, None)]:
        got = mask_tokens(ids, mk, t, sample_ids, seed, 4242, impl="triton")
        ref = mask_tokens(ids, mk, t, sample_ids, seed, 4242, impl="reference")
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype and g.shape == r.shape
            assert torch.equal(g, r)


def test_outputs_are_consistent():
    ids, maskable, t = _inputs(6, 200)
    t[3] = 0.5
    noisy, masked, weights = mask_tokens(ids, maskable, t, torch.arange(6), seed=3, mask_id=7777)
    assert not (masked & ~maskable).any()
    assert not masked[0].any()
    assert torch.equal(masked[2], maskable[2])  # t = 1
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], 7777))
    assert torch.equal(noisy[~masked], ids[~masked])
    assert torch.equal(weights, torch.where(masked, 1.0 / t[:, None], torch.zeros(())))


def test_masked_fraction_matches_t():
    B, L = 16, 2048
    ids = torch.zeros(B, L, dtype=torch.long)
    t = torch.linspace(0.02, 0.98, B)
    _, masked, _ = mask_tokens(ids, None, t, torch.arange(B) + 1000, seed=9, mask_id=1)
    frac = masked.float().mean(1)
    sd = (t * (1 - t) / L).sqrt()
    assert ((frac - t).abs() < 5 * sd).all(), (frac, t)


def test_same_mask_under_any_layout():
    """The mask of a sample depends on (seed, sample id, position) only: not on its row in a
    micro-batch, the micro-batch size, or the number of ranks."""
    G, L = 12, 53
    ids, maskable, t = _inputs(G, L, all_rows=False)
    sids = torch.arange(100, 100 + G)
    whole = mask_tokens(ids, maskable, t, sids, 5, 99, impl="reference")
    for world, micro in [(2, 3), (4, 1), (3, 2)]:
        per_rank = G // world
        for r in range(world):
            for start in range(r * per_rank, (r + 1) * per_rank, micro):
                sl = slice(start, start + micro)
                for impl in ("reference", "triton"):
                    part = mask_tokens(ids[sl], maskable[sl], t[sl], sids[sl], 5, 99, impl=impl)
                    for p, w in zip(part, whole):
                        assert torch.equal(p, w[sl])
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(1))
    shuffled = mask_tokens(ids[perm], maskable[perm], t[perm], sids[perm], 5, 99)
    for s, w in zip(shuffled, whole):
        assert torch.equal(s, w[perm])


def test_seed_and_sample_change_the_mask():
    ids = torch.zeros(2, 512, dtype=torch.long)
    t = torch.full((2,), 0.5)
    a = mask_tokens(ids, None, t, torch.tensor([0, 1]), 0, 1)[1]
    b = mask_tokens(ids, None, t, torch.tensor([0, 1]), 1, 1)[1]
    assert not torch.equal(a[0], a[1])  # different samples
    assert not torch.equal(a, b)  # different seeds
    assert torch.equal(a, mask_tokens(ids, None, t, torch.tensor([0, 1]), 0, 1)[1])


def test_dispatcher_errors(monkeypatch):
    ids, maskable, t = _inputs(2, 8, all_rows=False)
    sids = torch.arange(2)
    with pytest.raises(ValueError, match="impl"):
        mask_tokens(ids, maskable, t, sids, 0, 1, impl="cuda")
    with pytest.raises(ValueError, match="maskable"):
        mask_tokens(ids, maskable[:, :4], t, sids, 0, 1)
    with pytest.raises(ValueError, match="maskable"):
        mask_tokens(ids, maskable.long(), t, sids, 0, 1)
    with pytest.raises(ValueError, match="t must"):
        mask_tokens(ids, maskable, t[:1], sids, 0, 1)
    with pytest.raises(ValueError, match="sample_ids"):
        mask_tokens(ids, maskable, t, sids[:1], 0, 1)
    with pytest.raises(ValueError, match="seed"):
        mask_tokens(ids, maskable, t, sids, -1, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        mask_tokens(ids, maskable, t, sids, 0, 1, impl="triton")
