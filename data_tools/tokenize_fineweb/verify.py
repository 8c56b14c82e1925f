"""`verify`: open every shard and check it against its sidecar and the plan; write stats.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dlm.atomic import atomic_write_json
from dlm.data.index import load_json
from dlm.data.store import open_shard, sha256_file, shard_path, sidecar_path, tokenizer_identity

from .plan import load_plan
from .run import empty_inputs_note


def _check_unit(store: Path, plan: dict, u: int, check_hash: bool, hist: np.ndarray) -> tuple[dict | None, list[str]]:
    side_path, path = sidecar_path(store, u), shard_path(store, u)
    if not side_path.exists():
        return None, [f"unit {u}: not done ({side_path.name} missing)"]
    side = load_json(side_path, "unit sidecar")
    problems = []
    try:
        view = open_shard(path)
    except (OSError, ValueError) as e:
        return side, [f"unit {u}: {e}"]
    facts, want = plan["tokenizer"], np.dtype(plan["dtype"])
    if view.nbytes != side["bytes"]:
        problems.append(f"{path}: {view.nbytes} bytes, sidecar says {side['bytes']}")
    elif check_hash and sha256_file(path) != side["sha256"]:
        problems.append(f"{path}: sha256 differs from its sidecar")
    if tokenizer_identity(view.tokenizer) != tokenizer_identity(facts):
        problems.append(f"{path}: tokenizer metadata differs from the plan")
    dtype = np.dtype(view.schema.field(0).type.value_type.to_pandas_dtype())
    if dtype != want:
        problems.append(f"{path}: token dtype {dtype}, plan says {want}")
    if (view.num_documents, view.num_tokens) != (side["documents"], side["tokens"]):
        problems.append(
            f"{path}: {view.num_documents} documents / {view.num_tokens} tokens, sidecar says "
            f"{side['documents']} / {side['tokens']}"
        )
    for b, (vals, off) in enumerate(zip(view.values, view.offsets)):
        lengths = np.diff(off)
        if len(lengths) and lengths.min() < 1:
            problems.append(f"{path}: record batch {b} holds an empty document")
            continue
        if len(vals) and int(vals.max()) >= facts["vocab_size"]:
            problems.append(f"{path}: record batch {b} holds token id {int(vals.max())} >= vocab {facts['vocab_size']}")
        starts = off[:-1] - off[0]
        if facts["add_bos"] and len(starts) and not np.all(vals[starts] == facts["bos_id"]):
            problems.append(f"{path}: record batch {b}: a document does not start with BOS {facts['bos_id']}")
        if facts["eos_id"] is not None and len(starts) and not np.all(vals[off[1:] - off[0] - 1] == facts["eos_id"]):
            problems.append(f"{path}: record batch {b}: a document does not end with EOS {facts['eos_id']}")
        np.add.at(hist, np.minimum(np.log2(np.maximum(lengths, 1)).astype(np.int64), len(hist) - 1), 1)
    return side, problems


def verify(store: Path, check_hash: bool = True, log=print) -> dict:
    """Check every unit; write stats.json only when all are done and sound. Raises on problems."""
    store = Path(store)
    plan = load_plan(store)
    hist = np.zeros(40, dtype=np.int64)
    sides, problems = [], []
    for u in range(len(plan["units"])):
        side, probs = _check_unit(store, plan, u, check_hash, hist)
        problems += probs
        if side is not None:
            sides.append(side)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{store}: {len(problems)} problem(s):\n  {shown}{more}")
    tokens = sum(s["tokens"] for s in sides)
    skipped: Counter[str] = Counter()
    for s in sides:
        skipped.update(s["skipped"])
    top = int(np.nonzero(hist)[0].max()) + 1 if hist.any() else 0
    stats = {
        "units": len(sides),
        "documents": sum(s["documents"] for s in sides),
        "tokens": tokens,
        "shard_bytes": sum(s["bytes"] for s in sides),
        "input_bytes": sum(s["input_bytes"] for s in sides),
        "bytes_per_token": sum(s["input_bytes"] for s in sides) / tokens if tokens else None,
        "skipped": dict(sorted(skipped.items())),
        "filtered": sum(s["filtered"] for s in sides),
        # sidecars written before these counts existed lack them
        "blank_lines": sum(s.get("blank_lines", 0) for s in sides),
        "empty_inputs": sorted(f for s in sides for f in s.get("empty_inputs", [])),
        "tokenizer": plan["tokenizer"],
        "dtype": plan["dtype"],
        # documents whose token count (BOS/EOS included) lies in [2^i, 2^(i+1))
        "length_histogram": {f"{1 << i}-{(1 << (i + 1)) - 1}": int(hist[i]) for i in range(top)},
    }
    atomic_write_json(store / "stats.json", stats)
    log(
        f"[tokenize_fineweb] verified {stats['units']} units: {stats['documents']:,} documents, "
        f"{stats['tokens']:,} tokens, {stats['bytes_per_token'] or 0:.2f} bytes/token"
        f"{empty_inputs_note(stats['empty_inputs'])} -> {store / 'stats.json'}"
    )
    return stats
