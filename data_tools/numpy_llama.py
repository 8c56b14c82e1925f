"""A plain NumPy LLaMA forward pass straight from a GGUF file: the independent oracle that
`convert_gguf` output is checked against.

It reads the GGUF tensors by their GGUF names and applies RoPE the way llama.cpp does for the
LLaMA architecture (adjacent pairs, on the permuted q/k rows), so it shares neither the
un-permutation, the key renaming nor the PyTorch model code with what it checks. Math in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class GGUFLlama:
    """Hyperparameters and dequantized float32 tensors (numpy row-major, [out, in]) of a GGUF LLaMA."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    rope_theta: float
    tensors: dict[str, np.ndarray]


def load_gguf_llama(path: str | Path) -> GGUFLlama:
    import gguf

    reader = gguf.GGUFReader(str(path))

    def scalar(key: str):
        return reader.fields[key].contents()

    arch = scalar("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; the NumPy forward handles 'llama' only")
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    n_heads = int(scalar("llama.attention.head_count"))
    return GGUFLlama(
        n_layers=int(scalar("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(scalar("llama.attention.head_count_kv"))
        if "llama.attention.head_count_kv" in reader.fields
        else n_heads,
        norm_eps=float(scalar("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(scalar("llama.rope.freq_base")) if "llama.rope.freq_base" in reader.fields else 10000.0,
        tensors=tensors,
    )


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_adjacent(x: np.ndarray, theta: float) -> np.ndarray:
    """x [T, H, D]: rotate the pairs (2i, 2i+1) by pos * theta^(-2i/D) (GGML 'normal' mode)."""
    T, _, D = x.shape
    inv = theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def forward(model: GGUFLlama, tokens: list[int] | np.ndarray) -> np.ndarray:
    """Causal logits [T, V] (float64) for one sequence of token ids."""
    w = model.tensors
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    x = w["token_embd.weight"][tokens].astype(np.float64)
    H, Hkv = model.n_heads, model.n_kv_heads
    D = x.shape[1] // H
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(model.n_layers):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], model.norm_eps)
        q = _rope_adjacent((h @ w[p + "attn_q.weight"].T).reshape(T, H, D), model.rope_theta)
        k = _rope_adjacent((h @ w[p + "attn_k.weight"].T).reshape(T, Hkv, D), model.rope_theta)
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, Hkv, D)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)
        scores = np.where(causal[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", scores, v).reshape(T, H * D)
        x = x + attn @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], model.norm_eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1.0 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = _rms_norm(x, w["output_norm.weight"], model.norm_eps)
    out = w.get("output.weight", w["token_embd.weight"])  # absent = tied embeddings
    return x @ out.T
