"""Model shapes shared by every family, plus the named presets users pick from configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Family = Literal["llama", "gpt2"]


@dataclass
class ModelConfig:
    """Architecture of one model. `vocab_size` is the embedding size actually allocated
    (after appending `[MASK]` and padding); `base_vocab_size` is the pretrained one."""

    family: Family
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_seq_len: int
    n_kv_heads: int | None = None  # llama: grouped-query attention; None means n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama only
    tie_embeddings: bool = False
    base_vocab_size: int | None = None  # vocabulary of the AR original; None means vocab_size
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    attn_backend: str = "auto"  # see dlm.attention.BACKENDS

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.base_vocab_size is None:
            self.base_vocab_size = self.vocab_size
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(**d)
