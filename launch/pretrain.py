"""Continual pre-training of a masked diffusion LM (docs/design.md §2, §6).

    torchrun --nproc_per_node 8 launch/pretrain.py --config launch/configs/diffullama_7b.toml
    torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/tiny_cpu.toml --optim.lr 1e-3

Fine-tuning runs through the same loop: train.stage = "sft" (diffusion SFT) or "ar_sft" (the
AR baseline) reads [finetune] records instead of data.paths; lora.rank > 0 trains LoRA adapters
(launch/configs/tiny_sft_cpu.toml, diffugpt_m_gsm8k.toml, diffullama_lora_gsm8k.toml).

Run it again with the same run folder and it resumes from the newest intact checkpoint.
`--check` validates the config (and the world size, when WORLD_SIZE is set) and starts nothing.

Stopping: SIGTERM or SIGUSR1 to the workers (torchrun passes them on) makes every rank save a
checkpoint at the next step boundary; rank 0 then writes `<run>/STOPPED` and the workers exit 0.
torchrun itself exits 1 after a signal, and kills the workers after --shutdown-timeout seconds
(30 by default: raise it above a checkpoint's write time). Judge a run by its markers, not by
exit codes: `DONE` (the last step was reached), `STOPPED` (checkpointed on a signal: run again
to resume), neither (it failed). One trainer per run folder: rank 0 holds `<run>/LOCK`, and
workers get SIGTERM when their torchrun dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # `torchrun launch/pretrain.py` from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from dlm.atomic import atomic_write_text
from dlm.data import DataState, PackedDataset, SourceSpec, StepLoader, check_resume
from dlm.data.sft import SFTDataset, load_sft_dataset
from dlm.debug import set_debug
from dlm.diffusion import DiffusionConfig
from dlm.lora import LoRAConfig, apply_lora, with_lora_init
from dlm.models import GPT2, Llama, build_model
from dlm.sft import ARObjective
from dlm.tokenizer import load_tokenizer
from dlm.train.checkpoint import Checkpointer, export_checkpoint
from dlm.train.config import ConfigError, TrainConfig, check_world, load_config, save_config
from dlm.train.log import setup_logging
from dlm.train.metrics import MetricsLogger, peak_flops, peak_memory_gib
from dlm.train.optim import apply_hyperparameters, build_optimizer, build_scheduler
from dlm.train.parallelize import DistEnv, apply_ac, apply_compile, apply_fsdp, init_distributed, load_weights
from dlm.train.runlock import RunLock, RunLockedError, die_with_launcher
from dlm.train.step import DiffusionObjective, Objective, StepStats, read_stats, train_step
from dlm.train.weights import WeightSource, weight_source

logger = logging.getLogger("dlm.pretrain")  # __name__ is "__main__" under torchrun

STOPPED = "STOPPED"  # in the run folder: the last run checkpointed on a signal (cleared at start)


class StopRequest:
    """Remembers SIGTERM / SIGUSR1; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, world_size: int) -> bool:
        """Whether any rank was signalled: a host-side all-reduce (gloo for CPU tensors, also
        in the NCCL process group), so the device is never waited for."""
        if world_size == 1:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def build_model_sharded(cfg: TrainConfig, env: DistEnv, source: WeightSource) -> Llama | GPT2:
    with torch.device("meta"):
        model = build_model(source.config)
    tensor = source.tensor
    if cfg.lora.rank:  # before sharding: the frozen base is sharded like any weight
        trainable = apply_lora(model, LoRAConfig(**asdict(cfg.lora), seed=cfg.train.seed))
        tensor = with_lora_init(model, source.tensor, cfg.train.seed)
        logger.info("LoRA: %d trainable tensors, %.2fM parameters", len(trainable), _numel(model, trainable) / 1e6)
    apply_ac(model, cfg.parallel)
    if cfg.parallel.compile:
        apply_compile(model)
    apply_fsdp(model, env.mesh, cfg.parallel, env.device)
    model.to_empty(device=env.device)
    load_weights(model, tensor)
    return model


