"""One tokenizer interface over SentencePiece, Hugging Face `tokenizer.json` and GPT-2 BPE files.

Documents are encoded as plain text: a literal special-token string inside a document
(`</s>`, `<|endoftext|>`) is tokenized like any other text and never becomes a special id,
so web text cannot forge document boundaries. BOS/EOS are added by the caller (the store
writer), never by `encode`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_GPT2_VOCAB = ("vocab.json", "encoder.json")
_GPT2_MERGES = ("merges.txt", "vocab.bpe")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def pin_threads() -> None:
    """One tokenizer thread per process: the tokenizing tool runs one process per core, so a
    library thread pool would only oversubscribe. Must run before the first encode."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"


def _sha256(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


class Tokenizer:
    """Common facts and methods; subclasses bind a backend."""

    kind: str
    path: str
    files: tuple[Path, ...]
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    @property
    def sha256(self) -> str:
        if not hasattr(self, "_sha256"):
            self._sha256 = _sha256(self.files)
        return self._sha256

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_batch` as int32 arrays, what the store writer packs; a backend that can
        return buffers skips the Python ints."""
        return [np.array(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The file name(s), without folders: with `sha256`, the tokenizer's identity on any machine."""
        return "+".join(f.name for f in self.files)

    def facts(self) -> dict:
        """What a token store records about the tokenizer that produced it. Only plan.json keeps
        `path` (where `run` loads it from); shards carry the rest (`dlm.data.store.tokenizer_identity`)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "path": str(Path(self.path).resolve()),  # absolute: read again from other folders
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "add_bos": self.add_bos,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` (LLaMA-2 format: BOS 1, EOS 2, BOS added to every document).

    SentencePiece never produces control symbols (<s>, </s>) from input text, so literal
    special-token strings stay text by construction."""

    kind = "sentencepiece"

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.path = str(model_file)
        self.files = (model_file,)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a readable SentencePiece model ({e})") from e
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, add_bos=False, add_eos=False, num_threads=1)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self._sp.encode(list(texts), out_type="numpy", add_bos=False, add_eos=False, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`: from `tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`.

    `encode_special_tokens = True` makes added special tokens match nothing in the input, so a
    literal `<|endoftext|>` is split into ordinary pieces."""

    def __init__(self, tok, kind: str, path: str, files: Sequence[Path], bos_id, eos_id, add_bos: bool):
        self._tok = tok
        self._tok.encode_special_tokens = True
        self._tok.no_truncation()
        self._tok.no_padding()
        self.kind = kind
        self.path = path
        self.files = tuple(files)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _special_id(tok, config: dict, key: str, names: Sequence[str]) -> int | None:
    """BOS/EOS id: from tokenizer_config.json when present, else the first known name that is a
    registered special token."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return tok.token_to_id(value)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for name in names:
        if name in specials:
            return tok.token_to_id(name)
    return None


def _load_tokenizer_json(files: list[Path]) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    path = files[0]
    try:
        tok = HFTok.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from e
    try:
        config = json.loads(files[1].read_text()) if len(files) > 1 else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{files[1]}: unreadable tokenizer_config.json ({e})") from e
    bos = _special_id(tok, config, "bos_token", _BOS_NAMES)
    eos = _special_id(tok, config, "eos_token", _EOS_NAMES)
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"]) and bos is not None
    else:  # the post-processor decides, as it does for the HF model
        add_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return HFTokenizer(tok, "hf", str(path), files, bos, eos, add_bos)


def _load_gpt2(vocab: Path, merges: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise ValueError(f"{vocab} + {merges}: not a readable GPT-2 BPE vocabulary ({e})") from e
    tok = HFTok(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = tok.token_to_id("<|endoftext|>")
    return HFTokenizer(tok, "gpt2", str(vocab.parent), [vocab, merges], None, eos, False)


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def resolve_tokenizer(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """(kind, files) of a tokenizer path without parsing it: "sentencepiece" [model],
    "hf" [tokenizer.json, tokenizer_config.json if present], "gpt2" [vocab, merges].
    The files are what `Tokenizer.sha256` hashes."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"tokenizer path {p} does not exist (expected a SentencePiece .model, "
            f"a tokenizer.json, GPT-2 vocab.json + merges.txt, or a folder with one)"
        )
    if p.is_dir():
        found = _first(p, ("tokenizer.json",)) or _first(p, ("tokenizer.model",))
        if found is None:
            models = sorted(p.glob("*.model"))
            found = models[0] if len(models) == 1 else None
        if found is None:
            found = _first(p, _GPT2_VOCAB)
        if found is None:
            raise FileNotFoundError(
                f"{p}: no tokenizer.json, tokenizer.model, *.model or "
                f"vocab.json/encoder.json + merges.txt/vocab.bpe in this folder"
            )
        p = found
    if p.name in _GPT2_VOCAB or p.name in _GPT2_MERGES:
        vocab, merges = _first(p.parent, _GPT2_VOCAB), _first(p.parent, _GPT2_MERGES)
        if vocab is None or merges is None:
            raise FileNotFoundError(
                f"{p}: GPT-2 BPE needs both vocab.json/encoder.json and merges.txt/vocab.bpe in {p.parent}"
            )
        return "gpt2", [vocab, merges]
    if p.suffix == ".json":
        cfg = p.parent / "tokenizer_config.json"
        return "hf", [p] + ([cfg] if cfg.is_file() else [])
    # SentencePiece files carry any extension (`tokenizer.model.v1`); the parser decides
    return "sentencepiece", [p]


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """The sha256 `load_tokenizer(path).sha256` would report, without parsing the files."""
    return _sha256(resolve_tokenizer(path)[1])


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a SentencePiece `.model`, a `tokenizer.json`, GPT-2 `vocab.json`/`encoder.json` +
    `merges.txt`/`vocab.bpe` (either file of the pair), or a folder holding one of them."""
    kind, files = resolve_tokenizer(path)
    if kind == "gpt2":
        return _load_gpt2(*files)
    if kind == "hf":
        return _load_tokenizer_json(files)
    return SentencePieceTokenizer(files[0])
