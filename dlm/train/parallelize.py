"""Distribution applied from outside the single-device model (docs/design.md §6):

    init_distributed -> build on meta -> apply_ac -> apply_compile -> apply_fsdp -> to_empty
    -> load_weights (one full tensor at a time, each rank keeps only its shard)

One code path for one CPU process (gloo), eight GPUs (NCCL) and many nodes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from dlm.models import GPT2, Llama
from dlm.train.config import ParallelSection


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh


def free_port() -> int:
    """An unused local TCP port (for a single-process rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment; a plain `python` launch
    becomes a world of one so the same FSDP code path runs."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but CUDA is not available on this machine")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"  # gloo for the few CPU-side collectives (none by default)
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend=backend, device_id=dev if device == "cuda" else None)
    world = dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistEnv(dist.get_rank(), world, local_rank, dev, mesh)


def apply_ac(model: Llama | GPT2, cfg: ParallelSection) -> None:
    """Activation checkpointing per block: "full" recomputes every block in backward,
    "selective" every `selective_every`-th one (trading memory for less recompute)."""
    if cfg.activation_checkpoint == "none":
        return
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpoint == "full" or i % cfg.selective_every == 0:
            # preserve_rng_state=False: blocks draw no random numbers (no dropout)
            model.layers.register_module(str(i), checkpoint_wrapper(block, preserve_rng_state=False))


def apply_compile(model: Llama | GPT2) -> None:
    """torch.compile each block in place (names unchanged); blocks are identical, so one graph."""
    for block in model.layers:
        block.compile(fullgraph=False)


def mixed_precision(cfg: ParallelSection, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU (exact tests).
    Forward inputs are not cast: blocks get activations already in bf16 and integer layouts, and
    casting would copy each block's `AttentionLayout`, losing the masks its layers share."""
    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "fp32"
    if mode == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def apply_fsdp(model: Llama | GPT2, mesh: DeviceMesh, cfg: ParallelSection, device: torch.device) -> None:
    """FSDP2: shard each block, then the root (embeddings, final norm, head).

    The loss is already divided by the global count of loss-eligible tokens, so the gradient of
    the global loss is the SUM of per-rank gradients: reduction divides by 1, not world size."""
    mp = mixed_precision(cfg, device)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again first in backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


@torch.no_grad()
def load_weights(model: nn.Module, tensor: Callable[[str], torch.Tensor]) -> None:
    """Fill a sharded (materialised) model from full tensors produced one at a time by
    `tensor(name)`: every rank reads the tensor, keeps its own shard and drops the rest, so no
    rank ever holds the whole model. Names are the model's state-dict keys."""
    params = model.state_dict()  # DTensor views of the live sharded parameters
    for name, param in params.items():
        full = tensor(name)
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"weight {name}: source shape {tuple(full.shape)} != model shape {tuple(param.shape)}")
        if isinstance(param, DTensor):
            # src_data_rank=None: each rank slices locally, nothing is sent
            shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
        del full


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm over all shards (clipping when max_norm > 0), as a plain fp64 tensor.

    The sum of squares is accumulated in fp64: in fp32 its rounding depends on how the gradients
    are sharded, so a run resumed on another number of ranks would drift (1e-4 relative at step 1)."""
    norms, groups = [], set()
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if not all(pl.is_shard() for pl in g.placements):
                raise NotImplementedError(f"gradient norm of a DTensor placed {g.placements} (only FSDP shards)")
            groups.add(g.device_mesh.get_group())
            g = g.to_local()
        norms.append(torch.linalg.vector_norm(g, dtype=torch.float64))
    if len(groups) > 1:
        raise NotImplementedError("gradients sharded over more than one process group")
    sq = torch.stack(norms).square().sum()
    if groups:
        dist.all_reduce(sq, group=groups.pop())  # fp64 SUM of the per-rank sums of squares
    total = sq.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), max_norm, total, foreach=True)
    return total
