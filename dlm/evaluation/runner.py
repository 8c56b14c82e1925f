"""Run evaluation tasks on a model and collect a results dict (DESIGN section 4).

Result of one task: {"task", "path", "n", "metric", "value", "stderr", ...task extras}.
Multiple choice: metric "acc" (lowest NLL bound wins) plus "acc_norm" (NLL per byte of the
continuation, as lm-evaluation-harness reports). LAMBADA "exact_match", GSM8K "exact_match" on the
final number, infilling "rouge_l", held-out "nats_per_token" plus "ppl_bound" = exp(value).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dlm.evaluation.metrics import extract_answer, mean_stderr, normalize_number, ratio_stderr, rouge_l
from dlm.evaluation.readers import read_records
from dlm.evaluation.scoring import Pair, ar_generate, ar_nll, elbo_nll
from dlm.evaluation.tasks import GSM8K_TEMPLATE, TASKS, Completion, MultipleChoice, parse_records
from dlm.sampling import Request, SamplingConfig, generate

RESULTS_FORMAT = "dlm-eval/1"


@dataclass
class EvalConfig:
    ar: bool = False  # score the model as an AR model (causal layout, exact likelihood)
    num_samples: int = 128  # K, Monte-Carlo samples of the ELBO
    seed: int = 0
    limit: int | None = None  # first N records of each task
    batch_size: int = 32
    steps: int | None = None  # generation steps; None = one per generated token
    gen_length: int = 256  # GSM8K answer tokens
    order: str = "confidence"
    block_size: int = 0
    temperature: float = 0.0
    sep_id: int | None = None  # GSM8K after SFT: [BOS] question [SEP] is the prompt
    seq_len: int = 1024  # held-out rows
    heldout_fraction: float = 0.001  # must match the training run's split (PackedDataset default)
    progress: bool = True


def with_start(tok, ids: list[int]) -> list[int]:
    """Prepend BOS where the tokenizer's model expects it; an empty context gets BOS (or EOS,
    GPT-2's document separator) so position 0 is always given."""
    if tok.add_bos and tok.bos_id is not None:
        return [tok.bos_id] + ids
    if ids:
        return ids
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if start is None:
        raise ValueError("the context is empty and the tokenizer has neither BOS nor EOS to start it")
    return [start]


def encode_pair(tok, context: str, continuation: str) -> Pair:
    """Token ids of context and continuation, split where encoding the joined text puts the
    boundary (so the continuation is tokenized as it appears in running text)."""
    ctx = tok.encode(context) if context else []
    whole = tok.encode(context + continuation)
    if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
        cont = whole[len(ctx) :]
    else:
        cont = tok.encode(continuation)
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return with_start(tok, ctx), cont


def _acc(hits: list[bool]) -> tuple[float, float | None]:
    return mean_stderr([float(h) for h in hits])


def eval_choice(model, tok, items: list[MultipleChoice], cfg: EvalConfig) -> dict:
    questions = [[encode_pair(tok, c, x) for c, x in zip(it.contexts, it.continuations)] for it in items]
    if cfg.ar:
        flat = [p for q in questions for p in q]
        nll_flat, _ = ar_nll(model, flat, cfg.batch_size, cfg.progress)
        nll, i = [], 0
        for q in questions:
            nll.append(nll_flat[i : i + len(q)])
            i += len(q)
    else:
        nll = elbo_nll(model, questions, cfg.num_samples, cfg.seed, cfg.batch_size, cfg.progress)
    hits, hits_norm = [], []
    for it, scores in zip(items, nll):
        hits.append(min(range(len(scores)), key=scores.__getitem__) == it.label)
        per_byte = [s / max(1, len(x.encode("utf-8"))) for s, x in zip(scores, it.continuations)]
        hits_norm.append(min(range(len(per_byte)), key=per_byte.__getitem__) == it.label)
    acc, se = _acc(hits)
    acc_norm, se_norm = _acc(hits_norm)
    return {"metric": "acc", "value": acc, "stderr": se, "acc_norm": acc_norm, "acc_norm_stderr": se_norm}


