"""Per-source index of a token store: where every record batch and every document starts.

Built once per store content (the first process to take the file lock builds, the others wait
for it and then load), never depends on world size, and is named by a fingerprint hashed from
the plan's tokenizer and every shard's sidecar (name, bytes, sha256, counts). Arrays are int64
`.npy` files loaded memory-mapped, so a 65B-token store costs each process only page cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlm.atomic import fsync_dir, fsync_file, temp_name

from .store import ShardView, open_shard, sidecar_path, tokenizer_identity

INDEX_VERSION = 1


def load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found ({what})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable {what} ({e})") from e


def store_manifest(store: Path) -> dict:
    """The inputs an index depends on, from plan.json and the sidecars; refuses an unfinished store."""
    store = Path(store)
    plan = load_json(store / "plan.json", "token store plan; is this a tokenize_fineweb output folder?")
    units = range(len(plan["units"]))
    missing = [u for u in units if not sidecar_path(store, u).exists()]
    if missing:
        raise ValueError(
            f"token store {store} is incomplete: {len(missing)} of {len(units)} units not done "
            f"(first: {sidecar_path(store, missing[0]).name} missing); run `tokenize_fineweb run {store}`"
        )
    shards = []
    for u in units:
        side = load_json(sidecar_path(store, u), "unit sidecar")
        shards.append({k: side[k] for k in ("file", "bytes", "sha256", "tokens", "documents")})
    return {"version": INDEX_VERSION, "tokenizer": plan["tokenizer"], "dtype": plan["dtype"], "shards": shards}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def check_shard(view: ShardView, expect: dict, tokenizer: dict) -> None:
    if view.nbytes != expect["bytes"]:
        raise ValueError(
            f"{view.path}: {view.nbytes} bytes but its sidecar says {expect['bytes']} (truncated or rewritten)"
        )
    if (view.num_tokens, view.num_documents) != (expect["tokens"], expect["documents"]):
        raise ValueError(
            f"{view.path}: {view.num_tokens} tokens / {view.num_documents} documents but its sidecar says "
            f"{expect['tokens']} / {expect['documents']}"
        )
    if tokenizer_identity(view.tokenizer) != tokenizer_identity(tokenizer):  # older shards also hold the path
        raise ValueError(f"{view.path}: tokenizer metadata differs from the store's plan.json")


@dataclass
class SourceIndex:
    """batch_starts [nb+1]: global token offset of each record batch (all shards in unit order)
    and the total; batch_shard / batch_local [nb]: which shard and which batch in it;
    doc_starts [nd+1]: global offset of every document start, then the total."""

    store: Path
    fingerprint: str
    manifest: dict
    batch_starts: np.ndarray
    batch_shard: np.ndarray
    batch_local: np.ndarray
    doc_starts: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.batch_starts[-1])

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def open_shard(self, i: int) -> ShardView:
        """Memory-map shard i, refusing one that no longer matches its sidecar."""
        view = open_shard(Path(self.store) / self.manifest["shards"][i]["file"])
        check_shard(view, self.manifest["shards"][i], self.manifest["tokenizer"])
        return view


def _build(store: Path, manifest: dict, out: Path) -> None:
    batch_starts, batch_shard, batch_local, doc_starts = [0], [], [], []
    for i, expect in enumerate(manifest["shards"]):
        view = open_shard(store / expect["file"])
        check_shard(view, expect, manifest["tokenizer"])
        for b, off in enumerate(view.offsets):
            base = batch_starts[-1]
            doc_starts.append(base + (off[:-1].astype(np.int64) - off[0]))
            batch_starts.append(base + int(off[-1]) - int(off[0]))
            batch_shard.append(i)
            batch_local.append(b)
    total = batch_starts[-1]
    arrays = {
        "batch_starts": np.asarray(batch_starts, dtype=np.int64),
        "batch_shard": np.asarray(batch_shard, dtype=np.int32),
        "batch_local": np.asarray(batch_local, dtype=np.int32),
        "doc_starts": np.concatenate(doc_starts + [np.asarray([total], dtype=np.int64)]),
    }
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", np.asarray(arr))
        fsync_file(out / f"{name}.npy")
    (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    fsync_file(out / "manifest.json")


def load_index(store: Path, index_dir: Path | None = None, log=None) -> SourceIndex:
    """Load the index of a store, building it first if no process has (under a file lock)."""
    store = Path(store)
    manifest = store_manifest(store)
    fp = fingerprint(manifest)
    root = Path(index_dir or os.environ.get("DLM_INDEX_DIR") or store / ".dlm_index")
    final = root / fp
    if not (final / "manifest.json").exists():
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / f"{fp}.lock", "a+")  # noqa: SIM115 (held until the index is written)
        except OSError as e:
            raise OSError(
                f"cannot create the index of {store} under {root} ({e}); pass index_dir= "
                f"(or set DLM_INDEX_DIR) to a writable folder"
            ) from e
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds; the others wait here
            if not (final / "manifest.json").exists():
                tmp = temp_name(final)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                if log:
                    log(f"building the index of {store} -> {final}")
                _build(store, manifest, tmp)
                try:
                    os.replace(tmp, final)
                except OSError:  # another node (lock not shared across hosts) finished first
                    if not (final / "manifest.json").exists():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
                fsync_dir(root)
    # plain ndarray views of the memory maps: np.memmap slicing is slow on the per-sample path
    arrays = {
        n: np.load(final / f"{n}.npy", mmap_mode="r").view(np.ndarray)
        for n in ("batch_starts", "batch_shard", "batch_local", "doc_starts")
    }
    return SourceIndex(store, fp, manifest, **arrays)
