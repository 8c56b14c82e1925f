"""The lm-eval adapter (`--model dlm`) on a tiny model and tiny local task YAMLs: it runs all three
request types through lm-eval's own command line, and on the AR path gives the same per-item
log-likelihoods (and acc / acc_norm) as dlm's own evaluator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from dlm.evaluation import EvalConfig, evaluate  # noqa: E402
from dlm.evaluation.loading import find_tokenizer, load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PIQA = [
    {"goal": "the cat", "sol1": "ran to the river.", "sol2": "sat.", "label": 1},
    {"goal": "the dog was", "sol1": "red", "sol2": "blue and the light", "label": 0},
    {"goal": "in the city", "sol1": "the night.", "sol2": "of stone", "label": 1},
]
TEXTS = [{"text": "the river ran to the city and the cat sat."}, {"text": "blue water."}]
QA = [{"question": "the cat", "answer": "sat"}, {"question": "the river", "answer": "ran"}]


def _task_dir(root: Path) -> Path:
    """Three local tasks in lm-eval's YAML format over JSON-lines files."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("piqa", PIQA), ("texts", TEXTS), ("qa", QA)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def data(name: str) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}.jsonl\ntest_split: test\n"

    (root / "tiny_piqa.yaml").write_text(
        "task: tiny_piqa\n" + data("piqa") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{[sol1, sol2]}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "tiny_texts.yaml").write_text(
        "task: tiny_texts\n" + data("texts") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "tiny_qa.yaml").write_text(
        "task: tiny_qa\n" + data("qa") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 3\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return root


def _offline() -> dict:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for k, v in _offline().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def test_ar_loglikelihoods_match_dlm_evaluator(plain_folder, tmp_path):
    from lm_eval.tasks import TaskManager

    import dlm.evaluation.lm_eval_model  # noqa: F401  (registers "dlm")

    tasks = _task_dir(tmp_path / "tasks")
    out = lm_eval.simple_evaluate(
        model="dlm",
        model_args=f"path={plain_folder},ar=true,batch_size=2",
        tasks=["tiny_piqa", "tiny_texts"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    theirs = sorted(out["samples"]["tiny_piqa"], key=lambda s: s["doc_id"])
    ll = [[r[0] for r in s["filtered_resps"]] for s in theirs]  # per choice: (loglikelihood, is_greedy)

    model, tok = load_model(str(plain_folder), ar=True), find_tokenizer(str(plain_folder))
    ours: dict[str, list[dict]] = {}
    res = evaluate(
        model,
        tok,
        [("piqa", str(tasks / "piqa.jsonl")), ("heldout", str(tasks / "texts.jsonl"))],
        EvalConfig(ar=True, seq_len=model.config.max_seq_len, progress=False),
        on_task=lambda r, key, s: ours.__setitem__(key, s),
    )
    mine = [s["loglikelihood"] for s in ours["piqa"]]
    assert [x for q in ll for x in q] == pytest.approx([x for q in mine for x in q], rel=1e-5, abs=1e-5)
    piqa = out["results"]["tiny_piqa"]
    assert piqa["acc,none"] == pytest.approx(res["tasks"]["piqa"]["value"])
    assert piqa["acc_norm,none"] == pytest.approx(res["tasks"]["piqa"]["acc_norm"])  # lm-eval's per-character norm
    rolling = sorted(out["samples"]["tiny_texts"], key=lambda s: s["doc_id"])
    doc_ll = [s["filtered_resps"][0] for s in rolling]
    doc_ll = [x[0] if isinstance(x, (list, tuple)) else x for x in doc_ll]
    assert doc_ll == pytest.approx([-s["nats"] for s in ours["heldout"]], rel=1e-5)  # each document from BOS


@pytest.mark.slow  # a subprocess
def test_cli_runs_local_tasks_in_diffusion_mode(hf_folder, tmp_path):
    """The documented command line: lm-eval's own, with `--model dlm` registered."""
    tasks = _task_dir(tmp_path / "tasks")
    env = os.environ | _offline() | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).parent / "dlm-lm-eval"  # [project.scripts] in pyproject.toml
    assert script.is_file(), "dlm-lm-eval is not installed: pip install -e .[test]"
    cmd = [
        str(script),
        "--model",
        "dlm",
        "--model_args",
        f"path={hf_folder},num_samples=2",
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--tasks",
        "tiny_piqa,tiny_texts,tiny_qa",
        "--include_path",
        str(tasks),
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = list((tmp_path / "out").rglob("results_*.json"))
    assert found, proc.stdout[-2000:]
    results = json.loads(found[0].read_text())["results"]
    assert {"tiny_piqa", "tiny_texts", "tiny_qa"} <= set(results)
    assert 0 <= results["tiny_piqa"]["acc,none"] <= 1 and results["tiny_texts"]["bits_per_byte,none"] > 0


def test_diffusion_loglikelihoods_match_dlm_evaluator(hf_folder, tmp_path):
    """The ELBO per choice, with the noise of each document shared by its choices exactly as
    launch/evaluate.py draws it."""
    from lm_eval.tasks import TaskManager

    import dlm.evaluation.lm_eval_model  # noqa: F401

    tasks = _task_dir(tmp_path / "tasks")
    out = lm_eval.simple_evaluate(
        model="dlm",
        model_args=f"path={hf_folder},num_samples=3,seed=5,estimator=ratio,device=cpu",
        tasks=["tiny_piqa"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    theirs = sorted(out["samples"]["tiny_piqa"], key=lambda s: s["doc_id"])
    ll = [r[0] for s in theirs for r in s["filtered_resps"]]
    ours: list[dict] = []
    evaluate(
        load_model(str(hf_folder)),
        find_tokenizer(str(hf_folder)),
        [("piqa", str(tasks / "piqa.jsonl"))],
        EvalConfig(num_samples=3, seed=5, estimator="ratio", progress=False),
        on_task=lambda r, key, s: ours.extend(s),
    )
    assert ll == pytest.approx([x for s in ours for x in s["loglikelihood"]], rel=1e-5, abs=1e-5)
