"""Read task records from local files in the formats tasks are published in.

    JSON lines (.jsonl / .json holding one object per line, or one JSON array; optionally .gz)
    Parquet (.parquet, or a folder of .parquet files)
    Hugging Face Arrow dataset folders (what `datasets.save_to_disk` writes: `state.json`,
    `dataset_info.json`, `data-*.arrow`), read with pyarrow alone.

Every record comes with `where` ("file:line" or "file row i") so a bad record can be named.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

Record = tuple[str, dict]  # (where, fields)


def read_json_records(path: Path) -> list[Record]:
    """The objects of a JSON lines file (blank lines skipped) or of one JSON array, each with
    its `where`; malformed JSON or a non-object is a ValueError naming file and line."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{path} item {i}: expected a JSON object, got {type(row).__name__}")
            out.append((f"{path} item {i}", row))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        out.append((f"{path}:{n}", row))
    return out


def _table_records(table: pa.Table, name: str) -> list[Record]:
    return [(f"{name} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_arrow_file(path: Path) -> pa.Table:
    """`save_to_disk` writes the Arrow IPC stream format; the file format is accepted too."""
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not an Arrow IPC stream or file: {e}") from None


def _read_arrow_folder(folder: Path) -> list[Record]:
    state = json.loads((folder / "state.json").read_text())
    files = [f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise ValueError(f"{folder}/state.json lists no data files (_data_files is empty or missing)")
    out: list[Record] = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{folder}/state.json names {name}, which does not exist")
        out += _table_records(_read_arrow_file(path), str(path))
    return out


def read_records(path: str | Path) -> list[Record]:
    """All records of a task file or dataset folder, in order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task data {path} does not exist")
    if path.is_dir():
        if (path / "state.json").is_file():
            return _read_arrow_folder(path)
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            example = path / (splits[0] if splits else "validation")
            raise ValueError(f"{path} is a DatasetDict; pass one split's folder, e.g. {example} (splits: {splits})")
        parquet = sorted(path.glob("*.parquet"))
        if parquet:
            return [r for f in parquet for r in _table_records(pq.read_table(f), str(f))]
        raise ValueError(
            f"{path}: a folder must be a saved Arrow dataset (state.json + data-*.arrow) or hold .parquet files"
        )
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        return read_json_records(path)
    if suffix == ".parquet":
        return _table_records(pq.read_table(path), str(path))
    if suffix == ".arrow":
        return _table_records(_read_arrow_file(path), str(path))
    raise ValueError(
        f"{path}: unknown task file type {suffix!r}; "
        "use .jsonl, .json (optionally .gz), .parquet, .arrow or a dataset folder"
    )
