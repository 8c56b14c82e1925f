"""countdown= / sudoku= evaluation: SFT layout, cut at EOS/PAD, exact verifiers, diffusion and --ar."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import dlm.evaluation.runner as runner
from data_tools.planning import make_splits, write_char_tokenizer, write_splits
from dlm.evaluation.runner import EvalConfig, evaluate_task
from dlm.evaluation.tasks import parse_records
from dlm.models import build_model, preset
from dlm.models.hf import save_hf_model
from dlm.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
PAD, SEP = 0, 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("planning")
    tok = load_tokenizer(write_char_tokenizer(root / "tok"))
    for task in ("countdown", "sudoku"):
        write_splits(
            root / task,
            make_splits(
                task, 0, 6, 0, min_numbers=3, max_numbers=3, max_number=9, max_target=50, min_clues=6, max_clues=8
            ),
        )
    return root, tok


def _model(vocab: int):
    cfg = preset("tiny-llama").replace(vocab_size=64, base_vocab_size=vocab, mask_token_id=vocab, n_layers=1)
    model = build_model(cfg)
    model.init_weights(seed=0)
    return model.eval(), cfg


def test_records_parse_and_mismatch_is_named(assets, tmp_path):
    root, _ = assets
    rows = [json.loads(x) for x in (root / "sudoku" / "test.jsonl").read_text().splitlines()]
    items = parse_records("sudoku", [(f"s:{i + 1}", r) for i, r in enumerate(rows)])
    assert [it.prompt for it in items] == [r["prompt"] for r in rows]
    assert items[0].check(rows[0]["solution"]) is None and items[0].check("1" * 16) is not None
    bad = dict(rows[0], prompt="." * 16)
    with pytest.raises(ValueError, match="s:9: Sudoku prompt"):
        parse_records("sudoku", [("s:9", bad)])
    with pytest.raises(ValueError, match="c:2: Countdown record has no 'target'"):
        parse_records("countdown", [("c:2", {"numbers": [1, 2, 3]})])


@pytest.mark.parametrize("ar", [False, True])
@pytest.mark.parametrize("task", ["countdown", "sudoku"])
def test_scores_with_the_verifier_and_cuts_at_eos_or_pad(assets, monkeypatch, task, ar):
    """Generation replaced by the references (and corrupted ones): exact_match follows the verifier."""
    root, tok = assets
    path = str(root / task / "test.jsonl")
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    seen = {}

    index = {tuple(tok.encode(r["prompt"])): i for i, r in enumerate(rows)}

    def fake(prompts, lengths):
        seen.setdefault("prompts", []).extend(prompts)
        seen.setdefault("lengths", []).extend(lengths)
        out = []
        for p in prompts:
            i = index[tuple(p[1:-1])]
            r = rows[i]
            ans = tok.encode(r["response"])
            if i == 0:
                ans = ans[:-1] + tok.encode("9" if task == "countdown" else "5")  # wrong last character
            stop = [tok.eos_id] if i % 2 else [PAD]  # cut at EOS or at PAD; junk after it is ignored
            out.append(ans + stop + tok.encode("123"))
        return out

    if ar:
        monkeypatch.setattr(runner, "ar_generate", lambda m, prompts, n, eos, *a: fake(prompts, [n] * len(prompts)))
    else:
        monkeypatch.setattr(
            runner, "diffusion_fill", lambda m, reqs, cfg, eos_fill: fake(*zip(*((r.prompt, r.length) for r in reqs)))
        )
    model, _ = _model(tok.vocab_size)
    cfg = EvalConfig(ar=ar, sep_id=SEP, pad_id=PAD, seq_len=48, progress=False)
    res, samples = evaluate_task(model, tok, task, path, cfg)
    assert res["metric"] == "exact_match" and res["n"] == 6
    assert res["value"] == pytest.approx(5 / 6) and res["stderr"] > 0
    assert [s["hit"] for s in samples] == [False] + [True] * 5 and samples[0]["error"]
    assert samples[1]["generation"] == rows[1]["response"]
    p0 = [tok.bos_id] + tok.encode(rows[0]["prompt"]) + [SEP]  # fixed; the rest of the row generated
    assert p0 in seen["prompts"]
    assert all(n == 48 - len(p) for p, n in zip(seen["prompts"], seen["lengths"]))


def test_needs_the_sft_layout(assets):
    root, tok = assets
    model, _ = _model(tok.vocab_size)
    with pytest.raises(ValueError, match="--sep-id"):
        evaluate_task(model, tok, "sudoku", str(root / "sudoku" / "test.jsonl"), EvalConfig(progress=False))


@pytest.mark.parametrize("ar", [False, True])
def test_cli_runs_a_real_model(assets, tmp_path, ar):
    """launch/evaluate.py end to end on a tiny random model (accuracy ~0: plumbing, not skill)."""
    root, tok = assets
    model, cfg = _model(tok.vocab_size)
    save_hf_model(model, cfg, tmp_path / "model", tokenizer_from=root / "tok")
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "res.json"
    argv = [str(tmp_path / "model"), "--task", f"sudoku={root / 'sudoku' / 'test.jsonl'}", "--task"]
    argv += [f"countdown={root / 'countdown' / 'test.jsonl'}", "--sep-id", "3", "--pad-id", "0", "--seq-len", "40"]
    argv += ["--out", str(out), "--no-progress"] + (["--ar"] if ar else [])
    assert mod.main(argv) == 0
    res = json.loads(out.read_text())
    for task in ("sudoku", "countdown"):
        r = res["tasks"][task]
        assert r["n"] == 6 and r["metric"] == "exact_match" and 0.0 <= r["value"] <= 1.0


def test_generate_sft_layout(assets, tmp_path, capsys):
    """launch/generate.py --sft: [BOS] prompt [SEP] fixed, answer cut at EOS/PAD; ids from the flags
    for an exported folder (a fine-tuning run supplies its own)."""
    root, tok = assets
    model, cfg = _model(tok.vocab_size)
    save_hf_model(model, cfg, tmp_path / "model", tokenizer_from=root / "tok")
    spec = importlib.util.spec_from_file_location("launch_generate", REPO / "launch" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parser().parse_args([str(tmp_path / "model"), "--sft", "--sep-id", "3", "--pad-id", "0"])
    starts, lengths, stops = mod.sft_rows(args, model, tok, ["1.3.", "22"])
    assert starts == [[1, *tok.encode("1.3."), 3], [1, *tok.encode("22"), 3]] and lengths == [64, 64]
    assert stops == {tok.eos_id, 0}
    assert mod.cut_at([7, 8, 0, 9, 2], stops) == [7, 8] and mod.cut_at([7, 2, 0], stops) == [7]
    for extra in ([], ["--ar"]):
        argv = [str(tmp_path / "model"), "--sft", "--sep-id", "3", "--pad-id", "0", "--prompt", "1.3.", "--length"]
        assert mod.main([*argv, "12", "--out", "-", "--no-progress", *extra]) == 0
        rec = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert rec["settings"]["sft"] and len(rec["tokens"]) <= 12 and not set(rec["tokens"]) & stops
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "model"), "--sep-id", "3"])  # --sep-id without --sft
    with pytest.raises(ValueError, match="not a fine-tuning run"):
        mod.main([str(tmp_path / "model"), "--sft", "--prompt", "1", "--no-progress"])
