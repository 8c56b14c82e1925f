"""Likelihood scorers over token rows `context | continuation`.

Diffusion (docs/design.md §4): the conditional ELBO of the n-token continuation given the context,
    -log p(cont | ctx) <= E_t [ sum over masked i of CE(out[i-1], x_i) / t ]        (t ~ U(0, 1])
                        = E_l [ n / l * sum over masked i of CE(out[i-1], x_i) ]    (l ~ U{1..n},
                          exactly l of the n tokens masked, uniformly),
the same bound (sum over mask sets M of (|M|-1)!(n-|M|)!/n! * CE(M), `exact_elbo_nll`). K
Monte-Carlo samples estimate it:
  "count" (LLaDA's form, the default): l_k = floor((k + u0) / K * n) + 1, stratified over 1..n;
          weights n / l are at most n, so the estimate has far less variance;
  "ratio" (the time form): t_k = (k + 0.5) / K, each token masked iff u < t_k, weight 1 / t_k,
          up to 2K at the smallest t, which makes a heavy tail.
Noise is shared by all choices of a question: one uniform u[k, j] per (sample k, continuation
offset j) (the "count" form masks the l offsets with the smallest u) and one u0, drawn from a
generator keyed by (seed, question index), so the estimate of a question does not depend on
batching or --limit. The context is never masked.

AR: the exact log-likelihood under the causal layout, on the same rows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dlm.attention.layout import AttentionLayout
from dlm.sampling import logits_at, pad_rows

Pair = tuple[list[int], list[int]]  # (context ids incl. BOS, continuation ids)

_GOLDEN = 0x9E3779B97F4A7C15
ESTIMATORS = ("count", "ratio")


def question_generator(seed: int, index: int) -> torch.Generator:
    """The noise stream of one question: keyed by its index, so --limit and batching never change it."""
    return torch.Generator().manual_seed((seed * _GOLDEN + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63))


def _forward_targets(
    model, inputs: list[list[int]], positions: list[list[int]], targets: list[list[int]], causal: bool, ar: bool
):
    """NLL [N], argmax hits [N] and row index [N] of `targets` at `positions` (output i-1 predicts
    i), row-major. `ar`: the AR original's distribution, with no probability on an appended
    [MASK] or on vocabulary padding rows."""
    longest = max(len(x) for x in inputs)
    if longest > model.config.max_seq_len:
        raise ValueError(
            f"a context + continuation row has {longest} tokens, "
            f"more than the model's max_seq_len {model.config.max_seq_len}"
        )
    device = model.output_weight().device
    ids, pos = pad_rows(inputs, device=device)
    layout = AttentionLayout.from_position_ids(pos, causal=causal)
    r = torch.tensor([b for b, p in enumerate(positions) for _ in p], dtype=torch.long, device=device)
    c = torch.tensor([i for p in positions for i in p], dtype=torch.long, device=device)
    tgt = torch.tensor([t for ts in targets for t in ts], dtype=torch.long, device=device)
    logits = logits_at(model, ids, layout, r, c - 1)
    if ar:
        logits[:, model.config.base_vocab_size :] = float("-inf")
    return F.cross_entropy(logits, tgt, reduction="none"), logits.argmax(-1) == tgt, r


def _chunks(jobs: Iterator, size: int) -> Iterator[list]:
    batch = []
    for job in jobs:
        batch.append(job)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def mask_draws(estimator: str, u: torch.Tensor, u0: float, n: int) -> list[tuple[list[int], float]]:
    """Per Monte-Carlo sample k of K = len(u): (masked continuation offsets, weight), such that
    the sum over k of weight * (summed CE of the masked tokens) estimates the ELBO bound of an
    n-token continuation. `u` [K, >= n] and `u0` are the question's shared noise."""
    K = u.shape[0]
    if estimator == "ratio":
        return [((u[k, :n] < (k + 0.5) / K).nonzero().flatten().tolist(), 1.0 / (k + 0.5)) for k in range(K)]
    if estimator != "count":
        raise ValueError(f"unknown ELBO estimator {estimator!r}; choose one of {ESTIMATORS}")
    order = u[:, :n].argsort(dim=1)  # a random order of the offsets per sample, shared by the choices
    draws = []
    for k in range(K):
        count = min(n, int((k + u0) / K * n) + 1)
        draws.append((sorted(order[k, :count].tolist()), n / (count * K)))
    return draws


