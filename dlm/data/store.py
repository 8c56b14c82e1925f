"""The token store: one uncompressed Arrow IPC file per work unit, read zero-copy.

Layout of a store folder (written by `tokenize_fineweb`):
    plan.json                 immutable plan (inputs, units, tokenizer facts)
    unit-00000.arrow          `tokens: list<uint16|uint32>`, one row per document (BOS/EOS included)
    unit-00000.json           sidecar: written last, marks the unit done (counts, sha256, bytes)
    stats.json                written by `tokenize_fineweb verify`
Compression is never used: it would force a decode into heap memory and break memory mapping.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dlm.atomic import fsync_dir, temp_name

FORMAT = "dlm-tokens-v1"
META_FORMAT = b"dlm.format"
META_TOKENIZER = b"dlm.tokenizer"
DEFAULT_BATCH_TOKENS = 1 << 22  # a few million tokens per record batch


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def unit_stem(unit: int) -> str:
    return f"unit-{unit:05d}"


def shard_path(store: Path, unit: int) -> Path:
    return Path(store) / f"{unit_stem(unit)}.arrow"


def sidecar_path(store: Path, unit: int) -> Path:
    return Path(store) / f"{unit_stem(unit)}.json"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(facts: dict) -> dict:
    """Tokenizer facts without the machine-specific `path` (kind, name, sha256, ids): what shards
    record, so the same inputs and tokenizer give the same shard bytes wherever the file lies."""
    return {k: v for k, v in facts.items() if k != "path"}


def store_schema(dtype: np.dtype, tokenizer_facts: dict) -> pa.Schema:
    identity = json.dumps(tokenizer_identity(tokenizer_facts), sort_keys=True).encode()
    metadata = {META_FORMAT: FORMAT.encode(), META_TOKENIZER: identity}
    return pa.schema([pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype)), nullable=False)], metadata=metadata)


class ShardWriter:
    """Streams documents into `<path>.tmp-*`; `commit()` fsyncs and renames it into place.

    A record batch is cut after the first document that brings it to `batch_tokens`, so batch
    boundaries depend only on the documents, never on how callers chunk them."""

    def __init__(self, path: Path, schema: pa.Schema, batch_tokens: int = DEFAULT_BATCH_TOKENS):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.schema = schema
        self.dtype = np.dtype(schema.field("tokens").type.value_type.to_pandas_dtype())
        self.batch_tokens = int(batch_tokens)
        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed by commit / abort)
        self._writer = pa.ipc.new_file(self._file, schema, options=pa.ipc.IpcWriteOptions(compression=None))
        self._parts: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._pending = 0
        self.batches = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths (each >= 1)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        start = 0
        while len(lengths):
            need = self.batch_tokens - self._pending
            cum = np.cumsum(lengths)
            cut = int(np.searchsorted(cum, need)) + 1  # documents up to and including the one reaching `need`
            if cut > len(lengths):
                self._parts.append(tokens[start : start + int(cum[-1])])
                self._lengths.append(lengths)
                self._pending += int(cum[-1])
                return
            n = int(cum[cut - 1])
            self._parts.append(tokens[start : start + n])
            self._lengths.append(lengths[:cut])
            self._pending += n
            self._flush()
            start += n
            lengths = lengths[cut:]

    def _flush(self) -> None:
        if not self._pending:
            return
        values = np.concatenate(self._parts).astype(self.dtype, copy=False)
        lengths = np.concatenate(self._lengths)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        self._writer.write_batch(pa.record_batch([col], schema=self.schema))
        self.batches += 1
        self._parts, self._lengths, self._pending = [], [], 0

    def commit(self) -> None:
        self._flush()
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class ShardView:
    """Zero-copy numpy views of one shard: per record batch, its token values and its int32 list
    offsets (document d is values[off[d] - off[0] : off[d+1] - off[0]]). Views keep the memory
    map alive."""

    path: Path
    schema: pa.Schema
    values: list[np.ndarray]
    offsets: list[np.ndarray]
    nbytes: int

    @property
    def tokenizer(self) -> dict:
        return json.loads(self.schema.metadata[META_TOKENIZER])

    @property
    def num_tokens(self) -> int:
        return sum(len(v) for v in self.values)

    @property
    def num_documents(self) -> int:
        return sum(len(o) - 1 for o in self.offsets)


def open_shard(path: Path) -> ShardView:
    """Memory-map a shard. Refuses truncated, foreign and compressed files, naming the file:
    a compressed batch would be decoded into heap memory, which defeats zero-copy reads."""
    path = Path(path)
    try:
        mm = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(mm)
    except (OSError, pa.ArrowInvalid) as e:
        raise ValueError(
            f"{path}: not a complete Arrow IPC file (truncated, or not written by tokenize_fineweb): {e}"
        ) from e
    schema = reader.schema
    meta = schema.metadata or {}
    if meta.get(META_FORMAT) != FORMAT.encode() or META_TOKENIZER not in meta:
        raise ValueError(f"{path}: not a dlm token shard (schema metadata lacks {META_FORMAT.decode()}={FORMAT})")
    if (
        len(schema) != 1
        or schema.field(0).name != "tokens"
        or not pa.types.is_list(schema.field(0).type)
        or schema.field(0).type.value_type not in (pa.uint16(), pa.uint32())
    ):
        raise ValueError(f"{path}: schema must be `tokens: list<uint16|uint32>`, got {schema}")
    dtype = np.dtype(schema.field(0).type.value_type.to_pandas_dtype())
    size = mm.size()
    mm.seek(0)
    lo = mm.read_buffer(size).address
    values, offsets = [], []
    for i in range(reader.num_record_batches):
        col = reader.get_batch(i).column(0)
        if col.null_count:
            raise ValueError(f"{path}: record batch {i} holds null documents")
        _, obuf, _, vbuf = col.buffers()
        for buf in (obuf, vbuf):
            if buf is not None and buf.size and not (lo <= buf.address and buf.address + buf.size <= lo + size):
                raise ValueError(
                    f"{path}: record batch {i} is not memory-mapped (compressed IPC file?); "
                    f"token shards must be uncompressed"
                )
        off = np.frombuffer(obuf, dtype=np.int32, count=len(col) + 1, offset=col.offset * 4)
        vals = (
            np.frombuffer(vbuf, dtype=dtype, count=vbuf.size // dtype.itemsize)
            if vbuf is not None
            else np.empty(0, dtype)
        )
        first, last = int(off[0]), int(off[-1])
        if last > len(vals) or first > last:
            raise ValueError(f"{path}: record batch {i} has offsets beyond its values (corrupt file)")
        values.append(vals[first:last])
        offsets.append(off)
    return ShardView(path, schema, values, offsets, size)
