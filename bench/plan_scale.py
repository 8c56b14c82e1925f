"""Memory and throughput planner for dlm training at scale (issue 14).

    python bench/plan_scale.py                                  # the paper's two runs on H100s
    python bench/plan_scale.py --preset llama2-7b --seq-len 2048 --global-batch 512 --micro-batch 2 \\
        --gpus 64 --gpu H100 --mfu 0.35                         # one configuration
    python bench/plan_scale.py --validate                       # predictions vs real dlm steps here

Per-GPU memory of FSDP2 training (fp32 master weights sharded over the GPUs, bf16 compute):
sharded parameters, gradients and AdamW state, the all-gather / reduce-scatter buffers of the
blocks in flight, activations (what autograd saves, counted tensor by tensor for dlm's blocks,
with and without activation checkpointing) and the fused masked CE (its fp32 head gradient,
produced in the forward, and one chunk of logits). Peak = the larger of end-of-forward /
start-of-backward (activations alive) and end-of-backward (all gradients alive). Not counted:
the CUDA context and NCCL's own buffers (about 1-2 GiB outside the caching allocator) and
allocator fragmentation. Step time comes from FLOPs (6N + 12 l H d L per token, plus the
recomputed forward under activation checkpointing) at the MFU you state.

`--validate` runs real dlm steps on this machine (bench/train_step.py's dlm worker: model,
noise, fused CE, attention backend "auto", AdamW; one process, fp32, no FSDP) for several
presets and batch sizes and prints the predicted peak next to the measured peak RSS. The
prediction covers tensors; the RSS of the process before the model is built (interpreter,
torch, the batch) is measured and added. The workers run with MALLOC_MMAP_THRESHOLD_=65536 so
that freed tensors go back to the OS and peak RSS is the peak of live memory: with glibc's
default dynamic threshold, RSS also holds what malloc caches (about 15% more at SmolLM2 B 1 x
L 256).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlm.kernels.masked_ce import DEFAULT_MEMORY_BUDGET, chunk_rows_for
from dlm.models import ModelConfig, build_model
from dlm.train.metrics import PEAK_TFLOPS

GIB = 2**30
MIB = 2**20
GPU_MEMORY_GIB = {
    "H200": 141,
    "H100": 80,
    "H100 PCIe": 80,
    "GH200": 96,
    "B200": 180,
    "A100": 80,
    "L40S": 48,
    "MI300X": 192,
}
MASKED_FRACTION = 0.5  # E[t] with t ~ U(eps, 1): the share of tokens the fused CE scores


@dataclass(frozen=True)
class Setup:
    """One training configuration as seen by one GPU (or the one CPU process)."""

    cfg: ModelConfig
    seq_len: int
    micro_batch: int  # rows per GPU per forward/backward
    gpus: int = 1
    ac: str = "none"  # none | full | selective:<k>
    compute_bytes: int = 2  # 2: bf16 compute (FSDP2 mixed precision); 4: fp32
    fsdp: bool = True  # False: a plain single-process step (the CPU validation)
    fused_adamw: bool = True  # CUDA AdamW; False: CPU's per-tensor loop (a temporary per tensor)


def param_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(total, one block, outside the blocks) parameter counts, from the model itself."""
    import torch

    with torch.device("meta"):
        model: Any = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    return total, block, total - cfg.n_layers * block


def layer_activation_bytes(cfg: ModelConfig, s: int) -> float:
    """Bytes autograd keeps per token per block (s = compute dtype size), counted from the
    blocks' code (tests/models/test_plan_scale.py checks it against saved-tensor hooks)."""
    D, F, H = cfg.dim, cfg.ffn_dim, cfg.n_heads
    kv = (cfg.n_kv_heads or cfg.n_heads) * cfg.head_dim
    attention = s * (D + 2 * kv) + s * D + 4 * H  # q, k, v (after RoPE / packing), output, logsumexp
    if cfg.family == "llama":
        # dlm.models.lean_ops: RMSNorm input, fp32 inverse RMS, and its output (the next
        # projections' input); RoPE saves only cos/sin, shared by all layers
        norm = 2 * D * s + 4
        ffn = 2 * F * s  # w1 out, w3 out: silu and the product are recomputed in backward
    else:
        norm = 2 * D * s + 2 * s  # LayerNorm input and output; mean, rstd (fp32 on CUDA: +4 bytes)
        ffn = F * s  # fc out: its GELU is recomputed in backward (dlm.models.lean_ops)
    return 2 * norm + attention + ffn


