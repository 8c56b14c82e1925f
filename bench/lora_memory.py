"""LoRA vs full fine-tuning on the SmolLM2-135M shape: peak memory, optimizer-state bytes,
trainable parameters, checkpoint size and step time, as ratios against full fine-tuning measured
in the same run.

    python bench/lora_memory.py                         # CPU: B = 4 rows of L = 256, 3 timed steps
    python bench/lora_memory.py --batch 2 --seq-len 64 --steps 1     # quick

One step = the diffusion SFT objective (noise_batch + diffusion_loss on [BOS] prompt [SEP]
response rows), backward, AdamW step, exactly as the trainer runs it; LoRA is rank 16 on every
attention and MLP projection (lora.targets = ["all"]), with and without the embedding table
trained in full (the seed's `additional_target: embed_tokens`).

Memory: each variant runs in its own fresh subprocess. On CUDA the number is
torch.cuda.max_memory_allocated over the timed steps; on CPU, as in bench/ce_memory.py, glibc
serves large allocations with mmap (so freed tensors leave the resident set at once), the peak-RSS
counter is reset after the model is built, and peak = VmHWM during the steps: everything resident,
the weights included. Optimizer state is the exact byte count of AdamW's tensors after the steps.
Time is the median of the timed steps (after one warm-up step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"rank": 0},
    "lora": {"rank": 16, "extra_trainable": []},
    "lora+embed": {"rank": 16, "extra_trainable": ["embed_tokens"]},
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert m is not None
    return int(m.group(1))


def _checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool) -> int:
    """Size of the DCP model + optimizer checkpoint the trainer writes (dlm.train.checkpoint:
    LoRA runs save only the trainable tensors)."""
    import tempfile
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=True)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def _child(variant: str, args: argparse.Namespace) -> dict:
    from dlm.diffusion import DiffusionConfig, diffusion_loss, noise_batch
    from dlm.lora import LoRAConfig, apply_lora
    from dlm.models import build_model, preset
    from dlm.models.mask_token import add_mask_token
    from dlm.sft import SFTFormat, collate_sft, sft_example
    from dlm.train.config import OptimSection
    from dlm.train.optim import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    with torch.device("meta"):
        table = {"tok_embeddings.weight": torch.empty(preset("smollm2-135m").vocab_size, 1)}
    _, cfg = add_mask_token(table, preset("smollm2-135m"))
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)
    model.init_weights(seed=0)  # type: ignore[operator]
    spec = VARIANTS[variant]
    if spec["rank"]:
        apply_lora(model, LoRAConfig(rank=spec["rank"], alpha=32, extra_trainable=spec["extra_trainable"]))
    else:
        model.requires_grad_(True)
    optimizer = build_optimizer(model, OptimSection(lr=1e-4, weight_decay=0.0))
    B, L = args.batch, args.seq_len
    fmt = SFTFormat(seq_len=L, sep_id=0, eos_id=0, pad_id=0, bos_id=1)
    g = torch.Generator().manual_seed(0)
    rows = [
        sft_example(
            torch.randint(2, 49152, (L // 2 - 2,), generator=g).tolist(),
            torch.randint(2, 49152, (L // 2 - 2,), generator=g).tolist(),
            fmt,
        )
        for _ in range(B)
    ]
    batch = {k: v.to(device) for k, v in collate_sft(rows, range(B)).items()}
    assert cfg.mask_token_id is not None
    dcfg = DiffusionConfig(mask_token_id=cfg.mask_token_id, random_length_prob=0.0)

    def step(i: int) -> float:
        t0 = time.perf_counter()
        nb = noise_batch(batch, i, dcfg, B)
        diffusion_loss(model, nb, nb.norm_count).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step(0)  # warm-up: the optimizer state exists from here on
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    times = [step(i + 1) for i in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024
    opt_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    ckpt_bytes = _checkpoint_bytes(model, optimizer, trainable_only=bool(spec["rank"]))
    return {
        "variant": variant,
        "device": device.type,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": opt_bytes,
        "peak_memory_bytes": peak,
        "checkpoint_bytes": ckpt_bytes,
        "step_time_s": statistics.median(times),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    p.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
        cmd += ["--steps", str(args.steps)] + (["--cpu"] if args.cpu else [])
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    full = results["full"]
    print(f"SmolLM2-135M shape, diffusion SFT step, B={args.batch} x L={args.seq_len}, device {full['device']}")
    print(f"{'variant':<12}{'trainable':>14}{'optimizer MiB':>15}{'checkpoint MiB':>16}{'peak MiB':>11}{'step s':>9}")
    for r in results.values():
        print(
            f"{r['variant']:<12}{r['trainable_params']:>14,}{r['optimizer_state_bytes'] / 2**20:>15.1f}"
            f"{r['checkpoint_bytes'] / 2**20:>16.1f}{r['peak_memory_bytes'] / 2**20:>11.1f}{r['step_time_s']:>9.3f}"
        )
    for name in ("lora", "lora+embed"):
        r = results[name]
        print(
            f"{name} / full: trainable {r['trainable_params'] / full['trainable_params']:.4f}, "
            f"optimizer state {r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.4f}, "
            f"checkpoint {r['checkpoint_bytes'] / full['checkpoint_bytes']:.4f}, "
            f"peak memory {r['peak_memory_bytes'] / full['peak_memory_bytes']:.3f}, "
            f"step time {r['step_time_s'] / full['step_time_s']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
