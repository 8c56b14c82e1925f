"""launch/slurm/pretrain.sbatch on a live SLURM cluster (localhost, CPU, tiny model): a job
stopped each way SLURM stops jobs is requeued, resumes from the checkpoint written at the
signal, and ends with the per-step metrics and the export of an uninterrupted run."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "launch" / "configs" / "tiny_cpu.toml"
STEPS = 60
SCRIPT = str(REPO / "launch" / "slurm" / "pretrain.sbatch")


def train_args(store: Path) -> list[str]:
    values = {
        "data.paths": store,
        "data.seq_len": 32,
        "train.steps": STEPS,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-2,
        "checkpoint.interval": 20,
        "checkpoint.keep_last": 2,
        "metrics.log_every": 1,
        "metrics.tensorboard": "false",
    }
    out = [str(TINY)]
    for k, v in values.items():
        out += [f"--{k}", str(v)]
    return out


def job_env(python: str, run_dir: Path, nproc: int, **extra) -> dict:
    return {
        "RUN_DIR": str(run_dir),
        "NPROC_PER_NODE": str(nproc),
        "PYTHON": python,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
        **extra,
    }


def submit(
    cluster, python, store, tmp: Path, name: str, nodelist: str = "n1", nproc: int = 2, **env
) -> tuple[int, Path]:
    run_dir = tmp / name
    nodes = len(nodelist.split(","))
    job = cluster.sbatch(
        f"--job-name={name}",
        f"--nodes={nodes}",
        f"--nodelist={nodelist}",
        f"--cpus-per-task={2 // nodes}",
        f"--output={tmp / name}-%j.out",
        SCRIPT,
        *train_args(store),
        cwd=REPO,
        env=job_env(python, run_dir, nproc, **env),
    )
    return job, run_dir


def log_of(tmp: Path, name: str, job: int) -> str:
    p = tmp / f"{name}-{job}.out"
    return p.read_text() if p.exists() else ""


def records(run_dir: Path) -> dict[int, dict]:
    """Per-step metrics; a requeued run appends, so a step written twice must agree (checked by
    the caller against the reference)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r
    return out


DETERMINISTIC = ("loss", "elbo", "lr", "grad_norm", "tokens_seen", "consumed_samples")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    mine, ref = records(run_dir), records(reference)
    assert sorted(mine) == list(range(1, STEPS + 1))
    for s in ref:
        assert {k: mine[s][k] for k in DETERMINISTIC} == {k: ref[s][k] for k in DETERMINISTIC}, f"step {s}"
    for f in (reference / "export").iterdir():
        if f.suffix in (".safetensors", ".json"):
            assert (run_dir / "export" / f.name).read_bytes() == f.read_bytes(), f.name


def wait_done(cluster, job: int, tmp: Path, name: str, timeout: float = 600) -> dict:
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log_of(tmp, name, job)}"
    return info


STOPS = {
    # the batch shell gets USR1, exactly what --signal=B:USR1@600 delivers before the time limit
    "time_limit_signal": ["scancel", "--batch", "--signal=USR1"],
    "batch_term": ["scancel", "--batch", "--signal=TERM"],
    "step_term": ["scancel", "--signal=TERM"],
    "full_term": ["scancel", "--full", "--signal=TERM"],
    "scontrol_requeue": ["scontrol", "requeue"],
}


def preempt(cluster, job: int) -> None:
    """A job in the higher-priority partition that needs every CPU of n2: SLURM preempts ours
    (SIGTERM to its steps, SIGKILL after GraceTime) to start it."""
    cluster.sbatch(
        "--partition=urgent",
        "--nodelist=n2",
        f"--cpus-per-task={cluster.cpus}",
        "--output=/dev/null",
        "--wrap=sleep 2",
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def runs(slurm, python, store, tmp_path_factory) -> dict:
    """All jobs at once: an uninterrupted reference and one job per stop method on n1, a job on
    n2 that gets preempted, and a two-node job (n1 + n3, one process each: world size 2 as the
    reference; srun starts a torchrun per node, they meet at the head node's NodeAddr) stopped by
    SIGTERM to its steps. Each is stopped as soon as it has logged 3 steps. Returns
    {name: (job id, run folder, final scontrol record, log)}."""
    from slurm_cluster import _free_port

    tmp = tmp_path_factory.mktemp("runs")
    jobs = {name: submit(slurm, python, store, tmp, name) for name in ["reference", *STOPS]}
    jobs["preempted"] = submit(slurm, python, store, tmp, "preempted", nodelist="n2")
    jobs["two_nodes"] = submit(
        slurm, python, store, tmp, "two_nodes", nodelist="n1,n3", nproc=1, RDZV_PORT=str(_free_port())
    )
    stop: dict[str, Callable[[int], object]] = {
        name: functools.partial(lambda cmd, job: slurm.run(*cmd, str(job)), cmd) for name, cmd in STOPS.items()
    }
    stop["preempted"] = lambda job: preempt(slurm, job)
    stop["two_nodes"] = lambda job: slurm.run("scancel", "--signal=TERM", str(job))
    end = time.monotonic() + 900
    while stop:
        for name in sorted(stop):
            job, run_dir = jobs[name]
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                stop.pop(name)(job)
            else:
                state = slurm.job(job).get("JobState")
                assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{name}: {state}\n{log_of(tmp, name, job)}"
        assert time.monotonic() < end, f"not all jobs trained: {sorted(stop)}"
        time.sleep(0.2)
    return {
        name: (job, run_dir, wait_done(slurm, job, tmp, name), log_of(tmp, name, job))
        for name, (job, run_dir) in jobs.items()
    }


def stopped_then_resumed(log: str) -> tuple[int, int]:
    """(step checkpointed at the signal, step the requeued job resumed from)."""
    stop = re.findall(r"stop requested by signal: checkpoint at step (\d+) written", log)
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert len(stop) == 1 and len(resumed) == 1, log[-4000:]
    return int(stop[0]), int(resumed[0][1])


def test_reference_run(runs):
    _, run_dir, info, log = runs["reference"]
    assert info["Restarts"] == "0" and (run_dir / "DONE").read_text() == f"step {STEPS}\n", log[-4000:]
    assert not (run_dir / "STOPPED").exists() and "run complete: step 60" in log


@pytest.mark.parametrize("how", [*sorted(STOPS), "preempted", "two_nodes"])
def test_stopped_job_is_requeued_and_resumes_exactly(runs, how):
    _, run_dir, info, log = runs[how]
    assert int(info["Restarts"]) == 1, log[-4000:]
    at_signal, resumed = stopped_then_resumed(log)
    assert resumed == at_signal < STEPS
    assert_same_run(run_dir, runs["reference"][1])
    if how == "two_nodes":
        assert "2 node(s) x 1 process(es)" in log


def test_config_error_fails_fast_without_requeue(slurm, python, store, tmp_path):
    run_dir = tmp_path / "bad"
    job = slurm.sbatch(
        "--job-name=bad",
        f"--output={tmp_path}/bad-%j.out",
        SCRIPT,
        *train_args(store),
        "--train.steps",
        "ten",
        cwd=REPO,
        env=job_env(python, run_dir, 2),
    )
    info = slurm.wait_state(job, {"COMPLETED", "FAILED"}, 120)
    log = log_of(tmp_path, "bad", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "command line --train.steps: expected an integer, got 'ten'" in log
    assert "Traceback" not in log and not run_dir.exists()
