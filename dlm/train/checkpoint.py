"""Training checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

A checkpoint is the folder `<run>/checkpoints/step_XXXXXXXX/` holding
  - DCP shards of the model and optimizer (sharded DTensors; DCP reshards them on load, so a
    job may resume on a different number of ranks),
  - `trainer_state.json`: step, tokens seen, data resume state, scheduler, configs,
  - `rng/rank_XXXXX.safetensors`: each rank's torch RNG states,
  - `SHA256SUMS.json`: the sha256 of every other file (hashed by all ranks, a share each),
  - `COMPLETE`, written last.
Everything is first written to `step_XXXXXXXX.tmp/`, which rank 0 renames once all ranks are
done; the marker follows the rename. A folder without the marker is never resumed from, so a
job killed while writing resumes from the previous checkpoint. A committed checkpoint whose
files no longer match their hashes (a damaged disk, a truncated copy) is named in a warning and
skipped when resuming automatically, and refused when named explicitly.

DCP stores its metadata with pickle: only load checkpoints this code wrote (trusted files).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dlm.atomic import atomic_write, atomic_write_json, atomic_write_text, fsync_dir
from dlm.data.store import sha256_file
from dlm.models import GPT2, Llama, build_model
from dlm.models.config import ModelConfig

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
SUMS_FILE = "SHA256SUMS.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of committed checkpoints, oldest first; anything without COMPLETE is skipped."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, a checkpoints folder or a run folder (newest complete)."""
    p = Path(path)
    if (p / COMPLETE).is_file():
        return p
    if (p / STATE_FILE).is_file():
        raise ValueError(f"{p}: checkpoint has no {COMPLETE} marker (interrupted while being written)")
    for folder in (p / "checkpoints", p):
        found = complete_checkpoints(folder)
        if found:
            return found[-1][1]
    raise FileNotFoundError(f"{p}: no complete training checkpoint (a step_XXXXXXXX folder with {COMPLETE}) found")


class CheckpointError(ValueError):
    """A committed checkpoint whose files do not match the hashes recorded when it was written."""


def _files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder except the hash list and the marker, relative, sorted."""
    out = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(n for n in out if n not in (SUMS_FILE, COMPLETE))


def _gather(obj: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Saves and restores the full training state; every rank calls every method."""

    def __init__(self, folder: Path, keep_last: int, rank: int, world_size: int, trainable_only: bool = False):
        """trainable_only: model tensors saved and restored are the trainable ones (LoRA: adapters
        and extras; the frozen base comes from model.init_from on every start)."""
        self.folder = folder
        self.keep_last = keep_last
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        self.rank = rank
        self.world_size = world_size
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for p in folder.iterdir():  # debris of interrupted saves
                if p.is_dir() and (p.name.endswith(".tmp") or (_NAME.match(p.name) and not (p / COMPLETE).exists())):
                    logger.warning("removing incomplete checkpoint %s", p)
                    shutil.rmtree(p)
        dist.barrier()

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.folder)
        return found[-1][1] if found else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write checkpoint `step`; `state` is the JSON-serialisable trainer state."""
        final = self.folder / checkpoint_name(step)
        if (final / COMPLETE).is_file():
            return final  # already committed (e.g. the final step coincides with an interval)
        tmp = self.folder / (final.name + ".tmp")
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        save_file(_rng_state(), str(tmp / "rng" / f"rank_{self.rank:05d}.safetensors"))
        if self.rank == 0:
            atomic_write_text(tmp / STATE_FILE, json.dumps({**state, "world_size": self.world_size}, indent=1))
        dist.barrier()  # every rank's files are on disk
        names = _files(tmp)
        sums = {}
        for part in _gather({n: sha256_file(tmp / n) for n in names[self.rank :: self.world_size]}):
            sums.update(part)
        if self.rank == 0:
            atomic_write_json(tmp / SUMS_FILE, sums)
            os.replace(tmp, final)
            atomic_write_text(final / COMPLETE, f"step {step}\n")
            fsync_dir(self.folder)
            for _, old in complete_checkpoints(self.folder)[: -self.keep_last]:
                shutil.rmtree(old)
            logger.info("checkpoint %s committed (%.2f MB)", final, _bytes(final) / 1e6)
        dist.barrier()
        return final

    def damage(self, path: Path) -> list[str]:
        """What is wrong with a committed checkpoint's files (empty: intact). Collective: each
        rank hashes a share of the files."""
        sums_file = path / SUMS_FILE
        if not sums_file.is_file():
            if self.rank == 0:
                logger.warning("checkpoint %s has no %s (written by an older version): not verified", path, SUMS_FILE)
            return []
        try:
            sums = json.loads(sums_file.read_text())
        except (OSError, ValueError) as e:
            return [f"{SUMS_FILE} is unreadable ({e})"]
        names = sorted(sums)
        mine = []
        for n in names[self.rank :: self.world_size]:
            f = path / n
            if not f.is_file():
                mine.append(f"{n} is missing")
            elif sha256_file(f) != sums[n]:
                mine.append(f"{n} does not match its recorded sha256 ({f.stat().st_size} bytes)")
        return sorted(p for part in _gather(mine) for p in part)

    def resume_point(self, setting: str) -> Path | None:
        """The checkpoint to resume from for `checkpoint.resume`: "none"; "auto" (the newest
        intact complete checkpoint: a damaged newer one is named in a warning and skipped); or a
        path (refused, naming it, when damaged). Collective."""
        if setting == "none":
            return None
        if setting != "auto":
            path = resolve_checkpoint(setting)
            problems = self.damage(path)
            if problems:
                raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
            return path
        damaged = []
        for step, path in reversed(complete_checkpoints(self.folder)):
            problems = self.damage(path)
            if not problems:
                return path
            # moved aside: kept for inspection, and a later save of this step is not mistaken for done
            aside = path.with_name(path.name + ".damaged")
            if self.rank == 0:
                logger.warning(
                    "checkpoint %s (step %d) is damaged: %s; moved to %s, trying the previous one",
                    path,
                    step,
                    "; ".join(problems),
                    aside.name,
                )
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
            damaged.append(str(path))
            dist.barrier()
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.folder}: {', '.join(damaged)} damaged")
        return None

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model and optimizer shards (resharded to this world size) and this rank's RNG
        state when the world size is unchanged; returns the trainer state."""
        state = json.loads((path / STATE_FILE).read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=self.options)
        if state["world_size"] == self.world_size:
            _set_rng_state(load_file(str(path / "rng" / f"rank_{self.rank:05d}.safetensors")))
        else:
            logger.info(
                "world size changed (%d -> %d): RNG states not restored (data order and noise do not depend on them)",
                state["world_size"],
                self.world_size,
            )
        return state


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ---------------------------------------------------------------- inference-side loading


