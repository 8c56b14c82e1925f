"""flash-attn's `flash_attn_varlen_func` (CUDA, package installed): the fastest document-masked
attention. Document (+causal) masks only; GQA is native (kv head j serves query heads
j*g .. j*g+g-1, as in SDPA)."""

from __future__ import annotations

import torch

from dlm.attention.layout import AttentionLayout
from dlm.attention.varlen import ampere_cuda_problem, check_half_precision, run_packed

ARBITRARY_MASK = False
HALF_PRECISION_ONLY = True  # fp16/bf16 kernels


def _flash_varlen(q, k, v, cu, max_seqlen: int, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0, causal=causal)


def available(device: torch.device) -> str | None:
    if problem := ampere_cuda_problem(device, "flash-attn 2"):
        return problem
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        return f"the flash-attn package is not installed ({e})"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    check_half_precision(q, "flash")
    return run_packed(_flash_varlen, q, k, v, layout, "flash")
