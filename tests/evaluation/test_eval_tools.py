"""evaluate/generate as daily tools (issue 16) and auditable results (issue 15 items 2-3): results
as tasks finish, length-sorted AR batches, honest progress, held-out text files, no silent
model changes, generate --ar, per-sample logs and both normalisations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import dlm.evaluation.runner as runner
import dlm.evaluation.scoring as scoring
from dlm.attention.layout import AttentionLayout
from dlm.evaluation import EvalConfig, evaluate
from dlm.evaluation.runner import rolling_windows, with_start
from dlm.evaluation.tasks import MultipleChoice
from dlm.models import build_model, preset
from tests.helpers import load_script, write_store

REPO = Path(__file__).resolve().parents[2]


class CharTokenizer:
    bos_id, eos_id, add_bos, vocab_size, path = 1, 2, True, 256, "chars"

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 2)


def _model(**shape):
    cfg = preset("tiny-llama").replace(vocab_size=320, base_vocab_size=256, mask_token_id=256, n_layers=1, **shape)
    model = build_model(cfg)
    model.init_weights(seed=0)
    return model.eval()


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _last_count(err: str) -> tuple[int, int]:
    done, total = re.findall(r"(\d+)/(\d+)", err)[-1]
    return int(done), int(total)


# --- issue 16 item 1: each task's result as soon as it completes


def test_each_task_is_reported_and_written_when_it_finishes(hf_folder, tmp_path, capsys):
    ev = load_script("evaluate")
    good = _jsonl(tmp_path / "piqa.jsonl", [{"goal": "the cat", "sol1": "ran.", "sol2": "sat.", "label": 1}] * 3)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"goal": "the dog", "sol1": "ran."}])  # no sol2: fails when reached
    out, samples = tmp_path / "res.json", tmp_path / "samples.jsonl"
    args = [str(hf_folder), "--task", f"piqa={good}", "--task", f"piqa={bad}", "--num-samples", "2"]
    with pytest.raises(ValueError, match="sol2"):
        ev.main(args + ["--no-progress", "--out", str(out), "--samples", str(samples)])
    printed = capsys.readouterr().out
    assert re.search(r"^piqa +n=3 +acc \d\.\d{4}", printed, re.M), printed
    assert not out.exists() and not samples.exists()  # nothing that looks complete
    partial = json.loads(Path(f"{out}.partial").read_text())
    assert partial["complete"] is False and list(partial["tasks"]) == ["piqa"]
    assert [json.loads(x)["index"] for x in Path(f"{samples}.partial").read_text().splitlines()] == [0, 1, 2]
    ev.main(args[:3] + ["--num-samples", "2", "--no-progress", "--out", str(out), "--samples", str(samples)])
    assert json.loads(out.read_text())["complete"] is True and not Path(f"{out}.partial").exists()
    assert len(samples.read_text().splitlines()) == 3 and not Path(f"{samples}.partial").exists()


# --- issue 16 item 2: AR rows batched by length, order restored, tokens/s, a bar over items


def test_ar_rows_are_length_sorted_and_restored(monkeypatch, capsys):
    model = _model()
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(11):
        n_ctx, n_cont = torch.randint(1, 20, (2,), generator=g).tolist()
        pairs.append(
            (
                [1] + torch.randint(3, 250, (n_ctx,), generator=g).tolist(),
                torch.randint(3, 250, (n_cont,), generator=g).tolist(),
            )
        )
    one_by_one, _ = scoring.ar_nll(model, pairs, batch_size=1)
    seen: list[list[int]] = []
    forward = scoring._forward_targets

    def spy(model, inputs, *a, **k):
        seen.append([len(x) for x in inputs])
        return forward(model, inputs, *a, **k)

    monkeypatch.setattr(scoring, "_forward_targets", spy)
    stats: dict = {}
    batched, _ = scoring.ar_nll(model, pairs, batch_size=4, progress=True, stats=stats)
    flat = [n for b in seen for n in b]
    assert flat == sorted((len(c) + len(x) for c, x in pairs), reverse=True)  # longest first, across batches
    assert batched == pytest.approx(one_by_one, rel=1e-5, abs=1e-5)  # input order restored
    assert stats["tokens"] == sum(flat)
    assert _last_count(capsys.readouterr().err) == (11, 11)  # items, not batches


def test_choice_results_report_tokens_per_second(tmp_path):
    path = _jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "bb", "label": 1}] * 2)
    res = evaluate(_model(), CharTokenizer(), [("piqa", path)], EvalConfig(ar=True, progress=False))
    assert res["tasks"]["piqa"]["tokens_per_s"] > 0


# --- issue 16 item 3: the ELBO bar counts only rows actually forwarded


def test_elbo_progress_reaches_its_total(capsys):
    questions = [[([1, 5, 6], [7]), ([1, 5, 6], [8, 9])], [([1, 4], [10])]]  # short: many draws mask nothing
    stats: dict = {}
    scoring.elbo_nll(_model(), questions, num_samples=8, seed=0, batch_size=3, progress=True, stats=stats)
    done, total = _last_count(capsys.readouterr().err)
    assert done == total <= 8 * 3  # draws that mask nothing (skipped) are not in the total


# --- issue 16 item 4: held-out text / JSON lines, every token once, the tail covered


def _exact_nll(model, ids: list[int]) -> float:
    """Independent oracle: one causal forward over the whole row, log-softmax on the AR vocabulary."""
    x = torch.tensor([ids])
    logits = model(x, AttentionLayout.single(1, len(ids), causal=True))[0, :-1, : model.config.base_vocab_size]
    return -torch.log_softmax(logits.double(), -1).gather(1, x[0, 1:, None]).sum().item()


def test_rolling_windows_score_every_token_once():
    ids = list(range(100, 123))  # 23 tokens
    for L in (2, 5, 8, 23, 40):
        scored = [t for _, w in rolling_windows(ids, L) for t in w[1:]]
        assert scored == ids[1:]  # every token but the first, once, the tail included
        assert all(len(w) <= L for _, w in rolling_windows(ids, L))


def test_heldout_text_file_scores_every_token(tmp_path):
    model = _model()
    text = "the river ran past the stone city at night, and the light on the water was red."
    novel = tmp_path / "novel.txt"
    novel.write_text(text)
    ids = with_start(CharTokenizer(), CharTokenizer().encode(text))
    whole = evaluate(
        model, CharTokenizer(), [("heldout", str(novel))], EvalConfig(ar=True, seq_len=128, progress=False)
    )
    r = whole["tasks"]["heldout"]
    assert r["tokens"] == len(ids) - 1  # a one-document file is scored, whole
    assert r["value"] * r["tokens"] == pytest.approx(_exact_nll(model, ids), rel=1e-5)
    seen = []
    windowed = evaluate(
        model,
        CharTokenizer(),
        [("heldout", str(novel))],
        EvalConfig(ar=True, seq_len=16, batch_size=3, progress=False),
        on_task=lambda res, key, samples: seen.extend(samples),
    )
    assert windowed["tasks"]["heldout"]["tokens"] == len(ids) - 1  # the final partial window is kept
    oracle = sum(_exact_nll(model, ids[s["start"] : s["start"] + 16]) for s in seen)
    assert sum(s["nats"] for s in seen) == pytest.approx(oracle, rel=1e-5)
    elbo = evaluate(
        model, CharTokenizer(), [("heldout", str(novel))], EvalConfig(num_samples=2, seq_len=16, progress=False)
    )
    assert elbo["tasks"]["heldout"]["tokens"] == len(ids) - 1


def test_heldout_jsonl_documents_and_errors(tmp_path):
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": "one two three"}, {"text": "four five six seven"}])
    cfg = EvalConfig(ar=True, seq_len=8, limit=1, progress=False)
    res = evaluate(_model(), CharTokenizer(), [("heldout", docs)], cfg)
    assert res["tasks"]["heldout"]["tokens"] == len("one two three")  # --limit counts documents
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a string 'text' field"):
        evaluate(_model(), CharTokenizer(), [("heldout", bad)], cfg)


# --- issue 16 item 5: no silent [MASK] on a never-adapted AR folder


def test_plain_ar_folder_is_refused_without_flag(plain_folder, tmp_path, capsys):
    gen, ev = load_script("generate"), load_script("evaluate")
    with pytest.raises(ValueError, match="plain AR model"):
        gen.main([str(plain_folder), "--prompt", "the", "--length", "2", "--no-progress"])
    piqa = _jsonl(tmp_path / "piqa.jsonl", [{"goal": "the", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(ValueError, match="--allow-unadapted"):
        ev.main([str(plain_folder), "--task", f"piqa={piqa}", "--no-progress"])
    assert gen.main([str(plain_folder), "--prompt", "the", "--length", "2", "--no-progress", "--allow-unadapted"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert (
        ev.main(
            [str(plain_folder), "--ar", "--task", f"piqa={piqa}", "--no-progress", "--out", str(tmp_path / "r.json")]
        )
        == 0
    )


# --- issue 16 item 6: generate --ar, one sample = one record


def test_generate_ar_matches_transformers_greedy(plain_folder, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from dlm.tokenizer import load_tokenizer

    gen = load_script("generate")
    out = tmp_path / "ar.jsonl"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the river\nthe cat sat\n")
    assert (
        gen.main(
            [
                str(plain_folder),
                "--ar",
                "--prompts-file",
                str(prompts),
                "--length",
                "6",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the river", "the cat sat"] and rows[0]["settings"]["mode"] == "ar"
    tok = load_tokenizer(plain_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(plain_folder, torch_dtype=torch.float32).eval()
    for r in rows:
        ids = torch.tensor([[tok.bos_id] + tok.encode(r["prompt"])])
        ref = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        ref = [t for t in ref[0, ids.shape[1] :].tolist()]
        ref = ref[: ref.index(tok.eos_id)] if tok.eos_id in ref else ref
        assert r["tokens"] == ref
    printed = capsys.readouterr().out
    assert printed.count("=== sample ") == 2
    assert (
        gen.main([str(plain_folder), "--ar", "--prompt", "a\nb", "--length", "3", "--no-progress", "--out", "-"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["prompt"] == "a\nb"  # a newline stays inside its record


# --- issue 15 item 2: per-sample logs of every task kind


@pytest.mark.parametrize("ar", [False, True])
def test_every_task_kind_logs_its_samples(ar, tmp_path):
    tasks = [
        ("piqa", _jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "bé", "label": 1}] * 2)),
        (
            "winogrande",
            _jsonl(tmp_path / "wg.jsonl", [{"sentence": "x _ y", "option1": "p", "option2": "q", "answer": "2"}]),
        ),
        ("lambada", _jsonl(tmp_path / "lambada.jsonl", [{"text": "one two three"}])),
        ("gsm8k", _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "#### 2"}])),
        ("infill", _jsonl(tmp_path / "infill.jsonl", [{"prefix": "a b", "middle": "c d", "suffix": "e f"}])),
        ("heldout", _jsonl(tmp_path / "held.jsonl", [{"text": "some held-out text"}])),
    ]
    logs: dict[str, list[dict]] = {}
    cfg = EvalConfig(ar=ar, num_samples=2, batch_size=4, gen_length=4, seq_len=32, progress=False)
    res = evaluate(_model(), CharTokenizer(), tasks, cfg, on_task=lambda r, key, s: logs.__setitem__(key, s))
    assert list(logs) == [n for n, _ in tasks]
    for key, samples in logs.items():
        assert samples and all(s["task"] == key for s in samples)
        assert [s["index"] for s in samples] == list(range(len(samples)))
        json.dumps(samples)
    piqa = logs["piqa"][0]
    assert piqa["context"] == "Question: g\nAnswer:" and piqa["choices"] == [" a", " bé"] and piqa["gold"] == 1
    assert piqa["tokens"] == [2, 3] and piqa["bytes"] == [2, 4] and piqa["chars"] == [1, 2]
    assert len(piqa["loglikelihood"]) == 2 and set(piqa["pred"]) == {"acc", "acc_norm", "acc_bytes"}
    for name in ("acc", "acc_norm", "acc_bytes"):  # the aggregates are the samples' mean
        got = sum(s["pred"][name] == s["gold"] for s in logs["piqa"]) / len(logs["piqa"])
        agg = res["tasks"]["piqa"]["value" if name == "acc" else name]
        assert got == agg
    assert "contexts" in logs["winogrande"][0] and {"generation", "pred", "gold"} <= set(logs["gsm8k"][0])
    assert {"prefix", "suffix", "generation", "rouge_l"} <= set(logs["infill"][0])
    assert {"context", "target", "hit"} <= set(logs["lambada"][0]) and {"tokens", "nats"} <= set(logs["heldout"][0])


# --- issue 15 item 3: acc_norm (per character, lm-eval) and acc_bytes are distinct


def test_char_and_byte_normalisations_differ(monkeypatch):
    item = MultipleChoice("x:1", ["Q"] * 2, [" abcd", " éé"], label=0)  # chars 4 vs 2, bytes 5 vs 5
    monkeypatch.setattr(runner, "ar_nll", lambda model, pairs, *a, **k: ([4.0, 2.5], [False, False]))
    res, samples = runner.eval_choice(None, CharTokenizer(), [item], EvalConfig(ar=True, progress=False))
    assert samples[0]["pred"] == {"acc": 1, "acc_norm": 0, "acc_bytes": 1}  # 1.0 < 1.25 per char; 0.8 > 0.5 per byte
    assert res["value"] == 0.0 and res["acc_norm"] == 1.0 and res["acc_bytes"] == 0.0


def _write_store(folder: Path) -> Path:
    return write_store(folder, n_docs=200, units=1)


@pytest.mark.parametrize("ar", [False, True])
def test_heldout_token_store_split(ar, tmp_path):
    store = _write_store(tmp_path / "store")
    seen: list[dict] = []
    cfg = EvalConfig(ar=ar, num_samples=2, seq_len=32, heldout_fraction=0.2, limit=3, batch_size=2, progress=False)
    res = evaluate(_model(), CharTokenizer(), [("heldout", str(store))], cfg, on_task=lambda r, k, s: seen.extend(s))
    r = res["tasks"]["heldout"]
    assert r["n"] == 3 and [s["window"] for s in seen] == [0, 1, 2]
    assert r["tokens"] == sum(s["tokens"] for s in seen) > 0
    assert r["value"] == pytest.approx(sum(s["nats"] for s in seen) / r["tokens"])
    with pytest.raises(ValueError, match="pass a .txt or .jsonl file"):
        evaluate(_model(), CharTokenizer(), [("heldout", str(store))], EvalConfig(seq_len=32, heldout_fraction=0.0))