def _diffusion_fill(model, requests: list[Request], cfg: EvalConfig, eos_fill: bool) -> list[list[int]]:
    """Generate every request (grouped by answer length, so steps can follow the length)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.length].append(i)
    out: list[list[int]] = [[] for _ in requests]
    bar = tqdm(total=len(requests), desc="generate", disable=not cfg.progress, dynamic_ncols=True)
    for n in sorted(groups):
        idx = groups[n]
        sc = SamplingConfig(
            steps=cfg.steps or n,
            length=n,
            order=cfg.order,
            temperature=cfg.temperature,
            block_size=cfg.block_size,
            eos_fill=eos_fill,
            seed=cfg.seed,
        )
        for s in range(0, len(idx), cfg.batch_size):
            chunk = idx[s : s + cfg.batch_size]
            samples = generate(model, [requests[i] for i in chunk], dataclasses.replace(sc, seed=cfg.seed + chunk[0]))
            for i, smp in zip(chunk, samples):
                out[i] = smp.tokens if eos_fill else smp.raw
            bar.update(len(chunk))
    bar.close()
    return out


def eval_lambada(model, tok, items: list[Completion], cfg: EvalConfig) -> dict:
    """Exact match of the last word's tokens: greedy decoding for AR (teacher-forced argmax, which
    is equivalent), diffusion generation with steps = the word's token count."""
    pairs = [encode_pair(tok, it.prompt, it.target) for it in items]
    if cfg.ar:
        _, hits = ar_nll(model, pairs, cfg.batch_size, cfg.progress)
    else:
        reqs = [Request(ctx, length=len(cont)) for ctx, cont in pairs]
        gens = _diffusion_fill(model, reqs, cfg, eos_fill=False)
        hits = [g == cont for g, (_, cont) in zip(gens, pairs)]
    value, se = _acc(hits)
    return {"metric": "exact_match", "value": value, "stderr": se}


def eval_gsm8k(model, tok, items: list[Completion], cfg: EvalConfig) -> dict:
    if cfg.sep_id is not None:
        prompts = [with_start(tok, tok.encode(it.prompt)) + [cfg.sep_id] for it in items]
    else:
        prompts = [with_start(tok, tok.encode(GSM8K_TEMPLATE.format(question=it.prompt))) for it in items]
    if cfg.ar:
        gens = ar_generate(model, prompts, cfg.gen_length, tok.eos_id, cfg.batch_size, cfg.progress)
    else:
        gens = _diffusion_fill(model, [Request(p, length=cfg.gen_length) for p in prompts], cfg, eos_fill=True)
    texts = [tok.decode(g).split("\nQuestion:")[0] for g in gens]  # an AR model may run on into a new question
    preds = [extract_answer(t) for t in texts]
    hits = [p is not None and p == normalize_number(it.answer) for p, it in zip(preds, items)]
    value, se = _acc(hits)
    return {
        "metric": "exact_match",
        "value": value,
        "stderr": se,
        "examples": [
            {"where": it.where, "generation": t, "answer": it.answer} for it, t in list(zip(items, texts))[:3]
        ],
    }


def eval_infill(model, tok, items: list[Completion], cfg: EvalConfig) -> dict:
    """The middle is generated with the reference's token count (oracle length); an AR model
    cannot see the suffix and continues the prefix for the same number of tokens."""
    prefixes, middles, suffixes = [], [], []
    for it in items:
        ctx, mid = encode_pair(tok, it.prompt, it.target)
        prefixes.append(ctx)
        middles.append(mid)
        suffixes.append(tok.encode(it.suffix))
    if cfg.ar:
        gens = []
        for n in sorted(set(map(len, middles))):
            idx = [i for i, m in enumerate(middles) if len(m) == n]
            for i, g in zip(idx, ar_generate(model, [prefixes[i] for i in idx], n, None, cfg.batch_size, cfg.progress)):
                gens.append((i, g))
        gens = [g for _, g in sorted(gens)]
    else:
        reqs = [Request(p, suffix=s, length=len(m)) for p, s, m in zip(prefixes, suffixes, middles)]
        gens = _diffusion_fill(model, reqs, cfg, eos_fill=False)
    scores = [rouge_l(tok.decode(g), it.target) for g, it in zip(gens, items)]
    value, se = mean_stderr(scores)
    return {"metric": "rouge_l", "value": value, "stderr": se}


