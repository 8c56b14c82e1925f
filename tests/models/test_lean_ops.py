"""dlm.models.lean_ops against their autograd references: same forward, same gradients (fp32
tight, bf16 within 1e-2), less saved for backward; and the LLaMA block keeps LoRA's own path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dlm.lora import LoRAConfig, LoRALinear, apply_lora
from dlm.models import build_model, preset
from dlm.models import lean_ops as ops

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves while `fn` runs (inputs included)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _inputs(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int, grad: set[str]):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype).requires_grad_(k in grad) for k, s in shapes.items()}


CASES = {
    "rms_norm": (
        lambda t: ops.rms_norm(t["x"], t["w"], 1e-5),
        lambda t: ops.rms_norm_reference(t["x"], t["w"], 1e-5),
        {"x": (3, 37, 96), "w": (96,)},
        {"x", "w"},
    ),
    "swiglu_down": (
        lambda t: ops.swiglu_down(t["a"], t["b"], t["w"]),
        lambda t: ops.swiglu_down_reference(t["a"], t["b"], t["w"]),
        {"a": (2, 37, 160), "b": (2, 37, 160), "w": (48, 160)},
        {"a", "b", "w"},
    ),
    "gelu_down": (
        lambda t: ops.gelu_down(t["a"], t["w"], t["bias"]),
        lambda t: ops.gelu_down_reference(t["a"], t["w"], t["bias"]),
        {"a": (2, 37, 160), "w": (48, 160), "bias": (48,)},
        {"a", "w", "bias"},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_autograd_reference(name, dtype):
    lean, reference, shapes, grad = CASES[name]
    for seed in range(3):
        results = []
        for fn in (lean, reference):
            t = _inputs(shapes, dtype, seed, grad)
            out = fn(t)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(dtype))
            results.append([out.detach()] + [t[k].grad for k in sorted(grad)])
        assert torch.equal(results[0][0], results[1][0]), f"{name}: forward differs from the reference"
        for k, (a, b) in zip(["out", *sorted(grad)], zip(*results)):
            assert _rel(a, b) <= TOL[dtype], (name, k, _rel(a, b))


@pytest.mark.parametrize("name", sorted(CASES))
def test_saves_less_than_autograd(name):
    lean, reference, shapes, grad = CASES[name]
    t = _inputs(shapes, torch.float32, 0, grad)
    assert _saved_bytes(lambda: lean(t)) < _saved_bytes(lambda: reference(t))


@pytest.mark.parametrize(("name", "down"), [("tiny-llama", "w2"), ("tiny-gpt2", "proj")])
def test_lora_down_projection_keeps_its_adapter(name, down):
    """A LoRA-wrapped down projection must run its own forward (the lean path reads only the base
    weight)."""
    torch.manual_seed(0)
    model = build_model(preset(name))
    model.init_weights(seed=0)
    apply_lora(model, LoRAConfig(rank=4, targets=[down]))
    ffn = model.layers[0].feed_forward
    proj = getattr(ffn, down)
    assert isinstance(proj, LoRALinear)
    x = torch.randn(2, 5, model.config.dim)
    base = ffn(x).detach()
    with torch.no_grad():
        proj.lora_A.normal_()
        proj.lora_B.normal_()
    out = ffn(x)
    assert not torch.allclose(out, base)
    out.sum().backward()
    assert proj.lora_B.grad is not None and proj.lora_B.grad.abs().sum() > 0
