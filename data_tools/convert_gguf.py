"""GGUF (llama.cpp) LLaMA checkpoint -> Hugging Face style folder.

    python -m data_tools.convert_gguf IN.gguf OUT_DIR [--overwrite]

Writes `config.json` (LlamaForCausalLM), `model.safetensors` (HF key layout, float32: the
dequantized values d*q+m are exact in fp32 but not in bf16/fp16), `tokenizer.json` (byte-level
BPE rebuilt from the GGUF vocabulary and merges), `tokenizer_config.json` and `conversion.json`
(source path + sha256, so a rerun on the same file is skipped). The folder is written to a
temporary name and renamed into place.

Two GGUF conventions are undone here:
- llama.cpp's converter permutes the rows of q and k inside each head so that RoPE rotates
  adjacent pairs (2i, 2i+1); HF rotates the halves (i, i + D/2). `unpermute_qk` inverts it.
- GGUF lists tensor dims innermost first; numpy wants them outermost first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_tools.fetch_demo_assets import read_marker, staged_dir
from dlm.data.store import sha256_file

# GGUF tensor name (after "blk.N.") -> HF LlamaForCausalLM name (after "model.layers.N.")
_BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special (added) tokens
# llama.cpp `tokenizer.ggml.pre` -> whether digits are split one by one before the GPT-2 regex
_PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "gpt2": False, "default": False}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (what llama.cpp's converter does)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk`: llama.cpp interleaved rows -> HF rotate-half rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """Metadata access with errors that name the file and the missing key."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(self.path))

    def get(self, key: str, default=None, required: bool = True):
        field = self.reader.fields.get(key)
        if field is None:
            if required and default is None:
                raise ValueError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def tensors(self):
        """Yield (gguf name, float32 numpy array in numpy dim order)."""
        import gguf

        for t in self.reader.tensors:
            try:
                data = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise ValueError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}: {e}") from e
            shape = tuple(int(s) for s in reversed(t.shape))
            yield t.name, np.ascontiguousarray(np.asarray(data, dtype=np.float32).reshape(shape))


