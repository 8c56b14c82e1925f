"""generate.py / evaluate.py on a real LoRA fine-tuning run (adapters-only checkpoints, loaded
merged): the SFT layout ([SEP] / [PAD] ids, row length) comes from the run itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.planning import make_splits, write_char_tokenizer, write_splits
from dlm.evaluation.loading import sft_layout
from dlm.tokenizer import load_tokenizer
from launch.finetune_showcase import CONFIG, make_init
from tests.helpers import load_script

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ftrun")
    tok = write_char_tokenizer(root / "tok")
    write_splits(root / "data", make_splits("sudoku", 16, 6, 0, min_clues=8, max_clues=10))
    make_init(root / "init", tok, dim=32, n_layers=1, seed=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "launch/pretrain.py"]
    cmd += ["--config", str(CONFIG), "--model.init_from", str(root / "init"), "--train.run_dir", str(root / "run")]
    cmd += ["--finetune.paths", json.dumps([str(root / "data" / "train.jsonl")]), "--train.steps", "2"]
    cmd += ["--train.global_batch_size", "4", "--train.micro_batch_size", "4", "--lora.rank", "4"]
    cmd += ["--lora.extra_trainable", '["embed_tokens"]', "--checkpoint.export_at_end", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    assert (root / "run" / "DONE").is_file()
    return root, root / "run"


def test_layout_comes_from_the_run(lora_run):
    root, run = lora_run
    fmt = sft_layout(run, load_tokenizer(root / "tok"))
    assert fmt is not None and (fmt.sep_id, fmt.pad_id, fmt.seq_len, fmt.bos_id) == (3, 0, 40, 1)
    assert sft_layout(root / "init", load_tokenizer(root / "tok")) is None  # an HF folder: no layout


def test_evaluate_and_generate_a_lora_run(lora_run, tmp_path, capsys):
    root, run = lora_run
    out = tmp_path / "res.json"
    argv = [str(run), "--task", f"sudoku={root / 'data' / 'test.jsonl'}", "--out", str(out), "--no-progress"]
    assert load_script("evaluate").main(argv) == 0  # no --sep-id / --pad-id / --seq-len: the run's
    res = json.loads(out.read_text())
    assert res["settings"]["sep_id"] == 3 and res["settings"]["pad_id"] == 0 and res["settings"]["seq_len"] == 40
    assert res["tasks"]["sudoku"]["n"] == 6
    assert load_script("generate").main([str(run), "--sft", "--prompt", "1.3.", "--out", "-", "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rec["settings"]["steps"] == 40 - len("1.3.") - 2 and not {0, 2} & set(rec["tokens"])
