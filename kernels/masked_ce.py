"""Weighted cross-entropy over (masked) rows, fused with the output projection (docs/design.md §7).

    loss = masked_cross_entropy(hidden [N, D], weight [V, D], targets [N], row_weights [N])
         = sum_i row_weights[i] * (lse_i - logit_i[target_i]),  fp32 scalar

where logit_i = hidden[i] @ weight.T and lse_i = logsumexp(logit_i). Zero-weight rows are
ignored entirely and their targets may hold anything, e.g. -100.

Why fused: a full [N, V] fp32 logits tensor (plus its softmax and gradient) is the biggest
allocation of a training step. Here rows go through in chunks sized by a memory budget; each
chunk's logits are turned *in place* into the gradient w * dloss/dlogits while the loss is
computed (PyTorch row math, or a Triton row kernel on CUDA), then dh = G @ W and dW += G^T @ h
(an fp32 accumulator). The gradient is therefore produced in the forward pass; backward only
scales it by grad_output. Full-vocabulary logits for the whole batch never exist.

impl: "auto" (Triton on CUDA, chunked PyTorch elsewhere), "triton", "torch", or "naive" (plain
autograd through full logits: the reference every fast path is tested against).
"""

from __future__ import annotations

import os

import torch

from dlm.debug import debug_checks

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the "torch" and "naive" paths still work
    triton = None

IMPLS = ("auto", "triton", "torch", "naive")
DEFAULT_MEMORY_BUDGET = 128 * 2**20  # bytes of chunk logits; >= 1k rows at V = 32k fp32, 2k in bf16

__all__ = ["DEFAULT_MEMORY_BUDGET", "IMPLS", "chunk_rows_for", "masked_cross_entropy", "naive_cross_entropy"]


