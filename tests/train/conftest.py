"""Fixtures for the trainer tests: a tiny token store written with the data package's shard
writer (same files `tokenize_fineweb` produces), and a helper that runs the real entry point
under torchrun as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.train.parallelize import free_port
from tests.helpers import write_store, write_word_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "launch" / "configs" / "tiny_cpu.toml"


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("data") / "store")


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A randomly initialised tiny LLaMA saved as a Hugging Face folder (the AR original: no
    [MASK] yet), to initialise training from."""
    import torch

    from dlm.models import build_model, preset
    from dlm.models.hf import save_hf_model

    torch.manual_seed(0)
    cfg = preset("tiny-llama")
    model = build_model(cfg)
    model.init_weights(seed=3)
    return save_hf_model(model, cfg, tmp_path_factory.mktemp("hf") / "tiny-llama")


class Torchrun:
    """Runs `launch/pretrain.py` under torchrun in a subprocess (its own process group, output to
    a log file) with the tiny CPU config and test-sized overrides."""

    free_port = staticmethod(free_port)

    def __init__(self, store: Path):
        self.store = store

    def args(self, run_dir: Path, **overrides) -> list[str]:
        values = {
            "data.paths": str(self.store),
            "data.seq_len": 32,
            "train.run_dir": str(run_dir),
            "optim.warmup_steps": 2,
            "optim.lr": 1e-2,
            "metrics.log_every": 1,
            **overrides,
        }
        out = ["--config", str(TINY_CONFIG)]
        for k, v in values.items():
            out += [f"--{k}", json.dumps(v) if isinstance(v, bool) else str(v)]
        return out

    @staticmethod
    def command(nproc: int, args: list[str], nnodes: int = 1, rdzv_port: int | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        if nnodes > 1:
            cmd += ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{rdzv_port}"]
        else:
            cmd += ["--standalone"]
        return cmd + [str(REPO / "launch" / "pretrain.py"), *args]

    def start(self, nproc: int, args: list[str], log: Path, **kw) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
        with open(log, "w") as f:
            return subprocess.Popen(
                self.command(nproc, args, **kw),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )

    @staticmethod
    def kill_tree(pid: int) -> None:
        """SIGKILL torchrun and every process below it (workers run in their own sessions)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        todo, tree = [pid], []
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += children.get(p, [])
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, 9)

    def run(self, nproc: int, args: list[str], log: Path, timeout: float = 300, **kw) -> None:
        p = self.start(nproc, args, log, **kw)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired as e:
            self.kill_tree(p.pid)
            raise AssertionError(f"torchrun timed out; log:\n{log.read_text()[-4000:]}") from e
        assert rc == 0, f"torchrun exited {rc}; log:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="session")
def torchrun(store) -> Torchrun:
    return Torchrun(store)
