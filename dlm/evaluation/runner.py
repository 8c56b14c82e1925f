"""Run evaluation tasks on a model and collect a results dict (docs/design.md §4).

Result of one task: {"task", "path", "n", "metric", "value", "stderr", "seconds", ...task extras}.
Multiple choice: metric "acc" (lowest NLL bound wins) plus two length normalisations, named as
lm-evaluation-harness names them: "acc_norm" divides the log-likelihood by the character count
of the choice text (the continuation without its single delimiter space: lm-eval's definition),
"acc_bytes" by the UTF-8 byte count of the continuation. LAMBADA "exact_match", GSM8K
"exact_match" on the final number, infilling "rouge_l", held-out "nats_per_token" plus
"ppl_bound" = exp(value). Scoring tasks add "tokens_per_s" (unpadded tokens through the model).

Every task also yields per-sample records (JSON-serialisable dicts, one per item or held-out
window) so any score can be audited item by item; `evaluate` hands each finished task's result
and records to `on_task` as soon as it completes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dlm.evaluation.metrics import extract_answer, mean_stderr, normalize_number, ratio_stderr, rouge_l
from dlm.evaluation.readers import read_records
from dlm.evaluation.scoring import Pair, ar_generate, ar_nll, elbo_nll
from dlm.evaluation.tasks import GSM8K_TEMPLATE, TASKS, Completion, MultipleChoice, Planning, parse_records
from dlm.sampling import Request, SamplingConfig, generate, pad_rows

RESULTS_FORMAT = "dlm-eval/2"
SAMPLES_FORMAT = "dlm-eval-samples/1"
HELDOUT_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz")

TaskOutput = tuple[dict, list[dict]]  # (aggregate result, per-sample records)


@dataclass
class EvalConfig:
    ar: bool = False  # score the model as an AR model (causal layout, exact likelihood)
    num_samples: int = 128  # K, Monte-Carlo samples of the ELBO
    estimator: str = "count"  # ELBO estimator, dlm.evaluation.scoring.ESTIMATORS
    seed: int = 0
    limit: int | None = None  # first N records of each task
    batch_size: int = 32
    steps: int | None = None  # generation steps; None = one per generated token
    gen_length: int = 256  # GSM8K answer tokens
    order: str = "confidence"
    block_size: int = 0
    temperature: float = 0.0
    cache: str = "none"  # generation: key/value reuse within blocks (dlm.sampling.CACHES)
    threshold: float | None = None  # generation: also commit positions with p > threshold
    tokens_per_step: int = 0  # generation: fixed tokens per step (replaces steps)
    sep_id: int | None = None  # GSM8K after SFT: [BOS] question [SEP] is the prompt
    pad_id: int | None = None  # SFT layout: generation is also cut at the first PAD
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


def choice_chars(continuation: str) -> int:
    """lm-eval's acc_norm length: characters of the choice text, i.e. the continuation without
    the single delimiter space the task formats put before it."""
    return len(continuation[1:] if continuation.startswith(" ") else continuation)


def _argmin(xs: list[float]) -> int:
    return min(range(len(xs)), key=xs.__getitem__)


def _rate(stats: dict, seconds: float) -> dict:
    return {"tokens_per_s": round(stats["tokens"] / max(seconds, 1e-9), 1)} if stats.get("tokens") else {}


def eval_choice(model, tok, items: list[MultipleChoice], cfg: EvalConfig) -> TaskOutput:
    questions = [[encode_pair(tok, c, x) for c, x in zip(it.contexts, it.continuations)] for it in items]
    stats: dict = {}
    t0 = time.time()
    if cfg.ar:
        flat = [p for q in questions for p in q]
        nll_flat, _ = ar_nll(model, flat, cfg.batch_size, cfg.progress, stats=stats)
        nll, i = [], 0
        for q in questions:
            nll.append(nll_flat[i : i + len(q)])
            i += len(q)
    else:
        nll = elbo_nll(
            model,
            questions,
            cfg.num_samples,
            cfg.seed,
            cfg.batch_size,
            cfg.progress,
            stats=stats,
            estimator=cfg.estimator,
        )
    rate = _rate(stats, time.time() - t0)
    hits: dict[str, list[bool]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    samples = []
    for it, q, scores in zip(items, questions, nll):
        chars = [choice_chars(x) for x in it.continuations]
        nbytes = [len(x.encode("utf-8")) for x in it.continuations]
        pred = {
            "acc": _argmin(scores),
            "acc_norm": _argmin([s / max(1, c) for s, c in zip(scores, chars)]),
            "acc_bytes": _argmin([s / max(1, b) for s, b in zip(scores, nbytes)]),
        }
        for k, p in pred.items():
            hits[k].append(p == it.label)
        same = all(c == it.contexts[0] for c in it.contexts)
        samples.append(
            {
                "where": it.where,
                **({"context": it.contexts[0]} if same else {"contexts": it.contexts}),
                "choices": it.continuations,
                "loglikelihood": [-s for s in scores],  # exact (--ar) or the ELBO bound
                "tokens": [len(cont) for _, cont in q],
                "bytes": nbytes,
                "chars": chars,
                "pred": pred,
                "gold": it.label,
            }
        )
    res: dict = {}
    for k, h in hits.items():
        value, se = _acc(h)
        res |= {"metric": "acc", "value": value, "stderr": se} if k == "acc" else {k: value, f"{k}_stderr": se}
    return res | {"likelihood": "exact" if cfg.ar else "elbo"} | rate, samples


def diffusion_fill(model, requests: list[Request], cfg: EvalConfig, eos_fill: bool) -> list[list[int]]:
    """Generate every request (grouped by answer length, so steps can follow the length)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        if r.length is None:
            raise ValueError(f"evaluation request {i} has no answer length")
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
            cache=cfg.cache,
            threshold=cfg.threshold,
            tokens_per_step=cfg.tokens_per_step,
        )
        for s in range(0, len(idx), cfg.batch_size):
            chunk = idx[s : s + cfg.batch_size]
            samples = generate(model, [requests[i] for i in chunk], dataclasses.replace(sc, seed=cfg.seed + chunk[0]))
            for i, smp in zip(chunk, samples):
                out[i] = smp.tokens if eos_fill else smp.raw
            bar.update(len(chunk))
    bar.close()
    return out


