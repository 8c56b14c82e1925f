"""flash-attn / PyTorch varlen backends: packing, GQA and causal handling against the dense SDPA
reference (a per-document SDPA stands in for the CUDA kernels), and backend selection errors."""

import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import dlm.attention as attn
from dlm.attention import flash, varlen
from dlm.attention.dense import sdpa_attention
from dlm.attention.layout import AnnealMask, AttentionLayout


def reference_varlen(q, k, v, cu, max_seqlen, causal):
    """Per-document SDPA over packed [T, H, D] tensors: what the varlen kernels compute."""
    assert q.dim() == 3 and cu.dtype == torch.int32
    out = torch.zeros_like(q)
    bounds = cu.tolist()
    assert max(b - a for a, b in zip(bounds[:-1], bounds[1:])) <= max_seqlen
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=ks.shape[1] != qs.shape[1])
            out[a:b] = o[0].transpose(0, 1)
    return out


def packed_layout(B=2, L=13, causal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        p = 0
        for i in range(L):
            if i and torch.rand((), generator=g) < 0.2:
                p = 0
            pos[b, i] = p
            p += 1
    return AttentionLayout.from_position_ids(pos, causal=causal)


def qkv(B, H, Hkv, L, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g).to(dtype) for h in (H, Hkv, Hkv)]


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 3, 5, 4)
    p = varlen.pack(x)
    assert p.shape == (10, 3, 4)
    assert torch.equal(p[5 + 2], x[1, :, 2])  # token 2 of row 1
    assert torch.equal(varlen.unpack(p, 2, 5), x)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_run_packed_matches_dense(causal, heads):
    H, Hkv = heads
    layout = packed_layout(causal=causal)
    q, k, v = qkv(2, H, Hkv, 13, 8)
    got = varlen.run_packed(reference_varlen, q, k, v, layout, "test")
    want = sdpa_attention(q, k, v, layout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_max_seqlen_is_a_power_of_two_bound():
    seen = []

    def spy(q, k, v, cu, max_seqlen, causal):
        seen.append(max_seqlen)
        return reference_varlen(q, k, v, cu, max_seqlen, causal)

    for L, docs in ((13, [5, 8]), (16, [16]), (40, [3, 37])):
        pos = torch.cat([torch.arange(n) for n in docs])[None]
        q, k, v = qkv(1, 2, 2, L, 4)
        varlen.run_packed(spy, q, k, v, AttentionLayout.from_position_ids(pos), "test")
    assert seen == [8, 16, 40]  # next power of two above the longest document, capped at L


def test_zero_length_segments_are_harmless():
    # cu_seqlens padded by repeating boundaries, as the data loader's per-row cu_seqlens are
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    base = AttentionLayout.from_position_ids(pos)
    cu = torch.tensor([0, 3, 3, 5, 8, 8, 8], dtype=torch.int32)
    layout = AttentionLayout.from_position_ids(pos, cu_seqlens=cu)
    q, k, v = qkv(1, 2, 2, 8, 4)
    got = varlen.run_packed(reference_varlen, q, k, v, layout, "test")
    torch.testing.assert_close(got, sdpa_attention(q, k, v, base), rtol=1e-5, atol=1e-5)


def _fake_varlen_new(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    assert tuple(window_size) in ((-1, -1), (-1, 0))
    assert enable_gqa == (key.shape[1] != query.shape[1])
    return reference_varlen(query, key, value, cu_seq_q, max_q, causal=tuple(window_size) == (-1, 0))


def _fake_varlen_old(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None
):
    assert key.shape[1] == query.shape[1], "old varlen_attn has no GQA: heads must be expanded"
    return reference_varlen(query, key, value, cu_seq_q, max_q, causal=is_causal)


@pytest.mark.parametrize("fake", [_fake_varlen_new, _fake_varlen_old])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_varlen_adapter(monkeypatch, fake, causal):
    monkeypatch.setattr(varlen, "_TORCH_VARLEN", varlen.adapt(fake))
    layout = packed_layout(causal=causal, seed=2)
    q, k, v = qkv(2, 4, 2, 13, 8, dtype=torch.bfloat16)
    got = varlen.attention(q, k, v, layout)
    want = sdpa_attention(*(x.float() for x in (q, k, v)), layout)
    assert float((got.float() - want).norm() / want.norm()) < 1e-2


def test_installed_torch_varlen_signature_is_understood():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip("this torch has no varlen_attn")
    params = inspect.signature(varlen_attn).parameters
    assert "window_size" in params or "is_causal" in params
    assert varlen._TORCH_VARLEN is not None
    with pytest.raises(RuntimeError, match="unrecognised varlen_attn signature"):
        varlen.adapt(lambda q, k, v, cu_q, cu_k, max_q, max_k: q)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_adapter(monkeypatch, causal):
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(causal)
        assert torch.equal(cu_q, cu_k) and dropout_p == 0.0
        return reference_varlen(q, k, v, cu_q, max_q, causal)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    layout = packed_layout(causal=causal, seed=4)
    q, k, v = qkv(2, 4, 1, 13, 8, dtype=torch.bfloat16)
    got = flash.attention(q, k, v, layout)
    want = sdpa_attention(*(x.float() for x in (q, k, v)), layout)
    assert calls == [causal]
    assert float((got.float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("module", [flash, varlen])
def test_refuses_what_kernels_cannot_do(module):
    q, k, v = qkv(2, 4, 2, 13, 8)
    with pytest.raises(TypeError, match="fp16/bf16"):
        module.attention(q, k, v, packed_layout())
    anneal = AttentionLayout.from_position_ids(packed_layout().position_ids, anneal=AnnealMask(0, 3, 0.5))
    with pytest.raises(ValueError, match="annealing"):
        varlen.run_packed(reference_varlen, q, k, v, anneal, "test")


@pytest.mark.parametrize("name", ["flash", "varlen"])
def test_unavailable_on_cpu(name):
    attn.resolve_backend.cache_clear()
    reason = attn._module(name).available(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    with pytest.raises(attn.BackendUnavailable, match=f"{name!r} cannot be used on cpu: .*CUDA"):
        attn.resolve_backend(name, "cpu", False)
    q, k, v = qkv(1, 2, 2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(attn.BackendUnavailable):
        attn.attend(q, k, v, AttentionLayout.single(1, 4), backend=name)


@pytest.mark.parametrize("name", ["flash", "varlen"])
def test_annealing_mask_is_refused(monkeypatch, name, caplog):
    mod = attn._module(name)
    monkeypatch.setattr(mod, "available", lambda device: None)  # pretend the kernel is present
    attn.resolve_backend.cache_clear()
    try:
        with pytest.raises(attn.BackendUnavailable, match="annealing"):
            attn.resolve_backend(name, "cuda", True)
        with caplog.at_level("INFO", logger="dlm.attention"):
            assert attn.resolve_backend(name, "cuda", False) == name
        assert f"attention backend: {name}" in caplog.text
    finally:
        attn.resolve_backend.cache_clear()


def test_auto_on_cpu_logs_choice(caplog):
    attn.resolve_backend.cache_clear()
    with caplog.at_level("INFO", logger="dlm.attention"):
        assert attn.resolve_backend("auto", "cpu", True) == "sdpa"
    assert "attention backend: sdpa (auto" in caplog.text
    attn.resolve_backend.cache_clear()


def test_auto_passes_over_half_precision_kernels_for_fp32(monkeypatch):
    """fp32 on CUDA (e.g. `generate.py --dtype fp32`, the default) must not resolve to a kernel
    that only takes fp16/bf16; found on an H200, where auto picked varlen and then refused fp32."""
    for name in attn.BACKENDS:
        monkeypatch.setattr(attn._module(name), "available", lambda device: None)
    attn.resolve_backend.cache_clear()
    try:
        assert attn.resolve_backend("auto", "cuda", False, half=True) == "flash"
        assert attn.resolve_backend("auto", "cuda", False, half=False) == "flex"
        with pytest.raises(attn.BackendUnavailable, match="'varlen' cannot be used on cuda: it needs fp16/bf16"):
            attn.resolve_backend("varlen", "cuda", False, half=False)
    finally:
        attn.resolve_backend.cache_clear()
