"""AR-SFT loss against a brute-force next-token cross-entropy on the causal logits, over the
response and EOS tokens only (packed rows: each example its own causal segment)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm.attention.layout import AttentionLayout
from dlm.models import build_model, preset
from dlm.sft import ARObjective, SFTFormat, ar_batch, ar_loss, collate_sft, example_parts, pack_row

FMT = SFTFormat(seq_len=24, sep_id=3, eos_id=2, pad_id=0, bos_id=1)


def test_ar_loss_matches_brute_force():
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama"))
    model.init_weights(seed=0)
    rows = [
        pack_row([example_parts([10, 11, 12], [20, 21], FMT), example_parts([13], [22, 23, 24], FMT)], FMT),
        pack_row([example_parts([14, 15], [25], FMT)], FMT),
    ]
    batch = collate_sft(rows, [0, 1])
    arb = ar_batch(batch)
    out = ar_loss(model, arb, normalizer=1.0)
    # brute force: each example alone, causal, CE of output i-1 on every response/EOS token i
    expected, n = 0.0, 0
    for prompt, response in (([10, 11, 12], [20, 21]), ([13], [22, 23, 24]), ([14, 15], [25])):
        head, body = example_parts(prompt, response, FMT)
        ids = torch.tensor([head + body])
        logits = model(ids, AttentionLayout.single(1, ids.shape[1], causal=True))[0]
        expected += F.cross_entropy(logits[len(head) - 1 : -1], ids[0, len(head) :], reduction="sum").item()
        n += len(body)
    assert int(arb.n_eligible) == n == 3 + 4 + 2
    torch.testing.assert_close(out.elbo_sum.item(), expected, rtol=1e-5, atol=1e-5)
    # the objective wrapper: host-side layout, normalizer = scored tokens
    obj = ARObjective()
    dev = obj.to_device(batch, torch.device("cpu"))
    p = obj.prepare(dev, 0)
    assert obj.counts(p).tolist() == [n, n]
    loss, stat = obj.loss(model, p, torch.tensor(float(n)), 0)
    torch.testing.assert_close(loss.item(), expected / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stat.item(), expected, rtol=1e-5, atol=1e-5)
