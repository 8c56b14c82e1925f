"""Fixtures for the demo-asset tests: a small byte-level BPE tokenizer trained like SmolLM2's
(digits split one by one before the GPT-2 regex), and a tiny LLaMA written as a GGUF file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog in 1999 and again in 2024.",
    "Reading comprehension passages tell stories about cats, kittens, barns and farms.",
    "Numbers like 3.14159, 42 and 1,000,000 appear in census tables; 7.5% of people agree.",
    "Ünïcödé text, emoji \U0001f600 and tabs\tand  double  spaces must survive a round trip.",
] * 4


@pytest.fixture(scope="session")
def bpe_reference():
    """A `tokenizers` byte-level BPE trained here: the stand-in for the original tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    return tok


@pytest.fixture(scope="session")
def demo_constants() -> dict:
    """Shared values for the test modules (importlib mode: tests cannot import conftest)."""
    return {"specials": SPECIALS, "texts": TRAIN_TEXT, "tiny": TINY, "bpe_tables": bpe_tables}


def bpe_tables(tok) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, llama.cpp token types, merges "a b") as a GGUF converter stores them."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    types = [3 if t in SPECIALS else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=96, ctx=128, eps=1e-5, theta=10000.0)


def _hf_state(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random LLaMA weights in HF layout (q/k rows in rotate-half order)."""
    g = torch.Generator().manual_seed(seed)
    D, F, hd = TINY["dim"], TINY["ffn"], TINY["dim"] // TINY["n_heads"]

    def w(*shape, std=0.08):
        return (torch.randn(*shape, generator=g) * std).numpy()

    sd = {"model.embed_tokens.weight": w(vocab, D, std=0.5), "model.norm.weight": 1 + w(D, std=0.1)}
    for i in range(int(TINY["n_layers"])):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": w(D, D, std=0.25),
            p + "self_attn.k_proj.weight": w(TINY["n_kv_heads"] * hd, D, std=0.25),
            p + "self_attn.v_proj.weight": w(TINY["n_kv_heads"] * hd, D),
            p + "self_attn.o_proj.weight": w(D, D),
            p + "mlp.gate_proj.weight": w(F, D),
            p + "mlp.up_proj.weight": w(F, D),
            p + "mlp.down_proj.weight": w(D, F),
            p + "input_layernorm.weight": 1 + w(D, std=0.1),
            p + "post_attention_layernorm.weight": 1 + w(D, std=0.1),
        }
    return sd


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, bpe_reference):
    """A tiny LLaMA GGUF written the way llama.cpp's converter does (q/k permuted, some tensors
    quantized). Returns (path, HF-layout state dict of what the converter must recover)."""
    import gguf

    from data_tools.convert_gguf import permute_qk

    Q = gguf.GGMLQuantizationType
    tokens, types, merges = bpe_tables(bpe_reference)
    sd = _hf_state(len(tokens), seed=0)
    qtypes = {  # HF name -> GGUF storage type; the rest stay F32
        "model.embed_tokens.weight": Q.Q8_0,
        "model.layers.0.self_attn.q_proj.weight": Q.Q4_1,
        "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,
        "model.layers.1.mlp.up_proj.weight": Q.Q4_1,
        "model.layers.1.self_attn.o_proj.weight": Q.F16,
    }
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    from data_tools.convert_gguf import _BLOCK_KEYS

    for i in range(int(TINY["n_layers"])):
        names |= {f"model.layers.{i}.{hf}": f"blk.{i}.{gg}" for gg, hf in _BLOCK_KEYS.items()}

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["n_layers"])
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(TINY["dim"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["n_heads"])
    w.add_head_count_kv(TINY["n_kv_heads"])
    w.add_rope_freq_base(TINY["theta"])
    w.add_layer_norm_rms_eps(TINY["eps"])
    w.add_rope_dimension_count(TINY["dim"] // TINY["n_heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    expected = {}
    for hf, arr in sd.items():
        stored = arr
        if hf.endswith("q_proj.weight"):
            stored = permute_qk(arr, TINY["n_heads"])
        elif hf.endswith("k_proj.weight"):
            stored = permute_qk(arr, TINY["n_kv_heads"])
        qt = qtypes.get(hf, Q.F32)
        data = gguf.quants.quantize(np.ascontiguousarray(stored, dtype=np.float32), qt)
        if qt in (Q.F32, Q.F16):
            w.add_tensor(names[hf], data)
        else:
            w.add_tensor(names[hf], data, raw_dtype=qt)
        # quantization works row by row, so it commutes with the row permutation
        expected[hf] = np.asarray(
            gguf.quants.dequantize(gguf.quants.quantize(arr.astype(np.float32), qt), qt), dtype=np.float32
        ).reshape(arr.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, expected, sd
