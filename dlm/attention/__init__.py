"""One attention interface over several backends (docs/design.md §8).

    out = attend(q, k, v, layout, backend="auto")   # q [B, H, L, D], k/v [B, Hkv, L, D]

Each backend module `dlm.attention.<name>` defines:
    available(device: torch.device) -> str | None   # None when usable, else why not
    ARBITRARY_MASK: bool                              # can it honour an annealing mask?
    HALF_PRECISION_ONLY: bool                         # fp16/bf16 inputs only?
    attention(q, k, v, layout) -> Tensor              # [B, H, L, D]
"""

from __future__ import annotations

import importlib
import logging
from functools import cache
from types import ModuleType

import torch

from dlm.attention.layout import AnnealMask, AttentionLayout

BACKENDS = ("flash", "varlen", "flex", "sdpa_docs", "sdpa")
# preference order of "auto"; on CPU, SDPA per document (no dense mask) unless annealing needs one
_CUDA_ORDER = ("flash", "varlen", "flex", "sdpa")
_CPU_ORDER = ("sdpa_docs", "sdpa")
_MODULES = {
    "flash": "dlm.attention.flash",
    "varlen": "dlm.attention.varlen",
    "flex": "dlm.attention.flex",
    "sdpa_docs": "dlm.attention.sdpa_docs",
    "sdpa": "dlm.attention.dense",
}

__all__ = ["BACKENDS", "AnnealMask", "AttentionLayout", "BackendUnavailable", "attend", "resolve_backend"]

logger = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    pass


@cache
def _module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS} or 'auto'")
    return importlib.import_module(_MODULES[name])


def _why_not(name: str, device: torch.device, arbitrary_mask: bool, half: bool) -> str | None:
    mod = _module(name)
    reason = mod.available(device)
    if reason is None and arbitrary_mask and not mod.ARBITRARY_MASK:
        reason = "it only supports document masks, not the causal->bidirectional annealing mask"
    if reason is None and not half and mod.HALF_PRECISION_ONLY:
        reason = "it needs fp16/bf16 inputs, these are fp32"
    return reason


@cache
def resolve_backend(name: str, device_type: str, arbitrary_mask: bool, half: bool = True) -> str:
    """The concrete backend for a request (`half`: fp16/bf16 inputs); a clear error when it
    cannot serve it."""
    device = torch.device(device_type)
    mask = "annealing mask" if arbitrary_mask else "document mask"
    if name != "auto":
        reason = _why_not(name, device, arbitrary_mask, half)
        if reason is not None:
            raise BackendUnavailable(f"attention backend {name!r} cannot be used on {device_type}: {reason}")
        logger.info("attention backend: %s (requested, %s, %s)", name, device_type, mask)
        return name
    order = _CUDA_ORDER if device_type == "cuda" else _CPU_ORDER
    skipped: list[str] = []
    for candidate in order:
        reason = _why_not(candidate, device, arbitrary_mask, half)
        if reason is None:
            # resolve_backend is cached, so this is logged once per (request, device, mask kind)
            logger.info(
                "attention backend: %s (auto, %s, %s)%s",
                candidate,
                device_type,
                mask,
                "; skipped " + "; ".join(skipped) if skipped else "",
            )
            return candidate
        skipped.append(f"{candidate}: {reason}")
    raise BackendUnavailable(f"no attention backend is usable on {device_type}: " + "; ".join(skipped))


# (request, device type, arbitrary mask, half precision) -> backend module; a plain dict, which
# torch.compile traces as a guarded constant (an lru_cache call would break the graph)
_RESOLVED: dict[tuple[str, str, bool, bool], ModuleType] = {}


@torch.compiler.disable  # once per key: not traced (Dynamo warns about the caches inside)
def _resolve(key: tuple[str, str, bool, bool]) -> None:
    _RESOLVED[key] = _module(resolve_backend(*key))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, backend: str = "auto"
) -> torch.Tensor:
    key = (backend, q.device.type, layout.needs_dense_mask, q.dtype in (torch.float16, torch.bfloat16))
    if key not in _RESOLVED:
        _resolve(key)
    return _RESOLVED[key].attention(q, k, v, layout)