def question_noise(seed: int, q: int, K: int, width: int) -> tuple[torch.Tensor, float]:
    """The shared noise (u [K, width], u0) of question q: what `mask_draws` turns into masks."""
    g = question_generator(seed, q)
    u = torch.rand(K, width, generator=g)
    return u, float(torch.rand(1, generator=g))


def _check_diffusion(model) -> int:
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise ValueError(
            "ELBO scoring needs a diffusion model (config.mask_token_id is None); use --ar for an AR model"
        )
    return mask_id


def _weighted_nll(
    model, jobs: Iterator[tuple], scores: list[list[float]], batch_size: int, bar, stats: dict | None
) -> None:
    """Forward (q, j, weight, noisy row, positions, targets) jobs in batches; add weight * summed
    CE to scores[q][j]."""
    causal = model.config.attention == "causal"  # attend as the model was trained (normally bidirectional)
    for batch in _chunks(jobs, batch_size):
        inputs, positions, targets = ([b[i] for b in batch] for i in (3, 4, 5))
        nll, _, r = _forward_targets(model, inputs, positions, targets, causal=causal, ar=False)
        per_row = (
            torch.zeros(len(batch), dtype=torch.float64, device=nll.device).index_add_(0, r, nll.double()).tolist()
        )
        for (q, j, w, *_), s in zip(batch, per_row):
            scores[q][j] += s * w
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + sum(map(len, inputs))
        if bar is not None:
            bar.update(len(batch))


def _masked_row(
    mask_id: int, ctx: list[int], cont: list[int], hit: list[int]
) -> tuple[list[int], list[int], list[int]]:
    noisy = ctx + list(cont)
    for m in hit:
        noisy[len(ctx) + m] = mask_id
    return noisy, [len(ctx) + m for m in hit], [cont[m] for m in hit]


@torch.inference_mode()
def elbo_nll(
    model,
    questions: Sequence[Sequence[Pair]],
    num_samples: int,
    seed: int,
    batch_size: int,
    progress: bool = False,
    stats: dict | None = None,
    estimator: str = "count",
) -> list[list[float]]:
    """ELBO bound on -log p(continuation | context) in nats, per question and choice, estimated
    with `num_samples` draws of `estimator` (see the module docstring).
    `stats["tokens"]` accumulates the unpadded tokens forwarded."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown ELBO estimator {estimator!r}; choose one of {ESTIMATORS}")
    mask_id = _check_diffusion(model)
    K = num_samples
    scores = [[0.0] * len(choices) for choices in questions]

    def plans():
        for q, choices in enumerate(questions):
            u, u0 = question_noise(seed, q, K, max(len(cont) for _, cont in choices))
            yield q, choices, [mask_draws(estimator, u, u0, len(cont)) for _, cont in choices]

    def jobs():
        for q, choices, draws in plans():
            for k in range(K):
                for j, (ctx, cont) in enumerate(choices):
                    hit, w = draws[j][k]
                    if hit:  # nothing masked: this draw contributes 0 to the estimate
                        yield (q, j, w, *_masked_row(mask_id, ctx, cont, hit))

    # the bar counts rows actually forwarded: draws that mask nothing are skipped
    total = sum(1 for _, _, draws in plans() for d in draws for hit, _ in d if hit) if progress else 0
    bar = tqdm(total=total, desc="elbo", unit="row", disable=not progress, dynamic_ncols=True)
    _weighted_nll(model, jobs(), scores, batch_size, bar, stats)
    bar.close()
    return scores


MAX_EXACT_TOKENS = 12


def exact_weight(n: int, m: int) -> float:
    """Weight of one m-token mask set of an n-token continuation in the ELBO: the integral over t
    of t^m (1-t)^(n-m) / t, = (m-1)! (n-m)! / n!."""
    return math.factorial(m - 1) * math.factorial(n - m) / math.factorial(n)


@torch.inference_mode()
def mask_set_nll(model, pairs: Sequence[Pair], batch_size: int) -> list[dict[tuple[int, ...], float]]:
    """Per pair: the summed CE of the masked tokens for every non-empty mask set of the
    continuation (2^n - 1 rows, so n <= MAX_EXACT_TOKENS). Any estimator's draw is a lookup here."""
    mask_id = _check_diffusion(model)
    sets: list[list[tuple[int, ...]]] = []
    for p, (_, cont) in enumerate(pairs):
        n = len(cont)
        if not 1 <= n <= MAX_EXACT_TOKENS:
            raise ValueError(
                f"pair {p}: exact enumeration of a {n}-token continuation needs 2^{n} rows; "
                f"1 to {MAX_EXACT_TOKENS} tokens"
            )
        sets.append([hit for m in range(1, n + 1) for hit in itertools.combinations(range(n), m)])
    losses = [[0.0] * len(s) for s in sets]
    jobs = (
        (p, i, 1.0, *_masked_row(mask_id, ctx, cont, list(hit)))
        for p, (ctx, cont) in enumerate(pairs)
        for i, hit in enumerate(sets[p])
    )
    _weighted_nll(model, jobs, losses, batch_size, None, None)
    return [dict(zip(s, loss)) for s, loss in zip(sets, losses)]


