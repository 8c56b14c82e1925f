"""Sampling: fixed prompt/suffix, full unmasking, immutability, commit orders, blocks, EOS, seeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlm.attention.layout import AttentionLayout
from dlm.models import build_model, preset
from dlm.models.config import ModelConfig
from dlm.sampling import ORDERS, Request, SamplingConfig, generate, pad_rows

V, MASK, BOS, EOS = 17, 16, 0, 1  # base vocabulary 16, [MASK] appended at 16


def _cfg(max_seq_len: int = 64) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=V,
        base_vocab_size=V - 1,
        dim=4,
        n_layers=1,
        n_heads=1,
        ffn_dim=4,
        max_seq_len=max_seq_len,
        mask_token_id=MASK,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


class PositionModel(nn.Module):
    """Logits for position p are a fixed table row, whatever the context (so scores are known)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.config = _cfg(table.shape[0] - 1)
        self.table = table  # [max_seq_len + 1, V]: row p predicts the token at position p
        self.eye = nn.Parameter(torch.eye(V))

    def output_weight(self) -> torch.Tensor:
        return self.eye

    def forward(self, input_ids, layout: AttentionLayout, head=None):
        hidden = self.table[(layout.position_ids + 1).clamp(max=self.table.shape[0] - 1)]
        return hidden if head is None else head(hidden, self.output_weight())


class ChainModel(nn.Module):
    """Strongly prefers `target`: sure of token p when token p-1 is already right, otherwise mildly
    prefers a wrong `decoy` token. Only a confidence-ordered decoder recovers `target`."""

    def __init__(self, target: list[int], decoy: list[int]):
        super().__init__()
        self.config = _cfg(len(target))
        self.target = torch.tensor(target + [EOS])
        self.decoy = torch.tensor(decoy + [EOS])
        self.eye = nn.Parameter(torch.eye(V))

    def output_weight(self) -> torch.Tensor:
        return self.eye

    def forward(self, input_ids, layout: AttentionLayout, head=None):
        pos = layout.position_ids.clamp(max=len(self.target) - 2)
        right = input_ids == self.target[pos]
        hidden = torch.zeros(*input_ids.shape, V)
        hidden.scatter_(-1, self.target[pos + 1][..., None], 10.0 * right[..., None].float())
        hidden.scatter_add_(-1, self.decoy[pos + 1][..., None], 2.0 * (~right)[..., None].float())
        hidden[..., MASK] = 50.0  # the sampler must never emit [MASK]
        return hidden if head is None else head(hidden, self.output_weight())


def _table(seed: int, rows: int = 65) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, V, generator=g) * 3
    t[:, EOS] = -30.0  # no EOS unless a test asks for it
    return t


def _run(model, requests, cfg):
    records = []
    out = generate(model, requests, cfg, callback=records.append)
    return out, records