@torch.inference_mode()
def eval_heldout(model, path: str, cfg: EvalConfig) -> tuple[int, dict]:
    """nats/token on one token store's held-out split: the ELBO bound for a diffusion model (K
    stratified samples, dlm.diffusion.heldout_elbo), the exact NLL for --ar, on the same tokens
    (every token but document starts)."""
    from dlm.attention.layout import AttentionLayout
    from dlm.data import PackedDataset, SourceSpec
    from dlm.diffusion import eligible_tokens, heldout_elbo
    from dlm.sampling import logits_at

    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"held-out seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    ds = PackedDataset(
        [SourceSpec(path)], seq_len=cfg.seq_len, seed=cfg.seed, split="heldout", heldout_fraction=cfg.heldout_fraction
    )
    windows = ds.num_windows[0]  # each held-out window once, in order
    n = windows if cfg.limit is None else min(cfg.limit, windows)
    device = model.output_weight().device
    nats, toks = [], []
    for s in tqdm(range(0, n, cfg.batch_size), desc="heldout", disable=not cfg.progress, dynamic_ncols=True):
        rows = ds.batch(range(s, min(n, s + cfg.batch_size)))
        batch = {k: rows[k].to(device) for k in ("input_ids", "position_ids", "sample_ids")}
        if cfg.ar:
            ids, pos = batch["input_ids"], batch["position_ids"]
            eligible = eligible_tokens(pos, None)  # the tokens heldout_elbo scores
            r, c = eligible.nonzero(as_tuple=True)
            logits = logits_at(model, ids, AttentionLayout.from_position_ids(pos, causal=True), r, c - 1)
            logits[:, model.config.base_vocab_size :] = float("-inf")
            nll = torch.nn.functional.cross_entropy(logits, ids[r, c], reduction="none").double()
            nats += torch.zeros(ids.shape[0], dtype=torch.float64, device=device).index_add_(0, r, nll).tolist()
            toks += eligible.sum(1).tolist()
        else:
            row_nats, row_toks = heldout_elbo(model, batch, num_samples=cfg.num_samples, seed=cfg.seed)
            nats += row_nats.tolist()
            toks += row_toks.tolist()
    value, se = ratio_stderr(nats, toks)
    return n, {
        "metric": "nats_per_token",
        "value": value,
        "stderr": se,
        "ppl_bound": math.exp(value),
        "tokens": int(sum(toks)),
    }


_RUNNERS = {"choice": eval_choice, "lambada": eval_lambada, "gsm8k": eval_gsm8k, "infill": eval_infill}


def evaluate_task(model, tok, name: str, path: str, cfg: EvalConfig) -> dict:
    t0 = time.time()
    if name == "heldout":
        n, res = eval_heldout(model, path, cfg)
    else:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or 'heldout'")
        records = read_records(path)
        if cfg.limit is not None:
            records = records[: cfg.limit]
        items = parse_records(name, records)
        if not items:
            raise ValueError(f"{path}: no records for task {name}")
        n, res = len(items), _RUNNERS[TASKS[name].kind](model, tok, items, cfg)
    return {"task": name, "path": str(path), "n": n, **res, "seconds": round(time.time() - t0, 2)}


def evaluate(model, tok, tasks: list[tuple[str, str]], cfg: EvalConfig, meta: dict | None = None) -> dict:
    """All tasks; the results dict that launch/evaluate.py writes as JSON."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}
    mode = "ar" if cfg.ar else "diffusion"
    results = {"format": RESULTS_FORMAT, "mode": mode, **(meta or {}), "settings": settings, "tasks": {}}
    for name, path in tasks:
        key = name if name not in results["tasks"] else f"{name}:{path}"
        results["tasks"][key] = evaluate_task(model, tok, name, path, cfg)
    return results


def task_paths(specs: list[str]) -> list[tuple[str, str]]:
    """'name=path' command-line specs -> [(name, path)]."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--task expects NAME=PATH, got {spec!r}")
        name = name.strip().lower()
        if name != "heldout" and name not in TASKS:
            raise ValueError(f"unknown task {name!r} in --task {spec!r}; choose one of {sorted(TASKS)} or 'heldout'")
        if name != "heldout" and not Path(path).exists():
            raise FileNotFoundError(f"--task {spec!r}: {path} does not exist")
        out.append((name, path))
    return out
