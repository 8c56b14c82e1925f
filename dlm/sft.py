"""DiffuSeq-style supervised fine-tuning rows (DESIGN section 2).

    [BOS] prompt [SEP] response [EOS] [PAD] ...     (one example per row, positions 0..L-1)

Only response, EOS and padding are maskable: the prompt is always visible, the model learns to
fill in the response, and learning to predict padding teaches it where the response ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SFTFormat", "collate_sft", "sft_example"]


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


def sft_example(prompt_ids: Sequence[int], response_ids: Sequence[int], fmt: SFTFormat, where: str = "example") -> dict:
    """One row: input_ids [L] int64, position_ids [L] int64, maskable [L] bool.

    Raises when the example does not fit in seq_len (`where` names it in the message): silently
    truncating a response would teach the model to stop mid-answer."""
    head = ([fmt.bos_id] if fmt.bos_id is not None else []) + list(prompt_ids) + [fmt.sep_id]
    body = list(response_ids) + [fmt.eos_id]
    n = len(head) + len(body)
    if n > fmt.seq_len:
        raise ValueError(
            f"{where}: prompt ({len(prompt_ids)} tokens) + response ({len(response_ids)} tokens) + special tokens "
            f"= {n} tokens do not fit seq_len {fmt.seq_len}"
        )
    L = fmt.seq_len
    input_ids = torch.tensor(head + body + [fmt.pad_id] * (L - n), dtype=torch.int64)
    maskable = torch.zeros(L, dtype=torch.bool)
    maskable[len(head) :] = True
    return dict(input_ids=input_ids, position_ids=torch.arange(L, dtype=torch.int64), maskable=maskable)


def collate_sft(examples: Sequence[dict], sample_ids: Sequence[int] | torch.Tensor) -> dict:
    """Stack rows from `sft_example` into a batch for `dlm.diffusion.noise_batch`; sample_ids are the
    examples' global indices (they key the noise, so a resumed run masks an example identically)."""
    if len(examples) != len(sample_ids):
        raise ValueError(f"collate_sft got {len(examples)} examples but {len(sample_ids)} sample ids")
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    batch = {key: torch.stack([ex[key] for ex in examples]) for key in ("input_ids", "position_ids", "maskable")}
    batch["sample_ids"] = torch.as_tensor(sample_ids, dtype=torch.int64)
    return batch