def masked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    impl: str = "auto",
    chunk_rows: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """Sum of weighted per-row cross-entropies as an fp32 scalar; differentiable wrt hidden and
    weight (a tied embedding table gets this gradient added to its embedding gradient)."""
    _check_inputs(hidden, weight, targets, row_weights)
    if impl not in IMPLS:
        raise ValueError(f"unknown masked_cross_entropy impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and triton is not None else "torch"
    row_weights = row_weights.to(torch.float32)
    # zero-weight rows are ignored: give them a valid dummy target
    targets = torch.where(row_weights != 0, targets, torch.zeros_like(targets))
    if impl == "naive":
        return naive_cross_entropy(hidden, weight, targets, row_weights)
    if impl == "triton":
        _check_triton(hidden)
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(weight.shape[0], hidden.dtype, memory_budget_bytes)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _FusedLinearCE.apply(hidden, weight, targets, row_weights, impl, int(chunk_rows))


def chunk_rows_for(vocab_size: int, dtype: torch.dtype, memory_budget_bytes: int) -> int:
    """Rows per chunk so that one chunk of logits (stored in `dtype`) fits the budget."""
    row_bytes = vocab_size * dtype.itemsize
    return max(1, memory_budget_bytes // row_bytes)


def naive_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """Reference: full [N, V] fp32 logits through plain autograd."""
    logits = (hidden @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    per_row = lse - target_logit
    return (row_weights.float() * per_row).sum()


def _check_inputs(hidden, weight, targets, row_weights) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    n = hidden.shape[0]
    if targets.shape != (n,) or row_weights.shape != (n,):
        raise ValueError(
            f"targets and row_weights must be [{n}], got {tuple(targets.shape)} and {tuple(row_weights.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if not row_weights.is_floating_point():
        raise ValueError(f"row_weights must be floating point, got {row_weights.dtype}")
    if row_weights.requires_grad:
        raise ValueError("row_weights are constants of the loss; pass row_weights.detach()")
    devices = {hidden.device, weight.device, targets.device, row_weights.device}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if debug_checks():
        _check_targets(targets, row_weights, weight.shape[0])


def _check_targets(targets: torch.Tensor, row_weights: torch.Tensor, vocab_size: int) -> None:
    """Target ids of weighted rows lie in the vocabulary. Reads a value back (one host sync per
    call, every micro-batch), hence debug mode only; an out-of-range id otherwise reads out of
    bounds in the Triton kernel or raises an indexing error in the PyTorch paths."""
    bad = (row_weights != 0) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5]
        raise ValueError(
            f"targets of weighted rows must lie in [0, {vocab_size}), got values "
            f"{targets[rows].tolist()} at rows {rows.tolist()}"
        )


def _check_triton(hidden: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("masked_cross_entropy impl='triton' needs the triton package, which is not installed")
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("masked_cross_entropy impl='triton' runs on CUDA tensors (or CPU with TRITON_INTERPRET=1)")


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, impl, chunk_rows):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # False under no_grad
        loss, dh, dw = _fused_forward(hidden, weight, targets, row_weights, impl, chunk_rows, want_dh, want_dw)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = dh * grad_out.to(dh.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (dw * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def _fused_forward(hidden, weight, targets, row_weights, impl, chunk_rows, want_dh, want_dw):
    """Loss and, when wanted, the gradients dh [N, D] (hidden dtype) and dW [V, D] (fp32)."""
    n = hidden.shape[0]
    want_grad = want_dh or want_dw
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if want_dh else hidden.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else weight.new_empty(0)
    row_fn = _rows_triton if impl == "triton" else _rows_torch
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        h = hidden[start:end]
        logits = h @ weight.t()  # [c, V] in the compute dtype; becomes the gradient in place
        loss += row_fn(logits, targets[start:end], row_weights[start:end], want_grad)
        if want_dh:
            torch.mm(logits, weight, out=dh[start:end])
        if want_dw:
            _accumulate_mm(dw, logits.t(), h)
        del logits
    return loss, dh, dw


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 accumulation whatever the dtype of a and b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:  # CPU low precision: upcast (CPU has no mixed-dtype mm)
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _rows_torch(logits, targets, row_weights, want_grad) -> torch.Tensor:
    """Summed weighted loss of a chunk; with want_grad, logits become w * dloss/dlogits in place."""
    x = logits if logits.dtype == torch.float32 else logits.float()
    rows = torch.arange(x.shape[0], device=x.device)
    target_logit = x[rows, targets]
    m = x.amax(dim=1, keepdim=True)
    x.sub_(m).exp_()  # in place: no second [c, V] buffer
    s = x.sum(dim=1, keepdim=True)
    lse = (m + s.log()).squeeze(1)
    loss = (row_weights * (lse - target_logit)).sum()
    if want_grad:
        # d/dlogit of w*(lse - x_t) = w*softmax - w*onehot
        x.mul_(row_weights[:, None] / s)
        x[rows, targets] -= row_weights
        if x is not logits:
            logits.copy_(x)
    return loss


def _rows_triton(logits, targets, row_weights, want_grad) -> torch.Tensor:
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        block = min(4096, triton.next_power_of_2(v))
        _ce_rows_kernel[(c,)](
            logits,
            logits.stride(0),
            targets,
            row_weights,
            loss,
            v,
            WRITE_GRAD=want_grad,
            BLOCK_V=block,
            num_warps=8 if block >= 2048 else 4,
        )
    return loss.sum()


if triton is not None:

    @triton.jit
    def _ce_rows_kernel(
        logits_ptr,
        stride,
        targets_ptr,
        weights_ptr,
        loss_ptr,
        V,
        WRITE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: online log-sum-exp (pass 1), then the gradient in place (pass 2).
        Loads are cast to fp32 so the math is fp32 whatever the storage dtype."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        w = tl.load(weights_ptr + row)
        t = tl.load(targets_ptr + row)
        cols0 = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        x_t = tl.load(base + t).to(tl.float32)
        tl.store(loss_ptr + row, w * (lse - x_t))
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * w
                g = tl.where(cols == t, g - w, g)
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)