def ac_blocks(ac: str, n_layers: int) -> int:
    """How many blocks activation checkpointing wraps (as `dlm.train.parallelize.apply_ac`)."""
    if ac == "none":
        return 0
    if ac == "full":
        return n_layers
    if ac.startswith("selective:"):
        k = int(ac.split(":", 1)[1])
        return len(range(0, n_layers, k))
    raise ValueError(f"activation checkpointing must be none, full or selective:<k>, got {ac!r}")


def memory(setup: Setup) -> dict[str, float]:
    """Bytes per GPU by component, plus 'peak'."""
    cfg, s = setup.cfg, setup.compute_bytes
    total, block, outside = param_counts(cfg)
    n = setup.gpus if setup.fsdp else 1
    tokens = setup.micro_batch * setup.seq_len
    masked = MASKED_FRACTION * tokens
    head_rows = cfg.vocab_size * cfg.dim  # the (tied) output head
    per_layer = layer_activation_bytes(cfg, s) * tokens
    wrapped = ac_blocks(setup.ac, cfg.n_layers)
    final_norm = tokens * (cfg.dim * s + 4 if cfg.family == "llama" else 2 * cfg.dim * s)
    m = {
        "params (fp32 master, sharded)": 4 * total / n,
        "AdamW state (fp32, sharded)": 8 * total / n,
        "gradients (fp32, sharded)": 4 * total / n,
        # unsharded compute copies: the root (embeddings, head) for the whole forward, the block
        # in use and the prefetched next one
        "all-gather buffers": (s * (outside + 2 * block)) if setup.fsdp else 0.0,
        # a block's unsharded gradient in the compute dtype and its fp32 copy for reduce-scatter
        "reduce-scatter buffers": ((s + 4) * block) if setup.fsdp else 0.0,
        "activations": (cfg.n_layers - wrapped) * per_layer + wrapped * tokens * cfg.dim * s + final_norm,
        "activation recompute (one block)": per_layer if wrapped else 0.0,
        # dW of the fused CE lives from the forward to the backward; then the head gradient
        "CE head gradient (fp32) + dh": 4 * head_rows + masked * cfg.dim * s,
        "CE chunk logits": min(chunk_rows_for(cfg.vocab_size, _dtype(s), DEFAULT_MEMORY_BUDGET), masked)
        * cfg.vocab_size
        * s,
        # gradients flowing through one block in backward: two ffn-sized and two dim-sized
        "backward transients": tokens * s * (2 * cfg.ffn_dim + 2 * cfg.dim),
    }
    static = m["params (fp32 master, sharded)"] + m["AdamW state (fp32, sharded)"] + m["all-gather buffers"]
    forward_end = static + m["activations"] + m["CE head gradient (fp32) + dh"] + m["CE chunk logits"]
    backward_start = (
        static
        + m["activations"]
        + m["CE head gradient (fp32) + dh"]
        + head_rows * s  # the head's gradient in the compute dtype, made from the fp32 one
        + m["backward transients"]
        + m["activation recompute (one block)"]
        + m["reduce-scatter buffers"]
    )
    # end of backward: every gradient, plus the embedding backward's dense [V, D] gradient;
    # the CPU optimizer's per-tensor loop makes two temporaries (sqrt, then / bias correction)
    # the size of the largest tensor
    backward_end = static + m["gradients (fp32, sharded)"] + head_rows * s + m["reduce-scatter buffers"]
    optimizer = static + m["gradients (fp32, sharded)"] + (0 if setup.fused_adamw else 2 * 4 * head_rows / n)
    m["peak"] = max(forward_end, backward_start, backward_end, optimizer)
    return m


def _dtype(s: int):
    import torch

    return {2: torch.bfloat16, 4: torch.float32}[s]


def flops_per_token(setup: Setup) -> int:
    """Model FLOPs per trained token, as `metrics.jsonl` counts them for its MFU."""
    import torch

    with torch.device("meta"):
        model: Any = build_model(setup.cfg)
    return model.flops_per_token(setup.seq_len)


def recompute_factor(setup: Setup) -> float:
    """FLOPs the GPU executes per model FLOP: activation checkpointing runs the wrapped blocks'
    forward (a third of forward + backward) twice."""
    return 1 + ac_blocks(setup.ac, setup.cfg.n_layers) / setup.cfg.n_layers / 3


@dataclass(frozen=True)
class Run:
    name: str
    preset: str
    seq_len: int
    global_batch: int
    tokens: float


PAPER_RUNS = (
    Run("DiffuLLaMA 7B (65B tokens)", "llama2-7b", 2048, 1024, 65e9),
    Run("DiffuGPT-M (160k x 1280 x 1024)", "gpt2-medium", 1024, 1280, 160_000 * 1280 * 1024),
)


