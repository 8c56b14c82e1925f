"""The `[MASK]` token (docs/design.md §2): a new id appended to the vocabulary, or an existing id.

Appending pads the vocabulary to a multiple of 64 (tensor-core friendly shapes); every new row,
the padding rows too, is the mean of the original rows, so a fresh `[MASK]` starts as an
"average token" and padding ids never stand out. Original rows are copied bit for bit.
"""

from __future__ import annotations

import torch

from dlm.models.config import ModelConfig

VOCAB_MULTIPLE = 64
# the (token-indexed) tables that grow with the vocabulary
VOCAB_TABLES = ("tok_embeddings.weight", "output.weight")


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def _grow(table: torch.Tensor, rows: int) -> torch.Tensor:
    mean = table.double().mean(dim=0, keepdim=True).to(table.dtype)
    return torch.cat([table, mean.expand(rows - table.shape[0], -1)], dim=0)


def add_mask_token(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, mask_token_id: int | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Return (state_dict, cfg) with a `[MASK]` token. `mask_token_id=None` appends id
    `base_vocab_size`; an int reuses that existing token (nothing is resized)."""
    if cfg.mask_token_id is not None:
        raise ValueError(f"the model already has a [MASK] token (id {cfg.mask_token_id})")
    base = cfg.base_vocab_size or cfg.vocab_size  # set by ModelConfig; typed optional
    if mask_token_id is not None:
        if not 0 <= mask_token_id < base:
            raise ValueError(f"mask_token_id {mask_token_id} is not an existing token id (vocabulary {base})")
        return dict(state_dict), cfg.replace(mask_token_id=mask_token_id)

    new_id = base
    vocab = padded_vocab(new_id + 1)
    out = dict(state_dict)
    for name in VOCAB_TABLES:
        if name not in out:
            continue
        table = out[name]
        if table.shape[0] != cfg.vocab_size:
            raise ValueError(f"{name} has {table.shape[0]} rows but the config says vocab_size {cfg.vocab_size}")
        if cfg.vocab_size != cfg.base_vocab_size:
            raise ValueError(
                f"cannot append [MASK]: vocabulary is already resized ({cfg.base_vocab_size} -> {cfg.vocab_size})"
            )
        out[name] = _grow(table, vocab)
    if "tok_embeddings.weight" not in out:
        raise ValueError("state dict has no tok_embeddings.weight to extend with a [MASK] row")
    return out, cfg.replace(vocab_size=vocab, mask_token_id=new_id)
