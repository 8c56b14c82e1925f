"""The real entry point under torchrun (CPU, gloo, tiny model): equivalence across world sizes,
exact resume after SIGKILL, elastic resume, SIGTERM, interrupted checkpoints, a two-"node" c10d
rendezvous and the Hugging Face export. Runs are module-scoped and shared between assertions."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlm.attention.layout import AttentionLayout
from dlm.evaluation.loading import load_model
from dlm.train.checkpoint import COMPLETE

pytestmark = pytest.mark.slow

STEPS, N = 12, 4  # N: the checkpoint interval
SHAPE = {
    "train.steps": STEPS,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 2,
    "checkpoint.interval": N,
    "checkpoint.keep_last": 3,
}
CKPTS = [f"step_{s:08d}" for s in range(N, STEPS + 1, N)]


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in records(run_dir).items()}


def wait_for(pred, proc: subprocess.Popen, log: Path, torchrun, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before the awaited state; log:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > end:
            torchrun.kill_tree(proc.pid)
            raise AssertionError(f"timed out; log:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


def assert_close(a: dict[int, float], b: dict[int, float], steps, rtol: float) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= rtol * abs(b[s]), f"step {s}: {a[s]!r} vs {b[s]!r}"


@pytest.fixture(scope="module")
def one_rank(torchrun, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("one_rank")
    torchrun.run(1, torchrun.args(d / "run", **SHAPE), d / "log")
    return d / "run"


@pytest.fixture(scope="module")
def two_ranks(torchrun, tokenizer_json, tmp_path_factory) -> Path:
    """Also writes generated samples to TensorBoard: every rank runs the sampler on the sharded model."""
    d = tmp_path_factory.mktemp("two_ranks")
    sampling = {
        "metrics.sample_every": N,
        "metrics.sample_tokenizer": str(tokenizer_json),
        "metrics.sample_prompt": "w5 w6",
        "metrics.sample_length": 6,
        "metrics.sample_steps": 3,
    }
    torchrun.run(2, torchrun.args(d / "run", **SHAPE, **sampling), d / "log")
    return d / "run"


def test_loss_decreases(one_rank):
    loss = losses(one_rank)
    first, last = [loss[s] for s in range(1, 5)], [loss[s] for s in range(STEPS - 3, STEPS + 1)]
    assert sum(last) / 4 < sum(first) / 4 - 1.0, loss


def test_run_folder_contents(one_rank):
    assert (one_rank / "DONE").is_file() and (one_rank / "config.toml").is_file()
    assert list((one_rank / "tensorboard").glob("events.out.tfevents.*"))
    r = records(one_rank)
    assert sorted(r) == list(range(1, STEPS + 1))
    for key in (
        "loss",
        "elbo",
        "lr",
        "grad_norm",
        "tokens_per_s_per_device",
        "mfu",
        "step_time_s",
        "data_wait_s",
        "peak_memory_gib",
    ):
        assert key in r[1], key
    assert r[1]["mfu"] is None  # CPU: no peak FLOP/s known unless metrics.peak_tflops is set
    assert [r[s]["consumed_samples"] for s in sorted(r)] == [8 * s for s in range(1, STEPS + 1)]
    assert sorted(p.name for p in (one_rank / "checkpoints").iterdir()) == CKPTS


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {s: r["grad_norm"] for s, r in records(run_dir).items()}


def test_two_ranks_equal_one_rank(one_rank, two_ranks):
    assert_close(losses(two_ranks), losses(one_rank), range(1, STEPS + 1), rtol=1e-5)
    # Adam hides a constant gradient scale, the norm does not: gradients are summed over ranks
    assert_close(grad_norms(two_ranks), grad_norms(one_rank), range(1, STEPS + 1), rtol=1e-5)


def test_samples_in_tensorboard(two_ranks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_ranks / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("samples/text_summary")
    assert [e.step for e in events] == list(range(N, STEPS + 1, N))
    text = events[0].tensor_proto.string_val[0].decode()
    assert text.startswith("w5 w6") and len(text.split()) > 2, text
    assert "train/loss" in acc.Tags()["scalars"]


def test_sigkill_then_resume_is_exact(torchrun, two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    args = torchrun.args(run_dir, **SHAPE)
    proc = torchrun.start(2, args, tmp_path / "log1")
    wait_for(lambda: (run_dir / "checkpoints" / CKPTS[0] / COMPLETE).exists(), proc, tmp_path / "log1", torchrun)
    torchrun.kill_tree(proc.pid)  # the whole job dies at once, like a failed node
    proc.wait()
    done = [p for p in CKPTS if (run_dir / "checkpoints" / p / COMPLETE).exists()]
    assert CKPTS[-1] not in done, "the run finished before it was killed"
    torchrun.run(2, args, tmp_path / "log2")
    step = int(done[-1].split("_")[1])
    assert f"resumed from {run_dir / 'checkpoints' / done[-1]} at step {step}" in (tmp_path / "log2").read_text()
    assert losses(run_dir) == losses(two_ranks)  # identical fp32 losses at every step, one history


def test_resume_other_world_size_skips_incomplete_checkpoints(torchrun, two_ranks, tmp_path):
    """The 2-rank run's step-N checkpoint resumed on 1 rank, next to a newer checkpoint that lacks
    its COMPLETE marker (killed while committing) and a half-written temp folder."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    good = ckpts / f"step_{N:08d}"
    shutil.copytree(two_ranks / "checkpoints" / good.name, good)
    broken = ckpts / f"step_{N + 2:08d}"
    shutil.copytree(good, broken)
    (broken / COMPLETE).unlink()
    next(broken.glob("*.distcp")).write_bytes(b"truncated")
    partial = ckpts / f"step_{N + 3:08d}.tmp"
    shutil.copytree(good, partial)
    (partial / COMPLETE).unlink()

    torchrun.run(
        1, torchrun.args(run_dir, **SHAPE, **{"parallel.activation_checkpoint": "selective"}), tmp_path / "log"
    )
    log = (tmp_path / "log").read_text()
    assert f"resumed from {good} at step {N}" in log, log[-3000:]
    assert not broken.exists() and not partial.exists()
    mine, ref = records(run_dir), records(two_ranks)
    assert sorted(mine) == list(range(N + 1, STEPS + 1))
    assert [mine[s]["consumed_samples"] for s in sorted(mine)] == [ref[s]["consumed_samples"] for s in sorted(mine)]
    # fp64 gradient-norm accumulation: the sharding no longer changes the clipping (was 1e-4 off)
    assert_close(losses(run_dir), losses(two_ranks), range(N + 1, STEPS + 1), rtol=1e-6)
    assert_close(grad_norms(run_dir), grad_norms(two_ranks), range(N + 1, STEPS + 1), rtol=1e-6)


