"""Running one job on several processes with ``torchrun`` / ``torch.distributed``.

``torchrun --nproc_per_node N -m colaprob score ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. ``from_environment`` reads
them and joins the process group (gloo on CPU, nccl when each rank has a GPU). Work is split
by a fixed rule, ``batch i -> rank i % world_size``, so which rank computes a batch never
changes its numbers: a batch is scored from its own sequences and seeds alone. Every rank
writes its own shard files; after a barrier rank 0 merges them. Without those variables (or
with ``WORLD_SIZE=1``) everything runs in this one process and no process group is made.

The launch environment is checked before anything else: torchrun's variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) come all together or not at
all, as integers in range, and a world of several processes needs ``MASTER_ADDR`` and
``MASTER_PORT`` as well (alone, those two are ignored: a single-process ``accelerate
launch`` sets them). ``accelerate launch --multi_gpu --num_processes N`` starts its processes
through torchrun's machinery and sets the same variables, on CPUs as on GPUs. Under SLURM's ``srun``
without torchrun, ``SLURM_PROCID`` of ``SLURM_NTASKS`` are the rank and world size,
``SLURM_LOCALID`` the local rank, and the job's first host (``SLURM_JOB_NODELIST``) the
rendezvous address, at port ``SLURM_PORT_BASE + SLURM_JOB_ID % 1000``: start one task per
process (``srun --ntasks N colaprob score ...``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from colaprob.errors import ColaprobError

# A rank may wait at a barrier while the others finish their share of a long corpus.
BARRIER_TIMEOUT = timedelta(hours=12)
SLURM_PORT_BASE = 29500


class ReportedByRankZero(ColaprobError):
    """A failure that rank 0 reports for every rank; the other ranks exit without a word."""

    quiet = True


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

    def agree(self, step, share: bool = False):
        """Run ``step()`` on every rank and return its result once all ranks have finished
        it (``share``: every rank's result, in rank order; they must be picklable).

        If it raised on any rank, every rank raises, so no rank waits forever at a later
        barrier: for a ``ColaprobError`` (or an ``OSError``), rank 0 with the first failing
        rank's sentence and the others quietly (``ReportedByRankZero``), so the mistake is
        said once; for any other exception (a bug) the failing rank re-raises it with its
        traceback and the others stop quietly. A single process just runs it."""
        if not self.is_distributed:
            value = step()
            return [value] if share else value
        value, error, message = None, None, None
        try:
            value = step()
        except ColaprobError as err:
            error, message = err, "" if getattr(err, "quiet", False) else str(err)
        except OSError as err:
            error, message = err, f"{err.strerror or err} ({getattr(err, 'filename', '') or 'no file'})."
        except Exception as err:
            error, message = err, None
        bug = error is not None and message is None
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (message, bug, value if share and error is None else None))
        if bug:
            raise error
        if any(other_bug for _, other_bug, _ in gathered):
            raise ReportedByRankZero("another rank failed")
        failures = [(rank, text) for rank, (text, _, _) in enumerate(gathered) if text is not None]
        if failures:
            rank, text = next(((r, t) for r, t in failures if t), failures[0])
            if self.is_main:
                raise ColaprobError(text if rank == 0 else f"on rank {rank}: {text}")
            raise ReportedByRankZero(text)
        return [shared for _, _, shared in gathered] if share else value

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
    launch = launch_environment(os.environ)
    rank, world_size, local_rank = launch.get("RANK", 0), launch.get("WORLD_SIZE", 1), launch.get("LOCAL_RANK", 0)
    use_cuda = _use_cuda(device)
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ColaprobError(f"LOCAL_RANK is {local_rank}, but this machine has {torch.cuda.device_count()} GPUs; start one process per GPU.")
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{launch['MASTER_ADDR']}:{launch['MASTER_PORT']}",
            rank=rank,
            world_size=world_size,
            timeout=BARRIER_TIMEOUT,
        )
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def launch_environment(env) -> dict:
    """``{RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT}`` of a torchrun-style launch
    (or of SLURM's, mapped to those), ``{}`` for a single process; a partial or malformed
    environment is one ``ColaprobError`` naming the variable."""
    ranks = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [name for name in ranks if name in env]
    if not present:
        return _slurm_environment(env)
    missing = [name for name in ranks if name not in env]
    if missing:
        raise ColaprobError(
            f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: start distributed runs with torchrun (which sets them all), "
            f"or unset {', '.join(present)} to run one process."
        )
    launch = {name: _integer(env, name) for name in ranks}
    _check_ranks(launch, "WORLD_SIZE", "RANK")
    if launch["WORLD_SIZE"] == 1:
        return {}
    unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
    if unset:
        raise ColaprobError(
            f"WORLD_SIZE is {launch['WORLD_SIZE']} but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set, so the "
            "processes cannot find each other: start distributed runs with torchrun, or unset RANK, WORLD_SIZE and LOCAL_RANK."
        )
    launch.update(MASTER_ADDR=env["MASTER_ADDR"], MASTER_PORT=_integer(env, "MASTER_PORT"))
    return launch


def _slurm_environment(env) -> dict:
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    world_size, rank = _integer(env, "SLURM_NTASKS"), _integer(env, "SLURM_PROCID")
    launch = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": _integer(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0}
    _check_ranks(launch, "SLURM_NTASKS", "SLURM_PROCID")
    if world_size == 1:
        return {}
    hosts = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not hosts or "SLURM_JOB_ID" not in env:
        raise ColaprobError(
            "SLURM_PROCID and SLURM_NTASKS are set without SLURM_JOB_NODELIST and SLURM_JOB_ID, so the tasks cannot find "
            "each other; start the run with srun inside a job, or with torchrun."
        )
    launch.update(MASTER_ADDR=first_host(hosts), MASTER_PORT=SLURM_PORT_BASE + _integer(env, "SLURM_JOB_ID") % 1000)
    return launch


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[03-05,9],gpu1`` -> ``node03``."""
    match = re.match(r"([^,\[]+)(?:\[([^],-]+))?", nodelist.strip())
    if not match:
        raise ColaprobError(f"SLURM_JOB_NODELIST {nodelist!r} names no host.")
    return match.group(1) + (match.group(2) or "")


def _integer(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ColaprobError(f"{name} is {env[name]!r}, which is not an integer; check the launcher's environment.") from None


def _check_ranks(launch: dict, world_name: str, rank_name: str) -> None:
    if launch["WORLD_SIZE"] < 1:
        raise ColaprobError(f"{world_name} is {launch['WORLD_SIZE']}, but a run needs at least one process.")
    if not 0 <= launch["RANK"] < launch["WORLD_SIZE"]:
        raise ColaprobError(f"{rank_name} is {launch['RANK']}, outside 0..{launch['WORLD_SIZE'] - 1} for {world_name} {launch['WORLD_SIZE']}.")
    if launch["LOCAL_RANK"] < 0:
        raise ColaprobError(f"LOCAL_RANK is {launch['LOCAL_RANK']}, but it must be 0 or more.")


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
