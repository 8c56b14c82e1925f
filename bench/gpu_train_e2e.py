"""The trainer end to end on one CUDA GPU, as a user runs it: torchrun, NCCL, FSDP2 with bf16
mixed precision, the Triton masking and loss kernels, the document-mask attention backend and
torch.compile. The unit tests check the same path on CPU (gloo, Triton interpreter); this is the
device's turn.

    python bench/gpu_train_e2e.py             # one CUDA GPU, about 3 minutes on an H200
    python bench/gpu_train_e2e.py --dry-run   # the same code on CPU, tiny and uncompiled (a test)

1. Run A: a tiny LLaMA on a synthetic token store, STEPS steps, a checkpoint every N, an export at
   the end. Losses must be finite and fall.
2. Run B: A's step-N checkpoint in a fresh run folder, resumed. Step N+1 must repeat A's loss bit
   for bit (restored weights, optimizer, data position and masks; the forward pass is
   deterministic); later steps within 1e-2 relative (attention backward kernels may accumulate in
   a nondeterministic order on GPUs; on CPU they are bitwise equal too).
3. `launch/generate.py` on A's export, on the device: it must finish and decode.
4. Throughput of the real trainer (`--preset`, default tinyllama-1.1b, L 2048): tokens/s, MFU and
   peak memory from its own metrics, once per `--speed-variant` too (skipped in a dry run). Each
   run ends with a full checkpoint (about 40 s for 1.1B on the H200's disk; `--keep /dev/shm/x`
   puts the runs in memory).

Prints a table last; with $OUT set (or --json) the details go to $OUT/gpu_train_e2e.json. Exit
status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import write_store, write_word_tokenizer  # noqa: E402  (repo root on the path first)

CONFIG = REPO / "launch" / "configs" / "tiny_cpu.toml"
STEPS, N = 40, 20


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def torchrun(run_dir: Path, overrides: dict, env: dict, log: Path, timeout: float) -> None:
    """`launch/pretrain.py` on one process, as the README's one-node command runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += [str(REPO / "launch" / "pretrain.py"), "--config", str(CONFIG), "--train.run_dir", str(run_dir)]
    for k, v in overrides.items():
        cmd += [f"--{k}", json.dumps(v) if isinstance(v, bool) else str(v)]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout).returncode
    if rc != 0:
        raise RuntimeError(f"torchrun exited {rc}; log tail:\n{log.read_text()[-3000:]}")


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.details: dict[str, dict] = {}
        self.failed = False

    def add(self, name: str, ok: bool | None, result: str, **details) -> None:
        status = "skip" if ok is None else "ok" if ok else "FAIL"
        self.rows.append((name, result, status))
        self.details[name] = {"result": result, "status": status, **details}
        self.failed |= ok is False
        print(f"{name}: {result} [{status}]", flush=True)


