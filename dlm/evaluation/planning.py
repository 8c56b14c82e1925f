"""Planning tasks where diffusion LMs beat AR ones (Ye et al. 2024): Countdown and 4x4 Sudoku.

Text formats (shared by the generator `data_tools.planning` and the evaluator) and exact verifiers.

Countdown: prompt `"3 7 12 4 -> 48"`, answer an arithmetic expression such as `"(12-3)*4+7"`
that uses every given number exactly once (+ - * / and parentheses, exact rational arithmetic,
division by zero is invalid). Sudoku: prompt the 16 cells row by row with `.` for a blank
(`"1.3...2.4..1.2.."`), answer the 16 digits of the full grid; rows, columns and 2x2 boxes each
hold 1-4 once and every clue is kept.

The expression is parsed by a small recursive-descent parser, never `eval`: model output is
untrusted text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

__all__ = [
    "SUDOKU_CELLS",
    "SUDOKU_UNITS",
    "countdown_error",
    "countdown_prompt",
    "parse_expression",
    "sudoku_error",
    "sudoku_prompt",
    "sudoku_solutions",
]

SUDOKU_CELLS = 16
_BLANK = "."
_OPS = "+-*/"


# ---------------------------------------------------------------------------- countdown


def countdown_prompt(numbers: Sequence[int], target: int) -> str:
    return " ".join(str(n) for n in numbers) + f" -> {target}"


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """(exact value, the integer literals in order) of `text`; ValueError on anything else than
    non-negative integers, + - * /, parentheses and spaces, or on division by zero."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch.isdigit():
            j = i
            while j < len(text) and text[j].isdigit():
                j += 1
            tokens.append(text[i:j])
            i = j
        elif ch in _OPS or ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise ValueError(f"unexpected character {ch!r} at offset {i}")
    if not tokens:
        raise ValueError("empty expression")
    literals: list[int] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> Fraction:
        tok = peek()
        if tok is None:
            raise ValueError("expression ends too early")
        if tok == "(":
            take()
            value = expr()
            if peek() != ")":
                raise ValueError("unbalanced parenthesis")
            take()
            return value
        if tok.isdigit():
            take()
            literals.append(int(tok))
            return Fraction(int(tok))
        raise ValueError(f"expected a number or '(' but found {tok!r}")

    def term() -> Fraction:
        value = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr() -> Fraction:
        value = term()
        while peek() in ("+", "-"):
            op, rhs = take(), term()
            value = value + rhs if op == "+" else value - rhs
        return value

    value = expr()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} after a complete expression")
    return value, literals


def countdown_error(numbers: Sequence[int], target: int, answer: str) -> str | None:
    """None when `answer` is a valid solution, else why it is not."""
    try:
        value, used = parse_expression(answer)
    except ValueError as e:
        return f"not a valid expression: {e}"
    if Counter(used) != Counter(numbers):
        return f"uses {sorted(used)} but must use each of {sorted(numbers)} exactly once"
    if value != target:
        return f"evaluates to {value}, not {target}"
    return None


# ---------------------------------------------------------------------------- sudoku


def sudoku_prompt(puzzle: str) -> str:
    _check_puzzle(puzzle)
    return puzzle


def _check_puzzle(puzzle: str) -> None:
    if len(puzzle) != SUDOKU_CELLS or any(c not in "1234" + _BLANK for c in puzzle):
        raise ValueError(f"a 4x4 sudoku puzzle is 16 characters of 1-4 or '.', got {puzzle!r}")


def _units() -> list[tuple[str, list[int]]]:
    rows = [(f"row {r + 1}", [4 * r + c for c in range(4)]) for r in range(4)]
    cols = [(f"column {c + 1}", [4 * r + c for r in range(4)]) for c in range(4)]
    boxes = [
        (f"box {b + 1}", [4 * (2 * (b // 2) + dr) + 2 * (b % 2) + dc for dr in range(2) for dc in range(2)])
        for b in range(4)
    ]
    return rows + cols + boxes


SUDOKU_UNITS = _units()


def sudoku_error(puzzle: str, answer: str) -> str | None:
    """None when `answer` is a full grid that solves `puzzle`, else why it is not."""
    _check_puzzle(puzzle)
    if len(answer) != SUDOKU_CELLS or any(c not in "1234" for c in answer):
        return f"not 16 digits 1-4: {answer!r}"
    for i, (clue, cell) in enumerate(zip(puzzle, answer)):
        if clue != _BLANK and clue != cell:
            return f"cell {i + 1} (row {i // 4 + 1}, column {i % 4 + 1}) is {cell} but the clue is {clue}"
    for name, cells in SUDOKU_UNITS:
        if sorted(answer[c] for c in cells) != list("1234"):
            return f"{name} holds {''.join(answer[c] for c in cells)}, not 1-4 once each"
    return None


def sudoku_solutions(puzzle: str, limit: int = 2) -> list[str]:
    """Up to `limit` solutions, by backtracking over the blanks (4x4: instant)."""
    _check_puzzle(puzzle)
    peers = [{p for _, cells in SUDOKU_UNITS if i in cells for p in cells if p != i} for i in range(SUDOKU_CELLS)]
    grid = list(puzzle)
    found: list[str] = []

    def solve(i: int) -> None:
        if len(found) >= limit:
            return
        while i < SUDOKU_CELLS and grid[i] != _BLANK:
            i += 1
        if i == SUDOKU_CELLS:
            found.append("".join(grid))
            return
        taken = {grid[p] for p in peers[i]}
        for d in "1234":
            if d not in taken:
                grid[i] = d
                solve(i + 1)
        grid[i] = _BLANK

    for i, c in enumerate(puzzle):  # a puzzle whose clues already clash has no solution
        if c != _BLANK and any(puzzle[p] == c for p in peers[i]):
            return []
    solve(0)
    return found
