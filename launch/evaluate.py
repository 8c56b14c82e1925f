"""Evaluate a diffusion LM (or, with --ar, the AR original) on local task files (docs/design.md §4).

    python launch/evaluate.py runs/demo --task hellaswag=data/hellaswag_val.jsonl --num-samples 128
    python launch/evaluate.py hf/gpt2 --ar --task piqa=data/piqa_val.parquet --task winogrande=data/wg_dev
    python launch/evaluate.py runs/demo --task heldout=novel.txt --out results.json --samples samples.jsonl

--task NAME=PATH (repeatable): NAME one of hellaswag, piqa, siqa, winogrande, lambada, gsm8k,
infill, countdown, sudoku, or heldout. PATH is a JSON lines file, a parquet file or folder, or a saved Hugging Face
Arrow dataset folder; for heldout, a .txt file (one document), a .jsonl file of {"text": ...}
documents (tokenized here; every token but document starts scored once) or a token store (the
held-out split the trainer reserved). countdown / sudoku (`python -m data_tools.planning`) are
scored after SFT in its layout: [BOS] prompt [SEP] fixed, the rest of a --seq-len row generated,
cut at EOS / --pad-id, checked by exact verifiers (exact_match = solved).

Each task's line is printed as soon as the task finishes, and the results so far are written to
OUT.partial ("complete": false); OUT itself is written once every task is done. The results
JSON: {"format", "mode", "model", "tokenizer", "settings",
"complete", "tasks": {NAME: {"task", "path", "n", "metric", "value", "stderr", "seconds", ...}}};
multiple-choice tasks add "acc_norm" (lm-eval's: per character of the choice) and "acc_bytes"
(per UTF-8 byte) with their stderrs; held-out adds "ppl_bound" and "tokens". --samples writes one
JSON line per item (or held-out window): task, index, the texts, per-choice log-likelihoods (or
ELBO bounds) with token/byte/character counts, predictions and gold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/evaluate.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from dlm.atomic import atomic_write_text
from dlm.evaluation.loading import (
    DTYPES,
    check_adapted,
    find_tokenizer,
    load_model,
    run_main,
    sft_layout,
    train_state,
)
from dlm.evaluation.runner import SAMPLES_FORMAT, EvalConfig, evaluate, task_paths
from dlm.evaluation.scoring import ESTIMATORS
from dlm.sampling import CACHES, ORDERS


def _train_seq_len(model_path: str) -> int | None:
    """The training run's sequence length, when MODEL is a training checkpoint."""
    state = train_state(model_path)
    return None if state is None else state.get("train_config", {}).get("data", {}).get("seq_len")


