"""ELBO estimators for scoring ("count" = LLaDA's form, "ratio" = the time form) against exact
enumeration of every mask set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlm.evaluation.scoring import ESTIMATORS, elbo_nll, exact_elbo_nll, mask_draws
from dlm.models import build_model, preset

from .test_sampling import BOS, PositionModel, _table


def _model(seed: int = 0):
    cfg = preset("tiny-llama").replace(vocab_size=320, base_vocab_size=256, mask_token_id=256)
    model = build_model(cfg)
    model.init_weights(seed=seed)
    return model.eval()


def _questions(seed: int, n_q: int = 3) -> list[list[tuple[list[int], list[int]]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_q):
        ctx = [1] + torch.randint(3, 256, (4,), generator=g).tolist()
        out.append([(ctx, torch.randint(3, 256, (n,), generator=g).tolist()) for n in (2, 4, 5)])
    return out


def test_exact_elbo_of_a_context_free_model_is_its_nll():
    """When predictions ignore the context (a position table), the bound is tight: the ELBO
    equals the summed cross-entropy of the continuation, an independent closed form."""
    table = _table(0)
    model = PositionModel(table)
    ctx, cont = [BOS, 3], [5, 7, 2, 9]
    logits = table[[2, 3, 4, 5]]  # output i-1 (table row i) predicts token i; [MASK] keeps its logit
    nll = float(F.cross_entropy(logits, torch.tensor(cont), reduction="sum"))
    exact = exact_elbo_nll(model, [[(ctx, cont)]], batch_size=8)[0][0]
    assert exact == pytest.approx(nll, rel=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_are_unbiased(estimator):
    model = _model(1)
    questions = _questions(2, n_q=1)
    exact = torch.tensor(exact_elbo_nll(model, questions, batch_size=64)[0])
    runs = torch.tensor([elbo_nll(model, questions, 2, seed, 64, estimator=estimator)[0] for seed in range(60)])
    mean, se = runs.mean(0), runs.std(0) / len(runs) ** 0.5
    assert ((mean - exact).abs() <= 4 * se + 1e-6).all(), (mean, exact, se)


def test_count_estimator_beats_ratio_at_equal_samples():
    model = _model(3)
    questions = _questions(4)
    exact = torch.tensor(exact_elbo_nll(model, questions, batch_size=64))

    def rms(estimator: str) -> float:
        errs = [
            (torch.tensor(elbo_nll(model, questions, 8, seed, 64, estimator=estimator)) - exact) / exact
            for seed in range(6)
        ]
        return float(torch.stack(errs).pow(2).mean().sqrt())

    assert rms("count") < rms("ratio")


def test_count_draws_are_stratified_and_shared():
    K, n = 8, 4
    u = torch.rand(K, 6, generator=torch.Generator().manual_seed(0))
    draws = mask_draws("count", u, 0.5, n)
    counts = [len(hit) for hit, _ in draws]
    assert counts == [1, 1, 2, 2, 3, 3, 4, 4]  # every l in 1..n, K/n times each
    assert all(w == pytest.approx(n / (len(hit) * K)) for hit, w in draws)
    order = u[:, :n].argsort(1)
    assert all(sorted(order[k, : counts[k]].tolist()) == draws[k][0] for k in range(K))


def test_identical_choices_get_identical_scores():
    model = _model(5)
    ctx, cont = [1, 9, 8], [20, 21, 22]
    for estimator in ESTIMATORS:
        a, b = elbo_nll(model, [[(ctx, cont), (ctx, cont)]], 4, 0, 8, estimator=estimator)[0]
        assert a == b


def test_errors():
    model = _model(0)
    with pytest.raises(ValueError, match="estimator"):
        elbo_nll(model, _questions(0, 1), 2, 0, 8, estimator="bogus")
    with pytest.raises(ValueError, match="2\\^17 rows"):
        exact_elbo_nll(model, [[([1], list(range(3, 20)))]], batch_size=8)
