"""bench/gpu_train_e2e.py --dry-run: the GPU end-to-end check on CPU, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # three torchrun / generate subprocesses
def test_gpu_train_e2e_dry_run(tmp_path):
    out = tmp_path / "e2e.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_train_e2e.py", "--dry-run", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = json.loads(out.read_text())["checks"]
    assert [v["status"] for v in checks.values()] == ["ok", "ok", "ok", "skip"], checks
    resumed = checks["run B: resume from A's step-N checkpoint"]
    assert resumed["bitwise"] and resumed["max_rel_diff"] == 0.0  # on CPU every step repeats exactly
    assert "gpu_train_e2e passed" in proc.stdout
