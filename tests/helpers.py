"""Helpers shared by test folders: a small word list for corpora that train tiny tokenizers, and
the `launch/` entry points imported as modules (they are scripts, not a package API)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dlm.atomic import atomic_write_json
from dlm.data.store import FORMAT, ShardWriter, sha256_file, shard_path, sidecar_path, store_schema

REPO = Path(__file__).resolve().parents[1]

WORDS = ["the", "of", "and", "to", "in", "is", "was", "river", "stone", "night", "city", "light", "water"]
WORDS += ["red", "blue", "cat", "dog", "ran", "sat"]


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT ARGS` from the repo root as its own process, output captured; $OUT
    unset, so details go only where `args` say."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


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


BOS, EOS = 1, 2  # the synthetic store's ids


def _documents(n_docs: int, seed: int) -> list[np.ndarray]:
    """Documents that repeat a short motif: learnable in a few steps by a tiny model."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(8, 48))
        motif = rng.integers(3, 35, size=int(rng.integers(2, 5)))
        docs.append(np.concatenate([[BOS], np.resize(motif, n), [EOS]]))
    return docs


def write_store(folder: Path, n_docs: int = 600, units: int = 2, seed: int = 0) -> Path:
    """A finished token store: plan.json, one Arrow shard + sidecar per unit."""
    folder.mkdir(parents=True)
    tokenizer = {
        "kind": "synthetic",
        "path": "synthetic",
        "sha256": "0" * 64,
        "vocab_size": 256,
        "bos_id": BOS,
        "eos_id": EOS,
        "add_bos": True,
    }
    docs = _documents(n_docs, seed)
    per_unit = np.array_split(np.arange(n_docs), units)
    plan = {
        "format": "test-store",
        "tokenizer": tokenizer,
        "dtype": "uint16",
        "units": [{"id": u, "files": []} for u in range(units)],
    }
    for u, ids in enumerate(per_unit):
        writer = ShardWriter(shard_path(folder, u), store_schema(np.dtype(np.uint16), tokenizer), batch_tokens=2048)
        flat = np.concatenate([docs[i] for i in ids])
        writer.add(flat, np.array([len(docs[i]) for i in ids]))
        writer.commit()
        final = shard_path(folder, u)
        atomic_write_json(
            sidecar_path(folder, u),
            {
                "format": FORMAT,
                "unit": u,
                "file": final.name,
                "bytes": final.stat().st_size,
                "sha256": sha256_file(final),
                "documents": len(ids),
                "tokens": len(flat),
                "batches": writer.batches,
            },
        )
    atomic_write_json(folder / "plan.json", plan)
    return folder


def write_word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json over the synthetic store's 256 ids (w0 ... w255; 1 = <s>,
    2 = </s>), to decode generated samples."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(256)}
    vocab["<s>"], vocab["</s>"] = vocab.pop("w1"), vocab.pop("w2")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path
