"""Data-parallel training under ``torchrun``: process group, ranks, sharded evaluation.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and
the rendezvous address; :func:`distributed_session` joins the group from those variables (NCCL
on GPU, gloo on CPU) and leaves it at the end.  Without them every helper here answers for a
single process, so the same code runs with and without ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")
_alone = False  # inside solo(): this rank works on a model of its own


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process, outside :func:`solo`."""
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def solo() -> Iterator[None]:
    """Inside the block this rank works alone: every helper here answers as for a single process
    (no gradient averaging, no sharded evaluation; it is the main process of its own work), so
    each rank can train a model of its own.  The process group stays for what follows."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files."""
    return rank() == 0


def join_process_group(timeout_minutes: float = 30.0) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPU, each
    process on its ``LOCAL_RANK`` device; gloo on CPU).  True when this call joined it; False
    when there is nothing to join (``WORLD_SIZE`` absent or 1) or it was joined before."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return True


@contextmanager
def distributed_session(timeout_minutes: float = 30.0) -> Iterator[None]:
    """:func:`join_process_group` for the length of the block, leaving the group at the end."""
    joined = join_process_group(timeout_minutes)
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks (itself in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a run folder name made from the clock)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_sharded(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble a tensor sharded by ``DistributedSampler(shuffle=False)``.

    Rank ``r`` holds rows ``r, r + W, r + 2W, ...`` of the padded index list (every rank holds
    the same number of rows); gathering, interleaving and cutting at ``total`` gives every row
    of the dataset once, in dataset order, with the sampler's padding duplicates dropped."""
    if not is_distributed():
        return local[:total]
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]


def one_per_rank(jobs: Sequence[T], work: Callable[[T], R], *, wait_hours: float = 72.0) -> list[R] | None:
    """Rank ``k`` runs ``work(jobs[k])`` on its own (inside :func:`solo`); ranks beyond the jobs
    only wait.  Rank 0 returns every result in job order, the other ranks None.  Needs at least as
    many ranks as jobs.  The results (picklable, on the CPU) travel to rank 0 over a gloo group
    whose timeout is ``wait_hours``: a rank that finishes early waits for the slowest job, which
    may take far longer than the default group's collective timeout."""
    if len(jobs) > world_size():
        raise ValueError(f"{len(jobs)} jobs need at least as many ranks; there are {world_size()}")
    me = rank()
    if not is_distributed():
        return [work(job) for job in jobs]
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=wait_hours))  # before the work: every rank is here
    result = None
    if me < len(jobs):
        with solo():
            result = work(jobs[me])
    gathered: list[Any] | None = [None] * world_size() if me == 0 else None
    dist.gather_object(result, gathered, dst=0, group=group)
    dist.destroy_process_group(group)
    return gathered[: len(jobs)] if gathered is not None else None
