"""Supervised fine-tuning rows (docs/design.md §2) and the AR-SFT objective.

    [BOS] prompt [SEP] response [EOS] [PAD] ...     (one example per row, positions 0..L-1)

Diffusion SFT (DiffuSeq style): only response, EOS and padding are maskable: the prompt is
always visible, the model learns to fill in the response, and learning to predict padding
teaches it where the response ends. The loss is `dlm.diffusion.diffusion_loss` on a batch with
a `maskable` field.

Packing puts several examples in one row, each its own attention segment (positions restart at
0, so attention never crosses examples); the last example of a row owns the padding.

AR-SFT (the baseline the seed compares against): causal attention, next-token cross-entropy on
the response and its EOS only (`ar_batch` + `ar_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlm.attention.layout import AttentionLayout
from dlm.diffusion import LossOutput
from dlm.kernels.masked_ce import masked_cross_entropy

__all__ = [
    "ARBatch",
    "ARObjective",
    "SFTFormat",
    "ar_batch",
    "ar_loss",
    "collate_sft",
    "example_parts",
    "pack_row",
    "sft_example",
]


@dataclass(frozen=True)
class SFTFormat:
    """Special ids of the row layout. bos_id None: no BOS (e.g. GPT-2)."""

    seq_len: int
    sep_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 3:
            raise ValueError(f"SFTFormat.seq_len must be >= 3, got {self.seq_len}")

    def prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """What generation starts from: [BOS] prompt [SEP]."""
        return ([self.bos_id] if self.bos_id is not None else []) + list(prompt_ids) + [self.sep_id]


def example_parts(
    prompt_ids: Sequence[int], response_ids: Sequence[int], fmt: SFTFormat, where: str = "example"
) -> tuple[list[int], list[int]]:
    """(head, body) = ([BOS] prompt [SEP], response [EOS]). Raises when the example does not fit in
    seq_len (`where` names it): silently truncating a response would teach the model to stop
    mid-answer."""
    head, body = fmt.prompt(prompt_ids), list(response_ids) + [fmt.eos_id]
    n = len(head) + len(body)
    if n > fmt.seq_len:
        raise ValueError(
            f"{where}: prompt ({len(prompt_ids)} tokens) + response ({len(response_ids)} tokens) + special tokens "
            f"= {n} tokens do not fit seq_len {fmt.seq_len}"
        )
    return head, body


def pack_row(parts: Sequence[tuple[list[int], list[int]]], fmt: SFTFormat) -> dict:
    """One row from (head, body) pairs: input_ids, position_ids [L] int64; maskable [L] bool
    (bodies and the trailing padding); response [L] bool (bodies only: what AR-SFT scores)."""
    L = fmt.seq_len
    if not parts:
        raise ValueError("pack_row needs at least one example")
    ids: list[int] = []
    pos: list[int] = []
    maskable: list[bool] = []
    response: list[bool] = []
    for head, body in parts:
        n = len(head) + len(body)
        ids += head + body
        pos += range(n)
        maskable += [False] * len(head) + [True] * len(body)
        response += [False] * len(head) + [True] * len(body)
    if len(ids) > L:
        raise ValueError(f"packed examples hold {len(ids)} tokens, more than seq_len {L}")
    pad = L - len(ids)
    last = len(parts[-1][0]) + len(parts[-1][1])
    ids += [fmt.pad_id] * pad
    pos += range(last, last + pad)  # padding continues the last example's segment
    maskable += [True] * pad
    response += [False] * pad
    return dict(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        position_ids=torch.tensor(pos, dtype=torch.int64),
        maskable=torch.tensor(maskable, dtype=torch.bool),
        response=torch.tensor(response, dtype=torch.bool),
    )


def sft_example(prompt_ids: Sequence[int], response_ids: Sequence[int], fmt: SFTFormat, where: str = "example") -> dict:
    """One example in its own row (see `pack_row` for the fields)."""
    return pack_row([example_parts(prompt_ids, response_ids, fmt, where)], fmt)


ROW_KEYS = ("input_ids", "position_ids", "maskable", "response")


def collate_sft(examples: Sequence[dict], sample_ids: Sequence[int] | torch.Tensor) -> dict:
    """Stack rows into a batch for `dlm.diffusion.noise_batch` or `ar_batch`; sample_ids are the
    rows' global indices (they key the noise, so a resumed run masks a row identically)."""
    if len(examples) != len(sample_ids):
        raise ValueError(f"collate_sft got {len(examples)} examples but {len(sample_ids)} sample ids")
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    batch = {key: torch.stack([ex[key] for ex in examples]) for key in ROW_KEYS}
    batch["sample_ids"] = torch.as_tensor(sample_ids, dtype=torch.int64)
    return batch


# ---------------------------------------------------------------- AR-SFT


@dataclass
class ARBatch:
    """A micro-batch for next-token training: targets[i] is scored from output i-1."""

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    scored: torch.Tensor  # [B, L] bool: response/EOS tokens that are not a segment start
    cu_seqlens: torch.Tensor | None = None  # from the host copy (no device read-back), else derived
    max_seqlen: int | None = None

    @property
    def n_eligible(self) -> torch.Tensor:
        return self.scored.sum()

    def layout(self) -> AttentionLayout:
        return AttentionLayout.from_position_ids(
            self.position_ids, causal=True, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen
        )


def ar_batch(batch: dict) -> ARBatch:
    for key in ("input_ids", "position_ids", "response"):
        if key not in batch:
            raise KeyError(f"AR-SFT batch is missing {key!r} (has {sorted(batch)}): build rows with dlm.sft")
    scored = batch["response"] & (batch["position_ids"] != 0)
    scored[:, 0] = False
    return ARBatch(batch["input_ids"], batch["position_ids"], scored, batch.get("cu_seqlens"), batch.get("max_seqlen"))


def ar_loss(model: nn.Module, batch: ARBatch, normalizer: torch.Tensor | float, step: int | None = None) -> LossOutput:
    """loss = (sum over scored i of CE(out[i-1], x[i])) / normalizer, causal attention; `step` is
    unused (same signature as `diffusion_loss`)."""
    sel = torch.zeros_like(batch.scored)
    sel[:, :-1] = batch.scored[:, 1:]
    targets = batch.input_ids[:, 1:][batch.scored[:, 1:]]
    ones = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(hidden[sel], weight, targets, ones)

    nll_sum = model(batch.input_ids, batch.layout(), head=head)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(nll_sum.device, torch.float32).clamp_min(1.0)
    else:
        normalizer = max(float(normalizer), 1.0)
    return LossOutput(loss=nll_sum / normalizer, elbo_sum=nll_sum.detach())


class ARObjective:
    """AR-SFT as a `dlm.train.step.Objective`: the logged statistic is the response NLL (nats per
    scored token)."""

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        layout = AttentionLayout.from_position_ids(batch["position_ids"], causal=True)  # host: no device sync
        out["cu_seqlens"] = layout.cu_seqlens.to(device, non_blocking=True)
        out["max_seqlen"] = layout.max_seqlen
        return out

    def prepare(self, batch: dict[str, Any], step: int) -> ARBatch:
        return ar_batch(batch)

    def counts(self, prepared: ARBatch) -> torch.Tensor:
        n = prepared.n_eligible
        return torch.stack([n, n]).double()

    def loss(
        self, model: nn.Module, prepared: ARBatch, normalizer: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = ar_loss(model, prepared, normalizer)
        return out.loss, out.elbo_sum
