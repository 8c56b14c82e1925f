"""The diffusion objective: t sampling, crops, masking, loss and held-out ELBO (docs/design.md §2)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlm.attention.layout import AnnealMask, AttentionLayout
from dlm.diffusion import (
    DiffusionConfig,
    crop_lengths,
    diffusion_loss,
    heldout_elbo,
    noise_batch,
    sample_t,
)

V, D, MASK = 50, 16, 49


class TinyMixer(nn.Module):
    """A minimal model with the dlm forward contract: each token adds a projection of the mean of
    the tokens it may attend to (so the layout matters), tied output embedding."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.config = SimpleNamespace(mask_token_id=MASK)
        self.seen_layouts = []
        self.hidden = None

    def output_weight(self):
        return self.emb.weight

    def forward(self, input_ids, layout: AttentionLayout, head=None):
        self.seen_layouts.append(layout)
        x = self.emb(input_ids)
        allowed = layout.dense_mask()[:, 0].float()  # [B, L, L]
        ctx = allowed @ x / allowed.sum(-1, keepdim=True)
        h = torch.tanh(x + self.mix(ctx))
        if h.requires_grad:
            h.retain_grad()
        self.hidden = h
        if head is not None:
            return head(h, self.output_weight())
        return F.linear(h, self.output_weight())