def eval_lambada(model, tok, items: list[Completion], cfg: EvalConfig) -> TaskOutput:
    """Exact match of the last word's tokens: greedy decoding for AR (teacher-forced argmax, which
    is equivalent), diffusion generation with steps = the word's token count."""
    pairs = [encode_pair(tok, it.prompt, it.target) for it in items]
    stats: dict = {}
    t0 = time.time()
    if cfg.ar:
        nll, hits = ar_nll(model, pairs, cfg.batch_size, cfg.progress, stats=stats)
        extra: list[dict] = [{"loglikelihood": -s} for s in nll]
    else:
        reqs = [Request(ctx, length=len(cont)) for ctx, cont in pairs]
        gens = diffusion_fill(model, reqs, cfg, eos_fill=False)
        hits = [g == cont for g, (_, cont) in zip(gens, pairs)]
        extra = [{"generation": tok.decode(g)} for g in gens]
    rate = _rate(stats, time.time() - t0)
    samples = [
        {"where": it.where, "context": it.prompt, "target": it.target, "tokens": len(cont), **x, "hit": h}
        for it, (_, cont), x, h in zip(items, pairs, extra, hits)
    ]
    value, se = _acc(hits)
    return {"metric": "exact_match", "value": value, "stderr": se} | rate, samples


def eval_gsm8k(model, tok, items: list[Completion], cfg: EvalConfig) -> TaskOutput:
    if cfg.sep_id is not None:
        prompts = [with_start(tok, tok.encode(it.prompt)) + [cfg.sep_id] for it in items]
    else:
        prompts = [with_start(tok, tok.encode(GSM8K_TEMPLATE.format(question=it.prompt))) for it in items]
    if cfg.ar:
        gens = ar_generate(model, prompts, cfg.gen_length, tok.eos_id, cfg.batch_size, cfg.progress)
    else:
        gens = diffusion_fill(model, [Request(p, length=cfg.gen_length) for p in prompts], cfg, eos_fill=True)
    texts = [tok.decode(g).split("\nQuestion:")[0] for g in gens]  # an AR model may run on into a new question
    preds = [extract_answer(t) for t in texts]
    golds = [normalize_number(it.answer) for it in items]
    hits = [p is not None and p == g for p, g in zip(preds, golds)]
    samples = [
        {"where": it.where, "question": it.prompt, "generation": t, "pred": p, "gold": g, "hit": h}
        for it, t, p, g, h in zip(items, texts, preds, golds, hits)
    ]
    value, se = _acc(hits)
    return {"metric": "exact_match", "value": value, "stderr": se}, samples


