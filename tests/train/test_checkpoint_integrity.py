"""Checkpoint content hashes: a committed checkpoint whose shard was cut short or overwritten
with garbage of the same size is named and skipped (automatic resume) or refused (explicit
path). One process, gloo."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.distributed as dist

from dlm.train.checkpoint import COMPLETE, SUMS_FILE, Checkpointer, CheckpointError
from dlm.train.parallelize import free_port


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save_two(folder) -> tuple[Checkpointer, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    ckpt = Checkpointer(folder, keep_last=3, rank=0, world_size=1)
    for step in (1, 2):
        ckpt.save(step, model, opt, {"step": step})
    return ckpt, model, opt


def _shard(path):
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_hashes_recorded_for_every_file(tmp_path):
    ckpt, _, _ = _save_two(tmp_path / "ckpts")
    path = ckpt.latest()
    sums = json.loads((path / SUMS_FILE).read_text())
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(sums) == [f for f in files if f not in (SUMS_FILE, COMPLETE)]
    assert "trainer_state.json" in sums and "rng/rank_00000.safetensors" in sums and ".metadata" in sums
    assert ckpt.damage(path) == [] and ckpt.resume_point("auto") == path


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing"])
def test_damaged_newest_falls_back_with_warning(tmp_path, how, caplog):
    ckpt, model, opt = _save_two(tmp_path / "ckpts")
    newest = ckpt.latest()
    shard = _shard(newest)
    data = shard.read_bytes()
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        shard.write_bytes(bytes(len(data)))  # same size: only the hash can tell
    else:
        shard.unlink()
    with caplog.at_level(logging.WARNING, logger="dlm"):
        path = ckpt.resume_point("auto")
    assert path == tmp_path / "ckpts" / "step_00000001"
    text = caplog.text
    assert f"checkpoint {newest} (step 2) is damaged: {shard.name}" in text, text
    assert not newest.exists() and newest.with_name("step_00000002.damaged").is_dir()
    assert ckpt.load(path, model, opt)["step"] == 1
    # the step can be saved again (the damaged folder no longer counts as committed)
    assert (ckpt.save(2, model, opt, {"step": 2}) / COMPLETE).is_file()
    assert ckpt.resume_point("auto") == newest


def test_damaged_explicit_checkpoint_is_refused(tmp_path):
    ckpt, _, _ = _save_two(tmp_path / "ckpts")
    newest = ckpt.latest()
    shard = _shard(newest)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} is damaged: {shard.name} does not match"):
        ckpt.resume_point(str(newest))


def test_all_damaged_is_an_error(tmp_path):
    ckpt, _, _ = _save_two(tmp_path / "ckpts")
    for _, p in [(1, tmp_path / "ckpts" / "step_00000001"), (2, ckpt.latest())]:
        (p / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        ckpt.resume_point("auto")
