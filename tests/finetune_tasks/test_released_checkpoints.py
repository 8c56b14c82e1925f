"""The seed's released checkpoints as starting points: DiffuLLaMA (a LlamaForCausalLM folder, [MASK]
= existing id 811) and DiffuGPT (PyTorchModelHubMixin layout: embed_tokens / denoise_model.* /
lm_head, vocabulary resized to the tokenizer). Tiny checkpoints are written in both layouts and our
bidirectional logits are compared with the original modules built from the same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dlm.attention.layout import AttentionLayout
from dlm.models.hf import load_hf_model

transformers = pytest.importorskip("transformers")

SEED_LLAMA_MASK = 811


def _sharpen(model: torch.nn.Module, seed: int) -> None:
    """Larger random weights than HF's 0.02 init, so a wrong mapping cannot hide in the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _bidirectional(b: int, n: int) -> torch.Tensor:
    """A 4D all-true mask: transformers then applies no causal mask (the seed's non-causal attention)."""
    return torch.ones(b, 1, n, n, dtype=torch.bool)


def _ours(folder, mask_id: int, ids: torch.Tensor):
    model = load_hf_model(folder, mask_token_id=mask_id, attention="bidirectional").eval()
    with torch.no_grad():
        return model, model(ids, AttentionLayout.single(ids.shape[0], ids.shape[1], causal=False))


def test_diffullama_folder_imports_with_mask_811(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=832,  # large enough to hold the seed's [MASK] id 811
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=112,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    _sharpen(ref, 1)
    ref.save_pretrained(tmp_path / "diffullama")
    ids = torch.randint(0, 832, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 10:14] = SEED_LLAMA_MASK  # noisy input as the seed feeds it
    model, got = _ours(tmp_path / "diffullama", SEED_LLAMA_MASK, ids)
    assert model.config.mask_token_id == SEED_LLAMA_MASK and model.config.vocab_size == 832  # nothing resized
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=_bidirectional(*ids.shape)).logits
        causal = ref(input_ids=ids).logits
    assert (want - causal).abs().max() > 1e-2  # the comparison does see the attention direction
    assert (got - want).abs().max() < 1e-4


def _gpt2(vocab: int):
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=95,
        eos_token_id=95,
        attn_implementation="eager",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    lm.resize_token_embeddings(vocab + 1)  # the seed's MaskTokenWrapper: vocabulary = tokenizer length
    _sharpen(lm, 2)
    return cfg, lm


def _diffugpt_folder(folder, cfg, lm, nested: bool, tie: bool = True):
    """What DiscreteDiffusionModel.save_pretrained (PyTorchModelHubMixin) writes."""
    body = {f"denoise_model.{k}": v.clone() for k, v in lm.transformer.state_dict().items() if not k.startswith("wte.")}
    head = lm.lm_head.weight.detach().clone()
    if not tie:
        head = head + 1.0
    tensors = {"embed_tokens.weight": lm.transformer.wte.weight.detach().clone(), **body, "lm_head.weight": head}
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = cfg.to_dict()  # the base GPT-2 config: vocab_size still the original
    (folder / "config.json").write_text(json.dumps({"config": config} if nested else config))
    return folder


@pytest.mark.parametrize("nested", [False, True])
def test_diffugpt_mixin_layout_imports_with_same_logits(tmp_path, nested):
    cfg, lm = _gpt2(96)
    folder = _diffugpt_folder(tmp_path / "diffugpt", cfg, lm, nested)
    mask = 96  # DiffuGPT-M: the appended [MASK] (DiffuGPT-S reuses the existing 10541)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    ids[:, 5:9] = mask
    model, got = _ours(folder, mask, ids)
    assert model.config.vocab_size == 97 and model.config.mask_token_id == mask

    # the seed's forward: embed_tokens -> denoise_model(inputs_embeds, non-causal) -> lm_head
    denoise = transformers.GPT2Model(cfg).eval()
    state = {k.removeprefix("denoise_model."): v for k, v in _load(folder).items() if k.startswith("denoise_model.")}
    missing, unexpected = denoise.load_state_dict(state, strict=False)
    assert set(missing) == {"wte.weight"} and not unexpected
    tensors = _load(folder)
    with torch.no_grad():
        x = torch.nn.functional.embedding(ids, tensors["embed_tokens.weight"])
        h = denoise(inputs_embeds=x, attention_mask=_bidirectional(*ids.shape)).last_hidden_state
        want = h @ tensors["lm_head.weight"].t()
    assert want.abs().max() > 1.0
    assert (got - want).abs().max() < 1e-4


def _load(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_diffugpt_errors_are_clear(tmp_path):
    cfg, lm = _gpt2(96)
    untied = _diffugpt_folder(tmp_path / "untied", cfg, lm, nested=False, tie=False)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_hf_model(untied, mask_token_id=96)
    bare = _diffugpt_folder(tmp_path / "bare", cfg, lm, nested=False)
    (bare / "config.json").write_text(json.dumps({"tokenizer": "gpt2"}))
    with pytest.raises(ValueError, match="model_type None is not supported"):
        load_hf_model(bare, mask_token_id=96)
