"""`plan`: fix the work once, so every array task and every rerun agrees on it.

Units: one per parquet file (FineWeb files are ~1 GB), or a group of `files_per_unit`
consecutive JSON-lines / text files (SlimPajama chunks are small), in sorted path order.
"""

from __future__ import annotations

import json
from pathlib import Path

from dlm.atomic import atomic_write_json
from dlm.data.store import DEFAULT_BATCH_TOKENS, token_dtype
from dlm.tokenizer import load_tokenizer

from .inputs import BAD_RECORD_POLICIES, InputError, discover, file_size, input_kind

PLAN_FORMAT = "dlm-plan-v1"


def group_units(files: list[Path], files_per_unit: int) -> list[dict]:
    units: list[dict] = []
    group: list[Path] = []

    def flush():
        if group:
            units.append({"kind": input_kind(group[0].name), "files": [str(p) for p in group]})
            group.clear()

    for f in files:
        kind = input_kind(f.name)
        if kind == "parquet":
            flush()
            group.append(f)
            flush()
            continue
        if group and (input_kind(group[0].name) != kind or len(group) >= files_per_unit):
            flush()
        group.append(f)
    flush()
    for i, u in enumerate(units):
        u["id"] = i
        u["bytes"] = [file_size(Path(p)) for p in u["files"]]
    return units


def make_plan(
    inputs: list[str],
    tokenizer: str,
    *,
    text_field: str = "text",
    include_sets=(),
    exclude_sets=(),
    files_per_unit: int = 8,
    num_tasks: int = 1,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_bad_record: str = "error",
) -> tuple[dict, list[Path]]:
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise InputError(f"--on-bad-record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    if files_per_unit < 1 or num_tasks < 1 or batch_tokens < 1:
        raise InputError("--files-per-unit, --num-tasks and --batch-tokens must be >= 1")
    files, ignored = discover(inputs)
    if not files:
        raise InputError(f"no input files found in {inputs}")
    if (include_sets or exclude_sets) and not any(input_kind(f.name) == "jsonl" for f in files):
        raise InputError("--include-set/--exclude-set filter meta.redpajama_set_name of JSON-lines inputs; none given")
    tok = load_tokenizer(tokenizer)
    plan = {
        "format": PLAN_FORMAT,
        "tokenizer": tok.facts(),
        "dtype": token_dtype(tok.vocab_size).name,
        "text_field": text_field,
        "include_sets": sorted(include_sets),
        "exclude_sets": sorted(exclude_sets),
        "on_bad_record": on_bad_record,
        "batch_tokens": int(batch_tokens),
        "num_tasks": int(num_tasks),
        "units": group_units(files, files_per_unit),
    }
    return plan, ignored


def write_plan(store: Path, plan: dict) -> bool:
    """Write plan.json; an existing identical plan is kept (returns False), a different one refused."""
    store.mkdir(parents=True, exist_ok=True)
    path = store / "plan.json"
    if path.exists():
        old = load_plan(store)
        if old != plan:
            raise InputError(
                f"{path} already exists with a different plan; plans are immutable: "
                f"use a new output folder (or delete the old store)"
            )
        return False
    atomic_write_json(path, plan)
    return True


def load_plan(store: Path) -> dict:
    path = Path(store) / "plan.json"
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} not found: run `tokenize_fineweb plan` first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable plan ({e})") from e
    if plan.get("format") != PLAN_FORMAT:
        raise InputError(f"{path}: not a {PLAN_FORMAT} plan")
    return plan
