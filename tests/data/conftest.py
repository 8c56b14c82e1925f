"""Fixtures for the data tests: tiny tokenizers trained here, input files written here."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tests.helpers import train_sentencepiece

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "they",
    "this",
    "which",
    "be",
    "or",
    "an",
    "had",
    "are",
    "not",
    "but",
    "were",
    "it",
    "one",
    "all",
    "she",
    "he",
    "we",
    "you",
    "their",
    "has",
    "been",
    "who",
    "two",
    "more",
    "would",
    "when",
    "there",
    "will",
    "can",
    "said",
    "may",
    "about",
    "into",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "first",
    "river",
    "stone",
    "night",
    "city",
    "light",
    "water",
]
_ODD = ["</s>", "<s>", "<|endoftext|>", "wörld", "東京", "naïve", "  double  space", "tab\there", "line\nbreak", "42"]


def make_docs(n: int, seed: int = 0, max_words: int = 80) -> list[str]:
    """Deterministic pseudo-English documents, some holding literal special-token text."""
    r = random.Random(seed)
    docs = []
    for i in range(n):
        words = [r.choice(_WORDS) for _ in range(r.randint(1, max_words))]
        if i % 3 == 0:
            words.insert(r.randrange(len(words) + 1), r.choice(_ODD))
        docs.append(" ".join(words).capitalize() + ".")
    return docs


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """SentencePiece (LLaMA-style BOS 1 / EOS 2), tokenizer.json, and GPT-2 vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tok")
    corpus = make_docs(2000, seed=1)
    spm_model = train_sentencepiece(
        corpus,
        400,
        unk_id=0,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    (root / "spm").mkdir()
    (root / "spm" / "tokenizer.model").write_bytes(spm_model)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    (root / "hf").mkdir()
    tok.save(str(root / "hf" / "tokenizer.json"))
    (root / "gpt2").mkdir()
    tok.model.save(str(root / "gpt2"))  # vocab.json + merges.txt
    return root


@pytest.fixture(scope="session")
def spm_path(tok_dir) -> Path:
    return tok_dir / "spm" / "tokenizer.model"


def write_jsonl(path: Path, records: list, zst: bool | None = None) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    zst = path.name.endswith(".zst") if zst is None else zst
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)
    return path


def write_parquet(path: Path, texts: list, column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts, "id": [str(i) for i in range(len(texts))]}), path, row_group_size=50)
    return path


def slimpajama(texts: list[str], sets=("RedPajamaCommonCrawl", "RedPajamaGithub")) -> list[dict]:
    return [{"text": t, "meta": {"redpajama_set_name": sets[i % len(sets)]}} for i, t in enumerate(texts)]


def slimpajama_files(folder: Path, docs: list[str], n_files: int) -> Path:
    """A new input folder of `n_files` SlimPajama-style .jsonl.zst files, `docs` split into consecutive chunks."""
    folder.mkdir()
    per = -(-len(docs) // n_files)
    for i in range(n_files):
        write_jsonl(folder / f"p{i:02d}.jsonl.zst", slimpajama(docs[i * per : (i + 1) * per]))
    return folder


@pytest.fixture
def corpus_dir(tmp_path) -> tuple[Path, dict]:
    """A mixed input folder: 2 parquet, 3 .jsonl.zst, 1 .jsonl, 2 .txt. Returns (dir, expected
    documents per input file in file order, before filters)."""
    d = tmp_path / "inputs"
    d.mkdir()
    docs = make_docs(260, seed=2)
    expected = {}
    expected[write_parquet(d / "a.parquet", docs[:60])] = docs[:60]
    expected[write_parquet(d / "b.parquet", docs[60:100])] = docs[60:100]
    for i, (lo, hi) in enumerate([(100, 140), (140, 190), (190, 230)]):
        expected[write_jsonl(d / f"sp_{i}.jsonl.zst", slimpajama(docs[lo:hi]))] = docs[lo:hi]
    expected[write_jsonl(d / "plain.jsonl", slimpajama(docs[230:250]))] = docs[230:250]
    for i, t in enumerate(docs[250:252]):
        (d / f"t{i}.txt").write_text(t)
        expected[d / f"t{i}.txt"] = [t]
    return d, {Path(k).resolve(): v for k, v in expected.items()}


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    """Helpers for test modules (conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(
        make_docs=make_docs,
        write_jsonl=write_jsonl,
        write_parquet=write_parquet,
        slimpajama=slimpajama,
        slimpajama_files=slimpajama_files,
    )