def eval_planning(model, tok, items: list[Planning], cfg: EvalConfig) -> TaskOutput:
    """Countdown / Sudoku after SFT, in the training layout: `[BOS] prompt [SEP]` fixed, the rest
    of a seq_len row generated (diffusion: all of it masked, as the model learned it, padding
    included; AR: greedy decoding through the same code), cut at the first EOS or PAD, then the
    exact verifier; any valid answer counts."""
    if cfg.sep_id is None:
        raise ValueError("countdown/sudoku are scored in the SFT layout [BOS] prompt [SEP]: pass --sep-id")
    prompts = [with_start(tok, tok.encode(it.prompt)) + [cfg.sep_id] for it in items]
    lengths = [cfg.seq_len - len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError(
            f"{items[lengths.index(min(lengths))].where}: the prompt fills the whole seq_len {cfg.seq_len}"
        )
    if cfg.ar:
        gens: list[list[int]] = [[] for _ in items]
        for n in sorted(set(lengths)):
            idx = [i for i, m in enumerate(lengths) if m == n]
            for i, g in zip(
                idx, ar_generate(model, [prompts[i] for i in idx], n, tok.eos_id, cfg.batch_size, cfg.progress)
            ):
                gens[i] = g
    else:
        gens = diffusion_fill(model, [Request(p, length=n) for p, n in zip(prompts, lengths)], cfg, eos_fill=True)
    stops = {tok.eos_id, cfg.pad_id} - {None}
    texts = [tok.decode(next((g[:i] for i, t in enumerate(g) if t in stops), g)).strip() for g in gens]
    errors = [it.check(t) for it, t in zip(items, texts)]
    samples = [
        {"where": it.where, "prompt": it.prompt, "generation": t, "error": e, "hit": e is None}
        for it, t, e in zip(items, texts, errors)
    ]
    value, se = _acc([e is None for e in errors])
    return {"metric": "exact_match", "value": value, "stderr": se}, samples


def eval_infill(model, tok, items: list[Completion], cfg: EvalConfig) -> TaskOutput:
    """The middle is generated with the reference's token count (oracle length); an AR model
    cannot see the suffix and continues the prefix for the same number of tokens."""
    prefixes, middles, suffixes = [], [], []
    for it in items:
        ctx, mid = encode_pair(tok, it.prompt, it.target)
        prefixes.append(ctx)
        middles.append(mid)
        suffixes.append(tok.encode(it.suffix))
    if cfg.ar:
        gens: list[list[int]] = [[] for _ in items]
        for n in sorted(set(map(len, middles))):
            idx = [i for i, m in enumerate(middles) if len(m) == n]
            for i, g in zip(idx, ar_generate(model, [prefixes[i] for i in idx], n, None, cfg.batch_size, cfg.progress)):
                gens[i] = g
    else:
        reqs = [Request(p, suffix=s, length=len(m)) for p, s, m in zip(prefixes, suffixes, middles)]
        gens = diffusion_fill(model, reqs, cfg, eos_fill=False)
    texts = [tok.decode(g) for g in gens]
    scores = [rouge_l(t, it.target) for t, it in zip(texts, items)]
    samples = [
        {
            "where": it.where,
            "prefix": it.prompt,
            "suffix": it.suffix,
            "target": it.target,
            "generation": t,
            "rouge_l": s,
        }
        for it, t, s in zip(items, texts, scores)
    ]
    value, se = mean_stderr(scores)
    return {"metric": "rouge_l", "value": value, "stderr": se}, samples


def is_text_heldout(path: str | Path) -> bool:
    """A held-out PATH that is a text or JSON-lines file (tokenized on the fly), not a token store."""
    p = Path(path)
    return p.is_file() and any(p.name.lower().endswith(s) for s in HELDOUT_TEXT_SUFFIXES)


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """(where, text) documents of a held-out file: a .txt file is one document; JSON lines (or a
    JSON array) hold one {"text": ...} object per document."""
    p = Path(path)
    if p.suffix.lower() == ".txt":
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{p}: the text file is empty")
        return [(str(p), text)]
    docs = []
    for where, rec in read_records(p):
        body = rec.get("text")
        if not isinstance(body, str):
            raise ValueError(f"{where}: expected a string 'text' field (fields: {sorted(rec)})")
        if body:
            docs.append((where, body))
    if not docs:
        raise ValueError(f"{p}: no non-empty 'text' records")
    return docs


def rolling_windows(ids: list[int], seq_len: int) -> list[tuple[int, list[int]]]:
    """(start, window) pieces of one document that score every token but the first exactly once:
    windows of up to seq_len tokens overlapping by one (a window's first token is context only,
    the last window covers the tail)."""
    if seq_len < 2:
        raise ValueError(f"held-out windows need seq_len >= 2, got {seq_len}")
    out, start = [], 0
    while start < len(ids) - 1:
        out.append((start, ids[start : start + seq_len]))
        start += seq_len - 1
    return out


def _heldout_nats(model, batch: dict, cfg: EvalConfig) -> tuple[list[float], list[int]]:
    """Per-row nats and scored-token counts: the ELBO bound (dlm.diffusion.heldout_elbo) for a
    diffusion model, the exact NLL for --ar, on the same tokens (all but document starts and
    tokens outside `maskable`)."""
    from dlm.attention.layout import AttentionLayout
    from dlm.diffusion import eligible_tokens, heldout_elbo
    from dlm.sampling import logits_at

    if not cfg.ar:
        nats, toks = heldout_elbo(model, batch, num_samples=cfg.num_samples, seed=cfg.seed)
        return nats.tolist(), toks.tolist()
    ids, pos = batch["input_ids"], batch["position_ids"]
    eligible = eligible_tokens(pos, batch.get("maskable"))
    r, c = eligible.nonzero(as_tuple=True)
    logits = logits_at(model, ids, AttentionLayout.from_position_ids(pos, causal=True), r, c - 1)
    logits[:, model.config.base_vocab_size :] = float("-inf")
    nll = torch.nn.functional.cross_entropy(logits, ids[r, c], reduction="none").double()
    nats = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device).index_add_(0, r, nll)
    return nats.tolist(), eligible.sum(1).tolist()


