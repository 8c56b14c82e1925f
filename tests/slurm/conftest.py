"""Fixtures for the live SLURM tests: a one-node and a two-node cluster on localhost (see
cluster.py), the repository's virtual environment for the jobs, and a tiny token store."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import write_store

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    """A helper module of the test tree (conftest modules are not importable under importlib mode)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cluster = _load("slurm_cluster", Path(__file__).with_name("cluster.py"))


def pytest_collection_modifyitems(config, items):
    """Run only when asked for (`pytest -m slurm tests/slurm`, as .ci/run does): they start
    daemons and take minutes. Otherwise, and where SLURM is missing, say why they are skipped."""
    missing = cluster.missing_tools()
    reason = None
    if "slurm" not in (config.getoption("-m") or ""):
        reason = "live SLURM tests run with `pytest -m slurm tests/slurm` (.ci/run runs them)"
    elif missing:
        reason = (
            f"SLURM not installed (missing {', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
        )
    elif os.geteuid() != 0:
        reason = "the test cluster's daemons run as root"
    if reason:
        for item in items:
            if "slurm" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Three nodes of 12 CPU slots: n1 runs the one-node jobs side by side, n2 the job that gets
    preempted (the `urgent` partition is n2 alone), n1 + n3 the two-node job."""
    with cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=3, cpus=12, grace=60, urgent_nodes=["n2"]) as c:
        yield c


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter the jobs run (this test run's, so the job sees the same packages)."""
    return sys.executable


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("data") / "store")
