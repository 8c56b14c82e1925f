"""Deterministic greedy blending of sources by weight.

Sample k goes to the source whose realised share lags its weight most:
argmax_i  w_i * (k + 1) - count_i(k)  (ties: lowest i). With weights made exact integers W_i
(P = sum W_i) the sequence is periodic with period P and each period holds exactly W_i samples
of source i, so sample k maps to (source, per-source sample number) in O(1) for any k.
"""

from __future__ import annotations

from fractions import Fraction
from math import gcd, lcm

MAX_PERIOD = 1 << 20


def integer_weights(weights: list[float]) -> list[int]:
    """Weights as coprime integers: exact for integers and short decimals (7:3, 0.7:0.3, 1:1:2);
    other floats are taken as the nearest fraction with denominator <= 2**16."""
    if not weights or any(not (w > 0) for w in weights):
        raise ValueError(f"source weights must be positive, got {weights}")
    fr = [Fraction(str(w)) if len(str(w)) <= 12 else Fraction(w).limit_denominator(1 << 16) for w in weights]
    den = lcm(*(f.denominator for f in fr))
    ints = [int(f * den) for f in fr]
    g = gcd(*ints)
    ints = [i // g for i in ints]
    if sum(ints) > MAX_PERIOD:
        raise ValueError(
            f"source weights {weights} give a blending period of {sum(ints)} samples (> {MAX_PERIOD}); "
            f"use small integer ratios"
        )
    return ints


class Blend:
    """`locate(k) -> (source, j)`: global sample k is the j-th sample drawn from `source`."""

    def __init__(self, weights: list[float]):
        self.weights = integer_weights(list(weights))
        self.period = P = sum(self.weights)
        counts = [0] * len(self.weights)
        self._src: list[int] = []  # over one period: the source of sample r and its rank there
        self._rank: list[int] = []
        for k in range(P):
            lag = [w * (k + 1) - P * c for w, c in zip(self.weights, counts)]
            i = lag.index(max(lag))
            self._src.append(i)
            self._rank.append(counts[i])
            counts[i] += 1
        if counts != self.weights:  # the greedy rule realises the weights exactly over one period
            raise ValueError(
                f"source weights {weights} (as integers {self.weights}) are not realised exactly by one "
                f"blending period (got {counts})"
            )

    def locate(self, k: int) -> tuple[int, int]:
        p, r = divmod(k, self.period)
        s = self._src[r]
        return s, p * self.weights[s] + self._rank[r]