def throughput(setup: Setup, gpu: str, mfu: float) -> float:
    """Tokens per second per GPU at `mfu` (model FLOPs, recompute not counted, as in
    metrics.jsonl and torchtitan) of the GPU's dense bf16 peak."""
    if gpu not in PEAK_TFLOPS:
        raise ValueError(f"unknown GPU kind {gpu!r}; choose one of {sorted(PEAK_TFLOPS)}")
    return mfu * PEAK_TFLOPS[gpu] * 1e12 / flops_per_token(setup)


def _preset(name: str) -> ModelConfig:
    from dlm.models import preset
    from dlm.models.mask_token import padded_vocab

    base = preset(name)
    return base.replace(
        vocab_size=padded_vocab(base.vocab_size + 1), mask_token_id=base.vocab_size, base_vocab_size=base.vocab_size
    )


def describe(setup: Setup, gpu: str, mfu: float, global_batch: int, tokens: float | None) -> list[str]:
    m = memory(setup)
    cap = GPU_MEMORY_GIB.get(gpu)
    lines = [
        f"{setup.cfg.family} {setup.cfg.n_layers}x{setup.cfg.dim} ({param_counts(setup.cfg)[0] / 1e9:.2f}B params), "
        f"L {setup.seq_len}, micro-batch {setup.micro_batch}, {setup.gpus} x {gpu}, activation checkpointing {setup.ac}"
    ]
    for k, v in m.items():
        if k != "peak" and v:
            lines.append(f"  {k:38s} {v / GIB:8.2f} GiB")
    fits = "" if cap is None else (f" (fits {cap} GiB)" if m["peak"] / GIB <= cap - 2 else f" (does NOT fit {cap} GiB)")
    lines.append(f"  {'predicted peak':38s} {m['peak'] / GIB:8.2f} GiB{fits}; + ~1-2 GiB CUDA context / NCCL")
    rows_per_step = setup.gpus * setup.micro_batch
    if global_batch % rows_per_step:
        raise ValueError(f"global batch {global_batch} is not a multiple of gpus x micro-batch = {rows_per_step}")
    accum = global_batch // rows_per_step
    tps = throughput(setup, gpu, mfu)
    step_s = global_batch * setup.seq_len / (tps * setup.gpus)
    lines.append(
        f"  at MFU {mfu:.0%}: {tps:,.0f} tokens/s/GPU, {tps * setup.gpus:,.0f} total; step of {global_batch} x "
        f"{setup.seq_len} ({accum} micro-batches) {step_s:.2f} s"
    )
    if setup.ac != "none":
        lines.append(
            f"  (activation checkpointing: the GPU executes {recompute_factor(setup):.2f}x the model FLOPs, so MFU "
            f"{mfu:.0%} means {mfu * recompute_factor(setup):.0%} of peak in executed FLOPs)"
        )
    if tokens:
        hours = tokens / (tps * setup.gpus) / 3600
        lines.append(
            f"  {tokens / 1e9:.1f}B tokens: {hours / 24:.1f} days wall-clock, {hours * setup.gpus:,.0f} GPU-hours"
        )
    return lines