def _heldout_text(model, tok, path: str, cfg: EvalConfig) -> tuple[list[dict], list[float], list[int]]:
    """Every token of every document (but its start) scored once, through rolling windows."""
    docs = read_documents(path)
    if cfg.limit is not None:
        docs = docs[: cfg.limit]
    windows = []  # (doc, where, start, ids)
    for d, (where, text) in enumerate(docs):
        ids = with_start(tok, tok.encode(text))
        windows += [(d, where, s, w) for s, w in rolling_windows(ids, cfg.seq_len)]
    if not windows:
        raise ValueError(f"{path}: no document has two or more tokens to score")
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][3]))  # length-sorted batches
    device = model.output_weight().device
    nats, toks = [0.0] * len(windows), [0] * len(windows)
    bar = tqdm(total=len(windows), desc="heldout", unit="window", disable=not cfg.progress, dynamic_ncols=True)
    for b0 in range(0, len(order), cfg.batch_size):
        chunk = order[b0 : b0 + cfg.batch_size]
        rows = [windows[i][3] for i in chunk]
        input_ids, pos = pad_rows(rows, device=device)
        maskable = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, row in enumerate(rows):
            maskable[b, : len(row)] = True
        batch = {
            "input_ids": input_ids,
            "position_ids": pos,
            "sample_ids": torch.tensor(chunk, dtype=torch.long, device=device),  # noise keyed by window
            "maskable": maskable,
        }
        for i, n, t in zip(chunk, *_heldout_nats(model, batch, cfg)):
            nats[i], toks[i] = n, t
        bar.update(len(chunk))
    bar.close()
    samples = [
        {"where": where, "doc": d, "start": s, "tokens": t, "nats": n}
        for (d, where, s, _), n, t in zip(windows, nats, toks)
    ]
    return samples, nats, toks


