"""Continual pre-training of a masked diffusion LM (DESIGN sections 2 and 6).

    torchrun --nproc_per_node 8 launch/pretrain.py --config launch/configs/diffullama_7b.toml
    torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/tiny_cpu.toml --optim.lr 1e-3

Run it again with the same run folder and it resumes from the newest complete checkpoint.
SIGTERM / SIGUSR1 save a checkpoint at the next step boundary and exit 0 (SLURM requeue).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # `torchrun launch/pretrain.py` from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from dlm.atomic import atomic_write_text
from dlm.data import DataState, PackedDataset, SourceSpec, StepLoader, check_resume
from dlm.diffusion import DiffusionConfig, diffusion_loss, noise_batch
from dlm.models import build_model
from dlm.tokenizer import load_tokenizer
from dlm.train.checkpoint import Checkpointer, export_checkpoint, resolve_checkpoint
from dlm.train.config import TrainConfig, check_world, load_config, save_config
from dlm.train.log import logger, setup_logging
from dlm.train.metrics import MetricsLogger, peak_flops, peak_memory_gib
from dlm.train.optim import apply_hyperparameters, build_optimizer, build_scheduler
from dlm.train.parallelize import apply_ac, apply_compile, apply_fsdp, clip_grad_norm_, init_distributed, load_weights
from dlm.train.weights import weight_source


class StopRequest:
    """Remembers SIGTERM / SIGUSR1; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def build_model_sharded(cfg: TrainConfig, env, source) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(source.config)
    apply_ac(model, cfg.parallel)
    if cfg.parallel.compile:
        apply_compile(model)
    apply_fsdp(model, env.mesh, cfg.parallel, env.device)
    model.to_empty(device=env.device)
    load_weights(model, source.tensor)
    return model


