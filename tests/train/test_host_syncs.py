"""Host syncs per training step, counted on CPU.

A GPU step should not wait for the device except on log steps. Without a GPU the waits cannot
be observed, so a dispatch mode counts the operations that would force one on CUDA: reading a
value (`item`, `bool`, `tolist`, `.cpu()`), data-dependent shapes (`nonzero`, boolean
indexing) and explicit `cuda.synchronize`. The trainer runs in-process as a world of one;
per-step counts are the difference between two run lengths, so setup and the final
checkpoint cancel out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .inprocess import run_pretrain

REPO = Path(__file__).resolve().parents[2]
OPTIM = str(Path(torch.optim.__file__).parent)
OUTSIDE = (str(REPO / "tests"), str(REPO / ".venv"))
# functions that run on the host copy of a batch, before it goes to the device
HOST_SIDE = {"host_layout"}
aten = torch.ops.aten
_VALUE_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


class SyncCounter(TorchDispatchMode):
    """Counts would-be host syncs: dispatched value reads and data-dependent shapes, plus the
    Python-level reads (`tolist`, `cpu`, `numpy`) and `torch.cuda.synchronize` (patched)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: dict[str, int] = {}

    def _hit(self, name: str) -> None:
        """Attributed to the innermost project line. Reads inside torch.optim are skipped: on
        CUDA the optimizer is fused and keeps its step counters on the device."""
        frame: FrameType | None = sys._getframe(1)
        where = None
        while frame is not None:
            file = frame.f_code.co_filename
            if file.startswith(OPTIM) or frame.f_code.co_name in HOST_SIDE:
                return
            if where is None and file.startswith(str(REPO)) and not file.startswith(OUTSIDE):
                where = f"{Path(file).relative_to(REPO)}:{frame.f_lineno}"
            frame = frame.f_back
        key = f"{name} @ {where}"
        self.count += 1
        self.ops[key] = self.ops.get(key, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _VALUE_OPS or (func in (aten.index.Tensor, aten.index_put_.default) and _bool_index(args)):
            self._hit(str(func))
        return func(*args, **(kwargs or {}))


def _count(monkeypatch, run_dir, steps: int, store) -> SyncCounter:
    counter = SyncCounter()
    with monkeypatch.context() as mp:
        for name in ("tolist", "cpu", "numpy"):
            orig = getattr(torch.Tensor, name)

            def wrapped(self, *a, _orig=orig, _name=name, **k):
                counter._hit(_name)
                return _orig(self, *a, **k)

            mp.setattr(torch.Tensor, name, wrapped)
        mp.setattr(torch.cuda, "synchronize", lambda *a, **k: counter._hit("cuda.synchronize"))
        overrides = {
            "data.paths": str(store),
            "data.seq_len": 32,
            "train.run_dir": str(run_dir),
            "train.steps": steps,
            "train.global_batch_size": 4,
            "train.micro_batch_size": 2,
            "checkpoint.interval": 0,
            "checkpoint.export_at_end": False,
            "metrics.log_every": 1000,
            "metrics.tensorboard": False,
            "diffusion.random_length_prob": 0.5,
            # the dense reference stands in for the CUDA kernels, which read only layout.max_seqlen
            "model.attn_backend": "sdpa",
        }
        with counter:
            run_pretrain(mp, overrides)
    return counter


@pytest.mark.slow  # three short training runs
def test_host_syncs_per_step(monkeypatch, store, tmp_path):
    """Two micro-batches per step; random crops on. The figure is printed for the record."""
    _count(monkeypatch, tmp_path / "warm", 1, store)  # builds the data index once
    short = _count(monkeypatch, tmp_path / "short", 2, store)
    long = _count(monkeypatch, tmp_path / "long", 4, store)
    per_step = (long.count - short.count) / 2
    ops = {k: (long.ops.get(k, 0) - short.ops.get(k, 0)) / 2 for k in long.ops | short.ops}
    ops = {k: v for k, v in ops.items() if v}
    print(f"host syncs per step (2 micro-batches): {per_step:g} {ops}")
    # left: the masked-token count of each micro-batch (boolean selection in diffusion_loss)
    assert per_step == 2 and all(k.startswith("aten.nonzero.default @ dlm/diffusion.py") for k in ops), ops
