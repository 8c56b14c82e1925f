"""Evaluation of diffusion (and, for comparison, AR) models on local task files (docs/design.md §4).

results = evaluate(model, tokenizer, [("hellaswag", "hellaswag.jsonl")], EvalConfig(num_samples=128))
"""

from dlm.evaluation.readers import read_records
from dlm.evaluation.runner import RESULTS_FORMAT, EvalConfig, evaluate, evaluate_task, task_paths
from dlm.evaluation.scoring import ar_generate, ar_nll, elbo_nll
from dlm.evaluation.tasks import TASKS, parse_records

__all__ = [
    "RESULTS_FORMAT",
    "TASKS",
    "EvalConfig",
    "ar_generate",
    "ar_nll",
    "elbo_nll",
    "evaluate",
    "evaluate_task",
    "parse_records",
    "read_records",
    "task_paths",
]
