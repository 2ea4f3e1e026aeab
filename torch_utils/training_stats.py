"""Cheap statistics collection for training: `report()` anywhere, `Collector.update()` once per tick.

Every reported value is folded into running moments [count, sum, sum of squares] in float64, kept
per device so that `report()` never synchronises. `Collector.update()` sums the moments over devices
and, in a multi-process run, over ranks with a single all_reduce; it is therefore a collective call:
every rank must call it at the same point. Names reported on only some ranks are fine (the set of
names is agreed across ranks first); use `report0()` for values that only make sense once.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Optional

import numpy as np
import torch

import dnnlib

# Layout of one statistic's accumulator: index 0 = how many values, 1 = their sum, 2 = sum of squares.
_COUNT, _SUM, _SUM_SQ = 0, 1, 2
_MOMENTS = 3
_DTYPE = torch.float64  # float64 so that sums over days of training stay exact enough


class _Registry:
    """Process-wide state shared by report() and every Collector."""

    def __init__(self):
        self.rank: int = 0
        self.reduce_device: Optional[torch.device] = None  # None = choose from the process group backend
        # name -> {device: moments tensor}: values reported since the last synchronisation.
        self.pending: dict = dict()
        # Every live Collector: each synchronisation hands them the new moments, and each keeps its own
        # sums since its last update() (not differences of running totals, which one NaN or Inf would
        # poison for the rest of the run).
        self.collectors = weakref.WeakSet()

    def register(self, name: str) -> None:
        self.pending.setdefault(name, dict())


_registry = _Registry()


def init_multiprocessing(rank: int, sync_device: Optional[torch.device]) -> None:
    """Declare this process's rank and the device used to all_reduce the statistics
    (typically `cuda:LOCAL_RANK` with NCCL; CPU with gloo). Call before the first `Collector.update()`.
    With sync_device=None the device is picked from the process group's backend."""
    _registry.rank = rank
    _registry.reduce_device = torch.device(sync_device) if sync_device is not None else None


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _reduce_device() -> torch.device:
    """NCCL can only reduce CUDA tensors; gloo reduces CPU tensors."""
    if _registry.reduce_device is not None:
        return _registry.reduce_device
    if torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _moments_of(values: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] of a flat float64 tensor, on the tensor's own device."""
    return torch.stack([torch.ones_like(values).sum(), values.sum(), values.square().sum()])


def report(name: str, value: Any) -> Any:
    """Add the elements of `value` (tensor, number, list or array) to the statistic `name`;
    returns `value` unchanged so it can wrap an expression. An empty value registers the name only."""
    _registry.register(name)
    values = torch.as_tensor(value)
    if values.numel() == 0:
        return value
    moments = _moments_of(values.detach().flatten().to(_DTYPE))
    per_device = _registry.pending[name]
    if moments.device in per_device:
        per_device[moments.device].add_(moments)
    else:
        per_device[moments.device] = moments.clone()
    return value


def report0(name: str, value: Any) -> Any:
    """Like `report()`, but only rank 0's value counts (other ranks just register the name)."""
    report(name, value if _registry.rank == 0 else [])
    return value


def _agreed_names(local_names: list) -> list:
    """Sorted union of the names known on any rank, so that every rank reduces rows in the same order."""
    world = _world_size()
    if world == 1:
        return sorted(local_names)
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, sorted(local_names))
    return sorted(set().union(*per_rank))


def _drain_pending(names: list, device: torch.device) -> torch.Tensor:
    """This process's not yet synchronised moments as a [len(names), 3] matrix (summed over devices);
    the per-device accumulators are reset."""
    rows = torch.zeros([len(names), _MOMENTS], dtype=_DTYPE, device=device)
    for row, name in enumerate(names):
        for moments in _registry.pending.get(name, {}).values():
            rows[row] += moments.to(device)
            moments.zero_()
    return rows


def _synchronise(local_names: list) -> list:
    """Collective: gather what every rank reported under the agreed names, hand it to every live
    Collector, and return [(name, new moments)]."""
    world = _world_size()
    if world == 1 and not local_names:
        return []
    names = _agreed_names(local_names)
    device = _reduce_device() if world > 1 else torch.device('cpu')
    new_moments = _drain_pending(names, device)
    if world > 1 and names:
        torch.distributed.all_reduce(new_moments)
    new_moments = new_moments.cpu()

    result = []
    for row, name in enumerate(names):
        _registry.register(name)  # may have been reported on another rank only
        result.append((name, new_moments[row]))
    for collector in list(_registry.collectors):
        collector._absorb(result)
    return result


class Collector:
    """Averages of the reported statistics whose names fully match `regex`, over the interval
    between the last two `update()` calls. With keep_previous=True a statistic that received no new
    values keeps its previous averages instead of becoming empty."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._pattern = re.compile(regex)
        self._keep_previous = keep_previous
        self._unseen: dict = dict()    # name -> moments synchronised since the last update()
        self._interval: dict = dict()  # name -> moments gathered between the last two update()s
        _registry.collectors.add(self)  # begins with what is synchronised from now on

    def _absorb(self, synchronised: list) -> None:
        for name, moments in synchronised:
            if self._pattern.fullmatch(name):
                self._unseen[name] = self._unseen[name] + moments if name in self._unseen else moments.clone()

    def names(self) -> list:
        return [name for name in _registry.pending if self._pattern.fullmatch(name)]

    def update(self) -> None:
        """Collective: fetch what was reported since the last call (all devices, all ranks)."""
        if not self._keep_previous:
            self._interval.clear()
        _synchronise(self.names())
        for name, since_last in self._unseen.items():
            if float(since_last[_COUNT]) != 0:
                self._interval[name] = since_last
        self._unseen = dict()

    def _moments(self, name: str) -> torch.Tensor:
        assert self._pattern.fullmatch(name), f'"{name}" does not match this Collector\'s regex'
        return self._interval.setdefault(name, torch.zeros([_MOMENTS], dtype=_DTYPE))

    def num(self, name: str) -> int:
        return int(self._moments(name)[_COUNT])

    def mean(self, name: str) -> float:
        moments = self._moments(name)
        count = int(moments[_COUNT])
        return float('nan') if count == 0 else float(moments[_SUM] / moments[_COUNT])

    def std(self, name: str) -> float:
        moments = self._moments(name)
        count = int(moments[_COUNT])
        if count == 0 or not np.isfinite(float(moments[_SUM])):
            return float('nan')
        if count == 1:
            return 0.0
        # Population std from the raw moments: E[x^2] - E[x]^2, clipped at 0 against rounding.
        mean = float(moments[_SUM] / moments[_COUNT])
        mean_of_squares = float(moments[_SUM_SQ] / moments[_COUNT])
        return float(np.sqrt(max(mean_of_squares - np.square(mean), 0)))

    def as_dict(self) -> dnnlib.EasyDict:
        """{name: EasyDict(num, mean, std)} for every statistic seen; ready for json.dumps()."""
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                                for name in self.names()})

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


# Global collector that the training loop updates once per tick.
default_collector = Collector()