def paper_plans(gpu: str, mfu: float) -> list[str]:
    """Each paper run as its config in launch/configs lays it out, then a table over GPU counts."""
    lines = []
    for run in PAPER_RUNS:
        cfg = _preset(run.preset)
        micro, ac = PAPER_LAYOUT[run.preset]
        lines.append(f"== {run.name}: launch/configs layout")
        lines += describe(
            Setup(cfg, run.seq_len, micro, gpus=PAPER_GPUS[run.preset], ac=ac), gpu, mfu, run.global_batch, run.tokens
        )
        lines.append(
            f"   {'GPUs':>5s} {'micro':>5s} {'AC':>4s} {'peak GiB':>8s} {'tok/s/GPU':>9s} {'days':>6s} {'GPU-hours':>9s}"
        )
        for gpus in (8, 16, 32, 64, 128):
            for m, a in ((micro, ac), (max(1, micro // 2), "none")) if ac != "none" else ((micro, ac),):
                if run.global_batch % (gpus * m):
                    continue  # the global batch does not split over this many GPUs
                setup = Setup(cfg, run.seq_len, m, gpus=gpus, ac=a)
                tps = throughput(setup, gpu, mfu)
                hours = run.tokens / (tps * gpus) / 3600
                lines.append(
                    f"   {gpus:>5d} {m:>5d} {a:>4s} {memory(setup)['peak'] / GIB:>8.1f} {tps:>9,.0f} {hours / 24:>6.1f} "
                    f"{hours * gpus:>9,.0f}"
                )
    return lines


PAPER_LAYOUT = {"llama2-7b": (4, "full"), "gpt2-medium": (16, "none")}  # micro-batch, AC of launch/configs
PAPER_GPUS = {"llama2-7b": 64, "gpt2-medium": 8}


# ------------------------------------------------------------------------------- validation
# glibc: allocations above this are mmap'd and unmapped on free (no dynamic threshold), so peak
# RSS is the peak of live memory rather than of what malloc keeps cached for reuse
MMAP_THRESHOLD = 65536
VALIDATION = (  # preset, batch, seq_len, activation checkpointing
    ("smollm2-135m", 1, 256, "none"),
    ("smollm2-135m", 2, 512, "none"),
    ("smollm2-135m", 2, 512, "full"),
    ("gpt2", 1, 512, "none"),
)


def validate(threads: int) -> tuple[list[str], list[dict]]:
    from bench.train_step import run_worker

    header = (
        f"{'preset':14s} {'B x L':>9s} {'AC':>4s} {'measured':>10s} {'predicted':>10s} {'error':>7s}   "
        f"{'above start: measured':>21s} {'predicted':>9s} {'error':>7s}"
    )
    print(header, flush=True)
    lines = [header]
    records = []
    for name, batch, seq_len, ac in VALIDATION:
        argv = [
            f"--preset={name}",
            f"--batch={batch}",
            f"--seq-len={seq_len}",
            f"--ac={ac}",
            f"--threads={threads}",
            "--steps=1",
            "--dtype=float32",
            "--device=cpu",
        ]
        got = run_worker("dlm", argv, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)))
        setup = Setup(_preset(name), seq_len, batch, gpus=1, ac=ac, compute_bytes=4, fsdp=False, fused_adamw=False)
        pred = memory(setup)["peak"] / MIB
        meas, start = got["peak_mib"], got["start_mib"]
        err, err_step = (pred + start) / meas - 1, pred / (meas - start) - 1
        records.append(
            dict(
                preset=name, batch=batch, seq_len=seq_len, ac=ac, measured_mib=meas, start_mib=start, predicted_mib=pred
            )
        )
        lines.append(
            f"{name:14s} {batch:>3d} x {seq_len:<4d} {ac:>4s} {meas:>7,.0f} MiB {pred + start:>6,.0f} MiB {err:>+7.1%}   "
            f"{meas - start:>17,.0f} MiB {pred:>5,.0f} MiB {err_step:>+7.1%}"
        )
        print(lines[-1], flush=True)
    worst = max(abs(r["predicted_mib"] / (r["measured_mib"] - r["start_mib"]) - 1) for r in records)
    lines.append(f"worst error above the start RSS: {worst:.1%} (goal <= 15%)")
    return lines, records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", help="model preset; without it, the paper's runs are planned")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per GPU per forward/backward")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--gpu", default="H100", help=f"one of {sorted(PEAK_TFLOPS)}")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for step time")
    p.add_argument("--ac", default="none", help="activation checkpointing: none, full, selective:<k>")
    p.add_argument("--tokens", type=float, help="training tokens, for wall-clock and GPU-hours")
    p.add_argument("--validate", action="store_true", help="measure real dlm steps here against the memory model")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the validation steps")
    p.add_argument("--json", type=Path, help="details file (default $OUT/plan_scale.json when OUT is set)")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise SystemExit(f"plan_scale: --mfu must be in (0, 1], got {args.mfu}")
    try:
        if args.preset:
            setup = Setup(_preset(args.preset), args.seq_len, args.micro_batch, gpus=args.gpus, ac=args.ac)
            lines = describe(setup, args.gpu, args.mfu, args.global_batch, args.tokens)
        else:
            lines = paper_plans(args.gpu, args.mfu)
    except ValueError as e:
        raise SystemExit(f"plan_scale: {e}") from e
    print("\n".join(lines))
    records: list[dict] = []
    if args.validate:
        print("\nvalidation: real dlm steps on this machine (CPU, fp32, one process), peak RSS vs predicted")
        vlines, records = validate(args.threads)
        print(vlines[-1])
    out = args.json or (Path(os.environ["OUT"]) / "plan_scale.json" if os.environ.get("OUT") else None)
    if out is not None:
        from dlm.atomic import atomic_write_text

        atomic_write_text(out, json.dumps({"plan": lines, "validation": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
