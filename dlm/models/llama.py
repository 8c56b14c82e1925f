"""LLaMA family (LLaMA-2, TinyLlama, SmolLM2): RMSNorm, RoPE, SwiGLU, grouped-query attention.

Numerics follow Hugging Face `LlamaForCausalLM` (norm statistics and RoPE angles in fp32, the rest
in the parameter dtype) so that causal mode reproduces the pretrained AR model. Positions come
from `layout.position_ids`, so every packed document starts again at position 0.
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
from dlm.models.lean_ops import rms_norm, swiglu_down


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # HF's order of operations; saves no output copy


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, L, head_dim] in the rotate-half layout. Computed per call (cheap, no buffers
    to re-initialise after `to_empty`), angles in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, head_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd, kv_heads = cfg.head_dim, cfg.n_kv_heads or cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: AttentionLayout, kv: LayerKV | None = None
    ) -> torch.Tensor:
        B, L, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(B, L, -1, hd).transpose(1, 2)
        k = self.wk(x).view(B, L, -1, hd).transpose(1, 2)
        v = self.wv(x).view(B, L, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            out = attend(q, k, v, layout, backend=self.cfg.attn_backend)
        else:
            out = kv.attend(q, k, v, layout, backend=self.cfg.attn_backend)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.w2) is nn.Linear:  # not a LoRA-wrapped projection: recompute its input in backward
            return swiglu_down(self.w1(x), self.w3(x), self.w2.weight)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: AttentionLayout, kv: LayerKV | None = None
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, layout, kv)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "llama":
            raise ValueError(f"Llama needs a config of family 'llama', got {cfg.family!r}")
        if cfg.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {cfg.head_dim}")
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, input_ids: torch.Tensor, layout: AttentionLayout, head=None, cache: KVCache | None = None):
        """Logits [B, L, V], or `head(hidden, output_weight)` so a fused loss never builds them.
        `cache` (sampling, dlm.kv_cache): attention reads and writes stored keys/values; in a
        window pass `input_ids` and `layout.position_ids` hold only the query positions."""
        h = self.tok_embeddings(input_ids)
        cos, sin = rope_cos_sin(layout.position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, layout, None if cache is None else cache.layer(i))
        h = self.norm(h)
        if head is not None:
            return head(h, self.output_weight())
        return F.linear(h, self.output_weight())

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-style init (std 0.02; output projections of residual branches scaled by depth)."""
        devices = [p.device for p in self.parameters() if p.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    nn.init.ones_(p)
                elif name.endswith(("wo.weight", "w2.weight")):
                    nn.init.normal_(p, 0.0, resid_std)
                else:
                    nn.init.normal_(p, 0.0, std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters; `non_embedding` drops tables used only as lookups (an untied input
        embedding), keeping every matrix that does matmul work, the (tied) output head included."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.output is not None:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
