"""Both model families meet the `DiffusionLM` contract the trainer, sampler and evaluators rely on."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from dlm.attention.layout import AttentionLayout
from dlm.models import build_model, preset
from dlm.models.protocol import DiffusionLM


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_families_meet_the_contract(name):
    cfg = preset(name)
    model = build_model(cfg)
    model.init_weights(seed=0)
    assert isinstance(model, DiffusionLM) and isinstance(model.layers, nn.ModuleList)
    assert len(model.layers) == cfg.n_layers and model.config is cfg
    params = inspect.signature(model.forward).parameters
    assert list(params)[:4] == ["input_ids", "layout", "head", "cache"]
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    layout = AttentionLayout.single(2, 8)
    seen = model(ids, layout, head=lambda h, w: (h.shape, w.shape))
    assert seen == (torch.Size([2, 8, cfg.dim]), model.output_weight().shape)
    assert model(ids, layout).shape == (2, 8, cfg.vocab_size)
    assert model.flops_per_token(8) > 6 * model.num_params(non_embedding=True)


def test_a_module_missing_a_member_is_not_a_diffusion_lm():
    class NoFlops(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList()
            self.config = preset("tiny-llama")

        def forward(self, input_ids, layout, head=None, cache=None): ...

        def output_weight(self): ...

        def init_weights(self, seed=None): ...

        def num_params(self, non_embedding=True): ...

    assert not isinstance(NoFlops(), DiffusionLM)