def _heldout_store(model, path: str, cfg: EvalConfig) -> tuple[list[dict], list[float], list[int]]:
    """The held-out split the trainer reserved in a token store, its windows in order."""
    from dlm.data import PackedDataset, SourceSpec

    try:
        ds = PackedDataset(
            [SourceSpec(path)],
            seq_len=cfg.seq_len,
            seed=cfg.seed,
            split="heldout",
            heldout_fraction=cfg.heldout_fraction,
        )
    except ValueError as e:
        raise ValueError(f"{e} (to score whole documents, pass a .txt or .jsonl file as heldout=PATH)") from None
    windows = ds.num_windows[0]
    n = windows if cfg.limit is None else min(cfg.limit, windows)
    device = model.output_weight().device
    nats, toks = [], []
    bar = tqdm(total=n, desc="heldout", unit="window", disable=not cfg.progress, dynamic_ncols=True)
    for s in range(0, n, cfg.batch_size):
        rows = ds.batch(range(s, min(n, s + cfg.batch_size)))
        batch = {k: rows[k].to(device) for k in ("input_ids", "position_ids", "sample_ids")}
        row_nats, row_toks = _heldout_nats(model, batch, cfg)
        nats += row_nats
        toks += row_toks
        bar.update(len(row_nats))
    bar.close()
    samples = [{"window": i, "tokens": t, "nats": x} for i, (x, t) in enumerate(zip(nats, toks))]
    return samples, nats, toks


@torch.inference_mode()
def eval_heldout(model, tok, path: str, cfg: EvalConfig) -> tuple[int, dict, list[dict]]:
    """nats/token of a text/JSON-lines file (every token but document starts, once) or of a token
    store's held-out split."""
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"held-out seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    t0 = time.time()
    if is_text_heldout(path):
        samples, nats, toks = _heldout_text(model, tok, path, cfg)
    else:
        samples, nats, toks = _heldout_store(model, path, cfg)
    total = int(sum(toks))
    value, se = ratio_stderr(nats, toks)
    res = {
        "metric": "nats_per_token",
        "value": value,
        "stderr": se,
        "ppl_bound": math.exp(value),
        "tokens": total,
        "tokens_per_s": round(total / max(time.time() - t0, 1e-9), 1),
    }
    return len(samples), res, samples


_RUNNERS: dict[str, Callable[..., TaskOutput]] = {
    "choice": eval_choice,
    "lambada": eval_lambada,
    "gsm8k": eval_gsm8k,
    "infill": eval_infill,
    "planning": eval_planning,
}


def evaluate_task(model, tok, name: str, path: str, cfg: EvalConfig) -> TaskOutput:
    """One task: its result and per-sample records (each with "task" and "index")."""
    t0 = time.time()
    if name == "heldout":
        n, res, samples = eval_heldout(model, tok, path, cfg)
    else:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or 'heldout'")
        records = read_records(path)
        if cfg.limit is not None:
            records = records[: cfg.limit]
        items = parse_records(name, records)
        if not items:
            raise ValueError(f"{path}: no records for task {name}")
        res, samples = _RUNNERS[TASKS[name].kind](model, tok, items, cfg)
        n = len(items)
    result = {"task": name, "path": str(path), "n": n, **res, "seconds": round(time.time() - t0, 2)}
    return result, [{"task": name, "index": i, **s} for i, s in enumerate(samples)]


def evaluate(
    model,
    tok,
    tasks: list[tuple[str, str]],
    cfg: EvalConfig,
    meta: dict | None = None,
    on_task: Callable[[dict, str, list[dict]], None] | None = None,
) -> dict:
    """All tasks, in order; the results dict that launch/evaluate.py writes as JSON ("complete"
    turns true after the last task). `on_task(results, key, samples)` runs as each task finishes,
    with the results so far."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}
    mode = "ar" if cfg.ar else "diffusion"
    results = {
        "format": RESULTS_FORMAT,
        "mode": mode,
        **(meta or {}),
        "settings": settings,
        "complete": False,
        "tasks": {},
    }
    for i, (name, path) in enumerate(tasks):
        key = name if name not in results["tasks"] else f"{name}:{path}"
        result, samples = evaluate_task(model, tok, name, path, cfg)
        results["tasks"][key] = result
        results["complete"] = i == len(tasks) - 1
        if on_task is not None:
            on_task(results, key, samples)
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
        if not Path(path).exists():
            raise FileNotFoundError(f"--task {spec!r}: {path} does not exist")
        out.append((name, path))
    return out
