"""DiffuSeq-style SFT rows: layout, maskability, collation, and the prompt is never masked."""

import pytest
import torch

from dlm.diffusion import DiffusionConfig, noise_batch
from dlm.sft import SFTFormat, collate_sft, sft_example

FMT = SFTFormat(seq_len=16, sep_id=3, eos_id=2, pad_id=0, bos_id=1)


def test_row_layout_and_maskable():
    ex = sft_example([10, 11, 12], [20, 21], FMT)
    assert ex["input_ids"].tolist() == [1, 10, 11, 12, 3, 20, 21, 2] + [0] * 8
    assert ex["position_ids"].tolist() == list(range(16))
    assert ex["maskable"].tolist() == [False] * 5 + [True] * 11  # response, EOS, padding
    no_bos = sft_example([10], [20], SFTFormat(seq_len=6, sep_id=3, eos_id=2, pad_id=0))
    assert no_bos["input_ids"].tolist() == [10, 3, 20, 2, 0, 0]
    assert no_bos["maskable"].tolist() == [False, False, True, True, True, True]
    exact = sft_example(list(range(10, 21)), [30, 31], FMT)  # exactly fills the row
    assert exact["input_ids"][-1] == 2 and exact["maskable"].sum() == 3


def test_too_long_is_a_clear_error():
    with pytest.raises(ValueError, match=r"record 7: .* do not fit seq_len 16"):
        sft_example(list(range(12)), [5, 6], FMT, where="record 7")
    with pytest.raises(ValueError, match="seq_len"):
        SFTFormat(seq_len=2, sep_id=3, eos_id=2, pad_id=0)


def test_collate():
    exs = [sft_example([10 + i] * (i + 1), [20] * (3 - i), FMT) for i in range(3)]
    batch = collate_sft(exs, [7, 8, 9])
    assert batch["input_ids"].shape == (3, 16) and batch["maskable"].dtype == torch.bool
    assert batch["sample_ids"].tolist() == [7, 8, 9]
    assert torch.equal(batch["input_ids"][1], exs[1]["input_ids"])
    with pytest.raises(ValueError, match="sample ids"):
        collate_sft(exs, [1, 2])


def test_prompt_never_masked():
    g = torch.Generator().manual_seed(0)
    exs, prompt_lens = [], []
    for _ in range(32):
        p = torch.randint(4, 90, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(4, 90, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        exs.append(sft_example(p, r, FMT))
        prompt_lens.append(len(p) + 2)
    batch = collate_sft(exs, range(100, 132))
    cfg = DiffusionConfig(mask_token_id=99, random_length_prob=0.0)
    seen_masked_response = 0
    for step in range(6):
        nb = noise_batch(batch, step, cfg, 32)
        for b, n in enumerate(prompt_lens):
            assert not nb.masked[b, :n].any() and not nb.eligible[b, :n].any()
            assert torch.equal(nb.noisy_ids[b, :n], batch["input_ids"][b, :n])
            assert torch.equal(nb.eligible[b, n:], torch.ones(16 - n, dtype=torch.bool))
        seen_masked_response += int(nb.masked.sum())
    assert seen_masked_response > 0
