"""`read_stats`: the one read-back of buffered step numbers, and the error that names a
non-finite step and its ranks (a world of one, in-process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dlm.diffusion import DiffusionConfig, host_layout, noise_batch
from dlm.train.parallelize import free_port
from dlm.train.step import DiffusionObjective, StepStats, read_stats


@pytest.fixture(scope="module")
def world_of_one():
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _stats(loss: float, stat: float, grad: float, tokens: float = 10.0) -> StepStats:
    d = torch.float64
    return StepStats(
        torch.tensor(loss, dtype=d),
        torch.tensor(stat, dtype=d),
        torch.tensor([tokens, tokens], dtype=d),
        torch.tensor(grad, dtype=d),
        lr=1e-3,
    )


def test_read_stats_values(world_of_one):
    out = read_stats([(1, _stats(2.0, 30.0, 0.5)), (2, _stats(1.5, 20.0, 0.25, tokens=0.0))], 1, 0)
    assert out == [
        {"loss": 2.0, "elbo": 3.0, "lr": 1e-3, "grad_norm": 0.5},
        {"loss": 1.5, "elbo": 20.0, "lr": 1e-3, "grad_norm": 0.25},  # no tokens: divided by 1, not 0
    ]
    assert read_stats([], 1, 0) == []


def test_read_stats_names_the_first_non_finite_step(world_of_one):
    pending = [(4, _stats(2.0, 30.0, 0.5)), (5, _stats(math.nan, 30.0, 0.5)), (6, _stats(math.inf, 1.0, 0.5))]
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 5 on rank\(s\) \[0\] \(this is rank 0\)"):
        read_stats(pending, 1, 0)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm inf at step 7"):
        read_stats([(7, _stats(2.0, 30.0, math.inf))], 1, 0)


def _packed(B: int = 3, L: int = 16) -> dict:
    pos = torch.cat([torch.arange(5), torch.arange(L - 5)]).expand(B, L).clone()
    return {
        "input_ids": torch.randint(3, 50, (B, L), generator=torch.Generator().manual_seed(0)),
        "position_ids": pos,
        "sample_ids": torch.arange(10, 10 + B),
    }


def test_host_layout_is_the_layout_of_the_cropped_batch():
    """What the trainer computes on the host equals what noise_batch derives on its own, crops
    included (random_length_prob 1: every row is cut)."""
    cfg = DiffusionConfig(mask_token_id=1, random_length_prob=1.0)
    batch = _packed()
    derived = noise_batch(batch, 0, cfg, 3).layout()
    given = noise_batch({**batch, **host_layout(batch, cfg)}, 0, cfg, 3).layout()
    assert torch.equal(given.cu_seqlens, derived.cu_seqlens) and given.max_seqlen == derived.max_seqlen
    assert len(derived.cu_seqlens) > 3 * 2 + 1  # the crops added segments


def test_objective_to_device_carries_the_host_layout():
    cfg = DiffusionConfig(mask_token_id=1, random_length_prob=0.5)
    batch = _packed()
    moved = DiffusionObjective(cfg, 3).to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["cu_seqlens"], host_layout(batch, cfg)["cu_seqlens"])
    assert set(moved) == set(batch) | {"cu_seqlens", "max_seqlen"}


def test_debug_mode_checks_a_given_layout(monkeypatch):
    cfg = DiffusionConfig(mask_token_id=1, random_length_prob=0.0)
    batch = _packed()
    wrong = {"cu_seqlens": torch.tensor([0, 16, 32, 48], dtype=torch.int32), "max_seqlen": 16}
    noise_batch({**batch, **wrong}, 0, cfg, 3).layout()  # trusted outside debug mode
    monkeypatch.setattr("dlm.debug._enabled", True)
    with pytest.raises(ValueError, match="do not match the position ids' segments"):
        noise_batch({**batch, **wrong}, 0, cfg, 3).layout()
