"""The trainer's starting points go through the one import path (dlm.models.hf.HFCheckpoint via
dlm.train.weights.weight_source): a folder in the seed's released DiffuGPT layout
(PyTorchModelHubMixin: embed_tokens / denoise_model.* / lm_head, vocabulary resized by one) starts
a LoRA run whose first forward equals the imported model exactly."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from dlm.attention.layout import AttentionLayout
from dlm.lora import LoRAConfig, apply_lora, with_lora_init
from dlm.models import build_model, preset
from dlm.models.hf import load_hf_model, save_hf_model
from dlm.train.config import ModelSection
from dlm.train.weights import weight_source


def diffugpt_folder(tmp_path):
    """Our tiny GPT-2 re-saved as the seed's DiscreteDiffusionModel would save it."""
    cfg = preset("tiny-gpt2")
    model = build_model(cfg)
    model.init_weights(seed=4)  # type: ignore[operator]
    hf = save_hf_model(model, cfg, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    wte = tensors.pop("transformer.wte.weight")
    wte = torch.cat([wte, wte.mean(0, keepdim=True)])  # the seed resized to the tokenizer (+[MASK])
    body = {"denoise_model." + k.removeprefix("transformer."): v for k, v in tensors.items()}
    out = tmp_path / "diffugpt"
    out.mkdir()
    save_file({"embed_tokens.weight": wte, **body, "lm_head.weight": wte.clone()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((hf / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 256
    return out


def test_released_diffugpt_layout_starts_a_lora_run(tmp_path):
    folder = diffugpt_folder(tmp_path)
    source = weight_source(ModelSection(init_from=str(folder), mask_token=256), seed=0)
    assert source.config.mask_token_id == 256 and source.config.vocab_size == 257
    with torch.device("meta"):
        model = build_model(source.config)
    apply_lora(model, LoRAConfig(rank=4, extra_trainable=["embed_tokens"]))
    tensor = with_lora_init(model, source.tensor, seed=0)
    model.load_state_dict({n: tensor(n) for n in model.state_dict()}, assign=True)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 4:8] = 256
    layout = AttentionLayout.single(2, 16)
    with torch.no_grad():
        ref = load_hf_model(folder, mask_token_id=256)(ids, layout)
        assert torch.equal(model(ids, layout), ref)
