"""Training configuration: a TOML file of typed sections plus dotted command-line overrides.

    torchrun ... launch/pretrain.py --config launch/configs/diffugpt_s.toml --optim.lr 3e-4

Every key must name a field of the dataclasses below; anything else is an error that names
the file (or flag) and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from dlm.atomic import atomic_write_text
from dlm.diffusion import DiffusionSettings
from dlm.models.config import ModelConfig


@dataclass
class ModelSection:
    """Which network to train. `preset` names an architecture (dlm.models.preset); `init_from`
    is "random" (fresh weights from `seed`) or a Hugging Face folder whose weights and config
    are loaded (then `preset` may stay empty). `overrides` changes ModelConfig fields of a
    preset (e.g. a tiny test model's vocab_size)."""

    preset: str = ""
    init_from: str = "random"
    mask_token: str | int = "append"  # "append": new id after the base vocabulary; int: reuse that id
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    attn_backend: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Tokenized Arrow stores (tokenize_fineweb output) blended by weight."""

    paths: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # empty: equal weights
    seq_len: int = 1024
    seed: int = 0
    num_workers: int = 0
    heldout_fraction: float = 0.001  # tail of each store reserved for evaluation (never trained on)
    allow_changed_index: bool = False  # resume even if the data index fingerprint changed


@dataclass
class OptimSection:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    decay: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.1  # final lr of cosine/linear decay, as a fraction of lr
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured and logged)


@dataclass
class FinetuneSection:
    """Fine-tuning data, read when train.stage is "sft" (diffusion) or "ar_sft" (the AR baseline):
    JSON lines / JSON / parquet records (dlm.data.sft) laid out as [BOS] prompt [SEP] response
    [EOS] [PAD]... in rows of data.seq_len, ordered by data.seed."""

    paths: list[str] = field(default_factory=list)
    format: Literal["gsm8k", "instruction", "fields"] = "fields"
    prompt_field: str = "prompt"  # format "fields"
    response_field: str = "response"
    tokenizer: str = ""  # "": the model.init_from folder's tokenizer
    sep_id: int = -1  # -1: the tokenizer's EOS id
    pad_id: int = -1  # -1: the tokenizer's EOS id
    pack: bool = False  # several examples per row, each its own attention segment
    overlong: Literal["error", "skip"] = "error"  # an example longer than data.seq_len: fail, or drop and count


@dataclass
class LoRASection:
    """LoRA adapters (dlm.lora); rank 0 trains every parameter. targets: ["all"] or module names
    (ours or Hugging Face's: q_proj, gate_proj, c_attn ...); extra_trainable: modules trained in
    full, e.g. ["embed_tokens"]."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all"])
    extra_trainable: list[str] = field(default_factory=list)


@dataclass
class TrainSection:
    stage: Literal["pretrain", "sft", "ar_sft"] = "pretrain"  # sft / ar_sft read [finetune], not data.paths
    run_dir: str = "runs/default"
    steps: int = 1000
    global_batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 1  # sequences per forward pass on one rank
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    debug: bool = False  # per-call value checks that read tensors back (dlm.debug): slower steps


@dataclass
class ParallelSection:
    activation_checkpoint: Literal["none", "selective", "full"] = "none"
    selective_every: int = 2  # "selective": checkpoint every n-th block
    compile: bool = False  # torch.compile each block
    reshard_after_forward: bool = True  # FSDP2: free unsharded params after forward (ZeRO-3)
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU


@dataclass
class CheckpointSection:
    interval: int = 500  # steps between checkpoints; 0: only on signals and at the end
    keep_last: int = 3
    resume: str = "auto"  # "auto": newest complete checkpoint in the run folder; "none"; or a path
    export_at_end: bool = True  # write an HF-style folder to run_dir/export


@dataclass
class MetricsSection:
    log_every: int = 10  # console line every n steps (TensorBoard and JSON lines get every step)
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per device; 0: look the device up in dlm.train.metrics.PEAK_TFLOPS
    sample_every: int = 0  # generated text to TensorBoard every n steps; 0 disables
    sample_tokenizer: str = ""  # tokenizer path used to decode samples
    sample_prompt: str = ""
    sample_length: int = 64
    sample_steps: int = 64


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------- parsing and type checking

_SCALARS = {bool: "true/false", int: "an integer", str: "a string"}  # what a mismatch message expects


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise naming `where`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value on the command line is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        if type(value) is not tp:  # exact type: TOML's true is not an integer
            raise ConfigError(f"{where}: expected {_SCALARS[tp]}, got {value!r}")
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(raw: dict, source: str) -> TrainConfig:
    sections = typing.get_type_hints(TrainConfig)
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
    built = {}
    for name, cls in sections.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        hints = typing.get_type_hints(cls)
        bad = set(values) - set(hints)
        if bad:
            raise ConfigError(f"{source}: unknown key(s) {sorted(f'{name}.{k}' for k in bad)}")
        kwargs = {k: _check_type(v, hints[k], f"{source}: {name}.{k}") for k, v in values.items()}
        try:
            built[name] = cls(**kwargs)
        except ValueError as e:  # a section's own validation (e.g. DiffusionSettings)
            raise ConfigError(f"{source}: [{name}] {e}") from e
    return TrainConfig(**built)


