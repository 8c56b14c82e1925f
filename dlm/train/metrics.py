"""Per-step training metrics: TensorBoard and JSON lines in the run folder, a console line
every `log_every` steps. Only rank 0 writes; the values it writes are already global."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import torch

from dlm.atomic import atomic_write_text

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, no sparsity).
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,  # SXM; the PCIe card is listed separately
    "H100 PCIe": 756.0,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "MI300X": 1307.4,
}


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table entry whose name
    appears in the CUDA device name (longest match wins), else None (MFU reported as n/a)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in PEAK_TFLOPS if k.lower() in name.lower()]
    if not matches:
        logger.warning("no peak FLOP/s known for %r; set metrics.peak_tflops to report MFU", name)
        return None
    return PEAK_TFLOPS[max(matches, key=len)] * 1e12


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past `last_step` (written by a run that was killed before its next
    checkpoint) so the file describes exactly one history."""
    if not path.exists():
        return
    kept = []
    with open(path) as f:
        for line in f:
            if line.strip() and json.loads(line)["step"] <= last_step:
                kept.append(line)
    atomic_write_text(path, "".join(kept))


class MetricsLogger:
    def __init__(self, run_dir: Path, rank: int, start_step: int, log_every: int, tensorboard: bool):
        self.rank = rank
        self.log_every = log_every
        self.writer = None
        self.jsonl = None
        if rank != 0:
            return
        path = run_dir / "metrics.jsonl"
        _truncate_jsonl(path, start_step)
        self.jsonl = open(path, "a")  # noqa: SIM115 (closed by close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events past the resumed step left by a killed run
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, float | None]) -> None:
        """`values` are global; None means not available (e.g. MFU on CPU)."""
        if self.jsonl is None:  # not rank 0
            return
        record = {"step": step, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step)
        if step % self.log_every == 0 or step == 1:
            logger.info(format_line(step, values))

    def text(self, step: int, tag: str, text: str) -> None:
        if self.rank == 0 and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def format_line(step: int, v: dict) -> str:
    mfu = "n/a" if v.get("mfu") is None else f"{100 * v['mfu']:.1f}%"
    return (
        f"step {step} | loss {v['loss']:.4f} | elbo {v['elbo']:.4f} | lr {v['lr']:.2e} | "
        f"grad {v['grad_norm']:.3f} | {v['tokens_per_s_per_device']:.0f} tok/s/dev | mfu {mfu} | "
        f"step {v['step_time_s']:.3f}s (data {v['data_wait_s']:.3f}s) | mem {v['peak_memory_gib']:.2f} GiB"
    )
