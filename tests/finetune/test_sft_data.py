"""SFT data: record formats, the over-long policy, the world-size-free row schedule, packing,
and the objectives' view of a row: the prompt is never masked and never scored."""

from __future__ import annotations

import pytest
import torch

from dlm.data.sft import RecordFormat, SFTDataset
from dlm.diffusion import DiffusionConfig, noise_batch
from dlm.sft import SFTFormat, ar_batch
from dlm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(word_tokenizer):
    return load_tokenizer(word_tokenizer)


def fmt(L: int = 16) -> SFTFormat:
    return SFTFormat(seq_len=L, sep_id=2, eos_id=2, pad_id=2, bos_id=1)


def test_record_formats(tmp_path, tok, write_jsonl):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "w5 w6", "answer": "w7 #### w8"}])
    ds = SFTDataset([gsm], tok, fmt(), RecordFormat("gsm8k"))
    assert ds.row(0)["input_ids"].tolist()[:8] == [
        1,
        5,
        6,
        2,
        7,
        0,
        8,
        2,
    ]  # '####' is unknown to the toy vocabulary: w0
    seed = write_jsonl(tmp_path / "gsm_seed.json", [{"instruction": "w5", "input": "w9", "output": "w7 #### w8"}])
    ds = SFTDataset([seed], tok, fmt(), RecordFormat("instruction"))
    assert ds.row(0)["input_ids"].tolist()[:8] == [1, 5, 9, 2, 7, 0, 8, 2]
    plan = write_jsonl(tmp_path / "plan.jsonl", [{"q": "w5", "a": "w6"}])
    ds = SFTDataset([plan], tok, fmt(), RecordFormat("fields", "q", "a"))
    assert ds.row(0)["input_ids"].tolist()[:5] == [1, 5, 2, 6, 2]


def test_bad_records_name_file_and_line(tmp_path, tok, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "w5", "answer": "w6 #### w7"}, {"question": "w5"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: record has no field 'answer'"):
        SFTDataset([bad], tok, fmt(), RecordFormat("gsm8k"))
    nofinal = write_jsonl(tmp_path / "nofinal.jsonl", [{"question": "w5", "answer": "w6"}])
    with pytest.raises(ValueError, match=r"nofinal.jsonl:1: GSM8K answer has no '####"):
        SFTDataset([nofinal], tok, fmt(), RecordFormat("gsm8k"))
    with pytest.raises(ValueError, match="unknown SFT record format"):
        RecordFormat("alpaca")


def test_overlong_fails_naming_file_and_record_or_is_counted(tmp_path, tok, write_jsonl):
    rows = [{"prompt": "w5 w6", "response": "w7"}] * 3 + [{"prompt": "w5 " * 10, "response": "w7 " * 6}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"long.jsonl:4: prompt \(10 tokens\) \+ response \(6 tokens\) .* do not fit seq_len 16"
    ):
        SFTDataset([path], tok, fmt())
    ds = SFTDataset([path], tok, fmt(), overlong="skip")
    assert len(ds) == 3 and ds.skipped == 1
    with pytest.raises(ValueError, match="no example fits"):
        SFTDataset([path], tok, fmt(4), overlong="skip")


def test_row_schedule_is_a_function_of_the_sample_id(copy_jsonl, tok):
    ds = SFTDataset([copy_jsonl], tok, fmt(), seed=3)
    n = len(ds)
    epoch0 = [ds.examples_of(k)[0] for k in range(n)]
    epoch1 = [ds.examples_of(k)[0] for k in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    # the same rows whatever order or grouping they are asked for in (another rank, a resumed run)
    other = SFTDataset([copy_jsonl], tok, fmt(), seed=3)
    whole = ds.batch(range(2 * n - 5, 2 * n + 3))
    for i, k in enumerate(reversed(range(2 * n - 5, 2 * n + 3))):
        part = other.batch([k])
        for key in part:
            assert torch.equal(part[key][0], whole[key][7 - i]), (key, k)
    assert SFTDataset([copy_jsonl], tok, fmt(), pack=True).fingerprint != ds.fingerprint


def test_packing(copy_jsonl, tok):
    ds = SFTDataset([copy_jsonl], tok, fmt(32), pack=True)
    seen = []
    k = 0
    while len(seen) < len(ds):
        row, exs = ds.row(k), ds.examples_of(k)
        starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
        assert len(starts) == len(exs) and starts[0] == 0
        for s, i in zip(starts, exs):
            head, body = ds.parts[i]
            n = len(head) + len(body)
            assert row["input_ids"][s : s + n].tolist() == head + body
            assert not row["maskable"][s : s + len(head)].any() and row["maskable"][s + len(head) : s + n].all()
        seen += exs
        k += 1
    assert sorted(seen) == list(range(len(ds)))
    assert k < len(ds)  # several examples per row


@pytest.mark.parametrize("pack", [False, True])
def test_prompt_never_masked_nor_scored(copy_jsonl, tok, pack):
    ds = SFTDataset([copy_jsonl], tok, fmt(32), pack=pack)
    batch = ds.batch(range(16))
    prompt = torch.zeros_like(batch["maskable"])
    for b, k in enumerate(range(16)):
        s = 0
        for i in ds.examples_of(k):
            head, body = ds.parts[i]
            prompt[b, s : s + len(head)] = True
            s += len(head) + len(body)
    cfg = DiffusionConfig(mask_token_id=255, random_length_prob=0.0)
    masked_response = 0
    for step in range(8):
        nb = noise_batch(batch, step, cfg, 16)
        assert not (nb.masked & prompt).any() and not (nb.eligible & prompt).any()
        assert torch.equal(nb.noisy_ids[prompt], batch["input_ids"][prompt])
        masked_response += int(nb.masked.sum())
    assert masked_response > 0
    ar = ar_batch(batch)
    assert not (ar.scored & prompt).any()
    assert torch.equal(ar.scored, batch["response"] & (batch["position_ids"] != 0))
    assert ar.scored.sum() == sum(len(ds.parts[i][1]) for k in range(16) for i in ds.examples_of(k))
