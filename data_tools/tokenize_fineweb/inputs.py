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


def _zst_blocks(f, path: Path) -> Iterator[bytes]:
    """Decompress every frame; a stream that ends inside a frame is truncated (the library's
    stream reader would silently stop there)."""
    dctx = zstandard.ZstdDecompressor()
    dobj, fed, any_bytes = dctx.decompressobj(), False, False
    try:
        while chunk := f.read(1 << 20):
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


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        blocks = _zst_blocks(f, path) if path.name.lower().endswith(".zst") else iter(lambda: f.read(1 << 20), b"")
        rest = b""
        for block in blocks:
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            yield from parts
        if rest:
            yield rest


class _Reader:
    def __init__(self, path: Path, cfg: ReadConfig, counts: ReadCounts):
        self.path, self.cfg, self.counts = path, cfg, counts

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
            return value
        if value is None:
            self.bad(record, "missing_text", f"field {self.cfg.text_field!r} is missing or null")
        elif not isinstance(value, str):
            self.bad(record, "missing_text", f"field {self.cfg.text_field!r} is {type(value).__name__}, not a string")
        else:
            self.bad(record, "empty", "empty document")
        return None

    def jsonl(self) -> Iterator[str]:
        cfg = self.cfg
        for n, raw in enumerate(_lines(self.path), start=1):
            record = f"line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad(record, "non_utf8", f"line is not valid UTF-8 ({e})")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if line.isspace() or not line:  # checked only here: no cost for the usual line
                    self.counts.blank_lines += 1
                else:
                    self.bad(record, "invalid_json", f"invalid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                self.bad(record, "invalid_json", f"a JSON {type(obj).__name__}, not an object")
                continue
            if cfg.include_sets or cfg.exclude_sets:
                meta = obj.get("meta")
                name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
                if not isinstance(name, str):
                    self.bad(
                        record, "missing_set_name", "set-name filters given but meta.redpajama_set_name is missing"
                    )
                    continue
                if (cfg.include_sets and name not in cfg.include_sets) or name in cfg.exclude_sets:
                    self.counts.filtered += 1
                    continue
            text = self.text(record, obj.get(cfg.text_field))
            if text is None:
                continue
            # a `\ud83d` escape decodes to a lone surrogate, valid JSON but not encodable as UTF-8
            if (b"\\ud" in raw or b"\\uD" in raw) and not _utf8_encodable(text):
                self.bad(record, "non_utf8", "text is not encodable as UTF-8 (a lone surrogate \\uXXXX escape)")
                continue
            yield text

    def parquet(self) -> Iterator[str]:
        pf = pq.ParquetFile(self.path)
        names = pf.schema_arrow.names
        if self.cfg.text_field not in names:
            raise InputError(f"{self.path}: no column {self.cfg.text_field!r} (columns: {', '.join(names)})")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[self.cfg.text_field]):
            col = batch.column(0)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                col = col.cast(pa.large_binary())  # zero-copy; UTF-8 is checked per record below
            for value in col.to_pylist():
                row += 1
                text = self.text(f"row {row}", value)
                if text is not None:
                    yield text

    def plain(self) -> Iterator[str]:
        text = self.text("file", self.path.read_bytes())
        if text is not None:
            yield text


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_documents(path: Path, cfg: ReadConfig, counts: ReadCounts) -> Iterator[str]:
    """Yield the documents of one input file in file order; a file that yields none is listed in
    `counts.empty_inputs`."""
    path = Path(path)
    kind = input_kind(path.name)
    reader = _Reader(path, cfg, counts)
    readers = {"parquet": reader.parquet, "jsonl": reader.jsonl, "text": reader.plain}
    if kind not in readers:
        raise InputError(f"{path}: unknown input kind")
    empty = True
    try:
        for text in readers[kind]():
            empty = False
            yield text
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
