"""The debug switch: value checks that read tensors back to the host.

Shape and dtype checks are free and always run. Checks of tensor *values* (target ids in range,
a precomputed layout matching its position ids) cost one host sync per call, which on a GPU
stalls the step, so they run only in debug mode: `DLM_DEBUG=1` in the environment, the trainer's
`train.debug = true`, or `set_debug(True)`.
"""

from __future__ import annotations

import os

_enabled = os.environ.get("DLM_DEBUG", "0") not in ("", "0")


def debug_checks() -> bool:
    """Whether per-call value checks run."""
    return _enabled


def set_debug(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)
