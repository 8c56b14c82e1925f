"""bench/gpu_check.py --dry-run runs the whole GPU check at tiny sizes on CPU, so it cannot rot."""

import json

import pytest

from tests.helpers import run_bench


@pytest.mark.slow  # a subprocess
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_bench("gpu_check.py", "--dry-run", "--json", str(out))  # sets TRITON_INTERPRET itself
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.rstrip().splitlines()
    verdict = max(i for i, line in enumerate(lines) if line.startswith("gpu_check passed"))
    assert lines[verdict + 1].startswith("section")  # the table is printed last
    assert len(lines) - verdict - 2 == len(json.loads(out.read_text())["checks"])
    checks = json.loads(out.read_text())["checks"]
    status = {k: v["status"] for k, v in checks.items()}
    for key in (
        "a/masked CE triton float32",
        "a/masked CE torch bfloat16",
        "a/masking Philox bit-exact",
        "a/attention sdpa float32 fwd+bwd",
    ):
        assert status[key] == "ok", (key, checks[key])
    assert status["a/attention varlen"] == "skip" and status["a/attention flash"] == "skip"
    assert any(k.startswith("b/CE fused auto") and v == "ok" for k, v in status.items())
    trained = [v for k, v in checks.items() if k.startswith("d/") and v["status"] == "ok"]
    assert len(trained) == 2 and all(v["tokens_per_s"] > 0 for v in trained)
