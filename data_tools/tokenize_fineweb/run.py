"""`run`: tokenize this task's units, one unit per worker process at a time.

Each worker loads the tokenizer once (threads pinned to 1) and writes its unit to a temp file,
which is fsynced and renamed; the JSON sidecar is written after that and is what marks the unit
done. Only small count dicts travel back to the parent. A unit killed at any point leaves at most
a temp file or a shard without a sidecar; the next run of the task removes/overwrites both. When a
unit fails, the pool is stopped and the other workers' temp files are removed before the error.

Progress (documents, tokens, rates) is reported from inside each unit, also with one worker, and
shown at most every `progress_interval` seconds: 1 s on a terminal, 60 s in a log file.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dlm.atomic import atomic_write_json
from dlm.data.store import FORMAT, ShardWriter, sha256_file, shard_path, sidecar_path, store_schema, unit_stem
from dlm.tokenizer import load_tokenizer, pin_threads, tokenizer_sha256

from .inputs import InputError, ReadConfig, ReadCounts, file_size, read_documents
from .plan import load_plan

ENCODE_DOCS = 256  # documents per encode_batch call
ENCODE_CHARS = 1 << 20
PROGRESS_EVERY_S = 0.5


def resolve_task(plan: dict, task_id: int | None, num_tasks: int | None, env=os.environ) -> tuple[int | None, int]:
    """(task id or None for every unit, number of tasks). SLURM_ARRAY_TASK_COUNT is ignored on
    purpose: it counts only the tasks of this submission, so a partial resubmission (--array=3,7)
    would reshuffle which units belong to which task."""
    n = int(num_tasks) if num_tasks is not None else int(plan["num_tasks"])
    if task_id is None and env.get("SLURM_ARRAY_TASK_ID") not in (None, ""):
        task_id = int(env["SLURM_ARRAY_TASK_ID"])
    if n < 1 or (task_id is not None and not 0 <= task_id < n):
        raise InputError(f"task id {task_id} is outside [0, {n}) (num_tasks {n}; array ids must be 0..{n - 1})")
    return task_id, n


def task_units(num_units: int, task_id: int | None, num_tasks: int) -> list[int]:
    return list(range(num_units)) if task_id is None else [u for u in range(num_units) if u % num_tasks == task_id]


def remove_stale_temps(store: Path, units: list[int]) -> int:
    """Delete temp files left by killed writers of these units (never other tasks' units)."""
    n = 0
    for u in units:
        for p in Path(store).glob(f"{unit_stem(u)}.*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


# ---- worker side -------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(progress_queue) -> None:
    pin_threads()
    _WORKER["report"] = progress_queue.put


def _tokenizer(plan: dict):
    """The worker's tokenizer, loaded once (`run` checked its sha256 against the plan). What is
    loaded by then lives as long as the worker: frozen, the garbage collector skips it while
    the per-document objects of JSON decoding churn."""
    if "tokenizer" not in _WORKER:
        _WORKER["tokenizer"] = load_tokenizer(plan["tokenizer"]["path"])
        gc.freeze()
    return _WORKER["tokenizer"]


def _encode_batches(docs: list[str]) -> Iterator[list[str]]:
    """Slices of at most ENCODE_DOCS documents, split further past ENCODE_CHARS characters (after
    their first document): bounds the tokens held at once. Tokens never depend on the batching."""
    for i in range(0, len(docs), ENCODE_DOCS):
        batch = docs[i : i + ENCODE_DOCS]
        if sum(map(len, batch)) <= ENCODE_CHARS:  # the common case, without a loop in Python
            yield batch
            continue
        start = chars = 0
        for j, text in enumerate(batch):
            if j > start and chars + len(text) > ENCODE_CHARS:
                yield batch[start:j]
                start, chars = j, 0
            chars += len(text)
        yield batch[start:]


def _encode(tok, texts: list[str], dtype: np.dtype, bos: np.ndarray, eos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(all documents' tokens, each framed by `bos`/`eos`, as one flat array; their lengths)."""
    ids = tok.encode_arrays(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + (len(bos) + len(eos))
    # ids < vocab_size, which the plan checked fits `dtype`
    flat = np.concatenate([part for x in ids for part in (bos, x, eos)], dtype=dtype, casting="unsafe")
    return flat, lengths


def process_unit(store_dir: str, plan: dict, unit: int) -> dict:
    """Tokenize one unit into its shard + sidecar; returns the sidecar dict plus `cpu_s`, this
    process's CPU seconds for the unit, loading the tokenizer aside (not written: sidecars stay
    byte-identical across runs)."""
    tok = _tokenizer(plan)
    cpu0 = time.process_time()
    store = Path(store_dir)
    spec = plan["units"][unit]
    facts = plan["tokenizer"]
    dtype = np.dtype(plan["dtype"])
    bos = np.array([facts["bos_id"]] if facts["add_bos"] else [], dtype=np.int32)
    eos = np.array([facts["eos_id"]] if facts["eos_id"] is not None else [], dtype=np.int32)
    cfg, counts = ReadConfig.from_plan(plan), ReadCounts()
    for path, planned in zip(spec["files"], spec["bytes"]):
        if file_size(Path(path)) != planned:
            raise InputError(f"{path}: size changed since the plan ({planned} -> {file_size(Path(path))} bytes)")
    sink = _WORKER.get("report")  # takes (docs, tokens, bytes) since the last report
    docs = tokens = 0
    sent = [0, 0, 0]
    last = time.monotonic()

    def report(force=False):
        nonlocal last, sent
        if sink is not None and (force or time.monotonic() - last >= PROGRESS_EVERY_S):
            now = [docs, tokens, counts.text_bytes]  # bytes are counted per chunk read
            sink(tuple(a - b for a, b in zip(now, sent)))
            sent, last = now, time.monotonic()

    writer = ShardWriter(shard_path(store, unit), store_schema(dtype, facts), plan["batch_tokens"])
    try:
        for path in spec["files"]:
            for chunk in read_documents(Path(path), cfg, counts):
                for texts in _encode_batches(chunk):
                    flat, lengths = _encode(tok, texts, dtype, bos, eos)
                    writer.add(flat, lengths)
                    docs += len(texts)
                    tokens += len(flat)
                    report()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    report(force=True)
    final = shard_path(store, unit)
    sidecar = {
        "format": FORMAT,
        "unit": unit,
        "file": final.name,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "documents": docs,
        "tokens": tokens,
        "batches": writer.batches,
        "input_bytes": counts.text_bytes,
        "inputs": spec["files"],
        "skipped": dict(sorted(counts.skipped.items())),
        "filtered": counts.filtered,
        "blank_lines": counts.blank_lines,
        "empty_inputs": counts.empty_inputs,
        "tokenizer_sha256": facts["sha256"],
    }
    atomic_write_json(sidecar_path(store, unit), sidecar)
    return {**sidecar, "cpu_s": time.process_time() - cpu0}


# ---- parent side -------------------------------------------------------------------------------


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Progress:
    """Units done, plus documents/tokens/rates from inside the units, redrawn at most every
    `interval` seconds (each redraw is a line in a log file)."""

    def __init__(self, total_units: int, enabled: bool, interval: float | None):
        if interval is None:
            interval = 1.0 if sys.stderr.isatty() else 60.0
        self.interval = interval
        self.bar = tqdm(total=total_units, unit="unit", disable=not enabled, mininterval=interval, dynamic_ncols=True)
        self.t0 = self.shown = time.monotonic()
        self.docs = self.tokens = self.bytes = 0

    def _postfix(self) -> None:
        dt = max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix_str(
            f"{self.docs:,} docs, {self.tokens:,} tokens, {self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s, "
            f"{self.bytes / dt / 1e6:,.1f} MB/s",
            refresh=False,
        )

    def add(self, d: int, t: int, b: int) -> None:
        self.docs, self.tokens, self.bytes = self.docs + d, self.tokens + t, self.bytes + b
        if time.monotonic() - self.shown >= self.interval:
            self._postfix()
            self.bar.refresh()
            self.shown = time.monotonic()

    def close(self) -> None:
        self._postfix()
        self.bar.close()


def run(
    store: Path,
    task_id: int | None = None,
    num_tasks: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    log=print,
    progress_interval: float | None = None,
) -> dict:
    """Tokenize the units of one task (or every unit); returns the run summary."""
    store = Path(store)
    plan = load_plan(store)
    task_id, num_tasks = resolve_task(plan, task_id, num_tasks)
    mine = task_units(len(plan["units"]), task_id, num_tasks)
    removed = remove_stale_temps(store, mine)
    todo = [u for u in mine if not sidecar_path(store, u).exists()]
    who = "all tasks" if task_id is None else f"task {task_id}/{num_tasks}"
    log(
        f"[tokenize_fineweb] {who}: {len(mine)} units, {len(mine) - len(todo)} already done, "
        f"{len(todo)} to do; {removed} stale temp files removed"
    )
    if todo and tokenizer_sha256(plan["tokenizer"]["path"]) != plan["tokenizer"]["sha256"]:
        raise InputError(
            f"{plan['tokenizer']['path']}: tokenizer sha256 differs from the plan's "
            f"{plan['tokenizer']['sha256']} (the tokenizer changed after `plan`)"
        )
    workers = min(workers or _affinity(), max(len(todo), 1))
    t0 = time.monotonic()
    bar = _Progress(len(todo), progress, progress_interval)
    sidecars: list[dict] = []
    try:
        if workers <= 1:  # in-process: same code path, no process start-up
            _WORKER.clear()
            pin_threads()
            _WORKER["report"] = lambda m: bar.add(*m)
            for u in todo:
                sidecars.append(process_unit(str(store), plan, u))
                bar.bar.update(1)
        else:
            ctx = mp.get_context("spawn")  # no fork: the parent holds Arrow/tokenizer thread pools
            q = ctx.Queue()
            with ctx.Pool(workers, initializer=_init_worker, initargs=(q,)) as pool:
                try:
                    pending = {u: pool.apply_async(process_unit, (str(store), plan, u)) for u in todo}
                    while pending:
                        with contextlib.suppress(queue_mod.Empty):
                            bar.add(*q.get(timeout=0.2))
                        for u in [u for u, r in pending.items() if r.ready()]:
                            sidecars.append(pending.pop(u).get())
                            bar.bar.update(1)
                except BaseException:
                    pool.terminate()  # SIGTERM: the workers' own cleanup never runs
                    pool.join()
                    remove_stale_temps(store, todo)
                    raise
                while True:  # late progress messages
                    try:
                        bar.add(*q.get(timeout=0.05))
                    except queue_mod.Empty:
                        break
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    summary = summarize(sidecars, elapsed)
    summary.update(task_id=task_id, num_tasks=num_tasks, units_done_before=len(mine) - len(todo), workers=workers)
    log(format_summary(summary))
    return summary


def summarize(sidecars: list[dict], elapsed: float) -> dict:
    skipped: Counter[str] = Counter()
    for s in sidecars:
        skipped.update(s["skipped"])
    tokens = sum(s["tokens"] for s in sidecars)
    return {
        "units": len(sidecars),
        "documents": sum(s["documents"] for s in sidecars),
        "tokens": tokens,
        "input_bytes": sum(s["input_bytes"] for s in sidecars),
        "skipped": dict(sorted(skipped.items())),
        "filtered": sum(s["filtered"] for s in sidecars),
        "blank_lines": sum(s["blank_lines"] for s in sidecars),
        "empty_inputs": sorted(f for s in sidecars for f in s["empty_inputs"]),
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "worker_cpu_s": sum(s["cpu_s"] for s in sidecars),
    }


def format_summary(s: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    bpt = s["input_bytes"] / s["tokens"] if s["tokens"] else 0.0
    return (
        f"[tokenize_fineweb] tokenized {s['units']} units: {s['documents']:,} documents, {s['tokens']:,} tokens, "
        f"{s['input_bytes'] / 1e6:,.1f} MB text ({bpt:.2f} bytes/token) in {s['elapsed_s']:.1f}s "
        f"({s['tokens_per_s']:,.0f} tokens/s); skipped records: {skipped}; filtered by set name: {s['filtered']}; "
        f"blank lines: {s['blank_lines']}" + empty_inputs_note(s["empty_inputs"])
    )


def empty_inputs_note(files: list[str], shown: int = 5) -> str:
    """`; N inputs without documents: a, b, ...`, or "" when every input gave a document."""
    if not files:
        return ""
    more = f" and {len(files) - shown} more" if len(files) > shown else ""
    return f"; {len(files)} inputs without documents: {', '.join(files[:shown])}{more}"
