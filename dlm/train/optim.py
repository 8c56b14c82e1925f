"""AdamW and the learning-rate schedule (linear warmup, then cosine / constant / linear decay)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dlm.train.config import OptimSection


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed, as in
    nanoGPT). Fused on CUDA: one kernel for all parameters instead of a loop of small ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=on_cuda or None)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimSection, step: int, total_steps: int) -> None:
    """After restoring an optimizer state (which carries the old run's hyperparameters), make the
    config the source of truth again, so e.g. `--optim.lr` on a resumed run takes effect at once."""
    decay_group, no_decay_group = optimizer.param_groups
    for group, wd in ((decay_group, cfg.weight_decay), (no_decay_group, 0.0)):
        group.update(
            lr=cfg.lr * lr_factor(step, cfg, total_steps),
            initial_lr=cfg.lr,
            betas=(cfg.betas[0], cfg.betas[1]),
            eps=cfg.eps,
            weight_decay=wd,
        )


def lr_factor(step: int, cfg: OptimSection, total_steps: int) -> float:
    """Multiplier of cfg.lr for the update made at 0-based optimizer step `step`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "linear":
        shape = 1.0 - progress
    elif cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown optim.decay {cfg.decay!r}")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
