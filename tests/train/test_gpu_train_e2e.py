"""bench/gpu_train_e2e.py --dry-run: the GPU end-to-end check on CPU, so it cannot rot."""

import json

import pytest

from tests.helpers import run_bench


@pytest.mark.slow  # three torchrun / generate subprocesses
def test_gpu_train_e2e_dry_run(tmp_path):
    out = tmp_path / "e2e.json"
    proc = run_bench("gpu_train_e2e.py", "--dry-run", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = json.loads(out.read_text())["checks"]
    assert [v["status"] for v in checks.values()] == ["ok", "ok", "ok", "skip"], checks
    resumed = checks["run B: resume from A's step-N checkpoint"]
    assert resumed["bitwise"] and resumed["max_rel_diff"] == 0.0  # on CPU every step repeats exactly
    assert "gpu_train_e2e passed" in proc.stdout
