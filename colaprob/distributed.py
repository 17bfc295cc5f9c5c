"""Running one job on several processes with ``torchrun`` / ``torch.distributed``.

``torchrun --nproc_per_node N -m colaprob score ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. ``from_environment`` reads
them and joins the process group (gloo on CPU, nccl when each rank has a GPU). Work is split
by a fixed rule, ``batch i -> rank i % world_size``, so which rank computes a batch never
changes its numbers: a batch is scored from its own sequences and seeds alone. Every rank
writes its own shard files; after a barrier rank 0 merges them. Without those variables (or
with ``WORLD_SIZE=1``) everything runs in this one process and no process group is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from colaprob.errors import ColaprobError

# A rank may wait at a barrier while the others finish their share of a long corpus.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: ``rank`` of ``world_size`` processes,
    ``device`` the torch device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, checks the run folder and merges."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, batch_index: int) -> bool:
        """Whether this rank computes batch ``batch_index`` (``i % world_size == rank``)."""
        return batch_index % self.world_size == self.rank

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for in a single process)."""
        if self.is_distributed:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True iff ``ok`` on every rank, so that all ranks take the same branch after a
        step that may fail on only some of them."""
        if not self.is_distributed:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.device)
        dist.all_reduce(flag)
        return int(flag.item()) == 0


def from_environment(device: str = "auto") -> Context:
    """The context of this process: distributed under ``torchrun``, else a single process.

    ``device``: ``"auto"`` (the GPU of this rank's ``LOCAL_RANK`` when CUDA is available,
    else the CPU), ``"cpu"`` or ``"cuda"``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = _use_cuda(device)
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def shutdown(ctx: Context) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def _use_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ColaprobError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
        return True
    if device == "auto":
        return torch.cuda.is_available()
    raise ColaprobError(f"unknown device {device!r}; use auto, cpu or cuda.")
