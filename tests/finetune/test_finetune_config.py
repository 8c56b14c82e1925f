"""The fine-tuning config: the shipped configs parse, wrong combinations are named errors, and
the resolved config (with [finetune] and [lora]) round-trips through config.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlm.train.config import ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"


@pytest.fixture
def args(tmp_path, tiny_llama_hf, copy_jsonl) -> list[str]:
    return ["--model.init_from", str(tiny_llama_hf), "--finetune.paths", str(copy_jsonl)]


@pytest.mark.parametrize("name", ["tiny_sft_cpu.toml", "diffugpt_m_gsm8k.toml", "diffullama_lora_gsm8k.toml"])
def test_shipped_configs_parse(name, args):
    cfg = load_config(CONFIGS / name, args)
    assert cfg.train.stage == "sft" and cfg.diffusion.random_length_prob == 0.0
    if name.startswith("diffullama"):
        assert (cfg.lora.rank, cfg.lora.targets, cfg.lora.extra_trainable) == (16, ["all"], ["embed_tokens"])
        assert cfg.optim.lr == 1e-4
    if name.startswith("diffugpt"):
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.global_batch_size, cfg.data.seq_len) == (
            3e-4,
            2000,
            128,
            256,
        )


def test_round_trip(args, tmp_path):
    cfg = load_config(CONFIGS / "tiny_sft_cpu.toml", [*args, "--lora.rank", "8", "--finetune.pack", "true"])
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.paths", "x"], "data.paths is for pretraining"),
        (["--diffusion.random_length_prob", "0.01"], "random_length_prob must be 0 for SFT"),
        (["--train.stage", "ar_sft"], "set model.attention = 'causal'"),
        (["--finetune.paths", "missing.jsonl"], "'missing.jsonl' does not exist"),
        (["--lora.rank", "4", "--model.init_from", "random", "--model.preset", "tiny-llama"], "adapts pretrained"),
        (["--finetune.overlong", "truncate"], "not one of"),
    ],
)
def test_errors(args, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_sft_cpu.toml", [*args, *extra])