def test_sigterm_leaves_committed_checkpoint(torchrun, hf_folder, tmp_path):
    """Initialised from a Hugging Face folder (each rank reads tensors one at a time and keeps its
    shard; [MASK] appended) with lr 0, so the checkpoint must hold exactly the imported weights."""
    from dlm.models.hf import load_hf_model

    run_dir = tmp_path / "run"
    args = torchrun.args(
        run_dir,
        **{
            **SHAPE,
            "train.steps": 10_000,
            "checkpoint.interval": 0,
            "model.preset": "",
            "model.init_from": str(hf_folder),
            "optim.lr": 0.0,
        },
    )
    proc = torchrun.start(2, args, tmp_path / "log")
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, tmp_path / "log", torchrun)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
    proc.wait(120)
    log = (tmp_path / "log").read_text()
    last = max(records(run_dir))
    ckpt = run_dir / "checkpoints" / f"step_{last:08d}"
    assert (ckpt / COMPLETE).is_file(), log[-3000:]
    assert f"checkpoint at step {last} written, exiting" in log
    assert not (run_dir / "DONE").exists()
    trained, imported = load_model(ckpt).state_dict(), load_hf_model(hf_folder, mask_token_id="append").state_dict()
    assert trained.keys() == imported.keys()
    for k in imported:
        torch.testing.assert_close(trained[k], imported[k], rtol=0, atol=0, msg=k)


