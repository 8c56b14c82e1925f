"""PyTorch's varlen attention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10, CUDA).

Packed documents never attend across boundaries and no [L, L] mask is ever built: the batch
is flattened to [B*L, H, D] tokens and `layout.cu_seqlens` marks the documents. Document (+causal)
masks only; the annealing mask needs FlexAttention or the dense reference.

The pack/unpack helpers here are shared with the flash-attn backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from dlm.attention.layout import AttentionLayout

ARBITRARY_MASK = False
HALF_PRECISION_ONLY = True  # fp16/bf16 kernels

# varlen_fn(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens int32 [S+1], max_seqlen, causal) -> [T, H, D]
VarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool], torch.Tensor]


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B*L, H, D] (token-major, the order of layout.cu_seqlens)."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B * L, H, D)


def unpack(x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[B*L, H, D] -> [B, H, L, D] (a view)."""
    _, H, D = x.shape
    return x.view(batch, length, H, D).transpose(1, 2)


def run_packed(varlen_fn: VarlenFn, q, k, v, layout: AttentionLayout, backend: str) -> torch.Tensor:
    """Run a varlen kernel on [B, H, L, D] inputs; checks what the kernels cannot serve."""
    if layout.needs_dense_mask:
        raise ValueError(f"attention backend {backend!r} cannot apply the annealing mask (documents and causal only)")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, L, D) or v.shape != k.shape or H % Hkv:
        raise ValueError(
            f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)}: expected [B,H,L,D] and [B,Hkv,L,D] with Hkv | H"
        )
    cu = layout.cu_seqlens.to(device=q.device, dtype=torch.int32)
    if int(layout.position_ids.numel()) != B * L:
        raise ValueError(f"layout covers {layout.position_ids.shape} tokens but q is [B={B}, L={L}]")
    # any upper bound on the longest document is valid for the kernels; a power of two (<= L)
    # leaves compiled blocks only a few distinct values to specialise on
    max_seqlen = min(L, 1 << max(0, int(layout.max_seqlen) - 1).bit_length())
    out = varlen_fn(pack(q), pack(k), pack(v), cu, max_seqlen, bool(layout.causal))
    return unpack(out, B, L)


def check_half_precision(q: torch.Tensor, backend: str) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"attention backend {backend!r} needs fp16/bf16 q/k/v, got {q.dtype}; use 'flex' or 'sdpa' for fp32"
        )


def ampere_cuda_problem(device: torch.device, name: str) -> str | None:
    """Why `name`'s flash kernels cannot run on `device` (not CUDA, or older than compute
    capability 8.0), or None."""
    if device.type != "cuda":
        return f"{name} runs on CUDA only (device is {device.type})"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{name} needs compute capability >= 8.0, device has {major}.x"
    return None


def adapt(varlen_attn: Callable) -> VarlenFn:
    """Wrap torch's varlen_attn, whose keywords changed across releases: causality is
    `window_size=(-1, 0)` from torch 2.11 (`is_causal=True` in 2.10), and GQA needs
    `enable_gqa` (absent in older releases: kv heads are expanded instead, head j serving query
    heads j*g .. j*g+g-1 as in SDPA). Inspected once, so compiled code sees a plain call."""
    params = inspect.signature(varlen_attn).parameters
    has_window, has_gqa = "window_size" in params, "enable_gqa" in params
    if not has_window and "is_causal" not in params:
        raise RuntimeError(f"unrecognised varlen_attn signature {inspect.signature(varlen_attn)}")

    def call(q, k, v, cu, max_seqlen: int, causal: bool) -> torch.Tensor:
        kwargs: dict[str, object] = {}
        if has_window:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        elif causal:
            kwargs["is_causal"] = True
        if k.shape[1] != q.shape[1]:
            if has_gqa:
                kwargs["enable_gqa"] = True
            else:
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)

    return call


try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:
    _TORCH_VARLEN: VarlenFn | None = None
else:
    _TORCH_VARLEN = adapt(_varlen_attn)


def available(device: torch.device) -> str | None:
    if problem := ampere_cuda_problem(device, "PyTorch varlen attention"):
        return problem
    if _TORCH_VARLEN is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    check_half_precision(q, "varlen")
    if _TORCH_VARLEN is None:
        raise RuntimeError(available(q.device) or "PyTorch varlen attention is unavailable")
    return run_packed(_TORCH_VARLEN, q, k, v, layout, "varlen")
