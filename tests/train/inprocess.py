"""Run launch/pretrain.py's main in this process as a world of one (gloo), with overrides."""

from __future__ import annotations

from pathlib import Path

from dlm.train.parallelize import free_port
from launch import pretrain

from .conftest import TINY_CONFIG


def run_pretrain(monkeypatch, overrides: dict, config: Path = TINY_CONFIG) -> None:
    """`monkeypatch` scopes the torchrun-style environment to the call."""
    with monkeypatch.context() as mp:
        for key, value in dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
        ).items():
            mp.setenv(key, value)
        mp.setenv("MASTER_PORT", str(free_port()))
        argv = ["--config", str(config)]
        for k, v in overrides.items():
            argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
        assert pretrain.main(argv) == 0
