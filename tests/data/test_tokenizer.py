"""Tokenizer loading, round trips, and literal special-token text staying text."""

import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer as RawHF

from dlm.tokenizer import load_tokenizer

LITERALS = "a </s> b <s> c <|endoftext|> d"


def _paths(tok_dir):
    return {
        "spm-file": tok_dir / "spm" / "tokenizer.model",
        "spm-dir": tok_dir / "spm",
        "hf-file": tok_dir / "hf" / "tokenizer.json",
        "hf-dir": tok_dir / "hf",
        "gpt2-dir": tok_dir / "gpt2",
        "gpt2-vocab": tok_dir / "gpt2" / "vocab.json",
        "gpt2-merges": tok_dir / "gpt2" / "merges.txt",
    }


@pytest.mark.parametrize("which", ["spm-file", "spm-dir", "hf-file", "hf-dir", "gpt2-dir", "gpt2-vocab", "gpt2-merges"])
def test_round_trip_and_literal_specials(tok_dir, h, which):
    tok = load_tokenizer(_paths(tok_dir)[which])
    specials = {i for i in (tok.bos_id, tok.eos_id) if i is not None}
    assert specials, "every test tokenizer has an EOS"
    for doc in h.make_docs(60, seed=5) + [LITERALS]:
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc
        assert not specials & set(ids), f"{which}: literal text became a special id in {doc!r}"
    assert tok.encode_batch(["x y", LITERALS]) == [tok.encode("x y"), tok.encode(LITERALS)]
    assert len(tok.sha256) == 64


@pytest.mark.parametrize("which", ["spm-file", "hf-file", "gpt2-dir"])
def test_encode_arrays_equal_encode_batch(tok_dir, h, which):
    """The store writer's array path (SentencePiece: NumPy buffers, no Python ints) against lists."""
    tok = load_tokenizer(_paths(tok_dir)[which])
    docs = h.make_docs(40, seed=7) + [LITERALS, "ünïcödé → 😀 \u00e9", "x"]
    arrays = tok.encode_arrays(docs)
    assert all(a.dtype == np.int32 and a.ndim == 1 for a in arrays)
    assert [a.tolist() for a in arrays] == tok.encode_batch(docs)


def test_facts(tok_dir):
    spm = load_tokenizer(tok_dir / "spm")
    assert (spm.kind, spm.bos_id, spm.eos_id, spm.add_bos, spm.vocab_size) == ("sentencepiece", 1, 2, True, 400)
    gpt2 = load_tokenizer(tok_dir / "gpt2")
    eot = RawHF.from_file(str(tok_dir / "hf" / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert (gpt2.kind, gpt2.bos_id, gpt2.eos_id, gpt2.add_bos) == ("gpt2", None, eot, False)
    hf = load_tokenizer(tok_dir / "hf")
    assert (hf.kind, hf.eos_id, hf.add_bos) == ("hf", eot, False)


def test_hf_literal_special_would_match_without_guard(tok_dir):
    """The guard matters: the raw library turns the literal into the special id."""
    raw = RawHF.from_file(str(tok_dir / "hf" / "tokenizer.json"))
    eot = raw.token_to_id("<|endoftext|>")
    assert eot in raw.encode(LITERALS, add_special_tokens=False).ids
    assert eot not in load_tokenizer(tok_dir / "hf").encode(LITERALS)


def test_sha_follows_file_contents(tok_dir, tmp_path):
    a = tmp_path / "a.model"
    shutil.copy(tok_dir / "spm" / "tokenizer.model", a)
    s1 = load_tokenizer(a).sha256
    assert load_tokenizer(tok_dir / "spm").sha256 == s1
    g = tmp_path / "g"
    shutil.copytree(tok_dir / "gpt2", g)
    assert load_tokenizer(g).sha256 == load_tokenizer(tok_dir / "gpt2").sha256
    (g / "merges.txt").write_text((g / "merges.txt").read_text().rsplit("\n", 2)[0] + "\n")
    assert load_tokenizer(g).sha256 != load_tokenizer(tok_dir / "gpt2").sha256


def test_bad_paths(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path / "vocab.json")
    garbage = tmp_path / "g" / "x.model"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="x.model"):
        load_tokenizer(garbage)
