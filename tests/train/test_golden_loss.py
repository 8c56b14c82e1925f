"""The per-step loss of launch/configs/tiny_cpu.toml against a recorded trajectory, so that any
change to what training computes (objective, noise draws, data order, init, optimizer,
schedule) is seen, not just changes that break a test's assertion.

Tolerance: relative 1e-4 per step. On one machine the trajectory is bit-identical run to run;
the slack only absorbs float differences between CPUs and torch builds (vectorisation, BLAS
blocking), which stay around 1e-6 relative over these 8 steps. A real change moves the loss by
1e-3 or more within a step or two. After an intended change, regenerate the file with

    DLM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/train/test_golden_loss.py

and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .inprocess import run_pretrain

GOLDEN = Path(__file__).parent / "golden" / "tiny_cpu_loss.json"
RTOL = 1e-4
STEPS = 8


@pytest.mark.slow  # eight training steps and a checkpoint (~30 CPU-seconds)
def test_tiny_cpu_loss_trajectory(monkeypatch, store, tmp_path):
    run_dir = tmp_path / "run"
    # the config as shipped; only the data, the run folder, the length and the outputs change
    run_pretrain(
        monkeypatch,
        {
            "data.paths": str(store),
            "train.run_dir": str(run_dir),
            "train.steps": STEPS,
            "checkpoint.export_at_end": False,
            "metrics.tensorboard": False,
        },
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = {str(r["step"]): r["loss"] for r in records}
    if os.environ.get("DLM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"config": "launch/configs/tiny_cpu.toml", "loss": got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["loss"]
    assert list(got) == list(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= RTOL * abs(loss), f"step {step}: loss {got[step]!r}, recorded {loss!r}"
