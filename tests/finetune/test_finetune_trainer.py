"""The fine-tuning stage through the real entry point under torchrun (CPU, gloo, tiny model):
LoRA SFT on 2 ranks equals 1 rank, SIGKILL + resume is exact, checkpoints hold only the trainable
tensors, the export is the merged model (transformers loads it), and the AR-SFT baseline trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from dlm.attention.layout import AttentionLayout
from dlm.evaluation.loading import load_model
from dlm.train.checkpoint import COMPLETE

pytestmark = pytest.mark.slow

STEPS, N = 8, 4
SHORT = {  # a few full fine-tuning steps, nothing written at the end
    "train.global_batch_size": 8,
    "train.micro_batch_size": 4,
    "checkpoint.interval": 0,
    "checkpoint.export_at_end": False,
}
LORA = {
    "train.steps": STEPS,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 2,
    "checkpoint.interval": N,
    "checkpoint.keep_last": 2,
    "lora.rank": 4,
    "lora.alpha": 8.0,
    "lora.extra_trainable": ["embed_tokens"],
}


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def close(a: dict[int, dict], b: dict[int, dict], key: str, rtol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for s in a:
        assert abs(a[s][key] - b[s][key]) <= rtol * abs(b[s][key]), (key, s, a[s][key], b[s][key])


@pytest.fixture(scope="module")
def lora_one(finetune_run, tmp_path_factory) -> Path:
    """With activation checkpointing: the wrappers must not change adapter names or numerics."""
    d = tmp_path_factory.mktemp("lora_one")
    finetune_run.run(1, finetune_run.args(d / "run", **LORA, **{"parallel.activation_checkpoint": "full"}), d / "log")
    return d / "run"


@pytest.fixture(scope="module")
def lora_two(finetune_run, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lora_two")
    finetune_run.run(2, finetune_run.args(d / "run", **LORA), d / "log")
    (d / "run" / "log").write_text((d / "log").read_text())
    return d / "run"


def test_two_ranks_equal_one_rank(lora_one, lora_two):
    a, b = records(lora_two), records(lora_one)
    assert sorted(a) == list(range(1, STEPS + 1))
    close(a, b, "loss")
    close(a, b, "grad_norm")
    assert b[STEPS]["loss"] < b[1]["loss"]


def test_checkpoint_holds_only_trainable_tensors(lora_two):
    ckpt = lora_two / "checkpoints" / f"step_{STEPS:08d}"
    keys = [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all(".lora_A" in k or ".lora_B" in k or k == "model.tok_embeddings.weight" for k in keys), keys
    assert sum(".lora_A" in k for k in keys) == 2 * 7  # every projection of both blocks
    assert f"checkpoint {ckpt} committed (" in (lora_two / "log").read_text()


def test_export_is_the_merged_model_and_loads_in_transformers(lora_two, finetune_run):
    transformers = pytest.importorskip("transformers")
    from dlm.models.hf import load_hf_model

    export = lora_two / "export"
    ids = torch.randint(3, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = load_model(lora_two)  # base + adapters from the run's newest checkpoint
        base = load_hf_model(finetune_run.init_from)
        assert set(merged.state_dict()) == set(base.state_dict())  # plain layers again
        layout = AttentionLayout.single(2, 16)
        torch.testing.assert_close(load_model(export)(ids, layout), merged(ids, layout), rtol=0, atol=0)
        assert (merged(ids, layout) - base(ids, layout)).abs().max() > 1e-3  # the adapters did something
        causal = AttentionLayout.single(2, 16, causal=True)
        ours = load_hf_model(export, attention="causal")(ids, causal)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, rtol=1e-4, atol=1e-4)


def test_sigkill_then_resume_is_exact(finetune_run, lora_two, tmp_path):
    run_dir = tmp_path / "run"
    args = finetune_run.args(run_dir, **LORA)
    proc = finetune_run.start(2, args, tmp_path / "log1")
    first = run_dir / "checkpoints" / f"step_{N:08d}" / COMPLETE
    import time

    end = time.monotonic() + 240
    while not first.exists():
        assert proc.poll() is None, (tmp_path / "log1").read_text()[-3000:]
        assert time.monotonic() < end, "timed out waiting for the first checkpoint"
        time.sleep(0.02)
    finetune_run.kill_tree(proc.pid)
    proc.wait()
    assert not (run_dir / "checkpoints" / f"step_{STEPS:08d}" / COMPLETE).exists(), "finished before the kill"
    finetune_run.run(2, args, tmp_path / "log2")
    assert f"at step {N}" in (tmp_path / "log2").read_text()
    mine, ref = records(run_dir), records(lora_two)
    assert {s: r["loss"] for s, r in mine.items()} == {s: r["loss"] for s, r in ref.items()}


def test_ar_sft_full_finetuning_trains(finetune_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = {
        "train.stage": "ar_sft",
        "model.attention": "causal",
        "train.steps": 6,
        **SHORT,
    }
    finetune_run.run(1, finetune_run.args(run_dir, **overrides), tmp_path / "log")
    r = records(run_dir)
    assert r[6]["loss"] < r[1]["loss"] - 0.5, r


def test_diffusion_full_sft_with_packing_trains(finetune_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = {
        "finetune.pack": True,
        "data.seq_len": 48,
        "train.steps": 8,
        **SHORT,
    }
    finetune_run.run(1, finetune_run.args(run_dir, **overrides), tmp_path / "log")
    r = records(run_dir)
    assert sum(r[s]["loss"] for s in (7, 8)) < sum(r[s]["loss"] for s in (1, 2)), r
    assert r[8]["consumed_samples"] == 64  # packed rows, counted like any sample
