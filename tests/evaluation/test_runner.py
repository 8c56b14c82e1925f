"""Metrics, and the results dict of every task kind with a tiny model and a character tokenizer."""

from __future__ import annotations

import json
import math

import pytest

from dlm.evaluation import RESULTS_FORMAT, EvalConfig, evaluate, task_paths
from dlm.evaluation.metrics import extract_answer, mean_stderr, normalize_number, ratio_stderr, rouge_l
from dlm.models import build_model, preset


class CharTokenizer:
    """ASCII characters as ids (tiny-llama has 256 ids): enough to drive every task end to end."""

    bos_id, eos_id, add_bos, vocab_size = 1, 2, True, 256

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 2)


def _model():
    cfg = preset("tiny-llama").replace(vocab_size=320, base_vocab_size=256, mask_token_id=256, n_layers=1)
    model = build_model(cfg)
    model.init_weights(seed=0)
    return model.eval()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_metrics():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS 2 of 4 and 4
    assert rouge_l("Hello, World!", "hello world") == 1.0 and rouge_l("x", "y") == 0.0
    assert extract_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_answer("She pays $1,200.50 in total.") == "1200.5"
    assert extract_answer("The answer is 12. Then 5") == "5" and extract_answer("none") is None
    assert normalize_number("7.0") == normalize_number("7") == "7"
    m, se = mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(math.sqrt(1 / 3 / 4))
    assert mean_stderr([1.0])[1] is None
    r, rse = ratio_stderr([2.0, 4.0], [1.0, 2.0])
    assert r == 2.0 and rse == 0.0


@pytest.mark.parametrize("ar", [False, True])
def test_results_have_documented_fields(ar, tmp_path):
    tasks = [
        ("piqa", _jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "bb", "label": 1}] * 3)),
        (
            "winogrande",
            _jsonl(tmp_path / "wg.jsonl", [{"sentence": "x _ y", "option1": "p", "option2": "q", "answer": "2"}]),
        ),
        ("lambada", _jsonl(tmp_path / "lambada.jsonl", [{"text": "one two three"}, {"text": "four five"}])),
        ("gsm8k", _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "#### 2"}] * 2)),
        ("infill", _jsonl(tmp_path / "infill.jsonl", [{"prefix": "a b", "middle": "c d", "suffix": "e f"}])),
    ]
    cfg = EvalConfig(ar=ar, num_samples=2, seed=1, limit=2, batch_size=4, gen_length=6, progress=False)
    res = evaluate(_model(), CharTokenizer(), task_paths([f"{n}={p}" for n, p in tasks]), cfg, meta={"model": "tiny"})
    json.dumps(res)  # serialisable
    assert res["format"] == RESULTS_FORMAT and res["mode"] == ("ar" if ar else "diffusion") and res["model"] == "tiny"
    assert res["settings"]["num_samples"] == 2 and res["settings"]["seed"] == 1 and res["settings"]["limit"] == 2
    assert set(res["tasks"]) == {n for n, _ in tasks}
    for r in res["tasks"].values():
        assert {"task", "path", "n", "metric", "value", "stderr", "seconds"} <= set(r)
        assert 0.0 <= r["value"] <= 1.0
    assert res["tasks"]["piqa"]["n"] == 2 and res["tasks"]["winogrande"]["n"] == 1  # --limit applies
    assert res["tasks"]["piqa"]["metric"] == "acc" and "acc_norm" in res["tasks"]["piqa"]
    assert res["tasks"]["infill"]["metric"] == "rouge_l" and res["tasks"]["lambada"]["metric"] == "exact_match"


def test_task_specs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="NAME=PATH"):
        task_paths(["hellaswag"])
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        task_paths([f"mmlu={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task_paths([f"piqa={tmp_path / 'missing.jsonl'}"])
