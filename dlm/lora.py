"""LoRA (Hu et al. 2021) for dlm models, small enough to read in one sitting:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,      A [r, in], B [out, r], B = 0 at init

`apply_lora` swaps the targeted `nn.Linear` layers of the attention and MLP blocks for
`LoRALinear` (same `weight` / `bias` names, so base checkpoints load unchanged), freezes every
base parameter and leaves trainable only the adapters plus any `extra_trainable` modules (the
seed's `additional_target: embed_tokens`: the `[MASK]` row must be learnable when it is new).
It works on the meta device, before FSDP2 shards the model: the frozen base is sharded like any
parameter, and the trainer's DCP checkpoints then hold only the trainable tensors.

`merge_lora` folds every adapter into its base weight (W += scale * B A) and turns the layers
back into plain `nn.Linear`, so the model exports as an ordinary Hugging Face folder.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "is_lora_param",
    "load_lora_checkpoint",
    "lora_init",
    "merge_lora",
    "trainable_names",
    "with_lora_init",
]

# Hugging Face module names -> ours (LLaMA and GPT-2); GPT-2's c_proj names two layers
HF_ALIASES: dict[str, tuple[str, ...]] = {
    "q_proj": ("wq",),
    "k_proj": ("wk",),
    "v_proj": ("wv",),
    "o_proj": ("wo",),
    "gate_proj": ("w1",),
    "down_proj": ("w2",),
    "up_proj": ("w3",),
    "c_attn": ("wqkv",),
    "c_fc": ("fc",),
    "c_proj": ("wo", "proj"),
    "embed_tokens": ("tok_embeddings",),
    "wte": ("tok_embeddings",),
    "wpe": ("pos_embeddings",),
    "lm_head": ("output",),
}
_LORA_SUFFIXES = (".lora_A", ".lora_B")


@dataclass(frozen=True)
class LoRAConfig:
    """rank 0 disables LoRA (full fine-tuning). targets: ["all"] (every linear layer of the
    attention and MLP blocks) or module names, ours (wq, w1, wqkv, fc, ...) or Hugging Face's
    (q_proj, gate_proj, c_attn, ...). extra_trainable: whole modules trained in full, e.g.
    ["embed_tokens"] (tied models: the output head is the same matrix)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all"])
    extra_trainable: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: name 'all' or at least one module")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Linear):
    """A frozen `nn.Linear` plus a trainable low-rank update. The dropout draws from the global
    torch RNG, so with dropout > 0 runs on different world sizes are not bit-identical."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: LoRAConfig, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scale = cfg.scale
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, cfg.rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scale={self.scale}"


def is_lora_param(name: str) -> bool:
    return name.endswith(_LORA_SUFFIXES)


def lora_init(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Initial value of adapter parameter `name`: B = 0; A Kaiming-uniform (as nn.Linear and peft),
    drawn from a generator keyed by (seed, name) so every rank and world size builds the same A."""
    if name.endswith(".lora_B"):
        return torch.zeros(*shape)
    if not name.endswith(".lora_A"):
        raise ValueError(f"{name} is not a LoRA parameter")
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
    return (torch.rand(*shape, generator=g) * 2 - 1) * bound


