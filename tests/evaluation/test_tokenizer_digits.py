"""Issue 15 item 4, settled: whitespace before digits. SmolLM2's tokenizer (llama.cpp pre-type
`smollm`, like StarCoder's) first isolates every digit (\\p{N}), then applies the GPT-2 regex to
each remaining fragment, so in "take  2" the two spaces stay one piece ("ĠĠ", "2"). dlm's
tokenizer (the tokenizer.json data_tools/convert_gguf.py rebuilds: Digits(individual_digits) then
ByteLevel) follows that rule; the tokenizer transformers builds from the same GGUF drops the digit
rule (ByteLevel alone: "Ġ", "Ġ", "2"), which is where the two log-likelihoods differ. The oracle
below is the rule itself, written with the `regex` module, independent of `tokenizers`."""

from __future__ import annotations

from pathlib import Path

import pytest

regex = pytest.importorskip("regex")

from data_tools.convert_gguf import build_tokenizer  # noqa: E402
from dlm.tokenizer import load_tokenizer  # noqa: E402

GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)""")
DIGIT = regex.compile(r"\p{N}")
TEXTS = [
    "Cut 2 cups of flour",
    "add  12 eggs",  # two spaces before a number
    "step\n 3: mix",
    "wait\t\t45 minutes",
    "x   7",
    "1 2  3   4",
    "in 2024.",
]
DEMO_TOKENIZER = Path("~/.cache/dlm/demo/smollm2-135m-hf").expanduser()


def original_pieces(text: str) -> list[str]:
    """llama.cpp's `smollm` pre-tokenizer: digits alone, then the GPT-2 regex within each fragment."""
    pieces, last = [], 0
    for m in DIGIT.finditer(text):
        pieces += GPT2_SPLIT.findall(text[last : m.start()]) + [m.group()]
        last = m.end()
    return pieces + GPT2_SPLIT.findall(text[last:])


def gpt2_only_pieces(text: str) -> list[str]:
    """The rule without the digit step (what transformers' GGUF tokenizer applies)."""
    return GPT2_SPLIT.findall(text)


def _by_pieces(tok, pieces: list[str]) -> list[int]:
    """BPE never merges across pre-tokenizer pieces: the encoding is the pieces' encodings joined."""
    return [t for p in pieces for t in tok.encode(p)]


class _GGUFStub:
    """The metadata convert_gguf.build_tokenizer reads, for a tiny byte-level vocabulary."""

    path = "stub.gguf"

    def __init__(self, pre: str):
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = sorted(ByteLevel.alphabet())  # every byte has a symbol: nothing is unknown
        merges = ["Ġ Ġ", "ĠĠ Ġ", "ĉ ĉ", "Ċ Ġ", "Ġ x", "Ġ c"]
        tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
        self.meta = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
            "tokenizer.ggml.merges": merges,
        }

    def get(self, key: str, default=None, required: bool = True):
        return self.meta.get(key, default)


@pytest.fixture(scope="module")
def stub_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits_tok")
    build_tokenizer(_GGUFStub("smollm")).save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_converted_tokenizer_follows_the_original_digit_rule(stub_tokenizer, text):
    assert stub_tokenizer.encode(text) == _by_pieces(stub_tokenizer, original_pieces(text))


def test_the_two_rules_disagree_on_spaces_before_digits(stub_tokenizer):
    text = "add  12 eggs"
    assert original_pieces(text) == ["add", "  ", "1", "2", " eggs"]
    assert gpt2_only_pieces(text) == ["add", " ", " 12", " eggs"]
    assert _by_pieces(stub_tokenizer, original_pieces(text)) != _by_pieces(stub_tokenizer, gpt2_only_pieces(text))


@pytest.mark.skipif(
    not DEMO_TOKENIZER.is_dir(), reason="the demo's converted SmolLM2 folder is not fetched (make demo)"
)
@pytest.mark.parametrize("text", TEXTS)
def test_real_smollm2_tokenizer_follows_the_original_digit_rule(text):
    tok = load_tokenizer(DEMO_TOKENIZER)
    assert tok.encode(text) == _by_pieces(tok, original_pieces(text))
