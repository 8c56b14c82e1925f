"""`PackedDataset`: global sample id -> one packed window of L tokens, with document structure.

Window w of a source is tokens [w*L, (w+1)*L) of its split region (input_ids; the objective
shifts inside the window). A source holds (n - 1) // L windows: the count, and so every
sample's window, is that of the original format, whose windows also carried the next token.
Position ids restart at 0 at every document start and at index 0 (a document cut by the window
start is its own segment); they carry the whole document structure (`AttentionLayout`).

Train windows are visited in a fresh seeded permutation each epoch of their source; held-out
windows (the tail of each source, cut at a document start) are read in order. Sources are
interleaved by `Blend`. Reads are numpy slices of memory-mapped Arrow buffers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .blend import Blend
from .index import SourceIndex, load_index

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SourceSpec:
    path: str
    weight: float = 1.0
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class _Source:
    """One source: its index, split region and lazily memory-mapped batches."""

    def __init__(self, index: SourceIndex, lo: int, hi: int):
        self.index, self.lo, self.hi = index, lo, hi
        self.batch_starts, self.doc_starts = index.batch_starts, index.doc_starts
        self._views: list[np.ndarray | None] = [None] * (len(self.batch_starts) - 1)

    def num_windows(self, seq_len: int) -> int:
        return max(0, (self.hi - self.lo - 1) // seq_len)

    def _batch(self, b: int) -> np.ndarray:
        view = self._views[b]
        if view is None:
            shard = int(self.index.batch_shard[b])
            sv = self.index.open_shard(shard)
            for bb in np.nonzero(self.index.batch_shard == shard)[0]:
                self._views[bb] = sv.values[int(self.index.batch_local[bb])]
            view = self._views[b]
        assert view is not None  # filled just above
        return view

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        """tokens [start, start+n) into `out`: one slice unless the window spans record batches."""
        b = int(self.batch_starts.searchsorted(start, side="right")) - 1
        local = start - int(self.batch_starts[b])
        vals = self._batch(b)
        take = min(n, len(vals) - local)
        out[:take] = vals[local : local + take]
        while take < n:
            b += 1
            vals = self._batch(b)
            m = min(n - take, len(vals))
            out[take : take + m] = vals[:m]
            take += m

    def doc_boundaries(self, start: int, end: int) -> np.ndarray:
        """Document starts strictly inside (start, end), relative to start."""
        ds = self.doc_starts
        i0 = int(ds.searchsorted(start, side="right"))
        i1 = int(ds.searchsorted(end, side="left"))
        return ds[i0:i1] - start

    def __getstate__(self):  # memory maps do not pickle: DataLoader workers reopen them
        state = self.__dict__.copy()
        state["_views"] = [None] * len(self._views)
        return state


class PackedDataset(torch.utils.data.Dataset):
    """Map-style over GLOBAL sample ids (no length: epochs wrap per source)."""

    def __init__(
        self,
        sources: list[SourceSpec],
        seq_len: int,
        seed: int,
        split: str = "train",
        heldout_fraction: float = 0.001,
        index_dir: str | Path | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not sources:
            raise ValueError("PackedDataset needs at least one source")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        sources = [s if isinstance(s, SourceSpec) else SourceSpec(str(s)) for s in sources]
        labels = [s.label for s in sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"source names must be unique, got {labels}")
        self.specs, self.seq_len, self.seed, self.split = sources, int(seq_len), int(seed), split
        self.heldout_fraction = float(heldout_fraction)
        self.blend = Blend([s.weight for s in sources])
        indexes = [load_index(Path(s.path), None if index_dir is None else Path(index_dir)) for s in sources]
        toks = {ix.manifest["tokenizer"]["sha256"] for ix in indexes}
        if len(toks) != 1:
            raise ValueError(
                f"sources were tokenized with different tokenizers: "
                f"{ {s.label: ix.manifest['tokenizer']['path'] for s, ix in zip(sources, indexes)} }"
            )
        self.tokenizer = indexes[0].manifest["tokenizer"]
        self.fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "sources": [[s.label, w, ix.fingerprint] for s, w, ix in zip(sources, self.blend.weights, indexes)],
                    "heldout_fraction": self.heldout_fraction,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:32]
        self._sources = []
        for spec, ix in zip(sources, indexes):
            split_at = self._split_point(ix)
            lo, hi = (0, split_at) if split == "train" else (split_at, ix.num_tokens)
            src = _Source(ix, lo, hi)
            if src.num_windows(self.seq_len) < 1:
                raise ValueError(
                    f"source {spec.label!r} ({spec.path}) has {hi - lo} {split} tokens: fewer than one "
                    f"window of seq_len + 1 = {self.seq_len + 1}"
                )
            self._sources.append(src)
        self.num_windows = [s.num_windows(self.seq_len) for s in self._sources]
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        # window orders are keyed by source name, not list position: adding a source keeps the others' order
        self._name_keys = [int.from_bytes(hashlib.sha256(lb.encode()).digest()[:8], "little") for lb in labels]

    def _split_point(self, ix: SourceIndex) -> int:
        """First document start at or after (1 - heldout_fraction) of the tokens: no document
        is shared by the two splits."""
        if self.heldout_fraction == 0:
            return ix.num_tokens
        target = int(ix.num_tokens * (1.0 - self.heldout_fraction))
        ds = ix.doc_starts
        return int(ds[min(int(np.searchsorted(ds, target, side="left")), len(ds) - 1)])

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        """The window order of one source in one epoch (seeded by seed, source name, epoch)."""
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            n = self.num_windows[source]
            perm = np.random.default_rng([self.seed, self._name_keys[source], epoch]).permutation(n)
            perm = perm.astype(np.uint32 if n < 1 << 32 else np.int64)
            for old in [k for k in self._perms if k[0] == source and k[1] < epoch - 1]:
                del self._perms[old]  # keep the current and previous epoch only
            self._perms[key] = perm
        return perm

    def locate(self, k: int) -> tuple[int, int, int]:
        """Global sample k -> (source, window, token start)."""
        if k < 0:
            raise IndexError(f"sample id must be >= 0, got {k}")
        s, j = self.blend.locate(k)
        epoch, r = divmod(j, self.num_windows[s])
        window = int(self.permutation(s, epoch)[r]) if self.split == "train" else r
        return s, window, self._sources[s].lo + window * self.seq_len

    def read(self, k: int, tokens: np.ndarray) -> np.ndarray:
        """Sample k's L tokens into `tokens`; returns the document starts inside them
        (excluding index 0), relative to the window."""
        L = self.seq_len
        s, _, start = self.locate(k)
        src = self._sources[s]
        src.read(start, L, tokens)
        return src.doc_boundaries(start, start + L)

    def batch(self, ids) -> dict[str, torch.Tensor]:
        """Samples `ids` collated: input_ids, position_ids [b, L] int64, sample_ids [b] int64.
        Per row: one token read and one index lookup; the position ids of all rows are then
        built with whole-batch array operations."""
        ids = [int(k) for k in ids]
        L, b = self.seq_len, len(ids)
        tokens = np.empty((b, L), dtype=self._sources[0].index.dtype)
        rels = [self.read(k, tokens[row]) for row, k in enumerate(ids)]
        counts = np.fromiter(map(len, rels), dtype=np.int64, count=b)
        rel = np.concatenate(rels) if b else np.empty(0, np.int64)
        row = np.repeat(np.arange(b), counts)
        starts = np.sort(np.concatenate([np.arange(b, dtype=np.int64) * L, row * L + rel]))  # flat segment starts
        pos = np.arange(b * L, dtype=np.int64) - np.repeat(starts, np.diff(starts, append=b * L))
        return {
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "position_ids": torch.from_numpy(pos.reshape(b, L)),
            "sample_ids": torch.tensor(ids, dtype=torch.int64),
        }

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        b = self.batch([k])
        out = {key: v[0] for key, v in b.items() if key != "sample_ids"}
        out["sample_id"] = b["sample_ids"][0]
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_perms"] = {}
        return state
