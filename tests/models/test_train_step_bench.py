"""bench/train_step.py end to end at a tiny shape: both steps run in their own processes, in
the same invocation, and the ratios printed are computed from what they measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_step_bench_tiny(tmp_path):
    out = tmp_path / "train_step.json"
    proc = subprocess.run(
        [sys.executable, "bench/train_step.py", "--preset", "tiny-llama", "--batch", "2", "--seq-len", "32"]
        + ["--reps", "2", "--steps", "1", "--docs-per-row", "3", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs, summary = result["runs"], result["summary"]
    assert [len(runs["dlm"]), len(runs["seed"])] == [2, 2]
    ratios = sorted(d["peak_mib"] / s["peak_mib"] for d, s in zip(runs["dlm"], runs["seed"]))
    assert summary["peak_memory_ratio"] == pytest.approx(sum(ratios) / 2)  # median of two
    assert all(r["first_loss"] > 0 and r["tokens_per_s"] > 0 for impl in runs.values() for r in impl)
    assert "dlm / seed-style: tokens/s" in proc.stdout