def sample_text(model, tok, cfg: TrainConfig, step: int, metrics: MetricsLogger) -> None:
    """Generated text to TensorBoard. Every rank runs the sampler (FSDP gathers parameters
    collectively); rank 0 writes."""
    from dlm.sampling import Request, SamplingConfig, generate

    m = cfg.metrics
    text = tok.encode(m.sample_prompt) if m.sample_prompt else []
    bos = [tok.bos_id] if text and tok.add_bos and tok.bos_id is not None else []
    (sample,) = generate(
        model, [Request(bos + text)], SamplingConfig(steps=m.sample_steps, length=m.sample_length, seed=step)
    )
    metrics.text(step, "samples", tok.decode(text + sample.tokens))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML file (see launch/configs/)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)

    env = init_distributed(cfg.train.device)
    setup_logging(env.rank)
    stop = StopRequest()
    run_dir = Path(cfg.train.run_dir)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.toml")
    n_micro = check_world(cfg, env.world_size)
    G, L = cfg.train.global_batch_size, cfg.data.seq_len
    torch.manual_seed(cfg.train.seed)

    # ---- data, model, optimizer
    weights = cfg.data.weights or [1.0] * len(cfg.data.paths)
    dataset = PackedDataset(
        [SourceSpec(p, w) for p, w in zip(cfg.data.paths, weights)],
        seq_len=L,
        seed=cfg.data.seed,
        heldout_fraction=cfg.data.heldout_fraction,
    )
    source = weight_source(cfg.model, cfg.train.seed, dataset.tokenizer)
    mcfg = source.config
    if mcfg.max_seq_len < L:
        raise ValueError(f"data.seq_len {L} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if dataset.tokenizer["vocab_size"] > mcfg.base_vocab_size:
        raise ValueError(
            f"the data was tokenized with a vocabulary of {dataset.tokenizer['vocab_size']} "
            f"({dataset.tokenizer['path']}) but the model has {mcfg.base_vocab_size} token ids"
        )
    model = build_model_sharded(cfg, env, source)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    logger.info(
        "model %s: %.1fM parameters, world size %d, %d micro-batch(es) of %d per rank per step",
        mcfg.family,
        model.num_params(non_embedding=False) / 1e6,
        env.world_size,
        n_micro,
        cfg.train.micro_batch_size,
    )

    # ---- resume
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank, env.world_size)
    step, tokens_seen, consumed = 0, 0, 0
    resume = (
        None
        if cfg.checkpoint.resume == "none"
        else ckpt.latest()
        if cfg.checkpoint.resume == "auto"
        else resolve_checkpoint(cfg.checkpoint.resume)
    )
    if resume is None and ckpt.latest() is not None:
        raise ValueError(
            f"{run_dir} already holds checkpoints but checkpoint.resume = 'none': choose a new train.run_dir, or resume"
        )
    if resume is not None:
        state = ckpt.load(resume, model, optimizer)
        # the position in the schedule comes from the checkpoint, the hyperparameters from the config
        scheduler.load_state_dict({**state["scheduler"], "base_lrs": scheduler.base_lrs})
        apply_hyperparameters(optimizer, cfg.optim, state["step"], cfg.train.steps)
        data_state = DataState.from_dict(state["data"])
        check_resume(data_state, dataset, allow_changed=cfg.data.allow_changed_index)
        step, tokens_seen, consumed = state["step"], state["tokens_seen"], data_state.consumed_samples
        logger.info("resumed from %s at step %d (%d samples consumed)", resume, step, consumed)
    loader = StepLoader(
        dataset,
        G,
        cfg.train.micro_batch_size,
        env.rank,
        env.world_size,
        consumed_samples=consumed,
        num_workers=cfg.data.num_workers,
    )
    dcfg = DiffusionConfig(mask_token_id=mcfg.mask_token_id, **asdict(cfg.diffusion))

    def trainer_state() -> dict:
        return {
            "step": step,
            "tokens_seen": tokens_seen,
            "data": loader.state().to_dict(),
            "scheduler": scheduler.state_dict(),
            "model_config": mcfg.to_dict(),
            "train_config": cfg.to_dict(),
            "tokenizer_from": source.tokenizer_from,
        }

    metrics = MetricsLogger(run_dir, env.rank, step, cfg.metrics.log_every, cfg.metrics.tensorboard)
    peak = peak_flops(env.device, cfg.metrics.peak_tflops)
    sample_tok = load_tokenizer(cfg.metrics.sample_tokenizer) if cfg.metrics.sample_every else None
    flops_per_token = model.flops_per_token(L)
    batches = iter(loader)

    # ---- the loop
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        micro_batches = next(batches)
        t_data = time.perf_counter() - t0
        model.train()
        noised = [noise_batch({k: v.to(env.device) for k, v in mb.items()}, step, dcfg, G) for mb in micro_batches]
        # normaliser: loss-eligible (or masked) tokens of the whole global batch
        counts = torch.stack([sum(nb.norm_count for nb in noised), sum(nb.n_eligible for nb in noised)]).double()
        dist.all_reduce(counts)
        normalizer = counts[0].float()
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        elbo_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for j, nb in enumerate(noised):
            model.set_requires_gradient_sync(j == n_micro - 1)  # reduce-scatter once per step
            out = diffusion_loss(model, nb, normalizer, step=step)
            out.loss.backward()
            loss_sum += out.loss.detach().double()
            elbo_sum += out.elbo_sum.double()
        grad_norm = clip_grad_norm_(model, cfg.optim.grad_clip)

        # one gather: per-rank loss (to name the rank that went non-finite), ELBO, stop requests
        mine = torch.stack(
            [loss_sum, elbo_sum, torch.tensor(float(stop.signal is not None), dtype=torch.float64, device=env.device)]
        )
        every = [torch.empty_like(mine) for _ in range(env.world_size)]
        dist.all_gather(every, mine)
        every = torch.stack(every).cpu()
        grad_norm = grad_norm.item()
        bad = [r for r in range(env.world_size) if not torch.isfinite(every[r, :2]).all()]
        if bad:
            raise FloatingPointError(f"non-finite loss at step {step + 1} on rank(s) {bad} (this is rank {env.rank})")
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {step + 1} (rank {env.rank})")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += G * L

        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        dt = time.perf_counter() - t0
        tps = G * L / dt / env.world_size
        n_el = max(counts[1].item(), 1.0)
        metrics.log(
            step,
            {
                "loss": every[:, 0].sum().item(),
                "elbo": every[:, 1].sum().item() / n_el,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s_per_device": tps,
                "mfu": None if peak is None else tps * flops_per_token / peak,
                "step_time_s": dt,
                "data_wait_s": t_data,
                "peak_memory_gib": peak_memory_gib(env.device),
                "tokens_seen": tokens_seen,
                "consumed_samples": loader.state().consumed_samples,
            },
        )
        if cfg.metrics.sample_every and step % cfg.metrics.sample_every == 0:
            sample_text(model, sample_tok, cfg, step, metrics)

        stopping = bool(every[:, 2].any())
        interval = cfg.checkpoint.interval
        if stopping or step == cfg.train.steps or (interval and step % interval == 0):
            ckpt.save(step, model, optimizer, trainer_state())
        if stopping:
            logger.info("stop requested by signal: checkpoint at step %d written, exiting", step)
            break

    metrics.close()
    if step == cfg.train.steps:
        if env.rank == 0:
            if cfg.checkpoint.export_at_end:
                logger.info("exported %s", export_checkpoint(ckpt.latest(), run_dir / "export"))
            atomic_write_text(run_dir / "DONE", f"step {step}\n")  # tells the SLURM script not to requeue
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
