"""Metrics during training (`train.py --metrics=fid,kid`): the EMA network scored at snapshot ticks on a fixed
seed set, on every rank. Rank 0 appends each result to RUN/metrics.jsonl, returns the stats.jsonl entries
(`Metrics/<key>`), and redraws RUN/metric-<key>.png, the metric against kimg (error bars when it has an
interval)."""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Optional

import torch

from metrics.detectors import load_detector
from metrics.features import NetworkSource
from metrics.reference import load_reference
from metrics.scoring import check, score
from torch_utils import distributed as dist

# Keys drawn as curves, with the keys of their interval ends.
CURVES = {'fid': ('fid_lo', 'fid_hi'), 'kid': (None, None), 'precision': (None, None), 'recall': (None, None),
          'fd_dinov2': (None, None)}


class TrainingMetrics:
    """Loaded once at the start of training (reference, detector); `__call__(net, cur_nimg, snapshot)` scores."""

    def __init__(self, run_dir: Optional[str], metrics, ref: str, detector: Optional[str] = None, num: int = 1000,
                 max_batch_size: int = 64, sampler_kwargs: Optional[dict] = None, options: Optional[dict] = None,
                 device=torch.device('cpu')):
        self.run_dir, self.device, self.max_batch_size = run_dir, torch.device(device), max_batch_size
        self.metrics, self.seeds = list(metrics), list(range(num))
        self.sampler_kwargs, self.options = dict(sampler_kwargs or {}), options
        self.ref = load_reference(ref, verbose=dist.get_rank() == 0)
        check(self.metrics, self.ref, detector)
        self.detector = dist.rank0_first(lambda: load_detector(detector, device=self.device,
                                                               verbose=dist.get_rank() == 0))
        self.total_sec = 0.0

    def __call__(self, net: torch.nn.Module, cur_nimg: int, snapshot: Optional[str] = None) -> dict:
        """Score `net` (a copy is put in eval mode on this rank's device); every rank takes part. Returns
        {'Metrics/<key>': {num, mean, std}} for stats.jsonl (on every rank) and the seconds it took."""
        start = time.time()
        net = copy.deepcopy(net).eval().requires_grad_(False).to(self.device)
        source = NetworkSource(net, self.seeds, self.max_batch_size, name='EMA network', **self.sampler_kwargs)
        results = score(self.metrics, source, self.ref, self.detector, device=self.device, options=self.options,
                        desc=f'metrics at {cur_nimg / 1000:.1f} kimg')
        if dist.get_world_size() > 1:
            box = [results]
            torch.distributed.broadcast_object_list(box, src=0)
            results = box[0]
        seconds = time.time() - start
        self.total_sec += seconds
        values = {k: v for k, v in results.items() if k not in ('num_images', 'seconds')}
        if dist.get_rank() == 0 and self.run_dir is not None:
            record = dict(kimg=cur_nimg / 1000, cur_nimg=int(cur_nimg), results=values, num_images=results['num_images'],
                          seconds=seconds, snapshot_pkl=snapshot, metrics=self.metrics, timestamp=time.time())
            with open(os.path.join(self.run_dir, 'metrics.jsonl'), 'at') as f:
                f.write(json.dumps(record) + '\n')
            write_curves(self.run_dir)
        stats = {f'Metrics/{k}': dict(num=1, mean=float(v), std=0.0) for k, v in values.items()}
        stats['Timing/metrics_sec'] = dict(num=1, mean=seconds, std=0.0)
        return dict(stats=stats, values=values, seconds=seconds)


def read_history(run_dir: str) -> list[dict]:
    """The records of RUN/metrics.jsonl (unreadable lines, e.g. one cut off by a crash, are skipped)."""
    records = []
    try:
        with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        return []
    return records


def write_curves(run_dir: str) -> list[str]:
    """RUN/metric-<key>.png for every curve key in the history: value against kimg; returns the paths."""
    from torch_utils.plot import line_plot
    records = read_history(run_dir)
    paths = []
    for key, (lo_key, hi_key) in CURVES.items():
        points = sorted((r['kimg'], r['results'][key], r['results'].get(lo_key, float('nan')),
                         r['results'].get(hi_key, float('nan'))) for r in records if key in r.get('results', {}))
        if not points:
            continue
        xs, ys, los, his = (list(v) for v in zip(*points))
        path = os.path.join(run_dir, f'metric-{key}.png')
        n = records[-1].get('num_images', '?')
        line_plot({key: (xs, ys)}, path, title=f'{key} of the EMA network during training (n = {n} images)',
                  xlabel='kimg', ylabel=key, intervals={key: (los, his)} if lo_key else None)
        paths.append(path)
    return paths
