"""tokenize_fineweb in operation: empty and blank inputs, store bytes independent of where the
tokenizer lies, cleanup after a failed worker, progress in log files, the sbatch script without SLURM."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_tools.tokenize_fineweb import run as run_mod
from data_tools.tokenize_fineweb.__main__ import main
from dlm.data import PackedDataset, SourceSpec
from dlm.data.store import open_shard

REPO = Path(__file__).resolve().parents[2]


def tf(*args) -> int:
    return main([str(a) for a in args])


def shard_and_sidecars(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.glob("unit-*")) if p.suffix in (".arrow", ".json")}


def test_zero_byte_zst_is_truncated(tmp_path, spm_path, capsys):
    path = tmp_path / "empty.jsonl.zst"
    path.write_bytes(b"")
    store = tmp_path / "s"
    assert tf("plan", path, "--output", store, "--tokenizer", spm_path, "--on-bad-record", "skip") == 0
    assert tf("run", store, "--workers", 1, "--no-progress") == 1
    err = capsys.readouterr().err
    assert str(path) in err and "truncated zstd" in err, err
    assert not list(store.glob("unit-*.json")) and not list(store.glob("*.tmp-*"))


def test_inputs_without_documents_are_reported(tmp_path, spm_path, h, capsys):
    d = tmp_path / "in"
    d.mkdir()
    h.write_jsonl(d / "a_good.jsonl", ['{"text": "one two"}', '{"text": "three"}'])
    (d / "b_empty.jsonl").write_bytes(b"")
    (d / "c_empty_frame.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "d_no_rows.parquet")
    store = tmp_path / "s"
    assert tf("plan", d, "--output", store, "--tokenizer", spm_path, "--files-per-unit", 8) == 0
    assert tf("run", store, "--workers", 1, "--no-progress") == 0
    out = capsys.readouterr().out
    empty = sorted(str((d / n).resolve()) for n in ("b_empty.jsonl", "c_empty_frame.jsonl.zst", "d_no_rows.parquet"))
    assert "3 inputs without documents" in out and empty[0] in out, out
    sides = [json.loads(p.read_text()) for p in sorted(store.glob("unit-*.json"))]
    assert sorted(f for s in sides for f in s["empty_inputs"]) == empty
    assert sum(s["documents"] for s in sides) == 2
    assert tf("verify", store) == 0
    assert json.loads((store / "stats.json").read_text())["empty_inputs"] == empty


def test_blank_lines_skipped_and_counted(tmp_path, spm_path, h, capsys):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "one two"}\r\n\r\n{"text": "three"}\r\n  \n\n{"text": "four"}\n')
    store = tmp_path / "s"
    assert tf("plan", path, "--output", store, "--tokenizer", spm_path) == 0  # default: stop on bad records
    assert tf("run", store, "--workers", 1, "--no-progress") == 0
    assert "blank lines: 3" in capsys.readouterr().out
    side = json.loads((store / "unit-00000.json").read_text())
    assert (side["documents"], side["blank_lines"], side["skipped"]) == (3, 3, {})
    assert tf("verify", store) == 0
    assert json.loads((store / "stats.json").read_text())["blank_lines"] == 3
    # line numbers still count the blank lines
    bad = h.write_jsonl(tmp_path / "bad.jsonl.zst", ['{"text": "a"}', "", "  ", '{"text": '])
    store = tmp_path / "s2"
    assert tf("plan", bad, "--output", store, "--tokenizer", spm_path) == 0
    assert tf("run", store, "--workers", 1, "--no-progress") == 1
    assert "line 4: invalid JSON" in capsys.readouterr().err


def test_store_bytes_independent_of_tokenizer_location(tmp_path, corpus_dir, spm_path):
    inputs, _ = corpus_dir
    stores = []
    for where in ("x", "y/deeper"):
        tok = tmp_path / where / "tokenizer.model"
        tok.parent.mkdir(parents=True)
        shutil.copy(spm_path, tok)
        store = tmp_path / f"store-{where.replace('/', '-')}"
        assert tf("plan", inputs, "--output", store, "--tokenizer", tok, "--files-per-unit", 2) == 0
        assert tf("run", store, "--workers", 1, "--no-progress") == 0
        assert tf("verify", store) == 0
        stores.append(store)
    a, b = (shard_and_sidecars(s) for s in stores)
    assert a == b and len(a) == 10
    meta = open_shard(stores[0] / "unit-00000.arrow").tokenizer
    assert "path" not in meta and meta["name"] == "tokenizer.model" and len(meta["sha256"]) == 64
    # the trainer's reader accepts the store (shard metadata vs plan.json)
    ds = PackedDataset(
        [SourceSpec(str(stores[1]))], seq_len=16, seed=0, heldout_fraction=0.0, index_dir=tmp_path / "ix"
    )
    assert ds.tokenizer["name"] == "tokenizer.model" and len(ds.batch(range(2))) > 0


def test_failed_unit_leaves_no_temp_files(tmp_path, spm_path, h, capsys):
    """One unit fails while another worker is mid-unit: the pool is stopped and its temp files go."""
    d = tmp_path / "in"
    d.mkdir()
    docs = h.make_docs(8000, seed=5)
    h.write_jsonl(d / "a_bad.jsonl", [json.dumps({"text": t}) for t in docs] + ['{"text": "broken'])
    with open(d / "b_big.jsonl.zst", "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
        block = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
        for _ in range(40):  # far more text than the bad unit reads before its failure
            w.write(block)
    store = tmp_path / "s"
    assert tf("plan", d, "--output", store, "--tokenizer", spm_path, "--files-per-unit", 1) == 0
    assert tf("run", store, "--workers", 2, "--no-progress") == 1
    err = capsys.readouterr().err
    assert "line 8001: invalid JSON" in err, err
    assert not list(store.glob("unit-*.json"))
    assert not list(store.glob("*.tmp-*")), sorted(p.name for p in store.iterdir())


def test_bad_record_hint_says_what_to_do(tmp_path, spm_path, h, capsys):
    path = h.write_jsonl(tmp_path / "x.jsonl", ['{"text": "ok"}', "{"])
    store = tmp_path / "s"
    assert tf("plan", path, "--output", store, "--tokenizer", spm_path) == 0
    assert tf("run", store, "--workers", 1, "--no-progress") == 1
    err = capsys.readouterr().err
    assert "plan a new store folder" in err and "--on-bad-record skip" in err and "cannot change" in err, err


def _progress_lines(err: str) -> list[str]:
    return [s for s in re.split(r"[\r\n]", err) if "docs/s" in s]


def test_progress_inside_a_unit_and_log_interval(tmp_path, spm_path, h, capsys, monkeypatch):
    path = h.write_jsonl(tmp_path / "one.jsonl", [json.dumps({"text": t}) for t in h.make_docs(400, seed=6)])
    monkeypatch.setattr(run_mod, "ENCODE_DOCS", 16)
    monkeypatch.setattr(run_mod, "PROGRESS_EVERY_S", 0.0)
    store = tmp_path / "s"
    assert tf("plan", path, "--output", store, "--tokenizer", spm_path) == 0
    assert tf("run", store, "--workers", 1, "--progress-interval", 0) == 0
    lines = _progress_lines(capsys.readouterr().err)
    inside = {re.search(r"([\d,]+) docs,", s).group(1) for s in lines if " 0/1 " in s}
    assert len(inside) >= 5, lines  # one worker still shows progress within its (only) unit

    store = tmp_path / "s2"
    assert tf("plan", path, "--output", store, "--tokenizer", spm_path) == 0
    assert tf("run", store, "--workers", 1, "--progress-interval", 3600) == 0
    lines = _progress_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "400 docs," in lines[0], lines  # a log file gets the final line only


@pytest.mark.slow  # a subprocess
def test_sbatch_script_runs_without_slurm(tmp_path, corpus_dir, spm_path):
    """The array script as a plain shell script (what SLURM runs), one task of two, CPU only."""
    inputs, _ = corpus_dir
    store = tmp_path / "s"
    assert tf("plan", inputs, "--output", store, "--tokenizer", spm_path, "--files-per-unit", 2, "--num-tasks", 2) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(STORE=str(store), SLURM_ARRAY_TASK_ID="1", SLURM_SUBMIT_DIR=str(REPO), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "data_tools/slurm/tokenize.sbatch")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in store.glob("unit-*.json")) == ["unit-00001.json", "unit-00003.json"]
    assert "docs/s" in proc.stderr  # the progress line of a log file
    env["SLURM_ARRAY_TASK_ID"] = "2"
    proc = subprocess.run(
        ["bash", str(REPO / "data_tools/slurm/tokenize.sbatch")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "--array=0-1" in proc.stderr
    env.update(STORE=str(tmp_path / "nowhere"), SLURM_ARRAY_TASK_ID="0")
    proc = subprocess.run(
        ["bash", str(REPO / "data_tools/slurm/tokenize.sbatch")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "plan.json not found" in proc.stderr, proc.stderr
    # memory is asked per CPU, so `sbatch --cpus-per-task=N` on a smaller partition scales it too
    lines = [
        ln.split()[1]
        for ln in (REPO / "data_tools/slurm/tokenize.sbatch").read_text().splitlines()
        if ln.startswith("#SBATCH")
    ]
    assert any(o.startswith("--mem-per-cpu=") for o in lines) and not any(o.startswith("--mem=") for o in lines)


JSON_LINES_OK = [  # each a valid record: the reader must agree with json.loads
    '{"text": "plain"}',
    '{"text":"compact", "meta": {"redpajama_set_name": "A"}}',
    '{"text": "esc \\" \\\\ \\n \\t \\u00e9 \\ud83d\\ude00 caf\u00e9", "meta": {"x": [1, 2.5, null, true]}}',
    '{"text": "trailing space"}   \r',
    '{"meta": {"redpajama_set_name": "B"}, "text": "text not first"}',
    '{"text": "dup first", "text": "dup last wins"}',
    '  {"text": "leading space"}',
    '{"id": 7, "text": "after id", "score": NaN}',
    '{"text": "nested", "meta": {"redpajama_set_name": "A", "deep": {"a": {"b": []}}}}',
]
JSON_LINES_BAD = [  # invalid JSON: never accepted by the fast path either
    '{"text": "a"} x',
    '{"text": "a",}',
    '{"text": "a", "meta": {"b": 1}',
    '{"text": "a"\u00a0}',
    '{"text": "raw\tcontrol"}',
    '{"text": "a", "meta": {"redpajama_set_name": "A"}}}',
]


def test_json_lines_reader_agrees_with_json_loads(tmp_path):
    from data_tools.tokenize_fineweb.inputs import InputError, ReadConfig, ReadCounts, read_documents

    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(JSON_LINES_OK) + "\n", encoding="utf-8")
    got = [t for chunk in read_documents(path, ReadConfig(), ReadCounts()) for t in chunk]
    assert got == [json.loads(line)["text"] for line in JSON_LINES_OK]
    counts = ReadCounts()
    cfg = ReadConfig(include_sets=["A", "B"], exclude_sets=["B"])
    path.write_text("\n".join(JSON_LINES_OK[i] for i in (1, 4, 8)), encoding="utf-8")
    got = [t for chunk in read_documents(path, cfg, counts) for t in chunk]
    assert got == ["compact", "nested"] and counts.filtered == 1
    for bad in JSON_LINES_BAD:
        path.write_text('{"text": "fine"}\n' + bad + "\n", encoding="utf-8")
        try:
            json.loads(bad)
            raise AssertionError(f"oracle accepts {bad!r}")
        except json.JSONDecodeError:
            pass
        try:
            list(read_documents(path, ReadConfig(), ReadCounts()))
            raise AssertionError(f"reader accepted {bad!r}")
        except InputError as e:
            assert "line 2: invalid JSON" in str(e), e


def test_text_bytes_count_kept_documents_in_utf8(tmp_path):
    """`input_bytes` (sidecars, stats, progress) is the UTF-8 size of the documents kept, counted by
    the reader on its fast and its per-record paths."""
    from data_tools.tokenize_fineweb.inputs import ReadConfig, ReadCounts, read_documents

    docs = ["plain", "ünï → 😀", "x" * 50, "é"]
    lines = [json.dumps({"text": t}) for t in docs]  # \u escapes, surrogate pairs included
    skip = ReadConfig(on_bad_record="skip")
    cases = {
        "fast.jsonl": lines,
        "slow.jsonl": [*lines[:2], '{"text": "\\ud83d"}', "", *lines[2:], '{"text": 3}'],  # bad, blank: per record
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_text("\n".join(content) + "\n", encoding="utf-8")
        counts = ReadCounts()
        got = [t for chunk in read_documents(path, skip, counts) for t in chunk]
        assert got == docs, name
        assert counts.text_bytes == sum(len(t.encode()) for t in docs), name
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": docs}), path)
    counts = ReadCounts()
    assert [t for chunk in read_documents(path, ReadConfig(), counts) for t in chunk] == docs
    assert counts.text_bytes == sum(len(t.encode()) for t in docs)


def test_encode_batches_partition_within_limits(monkeypatch):
    monkeypatch.setattr(run_mod, "ENCODE_DOCS", 4)
    monkeypatch.setattr(run_mod, "ENCODE_CHARS", 10)
    docs = ["a" * n for n in (1, 2, 3, 30, 4, 1, 1, 1, 1, 1, 9, 9, 2)]
    batches = list(run_mod._encode_batches(docs))
    assert [t for b in batches for t in b] == docs
    for b in batches:
        assert 1 <= len(b) <= 4
        assert len(b) == 1 or sum(map(len, b)) <= 10, b  # one long document may exceed the limit alone
    assert [len(b) for b in batches] == [3, 1, 4, 2, 1, 1, 1]
