"""Activation checkpointing and per-block torch.compile leave the numbers unchanged (fp32, CPU).
FSDP sharding, weight streaming and clipping are covered end to end by test_trainer.py."""

from __future__ import annotations

import shutil

import pytest
import torch

from dlm.attention.layout import AttentionLayout
from dlm.models import build_model, preset
from dlm.train.config import ParallelSection
from dlm.train.parallelize import apply_ac, apply_compile


def _model():
    model = build_model(preset("tiny-llama").replace(n_layers=3))
    model.init_weights(seed=0)
    return model


def _run(model, ids, layout):
    model.zero_grad(set_to_none=True)
    logits = model(ids, layout)
    logits.float().logsumexp(-1).mean().backward()
    # parameter names as in the state dict (the checkpoint wrapper only adds a module level)
    return logits.detach(), {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
    }


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24).clone()  # two documents per row
    return ids, AttentionLayout.from_position_ids(pos)


def _assert_same(a, b, atol):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_is_exact(batch, mode):
    ref = _run(_model(), *batch)
    model = _model()
    apply_ac(model, ParallelSection(activation_checkpoint=mode, selective_every=2))
    wrapped = [type(b).__name__ == "CheckpointWrapper" for b in model.layers]
    assert wrapped == ([True, True, True] if mode == "full" else [True, False, True])
    assert set(model.state_dict()) == set(_model().state_dict())  # names unchanged: checkpoints interchange
    _assert_same(_run(model, *batch), ref, atol=0)


@pytest.mark.slow  # inductor compiles the block: tens of seconds
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_blocks_match_eager(batch):
    ref = _run(_model(), *batch)
    model = _model()
    apply_compile(model)
    assert set(model.state_dict()) == set(_model().state_dict())
    _assert_same(_run(model, *batch), ref, atol=1e-5)


def test_grad_norm_is_accumulated_in_fp64():
    """fp32 accumulation rounds differently for every sharding (a world-size change then drifts);
    the fp64 sum matches the exact norm of the fp32 gradients."""
    from dlm.train.parallelize import clip_grad_norm_

    model = _model()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * torch.logspace(-4, 2, p.numel()).reshape(p.shape)
    exact = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm()
    total = clip_grad_norm_(model, max_norm=0.0)
    assert total.dtype == torch.float64
    assert abs(total.item() - exact.item()) <= 1e-12 * exact.item()
    before = [p.grad.clone() for p in model.parameters()]
    clip_grad_norm_(model, max_norm=1.0)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, b * (1.0 / (exact.item() + 1e-6)), rtol=1e-6, atol=0)
