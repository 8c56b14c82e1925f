"""The fine-tuning showcase end to end at a toy size: data, shared init, diffusion SFT and AR SFT
through the real torchrun trainer, evaluation, the table; a rerun reuses every stage."""

from __future__ import annotations

import json

import pytest

from launch.finetune_showcase import main

pytestmark = pytest.mark.slow


def test_showcase_runs_and_caches(tmp_path, capsys):
    argv = ["--runs", str(tmp_path), "--steps", "4", "--batch", "4", "--nproc", "1"]
    argv += ["--dim", "32", "--layers", "1", "--n-train", "40", "--n-test", "8"]
    main(argv)
    out = capsys.readouterr().out
    assert "diffusion SFT" in out and "sudoku solved % (n=8)" in out
    summary = json.loads(next(tmp_path.glob("*_summary.json")).read_text())
    for kind in ("diffusion", "ar"):
        r = summary["results"][kind]
        assert r["n"] == 8 and r["metric"] == "exact_match" and 0.0 <= r["value"] <= 1.0
        assert summary["train"][kind]["steps"] == 4
    main(argv)  # cached: nothing retrained
    assert "is trained (DONE); reusing it" in capsys.readouterr().out
