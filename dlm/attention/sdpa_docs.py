"""SDPA run once per document, never with a mask: document (+causal) attention in O(L) memory.

Given a mask, or none, CPU SDPA uses its fused flash kernel with a backward; what a dense mask
costs is the [B, 1, L, L] mask itself and its float copy, which the kernel keeps for backward in
every layer. Here there is none: one document per row is a single unmasked (or `is_causal`) SDPA
call over the whole batch; packed rows are flattened to tokens like the varlen kernels'
input, and each document of `layout.cu_seqlens` is its own unmasked SDPA call. Any device,
any dtype; the annealing mask needs the dense reference (`sdpa`) or FlexAttention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm.attention.layout import AttentionLayout
from dlm.attention.varlen import run_packed

ARBITRARY_MASK = False
HALF_PRECISION_ONLY = False


def available(device: torch.device) -> str | None:
    return None


def per_document(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int, causal: bool
) -> torch.Tensor:
    """Varlen attention as a loop of SDPA calls: q [T, H, D], k/v [T, Hkv, D], documents [cu[i], cu[i+1])."""
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to {q.shape[0]} tokens, got {bounds}")
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:  # zero-length padding segments hold no tokens
            qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, Hkv, L, D] -> [B, H, L, D]."""
    if layout.needs_dense_mask:
        raise ValueError("attention backend 'sdpa_docs' cannot apply the annealing mask (documents and causal only)")
    B, H, L, _ = q.shape
    if tuple(layout.doc_ids.shape) == (B, L) and bool((layout.doc_ids[:, -1] == 0).all()):  # one document per row
        return F.scaled_dot_product_attention(q, k, v, is_causal=layout.causal, enable_gqa=k.shape[1] != H)
    return run_packed(per_document, q, k, v, layout, "sdpa_docs")
