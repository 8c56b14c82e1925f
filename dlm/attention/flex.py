"""FlexAttention backend: document mask (+ causal, + annealing) as a mask_mod over a block mask.

Compiled on CUDA (the fused kernel skips fully masked blocks), eager on CPU (a math reference
that materialises scores, forward only: torch has no CPU backward for it). Honours any mask `AttentionLayout.allowed` describes.
The block mask is built once per layout and reused by every layer (and by recomputation).
"""

from __future__ import annotations

import warnings
import weakref
from functools import cache

import torch

from dlm.attention.layout import AttentionLayout, future_open

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError as e:  # torch < 2.5
    _IMPORT_ERROR: str | None = f"torch {torch.__version__} has no FlexAttention ({e})"
else:
    _IMPORT_ERROR = None

ARBITRARY_MASK = True
HALF_PRECISION_ONLY = False


def available(device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type not in ("cuda", "cpu"):
        return f"FlexAttention is only wired up for cuda (compiled) and cpu (eager), not {device.type}"
    return None


def mask_mod(layout: AttentionLayout):
    """`layout.allowed` as a traceable mask_mod. The annealing key and threshold are captured as
    0-d tensors (not Python ints) so a new step does not recompile the kernel."""
    doc = layout.doc_ids
    if layout.causal:
        return lambda b, h, q, k: (doc[b, q] == doc[b, k]) & (k <= q)
    if layout.anneal is None:
        return lambda b, h, q, k: doc[b, q] == doc[b, k]
    key = torch.tensor(layout.anneal.key, dtype=torch.int64, device=doc.device)
    threshold = torch.tensor(layout.anneal.threshold, dtype=torch.int64, device=doc.device)

    def annealed(b, h, q, k):
        return (doc[b, q] == doc[b, k]) & ((k <= q) | future_open(q, k, key, threshold))

    return annealed


_cache: tuple[weakref.ref, BlockMask] | None = None


def block_mask(layout: AttentionLayout) -> BlockMask:
    """The layout's BlockMask, cached for the most recent layout (all layers of a step share it)."""
    global _cache
    if _cache is not None and _cache[0]() is layout:
        return _cache[1]
    B, L = layout.doc_ids.shape
    dev = layout.doc_ids.device
    bm = create_block_mask(mask_mod(layout), B, None, L, L, device=dev, _compile=dev.type == "cuda")
    _cache = (weakref.ref(layout), bm)
    return bm


def _eager_flex_attention(*args, **kwargs) -> torch.Tensor:
    # eager use on CPU is deliberate; torch warns that it is not compiled
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


@cache
def _kernel(device_type: str):
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else _eager_flex_attention


def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, Hkv, L, D] -> [B, H, L, D]."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            f"FlexAttention has no CPU backward in torch {torch.__version__}; train on CPU with attn_backend='sdpa' (or 'auto')"
        )
    return _kernel(q.device.type)(q, k, v, block_mask=block_mask(layout), enable_gqa=k.shape[1] != q.shape[1])


attention = flex_attention_backend
