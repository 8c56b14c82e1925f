"""The demo's one-store split: the parquet (held-out) unit must be exactly the store's held-out
tail, so the adapted model is scored on passages it never trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_tools.demo_corpus import Passage, write_jsonl_zst, write_parquet
from dlm.data import PackedDataset, SourceSpec
from launch.demo import tokenize


def _passages(n: int, tag: str) -> list[Passage]:
    return [
        Passage(f"{tag} passage {i}: " + "the river ran past the stone city " * (1 + i % 5), "squad", "x")
        for i in range(n)
    ]


def _corpus(root, bpe_reference, train_name: str, heldout_name: str):
    tok = root / "tokenizer.json"
    bpe_reference.save(str(tok))
    train_file, heldout_file = root / train_name, root / heldout_name
    write_jsonl_zst(train_file, _passages(60, "train"))
    write_parquet(heldout_file, _passages(12, "heldout"))
    return tok, train_file, heldout_file


def test_heldout_split_is_exactly_the_parquet_unit(tmp_path, bpe_reference):
    # the demo corpus layout: corpus/jsonl/train/... sorts before corpus/parquet/heldout/...
    tok, train_file, heldout_file = _corpus(
        tmp_path, bpe_reference, "jsonl/train/demo.jsonl.zst", "parquet/heldout/demo.parquet"
    )
    store = tmp_path / "store"
    fraction = tokenize(store, tok, train_file, heldout_file)
    assert tokenize(store, tok, train_file, heldout_file) == fraction  # a rerun reuses the store

    split = {
        s: PackedDataset([SourceSpec(str(store))], seq_len=8, seed=0, split=s, heldout_fraction=fraction)
        for s in ("train", "heldout")
    }
    train_src, held_src = split["train"]._sources[0], split["heldout"]._sources[0]
    side = json.loads((store / "unit-00001.json").read_text())
    assert side["inputs"] == [str(heldout_file)]
    assert train_src.hi == held_src.lo and held_src.hi - held_src.lo == side["tokens"]
    first = bpe_reference.decode(np.asarray(split["heldout"].batch([0])["input_ids"][0]).tolist())
    assert first.startswith("heldout pass")  # the first held-out document, from its first token


def test_heldout_unit_sorting_first_is_refused(tmp_path, bpe_reference):
    tok, train_file, heldout_file = _corpus(tmp_path, bpe_reference, "b/train.jsonl.zst", "a/heldout.parquet")
    with pytest.raises(RuntimeError, match="parquet unit last"):
        tokenize(tmp_path / "store", tok, train_file, heldout_file)
