"""ELBO and AR scorers on tiny llama models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlm.attention.layout import AttentionLayout
from dlm.evaluation.scoring import ar_generate, ar_nll, elbo_nll, question_generator
from dlm.models import build_model, preset

MASK = 256


def _model(seed: int = 0, **shape):
    cfg = preset("tiny-llama").replace(vocab_size=320, base_vocab_size=256, mask_token_id=MASK, **shape)
    model = build_model(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def _train_diffusion(model, rows: torch.Tensor, steps: int, seed: int = 0) -> None:
    """A few dozen steps of the masked-diffusion objective (output i-1 predicts masked token i,
    weight 1/t) on fixed rows, so the model memorises them."""
    model.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    B, L = rows.shape
    layout = AttentionLayout.single(B, L)
    for _ in range(steps):
        t = torch.rand(B, 1, generator=g).clamp_min(0.05)
        masked = torch.rand(B, L, generator=g) < t
        masked[:, 0] = False
        noisy = rows.masked_fill(masked, MASK)
        r, c = masked.nonzero(as_tuple=True)

        def head(hidden, weight, r=r, c=c, t=t, masked=masked):
            logits = hidden[r, c - 1] @ weight.t()
            return (F.cross_entropy(logits.float(), rows[r, c], reduction="none") / t[r, 0]).sum() / masked.numel()

        loss = model(noisy, layout, head=head)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_elbo_picks_the_trained_continuation():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n_q, n_choices, ctx_len, cont_len = 4, 4, 6, 6
    contexts = [[1] + torch.randint(3, 256, (ctx_len - 1,), generator=g).tolist() for _ in range(n_q)]
    conts = [[torch.randint(3, 256, (cont_len,), generator=g).tolist() for _ in range(n_choices)] for _ in range(n_q)]
    labels = [q % n_choices for q in range(n_q)]
    model = _model(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)  # small: trains in a second
    trained = torch.tensor([contexts[q] + conts[q][labels[q]] for q in range(n_q)])
    _train_diffusion(model, trained, steps=30)
    questions = [[(contexts[q], conts[q][j]) for j in range(n_choices)] for q in range(n_q)]
    scores = elbo_nll(model, questions, num_samples=8, seed=0, batch_size=16)
    picked = [min(range(n_choices), key=s.__getitem__) for s in scores]
    assert picked == labels
    # an untrained model has no reason to prefer them
    untrained = elbo_nll(
        _model(seed=1, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
        questions,
        num_samples=8,
        seed=0,
        batch_size=16,
    )
    assert [min(range(n_choices), key=s.__getitem__) for s in untrained] != labels


def test_elbo_shares_noise_across_choices_and_ignores_batching():
    model = _model()
    ctx, a, b = [1, 10, 11, 12], [20, 21, 22, 23, 24], [30, 31]
    q = [[(ctx, a), (ctx, list(a)), (ctx, b)], [([1, 5], b), ([1, 5, 6, 7], a)]]
    s1 = elbo_nll(model, q, num_samples=6, seed=3, batch_size=1)
    s2 = elbo_nll(model, q, num_samples=6, seed=3, batch_size=50)
    assert s1[0][0] == s1[0][1]  # identical choices see identical noise, so identical scores
    assert all(x == pytest.approx(y, rel=1e-5) for r1, r2 in zip(s1, s2) for x, y in zip(r1, r2))
    assert all(x > 0 for r in s1 for x in r)
    other = elbo_nll(model, q, num_samples=6, seed=4, batch_size=50)
    assert other != s2


def test_elbo_single_token_is_the_weighted_ce():
    """One continuation token: the estimate is CE * (1/K) sum_k 1[u_k < t_k] / t_k, with u drawn
    from the question's generator (its expectation over u is exactly CE)."""
    model = _model()
    ctx, cont, K = [1, 40, 41, 42], [43], 16
    logits = model(torch.tensor([ctx + [MASK]]), AttentionLayout.single(1, 5))
    ce = F.cross_entropy(logits[0, 3:4].double(), torch.tensor(cont)).item()
    u = torch.rand(K, 1, generator=question_generator(5, 0))[:, 0]
    weight = sum(1.0 / ((k + 0.5) / K) for k in range(K) if u[k] < (k + 0.5) / K) / K
    got = elbo_nll(model, [[(ctx, cont)]], num_samples=K, seed=5, batch_size=4, estimator="ratio")[0][0]
    assert weight > 0 and got == pytest.approx(ce * weight, rel=1e-5)
    # the default "count" form masks the one token in every sample with weight 1: exactly CE
    count = elbo_nll(model, [[(ctx, cont)]], num_samples=K, seed=5, batch_size=4)[0][0]
    assert count == pytest.approx(ce, rel=1e-5)


def _brute_force_loglik(model, ctx: list[int], cont: list[int]) -> float:
    total = 0.0
    for i, tok in enumerate(cont):
        prefix = torch.tensor([ctx + cont[:i]])
        logits = model(prefix, AttentionLayout.single(1, prefix.shape[1], causal=True))
        base = logits[0, -1, : model.config.base_vocab_size]  # the AR original's vocabulary
        total += torch.log_softmax(base.double(), -1)[tok].item()
    return total


def test_ar_scorer_matches_brute_force():
    model = _model(seed=2)
    pairs = [([1, 7, 8], [9, 10, 11]), ([1], [50]), ([1, 3, 4, 5, 6, 7, 8, 9], [60, 61])]
    nll, _ = ar_nll(model, pairs, batch_size=2)
    for (ctx, cont), got in zip(pairs, nll):
        assert got == pytest.approx(-_brute_force_loglik(model, ctx, cont), rel=1e-4, abs=1e-4)
    # greedy flag: build a continuation that *is* the greedy one
    gen = ar_generate(model, [[1, 7, 8]], max_new=4, eos_id=None, batch_size=1)[0]
    assert len(gen) == 4
    _, g2 = ar_nll(model, [([1, 7, 8], gen), ([1, 7, 8], [(gen[0] + 1) % 256] + gen[1:])], batch_size=4)
    assert g2 == [True, False]


def test_ar_generate_batched_equals_single_and_stops_at_eos():
    model = _model(seed=3)
    prompts = [[1, 5, 6], [1, 9, 10, 11, 12, 13]]
    batched = ar_generate(model, prompts, max_new=5, eos_id=None, batch_size=2)
    single = [ar_generate(model, [p], max_new=5, eos_id=None, batch_size=1)[0] for p in prompts]
    assert batched == single
    first = batched[0][0]
    stopped = ar_generate(model, prompts[:1], max_new=5, eos_id=first, batch_size=1)
    assert stopped == [[]]
