"""launch/slurm/pretrain.sbatch on a live SLURM cluster (localhost, CPU, tiny model): a job
stopped each way SLURM stops jobs is requeued, resumes from the checkpoint written at the
signal, and ends with the per-step metrics and the export of an uninterrupted run."""

from __future__ import annotations

import json
import re
import time
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


def submit(cluster, python, store, tmp: Path, name: str, nodes: int = 1, nproc: int = 2, **env) -> tuple[int, Path]:
    run_dir = tmp / name
    job = cluster.sbatch(
        f"--job-name={name}",
        f"--nodes={nodes}",
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


def wait_for_steps(cluster, job: int, run_dir: Path, n: int, tmp: Path, name: str, timeout: float = 300) -> None:
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state}\n{log_of(tmp, name, job)}"
        assert time.monotonic() < end, f"no training steps after {timeout}s\n{log_of(tmp, name, job)}"
        time.sleep(0.2)


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


@pytest.fixture(scope="module")
def runs(one_node, python, store, tmp_path_factory) -> dict:
    """An uninterrupted reference job and one job per stop method, all submitted at once (the
    node has a CPU slot for each); every stopped job is signalled as soon as it has logged 3
    steps. Returns {name: (job id, run folder, final scontrol record, log)}."""
    tmp = tmp_path_factory.mktemp("runs")
    jobs = {name: submit(one_node, python, store, tmp, name) for name in ["reference", *STOPS]}
    pending = set(STOPS)
    end = time.monotonic() + 600
    while pending:
        for name in sorted(pending):
            job, run_dir = jobs[name]
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                one_node.run(*STOPS[name], str(job))
                pending.discard(name)
            else:
                state = one_node.job(job).get("JobState")
                assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{name}: {state}\n{log_of(tmp, name, job)}"
        assert time.monotonic() < end, f"not all jobs trained: {pending}"
        time.sleep(0.2)
    return {
        name: (job, run_dir, wait_done(one_node, job, tmp, name), log_of(tmp, name, job))
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


@pytest.mark.parametrize("how", sorted(STOPS))
def test_stopped_job_is_requeued_and_resumes_exactly(runs, how):
    _, run_dir, info, log = runs[how]
    assert int(info["Restarts"]) == 1, log[-4000:]
    at_signal, resumed = stopped_then_resumed(log)
    assert resumed == at_signal < STEPS
    assert_same_run(run_dir, runs["reference"][1])


def test_preempted_job_is_requeued_and_resumes_exactly(one_node, python, store, runs, tmp_path):
    """A job of the higher-priority partition takes both CPUs: ours gets SIGTERM (GraceTime 60 s),
    checkpoints, is requeued and runs again once the urgent job is done."""
    job, run_dir = submit(one_node, python, store, tmp_path, "preempted")
    wait_for_steps(one_node, job, run_dir, 3, tmp_path, "preempted")
    urgent = one_node.sbatch(
        "--partition=urgent",
        f"--cpus-per-task={one_node.cpus}",
        f"--output={tmp_path}/urgent-%j.out",
        "--wrap=sleep 2",
        cwd=tmp_path,
    )
    wait_done(one_node, urgent, tmp_path, "urgent")
    info = wait_done(one_node, job, tmp_path, "preempted")
    log = log_of(tmp_path, "preempted", job)
    assert int(info["Restarts"]) >= 1, log[-4000:]
    at_signal, resumed = stopped_then_resumed(log)
    assert resumed == at_signal < STEPS
    assert_same_run(run_dir, runs["reference"][1])


def test_two_nodes_step_term_resumes_exactly(two_nodes, python, store, runs, tmp_path):
    """Two slurmd as two nodes, one process each (world size 2, as the reference): srun starts a
    torchrun per node, they meet through the c10d rendezvous at the head node's NodeAddr."""
    from slurm_cluster import _free_port

    job, run_dir = submit(
        two_nodes, python, store, tmp_path, "two_nodes", nodes=2, nproc=1, RDZV_PORT=str(_free_port())
    )
    wait_for_steps(two_nodes, job, run_dir, 3, tmp_path, "two_nodes")
    two_nodes.run("scancel", "--signal=TERM", str(job))
    info = wait_done(two_nodes, job, tmp_path, "two_nodes")
    log = log_of(tmp_path, "two_nodes", job)
    assert int(info["Restarts"]) == 1 and "2 node(s) x 1 process(es)" in log, log[-4000:]
    at_signal, resumed = stopped_then_resumed(log)
    assert resumed == at_signal < STEPS
    assert_same_run(run_dir, runs["reference"][1])


def test_config_error_fails_fast_without_requeue(one_node, python, store, tmp_path):
    run_dir = tmp_path / "bad"
    job = one_node.sbatch(
        "--job-name=bad",
        f"--output={tmp_path}/bad-%j.out",
        SCRIPT,
        *train_args(store),
        "--train.steps",
        "ten",
        cwd=REPO,
        env=job_env(python, run_dir, 2),
    )
    info = one_node.wait_state(job, {"COMPLETED", "FAILED"}, 120)
    log = log_of(tmp_path, "bad", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "command line --train.steps: expected an integer, got 'ten'" in log
    assert "Traceback" not in log and not run_dir.exists()
