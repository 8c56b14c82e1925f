"""Parity with `transformers` (test-only oracle): import, causal logits, packed documents, export."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlm.attention.layout import AttentionLayout
from dlm.models.hf import HFCheckpoint, load_hf_model, save_hf_model

transformers = pytest.importorskip("transformers")


def _sharpen(model: torch.nn.Module, seed: int) -> None:
    """HF's 0.02 init gives near-uniform attention and tiny logits, where a wrong RoPE or position
    table could hide under the tolerance; larger random weights make every detail matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def hf_llama(tie: bool = False):
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=112,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    _sharpen(m, 1)
    return m


def hf_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=96,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=95,
        eos_token_id=95,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    _sharpen(m, 2)
    return m


FAMILIES = {"llama": hf_llama, "llama-tied": lambda: hf_llama(tie=True), "gpt2": hf_gpt2}


def saved(family: str, folder):
    ref = FAMILIES[family]()
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(params=list(FAMILIES))
def hf_folder(request, tmp_path):
    return saved(request.param, tmp_path / "hf")


def hf_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(input_ids=ids).logits


def test_causal_logits_match_transformers(hf_folder):
    ref, folder = hf_folder
    ours = load_hf_model(folder, mask_token_id=None, attention="causal")
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours(ids, AttentionLayout.single(2, 40, causal=True))
    want = hf_logits(ref, ids)
    assert want.abs().max() > 1.0  # weights are sharp enough for the comparison to mean something
    assert (got - want).abs().max() < 1e-4


# eager flex is slow on CPU: one GQA and one MHA family cover it
@pytest.mark.parametrize("family,backend", [(f, "sdpa") for f in FAMILIES] + [("llama", "flex"), ("gpt2", "flex")])
def test_packed_documents_match_each_document_alone(family, backend, tmp_path):
    ref, folder = saved(family, tmp_path / "hf")
    ours = load_hf_model(folder, mask_token_id=None, attention="causal")
    ours.config.attn_backend = backend
    lengths = [13, 1, 20, 6]
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 96, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(ids, AttentionLayout.from_position_ids(pos, causal=True))[0]
    start = 0
    for doc in docs:
        want = hf_logits(ref, doc[None])[0]
        assert (got[start : start + len(doc)] - want).abs().max() < 1e-4
        start += len(doc)


def test_export_loads_in_transformers_with_same_logits(hf_folder, tmp_path):
    ref, folder = hf_folder
    ours = load_hf_model(folder, mask_token_id="append", attention="causal")
    cfg = ours.config
    assert cfg.mask_token_id == 96 and cfg.vocab_size == 128
    save_hf_model(ours, cfg, tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["mask_token_id"] == 96 and meta["attention"] == "causal" and meta["dlm_config"]["vocab_size"] == 128

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert type(back).__name__ == type(ref).__name__
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = ours(ids, AttentionLayout.single(2, 30, causal=True))
    assert (hf_logits(back, ids) - got).abs().max() < 1e-4
    # the original vocabulary's logits are untouched by the appended [MASK] / padding rows
    assert (got[..., :96] - hf_logits(ref, ids)).abs().max() < 1e-4

    # our own export re-imports exactly, [MASK] included, without appending a second one
    again = load_hf_model(tmp_path / "export", attention="causal")
    assert again.config.mask_token_id == 96 and again.config.vocab_size == 128
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_sharded_import_and_export(hf_folder, tmp_path):
    ref, folder = hf_folder
    whole = load_hf_model(folder, mask_token_id=None, attention="causal")
    # transformers' own sharded layout
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    ckpt = HFCheckpoint(tmp_path / "sharded")
    assert sorted(ckpt.keys()) == sorted(whole.state_dict())
    for k, v in whole.state_dict().items():
        assert torch.equal(ckpt.tensor(k), v), k

    # our sharded export, loaded back by transformers; a stale single file must not shadow it
    save_hf_model(whole, whole.config, tmp_path / "ours")
    save_hf_model(whole, whole.config, tmp_path / "ours", max_shard_size=30_000)
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, 96, (1, 25), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = whole(ids, AttentionLayout.single(1, 25, causal=True))
    assert (hf_logits(back, ids) - got).abs().max() < 1e-4


def test_unprefixed_gpt2_keys_and_clear_errors(tmp_path):
    """The original GPT-2 uploads name tensors without `transformer.`; both spellings load."""
    ref = hf_gpt2()
    ref.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "a" / "model.safetensors")
    ours = load_hf_model(tmp_path / "a", mask_token_id=None, attention="causal")
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = ours(ids, AttentionLayout.single(1, 20, causal=True))
    assert (hf_logits(ref, ids) - got).abs().max() < 1e-4

    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, tmp_path / "a" / "model.safetensors")
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.weight"):
        HFCheckpoint(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    (tmp_path / "a" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        HFCheckpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(ValueError, match="line 2"):
        HFCheckpoint(tmp_path / "a")


def test_unsupported_variants_are_refused(tmp_path):
    cfg = hf_llama().config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llama3"):
        HFCheckpoint(tmp_path)


def test_bf16_forward_close_to_fp32(tmp_path):
    ref = hf_llama()
    ref.save_pretrained(tmp_path)
    m32 = load_hf_model(tmp_path, mask_token_id=None, attention="causal")
    m16 = load_hf_model(tmp_path, mask_token_id=None, attention="causal", dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(8))
    lay = AttentionLayout.single(1, 16, causal=True)
    with torch.no_grad():
        a, b = m32(ids, lay), m16(ids, lay)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() / a.abs().max() < 5e-2
