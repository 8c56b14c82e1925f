"""LoRA: zero-initialised B leaves the base model unchanged, only adapters (and named extras)
train, merging equals the adapted forward, and the merged export loads in transformers."""

from __future__ import annotations

import pytest
import torch

from dlm.attention.layout import AttentionLayout
from dlm.lora import LoRAConfig, LoRALinear, apply_lora, lora_init, merge_lora
from dlm.models import build_model, preset
from dlm.models.hf import load_hf_model, save_hf_model

FAMILIES = ["tiny-llama", "tiny-gpt2"]


def base_model(name: str) -> torch.nn.Module:
    model = build_model(preset(name))
    model.init_weights(seed=1)  # type: ignore[operator]
    return model


def ids_layout(B: int = 2, L: int = 12, causal: bool = False):
    ids = torch.randint(3, 200, (B, L), generator=torch.Generator().manual_seed(0))
    return ids, AttentionLayout.single(B, L, causal=causal)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_b_gives_the_base_outputs_exactly(name):
    model = base_model(name)
    ids, layout = ids_layout()
    with torch.no_grad():
        ref = model(ids, layout)
        trainable = apply_lora(model, LoRAConfig(rank=4, alpha=8))
        out = model(ids, layout)
    assert torch.equal(out, ref)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 2 * (7 if name == "tiny-llama" else 4)
    assert all(m.lora_B.abs().sum() == 0 and m.lora_A.abs().sum() > 0 for m in lora)
    assert trainable and all(".lora_" in n for n in trainable)


def test_only_adapters_and_extras_get_gradients():
    model = base_model("tiny-llama")
    names = apply_lora(model, LoRAConfig(rank=2, targets=["q_proj", "v_proj"], extra_trainable=["embed_tokens"]))
    assert sorted(n for n in names if "lora" not in n) == ["tok_embeddings.weight"]
    assert {n.split(".")[-2] for n in names if "lora" in n} == {"wq", "wv"}
    ids, layout = ids_layout()
    model(ids, layout).square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
    # B = 0: the first gradient reaches B only (A's gradient is B^T times something)
    assert model.layers[0].attention.wq.lora_B.grad.abs().sum() > 0
    assert model.layers[0].attention.wq.lora_A.grad.abs().sum() == 0


def test_target_errors():
    with pytest.raises(ValueError, match=r"no linear layer named \['nope'\]"):
        apply_lora(base_model("tiny-llama"), LoRAConfig(rank=2, targets=["wq", "nope"]))
    with pytest.raises(ValueError, match="no module 'embeddings'"):
        apply_lora(base_model("tiny-llama"), LoRAConfig(rank=2, extra_trainable=["embeddings"]))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=-1)


def test_init_is_keyed_by_name_and_seed():
    a = lora_init("layers.0.attention.wq.lora_A", (4, 64), seed=0)
    assert torch.equal(a, lora_init("layers.0.attention.wq.lora_A", (4, 64), seed=0))
    assert not torch.equal(a, lora_init("layers.1.attention.wq.lora_A", (4, 64), seed=0))
    assert not torch.equal(a, lora_init("layers.0.attention.wq.lora_A", (4, 64), seed=1))
    assert lora_init("layers.0.attention.wq.lora_B", (64, 4), seed=0).abs().sum() == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_export_equals_adapter_forward_and_loads_in_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = base_model(name)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, extra_trainable=["embed_tokens"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    ids, layout = ids_layout(causal=True)
    with torch.no_grad():
        adapted = model(ids, layout)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert (merged(ids, layout) - adapted).abs().max() < 1e-5
        folder = save_hf_model(merged, merged.config, tmp_path / "merged")
        ours = load_hf_model(folder, mask_token_id=None, attention="causal")(ids, layout)
        assert (ours - adapted).abs().max() < 1e-5
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        theirs = hf(input_ids=ids).logits
    assert (theirs - adapted).abs().max() < 1e-4