def _expand(names: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for n in names:
        out.update(HF_ALIASES.get(n, (n,)))
    return out


def _targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Qualified names of the linear layers to adapt (inside the transformer blocks only: the
    output head is computed from `output_weight()` by the fused loss, not called as a module)."""
    wanted = _expand(cfg.targets)
    found = []
    layers: nn.Module = model.layers  # type: ignore[assignment]
    for name, module in layers.named_modules(prefix="layers"):
        if type(module) is nn.Linear and ("all" in wanted or name.rsplit(".", 1)[-1] in wanted):
            found.append(name)
    if not found:
        raise ValueError(f"lora.targets {cfg.targets} match no linear layer of the model's blocks")
    if "all" not in wanted:
        leaves = {n.rsplit(".", 1)[-1] for n in found}
        unknown = wanted - leaves
        if unknown:
            raise ValueError(f"lora.targets: no linear layer named {sorted(unknown)} in the model's blocks")
    return found


def _extra(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Parameter names of the fully trainable extra modules."""
    params = dict(model.named_parameters())
    out = []
    for module in sorted(_expand(names)):
        hits = [p for p in params if p == module or p.startswith(module + ".")]
        if not hits:
            raise ValueError(f"lora.extra_trainable: the model has no module {module!r}")
        out += hits
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Adapt `model` in place; returns the names of the trainable parameters. New adapters are
    initialised with `lora_init` unless the model lives on the meta device (the trainer then fills
    them through `load_weights`)."""
    if not cfg.enabled:
        raise ValueError("apply_lora needs lora.rank > 0")
    for name in _targets(model, cfg):
        parent_name, leaf = name.rsplit(".", 1)
        parent, old = model.get_submodule(parent_name), model.get_submodule(name)
        assert isinstance(old, nn.Linear)
        new = LoRALinear(
            old.in_features,
            old.out_features,
            old.bias is not None,
            cfg,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        new.weight = old.weight
        if old.bias is not None:
            new.bias = old.bias
        if old.weight.device.type != "meta":
            with torch.no_grad():
                for p in ("lora_A", "lora_B"):
                    getattr(new, p).copy_(lora_init(f"{name}.{p}", getattr(new, p).shape, cfg.seed))
        parent.register_module(leaf, new)
    trainable = set(_extra(model, cfg.extra_trainable))
    for pname, param in model.named_parameters():
        param.requires_grad_(is_lora_param(pname) or pname in trainable)
    return trainable_names(model)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain `nn.Linear` layers back (in place;
    the model is returned for chaining). Needs full, unsharded tensors."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, leaf = name.rsplit(".", 1)
            plain = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
            plain.weight.copy_(module.merged_weight())
            if module.bias is not None:
                plain.bias.copy_(module.bias)
            model.get_submodule(parent_name).register_module(leaf, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def with_lora_init(model: nn.Module, tensor: Callable[[str], torch.Tensor], seed: int) -> Callable[[str], torch.Tensor]:
    """A weight source for `dlm.train.parallelize.load_weights` on an adapted (meta) model: base
    tensors from `tensor`, adapters from `lora_init`."""
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if is_lora_param(n)}
    return lambda name: lora_init(name, shapes[name], seed) if name in shapes else tensor(name)


def load_lora_checkpoint(ckpt: Path, state: dict) -> nn.Module:
    """The merged model of a LoRA training checkpoint (which holds only the trainable tensors):
    the base rebuilt from the run's model section, the adapters and extras read from DCP, then
    `merge_lora`. The base (model.init_from) must still be where the run found it."""
    import torch.distributed.checkpoint as dcp

    from dlm.models import build_model
    from dlm.models.config import ModelConfig
    from dlm.train.config import LoRASection, ModelSection
    from dlm.train.weights import weight_source

    train_cfg = state["train_config"]
    section = ModelSection(**train_cfg["model"])
    if section.init_from == "random" or not Path(section.init_from).is_dir():
        raise FileNotFoundError(
            f"{ckpt} holds LoRA adapters only; their base model {section.init_from!r} (model.init_from) is not a folder"
        )
    source = weight_source(section, train_cfg["train"]["seed"])
    saved = ModelConfig.from_dict(state["model_config"])
    if source.config.replace(attn_backend="auto") != saved.replace(attn_backend="auto"):
        raise ValueError(f"{ckpt}: the base model in {section.init_from} no longer matches the run's model config")
    lcfg = LoRAConfig(**LoRASection(**train_cfg["lora"]).__dict__, seed=train_cfg["train"]["seed"])
    with torch.device("meta"):
        model = build_model(saved)
    model.load_state_dict({n: source.tensor(n) for n in model.state_dict()}, assign=True)
    trainable = apply_lora(model, lcfg)  # base on CPU now: adapters are created there too
    sd = model.state_dict()
    wanted = {n: sd[n] for n in trainable}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": wanted}, checkpoint_id=ckpt, no_dist=True)  # in place into the live tensors
    return merge_lora(model)
