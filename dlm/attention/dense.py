"""Reference backend: SDPA with an explicit [B, 1, L, L] boolean mask. Runs anywhere, any mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm.attention.layout import AttentionLayout


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, Hkv, L, D] -> [B, H, L, D]."""
    mask = layout.dense_mask()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


ARBITRARY_MASK = True
HALF_PRECISION_ONLY = False


def available(device: torch.device) -> str | None:
    return None


attention = sdpa_attention
