"""The CPU budget of one medtl process: how many CPUs it may use, and how it splits them.

Servers are shared.  Torch's OpenMP threads spin for a while when they wait (for the next
parallel region, or for a team mate that another job has descheduled), and beside one busy
process on a 2-core machine that spinning left training a quarter of its quiet speed instead of
about half (docs/benchmarks.md, *Shared servers*).  So one place decides, once per process:

- the CPUs it may use: the affinity mask (``os.sched_getaffinity``), capped by the cgroup CPU
  quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded down, at least
  1), and under torchrun divided by ``LOCAL_WORLD_SIZE`` (each process its share);
- the split: torch's intra-op pool gets those CPUs, less those other processes kept busy as it
  started (at least one: two threads on two cores beside a busy neighbour trained slower than
  one); the inter-op pool one thread (eager-mode
  training and inference barely use it); each DataLoader worker one thread
  (:func:`worker_threads`, for torch and for numpy's BLAS), since workers prefetch and mostly wait;
- how idle OpenMP threads wait.  When other processes keep any of this process's CPUs busy as it
  starts (:func:`busy_cpus`), they spin briefly, then sleep (:data:`WAIT_POLICY`): spinning
  against a busy neighbour is what collapsed.  On idle CPUs the OpenMP default stays, since
  the short spin cost a quarter of the quiet speed of small models, whose many tiny parallel
  regions pay for every wake-up.  The OpenMP runtime reads this when it loads, at
  ``import torch``, so :func:`set_wait_policy` must run before that; the ``medtl`` command calls
  it before any command that runs a model.  Load that starts later is not seen.

``--threads N`` on the command line, else ``MEDTL_NUM_THREADS``, else an ``OMP_NUM_THREADS`` the
user set, gives the intra-op thread count instead; wait settings the user made
(``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``) are left as they are.  (torchrun
with several processes sets ``OMP_NUM_THREADS=1`` where the user did not; it is kept too.)  Python API
users call :func:`set_wait_policy` before importing torch and :func:`apply_budget` once, as the
command does.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_THREADS = "MEDTL_NUM_THREADS"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# GNU OpenMP (the Linux torch wheels) spins 300,000 rounds (milliseconds) by default before a
# waiting thread sleeps, Intel and LLVM OpenMP 200 ms.  1,000 rounds keep a quick hand-over
# between back-to-back parallel regions and give the core back to another job soon (measured:
# docs/benchmarks.md, Shared servers; KMP_BLOCKTIME, for Intel/LLVM builds, is not measured there).
WAIT_POLICY = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}
BUSY_AT_START = 0.5  # CPUs kept busy by other processes from which the short spin is set
PROC_STAT = Path("/proc/stat")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")

_wait: dict[str, str] = {}  # what set_wait_policy found or set, for the record
_applied: ThreadBudget | None = None
_busy_at_start: float | None = None  # CPUs other processes held when set_wait_policy looked


@dataclass(frozen=True)
class ThreadBudget:
    """How one process uses its CPUs: ``cpus`` usable (and why: ``cpus_from``), ``intra_op``
    threads (and who chose the number: ``source``), ``inter_op`` threads; DataLoader workers run
    one thread each; ``wait`` is the OpenMP wait setting in effect."""

    cpus: int
    cpus_from: str
    intra_op: int
    inter_op: int
    source: str
    wait: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "worker_threads": 1}

    def describe(self) -> str:
        return (f"{self.intra_op} intra-op thread(s) ({self.source}), {self.inter_op} inter-op, 1 per DataLoader worker; "
                f"{self.cpus} usable CPU(s) ({self.cpus_from}); OpenMP wait: {self.wait}")


def _quota_v2(file: Path) -> float | None:
    fields = file.read_text().split()  # "max 100000" or "150000 100000"
    if not fields or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1] if len(fields) > 1 else 100_000)


def _quota_v1(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())


def _levels(base: Path, path: str) -> list[Path]:
    """``base/path`` and each folder above it up to ``base`` (inside a container ``path`` may be
    the host's name for a cgroup mounted at ``base``: missing levels are skipped)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroup and its parents, in CPUs (cgroup v2
    ``cpu.max`` or v1 CFS quota), or None when there is none or it cannot be read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # the v2 unified hierarchy
            candidates = [(folder / "cpu.max", _quota_v2) for folder in _levels(root, path)]
        elif "cpu" in controllers.split(","):
            bases = dict.fromkeys([root / controllers, root / "cpu", root / "cpu,cpuacct"])
            candidates = [(folder, _quota_v1) for base in bases for folder in _levels(base, path)]
        else:
            continue
        for where, read in candidates:
            try:
                quota = read(where)
            except (OSError, ValueError):
                continue
            if quota is not None:
                limits.append(quota)
    return min(limits) if limits else None


