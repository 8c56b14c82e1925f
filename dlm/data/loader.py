"""Optimizer-step batches and the world-size-independent resume state.

Step s (counted from the resume point) reads global samples [C, C+G) with C = consumed samples;
rank r of W takes the contiguous slice [C + r*G/W, C + (r+1)*G/W), cut into micro-batches of b.
The state is only {fingerprint, seq_len, seed, consumed_samples}, so a run may resume on any W'
with G divisible by W' * b and read exactly the samples it would have read.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from .dataset import PackedDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataState:
    index_fingerprint: str
    seq_len: int
    seed: int
    consumed_samples: int

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> DataState:
        keys = ("index_fingerprint", "seq_len", "seed", "consumed_samples")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"data state lacks {missing}: {d}")
        return DataState(str(d["index_fingerprint"]), int(d["seq_len"]), int(d["seed"]), int(d["consumed_samples"]))


def check_resume(state: DataState, dataset: PackedDataset, allow_changed: bool = False) -> int:
    """Returns the consumed samples to resume from; refuses data that is not the data the state
    was saved with (another store, weights, seq_len or seed) unless `allow_changed`."""
    diffs = [
        f"{name}: checkpoint {old!r}, now {new!r}"
        for name, old, new in (
            ("index fingerprint", state.index_fingerprint, dataset.fingerprint),
            ("seq_len", state.seq_len, dataset.seq_len),
            ("seed", state.seed, dataset.seed),
        )
        if old != new
    ]
    if diffs:
        msg = "the data differs from the checkpoint's: " + "; ".join(diffs)
        if not allow_changed:
            raise ValueError(
                msg + ". Resuming would not continue the same sample sequence; to resume anyway, set "
                "data.allow_changed_index = true in the config (or pass --data.allow_changed_index true)"
            )
        logger.warning("%s; resuming at sample %d anyway (allow_changed)", msg, state.consumed_samples)
    return state.consumed_samples


class _RankMicroBatches(torch.utils.data.Dataset):
    """Micro-batch i of one rank, counted from the first step: what DataLoader workers fetch."""

    def __init__(self, dataset: PackedDataset, first: int, G: int, world: int, rank: int, b: int):
        self.dataset, self.first, self.G, self.b = dataset, first, G, b
        self.n_micro = G // (world * b)
        self.offset = rank * (G // world)

    def ids(self, i: int) -> range:
        step, m = divmod(i, self.n_micro)
        start = self.first + step * self.G + self.offset + m * self.b
        return range(start, start + self.b)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.dataset.batch(self.ids(i))


class _Count(torch.utils.data.Sampler):
    def __iter__(self):
        return itertools.count()


class StepLoader:
    """Iterates forever; each item is one optimizer step: a list of micro-batch dicts."""

    def __init__(
        self,
        dataset: PackedDataset,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        consumed_samples: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
    ):
        G, b, W = global_batch_size, micro_batch_size, world_size
        if G < 1 or b < 1 or W < 1 or G % (W * b):
            raise ValueError(f"global batch {G} must be a positive multiple of world size {W} x micro batch {b}")
        if not 0 <= rank < W:
            raise ValueError(f"rank {rank} outside [0, {W})")
        self.dataset, self.G, self.b, self.rank, self.world = dataset, G, b, rank, W
        self.start, self.steps = int(consumed_samples), 0
        self.micro_per_step = G // (W * b)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor

    def _micro_batches(self) -> Iterator[dict]:
        """Micro-batches from the current position on (a new iteration resumes where the last stopped)."""
        micro = _RankMicroBatches(self.dataset, self.consumed_samples, self.G, self.world, self.rank, self.b)
        if self.num_workers == 0:
            return map(micro.__getitem__, itertools.count())
        return iter(
            torch.utils.data.DataLoader(
                micro,
                batch_size=None,
                sampler=_Count(),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
            )
        )

    def __iter__(self) -> Iterator[list[dict]]:
        micro = self._micro_batches()
        while True:
            step = [next(micro) for _ in range(self.micro_per_step)]
            self.steps += 1
            yield step

    @property
    def consumed_samples(self) -> int:
        return self.start + self.steps * self.G

    def state(self) -> DataState:
        """Resume state after the last yielded step."""
        ds = self.dataset
        return DataState(ds.fingerprint, ds.seq_len, ds.seed, self.consumed_samples)