def task_line(key: str, r: dict) -> str:
    """One human-readable line per finished task."""
    se = "n/a" if r["stderr"] is None else f"{r['stderr']:.4f}"
    line = f"{key:<12} n={r['n']:<6} {r['metric']} {r['value']:.4f} ± {se}"
    for name in ("acc_norm", "acc_bytes"):
        if name in r:
            line += f"  {name} {r[name]:.4f}"
    if "ppl_bound" in r:
        line += f"  ppl_bound {r['ppl_bound']:.2f}  tokens {r['tokens']}"
    if "tokens_per_s" in r:
        line += f"  {r['tokens_per_s']:.0f} tok/s"
    return line + f"  {r['seconds']:.1f}s"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="training run/checkpoint folder or Hugging Face style folder")
    ap.add_argument("--task", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--tokenizer", help="tokenizer path (default: found from the model folder or its run)")
    ap.add_argument("--ar", action="store_true", help="score as an AR model: causal attention, exact log-likelihood")
    ap.add_argument(
        "--allow-unadapted", action="store_true", help="score a plain AR folder as a diffusion model anyway"
    )
    ap.add_argument("--num-samples", type=int, default=128, help="K Monte-Carlo samples of the ELBO")
    ap.add_argument(
        "--estimator", choices=ESTIMATORS, default="count", help="ELBO estimator: count (LLaDA form) or ratio (1/t)"
    )
    ap.add_argument("--limit", type=int, default=None, help="first N records (held-out text: documents) per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    ap.add_argument("--steps", type=int, default=None, help="generation steps (default: one per generated token)")
    ap.add_argument("--gen-length", type=int, default=256, help="GSM8K answer tokens")
    ap.add_argument("--order", choices=ORDERS, default="confidence")
    ap.add_argument("--block-size", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--cache", choices=CACHES, default="none", help="generation: key/value reuse within blocks")
    ap.add_argument("--threshold", type=float, default=None, help="generation: also commit positions with p > it")
    ap.add_argument("--tokens-per-step", type=int, default=0, help="generation: fixed tokens per step")
    ap.add_argument(
        "--sep-id", type=int, default=None, help="after SFT: prompt = [BOS] question [SEP] (default: the run's)"
    )
    ap.add_argument(
        "--pad-id", type=int, default=None, help="SFT layout: generation also ends here (default: the run's)"
    )
    ap.add_argument(
        "--seq-len", type=int, default=None, help="held-out row length (default: the training run's, else 1024)"
    )
    ap.add_argument("--heldout-fraction", type=float, default=0.001, help="must match the training data split")
    ap.add_argument("--out", help="results JSON path (OUT.partial while running)")
    ap.add_argument("--samples", help="per-sample JSON lines path (PATH.partial while running)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    try:
        tasks = task_paths(args.task)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if not args.ar:
        check_adapted(args.model, args.allow_unadapted)

    model = load_model(args.model, ar=args.ar, device=args.device, dtype=args.dtype)
    tok = find_tokenizer(args.model, args.tokenizer)
    sft = sft_layout(args.model, tok)  # a fine-tuning run: prompt it in its training layout
    seq_len = args.seq_len or _train_seq_len(args.model) or min(1024, model.config.max_seq_len)
    cfg = EvalConfig(
        ar=args.ar,
        num_samples=args.num_samples,
        estimator=args.estimator,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        steps=args.steps,
        gen_length=args.gen_length,
        order=args.order,
        block_size=args.block_size,
        temperature=args.temperature,
        cache=args.cache,
        threshold=args.threshold,
        tokens_per_step=args.tokens_per_step,
        sep_id=args.sep_id if args.sep_id is not None else (sft.sep_id if sft else None),
        pad_id=args.pad_id if args.pad_id is not None else (sft.pad_id if sft else None),
        seq_len=seq_len,
        heldout_fraction=args.heldout_fraction,
        progress=not args.no_progress,
    )
    meta = {"model": str(args.model), "tokenizer": tok.path, "device": args.device, "dtype": args.dtype}
    sample_lines: list[str] = []

    def write(path: str, text: str, done: bool) -> None:
        """Results so far go to PATH.partial; PATH itself appears only once every task is done."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{path}.partial")
        if done:
            atomic_write_text(path, text)
            partial.unlink(missing_ok=True)
        else:
            atomic_write_text(partial, text)

    def on_task(results: dict, key: str, samples: list[dict]) -> None:
        print(task_line(key, results["tasks"][key]), flush=True)
        done = results["complete"]
        if args.out:
            write(args.out, json.dumps(results, indent=2) + "\n", done)
        if args.samples:
            head = {"format": SAMPLES_FORMAT, "mode": results["mode"], "model": results["model"]}
            sample_lines.extend(json.dumps(head | {"key": key} | s) + "\n" for s in samples)
            write(args.samples, "".join(sample_lines), done)

    if not args.ar:  # the settings behind every number below (also under "settings" in the JSON)
        print(
            f"scoring: ELBO estimator {cfg.estimator}, K={cfg.num_samples} | generation: order {cfg.order}, "
            f"steps {cfg.steps or 'one per token'}, block {cfg.block_size or 'whole answer'}, cache {cfg.cache}, "
            f"threshold {cfg.threshold}, tokens/step {cfg.tokens_per_step or 'from steps'}",
            flush=True,
        )
    results = evaluate(model, tok, tasks, cfg, meta=meta, on_task=on_task)
    if args.out:
        print(f"wrote {args.out}")
    else:
        print(json.dumps(results, indent=2))
    if args.samples:
        print(f"wrote {len(sample_lines)} samples to {args.samples}")
    return 0


if __name__ == "__main__":
    run_main(main)
