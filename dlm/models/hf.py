"""Hugging Face style checkpoints (`config.json` + safetensors) for LLaMA and GPT-2 models.

Import reads `LlamaForCausalLM` / `GPT2LMHeadModel` key layouts, one file or sharded with
`model.safetensors.index.json`, one tensor at a time (a sharded trainer never holds the whole
model). Export writes the same layout, loadable by `transformers` as the AR class, plus the
diffusion fields (`mask_token_id`, `attention`, `dlm_config`). Only JSON and safetensors are
read: nothing is ever unpickled.

The seed's released checkpoints import too. DiffuLLaMA is a plain `LlamaForCausalLM` folder
(load it with `mask_token_id=811`, the existing token the seed used as `[MASK]`). DiffuGPT was saved
with `PyTorchModelHubMixin` from the seed's `DiscreteDiffusionModel`: `model.safetensors` holds
`embed_tokens.weight`, `denoise_model.*` (the GPT-2 transformer without `wte`) and `lm_head.weight`
(tied to the embeddings), the vocabulary resized to the tokenizer's length; `config.json` must give
the GPT-2 shape (top level or under "config"; copy the base model's if the folder lacks one).
DiffuGPT-S uses the existing id 10541 as `[MASK]`; DiffuGPT-M appended one (id 50257).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dlm.atomic import atomic_write, atomic_write_json
from dlm.models import GPT2, Llama, build_model
from dlm.models.config import ModelConfig
from dlm.models.mask_token import add_mask_token

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
# HF buffers and duplicates that carry no parameters of ours
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# the seed's DiscreteDiffusionModel (PyTorchModelHubMixin): embeddings split off the transformer
MIXIN_EMBED, MIXIN_BODY = "embed_tokens.weight", "denoise_model."


# ---------------------------------------------------------------------------- key layouts


def hf_key_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """our parameter name -> (HF name, stored transposed). GPT-2's Conv1D keeps [in, out]."""
    m: dict[str, tuple[str, bool]] = {}
    if cfg.family == "llama":
        m["tok_embeddings.weight"] = ("model.embed_tokens.weight", False)
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            for ours, theirs in (
                ("attention.wq", "self_attn.q_proj"),
                ("attention.wk", "self_attn.k_proj"),
                ("attention.wv", "self_attn.v_proj"),
                ("attention.wo", "self_attn.o_proj"),
                ("feed_forward.w1", "mlp.gate_proj"),
                ("feed_forward.w2", "mlp.down_proj"),
                ("feed_forward.w3", "mlp.up_proj"),
                ("attention_norm", "input_layernorm"),
                ("ffn_norm", "post_attention_layernorm"),
            ):
                m[f"{p}{ours}.weight"] = (f"{h}{theirs}.weight", False)
        m["norm.weight"] = ("model.norm.weight", False)
        if not cfg.tie_embeddings:
            m["output.weight"] = ("lm_head.weight", False)
    elif cfg.family == "gpt2":
        m["tok_embeddings.weight"] = ("transformer.wte.weight", False)
        m["pos_embeddings.weight"] = ("transformer.wpe.weight", False)
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"transformer.h.{i}."
            for ours, theirs, conv1d in (
                ("attention_norm", "ln_1", False),
                ("attention.wqkv", "attn.c_attn", True),
                ("attention.wo", "attn.c_proj", True),
                ("ffn_norm", "ln_2", False),
                ("feed_forward.fc", "mlp.c_fc", True),
                ("feed_forward.proj", "mlp.c_proj", True),
            ):
                m[f"{p}{ours}.weight"] = (f"{h}{theirs}.weight", conv1d)
                m[f"{p}{ours}.bias"] = (f"{h}{theirs}.bias", False)
        m["norm.weight"] = ("transformer.ln_f.weight", False)
        m["norm.bias"] = ("transformer.ln_f.bias", False)
    else:
        raise ValueError(f"unknown model family {cfg.family!r}")
    return m


