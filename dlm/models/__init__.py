"""Model families and named presets.

    model = build_model(preset("gpt2"))            # random init needs model.init_weights(seed)
    with torch.device("meta"): model = build_model(cfg)   # then to_empty + init_weights / load

Presets are the AR originals' shapes (no `[MASK]` yet; see `dlm.models.mask_token`). Every
family meets the contract in `dlm.models.protocol.DiffusionLM`.
"""

from __future__ import annotations

from dlm.models.config import ModelConfig
from dlm.models.gpt2 import GPT2
from dlm.models.llama import Llama

__all__ = ["GPT2", "PRESETS", "Llama", "ModelConfig", "build_model", "preset"]


def _llama(**kw) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


def _gpt2(dim: int, n_layers: int, n_heads: int, **kw) -> ModelConfig:
    base = dict(vocab_size=50257, max_seq_len=1024, bos_token_id=50256, eos_token_id=50256)
    return ModelConfig(
        family="gpt2",
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        ffn_dim=4 * dim,
        tie_embeddings=True,
        **{**base, **kw},
    )


PRESETS = {
    "llama2-7b": lambda: _llama(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        ffn_dim=11008,
        max_seq_len=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tinyllama-1.1b": lambda: _llama(
        vocab_size=32000,
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        ffn_dim=5632,
        max_seq_len=2048,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "smollm2-135m": lambda: _llama(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "gpt2": lambda: _gpt2(768, 12, 12),
    "gpt2-medium": lambda: _gpt2(1024, 24, 16),
    "gpt2-large": lambda: _gpt2(1280, 36, 20),
    # test sizes: a few hundred thousand parameters, still exercising GQA / untied heads
    "tiny-llama": lambda: _llama(
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=176,
        max_seq_len=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny-gpt2": lambda: _gpt2(64, 2, 4, vocab_size=256, max_seq_len=256, bos_token_id=255, eos_token_id=255),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def build_model(cfg: ModelConfig) -> Llama | GPT2:
    """The model for `cfg`, parameters allocated on the current default device (meta works)."""
    if cfg.family == "llama":
        return Llama(cfg)
    if cfg.family == "gpt2":
        return GPT2(cfg)
    raise ValueError(f"unknown model family {cfg.family!r}; expected 'llama' or 'gpt2'")
