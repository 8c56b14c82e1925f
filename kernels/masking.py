"""Token masking for masked diffusion (docs/design.md §7): one pass over the tokens.

Token (row b, column j) draws `r = philox4x32_10(key=seed, counter=(off_lo, off_hi, 0, 0))[0]`
with `off = sample_ids[b] * L + j`, so a sample's mask depends only on (seed, global sample id),
never on world size or micro-batch layout. The uniform is `(r >> 8) * 2**-24` (exact in fp32) and
the token is masked iff it is maskable and `uniform < t[b]` in fp32; both paths compute exactly
that, so the Triton kernel and the PyTorch reference agree bit for bit.

    noisy_ids, masked, weights = mask_tokens(input_ids, maskable, t, sample_ids, seed, mask_id)

weights = 1/t where masked, else 0 (1/t is computed once per row by PyTorch, correctly rounded,
so the kernel does not depend on the device's division).
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference serves elsewhere
    triton = None

__all__ = ["mask_tokens", "mask_tokens_reference", "mask_tokens_triton", "philox4x32", "uniform24"]

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers (Random123)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)
_INV_2_24 = 2.0**-24


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of m * x for a 32-bit constant m and int64 tensor x < 2**32,
    split into 16-bit pieces so that no intermediate leaves int64."""
    p_lo = m * (x & 0xFFFF)  # < 2**48
    p_hi = m * (x >> 16)  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int, rounds: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32 (Salmon et al. 2011) on int64 tensors holding uint32 values; any device.

    Same round structure and constants as Random123 and `triton.language.philox`."""
    c = [x.to(torch.int64) & _MASK32 for x in torch.broadcast_tensors(c0, c1, c2, c3)]
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c[0])
        hi1, lo1 = _mulhilo(_PHILOX_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c[0], c[1], c[2], c[3]


def uniform24(r: torch.Tensor) -> torch.Tensor:
    """uint32 draws (int64 tensor) -> float32 uniforms in [0, 1) on a 2**-24 grid (exact)."""
    return (r >> 8).to(torch.float32) * _INV_2_24


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def _token_uniforms(sample_ids: torch.Tensor, L: int, seed: int) -> torch.Tensor:
    """[B, L] float32 uniforms of the tokens of the given global samples."""
    off = sample_ids.to(torch.int64)[:, None] * L + torch.arange(L, device=sample_ids.device)
    zero = torch.zeros_like(off)
    r, _, _, _ = philox4x32(off & _MASK32, off >> 32, zero, zero, seed & _MASK32, seed >> 32)
    return uniform24(r)


def mask_tokens_reference(
    input_ids: torch.Tensor,
    maskable: torch.Tensor | None,
    t: torch.Tensor,
    sample_ids: torch.Tensor,
    seed: int,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch masking; the definition the Triton kernel must reproduce bit for bit."""
    L = input_ids.shape[1]
    t = t.to(torch.float32)
    u = _token_uniforms(sample_ids, L, seed)
    masked = u < t[:, None]
    if maskable is not None:
        masked &= maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    inv_t = 1.0 / t
    weights = torch.where(masked, inv_t[:, None], torch.zeros((), dtype=torch.float32, device=t.device))
    return noisy, masked, weights


