"""Cheap statistics collection for training: `report()` anywhere, `Collector.update()` once per tick.

Every reported value is folded into running moments [count, sum, sum of squares] in float64, kept
per device so that `report()` never synchronises. `Collector.update()` sums the moments over devices
and, in a multi-process run, over ranks with a single all_reduce; it is therefore a collective call:
every rank must call it at the same point. Names reported on only some ranks are fine (the set of
names is agreed across ranks first); use `report0()` for values that only make sense once.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
import torch

import dnnlib

_num_moments = 3                 # [count, sum, sum of squares]
_counter_dtype = torch.float64   # float64 so that sums over days of training stay exact enough

_rank: int = 0
_sync_device: Optional[torch.device] = None   # device used for the all_reduce; None = pick automatically
_counters: dict = dict()         # name -> {device: tensor[3]} accumulated since the process started
_cumulative: dict = dict()       # name -> tensor[3] on CPU: everything already synchronised


def init_multiprocessing(rank: int, sync_device: Optional[torch.device]) -> None:
    """Declare this process's rank and the device used to all_reduce the statistics
    (typically `cuda:LOCAL_RANK` with NCCL; CPU with gloo). Call before the first `Collector.update()`.
    With sync_device=None the device is picked from the process group's backend."""
    global _rank, _sync_device
    _rank = rank
    _sync_device = torch.device(sync_device) if sync_device is not None else None


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _comm_device() -> torch.device:
    if _sync_device is not None:
        return _sync_device
    if torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def report(name: str, value: Any) -> Any:
    """Add the elements of `value` (tensor, number, list or array) to the statistic `name`;
    returns `value` unchanged so it can wrap an expression. An empty value registers the name only."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_counter_dtype)
    moments = torch.stack([
        torch.ones_like(elems).sum(),
        elems.sum(),
        elems.square().sum(),
    ])
    assert moments.ndim == 1 and moments.shape[0] == _num_moments
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value


def report0(name: str, value: Any) -> Any:
    """Like `report()`, but only rank 0's value counts (other ranks just register the name)."""
    report(name, value if _rank == 0 else [])
    return value


def _sync(names: list) -> list:
    """Return [(name, cumulative moments)] summed over devices and ranks (collective when multi-process)."""
    if len(names) == 0 and _world_size() == 1:
        return []

    world = _world_size()
    if world > 1:
        # Agree on the union of names so that every rank reduces the same vector in the same order.
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, sorted(names))
        all_names = sorted(set().union(*[set(g) for g in gathered]))
        device = _comm_device()
    else:
        all_names = sorted(names)
        device = torch.device('cpu')

    # Collect this process's new moments since the last sync, summed over devices.
    deltas = torch.zeros([len(all_names), _num_moments], dtype=_counter_dtype, device=device)
    for row, name in enumerate(all_names):
        for counter in _counters.get(name, {}).values():
            deltas[row] += counter.to(device)
            counter.zero_()
    if world > 1 and len(all_names) > 0:
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()

    result = []
    for row, name in enumerate(all_names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[row])
        if name not in _counters:
            _counters[name] = dict()  # reported on another rank only: register it here too
        result.append((name, _cumulative[name]))
    return result


class Collector:
    """Averages of the reported statistics whose names fully match `regex`, over the interval
    between the last two `update()` calls. With keep_previous=True a statistic that received no new
    values keeps its previous averages instead of becoming empty."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative: dict = dict()
        self._moments: dict = dict()
        # Start from what has already been synchronised (no communication at construction time).
        for name in self.names():
            if name in _cumulative:
                self._cumulative[name] = _cumulative[name].clone()

    def names(self) -> list:
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Collective: fetch what was reported since the last call (all devices, all ranks)."""
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if not self._regex.fullmatch(name):
                continue
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name: str) -> torch.Tensor:
        assert self._regex.fullmatch(name), f'"{name}" does not match this Collector\'s regex'
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name: str) -> int:
        return int(self._get_delta(name)[0])

    def mean(self, name: str) -> float:
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name: str) -> float:
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - np.square(mean), 0)))  # population std, as the moments give

    def as_dict(self) -> dnnlib.EasyDict:
        """{name: EasyDict(num, mean, std)} for every statistic seen; ready for json.dumps()."""
        stats = dnnlib.EasyDict()
        for name in self.names():
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


# Global collector that the training loop updates once per tick.
default_collector = Collector()
