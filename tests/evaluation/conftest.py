"""A tiny Hugging Face style folder (tiny llama + a SentencePiece tokenizer trained here), as an
adapted model's export (with [MASK]) and as a plain AR model (without)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dlm.models import build_model, preset
from dlm.models.hf import save_hf_model
from dlm.tokenizer import load_tokenizer
from tests.helpers import WORDS, train_sentencepiece


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:

    root = tmp_path_factory.mktemp("tiny_hf")
    r = random.Random(0)
    corpus = [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))) + "." for _ in range(400)]
    spm_model = train_sentencepiece(corpus, 80, unk_id=0, pad_id=-1)
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.model").write_bytes(spm_model)
    vocab = load_tokenizer(root / "tok").vocab_size
    base = preset("tiny-llama").replace(vocab_size=vocab, base_vocab_size=vocab, n_layers=1)
    plain = build_model(base)
    plain.init_weights(seed=0)
    save_hf_model(plain, base, root / "plain", tokenizer_from=root / "tok")  # an AR folder, never adapted
    cfg = base.replace(vocab_size=vocab + 1, mask_token_id=vocab)  # as an adapted model's export
    model = build_model(cfg)
    model.init_weights(seed=0)
    save_hf_model(model, cfg, root / "model", tokenizer_from=root / "tok")
    return {"model": root / "model", "plain": root / "plain"}


@pytest.fixture(scope="session")
def hf_folder(tiny_folders) -> Path:
    return tiny_folders["model"]


@pytest.fixture(scope="session")
def plain_folder(tiny_folders) -> Path:
    return tiny_folders["plain"]
