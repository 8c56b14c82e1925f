"""Exports always carry the run's tokenizer (whatever its file is called), and a model folder
whose tokenizer differs from the data's is refused even when the vocabulary sizes agree."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.distributed as dist

from dlm.models import build_model
from dlm.tokenizer import load_tokenizer, tokenizer_sha256
from dlm.train.checkpoint import Checkpointer, export_checkpoint
from dlm.train.config import ModelSection
from dlm.train.parallelize import free_port
from dlm.train.weights import weight_source
from tests.helpers import train_sentencepiece


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    """A SentencePiece model saved under a name HF loaders would not look for."""

    words = ["river", "stone", "night", "city", "light", "water", "the", "of", "and"]
    sentences = [" ".join(words[(i + j) % 9] for j in range(12)) for i in range(200)]
    path = tmp_path_factory.mktemp("spm") / "spm-v1.model"
    path.write_bytes(train_sentencepiece(sentences, 300, byte_fallback=True))
    return path


def _facts(path) -> dict:
    tok = load_tokenizer(path)
    return {**tok.facts(), "path": str(path)}


def _checkpoint(folder, source) -> Checkpointer:
    model = build_model(source.config)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(folder, keep_last=1, rank=0, world_size=1)
    state = {"step": 1, "model_config": source.config.to_dict(), "tokenizer_from": source.tokenizer_from}
    ckpt.save(1, model, opt, state)
    return ckpt


def test_export_holds_a_tokenizer_of_any_file_name(spm_file, tmp_path):
    source = weight_source(ModelSection(preset="tiny-llama"), 0, _facts(spm_file))
    ckpt = _checkpoint(tmp_path / "ckpts", source)
    out = export_checkpoint(ckpt.latest(), tmp_path / "export")
    assert (out / "tokenizer.model").read_bytes() == spm_file.read_bytes()
    assert load_tokenizer(out).sha256 == tokenizer_sha256(spm_file)


def test_export_warns_when_the_tokenizer_is_gone(spm_file, tmp_path, caplog):
    moved = tmp_path / "tok" / spm_file.name
    moved.parent.mkdir()
    shutil.copyfile(spm_file, moved)
    source = weight_source(ModelSection(preset="tiny-llama"), 0, _facts(moved))
    ckpt = _checkpoint(tmp_path / "ckpts", source)
    moved.unlink()
    with caplog.at_level(logging.WARNING, logger="dlm"):
        out = export_checkpoint(ckpt.latest(), tmp_path / "export")
    assert (out / "config.json").is_file() and not (out / "tokenizer.model").exists()
    assert f"export {out} holds no tokenizer" in caplog.text and str(moved) in caplog.text
    with pytest.raises(FileNotFoundError, match=str(moved)):
        export_checkpoint(ckpt.latest(), tmp_path / "export2", tokenizer_from=moved)


def test_model_tokenizer_must_match_the_data(hf_folder, tokenizer_json, tmp_path):
    """Two word-level tokenizers of the same size (256) that differ in one token."""
    model = tmp_path / "model"
    shutil.copytree(hf_folder, model)
    shutil.copyfile(tokenizer_json, model / "tokenizer.json")
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(tokenizer_json.read_text().replace('"w7"', '"w7x"'))
    assert load_tokenizer(other).vocab_size == load_tokenizer(tokenizer_json).vocab_size
    section = ModelSection(init_from=str(model))
    assert weight_source(section, 0, _facts(tokenizer_json)).tokenizer_from == str(model)
    with pytest.raises(ValueError, match=rf"tokenized with tokenizer.json \(sha256 .*model.init_from {model}"):
        weight_source(section, 0, _facts(other))