def checkpoint_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Llama | GPT2:
    """The full model a training checkpoint holds (a run folder: its newest complete one), read
    in this one process whatever world size wrote it; a LoRA run's adapters come merged into
    their base. Inference code loads any model folder with `dlm.evaluation.loading.load_model`."""
    p = Path(path)
    ckpt = resolve_checkpoint(p)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("train_config", {}).get("lora", {}).get("rank", 0) > 0:
        from dlm.lora import load_lora_checkpoint  # adapters only: base + adapters, merged

        merged = load_lora_checkpoint(ckpt, state)
        if not isinstance(merged, (Llama, GPT2)):
            raise TypeError(f"{ckpt}: merged LoRA model is a {type(merged).__name__}")
        return merged.to(device=device, dtype=dtype).eval()
    cfg = ModelConfig.from_dict(state["model_config"])
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    # no_dist: read the full tensors in this one process, whatever world size wrote them
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": sd}, checkpoint_id=ckpt, no_dist=True)
    model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype).eval()


def export_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """Write a training checkpoint as a Hugging Face style folder (config.json + safetensors) with
    its tokenizer: `tokenizer_from`, else the one the run recorded (its init folder or the data's
    tokenizer file). A recorded tokenizer that is no longer there is named in a warning."""
    from dlm.models.hf import save_hf_model

    ckpt = resolve_checkpoint(path)
    state = json.loads((ckpt / STATE_FILE).read_text())
    model = checkpoint_model(ckpt, dtype=dtype or torch.float32)
    folder = save_hf_model(model, model.config, out)
    src = tokenizer_from or state.get("tokenizer_from")
    if src is None:
        logger.warning("export %s holds no tokenizer: %s records none (pass one to copy)", folder, ckpt)
        return folder
    try:
        export_tokenizer(src, folder)
    except FileNotFoundError as e:
        if tokenizer_from is not None:
            raise
        logger.warning("export %s holds no tokenizer: the run's tokenizer is gone (%s)", folder, e)
    return folder


# how an exported folder names each kind of tokenizer, so Hugging Face loaders and ours find it
_EXPORT_NAMES = {
    "sentencepiece": ["tokenizer.model"],
    "hf": ["tokenizer.json", "tokenizer_config.json"],
    "gpt2": ["vocab.json", "merges.txt"],
}


def export_tokenizer(src: str | os.PathLike, out: Path) -> list[str]:
    """Copy a tokenizer into the HF folder `out` and return the names written: every tokenizer
    file of an HF-style folder, or a single tokenizer given by path under its standard name (a
    SentencePiece `spm.model` becomes `tokenizer.model`)."""
    from dlm.models.hf import TOKENIZER_FILES
    from dlm.tokenizer import resolve_tokenizer

    p = Path(src)
    if p.is_dir() and any((p / n).is_file() for n in TOKENIZER_FILES):
        files = {n: p / n for n in TOKENIZER_FILES if (p / n).is_file()}
    else:
        kind, found = resolve_tokenizer(p)
        files = dict(zip(_EXPORT_NAMES[kind], found))
    for name, f in files.items():
        atomic_write(out / name, functools.partial(shutil.copyfile, f))
    return sorted(files)
