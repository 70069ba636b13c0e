"""A worker's CPU cores: its device on a machine without GPUs.

A worker that owns cores runs only there, with as many compute threads as cores, and its idle
threads sleep instead of spinning. Two workers on one machine then behave like two machines:
neither steals the other's cycles. Without this, each torch process sizes its thread pool to
every core of the machine, and OpenMP threads spin after each parallel region, so two workers
on two cores run four busy threads and slow each other several times over.

    env = thread_env(len(cores))   # set before torch loads (a worker's process environment)
    bind_cores(cores)              # in the worker process, before the model runs

The engine itself never picks cores: the deployment decides (deploy/cluster.py) and the
workers bind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# OpenMP and BLAS read these when they load, so a process must have them from its start.
_THREAD_COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env(num_threads: int) -> dict[str, str]:
    """Environment for a process that computes on `num_threads` cores of its own: that many
    OpenMP/BLAS threads, which sleep when idle (a spinning thread holds a core that another
    thread of the process, or another worker, needs)."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return {
        **{name: str(num_threads) for name in _THREAD_COUNT_VARS},
        "OMP_WAIT_POLICY": "PASSIVE",
        "KMP_BLOCKTIME": "0",
    }


def available_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def bind_cores(cores: Sequence[int]) -> None:
    """Run this process, every thread it has and every thread it starts, on `cores` only, with
    torch's intra-op pool sized to them. Linux pins per thread, so each existing thread (Ray's,
    torch's, OpenMP's) is pinned by its id; new threads inherit the calling thread's mask."""
    import torch

    cores = sorted(set(cores))
    if not cores:
        raise ValueError("bind_cores needs at least one core")
    missing = set(cores) - set(available_cores())
    if missing:
        raise ValueError(
            f"cores {sorted(missing)} are not available to this process (it may run on {available_cores()})"
        )
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            continue
    torch.set_num_threads(len(cores))


def process_cores() -> tuple[tuple[int, ...], int]:
    """The cores any thread of this process may run on, and torch's compute thread count."""
    import torch

    cores = set().union(*thread_cores().values())
    return tuple(sorted(cores)), torch.get_num_threads()


def thread_cores() -> dict[int, set[int]]:
    """Each thread of this process and the cores it may run on (for tests and diagnostics)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.sched_getaffinity(int(tid))
        except ProcessLookupError:
            continue
    return out