def _parse_value(text: str) -> Any:
    """A command-line value as a TOML literal (numbers, booleans, lists, quoted strings),
    else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, args: list[str]) -> dict:
    """Apply `--section.key value` (or `--section.key=value`) pairs to the raw TOML dict."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: expected --section.key VALUE, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {arg} has no value")
            key, text = arg[2:], args[i + 1]
            i += 2
        section, _, name = key.partition(".")
        if section == "model" and name.startswith("overrides."):
            raw.setdefault("model", {}).setdefault("overrides", {})[name.split(".", 1)[1]] = _parse_value(text)
        else:
            raw.setdefault(section, {})[name] = _check_override(section, name, _parse_value(text))
    return raw


def _check_override(section: str, name: str, value: Any) -> Any:
    """Type-check one override here, so an error names the flag rather than the TOML file."""
    where = f"command line --{section}.{name}"
    sections = typing.get_type_hints(TrainConfig)
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r}; known: {sorted(sections)}")
    hints = typing.get_type_hints(sections[section])
    if name not in hints:
        raise ConfigError(f"{where}: unknown key; [{section}] has {sorted(hints)}")
    _check_type(value, hints[name], where)
    return value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    raw = apply_overrides(raw, list(overrides))
    cfg = _build(raw, str(path) if path is not None else "command line")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no distributed state."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    if cfg.lora.rank and cfg.model.init_from == "random":
        raise ConfigError("lora.rank > 0 adapts pretrained weights: set model.init_from to a model folder")
    if t.stage != "pretrain":
        validate_finetune(cfg)
    elif not d.paths:
        raise ConfigError("data.paths is empty: name at least one tokenized store")
    for p in d.paths:
        if not Path(p).is_dir():
            raise ConfigError(f"data.paths: {p!r} is not a folder (expected a token store written by tokenize_fineweb)")
    if d.weights and len(d.weights) != len(d.paths):
        raise ConfigError(f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size {t.micro_batch_size}"
        )
    if t.steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {t.steps}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {o.betas}")
    if o.warmup_steps < 0 or not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if cfg.model.init_from == "random" and not cfg.model.preset:
        raise ConfigError("model.init_from = 'random' needs model.preset to name the architecture")
    if cfg.model.init_from != "random" and not Path(cfg.model.init_from).is_dir():
        raise ConfigError(f"model.init_from: {cfg.model.init_from!r} is neither 'random' nor a folder")
    if isinstance(cfg.model.mask_token, str) and cfg.model.mask_token != "append":
        raise ConfigError(f"model.mask_token must be 'append' or an integer id, got {cfg.model.mask_token!r}")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = set(cfg.model.overrides) - model_fields
    if bad:
        raise ConfigError(f"model.overrides: unknown ModelConfig field(s) {sorted(bad)}")
    if cfg.parallel.selective_every < 1:
        raise ConfigError("parallel.selective_every must be >= 1")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if cfg.metrics.sample_every > 0 and not cfg.metrics.sample_tokenizer:
        raise ConfigError("metrics.sample_every > 0 needs metrics.sample_tokenizer to decode samples")


def validate_finetune(cfg: TrainConfig) -> None:
    f, stage = cfg.finetune, cfg.train.stage
    if cfg.data.paths:
        raise ConfigError(
            f"train.stage = {stage!r} reads finetune.paths; data.paths is for pretraining, leave it empty"
        )
    if not f.paths:
        raise ConfigError(f"train.stage = {stage!r} needs finetune.paths (JSON lines / JSON / parquet files)")
    for p in f.paths:
        if not Path(p).exists():
            raise ConfigError(f"finetune.paths: {p!r} does not exist")
    if not f.tokenizer and cfg.model.init_from == "random":
        raise ConfigError("finetune.tokenizer is needed when model.init_from = 'random'")
    if stage == "sft" and cfg.diffusion.random_length_prob > 0:
        raise ConfigError(
            "diffusion.random_length_prob must be 0 for SFT: a random crop would cut responses (the layout's "
            "padding already teaches where a response ends)"
        )
    if stage == "ar_sft" and cfg.model.attention != "causal":
        raise ConfigError("train.stage = 'ar_sft' trains a causal model: set model.attention = 'causal'")
    if cfg.lora.rank < 0 or not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError("lora.rank must be >= 0 and lora.dropout in [0, 1)")


def check_world(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank per step; refuses a global batch that does not split evenly."""
    t = cfg.train
    per_step = world_size * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by world size {world_size} "
            f"x micro_batch_size {t.micro_batch_size}"
        )
    return t.global_batch_size // per_step


# ---------------------------------------------------------------- writing the resolved config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: TrainConfig) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Atomic write of the resolved config; it loads back with `load_config(path)`."""
    atomic_write_text(path, to_toml(cfg))
