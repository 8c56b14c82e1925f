"""launch/generate.py and launch/evaluate.py as a user runs them, on a Hugging Face style folder
(tiny llama + a SentencePiece tokenizer trained here)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import WORDS, load_script


def test_generate_cli(hf_folder, tmp_path, capsys):
    gen = load_script("generate")
    out = tmp_path / "samples.jsonl"
    assert (
        gen.main(
            [
                str(hf_folder),
                "--prompt",
                "the river",
                "--suffix",
                " cat sat.",
                "--length",
                "5",
                "--steps",
                "5",
                "--order",
                "margin",
                "--show-steps",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("step ") == 5 and gen.MASK_GLYPH * 5 not in printed.splitlines()[-2]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "the river" and rows[0]["suffix"] == " cat sat."
    assert len(rows[0]["tokens"]) <= 5 and rows[0]["settings"]["order"] == "margin"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat"}) + "\n" + json.dumps({"prompt": "", "suffix": " dog."}) + "\n")
    out2, again = tmp_path / "more.jsonl", tmp_path / "again.jsonl"
    argv = [str(hf_folder), "--prompts-file", str(prompts), "--num-samples", "2", "--length", "4", "--steps", "2"]
    argv += ["--temperature", "1.0", "--top-k", "5", "--block-size", "2", "--batch-size", "3", "--seed", "7"]
    argv += ["--no-progress"]
    assert gen.main([*argv, "--out", str(out2)]) == 0
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and rows[2]["suffix"] == " dog."
    assert gen.main([*argv, "--out", str(again)]) == 0
    assert again.read_text() == out2.read_text()  # deterministic under --seed


@pytest.mark.parametrize("ar", [False, True])
def test_evaluate_cli(hf_folder, tmp_path, ar):
    ev = load_script("evaluate")
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text(
        "".join(
            json.dumps({"goal": f"the {w}", "sol1": "ran.", "sol2": "sat.", "label": i % 2}) + "\n"
            for i, w in enumerate(WORDS[:5])
        )
    )
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(json.dumps({"text": "the cat sat in the city"}) + "\n")
    out = tmp_path / "results.json"
    args = [
        str(hf_folder),
        "--task",
        f"piqa={piqa}",
        "--task",
        f"lambada={lambada}",
        "--num-samples",
        "3",
        "--limit",
        "4",
        "--seed",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ] + (["--ar"] if ar else [])
    assert ev.main(args) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == ("ar" if ar else "diffusion") and res["model"] == str(hf_folder)
    assert res["tokenizer"].endswith("tokenizer.model")
    assert res["settings"]["num_samples"] == 3 and res["settings"]["limit"] == 4 and res["settings"]["seed"] == 2
    piqa_res = res["tasks"]["piqa"]
    assert (
        piqa_res["n"] == 4
        and piqa_res["metric"] == "acc"
        and 0 <= piqa_res["value"] <= 1
        and piqa_res["stderr"] is not None
    )
    assert res["tasks"]["lambada"]["n"] == 1 and res["tasks"]["lambada"]["stderr"] is None


def test_evaluate_cli_rejects_bad_task(hf_folder, tmp_path):
    ev = load_script("evaluate")
    with pytest.raises(SystemExit):
        ev.main([str(hf_folder), "--task", f"mmlu={tmp_path}"])
