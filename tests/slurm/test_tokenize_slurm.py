"""data_tools/slurm/tokenize.sbatch on a live SLURM cluster: the array job's store is
byte-identical to a local run, also when a task is requeued in the middle of a unit."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import WORDS, train_sentencepiece

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A SentencePiece tokenizer and 4 JSON-lines files of 30k short documents each."""
    import random

    root = tmp_path_factory.mktemp("tok_inputs")
    r = random.Random(0)
    docs = [" ".join(r.choice(WORDS) for _ in range(r.randint(5, 40))) for _ in range(120_000)]
    (root / "tok.model").write_bytes(train_sentencepiece(docs[:2000], 300, byte_fallback=True))
    (root / "text").mkdir()
    for i in range(4):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[i * 30_000 : (i + 1) * 30_000])
        (root / "text" / f"part{i}.jsonl").write_text(lines)
    return root / "tok.model", root / "text"


def tool(python: str, *args: str) -> None:
    subprocess.run([python, "-m", "data_tools.tokenize_fineweb", *args], check=True, cwd=REPO, capture_output=True)


def store_files(store: Path) -> dict[str, bytes]:
    """Everything `run` writes (shards and their sidecars), by name."""
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name.startswith("unit-")}


def test_array_job_matches_local_run_with_a_requeue(slurm, python, inputs, tmp_path):
    tokenizer, text = inputs
    for name in ("local", "array"):
        tool(
            python,
            "plan",
            "--output",
            str(tmp_path / name),
            "--tokenizer",
            str(tokenizer),
            "--num-tasks",
            "2",
            "--files-per-unit",
            "1",
            "--batch-tokens",
            "65536",
            str(text),
        )
    tool(python, "run", str(tmp_path / "local"), "--workers", "1", "--no-progress")

    store = tmp_path / "array"
    job = slurm.sbatch(
        "--array=0-1",
        "--cpus-per-task=1",
        "--mem-per-cpu=500M",
        f"--output={tmp_path}/tok_%A_%a.out",
        str(REPO / "data_tools" / "slurm" / "tokenize.sbatch"),
        cwd=REPO,
        env={"STORE": str(store), "PYTHON": python, "PYTHONPATH": str(REPO)},
    )
    # requeue task 0 while it is writing a unit (a temp shard exists)
    end = time.monotonic() + 300
    while not list(store.glob("unit-*.tmp-*")):
        info = slurm.job(f"{job}_0")
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"task 0 ended first: {info}"
        assert time.monotonic() < end, "no unit was ever in progress"
        time.sleep(0.05)
    slurm.run("scontrol", "requeue", f"{job}_0")
    infos = [slurm.wait_state(f"{job}_{t}", {"COMPLETED", "FAILED", "CANCELLED"}, 600) for t in (0, 1)]
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("tok_*.out")))
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"], logs
    assert infos[0]["Restarts"] == "1", logs
    local, array = store_files(tmp_path / "local"), store_files(store)
    assert sorted(array) == sorted(local) and len(local) == 8  # 4 shards + 4 sidecars, no temp files left
    for name in local:
        assert array[name] == local[name], name
    tool(python, "verify", str(store))
