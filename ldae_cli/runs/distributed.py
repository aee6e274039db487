"""The processes a run is: torch.distributed set-up for `torchrun` launches (DDP; nccl on GPU, gloo on CPU),
multi-node ready; the device and the autocast precision each process computes in."""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ldae_cli.errors import LdaeError

PREEMPTIBLE = "LDAE_PREEMPTIBLE"  # set in an `ldae launch` job: the loop also stops cleanly on SIGUSR2


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """run.precision on `device`: bf16 autocast ('bf16', or 'auto' on CUDA), else None (fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if preference == "cuda":
        raise LdaeError("run.device is 'cuda' but no CUDA device is available; use run.device=auto or cpu")
    return torch.device("cpu")


def init(device_preference: str = "auto") -> DistContext:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain `ldae ...` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cpu":
        # adaLN-Zero layers start at zero, so Adam's second moments underflow to denormals, which
        # are ~50x slower on x86 CPUs; flushing them to zero changes nothing measurable
        torch.set_flush_denormal(True)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_cat(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (rank order); shapes may differ in dim 0."""
    if not ctx.enabled:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(ctx.world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros((biggest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def no_sync(runner: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync when `skip` (this micro-batch's gradients wait for the step's last one), else nothing."""
    return runner.no_sync() if skip else contextlib.nullcontext()  # type: ignore[operator]  # DDP's method


def ddp_wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP over `module`; its buffers (tokenizer bases, tables) are identical on every rank, so they are not
    re-broadcast each forward. torch 2.14 renamed that switch; older releases still take the old name."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync_buffers: dict[str, Any] = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **no_sync_buffers
    )
