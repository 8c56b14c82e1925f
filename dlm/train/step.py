"""One optimizer step, and the objective it trains, apart from the loop around it.

    objective = DiffusionObjective(diffusion_cfg, global_batch_size)
    micro = [objective.to_device(mb, device) for mb in host_micro_batches]   # host work + copies
    stats = train_step(model, optimizer, scheduler, objective, micro, step, grad_clip)
    ...
    records = read_stats(pending, world_size)   # log steps only: the one read-back

`train_step` reads nothing back to the host: the loss normalizer is all-reduced on the device,
and the returned `StepStats` are device tensors, finiteness included. The loop reads them on log
and checkpoint steps (`read_stats`), which raises on a non-finite step naming it and the ranks;
no checkpoint is written after such a step. A fine-tuning stage passes its own `Objective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from dlm.diffusion import DiffusionConfig, diffusion_loss, host_layout, noise_batch
from dlm.train.parallelize import clip_grad_norm_

__all__ = ["DiffusionObjective", "Objective", "StepStats", "read_stats", "train_step"]


class Objective(Protocol):
    """What a training stage plugs into `train_step`."""

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """Host-side work on a micro-batch from the loader, then its copy to the device."""
        ...

    def prepare(self, batch: dict[str, Any], step: int) -> Any:
        """Device-side work before the forward pass (noising, for diffusion)."""
        ...

    def counts(self, prepared: Any) -> torch.Tensor:
        """[2] float64 on the device: this micro-batch's share of the loss normalizer, and of
        the tokens the logged per-token statistic is averaged over."""
        ...

    def loss(
        self, model: nn.Module, prepared: Any, normalizer: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, detached sum of the logged statistic in nats)."""
        ...


class DiffusionObjective:
    """The masked-diffusion objective (dlm.diffusion); the statistic is the ELBO over eligible tokens."""

    def __init__(self, cfg: DiffusionConfig, global_batch_size: int):
        self.cfg, self.global_batch_size = cfg, global_batch_size

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        layout = host_layout(batch, self.cfg)
        out["cu_seqlens"] = layout["cu_seqlens"].to(device, non_blocking=True)
        out["max_seqlen"] = layout["max_seqlen"]
        return out

    def prepare(self, batch: dict[str, Any], step: int) -> Any:
        return noise_batch(batch, step, self.cfg, self.global_batch_size)

    def counts(self, prepared: Any) -> torch.Tensor:
        return torch.stack([prepared.norm_count, prepared.n_eligible]).double()

    def loss(
        self, model: nn.Module, prepared: Any, normalizer: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = diffusion_loss(model, prepared, normalizer, step=step)
        return out.loss, out.elbo_sum


@dataclass
class StepStats:
    """One step's numbers as float64 device tensors (nothing read back yet)."""

    loss: torch.Tensor  # this rank's share of the global loss; the ranks' shares sum to it
    stat_sum: torch.Tensor  # this rank's sum of the logged statistic (nats)
    counts: torch.Tensor  # [2] global: normalizer, tokens of the statistic
    grad_norm: torch.Tensor  # global, before clipping
    lr: float


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    objective: Objective,
    micro_batches: list[dict[str, Any]],
    step: int,
    grad_clip: float,
) -> StepStats:
    """Forward/backward over this rank's micro-batches (already on the device), clip, update.
    `step` is the number of steps done before this one."""
    model.train()
    prepared = [objective.prepare(mb, step) for mb in micro_batches]
    # normalizer: over the whole global batch (all micro-batches of all ranks)
    counts = torch.stack([objective.counts(p) for p in prepared]).sum(0)
    dist.all_reduce(counts)
    normalizer = counts[0].float()
    loss_sum = torch.zeros((), dtype=torch.float64, device=counts.device)
    stat_sum = torch.zeros((), dtype=torch.float64, device=counts.device)
    for j, p in enumerate(prepared):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(j == len(prepared) - 1)  # reduce-scatter once per step
        loss, stat = objective.loss(model, p, normalizer, step)
        loss.backward()
        loss_sum += loss.detach().double()
        stat_sum += stat.double()
    grad_norm = clip_grad_norm_(model, grad_clip)
    lr = float(scheduler.get_last_lr()[0])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_sum, stat_sum, counts, grad_norm.double(), lr)


def read_stats(pending: list[tuple[int, StepStats]], world_size: int, rank: int) -> list[dict[str, float]]:
    """The buffered steps' global numbers, in one all_gather and one read-back.

    Raises FloatingPointError at the first non-finite step, naming the ranks whose loss went
    non-finite (every rank raises, so the run stops everywhere)."""
    if not pending:
        return []
    mine = torch.stack([torch.stack([s.loss, s.stat_sum, s.grad_norm, s.counts[1]]) for _, s in pending])
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    table = torch.stack(every).tolist()  # [ranks][steps][loss, stat, grad norm, tokens]
    out = []
    for i, (step, s) in enumerate(pending):
        rows = [table[r][i] for r in range(world_size)]
        bad = [r for r, row in enumerate(rows) if not (math.isfinite(row[0]) and math.isfinite(row[1]))]
        if bad:
            raise FloatingPointError(f"non-finite loss at step {step} on rank(s) {bad} (this is rank {rank})")
        grad_norm = rows[0][2]
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {step} (rank {rank})")
        out.append(
            {
                "loss": sum(row[0] for row in rows),
                "elbo": sum(row[1] for row in rows) / max(rows[0][3], 1.0),
                "lr": s.lr,
                "grad_norm": grad_norm,
            }
        )
    return out
