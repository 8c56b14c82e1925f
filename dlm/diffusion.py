"""The masked-diffusion objective (docs/design.md §2): absorbing-state diffusion, alpha_t = 1 - t.

Per optimizer step and packed row: draw t, replace each loss-eligible token by [MASK] with
probability t, run the model bidirectionally, and score the masked tokens with the shifted AR
head (output i-1 predicts token i), weighted by 1/t:

    noised = noise_batch(batch, step, cfg, global_batch_size)
    out = diffusion_loss(model, noised, normalizer)     # normalizer: global eligible (or masked) count
    out.loss.backward()

Every random choice is a Philox draw keyed by (cfg.seed, global sample id[, step]), so a sample
gets the same t, crop and mask whatever the world size or micro-batch layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dlm.attention.layout import AnnealMask, AttentionLayout
from dlm.kernels.masked_ce import masked_cross_entropy
from dlm.kernels.masking import mask_tokens, philox4x32, uniform24
from dlm.models.protocol import DiffusionLM

__all__ = [
    "DiffusionConfig",
    "DiffusionSettings",
    "LossOutput",
    "NoisedBatch",
    "crop",
    "crop_lengths",
    "diffusion_loss",
    "heldout_elbo",
    "host_layout",
    "noise_batch",
    "sample_t",
]

_MASK32 = 0xFFFFFFFF
# Philox counter word c3 tags each host-side stream; the token-mask stream (kernel) uses c3 = 0.
_STREAM_T, _STREAM_CROP, _STREAM_ELBO_SEED = 1, 2, 3
LossNorm = Literal["eligible", "masked"]


@dataclass(frozen=True)
class DiffusionSettings:
    """What a run configures (a training config's `[diffusion]` section): everything but the
    [MASK] id, which comes from the model."""

    eps: float = 1e-3
    low_discrepancy: bool = True
    loss_norm: LossNorm = "eligible"
    random_length_prob: float = 0.01
    anneal_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"DiffusionConfig.eps must be in (0, 1), got {self.eps}")
        if self.loss_norm not in ("eligible", "masked"):
            raise ValueError(f"DiffusionConfig.loss_norm must be 'eligible' or 'masked', got {self.loss_norm!r}")
        if not 0.0 <= self.random_length_prob <= 1.0:
            raise ValueError(f"DiffusionConfig.random_length_prob must be in [0, 1], got {self.random_length_prob}")
        if self.anneal_steps < 0:
            raise ValueError(f"DiffusionConfig.anneal_steps must be >= 0, got {self.anneal_steps}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"DiffusionConfig.seed must be in [0, 2**63), got {self.seed}")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(DiffusionSettings):
    """The settings and the model's [MASK] id: what the objective's functions take."""

    mask_token_id: int

    def __post_init__(self) -> None:
        if self.mask_token_id < 0:
            raise ValueError(f"DiffusionConfig.mask_token_id must be >= 0, got {self.mask_token_id}")
        super().__post_init__()


def _draw(counter: torch.Tensor, stream: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint32 draws (int64 tensors) per counter value of one host-side stream."""
    counter = counter.to(torch.int64)
    r0, r1, _, _ = philox4x32(
        counter & _MASK32,
        counter >> 32,
        torch.zeros_like(counter),
        torch.full_like(counter, stream),
        seed & _MASK32,
        seed >> 32,
    )
    return r0, r1


def _uniform53(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1) from two uint32 draws (53 random bits)."""
    return ((r0 >> 5) * 67108864 + (r1 >> 6)).to(torch.float64) * 2.0**-53


def sample_t(sample_ids: torch.Tensor, global_batch_size: int, step: int, cfg: DiffusionConfig) -> torch.Tensor:
    """Noise level per row, t = eps + (1 - eps) u, as float32 [B].

    Low-discrepancy: one u0 per step and u = (u0 + (sample_id mod G) / G) mod 1, so the G rows of a
    step (consecutive global ids) put exactly one u in each stratum [j/G, (j+1)/G). Otherwise u is
    an independent draw per sample id."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    sample_ids = sample_ids.to(torch.int64)
    if cfg.low_discrepancy:
        u0 = _uniform53(*_draw(torch.tensor([step], device=sample_ids.device), _STREAM_T, cfg.seed))
        u = torch.remainder(
            u0 + torch.remainder(sample_ids, global_batch_size).to(torch.float64) / global_batch_size, 1.0
        )
    else:
        u = _uniform53(*_draw(sample_ids, _STREAM_T, cfg.seed))
    return (cfg.eps + (1.0 - cfg.eps) * u).to(torch.float32)


def crop_lengths(sample_ids: torch.Tensor, seq_len: int, cfg: DiffusionConfig) -> torch.Tensor:
    """Kept length per row [B] int64: seq_len, or with probability random_length_prob a length
    uniform in [2, seq_len], decided by (seed, sample id) alone."""
    sample_ids = sample_ids.to(torch.int64)
    full = torch.full_like(sample_ids, seq_len)
    if seq_len < 2 or cfg.random_length_prob == 0.0:
        return full
    r0, r1 = _draw(sample_ids, _STREAM_CROP, cfg.seed)
    cut = uniform24(r0) < torch.tensor(cfg.random_length_prob, dtype=torch.float32)
    return torch.where(cut, 2 + torch.remainder(r1, seq_len - 1), full)


def eligible_tokens(position_ids: torch.Tensor, maskable: torch.Tensor | None) -> torch.Tensor:
    """Loss-eligible tokens: maskable and not a document start (index 0 always starts one)."""
    eligible = position_ids != 0
    eligible[:, 0] = False
    if maskable is not None:
        eligible &= maskable
    return eligible


def _check_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    for key in ("input_ids", "position_ids", "sample_ids"):
        if key not in batch:
            raise KeyError(f"diffusion batch is missing {key!r} (has {sorted(batch)})")
    ids, pos, sids, maskable = batch["input_ids"], batch["position_ids"], batch["sample_ids"], batch.get("maskable")
    if ids.dim() != 2 or pos.shape != ids.shape:
        raise ValueError(
            f"input_ids and position_ids must both be [B, L], got {tuple(ids.shape)} and {tuple(pos.shape)}"
        )
    if sids.shape != ids.shape[:1]:
        raise ValueError(f"sample_ids must be [B] = [{ids.shape[0]}], got {tuple(sids.shape)}")
    if maskable is not None and (maskable.shape != ids.shape or maskable.dtype != torch.bool):
        raise ValueError(f"maskable must be a bool [B, L] tensor, got {maskable.dtype} {tuple(maskable.shape)}")
    return ids, pos, sids, maskable


@dataclass
class NoisedBatch:
    """One noised micro-batch. masked is explicit (never recovered by comparing ids: real text
    contains the mask id too); weights = 1/t where masked, else 0."""

    noisy_ids: torch.Tensor  # [B, L] model input
    targets: torch.Tensor  # [B, L] clean ids
    masked: torch.Tensor  # [B, L] bool
    weights: torch.Tensor  # [B, L] float32
    eligible: torch.Tensor  # [B, L] bool
    position_ids: torch.Tensor  # [B, L] after random-length crops
    t: torch.Tensor  # [B] float32
    step: int
    cfg: DiffusionConfig
    cu_seqlens: torch.Tensor | None = None  # precomputed on the host (host_layout), else derived
    max_seqlen: int | None = None

    @property
    def n_eligible(self) -> torch.Tensor:
        """Loss-eligible tokens (int64 scalar tensor on the batch's device: no host sync)."""
        return self.eligible.sum()

    @property
    def n_masked(self) -> torch.Tensor:
        return self.masked.sum()

    @property
    def norm_count(self) -> torch.Tensor:
        """This micro-batch's share of the loss normalizer under cfg.loss_norm; the trainer sums
        it over micro-batches and ranks and passes the total to `diffusion_loss`."""
        return self.n_eligible if self.cfg.loss_norm == "eligible" else self.n_masked

    def layout(self, causal: bool = False, anneal: AnnealMask | None = None) -> AttentionLayout:
        return AttentionLayout.from_position_ids(
            self.position_ids, causal=causal, anneal=anneal, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen
        )


def crop(
    position_ids: torch.Tensor, sample_ids: torch.Tensor, cfg: DiffusionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-length crops: (position ids, tail [B, L] bool). A cropped tail becomes its own
    padding segment (positions restart), so it is invisible to the kept prefix; it is never
    masked nor scored. Idempotent."""
    L = position_ids.shape[1]
    cols = torch.arange(L, device=position_ids.device)
    tail = cols >= crop_lengths(sample_ids, L, cfg).to(position_ids.device)[:, None]
    return torch.where(tail, cols - (~tail).sum(1, keepdim=True), position_ids), tail


def host_layout(batch: dict, cfg: DiffusionConfig) -> dict:
    """`cu_seqlens` and `max_seqlen` of a micro-batch after its crops, for `noise_batch`.

    The segment boundaries are data: deriving them on the GPU reads a value back (a host sync
    per micro-batch). The trainer calls this on the host copy of the batch, where it is free."""
    pos, _ = crop(batch["position_ids"], batch["sample_ids"], cfg)
    layout = AttentionLayout.from_position_ids(pos)
    return {"cu_seqlens": layout.cu_seqlens, "max_seqlen": layout.max_seqlen}


def noise_batch(batch: dict, step: int, cfg: DiffusionConfig, global_batch_size: int) -> NoisedBatch:
    """Crop, choose t and mask one micro-batch (keys: input_ids, position_ids, sample_ids,
    optionally maskable [B, L] bool for SFT, and optionally the cropped layout's cu_seqlens and
    max_seqlen from `host_layout`)."""
    ids, pos, sids, maskable = _check_batch(batch)
    pos, tail = crop(pos, sids, cfg)
    eligible = eligible_tokens(pos, maskable) & ~tail
    t = sample_t(sids, global_batch_size, step, cfg).to(ids.device)
    noisy, masked, weights = mask_tokens(ids, eligible, t, sids.to(ids.device), cfg.seed, cfg.mask_token_id)
    return NoisedBatch(
        noisy, ids, masked, weights, eligible, pos, t, step, cfg, batch.get("cu_seqlens"), batch.get("max_seqlen")
    )


@dataclass
class LossOutput:
    """loss carries the gradient; elbo_sum is the detached statistic the trainer logs."""

    loss: torch.Tensor
    elbo_sum: torch.Tensor  # sum over masked tokens of CE / t (nats)


def _prediction_rows(masked: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: outputs that predict a masked token (output i-1 predicts token i)."""
    sel = torch.zeros_like(masked)
    sel[:, :-1] = masked[:, 1:]
    return sel


def diffusion_loss(
    model: nn.Module, noised: NoisedBatch, normalizer: torch.Tensor | float, step: int | None = None
) -> LossOutput:
    """loss = (sum over masked i of CE(out[i-1], x[i]) / t_row) / normalizer.

    step: optimizer step for the causal->bidirectional annealing schedule; defaults to the step
    the batch was noised for. The normalizer is clamped to >= 1: a global batch without a single
    eligible (or masked) token has an ELBO sum of 0 and gets loss 0 instead of NaN."""
    cfg = noised.cfg
    anneal = AnnealMask.schedule(cfg.seed, noised.step if step is None else step, cfg.anneal_steps)
    # masked tokens as flat indices (one read-back of the count per micro-batch); output i-1
    # predicts token i, and column 0 is never masked, so the output rows are idx - 1
    idx = noised.masked.reshape(-1).nonzero().squeeze(1)
    targets = noised.targets.reshape(-1)[idx]
    row_weights = noised.weights.reshape(-1)[idx]

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(hidden.reshape(-1, hidden.shape[-1])[idx - 1], weight, targets, row_weights)

    elbo_sum = model(noised.noisy_ids, noised.layout(anneal=anneal), head=head)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(elbo_sum.device, torch.float32).clamp_min(1.0)
    else:
        normalizer = max(float(normalizer), 1.0)
    return LossOutput(loss=elbo_sum / normalizer, elbo_sum=elbo_sum.detach())


def _per_row_head(ids: torch.Tensor, masked: torch.Tensor, weights: torch.Tensor):
    """A model head returning each row's weighted CE sum over its masked tokens, [B]."""
    sel = _prediction_rows(masked)

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                masked_cross_entropy(
                    hidden[b][sel[b]], weight, ids[b, 1:][masked[b, 1:]], weights[b, 1:][masked[b, 1:]]
                )
                for b in range(ids.shape[0])
            ]
        )

    return head