def hf_config(g: GGUFFile) -> dict:
    arch = g.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{g.path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    dim = int(g.get("llama.embedding_length"))
    n_heads = int(g.get("llama.attention.head_count"))
    n_kv = int(g.get("llama.attention.head_count_kv", n_heads))
    head_dim = dim // n_heads
    rot = int(g.get("llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(
            f"{g.path}: partial rotary (rope.dimension_count {rot} != head_dim {head_dim}) is not supported"
        )
    if g.get("llama.rope.scaling.type", "none", required=False) not in ("none",):
        raise ValueError(f"{g.path}: RoPE scaling {g.get('llama.rope.scaling.type')!r} is not supported")
    n_vocab = len(g.reader.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in g.reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(g.get("llama.vocab_size", n_vocab)),
        "hidden_size": dim,
        "intermediate_size": int(g.get("llama.feed_forward_length")),
        "num_hidden_layers": int(g.get("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(g.get("llama.context_length")),
        "rms_norm_eps": float(f"{g.get('llama.attention.layer_norm_rms_epsilon'):.7g}"),  # fp32 -> its short decimal
        "rope_theta": float(f"{g.get('llama.rope.freq_base', 10000.0):.7g}"),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": _opt_int(g.get("tokenizer.ggml.bos_token_id", required=False)),
        "eos_token_id": _opt_int(g.get("tokenizer.ggml.eos_token_id", required=False)),
        "pad_token_id": _opt_int(g.get("tokenizer.ggml.padding_token_id", required=False)),
        "torch_dtype": "float32",
    }


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def hf_state_dict(g: GGUFFile, cfg: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, w in g.tensors():
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest not in _BLOCK_KEYS:
                raise ValueError(f"{g.path}: unexpected tensor {name}")
            if rest == "attn_q.weight":
                w = unpermute_qk(w, cfg["num_attention_heads"])
            elif rest == "attn_k.weight":
                w = unpermute_qk(w, cfg["num_key_value_heads"])
            out[f"model.layers.{int(layer)}.{_BLOCK_KEYS[rest]}"] = w
        elif name in _TOP_KEYS:
            out[_TOP_KEYS[name]] = w
        elif name == "rope_freqs.weight":
            raise ValueError(f"{g.path}: rope_freqs (scaled RoPE) is not supported")
        else:
            raise ValueError(f"{g.path}: unexpected tensor {name}")
    expected = {f"model.layers.{i}.{v}" for i in range(cfg["num_hidden_layers"]) for v in _BLOCK_KEYS.values()}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    if set(out) != expected:
        raise ValueError(
            f"{g.path}: missing tensors {sorted(expected - set(out))[:5]}, extra {sorted(set(out) - expected)[:5]}"
        )
    V, D = out["model.embed_tokens.weight"].shape
    if (cfg["vocab_size"], cfg["hidden_size"]) != (V, D):
        raise ValueError(f"{g.path}: token_embd is {V}x{D}, metadata says {cfg['vocab_size']}x{cfg['hidden_size']}")
    return out


def build_tokenizer(g: GGUFFile):
    """A `tokenizers.Tokenizer` equal to the original byte-level BPE (same vocab, merges, specials)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = g.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{g.path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = g.get("tokenizer.ggml.pre", "default", required=False)
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{g.path}: pre-tokenizer {pre!r} is not supported (known: {sorted(_PRE_TOKENIZERS)})")
    tokens = list(g.get("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type", [1] * len(tokens), required=False))
    merges = []
    for i, m in enumerate(g.get("tokenizer.ggml.merges")):
        a, sep, b = m.partition(" ")
        if not sep or " " in b:
            raise ValueError(f"{g.path}: merge {i} {m!r} is not two space-separated symbols")
        merges.append((a, b))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{g.path}: the vocabulary has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if _PRE_TOKENIZERS[pre]
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens(specials)
    for s in specials:  # adding must not have created new ids
        if tok.token_to_id(s.content) != vocab[s.content]:
            raise ValueError(f"{g.path}: special token {s.content!r} did not keep its id")
    return tok


def _tokenizer_config(g: GGUFFile, cfg: dict) -> dict:
    tokens = g.reader.fields["tokenizer.ggml.tokens"]

    def name(i):
        return None if i is None else tokens.contents(i)

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(cfg["bos_token_id"]),
        "eos_token": name(cfg["eos_token_id"]),
        "pad_token": name(cfg["pad_token_id"]),
        "unk_token": name(_opt_int(g.get("tokenizer.ggml.unknown_token_id", required=False))),
        "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False, required=False)),
        "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False, required=False)),
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": g.get("tokenizer.chat_template", required=False),
    }


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert one GGUF LLaMA file; return the output folder. Skips work already done."""
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    digest = sha256_file(gguf_path)
    if read_marker(out_dir / "conversion.json", "sha256", digest) is not None:
        print(f"[convert] {out_dir} already holds the conversion of {gguf_path.name}", flush=True)
        return out_dir
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not a conversion of {gguf_path}; pass --overwrite to replace it"
        )
    g = GGUFFile(gguf_path)
    cfg = hf_config(g)
    tok = build_tokenizer(g)
    if tok.get_vocab_size() != cfg["vocab_size"]:
        raise ValueError(f"{gguf_path}: tokenizer has {tok.get_vocab_size()} tokens, model {cfg['vocab_size']}")
    state = hf_state_dict(g, cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", cfg)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(g, cfg))
        _write_json(tmp / "conversion.json", {"source": str(gguf_path.resolve()), "sha256": digest})
    n = sum(v.size for v in state.values())
    print(f"[convert] {gguf_path.name} -> {out_dir} ({n / 1e6:.1f}M parameters, {len(state)} tensors)", flush=True)
    return out_dir


def read_texts(path: str | Path, limit: int) -> list[str]:
    """The first `limit` texts of a `.jsonl` / `.jsonl.zst` file of `{"text": ...}` records."""
    import io

    import zstandard

    path = Path(path)
    texts: list[str] = []
    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.suffix == ".zst" else raw
        for n, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
            if len(texts) >= limit:
                break
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON record with a 'text' field ({e})") from e
    return texts


def check_converted(
    folder: str | Path,
    passages: list[str],
    gguf_path: str | Path | None = None,
    n_tokens: int = 16,
    max_len: int = 512,
) -> dict:
    """Load `folder` with our model code (AR, causal) and report
    - `ppl`: token-level perplexity on `passages` (each cut to `max_len` tokens), and
    - logit agreement on the first `n_tokens` of the first passage with the NumPy forward run
      on the source GGUF (recorded in conversion.json unless `gguf_path` is given)."""
    import torch

    from data_tools import numpy_llama
    from dlm.attention.layout import AttentionLayout
    from dlm.models.hf import load_hf_model
    from dlm.tokenizer import load_tokenizer

    folder = Path(folder)
    if not passages:
        raise ValueError("check_converted needs at least one passage")
    gguf_path = Path(gguf_path or json.loads((folder / "conversion.json").read_text())["source"])
    tok = load_tokenizer(folder)
    model = load_hf_model(folder, mask_token_id=None, attention="causal").eval()

    def logits(ids: list[int]) -> torch.Tensor:
        pos = torch.arange(len(ids))[None]
        with torch.no_grad():
            return model(torch.tensor([ids]), AttentionLayout.from_position_ids(pos, causal=True))[0].double()

    nll, count = 0.0, 0
    for text in passages:
        ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(text)[:max_len]
        if len(ids) < 2:
            continue
        lg = logits(ids)
        nll += torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    if count == 0:
        raise ValueError("check_converted: no passage has two or more tokens")
    ids = (([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(passages[0]))[:n_tokens]
    ours = logits(ids).numpy()
    ref = numpy_llama.forward(numpy_llama.load_gguf_llama(gguf_path), ids)
    diff = np.abs(ours - ref)
    return {
        "passages": len(passages),
        "tokens": count,
        "ppl": float(np.exp(nll / count)),
        "logit_tokens": len(ids),
        "logit_max_abs_diff": float(diff.max()),
        "logit_max_abs": float(np.abs(ref).max()),
        "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--overwrite", action="store_true", help="replace an OUT_DIR that is not this conversion")
    ap.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="PASSAGES.jsonl[.zst]",
        help="after converting, report perplexity on these passages and logit agreement with the NumPy forward",
    )
    ap.add_argument("--check-passages", type=int, default=16)
    ap.add_argument("--max-ppl", type=float, default=30.0)
    ap.add_argument("--max-logit-diff", type=float, default=1e-3)
    args = ap.parse_args(argv)
    try:
        convert_gguf(args.gguf, args.out_dir, overwrite=args.overwrite)
        if args.check is None:
            return
        report = check_converted(args.out_dir, read_texts(args.check, args.check_passages), args.gguf)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"[convert] error: {e}")
    print(json.dumps(report, indent=1))
    if report["ppl"] > args.max_ppl or report["logit_max_abs_diff"] > args.max_logit_diff:
        sys.exit(
            f"[convert] check failed: ppl {report['ppl']:.2f} (max {args.max_ppl}), "
            f"logit diff {report['logit_max_abs_diff']:.2e} (max {args.max_logit_diff})"
        )


if __name__ == "__main__":
    main()