def usable_cpus(env: Mapping[str, str] = os.environ, *, root: Path = CGROUP_ROOT,
                self_cgroup: Path = SELF_CGROUP) -> tuple[int, str]:
    """How many CPUs this process may keep busy, and why: the affinity mask, capped by the
    cgroup quota (rounded down, at least 1), divided among torchrun's local processes."""
    try:
        cpus, why = len(os.sched_getaffinity(0)), "affinity"
    except AttributeError:  # not on Linux
        cpus, why = os.cpu_count() or 1, "CPU count"
    quota = cgroup_cpu_limit(root, self_cgroup)
    if quota is not None and max(1, math.floor(quota)) < cpus:
        cpus, why = max(1, math.floor(quota)), f"cgroup quota {quota:g} CPUs"
    local = _whole(env.get("LOCAL_WORLD_SIZE", "1") or "1", "LOCAL_WORLD_SIZE")
    if local > 1:
        cpus, why = max(1, cpus // local), f"{why}, shared by {local} torchrun processes"
    return cpus, why


def _whole(text: str, name: str) -> int:
    """A positive whole number from an option or variable (OMP_NUM_THREADS may list nesting
    levels, ``4,2``: the first counts)."""
    try:
        value = int(text.split(",")[0])
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name}={text}: expected a positive whole number")
    return value


