"""bf16 mixed precision under FSDP2, the GPU default, run on CPU: found on an H200, where FSDP2's
forward-input casting rebuilt every block's `AttentionLayout` through `dataclasses.replace` and
failed on its cached dense mask."""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from dlm.attention.layout import AttentionLayout
from dlm.train.config import ParallelSection
from dlm.train.parallelize import mixed_precision

from .inprocess import run_pretrain


def test_bf16_mixed_precision_trains(monkeypatch, store, tmp_path):
    run_dir = tmp_path / "run"
    overrides = {"data.paths": str(store), "train.run_dir": str(run_dir), "train.steps": 3}
    overrides |= {"parallel.mixed_precision": "bf16", "checkpoint.export_at_end": False, "metrics.tensorboard": False}
    run_pretrain(monkeypatch, overrides)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_fsdp_leaves_forward_inputs_alone():
    """Blocks get bf16 activations and integer layouts: nothing to cast, and a copied layout
    would lose the per-step masks that every layer shares (the flex BlockMask, the dense mask)."""
    policy = mixed_precision(ParallelSection(mixed_precision="bf16"), torch.device("cpu"))
    assert policy.param_dtype == torch.bfloat16 and not policy.cast_forward_inputs


def test_layout_survives_dataclasses_replace():
    layout = AttentionLayout.from_position_ids(torch.tensor([[0, 1, 0, 1, 2]]))
    layout.dense_mask()
    copy = dataclasses.replace(layout, **{f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)})
    assert torch.equal(copy.dense_mask(), layout.dense_mask())