def _elbo_seed(seed: int, k: int) -> int:
    """A 63-bit masking seed for draw k of the held-out estimator."""
    r0, r1 = _draw(torch.tensor([k]), _STREAM_ELBO_SEED, seed)
    return ((int(r1) & 0x7FFFFFFF) << 32) | int(r0)


@torch.no_grad()
def heldout_elbo(
    model: DiffusionLM, batch: dict, num_samples: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ELBO bound on the NLL: (nats_sum [B] float64, n_tokens [B] int64), the bound in
    nats per token being nats_sum / n_tokens.

    E_t[sum over masked CE / t] with t ~ U(0, 1) is estimated with K stratified midpoints
    t_k = (k + 0.5) / K, one masking draw each; the masks depend on (seed, k, sample id, position)
    only, so repeated evaluations of a checkpoint see exactly the same noise. No random crops."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise ValueError("heldout_elbo needs a model whose config has a mask_token_id")
    ids, pos, sids, maskable = _check_batch(batch)
    B = ids.shape[0]
    eligible = eligible_tokens(pos, maskable)
    layout = AttentionLayout.from_position_ids(pos)
    total = torch.zeros(B, dtype=torch.float64, device=ids.device)
    for k in range(num_samples):
        t = torch.full((B,), (k + 0.5) / num_samples, dtype=torch.float32, device=ids.device)
        noisy, masked, weights = mask_tokens(ids, eligible, t, sids.to(ids.device), _elbo_seed(seed, k), mask_id)
        total += model(noisy, layout, head=_per_row_head(ids, masked, weights)).double()
    return total / num_samples, eligible.sum(1)