def _numel(model: torch.nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


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


@dataclass
class Trainer:
    """Everything a run builds once, before its first step."""

    cfg: TrainConfig
    env: DistEnv
    run_dir: Path
    dataset: PackedDataset | SFTDataset
    source: WeightSource
    model: Llama | GPT2  # sharded by FSDP2
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ckpt: Checkpointer
    n_micro: int
    lock: RunLock | None  # rank 0's hold on the run folder, for the life of the process


@dataclass
class Progress:
    """Where the run stands: restored by `resume`, advanced by the loop, saved in checkpoints."""

    step: int = 0
    tokens_seen: int = 0
    consumed_samples: int = 0


def setup(cfg: TrainConfig) -> Trainer:
    """Process group, run folder, data, model (sharded, weights loaded), optimizer, schedule."""
    set_debug(cfg.train.debug)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: do not outlive it
        die_with_launcher()
    env = init_distributed(cfg.train.device)
    setup_logging(env.rank)
    run_dir = Path(cfg.train.run_dir)
    n_micro = check_world(cfg, env.world_size)  # before anything is written
    lock, refused = None, [""]
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(run_dir)
        except RunLockedError as e:
            refused[0] = str(e)
    dist.broadcast_object_list(refused)  # every rank stops, not only rank 0
    if refused[0]:
        raise RunLockedError(refused[0])
    if env.rank == 0:
        (run_dir / STOPPED).unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.toml")
    L = cfg.data.seq_len
    torch.manual_seed(cfg.train.seed)

    dataset: PackedDataset | SFTDataset
    if cfg.train.stage == "pretrain":
        weights = cfg.data.weights or [1.0] * len(cfg.data.paths)
        dataset = PackedDataset(
            [SourceSpec(p, w) for p, w in zip(cfg.data.paths, weights)],
            seq_len=L,
            seed=cfg.data.seed,
            heldout_fraction=cfg.data.heldout_fraction,
        )
    else:  # fine-tuning: [finetune] records as [BOS] prompt [SEP] response [EOS] [PAD]... rows
        dataset = load_sft_dataset(cfg.finetune, L, cfg.data.seed, default_tokenizer=cfg.model.init_from)
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
    ckpt = Checkpointer(
        run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank, env.world_size, trainable_only=cfg.lora.rank > 0
    )
    return Trainer(cfg, env, run_dir, dataset, source, model, optimizer, scheduler, ckpt, n_micro, lock)


def resume(tr: Trainer) -> Progress:
    """Restore model, optimizer, schedule position and data position from the checkpoint that
    `checkpoint.resume` names ("auto": the newest intact one), or start fresh."""
    cfg, ckpt = tr.cfg, tr.ckpt
    if cfg.checkpoint.resume == "none":
        if ckpt.latest() is not None:
            raise ValueError(
                f"{tr.run_dir} already holds checkpoints but checkpoint.resume = 'none': "
                "choose a new train.run_dir, or resume"
            )
        return Progress()
    path = ckpt.resume_point(cfg.checkpoint.resume)
    if path is None:
        return Progress()
    state = ckpt.load(path, tr.model, tr.optimizer)
    # the position in the schedule comes from the checkpoint, the hyperparameters from the config
    tr.scheduler.load_state_dict({**state["scheduler"], "base_lrs": tr.scheduler.base_lrs})
    apply_hyperparameters(tr.optimizer, cfg.optim, state["step"], cfg.train.steps)
    data_state = DataState.from_dict(state["data"])
    check_resume(data_state, tr.dataset, allow_changed=cfg.data.allow_changed_index)
    logger.info("resumed from %s at step %d (%d samples consumed)", path, state["step"], data_state.consumed_samples)
    return Progress(state["step"], state["tokens_seen"], data_state.consumed_samples)


def trainer_state(tr: Trainer, progress: Progress, loader: StepLoader) -> dict:
    """What a checkpoint stores beside the model and optimizer."""
    return {
        "step": progress.step,
        "tokens_seen": progress.tokens_seen,
        "data": loader.state().to_dict(),
        "scheduler": tr.scheduler.state_dict(),
        "model_config": tr.source.config.to_dict(),
        "train_config": tr.cfg.to_dict(),
        "tokenizer_from": tr.source.tokenizer_from,
    }


class StepLog:
    """Steps whose numbers are still on the device. `flush` reads them back in one gather
    (raising on a non-finite step) and writes one metrics record per step; step times are the
    interval's average, measured after waiting for the device."""

    def __init__(self, tr: Trainer, metrics: MetricsLogger):
        self.tr, self.metrics = tr, metrics
        self.pending: list[tuple[int, StepStats, float, int, int]] = []
        self.t_start = time.perf_counter()
        self.peak = peak_flops(tr.env.device, tr.cfg.metrics.peak_tflops)
        self.flops_per_token = tr.model.flops_per_token(tr.cfg.data.seq_len)

    def add(self, step: int, stats: StepStats, data_wait_s: float, progress: Progress) -> None:
        self.pending.append((step, stats, data_wait_s, progress.tokens_seen, progress.consumed_samples))

    def flush(self) -> None:
        env, cfg = self.tr.env, self.tr.cfg
        values = read_stats([(s, st) for s, st, *_ in self.pending], env.world_size, env.rank)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        now = time.perf_counter()
        dt = (now - self.t_start) / max(len(self.pending), 1)
        tps = cfg.train.global_batch_size * cfg.data.seq_len / dt / env.world_size
        for (step, _, data_wait_s, tokens_seen, consumed), v in zip(self.pending, values):
            self.metrics.log(
                step,
                {
                    **v,
                    "tokens_per_s_per_device": tps,
                    "mfu": None if self.peak is None else tps * self.flops_per_token / self.peak,
                    "step_time_s": dt,
                    "data_wait_s": data_wait_s,
                    "peak_memory_gib": peak_memory_gib(env.device),
                    "tokens_seen": tokens_seen,
                    "consumed_samples": consumed,
                },
            )
        self.pending.clear()
        self.t_start = now


def train(tr: Trainer, progress: Progress, objective: Objective) -> Progress:
    """The loop: steps until train.steps or a stop signal, checkpoints on the interval, at the
    end and on a signal. Reads from the device only on log, sample and checkpoint steps."""
    cfg, env = tr.cfg, tr.env
    stop = StopRequest()
    loader = StepLoader(
        tr.dataset,
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        env.rank,
        env.world_size,
        consumed_samples=progress.consumed_samples,
        num_workers=cfg.data.num_workers,
        pin_memory=env.device.type == "cuda",
    )
    metrics = MetricsLogger(tr.run_dir, env.rank, progress.step, cfg.metrics.log_every, cfg.metrics.tensorboard)
    log = StepLog(tr, metrics)
    sample_tok = load_tokenizer(cfg.metrics.sample_tokenizer) if cfg.metrics.sample_every else None
    batches = iter(loader)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    while progress.step < cfg.train.steps:
        t0 = time.perf_counter()
        micro = [objective.to_device(mb, env.device) for mb in next(batches)]
        data_wait_s = time.perf_counter() - t0
        stats = train_step(tr.model, tr.optimizer, tr.scheduler, objective, micro, progress.step, cfg.optim.grad_clip)
        progress.step += 1
        progress.tokens_seen += tokens_per_step
        progress.consumed_samples = loader.consumed_samples
        step = progress.step
        log.add(step, stats, data_wait_s, progress)

        stopping = stop.agreed(env.world_size)
        interval = cfg.checkpoint.interval
        saving = stopping or step == cfg.train.steps or bool(interval and step % interval == 0)
        if saving or step == 1 or step % cfg.metrics.log_every == 0:
            log.flush()  # before a checkpoint: a non-finite step must fail the run, not be saved
        if cfg.metrics.sample_every and step % cfg.metrics.sample_every == 0:
            sample_text(tr.model, sample_tok, cfg, step, metrics)
        if saving:
            tr.ckpt.save(step, tr.model, tr.optimizer, trainer_state(tr, progress, loader))
        if stopping:
            if env.rank == 0:
                atomic_write_text(tr.run_dir / STOPPED, f"step {step}\n")  # tells the SLURM script to requeue
            logger.info("stop requested by signal: checkpoint at step %d written, exiting", step)
            break
    metrics.close()
    return progress


def finish(tr: Trainer, progress: Progress) -> None:
    """After the last step: the export and the DONE marker (the SLURM script does not requeue)."""
    if progress.step == tr.cfg.train.steps:
        if tr.env.rank == 0:
            latest = tr.ckpt.latest()
            if tr.cfg.checkpoint.export_at_end and latest is not None:  # the last step always checkpoints
                logger.info("exported %s", export_checkpoint(latest, tr.run_dir / "export"))
            atomic_write_text(tr.run_dir / "DONE", f"step {progress.step}\n")
        dist.barrier()


@record  # torchrun's failure summary then shows the exception, not just an exit code
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML file (see launch/configs/)")
    parser.add_argument("--check", action="store_true", help="validate the config (and WORLD_SIZE if set), then exit")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        if args.check:
            if "WORLD_SIZE" in os.environ:
                check_world(cfg, int(os.environ["WORLD_SIZE"]))
            print(f"config ok: {args.config}")
            return 0
        tr = setup(cfg)
    except (ConfigError, RunLockedError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, not one traceback per rank
            print(f"error: {e}", file=sys.stderr)
        return 2
    progress = resume(tr)
    objective: Objective
    if cfg.train.stage == "ar_sft":
        objective = ARObjective()
    else:
        mask_id = tr.source.config.mask_token_id
        if mask_id is None:
            raise ValueError("diffusion training needs a [MASK] token (model.mask_token)")
        dcfg = DiffusionConfig(mask_token_id=mask_id, **asdict(cfg.diffusion))
        objective = DiffusionObjective(dcfg, cfg.train.global_batch_size)
    progress = train(tr, progress, objective)
    finish(tr, progress)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
