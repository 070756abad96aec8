"""Data-parallel training through PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for every process; ``setup``
reads them and joins the process group (nccl on CUDA, gloo on the CPU). Without torchrun nothing here does
anything: one process, rank 0 of 1. There is no cluster code of our own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fusionprof.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics, TensorBoard events and traces; the others only compute."""
        return self.rank == 0


SINGLE = Dist()  # one process: rank 0 of 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    """This process's global rank under torchrun; 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group if there is one; returns it and this process's device.

    On CUDA each process takes the GPU of its LOCAL_RANK, whatever index ``--device`` named.
    """
    if not launched_by_torchrun():
        return SINGLE, device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU: only {torch.cuda.device_count()} visible on this node "
                            "(use --nproc_per_node at most the number of GPUs)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local, backend), device


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


@contextlib.contextmanager
def local_first(d: Dist):
    """Each node's local rank 0 runs the block first (it writes the node's data caches); its peers then read them."""
    if d.local_rank != 0:
        barrier(d)
    yield
    if d.local_rank == 0:
        barrier(d)


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(d: Dist, obj):
    """Every rank's ``obj``, in rank order (a list of one without torchrun)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(d: Dist, model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so all ranks evaluate one model."""
    if d.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
