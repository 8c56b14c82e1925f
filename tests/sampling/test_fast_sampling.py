"""Fast sampling: key/value cache (prefix, dual), confidence-threshold commits, tokens per step."""

from __future__ import annotations

import pytest
import torch

from dlm.attention.layout import AttentionLayout
from dlm.kv_cache import KVCache
from dlm.models import build_model, preset
from dlm.sampling import Request, SamplingConfig, generate, pad_rows

from .test_sampling import BOS, EOS, PositionModel, _table

MASK = 256


def _model(family: str = "tiny-llama", causal: bool = False, seed: int = 0):
    cfg = preset(family).replace(
        vocab_size=320, base_vocab_size=256, mask_token_id=MASK, attention="causal" if causal else "bidirectional"
    )
    model = build_model(cfg)
    model.init_weights(seed=seed)
    return model.eval()


REQS = [
    Request([1, 5, 6, 7]),
    Request([1, 3], suffix=[9, 10, 11], length=10),
    Request([1, 4, 4, 4, 4, 4, 4, 8, 9], length=5),
    Request([1, 20, 30], suffix=[12]),
]


def _reference(model, requests: list[Request], length: int, block: int) -> list[list[int]]:
    """The exact sampler written out plainly: greedy, confidence order, one token per step, one
    full forward pass of each row alone per step, full logits."""
    out = []
    for req in requests:
        n = req.length or length
        row = req.prompt + [MASK] * n + req.suffix
        s = len(req.prompt)
        ids = torch.tensor([row])
        layout = AttentionLayout.single(1, len(row), causal=model.config.attention == "causal")
        for lo in range(0, n, block):
            for _ in range(min(block, n - lo)):
                logits = model(ids, layout)[0].float()
                logits[:, 256:] = float("-inf")
                probs = logits.softmax(-1)
                span = torch.arange(s + lo, s + min(n, lo + block))
                span = span[ids[0, span] == MASK]
                conf, tok = probs[span - 1].max(-1)
                best = int(conf.argmax())
                ids[0, span[best]] = tok[best]
        out.append(ids[0, s : s + n].tolist())
    return out


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_cache_none_matches_plain_reference(family):
    model = _model(family, seed=1)
    cfg = SamplingConfig(length=8, block_size=4, tokens_per_step=1, eos_fill=False)
    assert [s.raw for s in generate(model, REQS, cfg)] == _reference(model, REQS, 8, 4)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_window_after_fill_equals_full_pass(family, mode):
    """Right after a fill the stored entries are current, so a window pass must give the full
    model's outputs at its query positions: the cache is wired right (bidirectional model)."""
    model = _model(family, seed=2)
    rows = [[1, 5, 6, 7, MASK, MASK, MASK, MASK, 9], [1, 3, MASK, MASK, 11, 12]]
    ids, pos = pad_rows(rows)
    layout = AttentionLayout.from_position_ids(pos)
    full = model(ids, layout)
    cache = KVCache(layout, model.config.n_layers)
    sel = torch.tensor([0, 1])
    model(ids, layout, head=lambda h, w: None, cache=cache.fill(sel))
    w0 = torch.tensor([3, 1])
    w1 = torch.tensor([8, 4]) if mode == "dual" else torch.tensor([9, 6])
    cols = w0[:, None] + torch.arange(int((w1 - w0).max()))
    valid = cols < w1[:, None]
    cols = torch.where(valid, cols, w0[:, None])
    win = model(
        ids[sel[:, None], cols],
        AttentionLayout.from_position_ids(pos[sel[:, None], cols]),
        cache=cache.window(sel, cols, valid),
    )
    for b in range(2):
        n = int(valid[b].sum())
        torch.testing.assert_close(win[b, :n], full[b, cols[b, :n]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_prefix_cache_is_exact_with_causal_attention(family):
    """With causal attention a committed prefix's keys never change, so the prefix cache must
    reproduce the uncached sampler step by step."""
    model = _model(family, causal=True, seed=3)
    base = dict(steps=12, length=12, block_size=4, eos_fill=False)
    runs = {}
    for mode in ("none", "prefix"):
        records = []
        out = generate(model, REQS, SamplingConfig(cache=mode, **base), callback=records.append)
        runs[mode] = ([s.raw for s in out], [r.ids for r in records])
    assert runs["prefix"][0] == runs["none"][0]
    assert all(torch.equal(a, b) for a, b in zip(*(runs[m][1] for m in ("none", "prefix"))))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_refilled_every_step_is_exact(mode):
    """Blocks of one token refill the cache at every step, so even on a bidirectional model the
    cached sampler must reproduce the exact one (stale entries are the only approximation)."""
    model = _model(seed=4)
    base = dict(length=8, block_size=1, tokens_per_step=1, eos_fill=False)
    exact = generate(model, REQS, SamplingConfig(**base))
    cached = generate(model, REQS, SamplingConfig(cache=mode, **base))
    assert [s.raw for s in cached] == [s.raw for s in exact]


@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.02])
def test_batched_requests_equal_one_by_one(mode, threshold):
    model = _model(seed=5)
    cfg = SamplingConfig(steps=12, length=12, block_size=4, cache=mode, threshold=threshold)
    batched = [s.raw for s in generate(model, REQS, cfg)]
    alone = [generate(model, [r], cfg)[0].raw for r in REQS]
    assert batched == alone


