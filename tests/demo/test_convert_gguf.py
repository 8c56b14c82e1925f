"""GGUF -> HF folder: weights (quantized, permuted q/k), config, tokenizer, and logits checked
against transformers, our model and the independent NumPy forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_tools import numpy_llama
from data_tools.convert_gguf import check_converted, convert_gguf, permute_qk, unpermute_qk


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    path, expected, _ = tiny_gguf
    return convert_gguf(path, tmp_path_factory.mktemp("hf") / "tiny"), expected


def test_permutation_inverse_and_not_identity():
    w = np.arange(2 * 3 * 8 * 5, dtype=np.float32).reshape(2 * 3 * 8, 5)  # 3 heads of dim 16
    p = permute_qk(w, 3)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, 3), w)
    # head 0, pair 0: rotate-half rows 0 and 8 become adjacent rows 0 and 1
    np.testing.assert_array_equal(p[0], w[0])
    np.testing.assert_array_equal(p[1], w[8])


def test_weights_config_and_files(converted, demo_constants):
    TINY = demo_constants["tiny"]
    folder, expected = converted
    from safetensors.numpy import load_file

    got = load_file(str(folder / "model.safetensors"))
    assert set(got) == set(expected)
    for k, v in expected.items():  # dequantized and un-permuted exactly
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        TINY["dim"],
        TINY["n_layers"],
        TINY["n_heads"],
        TINY["n_kv_heads"],
    )
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in got
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (
        1,
        2,
        TINY["theta"],
        TINY["eps"],
    )
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)


def test_logits_match_transformers_ours_and_numpy(converted, tiny_gguf):
    from transformers import LlamaForCausalLM

    from dlm.attention.layout import AttentionLayout
    from dlm.models.hf import load_hf_model

    folder, _ = converted
    ids = [5, 77, 300, 12, 9, 150, 42, 3, 260, 18, 99]
    hf = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    ours_model = load_hf_model(folder, mask_token_id=None, attention="causal").eval()
    layout = AttentionLayout.from_position_ids(torch.arange(len(ids))[None], causal=True)
    with torch.no_grad():
        ours = ours_model(torch.tensor([ids]), layout)[0].double().numpy()
    npy = numpy_llama.forward(numpy_llama.load_gguf_llama(tiny_gguf[0]), ids)
    assert np.abs(ref).max() > 1.0  # the check is not vacuous
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(npy, ref, atol=1e-4, rtol=0)


def test_numpy_forward_detects_a_wrong_layout(converted, tiny_gguf, demo_constants):
    """The same HF model agrees with the NumPy forward with the converter's q rows, and
    disagrees once those rows are left in llama.cpp's interleaved order."""
    from safetensors.numpy import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    TINY = demo_constants["tiny"]
    folder, _ = converted
    ids = [5, 77, 300, 12, 9, 150]
    npy = numpy_llama.forward(numpy_llama.load_gguf_llama(tiny_gguf[0]), ids)
    sd = load_file(str(folder / "model.safetensors"))
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(folder))).eval()
    errors = []
    for permuted in (False, True):
        w = sd["model.layers.0.self_attn.q_proj.weight"]
        state = {**sd, "model.layers.0.self_attn.q_proj.weight": permute_qk(w, TINY["n_heads"]) if permuted else w}
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected
        with torch.no_grad():
            errors.append(np.abs(model(torch.tensor([ids])).logits[0].double().numpy() - npy).max())
    assert errors[0] < 1e-4 and errors[1] > 1e-2, errors


def test_tokenizer_matches_reference_and_round_trips(converted, bpe_reference, demo_constants):
    from tokenizers import Tokenizer

    from dlm.tokenizer import load_tokenizer

    folder, _ = converted
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = demo_constants["texts"][:4] + [
        "Year 2024: 31,415 cats.",
        "  leading spaces\nnew line",
        "héllo wörld ∑ 数字 42",
    ]
    for t in texts:
        assert tok.encode(t).ids == bpe_reference.encode(t).ids, t
        assert tok.decode(tok.encode(t).ids) == t
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("in 2024")] == ["in", "Ġ", "2", "0", "2", "4"]
    assert [tok.token_to_id(s) for s in demo_constants["specials"]] == [0, 1, 2]
    ours = load_tokenizer(folder)
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size) == (1, 2, False, tok.get_vocab_size())
    # literal special-token text in a document stays ordinary text for the store writer
    assert 2 not in ours.encode("end <|im_end|> here")
    assert ours.decode(ours.encode("end <|im_end|> here")) == "end <|im_end|> here"


def test_check_converted_reports_agreement(converted):
    folder, _ = converted
    report = check_converted(folder, ["The quick brown fox 123.", "Cats and kittens in barns."], n_tokens=8)
    assert report["logit_max_abs_diff"] < 1e-4
    assert report["argmax_agreement"] == 1.0
    assert report["tokens"] > 10 and np.isfinite(report["ppl"]) and report["ppl"] > 1.0


def test_rerun_skips_and_foreign_folder_is_refused(converted, tiny_gguf, tmp_path):
    folder, _ = converted
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(tiny_gguf[0], folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_gguf(tiny_gguf[0], other)
    convert_gguf(tiny_gguf[0], other, overwrite=True)
    assert (other / "conversion.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_unsupported_files_are_refused(tmp_path, bpe_reference, demo_constants):
    import gguf

    tokens, types, merges = demo_constants["bpe_tables"](bpe_reference)
    cases = (
        ("gpt2", "smollm", True, "only 'llama'"),
        ("llama", "qwen2", True, "pre-tokenizer 'qwen2'"),
        ("llama", "smollm", False, "'llama.attention.layer_norm_rms_epsilon' is missing"),
    )
    for arch, pre, with_eps, match in cases:
        path = tmp_path / f"{arch}-{pre}-{with_eps}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        for key in ("block_count", "context_length", "embedding_length", "feed_forward_length", "head_count"):
            getattr(w, f"add_{key}")(4)
        if with_eps:
            w.add_layer_norm_rms_eps(1e-5)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=match):
            convert_gguf(path, tmp_path / f"out-{path.stem}")
        assert not (tmp_path / f"out-{path.stem}").exists()
