"""GPT-2 family (small / medium / large): learned absolute positions, LayerNorm, tanh-GELU, tied
embeddings. Positions are read from `layout.position_ids`, so packed documents restart at 0 and
each one sees exactly the position embeddings it had in AR pre-training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlm.attention import attend
from dlm.attention.layout import AttentionLayout
from dlm.kv_cache import KVCache, LayerKV
from dlm.models.config import ModelConfig
from dlm.models.lean_ops import gelu_down


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # HF c_attn (transposed)
        self.wo = nn.Linear(cfg.dim, cfg.dim)  # HF c_proj

    def forward(self, x: torch.Tensor, layout: AttentionLayout, kv: LayerKV | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (t.view(B, L, self.cfg.n_heads, -1).transpose(1, 2) for t in self.wqkv(x).split(D, dim=-1))
        if kv is None:
            out = attend(q, k, v, layout, backend=self.cfg.attn_backend)
        else:
            out = kv.attend(q, k, v, layout, backend=self.cfg.attn_backend)
        return self.wo(out.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)  # HF c_fc
        self.proj = nn.Linear(hidden, dim)  # HF c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.proj) is nn.Linear:  # not a LoRA-wrapped projection: recompute its input in backward
            return gelu_down(self.fc(x), self.proj.weight, self.proj.bias)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)  # HF ln_1
        self.attention = Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)  # HF ln_2
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, layout: AttentionLayout, kv: LayerKV | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), layout, kv)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "gpt2":
            raise ValueError(f"GPT2 needs a config of family 'gpt2', got {cfg.family!r}")
        if not cfg.tie_embeddings:
            raise ValueError("GPT-2 ties its input and output embeddings; set tie_embeddings=True")
        if cfg.n_kv_heads != cfg.n_heads:
            raise ValueError(
                f"GPT-2 has no grouped-query attention: n_kv_heads {cfg.n_kv_heads} != n_heads {cfg.n_heads}"
            )
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)  # HF wte
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)  # HF wpe
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)  # HF ln_f

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight

    def forward(self, input_ids: torch.Tensor, layout: AttentionLayout, head=None, cache: KVCache | None = None):
        """Logits [B, L, V], or `head(hidden, output_weight)` so a fused loss never builds them.
        `cache` (sampling, dlm.kv_cache): attention reads and writes stored keys/values; in a
        window pass `input_ids` and `layout.position_ids` hold only the query positions."""
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds GPT-2's {self.config.max_seq_len} learned positions"
            )
        h = self.tok_embeddings(input_ids) + self.pos_embeddings(layout.position_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, layout, None if cache is None else cache.layer(i))
        h = self.norm(h)
        if head is not None:
            return head(h, self.output_weight())
        return F.linear(h, self.output_weight())

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 init: std 0.02, residual output projections scaled by 1/sqrt(2 n_layers)."""
        devices = [p.device for p in self.parameters() if p.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
            for name, p in self.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    nn.init.ones_(p)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
                elif name.endswith(("wo.weight", "proj.weight")):
                    nn.init.normal_(p, 0.0, resid_std)
                elif name == "pos_embeddings.weight":
                    nn.init.normal_(p, 0.0, 0.01)
                else:
                    nn.init.normal_(p, 0.0, 0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters; `non_embedding` drops the position table (a pure lookup) and keeps
        the tied token table, which does matmul work as the output head (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