def packed_batch(B=4, L=24, first_id=0, seed=0, docs=3):
    """Rows of `docs` documents each (random boundaries), position ids restarting at 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (B, L), generator=g)
    pos = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        cuts = sorted(torch.randperm(L - 1, generator=g)[: docs - 1].add(1).tolist())
        starts = [0] + cuts
        ends = cuts + [L]
        for s, e in zip(starts, ends):
            pos[b, s:e] = torch.arange(e - s)
    return dict(input_ids=ids, position_ids=pos, sample_ids=torch.arange(first_id, first_id + B))


def brute_force_elbo_sum(model, noised):
    """Per token: CE(logits[b, i-1], x[b, i]) / t_b over masked (b, i), by explicit loops."""
    logits = model(noised.noisy_ids, noised.layout()).double()
    total = torch.zeros((), dtype=torch.float64)
    B, L = noised.masked.shape
    for b in range(B):
        for i in range(1, L):
            if noised.masked[b, i]:
                ce = F.cross_entropy(logits[b, i - 1][None], noised.targets[b, i][None])
                total = total + ce / noised.t[b].double()
    return total


# --- t ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("G,first,step", [(16, 0, 0), (16, 5 * 16 + 3, 7), (7, 1000, 3), (1, 9, 2)])
def test_low_discrepancy_one_t_per_stratum(G, first, step):
    cfg = DiffusionConfig(mask_token_id=MASK)
    t = sample_t(torch.arange(first, first + G), G, step, cfg).double()
    u = (t - cfg.eps) / (1 - cfg.eps)
    strata = torch.floor(u * G).long().clamp(0, G - 1)
    assert sorted(strata.tolist()) == list(range(G))


def test_t_range_determinism_and_steps():
    cfg = DiffusionConfig(mask_token_id=MASK)
    sids = torch.arange(64)
    t = sample_t(sids, 64, 3, cfg)
    assert t.dtype == torch.float32 and ((t >= cfg.eps) & (t <= 1)).all()
    assert torch.equal(t, sample_t(sids, 64, 3, cfg))
    assert not torch.equal(t, sample_t(sids, 64, 4, cfg))
    assert not torch.equal(t, sample_t(sids, 64, 3, DiffusionConfig(mask_token_id=MASK, seed=1)))
    iid = DiffusionConfig(mask_token_id=MASK, low_discrepancy=False)
    t_iid = sample_t(torch.arange(4000), 4000, 0, iid)
    assert ((t_iid >= iid.eps) & (t_iid <= 1)).all()
    assert abs(t_iid.mean().item() - 0.5) < 0.03
    # iid draws are not stratified: some stratum of 4000 holds two or more draws
    assert len(set(torch.floor(t_iid.double() * 4000).long().tolist())) < 4000


@pytest.mark.parametrize("low_discrepancy", [True, False])
def test_t_independent_of_world_size(low_discrepancy):
    cfg = DiffusionConfig(mask_token_id=MASK, low_discrepancy=low_discrepancy)
    G, step = 24, 11
    sids = torch.arange(step * G, (step + 1) * G)
    whole = sample_t(sids, G, step, cfg)
    for world in (2, 3, 8):
        parts = [sample_t(chunk, G, step, cfg) for chunk in sids.chunk(world)]
        assert torch.equal(torch.cat(parts), whole)


# --- noise_batch ------------------------------------------------------------------------------


def test_masked_fraction_matches_expected_t():
    cfg = DiffusionConfig(mask_token_id=MASK, random_length_prob=0.0)
    batch = packed_batch(B=64, L=256, docs=4)
    nb = noise_batch(batch, step=2, cfg=cfg, global_batch_size=64)
    n_elig = nb.eligible.sum(1).double()
    expected = (nb.t.double() * n_elig).sum()
    sd = (nb.t.double() * (1 - nb.t.double()) * n_elig).sum().sqrt()
    assert abs(nb.masked.sum().item() - expected.item()) < 5 * sd.item()
    # low-discrepancy t over the global batch has mean ~ 1/2
    assert abs(nb.t.mean().item() - 0.5) < 1.0 / 64 + 1e-3


def test_document_starts_never_masked_and_masked_subset_of_eligible():
    cfg = DiffusionConfig(mask_token_id=MASK, random_length_prob=0.0)
    for step in range(4):
        batch = packed_batch(B=16, L=40, first_id=16 * step, seed=step, docs=5)
        nb = noise_batch(batch, step=step, cfg=cfg, global_batch_size=16)
        starts = batch["position_ids"] == 0
        assert starts.sum() == 16 * 5
        assert not nb.masked[starts].any() and not nb.eligible[starts].any()
        assert torch.equal(nb.eligible, ~starts)
        assert not (nb.masked & ~nb.eligible).any()
        assert torch.equal(nb.noisy_ids[nb.masked], torch.full((int(nb.n_masked),), MASK))
        assert torch.equal(nb.noisy_ids[~nb.masked], batch["input_ids"][~nb.masked])
        assert torch.equal(nb.weights, torch.where(nb.masked, 1.0 / nb.t[:, None], torch.zeros(())))
        assert nb.n_eligible.item() == nb.eligible.sum().item()


def test_explicit_mask_even_when_text_contains_mask_id():
    cfg = DiffusionConfig(mask_token_id=MASK, random_length_prob=0.0)
    batch = packed_batch(B=8, L=32)
    batch["input_ids"][:, 5] = MASK  # real text holding the mask id
    nb = noise_batch(batch, 0, cfg, 8)
    assert nb.masked.sum() < (nb.noisy_ids == MASK).sum()
    assert torch.equal(nb.targets, batch["input_ids"])


def test_random_length_crops():
    L = 30
    cfg = DiffusionConfig(mask_token_id=MASK, random_length_prob=1.0)
    batch = packed_batch(B=32, L=L, docs=2)
    n = crop_lengths(batch["sample_ids"], L, cfg)
    assert ((n >= 2) & (n <= L)).all() and len(set(n.tolist())) > 5
    nb = noise_batch(batch, 0, cfg, 32)
    cols = torch.arange(L)
    for b in range(32):
        tail = cols >= n[b]
        assert not nb.eligible[b, tail].any()
        assert torch.equal(nb.position_ids[b, ~tail], batch["position_ids"][b, ~tail])
        assert torch.equal(nb.position_ids[b, tail], torch.arange(int(tail.sum())))
    layout = nb.layout()
    for b in range(32):
        if n[b] < L:  # the tail is its own segment: the kept prefix cannot see it
            assert layout.doc_ids[b, n[b]] != layout.doc_ids[b, n[b] - 1]
    # every length in [2, L] is reachable
    small = crop_lengths(torch.arange(2000), 5, cfg)
    assert set(small.tolist()) == {2, 3, 4, 5}


def test_random_length_probability():
    cfg = DiffusionConfig(mask_token_id=MASK)  # default 0.01
    n = crop_lengths(torch.arange(40000), 100, cfg)
    frac = (n < 100).double().mean().item()  # (a cut to exactly L changes nothing)
    assert 0.006 < frac < 0.014
    assert torch.equal(
        crop_lengths(torch.arange(100), 100, DiffusionConfig(mask_token_id=MASK, random_length_prob=0.0)),
        torch.full((100,), 100),
    )


def test_same_sample_same_noise_under_any_layout():
    cfg = DiffusionConfig(mask_token_id=MASK, random_length_prob=0.3, seed=4)
    G, step = 12, 5
    batch = packed_batch(B=G, L=33, first_id=G * step)
    whole = noise_batch(batch, step, cfg, G)
    fields = ("noisy_ids", "masked", "weights", "eligible", "position_ids", "t")
    for world, micro in [(2, 2), (3, 4), (4, 1)]:
        per_rank = G // world
        for start in range(0, G, micro):
            assert start // per_rank == (start + micro - 1) // per_rank  # micro-batch inside one rank
            part = noise_batch({k: v[start : start + micro] for k, v in batch.items()}, step, cfg, G)
            for f in fields:
                assert torch.equal(getattr(part, f), getattr(whole, f)[start : start + micro]), f


def test_noise_is_deterministic_under_seed():
    batch = packed_batch(B=8, L=32)
    a = noise_batch(batch, 1, DiffusionConfig(mask_token_id=MASK, seed=3), 8)
    b = noise_batch(batch, 1, DiffusionConfig(mask_token_id=MASK, seed=3), 8)
    c = noise_batch(batch, 1, DiffusionConfig(mask_token_id=MASK, seed=4), 8)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.t, b.t)
    assert not torch.equal(a.masked, c.masked)


def test_bad_batches_and_configs():
    cfg = DiffusionConfig(mask_token_id=MASK)
    batch = packed_batch()
    with pytest.raises(KeyError, match="sample_ids"):
        noise_batch({k: v for k, v in batch.items() if k != "sample_ids"}, 0, cfg, 4)
    with pytest.raises(ValueError, match="maskable"):
        noise_batch({**batch, "maskable": torch.ones(4, 24, dtype=torch.long)}, 0, cfg, 4)
    with pytest.raises(ValueError, match="position_ids"):
        noise_batch({**batch, "position_ids": batch["position_ids"][:, :5]}, 0, cfg, 4)
    for bad in [
        dict(eps=0.0),
        dict(loss_norm="tokens"),
        dict(random_length_prob=1.5),
        dict(anneal_steps=-1),
        dict(seed=-1),
        dict(mask_token_id=-1),
    ]:
        with pytest.raises(ValueError):
            DiffusionConfig(**{"mask_token_id": MASK, **bad})
    with pytest.raises(ValueError, match="global_batch_size"):
        sample_t(torch.arange(3), 0, 0, cfg)


# --- loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_norm", ["eligible", "masked"])
def test_loss_matches_brute_force(loss_norm):
    cfg = DiffusionConfig(mask_token_id=MASK, loss_norm=loss_norm, random_length_prob=0.5)
    model = TinyMixer()
    # two micro-batches of one global batch: the normalizer is the global count
    micro = [noise_batch(packed_batch(B=3, L=20, first_id=f, seed=f), 0, cfg, 6) for f in (0, 3)]
    norm = sum(nb.norm_count for nb in micro)
    expect_norm = sum((nb.eligible if loss_norm == "eligible" else nb.masked).sum() for nb in micro)
    assert norm == expect_norm and norm > 0
    for nb in micro:
        out = diffusion_loss(model, nb, norm)
        ref = brute_force_elbo_sum(model, nb)
        assert out.elbo_sum.dtype == torch.float32
        torch.testing.assert_close(out.elbo_sum.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss.double(), ref / norm.double(), rtol=1e-5, atol=1e-6)
        assert not out.elbo_sum.requires_grad and out.loss.requires_grad


def test_gradient_flows_only_through_masked_predictions():
    cfg = DiffusionConfig(mask_token_id=MASK, random_length_prob=0.0)
    model = TinyMixer()
    nb = noise_batch(packed_batch(B=4, L=24), 0, cfg, 4)
    assert 0 < nb.n_masked < nb.n_eligible
    out = diffusion_loss(model, nb, nb.n_eligible)
    out.loss.backward()
    grad_nonzero = model.hidden.grad.abs().sum(-1) > 0  # [B, L]
    predicts_masked = torch.zeros_like(nb.masked)
    predicts_masked[:, :-1] = nb.masked[:, 1:]
    assert torch.equal(grad_nonzero, predicts_masked)


def test_loss_is_deterministic_and_empty_batches_are_finite():
    cfg = DiffusionConfig(mask_token_id=MASK)
    model = TinyMixer()
    batch = packed_batch(B=4, L=24)
    l1 = diffusion_loss(model, noise_batch(batch, 0, cfg, 4), 50).loss
    l2 = diffusion_loss(model, noise_batch(batch, 0, cfg, 4), 50).loss
    assert torch.equal(l1, l2)
    # nothing maskable anywhere: loss 0 (not NaN) that still backprops
    nothing = noise_batch({**batch, "maskable": torch.zeros(4, 24, dtype=torch.bool)}, 0, cfg, 4)
    assert nothing.n_eligible == 0 and nothing.n_masked == 0
    out = diffusion_loss(model, nothing, nothing.n_eligible)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert model.emb.weight.grad is not None and model.emb.weight.grad.abs().sum() == 0


def test_annealing_schedule_reaches_the_model():
    cfg = DiffusionConfig(mask_token_id=MASK, anneal_steps=10, seed=7)
    model = TinyMixer()
    batch = packed_batch(B=2, L=16)
    diffusion_loss(model, noise_batch(batch, 3, cfg, 2), 10)
    assert model.seen_layouts[-1].anneal == AnnealMask(seed=7, step=3, p=0.4)
    assert not model.seen_layouts[-1].causal
    diffusion_loss(model, noise_batch(batch, 3, cfg, 2), 10, step=5)
    assert model.seen_layouts[-1].anneal == AnnealMask(seed=7, step=5, p=0.6)
    diffusion_loss(model, noise_batch(batch, 9, cfg, 2), 10)
    assert model.seen_layouts[-1].anneal is None  # p = 1: plain bidirectional
    diffusion_loss(model, noise_batch(batch, 0, DiffusionConfig(mask_token_id=MASK), 2), 10)
    assert model.seen_layouts[-1].anneal is None


# --- held-out ELBO ----------------------------------------------------------------------------


def test_heldout_elbo_matches_brute_force_and_is_repeatable():
    from dlm.diffusion import _elbo_seed, eligible_tokens
    from dlm.kernels.masking import mask_tokens

    model = TinyMixer()
    batch = packed_batch(B=3, L=20, first_id=500)
    K = 3
    nats, n_tok = heldout_elbo(model, batch, num_samples=K, seed=11)
    assert nats.shape == (3,) and n_tok.tolist() == (batch["position_ids"] != 0).sum(1).tolist()
    # brute force: same stratified t and the documented masking stream, explicit per-token loop
    elig = eligible_tokens(batch["position_ids"], None)
    layout = AttentionLayout.from_position_ids(batch["position_ids"])
    ref = torch.zeros(3, dtype=torch.float64)
    for k in range(K):
        t = torch.full((3,), (k + 0.5) / K)
        noisy, masked, _ = mask_tokens(batch["input_ids"], elig, t, batch["sample_ids"], _elbo_seed(11, k), MASK)
        logits = model(noisy, layout).double()
        for b in range(3):
            for i in range(1, 20):
                if masked[b, i]:
                    ref[b] += F.cross_entropy(logits[b, i - 1][None], batch["input_ids"][b, i][None]) / t[b].double()
    torch.testing.assert_close(nats, ref / K, rtol=1e-5, atol=1e-5)
    again, _ = heldout_elbo(model, batch, num_samples=K, seed=11)
    assert torch.equal(nats, again)
    other, _ = heldout_elbo(model, batch, num_samples=K, seed=12)
    assert not torch.equal(nats, other)
    # a model predicting uniformly scores log V per masked token; with the 1/t weights the bound
    # is log V per eligible token in expectation
    with torch.no_grad():
        model.emb.weight.zero_()
    nats, n_tok = heldout_elbo(model, packed_batch(B=16, L=64, docs=1), num_samples=8, seed=0)
    ratio = (nats.sum() / n_tok.sum()).item() / torch.log(torch.tensor(float(V))).item()
    assert 0.9 < ratio < 1.1
