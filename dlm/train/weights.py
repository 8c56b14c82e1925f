"""Where the starting weights come from: a Hugging Face folder (the AR original, with a `[MASK]`
token added) or a fresh random init of a preset. Either way the trainer gets the final
ModelConfig and a function returning one full tensor by name, so `load_weights` can keep just
each rank's shard."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.models import build_model, preset
from dlm.models.config import ModelConfig
from dlm.models.mask_token import VOCAB_TABLES, add_mask_token
from dlm.train.config import ModelSection


@dataclass
class WeightSource:
    config: ModelConfig  # final: [MASK] included, attention mode and backend applied
    tensor: Callable[[str], torch.Tensor]
    tokenizer_from: str | None  # tokenizer (a file or a folder) an export copies


def _with_mask(cfg: ModelConfig, mask_id: int | None) -> ModelConfig:
    """The config after adding `[MASK]` (None: append a new id; the tables only matter for their
    shape here)."""
    if cfg.mask_token_id is not None:
        if mask_id is not None and mask_id != cfg.mask_token_id:
            raise ValueError(f"model already uses [MASK] id {cfg.mask_token_id}, config asks for {mask_id}")
        return cfg
    with torch.device("meta"):
        table = {"tok_embeddings.weight": torch.empty(cfg.vocab_size, cfg.dim)}
    _, cfg = add_mask_token(table, cfg, mask_id)
    return cfg


def weight_source(section: ModelSection, seed: int, data_tokenizer: dict | None = None) -> WeightSource:
    """`data_tokenizer`: the token store's tokenizer facts. A randomly initialised model takes its
    vocabulary and BOS/EOS ids from them (unless model.overrides sets vocab_size), so a
    from-scratch baseline fits whatever tokenizer the data was made with."""
    mask_id = section.mask_token if isinstance(section.mask_token, int) else None  # else "append"
    if section.init_from == "random":
        base = preset(section.preset)
        if data_tokenizer is not None and "vocab_size" not in section.overrides:
            v = data_tokenizer["vocab_size"]
            base = base.replace(
                vocab_size=v,
                base_vocab_size=v,
                bos_token_id=data_tokenizer.get("bos_id"),
                eos_token_id=data_tokenizer.get("eos_id"),
            )
        overrides = dict(section.overrides)
        if "vocab_size" in overrides and "base_vocab_size" not in overrides:
            overrides["base_vocab_size"] = overrides["vocab_size"]
        base = base.replace(**overrides)
        cfg = _with_mask(base, mask_id).replace(attention=section.attention, attn_backend=section.attn_backend)
        full: dict[str, torch.Tensor] = {}

        def random_tensor(name: str) -> torch.Tensor:
            # a single-process model initialised from `seed`: identical for every world size.
            # Random init is for small from-scratch baselines, so holding it on CPU is fine.
            if not full:
                model = build_model(cfg)
                model.init_weights(seed)
                full.update(model.state_dict())
            return full.pop(name)

        return WeightSource(cfg, random_tensor, data_tokenizer["path"] if data_tokenizer else None)

    from dlm.models.hf import HFCheckpoint

    ckpt = HFCheckpoint(section.init_from)
    if section.preset or section.overrides:
        raise ValueError(
            f"model.init_from = {section.init_from!r} takes its architecture from config.json; "
            "leave model.preset and model.overrides empty"
        )
    if data_tokenizer is not None:
        check_tokenizer(data_tokenizer, section.init_from)
    base = ckpt.config
    cfg = _with_mask(base, mask_id).replace(attention=section.attention, attn_backend=section.attn_backend)

    def hf_tensor(name: str) -> torch.Tensor:
        t = ckpt.tensor(name)
        if name in VOCAB_TABLES and t.shape[0] != cfg.vocab_size:
            # add_mask_token grows any vocabulary table the same way; one table at a time
            t = add_mask_token({"tok_embeddings.weight": t}, base, mask_id)[0]["tok_embeddings.weight"]
        return t

    return WeightSource(cfg, hf_tensor, section.init_from)


def check_tokenizer(data_tokenizer: dict, model_folder: str | Path) -> None:
    """Refuse data tokenized with another tokenizer than the model's (equal vocabulary sizes prove
    nothing). Compares content hashes: the store's against each tokenizer the model folder holds
    (tokenizer.json, tokenizer.model, GPT-2 files); a folder without one cannot be checked."""
    from dlm.tokenizer import tokenizer_sha256

    folder = Path(model_folder)
    held = {
        n: tokenizer_sha256(folder / n)
        for n in ("tokenizer.json", "tokenizer.model", "vocab.json")
        if (folder / n).is_file()
    }
    if held and data_tokenizer["sha256"] not in held.values():
        raise ValueError(
            f"the data was tokenized with {data_tokenizer.get('name') or data_tokenizer.get('path')} "
            f"(sha256 {data_tokenizer['sha256'][:12]}) but model.init_from {folder} holds another tokenizer "
            f"({', '.join(f'{n} sha256 {h[:12]}' for n, h in held.items())}): tokenize the data with the model's tokenizer"
        )
