"""bench/plan_scale.py's memory model: its per-block activation count against what autograd
really saves in dlm's blocks, its activation-checkpointing count against `apply_ac`, and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import plan_scale  # noqa: E402
from dlm.diffusion import DiffusionConfig, diffusion_loss, noise_batch  # noqa: E402
from dlm.models import build_model, preset  # noqa: E402
from dlm.train.config import ParallelSection  # noqa: E402
from dlm.train.parallelize import apply_ac  # noqa: E402


def saved_bytes(cfg, B: int, L: int, dtype: torch.dtype) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one diffusion forward."""
    model = build_model(cfg).to(dtype)
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, cfg.base_vocab_size, (B, L), generator=g),
        "position_ids": torch.arange(L).expand(B, L).clone(),
        "sample_ids": torch.arange(B),
    }
    noised = noise_batch(batch, 0, DiffusionConfig(mask_token_id=cfg.mask_token_id, random_length_prob=0.0), B)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        diffusion_loss(model, noised, noised.norm_count)
    return sum(storages.values())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_activations_match_saved_tensors(name, dtype):
    cfg = plan_scale._preset(name)
    B, L = 2, 32
    per_layer = saved_bytes(cfg.replace(n_layers=3), B, L, dtype) - saved_bytes(cfg.replace(n_layers=2), B, L, dtype)
    assert per_layer == plan_scale.layer_activation_bytes(cfg, dtype.itemsize) * B * L


@pytest.mark.parametrize("ac", ["none", "full", "selective:2", "selective:3"])
def test_checkpointed_blocks_match_apply_ac(ac):
    cfg = preset("tiny-llama").replace(n_layers=5)
    model = build_model(cfg)
    kind, _, every = ac.partition(":")
    apply_ac(model, ParallelSection(activation_checkpoint=kind, selective_every=int(every or 2)))
    wrapped = sum(type(block).__name__ == "CheckpointWrapper" for block in model.layers)
    assert wrapped == plan_scale.ac_blocks(ac, cfg.n_layers)


def test_memory_model_trades_activations_for_recompute():
    cfg = plan_scale._preset("llama2-7b")
    plain = plan_scale.memory(plan_scale.Setup(cfg, 2048, 2, gpus=64, ac="none"))
    ckpt = plan_scale.memory(plan_scale.Setup(cfg, 2048, 2, gpus=64, ac="full"))
    assert ckpt["activations"] < plain["activations"] / 10 and ckpt["peak"] < plain["peak"]
    more_gpus = plan_scale.memory(plan_scale.Setup(cfg, 2048, 2, gpus=128, ac="none"))
    assert more_gpus["AdamW state (fp32, sharded)"] == plain["AdamW state (fp32, sharded)"] / 2
    with pytest.raises(ValueError, match="selective:<k>"):
        plan_scale.ac_blocks("sometimes", 4)


@pytest.mark.slow  # a subprocess
def test_cli_plans_one_configuration():
    proc = subprocess.run(
        [sys.executable, "bench/plan_scale.py", "--preset", "gpt2", "--seq-len", "1024", "--global-batch", "64"]
        + ["--micro-batch", "4", "--gpus", "8", "--gpu", "A100", "--tokens", "1e9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "predicted peak" in proc.stdout and "GPU-hours" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "bench/plan_scale.py", "--preset", "gpt2", "--global-batch", "10", "--micro-batch", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "not a multiple of gpus x micro-batch" in bad.stderr
