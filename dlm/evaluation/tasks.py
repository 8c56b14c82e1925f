"""Task records (published field names, docs/design.md §4) -> text-level evaluation items.

Prompt formats follow the lm-evaluation-harness so that numbers are comparable with peers:
the continuation of a choice is scored given its context, with a single space between them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from dlm.evaluation.planning import countdown_error, countdown_prompt, sudoku_error, sudoku_prompt
from dlm.evaluation.readers import Record


@dataclass
class MultipleChoice:
    where: str
    contexts: list[str]  # one per choice (WinoGrande varies the context, others repeat it)
    continuations: list[str]
    label: int


@dataclass
class Completion:
    where: str
    prompt: str
    target: str  # the reference text to generate (LAMBADA word, infill middle, GSM8K solution)
    suffix: str = ""  # fixed text after the generated span (infilling)
    answer: str = ""  # GSM8K: the final number after "####"


def _get(rec: dict, key: str, where: str, task: str):
    if key not in rec or rec[key] is None:
        raise ValueError(f"{where}: {task} record has no {key!r} field (fields: {sorted(rec)})")
    return rec[key]


def _text(rec: dict, key: str, where: str, task: str) -> str:
    value = _get(rec, key, where, task)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {task} field {key!r} must be a string, got {type(value).__name__}")
    return value


def _label(rec: dict, key: str, where: str, task: str, n: int, first: int = 0) -> int:
    """A choice index from an int or a digit string numbered from `first`; 0-based result."""
    value = _get(rec, key, where, task)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not first <= value < first + n:
        raise ValueError(
            f"{where}: {task} field {key!r} = {value!r} is not a choice number in [{first}, {first + n - 1}]"
            " (an unlabeled test split cannot be scored)"
        )
    return value - first


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(where: str, rec: dict) -> MultipleChoice:
    if rec.get("ctx_a") is not None and rec.get("ctx_b") is not None:
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    else:
        ctx = _text(rec, "ctx", where, "HellaSwag")
    if rec.get("activity_label"):
        ctx = rec["activity_label"] + ": " + ctx
    endings = _get(rec, "endings", where, "HellaSwag")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: HellaSwag field 'endings' must be a list of strings, got {endings!r}")
    query = _hellaswag_clean(ctx)
    return MultipleChoice(
        where,
        [query] * len(endings),
        [" " + _hellaswag_clean(e) for e in endings],
        _label(rec, "label", where, "HellaSwag", len(endings)),
    )


def piqa(where: str, rec: dict) -> MultipleChoice:
    ctx = "Question: " + _text(rec, "goal", where, "PIQA") + "\nAnswer:"
    sols = [" " + _text(rec, k, where, "PIQA") for k in ("sol1", "sol2")]
    return MultipleChoice(where, [ctx, ctx], sols, _label(rec, "label", where, "PIQA", 2))


def siqa(where: str, rec: dict) -> MultipleChoice:
    ctx = "Q: " + _text(rec, "context", where, "SIQA") + " " + _text(rec, "question", where, "SIQA") + "\nA:"
    answers = [" " + _text(rec, k, where, "SIQA") for k in ("answerA", "answerB", "answerC")]
    return MultipleChoice(where, [ctx] * 3, answers, _label(rec, "label", where, "SIQA", 3, first=1))


def winogrande(where: str, rec: dict) -> MultipleChoice:
    """Partial scoring: the blank is filled with each option and the text after it is scored."""
    sentence = _text(rec, "sentence", where, "WinoGrande")
    if "_" not in sentence:
        raise ValueError(f"{where}: WinoGrande sentence has no '_' blank: {sentence!r}")
    i = sentence.index("_")
    options = [_text(rec, k, where, "WinoGrande") for k in ("option1", "option2")]
    rest = " " + sentence[i + 1 :].strip()
    label = _label(rec, "answer", where, "WinoGrande", 2, first=1)
    return MultipleChoice(where, [sentence[:i] + o for o in options], [rest, rest], label)


def lambada(where: str, rec: dict) -> Completion:
    if rec.get("text") is None and rec.get("query") is not None and rec.get("answers_text"):
        text = rec["query"] + " " + rec["answers_text"][0]  # oe-eval request files
    else:
        text = _text(rec, "text", where, "LAMBADA")
    text = text.strip()
    if " " not in text:
        raise ValueError(f"{where}: LAMBADA text has no last word to predict: {text!r}")
    ctx, word = text.rsplit(" ", 1)
    return Completion(where, ctx, " " + word)


GSM8K_TEMPLATE = "Question: {question}\nAnswer:"


def gsm8k(where: str, rec: dict) -> Completion:
    question = _text(rec, "question", where, "GSM8K")
    solution = _text(rec, "answer", where, "GSM8K")
    if "####" not in solution:
        raise ValueError(f"{where}: GSM8K answer has no '#### <number>' line")
    answer = solution.rsplit("####", 1)[1].strip()
    return Completion(where, question, " " + solution, answer=answer)


def infill(where: str, rec: dict) -> Completion:
    """prefix/middle/suffix fields, or ROCStories sentence1..sentence5 (sentences 1-2 given,
    3 generated, 4-5 given)."""
    if rec.get("middle") is not None:
        return Completion(
            where,
            _text(rec, "prefix", where, "infill"),
            " " + _text(rec, "middle", where, "infill").strip(),
            suffix=" " + _text(rec, "suffix", where, "infill").strip(),
        )
    s = [_text(rec, f"sentence{i}", where, "ROCStories") for i in range(1, 6)]
    return Completion(where, s[0] + " " + s[1], " " + s[2], suffix=" " + s[3] + " " + s[4])


@dataclass
class Planning:
    where: str
    prompt: str
    check: Callable[[str], str | None]  # None when an answer solves the puzzle, else why not


def _planning(where: str, rec: dict, task: str, prompt: str, check: Callable[[str], str | None]) -> Planning:
    if rec.get("prompt") is not None and rec["prompt"] != prompt:
        raise ValueError(f"{where}: {task} prompt {rec['prompt']!r} does not match its fields (expected {prompt!r})")
    return Planning(where, prompt, check)


def countdown(where: str, rec: dict) -> Planning:
    """`numbers` (list of ints) and `target`; any expression the verifier accepts counts."""
    numbers, target = _get(rec, "numbers", where, "Countdown"), _get(rec, "target", where, "Countdown")
    if not isinstance(numbers, list) or not numbers or not all(type(n) is int and n >= 0 for n in numbers):
        raise ValueError(f"{where}: Countdown field 'numbers' must be a list of non-negative ints, got {numbers!r}")
    if type(target) is not int:
        raise ValueError(f"{where}: Countdown field 'target' must be an int, got {target!r}")
    return _planning(
        where, rec, "Countdown", countdown_prompt(numbers, target), partial(countdown_error, numbers, target)
    )


def sudoku(where: str, rec: dict) -> Planning:
    """`puzzle`: 16 cells row by row, '.' blank; any grid the verifier accepts counts."""
    puzzle = _text(rec, "puzzle", where, "Sudoku")
    try:
        prompt = sudoku_prompt(puzzle)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return _planning(where, rec, "Sudoku", prompt, partial(sudoku_error, puzzle))


@dataclass(frozen=True)
class Task:
    kind: str  # "choice" | "lambada" | "gsm8k" | "infill" | "planning"
    parse: Callable[[str, dict], MultipleChoice | Completion | Planning]


TASKS: dict[str, Task] = {
    "hellaswag": Task("choice", hellaswag),
    "piqa": Task("choice", piqa),
    "siqa": Task("choice", siqa),
    "winogrande": Task("choice", winogrande),
    "lambada": Task("lambada", lambada),
    "gsm8k": Task("gsm8k", gsm8k),
    "infill": Task("infill", infill),
    "countdown": Task("planning", countdown),
    "sudoku": Task("planning", sudoku),
}


def _unwrap(rec: dict) -> dict:
    """oe-eval / lm-eval request files wrap the published record as {"doc": ..., "request": ...}."""
    return rec["doc"] if isinstance(rec.get("doc"), dict) and "request" in rec else rec


def parse_records(task: str, records: list[Record]) -> list:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)} or 'heldout'")
    return [TASKS[task].parse(where, _unwrap(rec)) for where, rec in records]
