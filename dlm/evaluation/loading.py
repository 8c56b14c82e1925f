"""Model + tokenizer for generation and evaluation, from a training checkpoint (or run folder)
or a Hugging Face style folder."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dlm.models import GPT2, Llama
from dlm.tokenizer import Tokenizer, load_tokenizer
from dlm.train.checkpoint import STATE_FILE, checkpoint_model, resolve_checkpoint

if TYPE_CHECKING:
    from dlm.sft import SFTFormat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face style folder (config.json, no trainer state), as opposed to a training
    checkpoint or run folder."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / STATE_FILE).exists()


def load_model(
    path: str | Path, ar: bool = False, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> Llama | GPT2:
    """The one way to load a model for generation, evaluation and export checks: from a training
    checkpoint, a run folder (its newest complete checkpoint) or a Hugging Face style folder, in
    eval mode. dtype is a key of DTYPES.

    A Hugging Face folder loads as a diffusion model ([MASK] appended if it has none, its recorded
    attention), or with `ar` as the AR original exactly as published (causal attention, no [MASK]
    row: nothing changes its distribution). A training checkpoint is always a diffusion model; in
    `ar` mode it is scored through the causal layout."""
    from dlm.models.hf import HFCheckpoint, load_hf_model

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    p = Path(path)
    if not is_hf_folder(p):
        return checkpoint_model(p, device=device, dtype=DTYPES[dtype]).eval()
    if ar:
        model = load_hf_model(p, mask_token_id=None, attention="causal", device=device, dtype=DTYPES[dtype])
    else:
        attention = HFCheckpoint(p).config.attention
        model = load_hf_model(p, mask_token_id="append", attention=attention, device=device, dtype=DTYPES[dtype])
    return model.eval()


def unadapted_ar_folder(path: str | Path) -> bool:
    """A Hugging Face folder of a plain AR model (no [MASK] in its config). Loading one for diffusion
    appends a mean-initialised [MASK] and switches to bidirectional attention: its samples and
    ELBO scores mean nothing until the model is adapted."""
    from dlm.models.hf import HFCheckpoint

    return is_hf_folder(path) and HFCheckpoint(Path(path)).config.mask_token_id is None


def check_adapted(path: str | Path, allow: bool) -> None:
    """Refuse diffusion use of a never-adapted AR folder unless `allow`; then warn loudly."""
    if not unadapted_ar_folder(path):
        return
    what = (
        f"{path} is a plain AR model (no [MASK] token): used as a diffusion model it gets a "
        "mean-initialised [MASK] and bidirectional attention it was never trained with, so its "
        "outputs are meaningless"
    )
    if not allow:
        raise ValueError(f"{what}; adapt it first, pass --ar for the AR model, or --allow-unadapted to run anyway")
    print(f"WARNING: {what} (--allow-unadapted)", file=sys.stderr)


def train_state(path: str | Path) -> dict | None:
    """The trainer state of a training checkpoint (a run folder: its newest complete one);
    None for a Hugging Face style folder."""
    p = Path(path)
    return None if is_hf_folder(p) else json.loads((resolve_checkpoint(p) / STATE_FILE).read_text())


def sft_layout(path: str | Path, tok: Tokenizer) -> SFTFormat | None:
    """The `[BOS] prompt [SEP] response [EOS] [PAD]` layout (dlm.sft.SFTFormat) a fine-tuning run
    trained with ([finetune] sep_id / pad_id, data.seq_len), so generation and evaluation prompt
    the model as it learned; None for a pretraining run or a Hugging Face folder."""
    from dlm.data.sft import sft_format

    state = train_state(path)
    cfg = (state or {}).get("train_config", {})
    if cfg.get("train", {}).get("stage", "pretrain") == "pretrain":
        return None
    ft = cfg.get("finetune", {})
    return sft_format(tok, cfg["data"]["seq_len"], ft.get("sep_id", -1), ft.get("pad_id", -1))


def _tokenizer_candidates(path: Path) -> list[str]:
    """Where a model folder's tokenizer may be: the folder itself (HF exports copy it), else what
    the training run recorded (its init folder, the sample tokenizer, the data store's tokenizer)."""
    state = train_state(path)
    if state is None:
        return [str(path)]
    cfg = state.get("train_config", {})
    found = [state.get("tokenizer_from"), cfg.get("metrics", {}).get("sample_tokenizer")]
    for store in cfg.get("data", {}).get("paths", []):
        plan = Path(store) / "plan.json"
        if plan.is_file():
            found.append(json.loads(plan.read_text()).get("tokenizer", {}).get("path"))
    return [c for c in found if c]


def find_tokenizer(model_path: str, tokenizer: str | None = None) -> Tokenizer:
    if tokenizer:
        return load_tokenizer(tokenizer)
    tried = []
    for cand in _tokenizer_candidates(Path(model_path)):
        try:
            return load_tokenizer(cand)
        except FileNotFoundError as e:
            tried.append(f"{cand} ({e})")
    tried_text = "; ".join(tried) or "nothing recorded"
    raise FileNotFoundError(f"no tokenizer found for {model_path} (tried: {tried_text}); pass --tokenizer")


def special_ids(model, tok: Tokenizer) -> tuple[int | None, int | None]:
    """(bos, eos): the tokenizer's, else the model config's."""
    bos = tok.bos_id if tok.bos_id is not None else model.config.bos_token_id
    eos = tok.eos_id if tok.eos_id is not None else model.config.eos_token_id
    return bos, eos


def run_main(main: Callable[[], int]) -> None:
    """Run a command-line `main` and exit with its status. Bad input (a missing file, a malformed
    record, an unknown key) ends in one clear `error:` line instead of a traceback."""
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