# ---------------------------------------------------------------------------- config.json


def _require(d: dict, key: str, where: str):
    if d.get(key) is None:
        raise ValueError(f"{where}: missing required field {key!r}")
    return d[key]


def _first(x):
    """Some configs list several eos ids; ModelConfig keeps one (the first)."""
    return x[0] if isinstance(x, list) and x else (x if isinstance(x, int) else None)


def config_from_hf(d: dict, where: str) -> ModelConfig:
    """ModelConfig from a HF `config.json` dict; refuses architecture variants we do not implement."""
    if isinstance(d.get("dlm_config"), dict):
        # our own export: the exact config, [MASK] included; the backend is a runtime choice
        return ModelConfig.from_dict({**d["dlm_config"], "attn_backend": "auto"})
    model_type = d.get("model_type")
    if model_type == "llama":
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{where}: RoPE scaling type {rope_type!r} is not implemented (only 'default')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"{where}: {flag}=true is not implemented for LLaMA models")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {d['hidden_act']!r} is not implemented (only 'silu')")
        dim, heads = _require(d, "hidden_size", where), _require(d, "num_attention_heads", where)
        if d.get("head_dim") not in (None, dim // heads):
            raise ValueError(f"{where}: head_dim {d['head_dim']} != hidden_size / num_attention_heads = {dim // heads}")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        return ModelConfig(
            family="llama",
            vocab_size=_require(d, "vocab_size", where),
            dim=dim,
            n_layers=_require(d, "num_hidden_layers", where),
            n_heads=heads,
            n_kv_heads=d.get("num_key_value_heads") or heads,
            ffn_dim=_require(d, "intermediate_size", where),
            max_seq_len=d.get("max_position_embeddings", 2048),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=_first(d.get("bos_token_id")),
            eos_token_id=_first(d.get("eos_token_id")),
            mask_token_id=None,
        )
    if model_type == "gpt2":
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function {act!r} is not implemented (only tanh GELU 'gelu_new')")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights", True) is False:
            raise ValueError(f"{where}: non-standard attention scaling is not implemented")
        if d.get("tie_word_embeddings", True) is False:
            raise ValueError(f"{where}: untied GPT-2 embeddings are not implemented")
        dim = _require(d, "n_embd", where)
        return ModelConfig(
            family="gpt2",
            vocab_size=_require(d, "vocab_size", where),
            dim=dim,
            n_layers=_require(d, "n_layer", where),
            n_heads=_require(d, "n_head", where),
            ffn_dim=d.get("n_inner") or 4 * dim,
            max_seq_len=_require(d, "n_positions", where),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=True,
            bos_token_id=_first(d.get("bos_token_id")),
            eos_token_id=_first(d.get("eos_token_id")),
        )
    raise ValueError(f"{where}: model_type {model_type!r} is not supported (expected 'llama' or 'gpt2')")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    common = dict(
        vocab_size=cfg.vocab_size,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if cfg.family == "llama":
        arch = dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_size=cfg.dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.ffn_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            # older transformers read rope_theta, newer rope_parameters
            rope_theta=cfg.rope_theta,
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        )
    else:
        arch = dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            n_embd=cfg.dim,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.ffn_dim,
            n_positions=cfg.max_seq_len,
            n_ctx=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new",
        )
    diffusion = dict(mask_token_id=cfg.mask_token_id, attention=cfg.attention, dlm_config=cfg.to_dict())
    return {**arch, **common, **diffusion}


# ---------------------------------------------------------------------------- import


