"""tokenize_fineweb: plan/run/verify, determinism, recovery, task assignment, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from data_tools.tokenize_fineweb.__main__ import main
from data_tools.tokenize_fineweb.plan import load_plan
from data_tools.tokenize_fineweb.run import resolve_task, task_units
from dlm.data.store import open_shard
from dlm.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def tf(*args) -> int:
    return main([str(a) for a in args])


def store_files(store: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(store.iterdir())
        if p.suffix in (".arrow", ".json") and p.name != "stats.json"
    }


def documents(store: Path) -> list[list[int]]:
    """Every document of the store in unit order, read back through plain (copying) Arrow."""
    plan = load_plan(store)
    out = []
    for u in range(len(plan["units"])):
        with pa.ipc.open_file(store / f"unit-{u:05d}.arrow") as r:
            out += r.read_all().column("tokens").to_pylist()
    return out


def plan_store(tmp_path, inputs, tok, name="store", *extra):
    store = tmp_path / name
    assert tf("plan", *inputs, "--output", store, "--tokenizer", tok, "--files-per-unit", 2, *extra) == 0
    return store


def test_plan_run_verify_round_trip(tmp_path, corpus_dir, spm_path, capsys):
    inputs, expected = corpus_dir
    store = plan_store(tmp_path, [inputs], spm_path, "store", "--batch-tokens", 500)
    plan = load_plan(store)
    assert [u["kind"] for u in plan["units"]] == ["parquet", "parquet", "jsonl", "jsonl", "text"]
    assert tf("run", store, "--workers", 1) == 0
    assert "docs/s" in capsys.readouterr().err  # the progress bar shows rates
    assert tf("verify", store) == 0
    tok = load_tokenizer(spm_path)
    want = [t for files in (u["files"] for u in plan["units"]) for f in files for t in expected[Path(f)]]
    got = documents(store)
    assert len(got) == len(want)
    for ids, text in zip(got, want):
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
        assert tok.decode(ids[1:-1]) == text
    stats = json.loads((store / "stats.json").read_text())
    assert stats["documents"] == len(want) and stats["tokens"] == sum(map(len, got))
    assert sum(stats["length_histogram"].values()) == len(want)
    assert open_shard(store / "unit-00000.arrow").values.__len__() > 1  # several record batches


def test_two_runs_byte_identical_and_rerun_skips(tmp_path, corpus_dir, tok_dir, capsys):
    inputs, _ = corpus_dir
    a = plan_store(tmp_path, [inputs], tok_dir / "gpt2", "a", "--batch-tokens", 300)
    b = plan_store(tmp_path, [inputs], tok_dir / "gpt2", "b", "--batch-tokens", 300)
    assert tf("run", a, "--workers", 1, "--no-progress") == 0
    assert tf("run", b, "--workers", 2, "--no-progress") == 0  # worker processes write the same bytes
    assert store_files(a) == store_files(b) and len(store_files(a)) == 11  # plan, 5 shards, 5 sidecars
    mtimes = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    capsys.readouterr()
    assert tf("run", a, "--workers", 1) == 0
    assert "5 already done, 0 to do" in capsys.readouterr().out
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    # an identical re-plan is accepted, a different one refused
    assert (
        tf("plan", inputs, "--output", a, "--tokenizer", tok_dir / "gpt2", "--files-per-unit", 2, "--batch-tokens", 300)
        == 0
    )
    assert tf("plan", inputs, "--output", a, "--tokenizer", tok_dir / "gpt2") == 1
    assert "different plan" in capsys.readouterr().err


def test_array_tasks_disjoint_complete_and_identical(tmp_path, corpus_dir, spm_path, monkeypatch):
    plan = {"num_tasks": 3, "units": [None] * 11}
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")  # a partial resubmission: must be ignored
    for subset in ([0, 1, 2], [2], [0, 2], [1]):
        seen = []
        for t in subset:
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(t))
            tid, n = resolve_task(plan, None, None)
            assert (tid, n) == (t, 3)
            seen += task_units(11, tid, n)
        assert sorted(seen) == sorted(set(seen)) == [u for u in range(11) if u % 3 in subset]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with pytest.raises(Exception, match="outside"):
        resolve_task(plan, None, None)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert resolve_task(plan, None, None) == (None, 3)

    inputs, _ = corpus_dir
    whole = plan_store(tmp_path, [inputs], spm_path, "whole", "--num-tasks", 3)
    split = plan_store(tmp_path, [inputs], spm_path, "split", "--num-tasks", 3)
    assert tf("run", whole, "--workers", 1, "--no-progress") == 0
    for t in (2, 0, 1):  # tasks in any order, each touching only its units
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(t))
        assert tf("run", split, "--workers", 1, "--no-progress") == 0
        done = sorted(int(p.stem.split("-")[1]) for p in split.glob("unit-*.json"))
        assert set(u for u in done if u % 3 == t) == {u for u in range(5) if u % 3 == t}
    assert store_files(whole) == store_files(split)


@pytest.mark.slow  # a subprocess
def test_killed_unit_recovers(tmp_path, h, spm_path):
    inputs = h.slimpajama_files(tmp_path / "in", h.make_docs(1200, seed=7), 24)
    ref = plan_store(tmp_path, [inputs], spm_path, "ref")
    assert tf("run", ref, "--workers", 1, "--no-progress") == 0
    store = plan_store(tmp_path, [inputs], spm_path, "killed")
    # leftovers of a writer killed midway: a temp file, and a renamed shard whose sidecar never came
    (store / "unit-00003.arrow.tmp-host-123").write_bytes((ref / "unit-00003.arrow").read_bytes()[:500])
    (store / "unit-00004.arrow").write_bytes((ref / "unit-00004.arrow").read_bytes()[:700])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_tools.tokenize_fineweb", "run", str(store), "--workers", "1", "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(store.glob("unit-*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # a real kill at an arbitrary point of the run
    proc.wait()
    for side in store.glob("unit-*.json"):  # whatever is marked done is complete and correct
        assert (store / side.name.replace(".json", ".arrow")).read_bytes() == (
            ref / side.name.replace(".json", ".arrow")
        ).read_bytes()
    assert tf("verify", store) == 1  # not everything is done: verify refuses
    assert tf("run", store, "--workers", 1, "--no-progress") == 0
    assert not list(store.glob("*.tmp-*"))
    assert store_files(store) == store_files(ref)
    assert tf("verify", store) == 0


# ---- bad input -----------------------------------------------------------------------------------


def _one_file_store(tmp_path, spm_path, path, *extra):
    store = tmp_path / f"store-{path.name}-{len(extra)}"
    assert tf("plan", path, "--output", store, "--tokenizer", spm_path, *extra) == 0
    return store


def _expect_error(capsys, store, *needles):
    assert tf("run", store, "--workers", 1, "--no-progress") == 1
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    assert not list(store.glob("unit-*.json")) and not list(store.glob("*.tmp-*"))  # nothing looks done


BAD_RECORDS = {  # name -> (records, needle in error, skip reason)
    "invalid_json": (
        ['{"text": "ok one"}', '{"text": "broken', '{"text": "ok two"}'],
        "line 2: invalid JSON",
        "invalid_json",
    ),
    "missing_text": (
        ['{"text": "ok one"}', '{"body": "x"}', '{"text": "ok two"}'],
        "line 2: field 'text' is missing",
        "missing_text",
    ),
    "empty": (['{"text": "ok one"}', '{"text": ""}', '{"text": "ok two"}'], "line 2: empty document", "empty"),
    "lone_surrogate": (  # valid JSON, but no UTF-8 encoding exists for the text
        ['{"text": "ok one"}', '{"text": "emoji half \\ud83d here"}', '{"text": "ok two"}'],
        "line 2: text is not encodable as UTF-8",
        "non_utf8",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS) + ["non_utf8"])
def test_bad_records_error_or_counted_skip(tmp_path, spm_path, h, capsys, kind):
    path = tmp_path / "in.jsonl.zst"
    if kind == "non_utf8":
        data = b'{"text": "ok one"}\n{"text": "caf\xe9"}\n{"text": "ok two"}\n'
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(data))
        needle, reason = "line 2: line is not valid UTF-8", "non_utf8"
    else:
        records, needle, reason = BAD_RECORDS[kind]
        h.write_jsonl(path, records)
    _expect_error(capsys, _one_file_store(tmp_path, spm_path, path), str(path), needle)
    store = _one_file_store(tmp_path, spm_path, path, "--on-bad-record", "skip")
    assert tf("run", store, "--workers", 1, "--no-progress") == 0
    assert f"skipped records: {reason} 1" in capsys.readouterr().out
    side = json.loads((store / "unit-00000.json").read_text())
    assert side["skipped"] == {reason: 1} and side["documents"] == 2
    assert tf("verify", store) == 0
    assert json.loads((store / "stats.json").read_text())["skipped"] == {reason: 1}


def test_truncated_zst(tmp_path, spm_path, h, capsys):
    path = h.write_jsonl(tmp_path / "t.jsonl.zst", h.slimpajama(h.make_docs(300, seed=3)))
    path.write_bytes(path.read_bytes()[:-40])
    store = _one_file_store(tmp_path, spm_path, path, "--on-bad-record", "skip")  # file-level: never skipped
    _expect_error(capsys, store, str(path), "truncated zstd")


def test_parquet_missing_column_and_null(tmp_path, spm_path, h, capsys):
    path = h.write_parquet(tmp_path / "x.parquet", ["a b", "c d"], column="content")
    _expect_error(capsys, _one_file_store(tmp_path, spm_path, path), str(path), "no column 'text'", "content")
    nulls = h.write_parquet(tmp_path / "n.parquet", ["a b", None, "c"])
    _expect_error(capsys, _one_file_store(tmp_path, spm_path, nulls), str(nulls), "row 2", "missing or null")
    store = _one_file_store(tmp_path, spm_path, path, "--text-field", "content")
    assert tf("run", store, "--workers", 1, "--no-progress") == 0


def test_unreadable_and_vanished_files(tmp_path, spm_path, h, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    _expect_error(capsys, _one_file_store(tmp_path, spm_path, bad), str(bad), "cannot read")
    gone = h.write_jsonl(tmp_path / "gone.jsonl", ['{"text": "x"}'])
    store = _one_file_store(tmp_path, spm_path, gone)
    gone.unlink()
    _expect_error(capsys, store, str(gone), "cannot stat")


def test_wrong_tokenizer(tmp_path, spm_path, h, capsys):
    path = h.write_jsonl(tmp_path / "a.jsonl", ['{"text": "x"}'])
    assert tf("plan", path, "--output", tmp_path / "s", "--tokenizer", tmp_path / "missing.model") == 1
    assert "missing.model" in capsys.readouterr().err and not (tmp_path / "s" / "plan.json").exists()
    tok = tmp_path / "tok.model"
    tok.write_bytes(spm_path.read_bytes())
    store = tmp_path / "s2"
    assert tf("plan", path, "--output", store, "--tokenizer", tok) == 0
    tok.write_bytes(spm_path.read_bytes() + b"\0")  # the tokenizer changed after the plan
    _expect_error(capsys, store, "sha256")


def test_set_name_filters(tmp_path, spm_path, h):
    path = h.write_jsonl(tmp_path / "s.jsonl", h.slimpajama(h.make_docs(30, seed=4), sets=("A", "B", "C")))
    store = _one_file_store(tmp_path, spm_path, path, "--include-set", "A", "--include-set", "B", "--exclude-set", "B")
    assert tf("run", store, "--workers", 1, "--no-progress") == 0
    side = json.loads((store / "unit-00000.json").read_text())
    assert (side["documents"], side["filtered"]) == (10, 20)
    tok = load_tokenizer(spm_path)
    texts = [r["text"] for r in h.slimpajama(h.make_docs(30, seed=4), sets=("A", "B", "C"))][::3]
    assert [tok.decode(d[1:-1]) for d in documents(store)] == texts
