"""Process-group set-up for torchrun (NCCL on CUDA, gloo on CPU) and rank-aware helpers.

Every entry point calls init(); afterwards a process group always exists (a 1-process gloo group when
not launched by torchrun) so DDP and all_reduce need no special cases for single-process runs.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A currently unused localhost TCP port (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def init(backend: str | None = None, timeout_minutes: float = 30) -> None:
    """Initialise torch.distributed once per process; safe to call again."""
    if dist.is_available() and dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = 'nccl' if cuda and dist.is_nccl_available() else 'gloo'
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if 'WORLD_SIZE' in os.environ:  # launched by torchrun: env:// rendezvous
        if cuda:
            torch.cuda.set_device(get_local_rank())
        dist.init_process_group(backend=backend, init_method='env://', timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=f'tcp://127.0.0.1:{free_port()}',
                                rank=0, world_size=1, timeout=timeout)
    # Tear the group down before interpreter shutdown: a gloo/NCCL group left to the destructors can
    # abort the process ('terminate called without an active exception') and fail a finished run.
    atexit.register(shutdown)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def is_main() -> bool:
    return get_rank() == 0


def default_device() -> torch.device:
    """The device this rank should use: its own GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', get_local_rank())
    return torch.device('cpu')


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_ranks_ok(ok: bool) -> bool:
    """True iff every rank reports ok: a collective, so all ranks learn of a failure on any one of them
    (instead of the others waiting in the next collective until its timeout)."""
    if get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=default_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def rank0_first(fn, other_error=lambda: RuntimeError('failed on another process; see its message')):
    """Run fn() on rank 0 first, then on the other ranks (rank 0 fills download caches the others then
    read). If fn raises on any rank, every rank raises: the failing ranks their own exception, the others
    `other_error()`. Returns fn()'s result."""
    result, error = None, None
    for turn in (0, 1):
        if (get_rank() == 0) == (turn == 0):
            try:
                result = fn()
            except Exception as e:  # re-raised below, after every rank has heard of it
                error = e
        if not all_ranks_ok(error is None):
            raise error if error is not None else other_error()
    return result


def shutdown() -> None:
    if is_initialized():
        # Objects in reference cycles that hold the group (DDP's reducer after a training run) are freed now,
        # while the process is alive: left to interpreter teardown, their gloo threads aborted about half of
        # the finished 2-rank CPU runs here ('terminate called without an active exception', exit -6).
        gc.collect()
        dist.destroy_process_group()


def should_stop() -> bool:
    """Hook for cluster schedulers; the training loop also stops on SIGTERM/SIGINT."""
    return False


def update_progress(cur: int, total: int) -> None:
    """Hook for cluster schedulers (no-op here)."""
    del cur, total


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs)