if triton is not None:

    @triton.jit
    def _mask_kernel(
        ids_ptr,
        maskable_ptr,
        t_ptr,
        inv_t_ptr,
        sid_ptr,
        noisy_ptr,
        masked_ptr,
        weights_ptr,
        seed,
        mask_id,
        L,
        HAS_MASKABLE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < L
        base = row.to(tl.int64) * L
        ids = tl.load(ids_ptr + base + cols, mask=inside, other=0)
        t = tl.load(t_ptr + row)
        inv_t = tl.load(inv_t_ptr + row)
        sid = tl.load(sid_ptr + row).to(tl.int64)

        off = sid * L + cols.to(tl.int64)
        lo = off.to(tl.uint32)
        hi = (off >> 32).to(tl.uint32)
        zero = tl.zeros_like(lo)
        r, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
        u = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        masked = u < t
        if HAS_MASKABLE:
            ok = tl.load(maskable_ptr + base + cols, mask=inside, other=0)
            masked = masked & (ok != 0)

        tl.store(noisy_ptr + base + cols, tl.where(masked, mask_id, ids).to(ids.dtype), mask=inside)
        tl.store(masked_ptr + base + cols, masked.to(tl.int8), mask=inside)
        tl.store(weights_ptr + base + cols, tl.where(masked, inv_t, 0.0), mask=inside)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mask_tokens_triton(
    input_ids: torch.Tensor,
    maskable: torch.Tensor | None,
    t: torch.Tensor,
    sample_ids: torch.Tensor,
    seed: int,
    mask_id: int,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if triton is None:
        raise RuntimeError("mask_tokens impl='triton' needs the triton package, which is not installed")
    if not input_ids.is_cuda and not _interpreting():
        raise RuntimeError(
            f"mask_tokens impl='triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1); "
            f"got device {input_ids.device}"
        )
    B, L = input_ids.shape
    ids = input_ids.contiguous()
    t = t.to(torch.float32).contiguous()
    inv_t = 1.0 / t
    noisy = torch.empty_like(ids)
    masked = torch.empty((B, L), dtype=torch.int8, device=ids.device)
    weights = torch.empty((B, L), dtype=torch.float32, device=ids.device)
    if B == 0 or L == 0:
        return noisy, masked.bool(), weights
    mk = maskable.contiguous().view(torch.int8) if maskable is not None else ids
    block = min(block, triton.next_power_of_2(L))
    grid = (B, triton.cdiv(L, block))
    with torch.cuda.device(ids.device) if ids.is_cuda else contextlib.nullcontext():
        _mask_kernel[grid](
            ids,
            mk,
            t,
            inv_t,
            sample_ids.to(torch.int64).contiguous(),
            noisy,
            masked,
            weights,
            seed,
            mask_id,
            L,
            HAS_MASKABLE=maskable is not None,
            BLOCK=block,
        )
    return noisy, masked.view(torch.bool), weights


def _validate(input_ids, maskable, t, sample_ids, seed, mask_id) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer [B, L] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    if maskable is not None and (maskable.shape != input_ids.shape or maskable.dtype != torch.bool):
        raise ValueError(
            f"maskable must be a bool tensor of shape {(B, L)}, got {maskable.dtype} {tuple(maskable.shape)}"
        )
    if t.shape != (B,) or not t.is_floating_point():
        raise ValueError(f"t must be a float tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}")
    if sample_ids.shape != (B,):
        raise ValueError(f"sample_ids must have shape ({B},), got {tuple(sample_ids.shape)}")
    if not all(x.device == input_ids.device for x in (t, sample_ids) + ((maskable,) if maskable is not None else ())):
        raise ValueError("input_ids, maskable, t and sample_ids must be on the same device")
    _check_seed(seed)
    if mask_id < 0:
        raise ValueError(f"mask_id must be a non-negative token id, got {mask_id}")


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor | None,
    t: torch.Tensor,
    sample_ids: torch.Tensor,
    seed: int,
    mask_id: int,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bernoulli(t[b]) masking of the maskable tokens of each row.

    input_ids [B, L] int; maskable [B, L] bool or None (all); t [B] float; sample_ids [B] global
    sample ids. Returns noisy_ids (mask_id where masked), masked [B, L] bool, weights [B, L] f32.
    impl: "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference".
    """
    _validate(input_ids, maskable, t, sample_ids, seed, mask_id)
    if impl == "auto":
        impl = "triton" if input_ids.is_cuda else "reference"
    if impl == "triton":
        return mask_tokens_triton(input_ids, maskable, t, sample_ids, seed, mask_id)
    if impl == "reference":
        return mask_tokens_reference(input_ids, maskable, t, sample_ids, seed, mask_id)
    raise ValueError(f"unknown mask_tokens impl {impl!r}; choose 'auto', 'triton' or 'reference'")