class HFCheckpoint:
    """Lazy view of a HF folder in our parameter names and layouts."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{self.folder}: no config.json (not a Hugging Face style checkpoint folder)")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        if raw.get("model_type") is None and isinstance(raw.get("config"), dict):
            raw = raw["config"]  # PyTorchModelHubMixin keeps an init argument `config` nested
        self.config = config_from_hf(raw, str(cfg_path))
        self._files = self._tensor_files()  # HF name -> file
        self.mixin = any(k.startswith(MIXIN_BODY) for k in self._files)  # the seed's DiffuGPT layout
        if self.mixin:
            rows = self._mixin_vocab()
            self.config = self.config.replace(vocab_size=rows, base_vocab_size=rows)
        self._map = self._resolve(hf_key_map(self.config))
        if self.mixin and self.config.tie_embeddings and "lm_head.weight" in self._files:
            self._check_tied()
        with torch.device("meta"):
            self._shapes = {k: tuple(v.shape) for k, v in build_model(self.config).state_dict().items()}

    def _tensor_files(self) -> dict[str, Path]:
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return dict.fromkeys(f.keys(), single)  # safe_open handles are not iterable
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
            files = {k: self.folder / v for k, v in weight_map.items()}
            for p in set(files.values()):
                if not p.is_file():
                    raise FileNotFoundError(f"{index}: names shard {p.name}, which is missing")
            return files
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
            raise ValueError(
                f"{self.folder}: only pickle weights (*.bin / *.pt) found; convert them to safetensors (pickles are never loaded)"
            )
        raise FileNotFoundError(f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def _mixin_vocab(self) -> int:
        """A DiffuGPT folder's vocabulary: the rows of its embedding table (resized to the
        tokenizer's length; config.json may still give the base model's)."""
        if MIXIN_EMBED not in self._files:
            raise KeyError(f"{self.folder}: denoise_model.* tensors but no {MIXIN_EMBED!r}")
        with safe_open(self._files[MIXIN_EMBED], framework="pt") as f:
            return f.get_slice(MIXIN_EMBED).get_shape()[0]

    def _check_tied(self) -> None:
        """DiffuGPT stores lm_head.weight beside the embeddings; our GPT-2 ties them, so they must agree."""
        with safe_open(self._files["lm_head.weight"], framework="pt") as f:
            head = f.get_tensor("lm_head.weight")
        with safe_open(self._files[MIXIN_EMBED], framework="pt") as f:
            embed = f.get_tensor(MIXIN_EMBED)
        if head.shape != embed.shape or not torch.equal(head, embed):
            raise ValueError(
                f"{self.folder}: lm_head.weight differs from {MIXIN_EMBED}; untied GPT-2 heads are not implemented"
            )

    def _stored_name(self, theirs: str) -> str:
        """The name of an HF tensor in the DiffuGPT layout: wte / embed_tokens split off, the rest
        of the transformer under denoise_model."""
        if theirs in ("transformer.wte.weight", "model.embed_tokens.weight"):
            return MIXIN_EMBED
        if theirs.startswith(("transformer.", "model.")):
            return MIXIN_BODY + theirs.split(".", 1)[1]
        return theirs

    def _resolve(self, wanted: dict[str, tuple[str, bool]]) -> dict[str, tuple[str, bool]]:
        """Match expected HF names against stored ones, with or without the `model.` /
        `transformer.` prefix (the original GPT-2 uploads have none), or in the DiffuGPT layout."""
        resolved = {}
        for ours, (theirs, transposed) in wanted.items():
            if self.mixin:
                theirs = self._stored_name(theirs)
            bare = theirs.split(".", 1)[1] if theirs.startswith(("model.", "transformer.")) else theirs
            name = theirs if theirs in self._files else bare if bare in self._files else None
            if name is None:
                raise KeyError(f"{self.folder}: tensor {theirs!r} (for {ours}) is missing from the checkpoint")
            resolved[ours] = (name, transposed)
        used = {n for n, _ in resolved.values()}
        tied_head = {"lm_head.weight"} if self.config.tie_embeddings else set()
        extra = [k for k in self._files if k not in used and k not in tied_head and not k.endswith(_IGNORED_SUFFIXES)]
        if extra:
            raise KeyError(f"{self.folder}: unexpected tensors for a {self.config.family} model: {sorted(extra)[:8]}")
        return resolved

    def keys(self) -> list[str]:
        return list(self._map)

    def tensor(self, name: str) -> torch.Tensor:
        """One parameter in our layout (stored dtype), read from disk on demand."""
        if name not in self._map:
            raise KeyError(f"{self.folder}: no parameter {name!r}; known: {self.keys()[:4]}...")
        theirs, transposed = self._map[name]
        with safe_open(self._files[theirs], framework="pt") as f:
            t = f.get_tensor(theirs)
        expected = self._shapes[name]
        got = tuple(t.t().shape if transposed else t.shape)
        if got != expected:
            raise ValueError(
                f"{self._files[theirs]}: tensor {theirs!r} has shape {tuple(t.shape)}, config implies {expected}"
            )
        return t.t().contiguous() if transposed else t


def load_hf_model(
    folder: str | os.PathLike,
    mask_token_id: str | int | None = "append",
    attention: str = "bidirectional",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Llama | GPT2:
    """A model from a HF folder. mask_token_id: "append" adds a new `[MASK]` (unless the folder is
    our export and has one), an int reuses that existing id, None keeps the AR original."""
    if not (
        mask_token_id in ("append", None) or (isinstance(mask_token_id, int) and not isinstance(mask_token_id, bool))
    ):
        raise ValueError(f"mask_token_id must be 'append', an int or None, got {mask_token_id!r}")
    if attention not in ("bidirectional", "causal"):
        raise ValueError(f"attention must be 'bidirectional' or 'causal', got {attention!r}")
    ckpt = HFCheckpoint(folder)
    cfg = ckpt.config
    state = {k: ckpt.tensor(k) for k in ckpt.keys()}  # noqa: SIM118 (HFCheckpoint is not a mapping)
    if cfg.mask_token_id is not None:
        if isinstance(mask_token_id, int) and mask_token_id != cfg.mask_token_id:
            raise ValueError(f"{folder}: checkpoint already uses [MASK] id {cfg.mask_token_id}, not {mask_token_id}")
    elif mask_token_id is not None:
        state, cfg = add_mask_token(state, cfg, mask_token_id if isinstance(mask_token_id, int) else None)
    cfg = cfg.replace(attention=attention)
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device)


# ---------------------------------------------------------------------------- export


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_hf_model(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    cfg: ModelConfig,
    folder: str | os.PathLike,
    tokenizer_from: str | os.PathLike | None = None,
    max_shard_size: int | None = None,
) -> Path:
    """Write `folder` as a HF checkpoint (sharded when `max_shard_size` bytes is given).
    Expects a full (unsharded) state dict; gather FSDP parameters before calling."""
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    key_map = hf_key_map(cfg)
    missing, unexpected = set(key_map) - set(state), set(state) - set(key_map)
    if missing or unexpected:
        raise KeyError(
            f"state dict does not match the {cfg.family} config: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    tensors = {}
    for ours, (theirs, transposed) in key_map.items():
        t = state[ours]
        if type(t).__name__ == "DTensor":
            raise TypeError(f"{ours} is a sharded DTensor; gather a full state dict before exporting")
        t = t.detach().cpu()
        tensors[theirs] = (t.t() if transposed else t).contiguous()

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    if max_shard_size is None:
        _write_safetensors(out / SINGLE_FILE, tensors)
        written.add(SINGLE_FILE)
    else:
        shards = _shards(tensors, max_shard_size)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / name, shard)
            weight_map.update(dict.fromkeys(shard, name))
            written.add(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(INDEX_FILE)
    # drop weights of an earlier export so loaders cannot pick up a stale layout
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    atomic_write_json(out / "config.json", config_to_hf(cfg, state["tok_embeddings.weight"].dtype))

    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        found = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) to copy")
        for f in found:
            atomic_write(out / f.name, functools.partial(shutil.copyfile, f))
    return out