def test_two_nodes_c10d_rendezvous(torchrun, two_ranks, tmp_path):
    """Two torchrun agents of one process each meet through the c10d rendezvous, as on two nodes."""
    run_dir, port = tmp_path / "run", torchrun.free_port()
    args = torchrun.args(
        run_dir,
        **{
            **SHAPE,
            "checkpoint.interval": 0,
            "checkpoint.export_at_end": False,
            "parallel.activation_checkpoint": "full",
            "metrics.peak_tflops": 1.0,
        },
    )
    nodes = [torchrun.start(1, args, tmp_path / f"log{i}", nnodes=2, rdzv_port=port) for i in range(2)]
    for i, p in enumerate(nodes):
        assert p.wait(300) == 0, (tmp_path / f"log{i}").read_text()[-3000:]
    assert "world size 2" in (tmp_path / "log0").read_text() + (tmp_path / "log1").read_text()
    assert_close(losses(run_dir), losses(two_ranks), range(1, STEPS + 1), rtol=1e-5)  # with full recompute
    assert_close(grad_norms(run_dir), grad_norms(two_ranks), range(1, STEPS + 1), rtol=1e-5)
    from dlm.models import build_model, preset

    with torch.device("meta"):
        flops_per_token = build_model(preset("tiny-llama").replace(vocab_size=320, mask_token_id=256)).flops_per_token(
            32
        )
    r = records(run_dir)[STEPS]
    assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * flops_per_token / 1e12, rel=1e-9)  # peak 1 TFLOP/s


def test_export_matches_checkpoint_and_transformers(one_rank):
    transformers = pytest.importorskip("transformers")
    from dlm.models.hf import load_hf_model

    export = one_rank / "export"
    ids = torch.randint(3, 35, (2, 24), generator=torch.Generator().manual_seed(0))
    bidirectional = AttentionLayout.single(2, 24)
    with torch.no_grad():
        from_ckpt = load_model(one_rank)(ids, bidirectional)  # the run's newest training checkpoint
        from_export = load_model(export)(ids, bidirectional)
        torch.testing.assert_close(from_export, from_ckpt, rtol=0, atol=0)
        ours = load_hf_model(export, attention="causal")(ids, AttentionLayout.single(2, 24, causal=True))
        hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_export_command(one_rank, tmp_path):
    out = tmp_path / "hf"
    ckpt = one_rank / "checkpoints" / f"step_{N:08d}"
    subprocess.run(
        [sys.executable, "-m", "data_tools.export_checkpoint", str(ckpt), str(out)],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["mask_token_id"] == 256
    ids = torch.randint(3, 35, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = load_model(out)(ids, AttentionLayout.single(1, 16))
        b = load_model(ckpt)(ids, AttentionLayout.single(1, 16))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_finite_loss_fails_fast(torchrun, tmp_path):
    """lr 1e30: the first Adam update moves every weight by ~1e30, so step 2 overflows (in the
    loss or in the gradients); every rank stops with an error naming the step and the rank."""
    run_dir = tmp_path / "run"
    proc = torchrun.start(
        2,
        torchrun.args(run_dir, **{**SHAPE, "optim.lr": 1e30, "optim.warmup_steps": 0, "optim.decay": "constant"}),
        tmp_path / "log",
    )
    assert proc.wait(300) != 0
    log = (tmp_path / "log").read_text()
    for rank in (0, 1):
        assert re.search(
            rf"\[rank{rank}\]: FloatingPointError: non-finite (loss|gradient norm).* at step 2 .*rank", log
        ), log[-3000:]
    assert max(records(run_dir)) == 1  # nothing was logged (or stepped) past the failure
