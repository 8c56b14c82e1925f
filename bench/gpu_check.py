"""One-call GPU check: correctness of every fast path on the device, then speed.

    python bench/gpu_check.py              # one CUDA GPU, < 6 minutes on an H200
    python bench/gpu_check.py --dry-run    # the same code at tiny sizes on CPU (part of the tests)

(a) kernels against references on the device, fp32 and bf16: fused masked CE (Triton and chunked
    PyTorch) vs full-logits autograd; Triton Philox masking bit-exact against the CPU reference;
    every attention backend (forward and gradients) vs the dense SDPA reference.
(b) masked CE forward+backward time against its roofline (6HV FLOPs + 4V bytes per row at an
    H200's measured bf16 matmul rate and copy bandwidth) and against naive F.cross_entropy on full
    logits, with peak memory.
(c) attention backends on packed 2k-token rows, head dim 64 and 128: forward+backward TFLOP/s.
(d) a training step of a ~1B LLaMA-shaped model (seq 2048, bf16 weights, AdamW), compile off
    and on: tokens/s and MFU of the real path (fused CE + best document-mask backend) against the
    same model with a dense attention mask and a full-logits loss.

Uses only torch + triton (nothing installed). Prints a table last; with $OUT set (or --json) the
details go to $OUT/gpu_check.json. Exit status 1 when a correctness check fails or a section
crashes; speed numbers are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors; before `import triton`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from dlm.atomic import atomic_write_text
from dlm.attention import BACKENDS, AnnealMask, AttentionLayout, attend
from dlm.attention import _module as attention_module
from dlm.attention.dense import sdpa_attention
from dlm.kernels.masked_ce import masked_cross_entropy, naive_cross_entropy
from dlm.kernels.masking import mask_tokens, mask_tokens_reference

H200_FLOPS = 790e12  # bf16 dense matmul, as measured on an H200
H200_BYTES = 4.3e12  # copy bandwidth, bytes/s
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ATTN_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@dataclass
class Sizes:
    ce_check: tuple[int, int, int]  # rows, hidden, vocab for correctness
    ce_bench: tuple[int, int, int]  # rows, hidden, vocab for speed
    mask: tuple[int, int]  # rows, length
    attn_check: tuple[int, int, int, int, int]  # B, H, Hkv, L, head_dim
    attn_bench: tuple[int, int, int]  # B, L, model dim
    model: str
    train_batch: tuple[int, int]  # B, L
    warmup: int
    iters: int


FULL = Sizes(
    (1000, 512, 32064),
    (16384, 2048, 32064),
    (64, 2048),
    (2, 8, 2, 512, 64),
    (8, 2048, 2048),
    "tinyllama-1.1b",
    (4, 2048),
    2,
    5,
)
DRY = Sizes((37, 32, 1031), (64, 32, 512), (3, 100), (2, 4, 2, 48, 16), (2, 64, 128), "tiny-llama", (2, 64), 1, 1)


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.details: dict[str, object] = {}
        self.failed = False

    def add(self, section: str, name: str, result: str, status: str = "ok", **details) -> None:
        self.rows.append((section, name, result, status))
        self.details[f"{section}/{name}"] = {"result": result, "status": status, **details}
        self.failed |= status == "FAIL"
        print(f"[{section}] {name}: {result} [{status}]", flush=True)

    def check(self, section: str, name: str, err: float, tol: float, **details) -> None:
        self.add(
            section, name, f"rel err {err:.2e} (tol {tol:.0e})", "ok" if err <= tol else "FAIL", rel_err=err, **details
        )

    def table(self) -> str:
        widths = [max(len(r[i]) for r in self.rows + [("section", "check", "result", "status")]) for i in range(4)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(("section", "check", "result", "status"), widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in self.rows]
        return "\n".join(lines)


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        raise RuntimeError("a gradient to compare is missing")
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def leaf(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fresh leaf copy that collects its own gradient."""
    return x.detach().to(device, dtype, copy=True).requires_grad_(True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak allocated bytes above what was live before fn() (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f} MiB"


def packed_positions(B: int, L: int, mean_doc: int, gen: torch.Generator) -> torch.Tensor:
    """[B, L] position ids of rows packed with documents of random lengths (>= 1)."""
    pos = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        i = 0
        while i < L:
            n = max(1, int(torch.empty(1).exponential_(1.0 / mean_doc, generator=gen).item()))
            n = min(n, L - i)
            pos[b, i : i + n] = torch.arange(n)
            i += n
    return pos


# ---------------------------------------------------------------------------------------- (a)
def check_masked_ce(rep: Report, device: torch.device, sizes: Sizes) -> None:
    n, d, v = sizes.ce_check
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    row_w = torch.rand(n, generator=g) * 4
    row_w[::3] = 0
    h32, w32 = leaf(hidden, device, torch.float32), leaf(weight, device, torch.float32)
    tg, rw = targets.to(device), row_w.to(device)
    ref_loss = naive_cross_entropy(h32, w32, tg, rw)
    ref_loss.backward()
    ref = (ref_loss.detach(), h32.grad, w32.grad)
    impls = ["triton", "torch"]
    for dtype in (torch.float32, torch.bfloat16):
        for impl in impls:
            h, w = leaf(hidden, device, dtype), leaf(weight, device, dtype)
            loss = masked_cross_entropy(h, w, tg, rw, impl=impl, chunk_rows=max(1, n // 3 + 1))
            loss.backward()
            err = max(rel_err(a, b) for a, b in zip((loss.detach(), h.grad, w.grad), ref))
            rep.check("a", f"masked CE {impl} {str(dtype)[6:]}", err, TOL[dtype])


def check_masking(rep: Report, device: torch.device, sizes: Sizes) -> None:
    B, L = sizes.mask
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (B, L), generator=g)
    maskable = torch.rand(B, L, generator=g) < 0.9
    t = torch.rand(B, generator=g).clamp_min(1e-3)
    t[0], t[-1] = 1.0, 1e-3  # everything / almost nothing masked
    sample_ids = torch.randint(0, 2**40, (B,), generator=g)  # large offsets: 64-bit Philox counters
    seed = 0x1234_5678_9ABC
    ref = mask_tokens_reference(ids, maskable, t, sample_ids, seed, 32000)
    got = mask_tokens(
        ids.to(device), maskable.to(device), t.to(device), sample_ids.to(device), seed, 32000, impl="triton"
    )
    same = all(torch.equal(a.cpu(), b) for a, b in zip(got, ref))
    frac = float(ref[1].float().mean())
    rep.add(
        "a",
        "masking Philox bit-exact",
        f"{'identical' if same else 'DIFFERENT'} ({B}x{L}, {frac:.2f} masked)",
        "ok" if same else "FAIL",
    )


def _attn_inputs(sizes: Sizes, dtype, device, seed=0):
    B, H, Hkv, L, D = sizes.attn_check
    g = torch.Generator().manual_seed(seed)
    return [leaf(torch.randn(B, h, L, D, generator=g), device, dtype) for h in (H, Hkv, Hkv)]


def check_attention(rep: Report, device: torch.device, sizes: Sizes) -> None:
    B, _, _, L, _ = sizes.attn_check
    g = torch.Generator().manual_seed(2)
    pos = packed_positions(B, L, max(4, L // 5), g).to(device)
    flat = AttentionLayout.from_position_ids(pos)
    starts = flat.cu_seqlens.tolist()
    padded_cu = torch.tensor(
        [starts[0], *starts[1:2], starts[1], *starts[2:], starts[-1]], dtype=torch.int32, device=device
    )
    layouts = {
        "docs": flat,
        "docs causal": AttentionLayout.from_position_ids(pos, causal=True),
        "docs, padded cu_seqlens": AttentionLayout.from_position_ids(pos, cu_seqlens=padded_cu),
        "anneal": AttentionLayout.from_position_ids(pos, anneal=AnnealMask(seed=3, step=5, p=0.4)),
    }
    for name in BACKENDS:
        mod = attention_module(name)
        reason = mod.available(device)
        if reason is not None:
            rep.add("a", f"attention {name}", f"unavailable: {reason}", "skip")
            continue
        for dtype in (torch.float32, torch.bfloat16):
            if name in ("flash", "varlen") and dtype == torch.float32:
                continue  # half-precision kernels only
            # fp32 on one layout only: every new mask kind or dtype is a fresh compile for flex
            checked = layouts if dtype == torch.bfloat16 else {"docs": layouts["docs"]}
            worst, cases, missing = 0.0, [], None
            for lname, layout in checked.items():
                if layout.needs_dense_mask and not mod.ARBITRARY_MASK:
                    continue
                q, k, v = _attn_inputs(sizes, dtype, device)
                try:
                    out = attend(q, k, v, layout, backend=name)
                    grad = torch.randn_like(out)
                    out.backward(grad)
                except NotImplementedError as e:  # e.g. FlexAttention has no CPU backward
                    missing = str(e)
                    break
                rq, rk, rv = (leaf(x, device, torch.float32) for x in (q, k, v))
                ref = sdpa_attention(rq, rk, rv, layout)
                ref.backward(grad.float())
                err = max(
                    rel_err(a, b) for a, b in ((out, ref), (q.grad, rq.grad), (k.grad, rk.grad), (v.grad, rv.grad))
                )
                worst = max(worst, err)
                cases.append(lname)
            if missing:
                rep.add("a", f"attention {name} {str(dtype)[6:]}", f"no backward here: {missing[:120]}", "skip")
            else:
                rep.check("a", f"attention {name} {str(dtype)[6:]} fwd+bwd", worst, ATTN_TOL[dtype], layouts=cases)


# ---------------------------------------------------------------------------------------- (b)
def bench_masked_ce(rep: Report, device: torch.device, sizes: Sizes) -> None:
    n, d, v = sizes.ce_bench
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(4)
    h = leaf(torch.randn(n, d, generator=g), device, dtype)
    w = leaf(torch.randn(v, d, generator=g) / d**0.5, device, dtype)
    tg = torch.randint(0, v, (n,), generator=g).to(device)
    rw = (1.0 / torch.rand(n, generator=g).clamp_min(1e-3)).to(device)

    def naive():
        logits = h @ w.t()
        (rw * F.cross_entropy(logits.float(), tg, reduction="none")).sum().backward()

    def fused(impl):
        return lambda: masked_cross_entropy(h, w, tg, rw, impl=impl).backward()

    roofline = n * (6 * d * v / H200_FLOPS + 4 * v / H200_BYTES)
    variants = {"naive full logits": naive, "fused auto": fused("auto")}
    if device.type == "cuda":
        variants["fused torch rows"] = fused("torch")
    res = {}
    for name, fn in variants.items():
        h.grad = w.grad = None
        mem = peak_extra_bytes(fn, device)
        h.grad = w.grad = None

        def run(fn=fn):
            fn()
            h.grad = w.grad = None

        sec = timed(run, device, sizes.warmup, sizes.iters)
        res[name] = (sec, mem)
    base_t, base_m = res["naive full logits"]
    for name, (sec, mem) in res.items():
        ratio = f", {sec / base_t:.2f}x naive time" + (f", {mem / base_m:.2f}x naive mem" if mem and base_m else "")
        rep.add(
            "b",
            f"CE {name} N={n} H={d} V={v}",
            f"{sec * 1e3:.1f} ms (roofline {roofline * 1e3:.1f} ms, {roofline / sec:.0%}), peak {mib(mem)}{ratio}",
            seconds=sec,
            peak_bytes=mem,
            roofline_s=roofline,
        )


# ---------------------------------------------------------------------------------------- (c)
def bench_attention(rep: Report, device: torch.device, sizes: Sizes) -> None:
    B, L, dim = sizes.attn_bench
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(5)
    pos = packed_positions(B, L, max(8, L // 4), g).to(device)
    layout = AttentionLayout.from_position_ids(pos)
    seg = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).double()
    for hd in (64, 128):
        H = dim // hd
        flops = 3.5 * 4 * float((seg**2).sum()) * hd * H  # fwd 4 n^2 d per head; bwd 2.5x fwd (FA2 convention)
        for name in BACKENDS:
            mod = attention_module(name)
            reason = mod.available(device)
            if reason is not None:
                rep.add("c", f"attn {name} hd={hd}", f"unavailable: {reason}", "skip")
                continue
            if name in ("flash", "varlen") and dtype != torch.bfloat16:
                continue
            q, k, v = (torch.randn(B, H, L, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(B, H, L, hd, device=device, dtype=dtype)
            try:
                attend(q, k, v, layout, backend=name).backward(grad)
            except NotImplementedError as e:
                rep.add("c", f"attn {name} hd={hd}", f"no backward here: {str(e)[:120]}", "skip")
                continue

            def run(q=q, k=k, v=v, layout=layout, name=name, grad=grad):
                attend(q, k, v, layout, backend=name).backward(grad)

            sec = timed(run, device, sizes.warmup, sizes.iters)
            rep.add(
                "c",
                f"attn {name} hd={hd} B={B} L={L}",
                f"{sec * 1e3:.2f} ms, {flops / sec / 1e12:.1f} TFLOP/s",
                seconds=sec,
                tflops=flops / sec / 1e12,
                mean_doc=float(seg[seg > 0].mean()),
            )


# ---------------------------------------------------------------------------------------- (d)
def bench_training(rep: Report, device: torch.device, sizes: Sizes, compile_modes: list[bool], deadline: float) -> None:
    from dlm.diffusion import DiffusionConfig
    from dlm.models import preset
    from dlm.models.mask_token import padded_vocab
    from dlm.train.metrics import peak_flops

    base = preset(sizes.model)
    vocab = padded_vocab(base.vocab_size + 1)  # with an appended [MASK], as add_mask_token pads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, L = sizes.train_batch
    dcfg = DiffusionConfig(mask_token_id=base.vocab_size)
    g = torch.Generator().manual_seed(6)
    batch = {
        "input_ids": torch.randint(0, base.vocab_size, (B, L), generator=g).to(device),
        "position_ids": packed_positions(B, L, max(8, L // 3), g).to(device),
        "sample_ids": torch.arange(B).to(device),
    }
    peak = peak_flops(device, 0.0)
    configs = [(fused, comp) for comp in compile_modes for fused in (True, False)]
    for fused, comp in configs:
        label = f"{'fused CE + doc-mask attn' if fused else 'baseline dense mask + full logits'}, compile {'on' if comp else 'off'}"
        if time.monotonic() > deadline - (90 if comp else 20):
            rep.add("d", label, "skipped: out of time budget", "skip")
            continue
        try:
            _train_config(rep, label, device, sizes, base, vocab, dtype, batch, dcfg, fused, comp, peak)
        except Exception as e:  # report and continue with the next configuration
            rep.add(
                "d", label, f"crashed: {type(e).__name__}: {str(e)[:200]}", "FAIL", traceback=traceback.format_exc()
            )
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _train_config(rep, label, device, sizes, base, vocab, dtype, batch, dcfg, fused, comp, peak) -> None:
    from dlm.diffusion import diffusion_loss, noise_batch
    from dlm.models import build_model
    from dlm.train.parallelize import apply_compile

    cfg = base.replace(
        vocab_size=vocab,
        mask_token_id=base.vocab_size,
        base_vocab_size=base.vocab_size,
        attn_backend="auto" if fused else "sdpa",
    )
    with torch.device(device):
        model = build_model(cfg)
    model.to(dtype)
    model.init_weights(seed=0)
    if comp:
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    B, L = sizes.train_batch
    state = {"step": 0}

    def step():
        noised = noise_batch(batch, state["step"], dcfg, B)
        normalizer = noised.norm_count
        if fused:
            loss = diffusion_loss(model, noised, normalizer).loss
        else:
            logits = model(noised.noisy_ids, noised.layout())
            ce = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, vocab), noised.targets[:, 1:].reshape(-1), reduction="none"
            )
            loss = (ce * noised.weights[:, 1:].reshape(-1)).sum() / normalizer.clamp_min(1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        return loss.detach()

    t0 = time.perf_counter()
    first = float(step())
    if not math.isfinite(first):
        raise RuntimeError(f"first loss is {first}")
    sync(device)
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = timed(step, device, sizes.warmup + (2 if comp else 0), sizes.iters)
    tok_s = B * L / sec
    flops = model.flops_per_token(L) * tok_s
    mfu = f"{flops / peak:.1%}" if peak else "n/a"
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    backend = "fused" if fused else "sdpa"
    rep.add(
        "d",
        label,
        f"{tok_s:,.0f} tok/s, MFU {mfu}, peak {mib(mem)}, first step {first_s:.1f}s",
        tokens_per_s=tok_s,
        mfu=(flops / peak if peak else None),
        step_s=sec,
        first_step_s=first_s,
        peak_bytes=mem,
        params=model.num_params(non_embedding=False),
        backend=backend,
        batch=[B, L],
        first_loss=first,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (Triton through its interpreter)")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off", "both"],
        default="auto",
        help="training-step compile modes; auto = both on CUDA, off in a dry run",
    )
    p.add_argument("--budget-s", type=float, default=300.0, help="skip late sections beyond this many seconds")
    p.add_argument("--json", type=Path, help="details file (default $OUT/gpu_check.json when OUT is set)")
    p.add_argument("--sections", default="abcd", help="subset of sections to run, e.g. 'ab'")
    args = p.parse_args(argv)
    start = time.monotonic()
    if args.dry_run:
        device, sizes = torch.device("cpu"), DRY
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
            return 2
        device, sizes = torch.device("cuda"), FULL
    modes = {"on": [True], "off": [False], "both": [False, True], "auto": [False] if args.dry_run else [False, True]}[
        args.compile
    ]
    rep = Report()
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dry_run": args.dry_run,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(f"gpu_check: {env}", flush=True)
    sections = {
        "a": [check_masked_ce, check_masking, check_attention],
        "b": [bench_masked_ce],
        "c": [bench_attention],
        "d": [lambda r, d, s: bench_training(r, d, s, modes, start + args.budget_s)],
    }
    for key in args.sections:
        for part in sections[key]:  # one crash is reported and the rest still runs
            try:
                part(rep, device, sizes)
            except Exception as e:
                name = getattr(part, "__name__", "part")
                rep.add(
                    key, name, f"crashed: {type(e).__name__}: {str(e)[:200]}", "FAIL", traceback=traceback.format_exc()
                )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    env["wall_s"] = time.monotonic() - start
    out = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out, json.dumps({"env": env, "checks": rep.details, "failed": rep.failed}, indent=1, default=str)
        )
    print(
        f"\ngpu_check {'FAILED' if rep.failed else 'passed'} in {env['wall_s']:.0f}s "
        f"({env['device']}, torch {env['torch']}, triton {env['triton']})"
    )
    print(rep.table())
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
