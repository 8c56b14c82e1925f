"""Iterative unmasking for masked diffusion LMs (docs/design.md §3).

Each request is one row `prefix | [MASK] * n | suffix`; the prefix (prompt, or BOS when there is
none) and the suffix stay fixed. For each of T steps the model runs once; the masked positions of
the current block are scored, some are committed, and a committed token is never changed again.
Shift: the model keeps its AR parameterisation, so the prediction for position i is read from the
output at position i-1 (position 0 is always given).

Rows of different lengths are right-padded; the padding is its own document segment (its
position ids restart at 0), so no real token attends to it.

Faster, approximate settings (Fast-dLLM), each off by default, where the sampler is exact:
- `cache` "prefix" / "dual": keys and values are computed once per block and reused for the
  steps inside it (dlm.kv_cache); only the current block's window (prefix: and everything after
  it) runs through the model. Exact for causal attention with "prefix".
- `threshold`: besides the scheduled top-k, every position whose token probability exceeds the
  threshold commits; a block that finishes early hands its remaining steps to nobody, so the
  next block starts at once. `threshold=1.0` with one token per step is the confidence order.
- `tokens_per_step`: a fixed number of commits per step (ceil(block / k) steps per block).
A row whose answer is complete (EOS filled) drops out of the cached forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dlm.attention.layout import AttentionLayout
from dlm.kv_cache import KVCache

ORDERS = ("random", "confidence", "margin", "entropy")
CACHES = ("none", "prefix", "dual")


@dataclass
class SamplingConfig:
    """How to denoise. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters;
    block_size 0 decodes the whole answer as one block (else semi-autoregressive, left to right)."""

    steps: int = 64
    length: int = 64  # answer tokens, unless a request sets its own
    order: str = "confidence"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    block_size: int = 0
    eos_fill: bool = True  # once EOS is committed, everything after it becomes EOS (rows without suffix)
    seed: int = 0
    cache: str = "none"  # "prefix" / "dual": reuse keys/values inside a block (approximate, dlm.kv_cache)
    threshold: float | None = None  # confidence order: also commit every position with p > threshold
    tokens_per_step: int = 0  # > 0: each block gets ceil(its length / tokens_per_step) steps; steps unused

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {ORDERS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.length < 0 or self.block_size < 0 or self.top_k < 0:
            raise ValueError("length, block_size and top_k must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {CACHES}")
        if self.tokens_per_step < 0:
            raise ValueError(f"tokens_per_step must be >= 0, got {self.tokens_per_step}")
        if self.threshold is not None:
            if not 0.0 < self.threshold <= 1.0:
                raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
            if self.order != "confidence":
                raise ValueError(
                    f"threshold commits by token probability: it needs order 'confidence', not {self.order!r}"
                )


@dataclass
class Request:
    prompt: list[int]
    suffix: list[int] = field(default_factory=list)
    length: int | None = None  # answer tokens; None -> SamplingConfig.length


@dataclass
class Sample:
    tokens: list[int]  # the answer, cut at the first EOS
    raw: list[int]  # the whole answer region as generated
    prefix: list[int]  # what was fixed before the answer (BOS prepended when the prompt was empty)


@dataclass
class StepRecord:
    """State after one denoising step, for --show-steps and tests (all [B, L], on CPU)."""

    step: int
    ids: torch.Tensor
    masked: torch.Tensor
    committed: torch.Tensor  # positions committed during this step
    answer_start: list[int]
    answer_len: list[int]


def pad_rows(rows: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows to one length; padding forms its own segment so nothing attends to it.
    Returns (input_ids [B, L], position_ids [B, L])."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pad_rows needs at least one row and no empty rows")
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    pos = torch.empty((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        pos[b, : len(r)] = torch.arange(len(r))
        pos[b, len(r) :] = torch.arange(L - len(r))
    return ids.to(device), pos.to(device)


def logits_at(
    model, ids: torch.Tensor, layout: AttentionLayout, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """fp32 logits of the outputs at (rows, cols) only: the vocabulary projection is the big
    cost, so it is applied to the gathered hidden states through the model's `head` hook."""

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (hidden[rows, cols] @ weight.t()).float()

    return model(ids, layout, head=head)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering (removed entries -> -inf); the top token always survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick a token per row of `logits` [N, V] and its commit score (higher commits first)."""
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    logits = filter_logits(logits, cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    if cfg.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(dim=-1)
    if cfg.order == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        score = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)
    elif cfg.order == "entropy":
        score = (probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)  # = -entropy
    else:  # confidence; random ignores the score
        score = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, score


def _block_plan(n: int, cfg: SamplingConfig) -> list[tuple[int, int, int, int]]:
    """(lo, hi, first_step, end_step) per block, answer-relative: `steps` shared out evenly, or
    ceil(block length / tokens_per_step) steps per block."""
    if n == 0:
        return []
    size = cfg.block_size or n
    nb = math.ceil(n / size)
    spans = [(b * size, min(n, (b + 1) * size)) for b in range(nb)]
    if cfg.tokens_per_step:
        bounds = [0]
        for lo, hi in spans:
            bounds.append(bounds[-1] + math.ceil((hi - lo) / cfg.tokens_per_step))
    else:
        if cfg.steps < nb:
            raise ValueError(
                f"{cfg.steps} steps cannot decode {nb} blocks ({n} tokens, block size {size}); use at least {nb} steps"
            )
        bounds = [cfg.steps * b // nb for b in range(nb + 1)]
    return [(lo, hi, bounds[b], bounds[b + 1]) for b, (lo, hi) in enumerate(spans)]


class _Schedule:
    """Which block each row decodes at each step, and how many steps that block has left.

    Static (the exact sampler): block b of a row owns steps [first, end) of its plan, even once
    it is finished. Dynamic (with a threshold): a finished block hands over at once to the next,
    which starts its own budget, so easy spans cost fewer steps."""

    def __init__(self, plans: list[list[tuple[int, int, int, int]]], starts: list[int], dynamic: bool):
        self.plans, self.starts, self.dynamic = plans, starts, dynamic
        self.block = [0] * len(plans)
        self.spent = [0] * len(plans)  # steps used in the current block (dynamic)
        self.total = max((p[-1][3] for p in plans if p), default=0)

    def windows(self, step: int, masked: torch.Tensor | None) -> tuple[list[int], list[int], list[int], list[int]]:
        """Per row: the active window [lo, hi), its steps left (>= 1) and its block index (-1: done).
        `masked` (host copy, dynamic only) tells which blocks are finished."""
        lo: list[int] = []
        hi: list[int] = []
        left: list[int] = []
        idx: list[int] = []
        for b, plan in enumerate(self.plans):
            if self.dynamic:
                assert masked is not None
                while self.block[b] < len(plan) and not masked[b, self._span(b)].any():
                    self.block[b] += 1
                    self.spent[b] = 0
            else:
                while self.block[b] < len(plan) and step >= plan[self.block[b]][3]:
                    self.block[b] += 1
            k = self.block[b]
            if k == len(plan):  # the row is done
                window = (0, 0, 1, -1)
            else:
                first, end = plan[k][2], plan[k][3]
                steps_left = end - first - self.spent[b] if self.dynamic else end - step
                window = (self.starts[b] + plan[k][0], self.starts[b] + plan[k][1], steps_left, k)
                self.spent[b] += 1
            for out, x in zip((lo, hi, left, idx), window):
                out.append(x)
        return lo, hi, left, idx

    def _span(self, b: int) -> slice:
        lo, hi = self.plans[b][self.block[b]][:2]
        return slice(self.starts[b] + lo, self.starts[b] + hi)


class _CachedForward:
    """Logits of the active positions through a KVCache (dlm.kv_cache): a row is refilled when
    it enters a new block; in between, only its query window runs. Window per row: from the
    position before the block (its output predicts the block's first token) to the block's end
    (dual: stored keys for the suffix too) or to the row's end (prefix)."""

    def __init__(
        self, model, ids: torch.Tensor, pos: torch.Tensor, layout: AttentionLayout, ends: list[int], mode: str
    ):
        self.model, self.pos, self.mode = model, pos, mode
        self.ends = torch.tensor(ends, device=ids.device)  # row lengths without padding
        self.cache = KVCache(layout, model.config.n_layers)
        self.causal = layout.causal
        self.filled = [-1] * ids.shape[0]  # block index each row's stored entries belong to

    def __call__(self, ids: torch.Tensor, r: torch.Tensor, c: torch.Tensor, lo, hi, block) -> torch.Tensor:
        dev = ids.device
        rows = sorted(set(r.tolist()))
        refill = [b for b in rows if self.filled[b] != block[b]]
        for b in refill:
            self.filled[b] = block[b]
        local = torch.full((ids.shape[0],), -1, dtype=torch.long, device=dev)
        if refill == rows:  # every active row starts a block: the fill pass gives the logits too
            sel = torch.tensor(rows, device=dev)
            local[sel] = torch.arange(len(rows), device=dev)
            return self._forward(ids[sel], self.pos[sel], self.cache.fill(sel), local[r], c - 1)
        if refill:
            sel = torch.tensor(refill, device=dev)
            self._forward(ids[sel], self.pos[sel], self.cache.fill(sel), None, None)
        sel = torch.tensor(rows, device=dev)
        local[sel] = torch.arange(len(rows), device=dev)
        w0 = torch.tensor([lo[b] - 1 for b in rows], device=dev)
        w1 = torch.tensor([hi[b] for b in rows], device=dev) if self.mode == "dual" else self.ends[sel]
        width = int((w1 - w0).max())
        cols = w0[:, None] + torch.arange(width, device=dev)
        valid = cols < w1[:, None]
        cols = torch.where(valid, cols, w0[:, None])  # padding entries repeat the first query
        window = self.cache.window(sel, cols, valid)
        return self._forward(
            ids[sel[:, None], cols], self.pos[sel[:, None], cols], window, local[r], c - 1 - w0[local[r]]
        )

    def _forward(self, ids, pos, cache, rows, cols) -> torch.Tensor:
        layout = AttentionLayout.from_position_ids(pos, causal=self.causal)
        if rows is None:
            return self.model(ids, layout, head=lambda hidden, weight: None, cache=cache)
        return self.model(
            ids, layout, head=lambda hidden, weight: (hidden[rows, cols] @ weight.t()).float(), cache=cache
        )


@torch.inference_mode()
def generate(
    model,
    requests: list[Request],
    cfg: SamplingConfig,
    *,
    mask_id: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    callback: Callable[[StepRecord], None] | None = None,
) -> list[Sample]:
    """Generate the answer of every request in one batch (see the module docstring)."""
    mc = model.config
    mask_id = mc.mask_token_id if mask_id is None else mask_id
    bos_id = mc.bos_token_id if bos_id is None else bos_id
    eos_id = mc.eos_token_id if eos_id is None else eos_id
    if mask_id is None:
        raise ValueError("the model has no mask token (config.mask_token_id is None): it is not a diffusion model")
    device = model.output_weight().device

    rows, starts, lens = [], [], []
    for i, req in enumerate(requests):
        prefix = list(req.prompt)
        if not prefix:
            if bos_id is None:
                raise ValueError(f"request {i} has no prompt and no BOS id is known to start it")
            prefix = [bos_id]
        n = cfg.length if req.length is None else req.length
        row = prefix + [mask_id] * n + list(req.suffix)
        if len(row) > mc.max_seq_len:
            raise ValueError(
                f"request {i} needs {len(row)} positions, more than the model's max_seq_len {mc.max_seq_len}"
            )
        rows.append(row)
        starts.append(len(prefix))
        lens.append(n)
    ids, pos = pad_rows(rows, device=device)
    layout = AttentionLayout.from_position_ids(pos, causal=mc.attention == "causal")  # as the model was trained
    B, L = ids.shape
    masked = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b in range(B):
        masked[b, starts[b] : starts[b] + lens[b]] = True
    fill_rows = [cfg.eos_fill and eos_id is not None and not r.suffix for r in requests]
    eos_fill = any(fill_rows)  # a host bool, so the loop does not sync on it every step
    eos_rows = torch.tensor(fill_rows, device=device)
    answer = masked.clone()

    schedule = _Schedule([_block_plan(n, cfg) for n in lens], starts, dynamic=cfg.threshold is not None)
    cached = None if cfg.cache == "none" else _CachedForward(model, ids, pos, layout, [len(r) for r in rows], cfg.cache)

    forbidden = torch.zeros(mc.vocab_size, dtype=torch.bool, device=device)
    forbidden[mc.base_vocab_size :] = True  # vocabulary padding rows
    forbidden[mask_id] = True
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    col = torch.arange(L, device=device)

    for step in range(schedule.total):
        if not masked.any():
            break
        lo_, hi_, left_, block = schedule.windows(step, masked.cpu() if schedule.dynamic else None)
        lo, hi, left = (torch.tensor(x, device=device) for x in (lo_, hi_, left_))
        active = masked & (col >= lo[:, None]) & (col < hi[:, None])
        commit = torch.zeros_like(masked)
        if active.any():
            r, c = active.nonzero(as_tuple=True)
            if cached is None:
                logits = logits_at(model, ids, layout, r, c - 1)
            else:
                logits = cached(ids, r, c, lo_, hi_, block)
            tokens, score = choose_tokens(logits.masked_fill(forbidden, float("-inf")), cfg, generator)
            steps_left = left[r]
            if cfg.order == "random":
                u = torch.rand(r.shape[0], generator=generator, device=device)
                commit[r, c] = u * steps_left < 1.0  # probability 1 / steps_left
            else:
                full = torch.full((B, L), float("-inf"), device=device)
                full[r, c] = score
                rank = torch.argsort(torch.argsort(full, dim=1, descending=True, stable=True), dim=1)
                k = (active.sum(dim=1) + left - 1) // left  # ceil(n_active / steps_left)
                if cfg.tokens_per_step:  # the budget is ceil(block / tokens_per_step): this finishes it
                    k = torch.full_like(k, cfg.tokens_per_step)
                commit = active & (rank < k[:, None])
                if cfg.threshold is not None:  # confidence order: score is the token's probability
                    commit |= active & (full > cfg.threshold)
            new = torch.zeros_like(ids)
            new[r, c] = tokens
            ids = torch.where(commit, new, ids)
            masked &= ~commit
        if eos_fill:
            is_eos = answer & ~masked & (ids == eos_id) & eos_rows[:, None]
            after = is_eos.long().cumsum(dim=1) > 0
            fill = after & masked
            ids = ids.masked_fill(fill, eos_id)
            masked &= ~fill
            commit |= fill
        if callback is not None:
            ids_, masked_, commit_ = (
                x.to("cpu", copy=True) for x in (ids, masked, commit)
            )  # the loop updates in place
            callback(StepRecord(step, ids_, masked_, commit_, starts, lens))

    if masked.any():  # the schedule guarantees this never happens; fail loudly if it does
        raise RuntimeError("masked positions remain after the last step")
    out = []
    for b in range(B):
        raw = ids[b, starts[b] : starts[b] + lens[b]].tolist()
        cut = raw.index(eos_id) if eos_id is not None and eos_id in raw else len(raw)
        out.append(Sample(tokens=raw[:cut], raw=raw, prefix=rows[b][: starts[b]]))
    return out


__all__ = [
    "CACHES",
    "ORDERS",
    "Request",
    "Sample",
    "SamplingConfig",
    "StepRecord",
    "choose_tokens",
    "filter_logits",
    "generate",
    "logits_at",
    "pad_rows",
]
