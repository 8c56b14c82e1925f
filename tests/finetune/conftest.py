"""Fixtures for fine-tuning tests: a word-level tokenizer over 256 ids (w3 ... w255; 1 = <s>,
2 = </s>), tiny HF folders to start from, and JSON-lines task files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 256


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, rows) -> path: one JSON object per line."""
    return _write_jsonl


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def copy_task(n: int, seed: int = 0) -> list[dict]:
    """prompt: a few words; response: the same words reversed (learnable by a tiny model)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(3, 40, (k,), generator=g).tolist()
        rows.append({"prompt": words(ids), "response": words(ids[::-1])})
    return rows


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["<s>"], vocab["</s>"] = vocab.pop("w1"), vocab.pop("w2")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    return folder


def _hf_folder(tmp_path_factory, name: str, tokenizer: Path) -> Path:
    from dlm.models import build_model, preset
    from dlm.models.hf import save_hf_model

    cfg = preset(name)
    model = build_model(cfg)
    model.init_weights(seed=3)  # type: ignore[operator]
    return save_hf_model(model, cfg, tmp_path_factory.mktemp("hf") / name, tokenizer_from=tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory, word_tokenizer) -> Path:
    return _hf_folder(tmp_path_factory, "tiny-llama", word_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_hf(tmp_path_factory, word_tokenizer) -> Path:
    return _hf_folder(tmp_path_factory, "tiny-gpt2", word_tokenizer)


@pytest.fixture(scope="session")
def copy_jsonl(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("sft") / "copy.jsonl", copy_task(64))


def _train_conftest():
    """tests/train/conftest.py as a module: its torchrun runner is reused, not copied."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "train" / "conftest.py"
    spec = importlib.util.spec_from_file_location("dlm_tests_train_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SFT_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny_sft_cpu.toml"


class FinetuneRun(_train_conftest().Torchrun):  # type: ignore[misc]
    """launch/pretrain.py under torchrun with launch/configs/tiny_sft_cpu.toml and test overrides."""

    def __init__(self, init_from: Path, data: Path):
        super().__init__(store=data)
        self.init_from, self.data = init_from, data

    def args(self, run_dir: Path, **overrides) -> list[str]:
        values = {
            "model.init_from": str(self.init_from),
            "finetune.paths": str(self.data),
            "data.seq_len": 24,
            "train.run_dir": str(run_dir),
            "optim.warmup_steps": 2,
            "optim.lr": 1e-2,
            "metrics.log_every": 1,
            **overrides,
        }
        out = ["--config", str(SFT_CONFIG)]
        for k, v in values.items():
            out += [f"--{k}", json.dumps(v) if isinstance(v, (bool, list)) else str(v)]
        return out


@pytest.fixture(scope="session")
def finetune_run(tiny_llama_hf, copy_jsonl) -> FinetuneRun:
    return FinetuneRun(tiny_llama_hf, copy_jsonl)