def run_checks(rep: Report, tmp: Path, device: str, dry: bool, preset: str, variants: list[str]) -> None:
    store = write_store(tmp / "store", n_docs=20000 if not dry else 600, units=2)
    tokenizer = write_word_tokenizer(tmp / "tokenizer.json")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if dry:
        env["TRITON_INTERPRET"] = "1"
    base = {
        "data.paths": str(store),
        "data.seq_len": 64,
        "train.device": device,
        "train.steps": STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "checkpoint.interval": N,
        "checkpoint.keep_last": 3,
        "metrics.log_every": 10,
        "parallel.compile": not dry,
    }
    a, b = tmp / "run_a", tmp / "run_b"
    t0 = time.monotonic()
    torchrun(a, base, env, tmp / "a.log", timeout=600)
    ra = records(a)
    losses = [ra[s]["loss"] for s in sorted(ra)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    ok = all(math.isfinite(x) for x in losses) and last < first
    rep.add(
        "run A: train, checkpoint, export",
        ok,
        f"{len(losses)} steps in {time.monotonic() - t0:.0f}s, loss {first:.3f} -> {last:.3f}",
        losses=losses,
    )

    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / f"step_{N:08d}", b / "checkpoints" / f"step_{N:08d}")
    torchrun(b, base, env, tmp / "b.log", timeout=600)
    rb = records(b)
    steps = list(range(N + 1, STEPS + 1))
    if sorted(rb) != steps:
        rep.add("run B: resume from A's step-N checkpoint", False, f"resumed steps {sorted(rb)[:3]}..., not {N + 1}..")
    else:
        exact_first = rb[N + 1]["loss"] == ra[N + 1]["loss"]
        rel = max(abs(rb[s]["loss"] - ra[s]["loss"]) / abs(ra[s]["loss"]) for s in steps)
        bitwise = all(rb[s]["loss"] == ra[s]["loss"] for s in steps)
        rep.add(
            "run B: resume from A's step-N checkpoint",
            exact_first and rel <= 1e-2,
            f"step {N + 1} {'bitwise equal' if exact_first else 'DIFFERENT'}; steps {N + 1}-{STEPS} "
            + ("bitwise equal" if bitwise else f"max rel diff {rel:.1e}"),
            max_rel_diff=rel,
            bitwise=bitwise,
        )

    gen = [sys.executable, str(REPO / "launch" / "generate.py"), str(a / "export"), "--tokenizer", str(tokenizer)]
    gen += ["--prompt", "w5 w6", "--length", "16", "--num-samples", "2", "--device", device, "--no-progress"]
    t0 = time.monotonic()
    proc = subprocess.run(gen, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    lines = [s for s in proc.stdout.splitlines() if s.strip()]
    rep.add(
        "generate from A's export",
        proc.returncode == 0 and bool(lines),
        f"exit {proc.returncode} in {time.monotonic() - t0:.0f}s; "
        + (lines[-1][:80] if lines else proc.stderr[-300:].replace("\n", " | ")),
    )

    if dry:
        rep.add(f"trainer throughput ({preset})", None, "skipped in a dry run")
        return
    speed = {
        **base,
        "model.preset": preset,
        "data.seq_len": 2048,
        "train.steps": 12,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 4,
        "checkpoint.interval": 0,
        "checkpoint.export_at_end": False,
        "metrics.log_every": 4,
        "metrics.tensorboard": False,
    }
    for i, variant in enumerate(["", *variants]):  # "k=v,k=v": overrides on top of the base run
        extra = dict(kv.split("=", 1) for kv in variant.split(",") if kv)
        run = tmp / f"run_speed{i}"
        torchrun(run, {**speed, **extra}, env, tmp / f"speed{i}.log", timeout=600)
        rs = records(run)
        tail = [rs[s] for s in sorted(rs)[-6:]]  # after compilation and warm-up
        tok_s = sorted(r["tokens_per_s_per_device"] for r in tail)[len(tail) // 2]
        mfu = sorted(r["mfu"] or 0.0 for r in tail)[len(tail) // 2]
        mem = max(r["peak_memory_gib"] for r in tail)
        rep.add(
            f"trainer throughput ({preset}, B 4 x L 2048, compiled{', ' + variant if variant else ''})",
            all(math.isfinite(r["loss"]) for r in tail),
            f"{tok_s:,.0f} tok/s, MFU {mfu:.1%}, peak {mem:.1f} GiB",
            tokens_per_s=tok_s,
            mfu=mfu,
            peak_memory_gib=mem,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny, uncompiled (the test suite runs this)")
    p.add_argument("--preset", default="tinyllama-1.1b", help="model of the throughput run")
    p.add_argument("--json", type=Path, help="details file (default $OUT/gpu_train_e2e.json when OUT is set)")
    p.add_argument("--keep", type=Path, help="keep the run folders here instead of a temp folder")
    p.add_argument(
        "--speed-variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="another throughput run with these config overrides, e.g. parallel.reshard_after_forward=false",
    )
    args = p.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_train_e2e: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        print(f"gpu_train_e2e: --keep {args.keep} is not empty; name a new folder", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    rep = Report()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="dlm-e2e-"))
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        run_checks(rep, tmp, device, args.dry_run, args.preset, args.speed_variant)
    except Exception as e:  # a crashed run is a failed check, reported with its log tail
        rep.add("crashed", False, f"{type(e).__name__}: {str(e)[-1500:]}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    out = args.json or (Path(os.environ["OUT"]) / "gpu_train_e2e.json" if os.environ.get("OUT") else None)
    if out is not None:
        from dlm.atomic import atomic_write_text

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({"device": device, "checks": rep.details}, indent=1, default=str))
    width = max(len(r[0]) for r in rep.rows)
    print(f"\ngpu_train_e2e {'FAILED' if rep.failed else 'passed'} in {time.monotonic() - start:.0f}s ({device})")
    for name, result, status in rep.rows:
        print(f"{name.ljust(width)}  {status:4}  {result}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
