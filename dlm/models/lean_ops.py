"""Block operations whose backward saves less than autograd's would (Liger-Kernel's idea, in
plain PyTorch): what they drop is recomputed in backward by a few elementwise ops, cheap next to
the matmuls. The forward pass computes exactly what the plain expressions in `dlm.models.llama`
compute (Hugging Face's order of operations), so logits are unchanged; the gradients match
autograd's to rounding. Per token and layer this drops the RMSNorm's fp32 copies and normalised
output, the SwiGLU gate activation and the down projection's input: 0.62x of a SmolLM2 block's
saved activations in fp32, 0.56x in bf16; in GPT-2 the MLP's GELU output: 0.75x of a block's.
(RoPE needs nothing of the kind: with cos/sin not requiring gradients, autograd already saves
only them; LayerNorm's native backward already keeps only its input and statistics.)

Each function has its autograd reference beside it (`*_reference`), which the tests compare it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx


# ---- RMSNorm: saves the input and the [..., 1] inverse RMS, not the normalised copy --------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in fp32, cast back before the gain: the order HF uses, so bf16 matches too."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd  # the normalised input, recomputed
        gn = (grad * weight).to(x.dtype).float()  # through the gain and the cast back, as autograd rounds
        gx = rstd * (gn - n * (gn * n).mean(-1, keepdim=True))
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (grad * n.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        return gx.to(x.dtype), gw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


# ---- SwiGLU down projection: saves the two up projections, not silu(a) nor silu(a) * b ------------
def swiglu_down_reference(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(a) * b, w)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, w)
        return F.linear(F.silu(a) * b, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, b, w = ctx.saved_tensors
        s = F.silu(a)
        gp = grad.matmul(w)
        gw = None
        if ctx.needs_input_grad[2]:
            gw = grad.flatten(0, -2).t().mm((s * b).flatten(0, -2))
        ga = torch.ops.aten.silu_backward(gp * b, a)
        return ga, gp * s, gw


def swiglu_down(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w2(silu(a) * b) for a bias-free down projection with weight `w` [dim, hidden]."""
    return _SwiGLUDown.apply(a, b, w)


# ---- GELU down projection (GPT-2): saves the up projection, not its GELU -------------------------
def gelu_down_reference(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(F.gelu(a, approximate="tanh"), w, bias)


class _GELUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(a, w)
        return F.linear(F.gelu(a, approximate="tanh"), w, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, w = ctx.saved_tensors
        flat = grad.flatten(0, -2)
        gw = flat.t().mm(F.gelu(a, approximate="tanh").flatten(0, -2)) if ctx.needs_input_grad[1] else None
        gb = flat.sum(0) if ctx.needs_input_grad[2] else None
        ga = torch.ops.aten.gelu_backward(grad.matmul(w), a, approximate="tanh")
        return ga, gw, gb


def gelu_down(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """proj(gelu_tanh(a)) for a down projection with weight `w` [dim, hidden] and `bias`."""
    return _GELUDown.apply(a, w, bias)