def test_threshold_one_with_one_token_per_step_is_confidence_order():
    model = _model(seed=6)
    for mode in ("none", "dual"):
        exact = generate(model, REQS, SamplingConfig(length=12, block_size=4, tokens_per_step=1, cache=mode))
        thr = generate(
            model, REQS, SamplingConfig(length=12, block_size=4, threshold=1.0, tokens_per_step=1, cache=mode)
        )
        assert [s.raw for s in thr] == [s.raw for s in exact]


def test_threshold_commits_confident_positions_together_and_finishes_blocks_early():
    table = _table(7)
    table[2:6] = -10.0
    table[2:6, 3] = 10.0  # positions 2..5 are surely token 3
    model = PositionModel(table)
    records = []
    cfg = SamplingConfig(steps=8, length=8, block_size=4, threshold=0.9)
    out = generate(model, [Request([BOS])], cfg, callback=records.append)
    # step 0 decodes block 1 (positions 1..4): its three sure positions commit together
    assert records[0].committed[0, 2:5].all() and not records[0].committed[0, 5:].any()
    assert len(records) < 8  # block 1 handed over to block 2 before its 4 steps were spent
    assert out[0].raw[1:5] == [3, 3, 3, 3]
    exact = generate(model, [Request([BOS])], SamplingConfig(steps=8, length=8, block_size=4))
    assert exact[0].raw[1:5] == [3, 3, 3, 3]


def test_tokens_per_step_schedule():
    model = PositionModel(_table(8))
    records = []
    generate(
        model, [Request([BOS])], SamplingConfig(length=10, block_size=4, tokens_per_step=3), callback=records.append
    )
    # blocks of 4, 4, 2 tokens: 2 + 2 + 1 steps committing 3,1 | 3,1 | 2
    assert [int(r.committed.sum()) for r in records] == [3, 1, 3, 1, 2]


def test_eos_ends_rows_early_under_threshold():
    table = _table(9)
    table[3, :] = 0.0
    table[3, EOS] = 40.0  # answer index 1 is surely EOS
    model = PositionModel(table)
    records = []
    out = generate(
        model,
        [Request([BOS, 2])],
        SamplingConfig(length=16, block_size=4, threshold=0.9, steps=16),
        callback=records.append,
    )
    assert out[0].raw[1:] == [EOS] * 15 and len(out[0].tokens) == 1
    assert len(records) <= 2  # every later block was filled with EOS: no more steps


@pytest.mark.parametrize("mode", ["none", "dual"])
def test_seeded_runs_reproducible(mode):
    model = _model(seed=10)
    cfg = dict(steps=8, length=8, block_size=4, temperature=1.0, cache=mode, threshold=0.05)
    a = generate(model, REQS, SamplingConfig(seed=1, **cfg))
    b = generate(model, REQS, SamplingConfig(seed=1, **cfg))
    c = generate(model, REQS, SamplingConfig(seed=2, **cfg))
    assert [s.raw for s in a] == [s.raw for s in b]
    assert [s.raw for s in a] != [s.raw for s in c]


def test_config_errors():
    with pytest.raises(ValueError, match="cache"):
        SamplingConfig(cache="full")
    with pytest.raises(ValueError, match="confidence"):
        SamplingConfig(order="margin", threshold=0.9)
    with pytest.raises(ValueError, match="threshold"):
        SamplingConfig(threshold=0.0)
    with pytest.raises(ValueError, match="tokens_per_step"):
        SamplingConfig(tokens_per_step=-1)
