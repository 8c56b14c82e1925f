"""Helpers shared by test folders: a small word list for corpora that train tiny tokenizers, and
the `launch/` entry points imported as modules (they are scripts, not a package API)."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]

WORDS = ["the", "of", "and", "to", "in", "is", "was", "river", "stone", "night", "city", "light", "water"]
WORDS += ["red", "blue", "cat", "dog", "ran", "sat"]


def load_script(name: str) -> ModuleType:
    """`launch/NAME.py` as a fresh module, so a test can call its `main(argv)` in process."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, **options: Any) -> bytes:
    """A BPE SentencePiece model (LLaMA-style BOS 1 / EOS 2) trained in memory on one thread, so
    the same sentences give the same model; `options` add or override trainer flags."""
    import sentencepiece as spm

    buf = io.BytesIO()
    flags: dict[str, Any] = {"model_type": "bpe", "bos_id": 1, "eos_id": 2, "minloglevel": 2, "num_threads": 1}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, **(flags | options)
    )
    return buf.getvalue()