def plan(threads: int | None = None, env: Mapping[str, str] = os.environ, *, root: Path = CGROUP_ROOT,
         self_cgroup: Path = SELF_CGROUP, busy: float | None = None) -> ThreadBudget:
    """The budget for this process: ``threads`` (``--threads``), else ``MEDTL_NUM_THREADS``,
    else the user's ``OMP_NUM_THREADS``, else the usable CPUs that were idle at start (``busy``:
    CPUs other processes held then, as :func:`set_wait_policy` measured it; at least one), for
    the intra-op pool."""
    cpus, why = usable_cpus(env, root=root, self_cgroup=self_cgroup)
    busy = _busy_at_start if busy is None else busy
    if threads is not None:
        intra, source = _whole(str(threads), "--threads"), "--threads"
    elif env.get(ENV_THREADS):
        intra, source = _whole(env[ENV_THREADS], ENV_THREADS), ENV_THREADS
    elif env.get("OMP_NUM_THREADS"):
        intra, source = _whole(env["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    elif busy is not None and round(busy) >= 1:
        intra, source = max(1, cpus - round(busy)), f"usable CPUs idle at start ({busy:.1f} busy)"
    else:
        intra, source = cpus, "usable CPUs"
    return ThreadBudget(cpus=cpus, cpus_from=why, intra_op=intra, inter_op=1, source=source, wait=wait_setting(env))


def wait_setting(env: Mapping[str, str] = os.environ) -> str:
    """The OpenMP wait setting in effect, and who made it."""
    if _wait:
        return ", ".join(f"{k}={v}" for k, v in _wait.items() if k != "by") + f" ({_wait['by']})"
    made = {k: env[k] for k in WAIT_VARIABLES if env.get(k)}
    if made:
        return ", ".join(f"{k}={v}" for k, v in made.items()) + " (user)"
    return "OpenMP default" + (" (torch was imported before medtl could set it)" if "torch" in sys.modules else "")


def _cpu_times(stat: Path, cpus: set[int]) -> tuple[int, int]:
    """Total and idle (idle + iowait) jiffies of ``cpus`` from a ``/proc/stat`` file."""
    total = idle = 0
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total, idle = total + sum(values), idle + values[3] + values[4]
    return total, idle


def busy_cpus(interval: float = 0.1, *, stat: Path = PROC_STAT, cpus: set[int] | None = None) -> float | None:
    """How many of this process's CPUs (its affinity mask) were busy over ``interval`` seconds, by
    ``/proc/stat``; None where that cannot be read.  Called before torch loads, this process
    itself is idle, so what it sees is other processes' load."""
    import time

    try:
        cpus = set(os.sched_getaffinity(0)) if cpus is None else cpus
        total0, idle0 = _cpu_times(stat, cpus)
        time.sleep(interval)
        total1, idle1 = _cpu_times(stat, cpus)
    except (OSError, ValueError, AttributeError):
        return None
    total = total1 - total0
    return None if total <= 0 else len(cpus) * (1 - (idle1 - idle0) / total)


def set_wait_policy(env: MutableMapping[str, str] = os.environ, *, busy: float | None = None) -> str:
    """Make idle OpenMP threads sleep soon instead of spinning (:data:`WAIT_POLICY`) when other
    processes keep this process's CPUs busy (``busy``: measured by :func:`busy_cpus` unless
    given; unknown counts as busy), unless the user set any wait variable.  Only before torch is
    imported: afterwards the runtime has read its settings, and nothing is changed.  Returns the
    setting in effect."""
    global _busy_at_start
    made = {k: env[k] for k in WAIT_VARIABLES if env.get(k)}
    if made:
        _wait.update(made, by="user")
    elif "torch" not in sys.modules:
        busy = _busy_at_start = busy_cpus() if busy is None else busy
        if busy is None or busy >= BUSY_AT_START:
            env.update(WAIT_POLICY)
            seen = "load unknown" if busy is None else f"{busy:.1f} CPUs busy at start"
            _wait.update(WAIT_POLICY, by=f"medtl: {seen}")
        else:
            _wait.update({"OpenMP": "default"}, by=f"medtl: CPUs idle at start ({busy:.1f} busy)")
    return wait_setting(env)


def apply_budget(threads: int | None = None) -> ThreadBudget:
    """Plan the budget (:func:`plan`), set torch's thread pools to it and log it."""
    global _applied
    import torch

    budget = plan(threads)
    torch.set_num_threads(budget.intra_op)
    if torch.get_num_interop_threads() != budget.inter_op:
        try:
            torch.set_num_interop_threads(budget.inter_op)
        except RuntimeError:  # the pool started before (an earlier job in this process): it stays
            budget = ThreadBudget(**{**asdict(budget), "inter_op": torch.get_num_interop_threads()})
    _applied = budget
    log.info("threads: %s", budget.describe())
    return budget


def in_effect() -> dict[str, Any]:
    """What this process runs with, for a run's record: the applied budget, or torch's own
    thread counts when no budget was applied (a Python API caller's choice)."""
    if _applied is not None:
        return _applied.to_dict()
    import torch

    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            "source": "not set by medtl (Python API)", "wait": wait_setting()}


def worker_threads(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: one thread in this worker, for torch and for the
    BLAS/OpenMP pools numpy and scipy use."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` on a command that runs a model."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"Torch intra-op threads (default: {ENV_THREADS}, else OMP_NUM_THREADS, else the CPUs this "
                        "process may use: affinity, cgroup quota, torchrun share).")
