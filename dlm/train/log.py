"""Logging, one style: every module logs to `logging.getLogger(__name__)`, a child of "dlm".
`setup_logging` (the trainer calls it) gives the "dlm" tree one rank-prefixed handler: rank 0
speaks at INFO, the others only report warnings and errors (DLM_LOG_ALL_RANKS=1: every rank).
Command-line tools print their results and end a failure with one `error:` line."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(rank: int) -> logging.Logger:
    all_ranks = os.environ.get("DLM_LOG_ALL_RANKS", "0") == "1"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dlm")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    return root
