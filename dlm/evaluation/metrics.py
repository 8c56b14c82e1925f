"""Scoring helpers: standard errors, ROUGE-L, GSM8K number extraction."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the standard error of the mean (sample std / sqrt(n)); stderr None when n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio_stderr(nums: Sequence[float], dens: Sequence[float]) -> tuple[float, float | None]:
    """sum(nums) / sum(dens) and its delta-method standard error over rows (for nats/token)."""
    n, total = len(nums), sum(dens)
    if n == 0 or total <= 0:
        raise ValueError("no tokens to average over")
    r = sum(nums) / total
    if n < 2:
        return r, None
    resid = [a - r * b for a, b in zip(nums, dens)]
    var = sum(x * x for x in resid) / (n - 1)
    return r, math.sqrt(var / n) / (total / n)


def _words(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase, alphanumeric runs."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), in [0, 1]."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5'; None when the text is not a number."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    return format(value, "f")


def extract_answer(generation: str) -> str | None:
    """The final number of a GSM8K solution: after the last '####' if present, else the last
    number in the text."""
    if "####" in generation:
        tail = _NUMBER.findall(generation.rsplit("####", 1)[1])
        if tail:
            return normalize_number(tail[0])
    found = _NUMBER.findall(generation)
    return normalize_number(found[-1]) if found else None
