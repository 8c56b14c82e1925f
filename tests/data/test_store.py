"""The Arrow token store: zero-copy reads, refusal of compressed/truncated shards, dtypes."""

import json

import numpy as np
import pyarrow as pa
import pytest

from data_tools.tokenize_fineweb.__main__ import main
from dlm.data import PackedDataset, SourceSpec
from dlm.data.store import ShardWriter, open_shard, store_schema, token_dtype

FACTS = {"kind": "test", "vocab_size": 70000}


@pytest.fixture
def store(tmp_path, h, spm_path):
    inputs = h.slimpajama_files(tmp_path / "in", h.make_docs(400, seed=11), 4)
    out = tmp_path / "store"
    assert (
        main(
            [
                "plan",
                str(inputs),
                "-o",
                str(out),
                "--tokenizer",
                str(spm_path),
                "--files-per-unit",
                "2",
                "--batch-tokens",
                "900",
            ]
        )
        == 0
    )
    assert main(["run", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


def test_reads_are_zero_copy(store):
    assert pa.total_allocated_bytes() == 0
    view = open_shard(store / "unit-00000.arrow")
    assert len(view.values) > 3 and pa.total_allocated_bytes() == 0
    ds = PackedDataset([SourceSpec(str(store))], seq_len=64, seed=0, heldout_fraction=0.0)
    for k in range(0, 3 * sum(ds.num_windows), 7):  # every epoch path, windows spanning batches and shards
        ds[k]
        ds.batch([k, k + 1, k + 2])
    assert pa.total_allocated_bytes() == 0


def _rewrite(path, compression):
    with pa.ipc.open_file(path) as r:
        table = r.read_all()
    with (
        pa.OSFile(str(path), "wb") as f,
        pa.ipc.new_file(f, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w,
    ):
        for batch in table.to_batches():
            w.write_batch(batch)


def test_compressed_shard_refused(store, tmp_path):
    path = store / "unit-00001.arrow"
    _rewrite(path, "zstd")
    with pytest.raises(ValueError, match=f"{path}.*(compressed|uncompressed)"):
        open_shard(path)
    side = json.loads((store / "unit-00001.json").read_text())
    side["bytes"] = path.stat().st_size  # even with a consistent sidecar
    (store / "unit-00001.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="unit-00001.arrow"):
        PackedDataset([SourceSpec(str(store))], seq_len=16, seed=0, index_dir=tmp_path / "ix")


def test_truncated_shard_refused(store, tmp_path):
    path = store / "unit-00000.arrow"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=f"{path}.*truncated"):
        open_shard(path)
    with pytest.raises(ValueError, match="unit-00000.arrow"):
        PackedDataset([SourceSpec(str(store))], seq_len=16, seed=0, index_dir=tmp_path / "ix")


def test_shard_replaced_after_index_refused(store, tmp_path):
    ds = PackedDataset([SourceSpec(str(store))], seq_len=16, seed=0, index_dir=tmp_path / "ix")
    path = store / "unit-00000.arrow"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8 + b"\0" * 64)  # same sidecar, other bytes
    fresh = PackedDataset([SourceSpec(str(store))], seq_len=16, seed=0, index_dir=tmp_path / "ix")
    with pytest.raises(ValueError, match="unit-00000.arrow"):
        for k in range(sum(fresh.num_windows)):
            fresh[k]
    assert ds.fingerprint == fresh.fingerprint  # the index trusts sidecars; shard reads re-check them


def test_uint32_when_vocab_needs_it(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    dtype = token_dtype(FACTS["vocab_size"])
    w = ShardWriter(tmp_path / "big.arrow", store_schema(dtype, FACTS), batch_tokens=5)
    toks = np.array([1, 69999, 65536, 3, 2, 66000, 7], dtype=dtype)
    w.add(toks, np.array([3, 4]))
    w.commit()
    view = open_shard(tmp_path / "big.arrow")
    assert view.schema.field("tokens").type == pa.list_(pa.uint32())
    assert np.concatenate(view.values).tolist() == toks.tolist() and view.tokenizer == FACTS


def test_batches_cut_by_documents_not_by_caller_chunks(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200)
    toks = rng.integers(0, 400, size=int(lengths.sum())).astype(np.uint16)
    schema = store_schema(np.dtype(np.uint16), {"kind": "test"})
    outs = []
    for chunk in (1, 7, 200):
        w = ShardWriter(tmp_path / f"c{chunk}.arrow", schema, batch_tokens=100)
        pos = 0
        for i in range(0, 200, chunk):
            n = int(lengths[i : i + chunk].sum())
            w.add(toks[pos : pos + n], lengths[i : i + chunk])
            pos += n
        w.commit()
        outs.append((tmp_path / f"c{chunk}.arrow").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    view = open_shard(tmp_path / "c1.arrow")
    sizes = [len(v) for v in view.values]
    assert all(s >= 100 for s in sizes[:-1]) and sum(sizes) == len(toks)
    assert all(s - int(np.diff(o)[-1]) < 100 for s, o in zip(sizes, view.offsets))  # cut right after reaching 100
