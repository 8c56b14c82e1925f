"""Index, sampler, blending, elastic resume, fingerprints."""

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_tools.tokenize_fineweb.__main__ import main
from dlm.data import Blend, DataState, PackedDataset, SourceSpec, StepLoader, check_resume
from dlm.data.index import load_index

L = 16


def _build(root: Path, h, tok, name: str, seed: int, n_docs: int = 240, long_every: int = 25) -> Path:
    inputs = root / f"{name}-in"
    inputs.mkdir()
    docs = h.make_docs(n_docs, seed=seed, max_words=30)
    for i in range(0, n_docs, long_every):  # some documents longer than a window
        docs[i] = " ".join([docs[i]] * 8)
    for f in range(3):
        h.write_jsonl(inputs / f"p{f}.jsonl.zst", h.slimpajama(docs[f::3]))
    out = root / name
    assert (
        main(
            [
                "plan",
                str(inputs),
                "-o",
                str(out),
                "--tokenizer",
                str(tok),
                "--files-per-unit",
                "2",
                "--batch-tokens",
                "600",
            ]
        )
        == 0
    )
    assert main(["run", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, h, spm_path):
    root = tmp_path_factory.mktemp("stores")
    return {name: _build(root, h, spm_path, name, seed) for name, seed in (("web", 21), ("code", 22))}


def _stream(store: Path) -> tuple[np.ndarray, set]:
    """Brute force: every token of the store and the set of document start offsets."""
    toks, starts = [], set()
    pos = 0
    for p in sorted(store.glob("unit-*.arrow")):
        with pa.ipc.open_file(p) as r:
            for doc in r.read_all().column("tokens").to_pylist():
                starts.add(pos)
                toks += doc
                pos += len(doc)
    return np.array(toks), starts


def test_samples_match_brute_force(stores):
    ds = PackedDataset([SourceSpec(str(stores["web"]))], seq_len=L, seed=3, heldout_fraction=0.0)
    toks, starts = _stream(stores["web"])
    assert ds.num_windows == [(len(toks) - 1) // L]
    for k in range(0, 2 * ds.num_windows[0], 3):
        _, w, start = ds.locate(k)
        assert start == w * L
        x = ds[k]
        assert x["input_ids"].tolist() == toks[start : start + L].tolist()
        pos, p = [], 0
        for i in range(L):
            p = 0 if i == 0 or start + i in starts else p + 1
            pos.append(p)
        assert x["position_ids"].tolist() == pos
        assert int(x["sample_id"]) == k
    b = ds.batch([5, 9])
    assert b["input_ids"].shape == (2, L) and sorted(b) == ["input_ids", "position_ids", "sample_ids"]
    assert torch.equal(b["position_ids"][1], ds[9]["position_ids"]) and b["sample_ids"].tolist() == [5, 9]


def test_each_epoch_covers_every_window_once(stores):
    ds = PackedDataset([SourceSpec(str(stores["web"]))], seq_len=L, seed=5)
    n = ds.num_windows[0]
    epochs = [[ds.locate(k)[1] for k in range(e * n, (e + 1) * n)] for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    other = PackedDataset([SourceSpec(str(stores["web"]))], seq_len=L, seed=6)
    assert [other.locate(k)[1] for k in range(n)] != epochs[0]
    again = PackedDataset([SourceSpec(str(stores["web"]))], seq_len=L, seed=5)
    assert [again.locate(k)[1] for k in range(2 * n, 3 * n)] == epochs[2]  # epoch 2 without visiting 0, 1


def _brute_greedy(weights, n):
    w = np.array(weights, dtype=float) / sum(weights)
    counts, out = np.zeros(len(w)), []
    for k in range(n):
        i = int(np.argmax(w * (k + 1) - counts))
        out.append((i, int(counts[i])))
        counts[i] += 1
    return out


@pytest.mark.parametrize("weights", [[7, 3], [0.7, 0.3], [1, 2, 3], [0.5, 0.25, 0.25], [5, 1, 1, 2]])
def test_blend_realises_weights(weights):
    blend = Blend(weights)
    n = 3 * blend.period + 7
    seq = [blend.locate(k) for k in range(n)]
    assert seq == _brute_greedy(weights, n)
    share = np.array(weights, dtype=float) / sum(weights)
    counts = np.zeros(len(weights))
    for k, (s, _) in enumerate(seq, start=1):
        counts[s] += 1
        assert np.all(np.abs(counts - share * k) < 1.0)  # every prefix realises the weights to within 1 sample


def test_blended_dataset(stores):
    web, code = SourceSpec(str(stores["web"]), 7, "web"), SourceSpec(str(stores["code"]), 3, "code")
    ds = PackedDataset([web, code], seq_len=L, seed=0)
    srcs = [ds.locate(k)[0] for k in range(1000)]
    assert srcs.count(0) == 700 and srcs.count(1) == 300
    code_only = PackedDataset([code], seq_len=L, seed=0)
    code_toks, _ = _stream(stores["code"])
    ks = [k for k in range(200) if srcs[k] == 1]
    for j, k in enumerate(ks[:10]):  # the j-th code sample of the blend reads code's window for j
        start = code_only.locate(j)[2]
        assert ds.locate(k)[2] == start  # a source's window order is seeded by (seed, its name, epoch)
    with pytest.raises(ValueError, match="unique"):
        PackedDataset([web, SourceSpec(str(stores["code"]), 1, "web")], seq_len=L, seed=0)
    assert ds[ks[0]]["input_ids"].tolist() == code_toks[ds.locate(ks[0])[2] :][:L].tolist()


def _steps(ds, G, b, W, consumed, n_steps, num_workers=0):
    """The global batch of each step: samples of all ranks concatenated in rank order."""
    loaders = [StepLoader(ds, G, b, r, W, consumed, num_workers=num_workers) for r in range(W)]
    iters = [iter(ld) for ld in loaders]
    out = []
    for _ in range(n_steps):
        per_rank = [next(it) for it in iters]
        assert all(len(step) == G // (W * b) for step in per_rank)
        out.append({k: torch.cat([mb[k] for step in per_rank for mb in step]) for k in per_rank[0][0]})
    return out, loaders[0].state()


def test_steps_identical_across_world_sizes_and_resume(stores):
    ds = PackedDataset([SourceSpec(str(stores["web"]), 2), SourceSpec(str(stores["code"]), 1)], seq_len=L, seed=9)
    G = 8
    ref, state = _steps(ds, G, 2, 1, 0, 6)
    assert state == DataState(ds.fingerprint, L, 9, 6 * G)
    for s, batch in enumerate(ref):
        assert batch["sample_ids"].tolist() == list(range(s * G, (s + 1) * G))
    for W in (2, 4):
        got, _ = _steps(ds, G, 2, W, 0, 6)
        for a, b in zip(ref, got):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # resume at step 3 with another world size (and DataLoader workers) from the serialized state
    _, state3 = _steps(ds, G, 2, 2, 0, 3)
    restored = DataState.from_dict(json.loads(json.dumps(state3.to_dict())))
    consumed = check_resume(restored, ds)
    for W, workers in ((4, 0), (1, 2)):
        got, end = _steps(ds, G, 2 if W == 4 else 4, W, consumed, 3, num_workers=workers)
        for a, b in zip(ref[3:], got):
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert end.consumed_samples == 6 * G
    with pytest.raises(ValueError, match="multiple"):
        StepLoader(ds, 8, 3, 0, 2)


def test_fingerprint_and_resume_checks(stores, tmp_path, h, spm_path):
    web, code = str(stores["web"]), str(stores["code"])
    base = PackedDataset([SourceSpec(web, 7), SourceSpec(code, 3)], seq_len=L, seed=0)
    same = PackedDataset(
        [SourceSpec(web, 0.7), SourceSpec(code, 0.3)], seq_len=L, seed=1, index_dir=tmp_path / "elsewhere"
    )
    assert base.fingerprint == same.fingerprint  # same inputs, other index folder, other seed
    changed = [
        PackedDataset([SourceSpec(web, 6), SourceSpec(code, 3)], seq_len=L, seed=0),
        PackedDataset([SourceSpec(web, 7), SourceSpec(code, 3)], seq_len=L, seed=0, heldout_fraction=0.01),
        PackedDataset([SourceSpec(web, 7)], seq_len=L, seed=0),
        PackedDataset([SourceSpec(web, 7), SourceSpec(code, 3, "c2")], seq_len=L, seed=0),
        PackedDataset(
            [SourceSpec(web, 7), SourceSpec(str(_build(tmp_path, h, spm_path, "code2", 22, n_docs=239)), 3, "code")],
            seq_len=L,
            seed=0,
        ),  # one document fewer
    ]
    fps = {base.fingerprint} | {d.fingerprint for d in changed}
    assert len(fps) == 1 + len(changed)
    state = DataState(base.fingerprint, L, 0, 40)
    assert check_resume(state, same.__class__([SourceSpec(web, 7), SourceSpec(code, 3)], seq_len=L, seed=0)) == 40
    with pytest.raises(ValueError, match=r"fingerprint.*set data\.allow_changed_index = true in the config"):
        check_resume(state, changed[-1])  # the message names the real config key
    with pytest.raises(ValueError, match="seq_len"):
        check_resume(state, PackedDataset([SourceSpec(web, 7), SourceSpec(code, 3)], seq_len=L + 1, seed=0))
    assert check_resume(state, changed[-1], allow_changed=True) == 40
    with pytest.raises(ValueError, match="index_fingerprint"):
        DataState.from_dict({"seq_len": 1, "seed": 0, "consumed_samples": 0})


def _load(args):
    store, ix = args
    built = []
    index = load_index(Path(store), Path(ix), log=built.append)
    return bool(built), index.fingerprint, int(index.doc_starts[-1])


def test_index_built_once_under_lock(stores, tmp_path):
    ix = tmp_path / "ix"
    with mp.get_context("fork").Pool(3) as pool:
        res = pool.map(_load, [(str(stores["web"]), str(ix))] * 3)
    assert sum(r[0] for r in res) == 1 and len({r[1:] for r in res}) == 1
    assert [p.name for p in ix.iterdir() if p.is_dir()] == [res[0][1]]  # no temp folder left


def test_heldout_split(stores):
    spec = [SourceSpec(str(stores["web"]))]
    train = PackedDataset(spec, seq_len=L, seed=0, heldout_fraction=0.2)
    held = PackedDataset(spec, seq_len=L, seed=0, split="heldout", heldout_fraction=0.2)
    _, starts = _stream(stores["web"])
    (tsrc,), (hsrc,) = train._sources, held._sources
    assert tsrc.hi == hsrc.lo and hsrc.lo in starts  # split at a document start
    assert max(train.locate(k)[2] + L + 1 for k in range(train.num_windows[0])) <= hsrc.lo
    assert [held.locate(k)[2] for k in range(3)] == [hsrc.lo, hsrc.lo + L, hsrc.lo + 2 * L]  # in order
    assert held[0]["position_ids"][0] == 0 and train.fingerprint == held.fingerprint
    with pytest.raises(ValueError, match="heldout tokens"):
        PackedDataset(spec, seq_len=L, seed=0, split="heldout", heldout_fraction=0.0)


def test_incomplete_store_refused(tmp_path, h, spm_path):
    store = _build(tmp_path, h, spm_path, "partial", 30, n_docs=30)
    (store / "unit-00001.json").unlink()
    with pytest.raises(ValueError, match="incomplete.*unit-00001.json"):
        PackedDataset([SourceSpec(str(store))], seq_len=L, seed=0)


def test_pickles_for_dataloader_workers(stores):
    import pickle

    ds = PackedDataset([SourceSpec(str(stores["web"]))], seq_len=L, seed=0)
    ds[3]
    clone = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(ds[7][k], clone[7][k]) for k in ds[7])
