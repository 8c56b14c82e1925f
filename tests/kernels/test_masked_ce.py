"""Fused masked cross-entropy (chunked PyTorch and Triton-interpreter paths) against plain autograd
through full fp32 logits."""

import pytest
import torch

from dlm.kernels.masked_ce import chunk_rows_for, masked_cross_entropy, naive_cross_entropy

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_inputs(n, d, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    row_weights = torch.rand(n, generator=g) * 3 + 0.5
    row_weights[::4] = 0.0
    targets[::4] = -100  # ignored rows may carry any target
    return hidden.to(dtype), weight.to(dtype), targets, row_weights


def run(impl, hidden, weight, targets, row_weights, grad_scale=1.7, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = masked_cross_entropy(h, w, targets, row_weights, impl=impl, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def oracle(hidden, weight, targets, row_weights, grad_scale=1.7):
    """Plain autograd through full fp32 logits on fp32 copies of the inputs."""
    h = hidden.detach().float().requires_grad_(True)
    w = weight.detach().float().requires_grad_(True)
    t = torch.where(row_weights != 0, targets, 0)
    loss = naive_cross_entropy(h, w, t, row_weights)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_full_logits_autograd(impl, dtype):
    # odd sizes; 37 rows in chunks of 16 (last chunk partial); V not a power of two
    inputs = make_inputs(37, 24, 3001, dtype)
    got = run(impl, *inputs, chunk_rows=16)
    want = oracle(*inputs)
    for name, a, b in zip(("loss", "dh", "dW"), got, want):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))
    assert got[1][::4].abs().max() == 0  # zero-weight rows get no gradient


def test_triton_block_loop_over_vocab():
    # V above the 4096 block: the kernel's online log-sum-exp runs over several blocks
    inputs = make_inputs(5, 8, 4096 + 77, torch.float32, seed=3)
    got = run("triton", *inputs)
    want = oracle(*inputs)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_chunking_does_not_change_result(chunk_rows):
    inputs = make_inputs(23, 16, 777, torch.float32, seed=1)
    got = run("torch", *inputs, chunk_rows=chunk_rows)
    want = oracle(*inputs)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_empty_batch_backprops_zeros(impl):
    hidden, weight, targets, row_weights = make_inputs(0, 8, 100, torch.float32)
    loss, dh, dw = run(impl, hidden, weight, targets, row_weights)
    assert loss.item() == 0.0 and dh.shape == (0, 8) and dw.shape == (100, 8)
    assert dw.abs().sum().item() == 0.0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tied_embedding_gradients_accumulate(impl):
    """The output weight is the embedding table: its gradient is embedding grad + head grad."""
    g = torch.Generator().manual_seed(5)
    V, D, N = 501, 12, 19
    table0 = torch.randn(V, D, generator=g)
    proj = torch.randn(D, D, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    row_weights = torch.rand(N, generator=g)

    def grad_of(loss_fn):
        table = table0.clone().requires_grad_(True)
        hidden = torch.tanh(table[ids] @ proj)
        loss_fn(hidden, table).backward()
        return table.grad

    fused = grad_of(lambda h, w: masked_cross_entropy(h, w, targets, row_weights, impl=impl, chunk_rows=8))
    naive = grad_of(lambda h, w: naive_cross_entropy(h, w, targets, row_weights))
    assert rel_err(fused, naive) < 1e-5


def test_frozen_weight_and_no_grad():
    hidden, weight, targets, row_weights = make_inputs(9, 8, 300, torch.float32)
    want = oracle(hidden, weight, targets, row_weights, grad_scale=1.0)
    h = hidden.clone().requires_grad_(True)
    masked_cross_entropy(h, weight, targets, row_weights, impl="torch").backward()
    assert rel_err(h.grad, want[1]) < 1e-5
    with torch.no_grad():
        loss = masked_cross_entropy(hidden, weight, targets, row_weights, impl="torch")
    assert rel_err(loss, want[0]) < 1e-6


def test_auto_is_torch_on_cpu_and_chunk_budget():
    inputs = make_inputs(6, 8, 64, torch.float32)
    a = masked_cross_entropy(*inputs)
    b = masked_cross_entropy(*inputs, impl="torch")
    assert torch.equal(a, b)
    assert chunk_rows_for(32000, torch.float32, 128 * 2**20) == 1048
    assert chunk_rows_for(32000, torch.bfloat16, 128 * 2**20) == 2097
    assert chunk_rows_for(10**9, torch.float32, 1) == 1


def test_bad_inputs_are_named(monkeypatch):
    hidden, weight, targets, row_weights = make_inputs(6, 8, 64, torch.float32)
    bad = targets.clone()
    bad[1] = 64  # row 1 has nonzero weight
    monkeypatch.setattr("dlm.debug._enabled", True)  # value checks read tensors back: debug mode only
    with pytest.raises(
        ValueError, match=r"targets of weighted rows must lie in \[0, 64\), got values \[64\] at rows \[1\]"
    ):
        masked_cross_entropy(hidden, weight, bad, row_weights)
    with pytest.raises(ValueError, match="unknown masked_cross_entropy impl"):
        masked_cross_entropy(hidden, weight, targets, row_weights, impl="cuda")
    with pytest.raises(ValueError, match="hidden dim"):
        masked_cross_entropy(hidden[:, :4], weight, targets, row_weights)
    with pytest.raises(ValueError, match="share a dtype"):
        masked_cross_entropy(hidden.double(), weight, targets, row_weights)
    with pytest.raises(ValueError, match="constants"):
        masked_cross_entropy(hidden, weight, targets, row_weights.clone().requires_grad_(True))
