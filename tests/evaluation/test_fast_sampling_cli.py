"""Fast-sampling and estimator options of launch/generate.py and launch/evaluate.py."""

from __future__ import annotations

import json

from tests.helpers import load_script


def test_generate_cached_threshold_streaming(hf_folder, tmp_path, capsys):
    gen = load_script("generate")
    out = tmp_path / "samples.jsonl"
    args = [str(hf_folder), "--prompt", "the river", "--length", "8", "--block-size", "4", "--no-progress"]
    fast = args + ["--cache", "dual", "--threshold", "0.5", "--stream", "--no-eos-fill", "--out", str(out)]
    assert gen.main(fast) == 0
    printed = capsys.readouterr().out
    assert "[0] +" in printed  # committed text streamed as it is fixed from the left
    row = json.loads(out.read_text())
    assert row["settings"]["cache"] == "dual" and row["settings"]["threshold"] == 0.5
    assert len(row["tokens"]) == 8


def test_evaluate_names_estimator_and_sampler(hf_folder, tmp_path, capsys):
    ev = load_script("evaluate")
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text(json.dumps({"goal": "the cat", "sol1": "ran.", "sol2": "sat.", "label": 0}) + "\n")
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(json.dumps({"text": "the cat sat in the city"}) + "\n")
    out = tmp_path / "results.json"
    base = [str(hf_folder), "--task", f"piqa={piqa}", "--task", f"lambada={lambada}", "--num-samples", "4"]
    extra = ["--estimator", "ratio", "--cache", "prefix", "--threshold", "0.9", "--no-progress", "--out", str(out)]
    assert ev.main(base + extra) == 0
    printed = capsys.readouterr().out
    assert "ELBO estimator ratio, K=4" in printed and "cache prefix" in printed and "threshold 0.9" in printed
    settings = json.loads(out.read_text())["settings"]
    assert settings["estimator"] == "ratio" and settings["cache"] == "prefix" and settings["threshold"] == 0.9
