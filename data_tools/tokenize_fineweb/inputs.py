"""Finding input files and reading documents out of them.

Kinds: FineWeb `.parquet` (text column configurable), JSON lines `.jsonl`/`.json` plain or
`.zst` (SlimPajama: `text` and `meta.redpajama_set_name`), plain text `.txt` (one document per
file). Per-record problems (invalid JSON, non-UTF-8 bytes, a missing or non-string text field,
an empty document) raise `InputError` naming file and record, or, with the policy
`on_bad_record="skip"`, are skipped and counted by reason. File-level problems (unreadable,
truncated `.zst`, missing parquet column) always raise. Blank lines of JSON-lines files are
skipped under either policy and counted; files that yield no document are listed.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

_KINDS = (
    (".parquet", "parquet"),
    (".jsonl", "jsonl"),
    (".jsonl.zst", "jsonl"),
    (".json", "jsonl"),
    (".json.zst", "jsonl"),
    (".txt", "text"),
)
BAD_RECORD_POLICIES = ("error", "skip")
READ_BYTES = 1 << 20  # text per read (.zst: compressed bytes / 4)


class InputError(Exception):
    """An input problem, with the file (and record) it concerns in the message."""


def input_kind(path: str) -> str | None:
    name = path.lower()
    return next((kind for ext, kind in _KINDS if name.endswith(ext)), None)


def discover(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """Expand files, folders (recursively) and globs into a sorted, de-duplicated file list.
    Returns (usable files, ignored files found inside folders). A named file or a glob match
    of an unknown kind is an error; so is an input that matches nothing."""
    files: set[Path] = set()
    ignored: set[Path] = set()
    for spec in inputs:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise InputError(f"input {spec!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found = [q for q in p.rglob("*") if q.is_file()]
                if not found:
                    raise InputError(f"input folder {p} holds no file")
                for q in found:
                    (files if input_kind(q.name) else ignored).add(q.resolve())
            elif p.is_file():
                if input_kind(p.name) is None:
                    raise InputError(f"{p}: unknown input kind (expected .parquet, .jsonl[.zst], .json[.zst] or .txt)")
                files.add(p.resolve())
            else:
                raise InputError(f"input {p} does not exist")
    return sorted(files), sorted(ignored)


@dataclass
class ReadConfig:
    text_field: str = "text"
    include_sets: list[str] = field(default_factory=list)
    exclude_sets: list[str] = field(default_factory=list)
    on_bad_record: str = "error"

    @staticmethod
    def from_plan(plan: dict) -> ReadConfig:
        return ReadConfig(plan["text_field"], plan["include_sets"], plan["exclude_sets"], plan["on_bad_record"])


@dataclass
class ReadCounts:
    skipped: Counter = field(default_factory=Counter)  # reason -> records skipped under the policy
    filtered: int = 0  # records dropped by the set-name filters (not an error)
    blank_lines: int = 0  # empty or whitespace-only lines of JSON-lines files (not an error)
    empty_inputs: list[str] = field(default_factory=list)  # files that yielded no document
    text_bytes: int = 0  # UTF-8 bytes of the documents kept


def _zst_blocks(f, path: Path) -> Iterator[bytes]:
    """Decompress every frame; a stream that ends inside a frame is truncated (the library's
    stream reader would silently stop there)."""
    dctx = zstandard.ZstdDecompressor()
    dobj, fed, any_bytes = dctx.decompressobj(), False, False
    try:
        while chunk := f.read(READ_BYTES // 4):
            any_bytes = True
            while chunk:
                fed = True
                out = dobj.decompress(chunk)
                if out:
                    yield out
                if dobj.eof:
                    chunk, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
                else:
                    chunk = b""
    except zstandard.ZstdError as e:
        raise InputError(f"{path}: corrupt zstd data ({e})") from e
    if fed:
        raise InputError(f"{path}: truncated zstd stream (ends inside a frame)")
    if not any_bytes:
        raise InputError(f"{path}: truncated zstd stream (0 bytes: not even one frame)")


def _line_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks of whole lines (~READ_BYTES each, the newline after the last line of
    a chunk dropped), so that a chunk can be decoded and split in one call each."""
    with open(path, "rb") as f:
        blocks = _zst_blocks(f, path) if path.name.lower().endswith(".zst") else iter(lambda: f.read(READ_BYTES), b"")
        rest = b""
        for block in blocks:
            data = rest + block
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            yield data[:cut]
            rest = data[cut + 1 :]
        if rest:
            yield rest


def _utf8_size(texts: list[str]) -> int | None:
    """The texts' total UTF-8 size, or None when one holds a lone surrogate: a `\\ud83d` escape
    is valid JSON but has no UTF-8 encoding. One pass does both: the size is needed anyway."""
    try:
        return sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    except UnicodeEncodeError:
        return None


