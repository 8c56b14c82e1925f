"""Single-process training loop: adapting a tiny model with the diffusion objective lowers the
loss (and the held-out ELBO) on a small structured corpus; the real models' fused head agrees
with a brute-force loss over full logits."""

import pytest
import torch
import torch.nn.functional as F

from dlm.diffusion import DiffusionConfig, diffusion_loss, heldout_elbo, noise_batch
from dlm.models import build_model, preset

L, MASK = 64, 255


def corpus_row(sample_id: int) -> dict:
    """A packed row of documents that repeat a short motif of 32 possible tokens (learnable both
    from the unigram statistics and by copying from either side)."""
    g = torch.Generator().manual_seed(10_000 + sample_id)
    ids: list[int] = []
    pos: list[int] = []
    while len(ids) < L:
        n = int(torch.randint(8, 40, (1,), generator=g))
        motif = torch.randint(3, 35, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        ids += (motif * n)[:n]
        pos += list(range(n))
    return dict(input_ids=torch.tensor(ids[:L]), position_ids=torch.tensor(pos[:L]), sample_id=sample_id)


def batch_of(sample_ids) -> dict:
    rows = [corpus_row(int(s)) for s in sample_ids]
    return dict(
        input_ids=torch.stack([r["input_ids"] for r in rows]),
        position_ids=torch.stack([r["position_ids"] for r in rows]),
        sample_ids=torch.as_tensor(list(sample_ids), dtype=torch.int64),
    )


def tiny(name: str, seed: int = 0):
    model = build_model(preset(name).replace(mask_token_id=MASK))
    model.init_weights(seed=seed)
    return model


@pytest.mark.slow  # a few hundred optimizer steps
def test_training_lowers_diffusion_loss():
    torch.manual_seed(0)
    model = tiny("tiny-llama")
    cfg = DiffusionConfig(mask_token_id=MASK, anneal_steps=8, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    G, micro, steps = 4, 2, 30
    heldout = batch_of(range(10**6, 10**6 + 4))
    before = heldout_elbo(model, heldout, num_samples=2, seed=0)
    losses = []
    for step in range(steps):
        ids = range(step * G, (step + 1) * G)
        micro_batches = [noise_batch(batch_of(ids[i : i + micro]), step, cfg, G) for i in range(0, G, micro)]
        normalizer = sum(nb.norm_count for nb in micro_batches)  # what the trainer all-reduces
        total = 0.0
        for nb in micro_batches:
            out = diffusion_loss(model, nb, normalizer)
            out.loss.backward()
            total += out.loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10  # per-step losses vary with t
    assert last < 0.8 * first, (first, last)
    after = heldout_elbo(model, heldout, num_samples=2, seed=0)
    assert torch.equal(after[1], before[1])
    assert after[0].sum() < 0.75 * before[0].sum(), (before[0].sum(), after[0].sum())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_real_model_loss_matches_full_logits(name):
    model = tiny(name, seed=3)
    cfg = DiffusionConfig(mask_token_id=MASK, random_length_prob=0.5, seed=2)
    nb = noise_batch(batch_of(range(4)), 0, cfg, 4)
    out = diffusion_loss(model, nb, nb.n_eligible)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(nb.noisy_ids, nb.layout())[:, :-1]
    sel = nb.masked[:, 1:]
    ce = F.cross_entropy(logits[sel], nb.targets[:, 1:][sel], reduction="none")
    ref = (ce * nb.weights[:, 1:][sel]).sum() / nb.n_eligible
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
