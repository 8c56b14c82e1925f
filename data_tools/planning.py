"""Deterministic train/test splits of the planning tasks (Countdown, 4x4 Sudoku).

    python -m data_tools.planning sudoku --out data/sudoku --n-train 20000 --n-test 500 --seed 0
    python -m data_tools.planning countdown --out data/countdown --n-train 20000 --n-test 500 --seed 0
    python -m data_tools.planning tokenizer --out data/planning_tok

Writes OUT/train.jsonl and OUT/test.jsonl, one JSON object per line:
    {"id", "prompt", "response", ...task fields}
Countdown adds `numbers` and `target`, Sudoku `puzzle` and `solution`. `prompt`/`response` are what
the SFT reader takes; the evaluator (`launch/evaluate.py --task countdown=OUT/test.jsonl`) checks
answers with the exact verifiers in `dlm.evaluation.planning`, so any valid answer counts, not
only the `response` written here.

Every puzzle is solvable by construction (Countdown: the target is the value of a random
expression over the numbers; Sudoku: clues are removed from a valid grid while the solution stays
unique), no prompt appears twice, and test prompts never appear in train. The same arguments give
byte-identical files.

`tokenizer` writes a character-level `tokenizer.json` (+ `tokenizer_config.json`) over the
planning alphabet with `<pad>` 0, `<s>` 1 (BOS, added), `</s>` 2 (EOS), `<sep>` 3, `<unk>` 4: a
model trained from scratch on these tasks needs no subword vocabulary (see launch/finetune_showcase.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from fractions import Fraction
from pathlib import Path

from dlm.atomic import atomic_write_text
from dlm.evaluation.planning import (
    countdown_error,
    countdown_prompt,
    sudoku_error,
    sudoku_prompt,
    sudoku_solutions,
)

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
CHAR_SPECIALS = ("<pad>", "<s>", "</s>", "<sep>", "<unk>")
CHAR_ALPHABET = "0123456789.+-*/()> ="


# ---------------------------------------------------------------------------- countdown


def _combine(rng: random.Random, items: list[tuple[Fraction, str, int]]) -> tuple[Fraction, str, int] | None:
    """Join the (value, text, precedence) items pairwise in random order into one expression whose
    intermediate values are all positive integers (the classic Countdown rule); None if a draw fails."""
    items = list(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ta, pa), (b, tb, pb) = items[i], items[j]
        op = rng.choice("+-*/")
        if (op == "-" and a <= b) or (op == "/" and (b == 0 or a % b != 0 or b == 1)):
            return None
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        p = _PREC[op]
        left = f"({ta})" if pa < p else ta
        right = f"({tb})" if pb < p or (pb == p and op in "-/") else tb
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(value, f"{left}{op}{right}", p)]
    return items[0]


def countdown_puzzle(rng: random.Random, min_numbers: int, max_numbers: int, max_number: int, max_target: int) -> dict:
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(min_numbers, max_numbers))]
        got = _combine(rng, [(Fraction(n), str(n), 3) for n in numbers])
        if got is None or not 1 <= got[0] <= max_target:
            continue
        target, expression = int(got[0]), got[1]
        error = countdown_error(numbers, target, expression)
        if error is not None:  # the generator and the verifier must agree
            raise AssertionError(f"generated {expression!r} for {numbers} -> {target}: {error}")
        return {
            "prompt": countdown_prompt(numbers, target),
            "response": expression,
            "numbers": numbers,
            "target": target,
        }


# ---------------------------------------------------------------------------- sudoku


def _all_grids() -> list[str]:
    """The 288 valid 4x4 grids, in lexicographic order."""
    return sudoku_solutions("." * 16, limit=1000)


def sudoku_puzzle(rng: random.Random, grids: list[str], min_clues: int, max_clues: int) -> dict:
    """Remove clues in a random order while the solution stays unique, down to a drawn count."""
    while True:
        solution = rng.choice(grids)
        want = rng.randint(min_clues, max_clues)
        cells = list(solution)
        order = list(range(16))
        rng.shuffle(order)
        for i in order:
            if sum(c != "." for c in cells) <= want:
                break
            kept, cells[i] = cells[i], "."
            if len(sudoku_solutions("".join(cells))) != 1:
                cells[i] = kept
        puzzle = "".join(cells)
        if sum(c != "." for c in puzzle) != want:
            continue  # this grid and order cannot go that low with a unique solution
        error = sudoku_error(puzzle, solution)
        if error is not None:
            raise AssertionError(f"generated {puzzle} / {solution}: {error}")
        return {"prompt": sudoku_prompt(puzzle), "response": solution, "puzzle": puzzle, "solution": solution}


# ---------------------------------------------------------------------------- splits


def make_splits(task: str, n_train: int, n_test: int, seed: int, **kw) -> dict[str, list[dict]]:
    """{"test": [...], "train": [...]}: distinct prompts, test drawn first, train never repeats one."""
    if n_train < 0 or n_test < 0:
        raise ValueError("--n-train and --n-test must be >= 0")
    rng = random.Random(f"{task}:{seed}")
    if task == "countdown":
        if not 2 <= kw["min_numbers"] <= kw["max_numbers"]:
            raise ValueError("need 2 <= --min-numbers <= --max-numbers")

        def draw() -> dict:
            return countdown_puzzle(rng, kw["min_numbers"], kw["max_numbers"], kw["max_number"], kw["max_target"])
    elif task == "sudoku":
        if not 4 <= kw["min_clues"] <= kw["max_clues"] <= 15:
            raise ValueError("need 4 <= --min-clues <= --max-clues <= 15 (a 4x4 grid needs 4 clues to be unique)")
        grids = _all_grids()

        def draw() -> dict:
            return sudoku_puzzle(rng, grids, kw["min_clues"], kw["max_clues"])
    else:
        raise ValueError(f"unknown planning task {task!r}; choose countdown or sudoku")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in (("test", n_test), ("train", n_train)):
        rows: list[dict] = []
        misses = 0
        while len(rows) < n:
            rec = draw()
            if rec["prompt"] in seen:
                misses += 1
                if misses > 100 * (n + 100):
                    raise ValueError(
                        f"{task}: only {len(seen)} distinct puzzles found; ask for fewer or widen the ranges"
                    )
                continue
            seen.add(rec["prompt"])
            rows.append({"id": f"{task}-{split}-{len(rows):06d}", **rec})
        out[split] = rows
    return out


def write_splits(out: Path, splits: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in splits[split])
        atomic_write_text(out / f"{split}.jsonl", text)


def write_char_tokenizer(out: Path) -> Path:
    """A character-level tokenizer.json for the planning alphabet (one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(CHAR_SPECIALS + tuple(CHAR_ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(CHAR_SPECIALS))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "sep_token": "<sep>",
        "add_bos_token": True,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=("countdown", "sudoku", "tokenizer"))
    ap.add_argument("--out", required=True, help="output folder (train.jsonl, test.jsonl; or the tokenizer)")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-numbers", type=int, default=3, help="countdown: fewest numbers")
    ap.add_argument("--max-numbers", type=int, default=4, help="countdown: most numbers")
    ap.add_argument("--max-number", type=int, default=25, help="countdown: numbers drawn from 1..this")
    ap.add_argument("--max-target", type=int, default=100, help="countdown: targets in 1..this")
    ap.add_argument("--min-clues", type=int, default=5, help="sudoku: fewest clues")
    ap.add_argument("--max-clues", type=int, default=10, help="sudoku: most clues")
    args = ap.parse_args(argv)
    if args.task == "tokenizer":
        print(f"wrote a character-level tokenizer to {write_char_tokenizer(Path(args.out))}")
        return 0
    if args.n_train is None or args.n_test is None:
        ap.error(f"{args.task} needs --n-train and --n-test")
    try:
        splits = make_splits(
            args.task,
            args.n_train,
            args.n_test,
            args.seed,
            min_numbers=args.min_numbers,
            max_numbers=args.max_numbers,
            max_number=args.max_number,
            max_target=args.max_target,
            min_clues=args.min_clues,
            max_clues=args.max_clues,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    write_splits(Path(args.out), splits)
    print(f"wrote {len(splits['train'])} train and {len(splits['test'])} test {args.task} puzzles to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
