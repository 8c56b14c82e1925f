"""Rank-prefixed logging: rank 0 speaks at INFO, the others only report warnings and errors
(set DLM_LOG_ALL_RANKS=1 to hear every rank)."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("dlm.train")


def setup_logging(rank: int) -> logging.Logger:
    all_ranks = os.environ.get("DLM_LOG_ALL_RANKS", "0") == "1"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    return logger