def exact_elbo_nll(model, questions: Sequence[Sequence[Pair]], batch_size: int) -> list[list[float]]:
    """The ELBO bound itself, every mask set of each continuation enumerated: the oracle the
    Monte-Carlo estimators are measured against."""
    flat = mask_set_nll(model, [pair for choices in questions for pair in choices], batch_size)
    exact = [
        sum(exact_weight(len(cont), len(hit)) * v for hit, v in table.items())
        for table, (_, cont) in zip(flat, (p for c in questions for p in c))
    ]
    out, i = [], 0
    for choices in questions:
        out.append(exact[i : i + len(choices)])
        i += len(choices)
    return out


@torch.inference_mode()
def ar_nll(
    model, pairs: Sequence[Pair], batch_size: int, progress: bool = False, stats: dict | None = None
) -> tuple[list[float], list[bool]]:
    """Exact -log p(continuation | context) under the causal model, and whether greedy decoding
    would reproduce the continuation (every target token is the argmax). Rows are batched
    longest first (little padding; an out-of-memory shows at once) and returned in input order.
    `stats["tokens"]` accumulates the unpadded tokens forwarded."""
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("AR scoring needs a non-empty context (BOS at least) and continuation")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    nlls, greedy = [0.0] * len(pairs), [False] * len(pairs)
    bar = tqdm(total=len(pairs), desc="ar", unit="row", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [pairs[i] for i in idx]
        inputs = [c + x for c, x in chunk]
        positions = [list(range(len(c), len(c) + len(x))) for c, x in chunk]
        nll, hit, r = _forward_targets(model, inputs, positions, [x for _, x in chunk], causal=True, ar=True)
        n = len(chunk)
        row_nll = torch.zeros(n, dtype=torch.float64, device=nll.device).index_add_(0, r, nll.double()).tolist()
        misses = torch.zeros(n, dtype=torch.long, device=nll.device).index_add_(0, r, (~hit).long()).tolist()
        for i, v, m in zip(idx, row_nll, misses):
            nlls[i], greedy[i] = v, m == 0
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + sum(map(len, inputs))
        bar.update(n)
    bar.close()
    return nlls, greedy


@torch.inference_mode()
def ar_generate(
    model, prompts: Sequence[list[int]], max_new: int, eos_id: int | None, batch_size: int, progress: bool = False
) -> list[list[int]]:
    """Greedy AR continuation of each prompt (full recompute per token: the models keep no cache),
    stopping at EOS (not included) or after max_new tokens."""
    cfg = model.config
    device = model.output_weight().device
    out: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc="ar generate", unit="row", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[start : start + batch_size]]
        gen: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))
        for _ in range(max_new):
            if not live:
                break
            inputs = [rows[b] + gen[b] for b in live]
            if max(len(x) for x in inputs) > cfg.max_seq_len:
                raise ValueError(f"AR generation would exceed the model's max_seq_len {cfg.max_seq_len}")
            ids, pos = pad_rows(inputs, device=device)
            layout = AttentionLayout.from_position_ids(pos, causal=True)
            r = torch.arange(len(inputs), device=device)
            c = torch.tensor([len(x) - 1 for x in inputs], device=device)
            logits = logits_at(model, ids, layout, r, c)
            logits[:, cfg.base_vocab_size :] = float("-inf")  # padding rows and an appended [MASK]
            if cfg.mask_token_id is not None:
                logits[:, cfg.mask_token_id] = float("-inf")
            nxt = logits.argmax(-1).tolist()
            still = []
            for b, tok in zip(live, nxt):
                if eos_id is not None and tok == eos_id:
                    continue
                gen[b].append(tok)
                if len(gen[b]) < max_new:
                    still.append(b)
            live = still
        out += gen
        bar.update(len(rows))
    bar.close()
    return out
