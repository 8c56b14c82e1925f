"""Fine-tuning examples from local files, served as fixed-length rows by global sample id.

Records come from JSON lines / JSON / parquet / Arrow files (`dlm.evaluation.readers`), each
named by "file:line" or "file row i". The prompt and response are read by a record format:

    gsm8k        question -> answer (the published `#### n` final line is kept)
    instruction  instruction (+ input) -> output (the seed's gsm.json / gsm_test.json)
    fields       prompt_field -> response_field (default "prompt" / "response"; planning tasks)

An example longer than seq_len is an error naming its file and record; with
`overlong = "skip"` it is dropped and counted instead (never truncated).

Row k of training (the global sample id) is a pure function of (seed, k): epoch e = the pass
over the examples in a seeded permutation; with packing, consecutive examples of that order are
packed greedily into rows. So the order and the noise (keyed by k) do not depend on world size,
and `dlm.data.StepLoader` serves this dataset exactly as it serves the pretraining store.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlm.evaluation.readers import read_records
from dlm.sft import SFTFormat, collate_sft, example_parts, pack_row

logger = logging.getLogger(__name__)

FORMATS = ("gsm8k", "instruction", "fields")


@dataclass(frozen=True)
class RecordFormat:
    kind: str = "fields"
    prompt_field: str = "prompt"
    response_field: str = "response"

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise ValueError(f"unknown SFT record format {self.kind!r}; choose one of {list(FORMATS)}")

    def texts(self, where: str, rec: dict) -> tuple[str, str]:
        """(prompt, response) of one record."""
        if self.kind == "gsm8k":
            prompt, response = _field(rec, "question", where), _field(rec, "answer", where)
            if "####" not in response:
                raise ValueError(f"{where}: GSM8K answer has no '#### <number>' final line")
            return prompt, response
        if self.kind == "instruction":
            prompt = _field(rec, "instruction", where)
            extra = rec.get("input")
            if isinstance(extra, str) and extra.strip():
                prompt = prompt + "\n" + extra
            return prompt, _field(rec, "output", where)
        return _field(rec, self.prompt_field, where), _field(rec, self.response_field, where)


def _field(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise ValueError(f"{where}: record has no field {key!r} (fields: {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


class SFTDataset:
    """Tokenized examples and the row schedule. `batch(ids)` collates rows for global sample ids;
    `fingerprint`, `seq_len` and `seed` make up the resume check (`dlm.data.check_resume`)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        tokenizer,
        fmt: SFTFormat,
        record_format: RecordFormat = RecordFormat(),
        seed: int = 0,
        pack: bool = False,
        overlong: str = "error",
    ):
        if not paths:
            raise ValueError("SFT data: no files given")
        if overlong not in ("error", "skip"):
            raise ValueError(f"overlong must be 'error' or 'skip', got {overlong!r}")
        self.fmt, self.seq_len, self.seed, self.pack = fmt, fmt.seq_len, int(seed), pack
        self.tokenizer = tokenizer.facts()
        self.parts: list[tuple[list[int], list[int]]] = []
        self.skipped = 0
        for path in paths:
            for where, rec in read_records(path):
                prompt, response = record_format.texts(where, rec)
                try:
                    self.parts.append(example_parts(tokenizer.encode(prompt), tokenizer.encode(response), fmt, where))
                except ValueError:
                    if overlong == "error":
                        raise
                    self.skipped += 1
        if not self.parts:
            raise ValueError(f"SFT data {list(map(str, paths))}: no example fits seq_len {fmt.seq_len}")
        if self.skipped:
            logger.warning(
                "SFT data: skipped %d of %d examples longer than seq_len %d (overlong = 'skip')",
                self.skipped,
                self.skipped + len(self.parts),
                fmt.seq_len,
            )
        self.fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "files": [[str(p), _sha256_path(Path(p))] for p in paths],
                    "tokenizer": tokenizer.sha256,
                    "format": [record_format.kind, record_format.prompt_field, record_format.response_field],
                    "special": [fmt.bos_id, fmt.sep_id, fmt.eos_id, fmt.pad_id],
                    "pack": pack,
                    "overlong": overlong,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:32]
        self._epochs: list[list[list[int]]] = []  # epoch -> rows -> example indices
        self._starts: list[int] = [0]  # first global row of each epoch (and one past the last known)

    def __len__(self) -> int:
        return len(self.parts)

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.parts)).tolist()
        if not self.pack:
            return [[i] for i in order]
        rows: list[list[int]] = [[]]
        used = 0
        for i in order:
            n = len(self.parts[i][0]) + len(self.parts[i][1])
            if rows[-1] and used + n > self.seq_len:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows

    def examples_of(self, k: int) -> list[int]:
        """Indices of the examples in global row k."""
        if k < 0:
            raise ValueError(f"sample id must be >= 0, got {k}")
        while k >= self._starts[-1]:
            self._epochs.append(self._epoch_rows(len(self._epochs)))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
        e = int(np.searchsorted(self._starts, k, side="right")) - 1
        return self._epochs[e][k - self._starts[e]]

    def row(self, k: int) -> dict:
        return pack_row([self.parts[i] for i in self.examples_of(k)], self.fmt)

    def batch(self, ids) -> dict[str, torch.Tensor]:
        ids = [int(k) for k in ids]
        return collate_sft([self.row(k) for k in ids], ids)


def sft_format(tokenizer, seq_len: int, sep_id: int = -1, pad_id: int = -1) -> SFTFormat:
    """The row layout for a tokenizer: BOS where its model expects one (as evaluation prompts
    do), EOS closing the response; SEP and PAD default (-1) to EOS."""
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.path} has no EOS id: SFT rows need one to end the response")
    return SFTFormat(
        seq_len=seq_len,
        sep_id=eos if sep_id < 0 else sep_id,
        eos_id=eos,
        pad_id=eos if pad_id < 0 else pad_id,
        bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
    )


def load_sft_dataset(section, seq_len: int, seed: int, default_tokenizer: str) -> SFTDataset:
    """The dataset a `[finetune]` config section (dlm.train.config.FinetuneSection) describes."""
    from dlm.tokenizer import load_tokenizer

    tok = load_tokenizer(section.tokenizer or default_tokenizer)
    return SFTDataset(
        section.paths,
        tok,
        sft_format(tok, seq_len, section.sep_id, section.pad_id),
        RecordFormat(section.format, section.prompt_field, section.response_field),
        seed=seed,
        pack=section.pack,
        overlong=section.overlong,
    )
