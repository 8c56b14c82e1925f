"""Model behaviour that needs no oracle: masks seen through the whole model, [MASK] resizing,
presets, meta-device construction and init, parameter / FLOP counts."""

import pytest
import torch

from dlm.attention.layout import AttentionLayout
from dlm.models import build_model, preset
from dlm.models.mask_token import add_mask_token


def tiny(name: str, seed: int = 0, **changes):
    model = build_model(preset(name).replace(**changes))
    model.init_weights(seed)
    # 0.02 init barely mixes tokens; stronger weights make attention effects unmistakable
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("name,backend", [("tiny-llama", "sdpa"), ("tiny-gpt2", "sdpa"), ("tiny-llama", "flex")])
def test_bidirectional_sees_own_document_only(name, backend):
    """Perturbing a later token changes earlier outputs of its own document (bidirectional) and
    nothing in other documents; in causal mode it changes nothing before it."""
    model = tiny(name, attn_backend=backend)
    g = torch.Generator().manual_seed(1)
    lengths = [10, 14, 8]
    ids = torch.randint(0, 256, (2, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(2, -1).clone()
    j = 10 + 9  # a late token of the second document
    perturbed = ids.clone()
    perturbed[:, j] = (ids[:, j] + 1) % 256
    for causal in (False, True):
        layout = AttentionLayout.from_position_ids(pos, causal=causal)
        with torch.no_grad():
            diff = (model(ids, layout) - model(perturbed, layout)).abs().amax(dim=-1)
        assert diff[:, :10].max() == 0 and diff[:, 24:].max() == 0  # other documents untouched
        earlier = diff[:, 10:j]
        if causal:
            assert earlier.max() == 0
        else:
            assert earlier.min() > 1e-4  # every earlier token of the document sees it
        assert diff[:, j:24].min() > 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_add_mask_token_appends_mean_row(name):
    model = tiny(name)
    cfg = model.config
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    new_sd, new_cfg = add_mask_token(sd, cfg)
    assert new_cfg.mask_token_id == 256 and new_cfg.vocab_size == 320 and new_cfg.base_vocab_size == 256
    tables = [k for k in ("tok_embeddings.weight", "output.weight") if k in sd]
    assert len(tables) == (1 if cfg.tie_embeddings else 2)
    for k in tables:
        old, new = sd[k], new_sd[k]
        assert new.shape == (320, cfg.dim)
        assert torch.equal(new[:256], old)  # bit-identical original rows
        mean = old.double().mean(0).to(old.dtype)
        assert torch.equal(new[256], mean) and torch.equal(new[319], mean)
    for k in sd:
        if k not in tables:
            assert torch.equal(new_sd[k], sd[k])
    # the resized state dict loads into a model built from the new config
    resized = build_model(new_cfg)
    resized.load_state_dict(new_sd)
    ids = torch.randint(0, 256, (1, 12))
    lay = AttentionLayout.single(1, 12)
    with torch.no_grad():
        assert torch.allclose(resized(ids, lay)[..., :256], model(ids, lay), atol=1e-5)


def test_mask_token_existing_id_and_errors():
    cfg = preset("tiny-gpt2")
    sd = build_model(cfg).state_dict()
    same_sd, new_cfg = add_mask_token(sd, cfg, mask_token_id=7)
    assert new_cfg.mask_token_id == 7 and new_cfg.vocab_size == 256
    assert all(same_sd[k] is sd[k] for k in sd)
    with pytest.raises(ValueError, match="not an existing token"):
        add_mask_token(sd, cfg, mask_token_id=256)
    with pytest.raises(ValueError, match="already has a \\[MASK\\]"):
        add_mask_token(sd, new_cfg)


def test_bf16_vocabulary_rows_stay_bit_identical():
    sd = {k: v.to(torch.bfloat16) for k, v in tiny("tiny-llama").state_dict().items()}
    new_sd, _ = add_mask_token(sd, preset("tiny-llama"))
    assert new_sd["tok_embeddings.weight"].dtype == torch.bfloat16
    assert torch.equal(new_sd["tok_embeddings.weight"][:256], sd["tok_embeddings.weight"])


# published parameter counts of the originals
@pytest.mark.parametrize(
    "name,total",
    [
        ("llama2-7b", 6_738_415_616),
        ("tinyllama-1.1b", 1_100_048_384),
        ("smollm2-135m", 134_515_008),
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
    ],
)
def test_presets_match_published_sizes(name, total):
    with torch.device("meta"):
        model = build_model(preset(name))
    assert model.num_params(non_embedding=False) == total
    cfg = model.config
    if name == "gpt2":
        assert model.num_params() == 123_653_376  # nanoGPT's "123.65M" (position table excluded)
    if name == "llama2-7b":
        assert model.num_params() == total - 32000 * 4096  # untied input table excluded
    n = model.num_params()
    assert model.flops_per_token(2048) == 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 2048


def test_unknown_preset_and_family():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")
    with pytest.raises(ValueError, match="family"):
        build_model(preset("tiny-llama").replace(family="mamba"))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_meta_build_to_empty_init_is_deterministic(name):
    with torch.device("meta"):
        model = build_model(preset(name))
    model.to_empty(device="cpu")
    model.init_weights(seed=5)
    again = build_model(preset(name))
    again.init_weights(seed=5)
    other = build_model(preset(name))
    other.init_weights(seed=6)
    for (k, a), b, c in zip(model.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), k
        if a.dim() == 2:
            assert not torch.equal(a, c), k
    assert torch.isfinite(model(torch.randint(0, 256, (1, 9)), AttentionLayout.single(1, 9))).all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_head_receives_final_hidden_and_output_weight(name):
    model = tiny(name)
    ids = torch.randint(0, 256, (2, 7))
    lay = AttentionLayout.single(2, 7)
    seen = {}

    def head(hidden, weight):
        seen["shapes"] = (hidden.shape, weight.shape)
        return hidden @ weight.T

    with torch.no_grad():
        out = model(ids, lay, head=head)
        assert torch.equal(out, model(ids, lay))
    assert seen["shapes"] == (torch.Size([2, 7, 64]), torch.Size([256, 64]))
    assert model.output_weight() is (
        model.tok_embeddings.weight if model.config.tie_embeddings else model.output.weight
    )


def test_bf16_model_computes_in_bf16():
    model = tiny("tiny-llama").to(torch.bfloat16)
    out = model(torch.randint(0, 256, (1, 9)), AttentionLayout.single(1, 9))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_gpt2_refuses_sequences_beyond_its_position_table():
    model = build_model(preset("tiny-gpt2").replace(max_seq_len=8))
    with pytest.raises(ValueError, match="learned positions"):
        model(torch.zeros(1, 9, dtype=torch.long), AttentionLayout.single(1, 9))
