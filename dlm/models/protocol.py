"""The contract between a model family and the rest of dlm (docs/design.md §1).

The trainer, `dlm.train.parallelize`, the sampler and the evaluators treat a model as an
`nn.Module` with the members below and nothing else, so a third family (say Mistral) is one
new file implementing them plus a branch in `dlm.models.build_model`:

- `layers`: the transformer blocks, an `nn.ModuleList`. Activation checkpointing and
  `torch.compile` wrap each entry in place; FSDP2 shards each one, then the root.
- `forward(input_ids, layout, head=None, cache=None)`: logits [B, L, V], or, given `head`,
  `head(hidden [B, L, D], output_weight)` so the fused loss never builds full logits. `cache`
  (`dlm.kv_cache.KVCache`) lets the sampler reuse keys/values: attention reads and writes it,
  and in a window pass `input_ids` holds only the query positions.
- `output_weight()`: the [V, D] output projection (the embedding table when tied).
- `config`: the `ModelConfig` it was built from (mask_token_id, attention, vocab sizes...).
- `init_weights(seed)`, `num_params(non_embedding)`, `flops_per_token(seq_len)` (6N + attention
  FLOPs per token, for MFU).

Weights load by state-dict name (`dlm.models.hf` maps Hugging Face names to ours), so a family
also needs an entry there to start from published checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from dlm.attention.layout import AttentionLayout
from dlm.models.config import ModelConfig

if TYPE_CHECKING:
    from dlm.kv_cache import KVCache

Head = Callable[[torch.Tensor, torch.Tensor], Any]  # (hidden [B, L, D], output weight [V, D]) -> anything

__all__ = ["DiffusionLM", "Head"]


@runtime_checkable
class DiffusionLM(Protocol):
    config: ModelConfig
    layers: nn.ModuleList

    def forward(
        self, input_ids: torch.Tensor, layout: AttentionLayout, head: Head | None = None, cache: KVCache | None = None
    ) -> Any: ...

    def __call__(
        self, input_ids: torch.Tensor, layout: AttentionLayout, head: Head | None = None, cache: KVCache | None = None
    ) -> Any: ...  # nn.Module.__call__ runs forward

    def output_weight(self) -> torch.Tensor: ...

    def init_weights(self, seed: int | None = None) -> None: ...

    def num_params(self, non_embedding: bool = True) -> int: ...

    def flops_per_token(self, seq_len: int) -> int: ...
