"""One dlm training step against a seed-style step: same shape, batch, dtype and threads (issue 14).

    python bench/train_step.py                    # CPU: SmolLM2-135M shape, B 4 x L 512, fp32
    python bench/train_step.py --device cuda      # GPU: ~1B LLaMA shape (TinyLlama-1.1B), L 2048, bf16, + MFU
    python bench/train_step.py --preset tiny-llama --batch 2 --seq-len 64 --reps 1 --steps 1   # smoke run

dlm: `build_model` + `noise_batch` + `diffusion_loss` (fused masked CE: logits only for masked
rows, never [B, L, V]) with attention backend "auto" (on CPU: unmasked SDPA per row or per
document, no [B, 1, L, L] mask) and AdamW from `dlm.train.optim`.
seed-style (the DiffuLLaMA recipe as released): transformers `LlamaForCausalLM` with an all-zero
4D additive mask (bidirectional), full-vocabulary logits, CE / t summed over masked tokens and
divided by the masked count, `torch.optim.AdamW`.

Each measurement is its own process (peak RSS is per process); dlm and seed alternate (which goes
first flips every repetition), and the ratios printed are medians over repetitions, so a load
spike on a shared machine hits both. Time: median step time after one warm-up step (which also
creates the AdamW state), as wall-clock tokens/s and as tokens per CPU-second of the process
(steadier when other jobs share the cores; equal to tokens/s for one thread on an idle machine). Memory: peak RSS of the process on CPU (also shown above the RSS after
imports and batch creation), `max_memory_allocated` on CUDA. `transformers` is a bench-only
dependency (the `test` extra).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

IMPLS = ("dlm", "seed")
# what each step imports, loaded before the start RSS is read
IMPORTS = {"dlm": ("dlm.diffusion", "dlm.train.optim", "dlm.train.parallelize"), "seed": ("transformers",)}
DEFAULTS = {  # device -> (preset, batch, seq_len, dtype)
    "cpu": ("smollm2-135m", 4, 512, "float32"),
    "cuda": ("tinyllama-1.1b", 4, 2048, "bfloat16"),
}
GOALS = {"cpu": (1.3, 0.6), "cuda": (2.0, None)}  # (tokens/s ratio >=, peak memory ratio <=)


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def model_config(preset_name: str):
    """The preset with an appended [MASK], vocabulary padded as `add_mask_token` pads it."""
    from dlm.models import preset
    from dlm.models.mask_token import padded_vocab

    base = preset(preset_name)
    return base.replace(
        vocab_size=padded_vocab(base.vocab_size + 1), mask_token_id=base.vocab_size, base_vocab_size=base.vocab_size
    )


def make_batch(cfg, batch: int, seq_len: int, docs_per_row: int, device: torch.device) -> dict:
    """Random tokens; rows of `docs_per_row` documents of (nearly) equal length."""
    g = torch.Generator().manual_seed(0)
    doc_len = -(-seq_len // docs_per_row)
    pos = (torch.arange(seq_len) % doc_len).expand(batch, seq_len).clone()
    return {
        "input_ids": torch.randint(0, cfg.base_vocab_size, (batch, seq_len), generator=g).to(device),
        "position_ids": pos.to(device),
        "sample_ids": torch.arange(batch).to(device),
    }


def dlm_step(cfg, batch: dict, dtype: torch.dtype, device: torch.device, compile_blocks: bool, ac: str):
    from dlm.diffusion import DiffusionConfig, diffusion_loss, noise_batch
    from dlm.models import build_model
    from dlm.train.config import OptimSection, ParallelSection
    from dlm.train.optim import build_optimizer
    from dlm.train.parallelize import apply_ac, apply_compile

    with torch.device(device):
        model: Any = build_model(cfg)  # Llama: init_weights, flops_per_token
    model.to(dtype)
    model.init_weights(seed=0)
    apply_ac(model, ParallelSection(activation_checkpoint=cast(Any, ac)))
    if compile_blocks:
        apply_compile(model)
    opt = build_optimizer(model, OptimSection(lr=1e-5))
    dcfg = DiffusionConfig(mask_token_id=cfg.mask_token_id)
    B = batch["input_ids"].shape[0]
    state = {"step": 0}

    def step() -> float:
        noised = noise_batch(batch, state["step"], dcfg, B)
        loss = diffusion_loss(model, noised, noised.norm_count).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        return float(loss.detach())

    return model, step


def seed_step(cfg, batch: dict, dtype: torch.dtype, device: torch.device, compile_blocks: bool, ac: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlm.models.hf import config_to_hf

    if cfg.family != "llama":
        raise ValueError(f"the seed-style baseline is LlamaForCausalLM; this preset is {cfg.family}")
    hf = config_to_hf(cfg, dtype)
    hf.pop("architectures")
    hf.pop("model_type")
    hf["attn_implementation"] = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(LlamaConfig(**hf))
    model.to(dtype)
    if ac == "full":
        model.gradient_checkpointing_enable()
    if compile_blocks:
        for layer in model.model.layers:
            layer.compile(fullgraph=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    ids = batch["input_ids"]
    B, L = ids.shape
    zero_mask = torch.zeros(B, 1, L, L, dtype=dtype, device=device)  # additive: every pair visible
    g = torch.Generator(device=device).manual_seed(0)
    eps = 1e-3

    def step() -> float:
        t = eps + (1 - eps) * torch.rand(B, 1, generator=g, device=device)
        masked = torch.rand(B, L, generator=g, device=device) < t
        masked[:, 0] = False
        noisy = torch.where(masked, cfg.mask_token_id, ids)
        logits = model(input_ids=noisy, attention_mask=zero_mask).logits
        ce = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        m = masked[:, 1:].reshape(-1)
        loss = (ce * m / t.expand(B, L - 1).reshape(-1)).sum() / m.sum().clamp_min(1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def worker(args) -> dict:
    """One implementation in this process: warm-up, timed steps, peak memory."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    cfg = model_config(args.preset)
    batch = make_batch(cfg, args.batch, args.seq_len, args.docs_per_row, device)
    for module in IMPORTS[args.worker]:
        importlib.import_module(module)
    if args.worker == "seed":
        from transformers import LlamaForCausalLM  # noqa: F401  (the lazy module loads here)
    rss_start = rss_mib()
    build = dlm_step if args.worker == "dlm" else seed_step
    model, step = build(cfg, batch, dtype, device, args.compile, args.ac)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    first_loss = step()
    first_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()  # float(loss) synchronises
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    sec = statistics.median(times)
    tok_s = args.batch * args.seq_len / sec
    out = {
        "impl": args.worker,
        "step_s": sec,
        "step_times_s": times,
        # CPU seconds of the process: what a step costs when other jobs share the cores
        "tokens_per_cpu_s": args.batch * args.seq_len / statistics.median(cpu_times),
        "first_step_s": first_s,
        "tokens_per_s": tok_s,
        "first_loss": first_loss,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        from dlm.train.metrics import peak_flops

        peak = peak_flops(device, args.peak_tflops)
        flops = model_flops_per_token(cfg, args.seq_len) * tok_s
        out["mfu"] = flops / peak if peak else None
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["start_mib"] = 0.0
    else:
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        out["start_mib"] = rss_start
    return out


def model_flops_per_token(cfg, seq_len: int) -> int:
    """6 N + 12 layers x heads x head_dim x L, N counting every matmul weight (the output head
    too): the same count for both steps, so their MFU ratio is their speed ratio."""
    from dlm.models import build_model

    with torch.device("meta"):
        model: Any = build_model(cfg)
    return model.flops_per_token(seq_len)


def run_worker(impl: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_argv(args) -> list[str]:
    argv = [
        f"--device={args.device}",
        f"--preset={args.preset}",
        f"--batch={args.batch}",
        f"--seq-len={args.seq_len}",
        f"--dtype={args.dtype}",
        f"--docs-per-row={args.docs_per_row}",
        f"--threads={args.threads}",
        f"--steps={args.steps}",
        f"--peak-tflops={args.peak_tflops}",
        f"--ac={args.ac}",
    ]
    return argv + (["--compile"] if args.compile else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", help="LLaMA-family preset (default: smollm2-135m on CPU, tinyllama-1.1b on CUDA)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--docs-per-row", type=int, default=1, help="documents packed into each row (dlm masks them)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (same for both)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    p.add_argument("--reps", type=int, default=3, help="processes per implementation, interleaved")
    p.add_argument("--compile", action="store_true", help="torch.compile every block of both models")
    p.add_argument(
        "--ac", choices=["none", "full"], default="none", help="activation checkpointing of every block (both models)"
    )
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: dlm.train.metrics table)")
    p.add_argument("--json", type=Path, help="details file (default $OUT/train_step.json when OUT is set)")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset_name, batch, seq_len, dtype = DEFAULTS[args.device]
    args.preset = args.preset or preset_name
    args.batch = args.batch or batch
    args.seq_len = args.seq_len or seq_len
    args.dtype = args.dtype or dtype
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step: no CUDA device", file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    print(
        f"train_step: {args.preset} B {args.batch} x L {args.seq_len}, {args.dtype}, {args.device}, "
        f"{args.docs_per_row} document(s)/row, {args.threads} thread(s), {args.steps} timed steps x {args.reps} reps, "
        f"activation checkpointing {args.ac}{', compiled' if args.compile else ''}",
        flush=True,
    )
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for rep in range(args.reps):
        for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
            r = run_worker(impl, worker_argv(args))
            results[impl].append(r)
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            print(
                f"  rep {rep} {impl:4}: {r['step_s']:.2f} s/step, {r['tokens_per_s']:,.1f} tok/s, "
                f"{r['tokens_per_cpu_s']:,.1f} tok/CPU-s, "
                f"peak {r['peak_mib']:,.0f} MiB (+{r['peak_mib'] - r['start_mib']:,.0f} over start){mfu}, "
                f"loss {r['first_loss']:.3f}",
                flush=True,
            )
    load_after = os.getloadavg()
    dlm, seed = results["dlm"], results["seed"]
    speed = [d["tokens_per_s"] / s["tokens_per_s"] for d, s in zip(dlm, seed)]
    cpu_speed = [d["tokens_per_cpu_s"] / s["tokens_per_cpu_s"] for d, s in zip(dlm, seed)]
    mem = [d["peak_mib"] / s["peak_mib"] for d, s in zip(dlm, seed)]
    mem_step = [(d["peak_mib"] - d["start_mib"]) / (s["peak_mib"] - s["start_mib"]) for d, s in zip(dlm, seed)]
    goal_speed, goal_mem = GOALS[args.device]
    summary = {
        "tokens_per_s_ratio": statistics.median(speed),
        "tokens_per_cpu_s_ratio": statistics.median(cpu_speed),
        "peak_memory_ratio": statistics.median(mem),
        "peak_over_start_ratio": statistics.median(mem_step),
        "load_avg_before": load_before,
        "load_avg_after": load_after,
    }
    print(
        f"dlm / seed-style: tokens/s {summary['tokens_per_s_ratio']:.2f}x (goal >= {goal_speed}x; per rep "
        + ", ".join(f"{x:.2f}" for x in speed)
        + f"); per CPU-second {summary['tokens_per_cpu_s_ratio']:.2f}x"
    )
    print(
        f"                  peak memory {summary['peak_memory_ratio']:.2f}x"
        + (f" (goal <= {goal_mem}x)" if goal_mem else "")
        + f", above the post-import start {summary['peak_over_start_ratio']:.2f}x"
    )
    if args.device == "cuda":
        print(
            f"                  MFU dlm {statistics.median(d['mfu'] or 0 for d in dlm):.1%}, seed {statistics.median(s['mfu'] or 0 for s in seed):.1%}"
        )
    print(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")
    out = args.json or (Path(os.environ["OUT"]) / "train_step.json" if os.environ.get("OUT") else None)
    if out is not None:
        from dlm.atomic import atomic_write_text

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            out, json.dumps({"args": vars(args), "summary": summary, "runs": results}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