class _Reader:
    """Yields each file's documents as lists (one per chunk of lines or parquet batch). Per-record
    Python work competes with the tokenizer for the same core, so a chunk of well-formed records
    is decoded by a few C calls; anything unusual goes through the full per-record checks."""

    def __init__(self, path: Path, cfg: ReadConfig, counts: ReadCounts):
        self.path, self.cfg, self.counts = path, cfg, counts
        self.filtering = bool(cfg.include_sets or cfg.exclude_sets)

    def bad(self, record: str, reason: str, detail: str) -> None:
        if self.cfg.on_bad_record == "skip":
            self.counts.skipped[reason] += 1
            return
        raise InputError(
            f"{self.path}: {record}: {detail}. This store's plan stops at bad records and a plan cannot change: "
            f"to skip and count them instead, plan a new store folder from the same inputs with "
            f"--on-bad-record skip and run that"
        )

    def text(self, record: str, value) -> str | None:
        """Validate one document's text; None when the record is skipped."""
        if isinstance(value, (bytes, bytearray)):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad(record, "non_utf8", f"text is not valid UTF-8 ({e})")
                return None
        if isinstance(value, str) and value:
            size = _utf8_size([value])
            if size is None:
                self.bad(record, "non_utf8", "text is not encodable as UTF-8 (a lone surrogate \\uXXXX escape)")
                return None
            self.counts.text_bytes += size
            return value
        if value is None:
            self.bad(record, "missing_text", f"field {self.cfg.text_field!r} is missing or null")
        elif not isinstance(value, str):
            self.bad(record, "missing_text", f"field {self.cfg.text_field!r} is {type(value).__name__}, not a string")
        else:
            self.bad(record, "empty", "empty document")
        return None

    def keep_set(self, name: str) -> bool:
        cfg = self.cfg
        return (not cfg.include_sets or name in cfg.include_sets) and name not in cfg.exclude_sets

    def fast_chunk(self, chunk: str, num_lines: int) -> list[str] | None:
        """The kept documents of a chunk of well-formed lines, parsed as one JSON array in one call
        (lines cannot hold a raw newline: JSON strings escape it); None when anything is unusual
        (a blank or bad line, a missing or empty text, ...): then `line` checks each line."""
        try:
            objs = json.loads("[" + chunk.replace("\n", ",") + "]")
        except json.JSONDecodeError:
            return None
        if len(objs) != num_lines:  # a line holding two values, `{..}, {..}`
            return None
        try:
            texts = [o[self.cfg.text_field] for o in objs]
        except (KeyError, TypeError):  # a missing field, or a line that is no object
            return None
        if set(map(type, texts)) != {str} or not all(texts):
            return None
        if self.filtering:
            names: list = [
                o["meta"].get("redpajama_set_name") if isinstance(o.get("meta"), dict) else None for o in objs
            ]
            if set(map(type, names)) != {str}:
                return None
            texts = [t for t, name in zip(texts, names) if self.keep_set(name)]
        size = _utf8_size(texts)
        if size is None:
            return None
        self.counts.filtered += len(objs) - len(texts)
        self.counts.text_bytes += size
        return texts

    def line(self, record: str, line: str | bytes) -> str | None:
        """One JSON line, fully parsed and checked; None when blank, filtered or skipped."""
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad(record, "non_utf8", f"line is not valid UTF-8 ({e})")
                return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if line.isspace() or not line:
                self.counts.blank_lines += 1
            else:
                self.bad(record, "invalid_json", f"invalid JSON ({e})")
            return None
        if not isinstance(obj, dict):
            self.bad(record, "invalid_json", f"a JSON {type(obj).__name__}, not an object")
            return None
        if self.filtering:
            meta = obj.get("meta")
            name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
            if not isinstance(name, str):
                self.bad(record, "missing_set_name", "set-name filters given but meta.redpajama_set_name is missing")
                return None
            if not self.keep_set(name):
                self.counts.filtered += 1
                return None
        return self.text(record, obj.get(self.cfg.text_field))

    def jsonl(self) -> Iterator[list[str]]:
        n = 0
        for chunk in _line_chunks(self.path):
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            num_lines = chunk.count(b"\n") + 1
            docs = self.fast_chunk(text, num_lines) if text is not None else None
            if docs is None:  # `line` names the offending line(s)
                lines: list = text.split("\n") if text is not None else chunk.split(b"\n")
                docs = [t for i, line in enumerate(lines, n + 1) if (t := self.line(f"line {i}", line)) is not None]
            n += num_lines
            yield docs

    def parquet(self) -> Iterator[list[str]]:
        pf = pq.ParquetFile(self.path)
        names = pf.schema_arrow.names
        if self.cfg.text_field not in names:
            raise InputError(f"{self.path}: no column {self.cfg.text_field!r} (columns: {', '.join(names)})")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[self.cfg.text_field]):
            col = batch.column(0)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                col = col.cast(pa.large_binary())  # zero-copy; UTF-8 is checked per record below
            values = col.to_pylist()
            try:
                docs = [v.decode("utf-8") for v in values]
            except (AttributeError, UnicodeDecodeError):  # a null, a non-string or bad UTF-8
                docs = []
            if len(docs) == len(values) and all(docs):
                self.counts.text_bytes += sum(map(len, values))  # valid UTF-8: no lone surrogate
            else:
                docs = [t for i, v in enumerate(values, row + 1) if (t := self.text(f"row {i}", v)) is not None]
            row += len(values)
            yield docs

    def plain(self) -> Iterator[list[str]]:
        text = self.text("file", self.path.read_bytes())
        if text is not None:
            yield [text]


def read_documents(path: Path, cfg: ReadConfig, counts: ReadCounts) -> Iterator[list[str]]:
    """Yield the documents of one input file in file order, as lists of documents; a file that
    yields none is listed in `counts.empty_inputs`."""
    path = Path(path)
    kind = input_kind(path.name)
    reader = _Reader(path, cfg, counts)
    readers = {"parquet": reader.parquet, "jsonl": reader.jsonl, "text": reader.plain}
    if kind not in readers:
        raise InputError(f"{path}: unknown input kind")
    empty = True
    try:
        for docs in readers[kind]():
            if docs:
                empty = False
                yield docs
    except InputError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if empty:
        counts.empty_inputs.append(str(path))


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise InputError(f"{path}: cannot stat ({e})") from e