REQS = [
    Request([BOS, 5, 6, 7]),
    Request([BOS, 3], suffix=[9, 10, 11]),
    Request([], length=3),
    Request([BOS, 4, 4, 4, 4, 4, 4], suffix=[12]),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", [0, 3])
def test_prompt_suffix_fixed_all_filled_and_immutable(order, block):
    model = PositionModel(_table(0))
    cfg = SamplingConfig(steps=4, length=7, order=order, temperature=1.0, block_size=block, seed=3)
    out, records = _run(model, REQS, cfg)
    assert 1 <= len(records) <= 4  # stops early once nothing is masked
    first, last = records[0], records[-1]
    for b, req in enumerate(REQS):
        prefix = req.prompt or [BOS]
        n = req.length or 7
        s = len(prefix)
        assert out[b].prefix == prefix
        assert last.ids[b, :s].tolist() == prefix
        assert last.ids[b, s + n : s + n + len(req.suffix)].tolist() == req.suffix
        assert not last.masked[b].any()
        assert MASK not in out[b].raw and len(out[b].raw) == n
        assert all(0 <= t < V - 1 for t in out[b].raw)
    assert first.masked.sum() < sum((r.length or 7) for r in REQS)  # something committed at step 0
    for prev, cur in zip(records, records[1:]):
        fixed = ~prev.masked
        assert torch.equal(cur.ids[fixed], prev.ids[fixed])  # committed tokens never change
        assert not (cur.masked & fixed).any()  # and are never re-masked
        assert torch.equal(cur.committed, prev.masked & ~cur.masked)


@pytest.mark.parametrize("order", ["confidence", "margin", "entropy"])
def test_scored_orders_commit_their_top_positions(order):
    table = _table(1)
    model = PositionModel(table)
    probs = table.clone()
    probs[:, MASK] = float("-inf")
    probs = probs.softmax(-1)
    top2 = probs.topk(2, -1).values
    score = {
        "confidence": top2[:, 0],
        "margin": top2[:, 0] - top2[:, 1],
        "entropy": (probs * probs.clamp_min(1e-30).log()).sum(-1),
    }[order]
    n, steps = 12, 5
    cfg = SamplingConfig(steps=steps, length=n, order=order, temperature=0.0)
    _, records = _run(model, [Request([BOS, 2])], cfg)
    masked = torch.zeros(2 + n, dtype=torch.bool)
    masked[2:] = True
    for i, rec in enumerate(records):
        remaining = masked.nonzero().flatten()
        k = -(-len(remaining) // (steps - i))
        expect = remaining[score[remaining].argsort(descending=True, stable=True)[:k]]
        got = rec.committed[0].nonzero().flatten()
        assert sorted(got.tolist()) == sorted(expect.tolist())
        assert torch.equal(rec.ids[0, got], probs[got].argmax(-1))  # greedy token for its position
        masked &= ~rec.committed[0]
    assert not masked.any()


def test_random_order_commits_one_over_remaining_steps():
    model = PositionModel(_table(2, rows=260))
    model.config = model.config.replace(max_seq_len=256)
    steps, n = 4, 200
    cfg = SamplingConfig(steps=steps, length=n, order="random", temperature=1.0, seed=0)
    _, records = _run(model, [Request([BOS])] * 8, cfg)
    remaining = 8 * n
    for i, rec in enumerate(records):
        got = int(rec.committed.sum())
        p = 1.0 / (steps - i)
        sd = (remaining * p * (1 - p)) ** 0.5
        assert abs(got - remaining * p) <= 5 * sd + 1e-9
        remaining -= got
    assert remaining == 0


def test_confidence_one_token_per_step_recovers_preferred_sequence():
    target = [BOS, 5, 9, 3, 12, 7, 4, 8, 10, 6]
    decoy = [BOS, 11, 11, 13, 13, 14, 14, 15, 15, 2]
    model = ChainModel(target, decoy)
    n = len(target) - 2
    req = [Request(target[:2]), Request(target[:2], suffix=[])]
    out = generate(model, req, SamplingConfig(steps=n, length=n, order="confidence"))
    assert out[0].tokens == target[2:] and out[1].tokens == target[2:]
    # the same model decoded in random order commits decoys: the test can tell orders apart
    rnd = generate(model, req, SamplingConfig(steps=n, length=n, order="random", seed=0))
    assert rnd[0].tokens != target[2:]


def test_semi_autoregressive_blocks_go_left_to_right():
    model = PositionModel(_table(3))
    cfg = SamplingConfig(steps=6, length=9, block_size=3, order="confidence")
    _, records = _run(model, [Request([BOS])], cfg)
    for i, rec in enumerate(records):
        block = i // 2  # 3 blocks share 6 steps evenly
        cols = rec.committed[0].nonzero().flatten()
        assert ((cols >= 1 + 3 * block) & (cols < 1 + 3 * (block + 1))).all()
        assert not rec.masked[0, : 1 + 3 * (block + 1)].any() or i % 2 == 0


def test_blocks_need_enough_steps():
    with pytest.raises(ValueError, match="blocks"):
        generate(PositionModel(_table(0)), [Request([BOS])], SamplingConfig(steps=2, length=9, block_size=3))


def test_eos_truncates_and_fills():
    table = _table(4)
    table[5, :] = 0.0
    table[5, EOS] = 40.0  # position 5 is surely EOS: committed first under confidence order
    model = PositionModel(table)
    out, records = _run(model, [Request([BOS, 3])], SamplingConfig(steps=8, length=8, order="confidence"))
    assert out[0].raw[3:] == [EOS] * 5  # position 5 = answer index 3, then filled with EOS
    assert out[0].tokens == out[0].raw[:3] and EOS not in out[0].tokens
    assert int(records[0].committed.sum()) == 5  # EOS plus the 4 filled after it
    keep, _ = _run(model, [Request([BOS, 3])], SamplingConfig(steps=8, length=8, order="confidence", eos_fill=False))
    assert keep[0].tokens == out[0].tokens and keep[0].raw[4:] != [EOS] * 4


def test_top_k_and_top_p_restrict_the_sample():
    table = _table(5)
    model = PositionModel(table)
    out = generate(model, [Request([BOS])] * 6, SamplingConfig(steps=3, length=20, temperature=2.0, top_k=2, seed=1))
    visible = table.clone()
    visible[:, MASK] = float("-inf")
    allowed = visible[1:21].topk(2, -1).indices  # answer positions 1..20
    for s in out:
        assert all(t in allowed[j].tolist() for j, t in enumerate(s.raw))
    greedy = generate(model, [Request([BOS])], SamplingConfig(steps=3, length=20, temperature=0.0))
    nucleus = generate(model, [Request([BOS])], SamplingConfig(steps=3, length=20, temperature=1.5, top_p=1e-6, seed=9))
    assert nucleus[0].raw == greedy[0].raw


def test_deterministic_under_seed():
    model = PositionModel(_table(6))
    cfg = dict(steps=5, length=10, temperature=1.0, order="random")
    a = generate(model, REQS, SamplingConfig(seed=11, **cfg))
    b = generate(model, REQS, SamplingConfig(seed=11, **cfg))
    c = generate(model, REQS, SamplingConfig(seed=12, **cfg))
    assert [s.raw for s in a] == [s.raw for s in b]
    assert [s.raw for s in a] != [s.raw for s in c]


def test_padding_is_not_attended_by_real_model():
    cfg = preset("tiny-llama").replace(vocab_size=320, base_vocab_size=256, mask_token_id=256)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(seed=0)
    model.eval()
    short = Request([1, 20, 30])
    long = Request([1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], suffix=[40, 41])
    sc = SamplingConfig(steps=4, length=6, order="margin")
    alone = generate(model, [short], sc)[0]
    batched = generate(model, [long, short], sc)[1]
    assert alone.raw == batched.raw


def test_pad_rows_makes_padding_its_own_segment():
    ids, pos = pad_rows([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 1]]
    layout = AttentionLayout.from_position_ids(pos)
    assert not layout.dense_mask()[1, 0, 0, 1:].any()


def test_refuses_model_without_mask_token():
    model = PositionModel(_table(0))
    model.config = model.config.replace(mask_token_id=None)
    with pytest.raises(ValueError, match="mask token"):
        generate(model, [Request([BOS])], SamplingConfig(steps=1, length=1))
