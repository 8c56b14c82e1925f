"""Config parsing, overrides and validation; the learning-rate schedule; checkpoint discovery."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dlm.train.checkpoint import COMPLETE, complete_checkpoints, resolve_checkpoint
from dlm.train.config import ConfigError, OptimSection, check_world, load_config, save_config
from dlm.train.optim import lr_factor

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"
TINY = CONFIGS / "tiny_cpu.toml"


@pytest.fixture(autouse=True)
def _data_stand_in(tmp_path, monkeypatch):
    """tiny_cpu.toml names runs/tiny_store relative to the working directory: provide one."""
    (tmp_path / "runs" / "tiny_store").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)


def test_shipped_configs_parse(tmp_path):
    # the configs point at data and checkpoints users make or download: stand-ins for both
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    stand_ins = ["--model.init_from", "random", "--data.paths", f'["{tmp_path / "a"}", "{tmp_path / "b"}"]']
    for name, preset in (
        ("tiny_cpu", "tiny-llama"),
        ("diffugpt_s", "gpt2"),
        ("diffugpt_m", "gpt2-medium"),
        ("demo", "smollm2-135m"),
    ):
        cfg = load_config(
            CONFIGS / f"{name}.toml", stand_ins[:2] + ["--model.preset", preset, "--data.paths", str(tmp_path / "a")]
        )
        assert cfg.model.preset == preset  # load_config raised already if the file is invalid
    seven_b = load_config(CONFIGS / "diffullama_7b.toml", stand_ins + ["--model.preset", "llama2-7b"])
    assert (seven_b.optim.lr, seven_b.optim.decay, seven_b.optim.betas, seven_b.optim.weight_decay) == (
        2e-5,
        "constant",
        [0.9, 0.95],
        0.1,
    )
    assert seven_b.data.seq_len == 2048 and seven_b.data.weights == [0.7, 0.3] and seven_b.diffusion.anneal_steps == 0
    # 65B tokens
    assert abs(seven_b.train.steps * seven_b.train.global_batch_size * seven_b.data.seq_len - 65e9) / 65e9 < 0.01


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        TINY,
        [
            "--optim.lr",
            "3e-4",
            "--train.steps=7",
            "--data.paths",
            str(tmp_path),
            "--optim.betas",
            "[0.8, 0.9]",
            "--model.mask_token",
            "811",
            "--metrics.tensorboard",
            "false",
            "--model.overrides.vocab_size",
            "512",
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.data.paths == [str(tmp_path)]
    assert cfg.optim.betas == [0.8, 0.9] and cfg.model.mask_token == 811 and cfg.metrics.tensorboard is False
    assert cfg.model.overrides == {"vocab_size": 512}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lrr", "1"], "optim.lrr"),
        (["--optimizer.lr", "1"], "optimizer"),
        (["--train.steps", "ten"], "train.steps"),
        (["--optim.decay", "exp"], "optim.decay"),
        (["--model.overrides.dimm", "3"], "dimm"),
        (["--train.global_batch_size", "7"], "global_batch_size"),
        (["--model.init_from", "/nonexistent"], "model.init_from"),
        (["--data.paths", "/nonexistent"], "data.paths"),
        (["--optim.lr"], "no value"),
    ],
)
def test_bad_config_names_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.steps", "ten"], "command line --train.steps: expected an integer, got 'ten'"),
        (["--train.steps=ten"], "command line --train.steps: expected an integer"),
        (["--optim.lrr", "1"], "command line --optim.lrr: unknown key"),
        (["--optimizer.lr", "1"], "command line --optimizer.lr: unknown section 'optimizer'"),
        (["--optim.decay", "exp"], "command line --optim.decay: 'exp' is not one of"),
    ],
)
def test_bad_override_names_the_flag_not_the_file(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, args)
    assert str(e.value).startswith(message) and str(TINY) not in str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("[optim]", "[optim]\nlearning_rate = 1.0"))
    with pytest.raises(ConfigError, match=rf"{bad}.*optim.learning_rate"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        TINY, ["--optim.lr", "1e-5", "--model.overrides.vocab_size", "300", "--metrics.sample_prompt", 'say "hi"\n']
    )
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


def test_world_size_must_divide_global_batch():
    cfg = load_config(TINY, ["--train.global_batch_size", "8", "--train.micro_batch_size", "2"])
    assert check_world(cfg, 2) == 2 and check_world(cfg, 4) == 1
    with pytest.raises(ConfigError, match="world size 3"):
        check_world(cfg, 3)


def test_lr_schedule():
    o = OptimSection(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, o, 110) == pytest.approx(0.1) and lr_factor(9, o, 110) == pytest.approx(1.0)
    assert lr_factor(10, o, 110) == pytest.approx(1.0)
    assert lr_factor(60, o, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, o, 110) == pytest.approx(0.1) and lr_factor(500, o, 110) == pytest.approx(0.1)
    lin = OptimSection(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, lin, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimSection(warmup_steps=2, decay="constant")
    assert [lr_factor(s, const, 100) for s in (0, 1, 2, 99)] == [0.5, 1.0, 1.0, 1.0]


def test_checkpoint_discovery_ignores_incomplete(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        (ckpts / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (ckpts / f"step_{step:08d}" / COMPLETE).write_text("")
    (ckpts / "step_00000020.tmp").mkdir()
    assert [s for s, _ in complete_checkpoints(ckpts)] == [5, 10]
    assert resolve_checkpoint(tmp_path / "run") == ckpts / "step_00000010"
    assert resolve_checkpoint(ckpts) == ckpts / "step_00000010"
    with pytest.raises(FileNotFoundError, match="no complete training checkpoint"):
        resolve_checkpoint(ckpts / "step_00000015")


def test_resumed_optimizer_takes_hyperparameters_from_config():
    import torch

    from dlm.train.optim import apply_hyperparameters, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    old = OptimSection(lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1, warmup_steps=0, decay="constant")
    opt = build_optimizer(model, old)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # only the matrix is decayed
    new = OptimSection(lr=2e-4, betas=[0.8, 0.99], weight_decay=0.05, warmup_steps=10, decay="linear", min_lr_ratio=0.0)
    apply_hyperparameters(opt, new, step=5, total_steps=20)
    decay, no_decay = opt.param_groups
    assert decay["lr"] == pytest.approx(2e-4 * 0.6) and decay["betas"] == (0.8, 0.99) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0 and no_decay["lr"] == decay["lr"]
