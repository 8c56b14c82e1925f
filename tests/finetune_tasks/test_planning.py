"""Planning tasks: exact verifiers on hand-checked cases, and the generator's guarantees."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from data_tools.planning import main as planning_main
from data_tools.planning import make_splits
from dlm.evaluation.planning import countdown_error, parse_expression, sudoku_error, sudoku_solutions

# a hand-solved 4x4 sudoku: rows 1234 / 3412 / 2143 / 4321
SOLUTION = "1234341221434321"
PUZZLE = "1..4.4..2..3...1"


def test_expression_parser_is_exact_and_refuses_code():
    assert parse_expression("(12-3)*4+7") == (Fraction(43), [12, 3, 4, 7])
    assert parse_expression("7/2*2") == (Fraction(7), [7, 2, 2])  # exact, no float rounding
    assert parse_expression("10-4-3")[0] == 3  # left associative
    assert parse_expression("2*(3+4)")[0] == 14
    for bad in ("__import__('os')", "2**3", "3+", "(1+2", "1+2)", "", "4/(2-2)", "1.5+2", "-3+5"):
        with pytest.raises(ValueError):
            parse_expression(bad)


def test_countdown_verifier_hand_checked():
    numbers, target = [3, 7, 12, 4], 43
    assert countdown_error(numbers, target, "(12-3)*4+7") is None
    assert countdown_error(numbers, target, "7+4*(12-3)") is None  # any valid answer counts
    assert "evaluates to 39" in countdown_error(numbers, target, "12*3+7-4")  # wrong value
    assert "exactly once" in countdown_error(numbers, target, "(12-3)*4+7+0")  # a number not given
    assert "exactly once" in countdown_error(numbers, target, "(12-3)*4")  # 7 not used
    assert "exactly once" in countdown_error([3, 3, 5], 11, "3+3+3+2")  # 3 used three times
    assert countdown_error([3, 3, 5], 11, "3+3+5") is None
    assert "division by zero" in countdown_error([4, 2, 2], 4, "4/(2-2)")
    assert "not a valid expression" in countdown_error(numbers, target, "(12-3)*4+7=43")


def test_sudoku_verifier_hand_checked():
    assert sudoku_error(PUZZLE, SOLUTION) is None
    # a valid grid (rows/cols/boxes fine) that breaks a clue: swap digits 1 and 2 everywhere
    swapped = SOLUTION.translate(str.maketrans("12", "21"))
    assert sudoku_error("." * 16, swapped) is None
    assert "clue is 1" in sudoku_error(PUZZLE, swapped)
    # keeps the clues but repeats a digit in a row/column/box
    broken = "1234341221434311"  # row 4 = 4311
    assert "row 4" in sudoku_error("1234341221434...", broken)
    assert "not 16 digits" in sudoku_error(PUZZLE, SOLUTION[:15])
    assert "not 16 digits" in sudoku_error(PUZZLE, SOLUTION[:15] + "5")
    with pytest.raises(ValueError, match="16 characters"):
        sudoku_error("1234", SOLUTION)


def test_sudoku_solver_counts():
    assert len(sudoku_solutions("." * 16, limit=1000)) == 288  # the known number of 4x4 grids
    assert sudoku_solutions(PUZZLE) == [SOLUTION]
    assert sudoku_solutions("11" + "." * 14) == []


@pytest.mark.parametrize("task", ["countdown", "sudoku"])
def test_generator_solvable_disjoint_deterministic(task):
    splits = make_splits(
        task, 300, 100, seed=3, min_numbers=3, max_numbers=4, max_number=25, max_target=100, min_clues=5, max_clues=10
    )
    train, test = splits["train"], splits["test"]
    assert len(train) == 300 and len(test) == 100
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == len(prompts)  # distinct, so train and test are disjoint
    for r in train + test:
        if task == "countdown":
            assert 3 <= len(r["numbers"]) <= 4 and 1 <= r["target"] <= 100
            assert countdown_error(r["numbers"], r["target"], r["response"]) is None
        else:
            assert 5 <= sum(c != "." for c in r["puzzle"]) <= 10
            assert sudoku_solutions(r["puzzle"]) == [r["response"]]  # unique solution
    again = make_splits(
        task, 300, 100, seed=3, min_numbers=3, max_numbers=4, max_number=25, max_target=100, min_clues=5, max_clues=10
    )
    assert again == splits
    other = make_splits(
        task, 300, 100, seed=4, min_numbers=3, max_numbers=4, max_number=25, max_target=100, min_clues=5, max_clues=10
    )
    assert other != splits


def test_cli_writes_identical_files(tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        assert planning_main(["sudoku", "--out", str(out), "--n-train", "50", "--n-test", "20", "--seed", "1"]) == 0
    for split, n in (("train", 50), ("test", 20)):
        a = (tmp_path / "a" / f"{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        rows = [json.loads(x) for x in a.decode().splitlines()]
        assert len(rows) == n and {"id", "prompt", "response", "puzzle", "solution"} <= set(rows[0])


def test_generator_refuses_impossible_requests():
    with pytest.raises(ValueError, match="distinct puzzles"):
        make_splits("countdown", 500, 0, 0, min_numbers=2, max_numbers=2, max_number=2, max_target=100)
    with pytest.raises(ValueError, match="min-clues"):
        make_splits("sudoku", 1, 1, 0, min_clues=2, max_clues=3)
