"""torch_utils.training_stats: moments, Collector semantics, and the cross-rank all_reduce (2-rank gloo)."""

import json
import os

import numpy as np
import pytest
import torch

from torch_utils import training_stats
from torch_utils.distributed import free_port


def test_report_returns_value_and_collector_averages_between_updates():
    c = training_stats.Collector(regex='ts_basic/.*')
    a = np.array([1.0, 2.0, 4.0, 8.0])
    assert training_stats.report('ts_basic/x', torch.tensor(a[:2])) is not None
    training_stats.report('ts_basic/x', a[2:].tolist())
    training_stats.report('ts_basic/y', 3)
    training_stats.report('other/z', 1)  # filtered by regex
    c.update()
    assert c.names() == ['ts_basic/x', 'ts_basic/y']
    assert c.num('ts_basic/x') == 4
    assert c.mean('ts_basic/x') == pytest.approx(a.mean(), rel=1e-12)
    assert c.std('ts_basic/x') == pytest.approx(a.std(), rel=1e-12)  # population std
    assert c['ts_basic/y'] == 3 and c.std('ts_basic/y') == 0
    # Second interval only contains what was reported after the first update.
    training_stats.report('ts_basic/x', [10.0, 20.0])
    c.update()
    assert c.num('ts_basic/x') == 2 and c.mean('ts_basic/x') == pytest.approx(15.0)
    # keep_previous=True: y got nothing new and keeps its last value.
    assert c.num('ts_basic/y') == 1 and c.mean('ts_basic/y') == 3
    d = c.as_dict()
    assert set(d) == {'ts_basic/x', 'ts_basic/y'} and d['ts_basic/x'].num == 2
    json.dumps(d)


def test_keep_previous_false_and_empty_stats():
    c = training_stats.Collector(regex='ts_nokeep/.*', keep_previous=False)
    training_stats.report('ts_nokeep/a', [1.0, 3.0])
    training_stats.report('ts_nokeep/empty', [])
    c.update()
    assert c.mean('ts_nokeep/a') == 2.0
    assert c.num('ts_nokeep/empty') == 0 and np.isnan(c.mean('ts_nokeep/empty'))
    c.update()
    assert c.num('ts_nokeep/a') == 0 and np.isnan(c.std('ts_nokeep/a'))


def test_moments_are_float64():
    c = training_stats.Collector(regex='ts_f64')
    big = torch.full([1000], 1e8 + 1, dtype=torch.float64)
    training_stats.report('ts_f64', big)
    c.update()
    assert c.mean('ts_f64') == 1e8 + 1  # float32 would round this to 1e8


def test_collector_intervals_recover_after_a_nan():
    collector = training_stats.Collector(regex='Probe/.*', keep_previous=False)
    training_stats.report('Probe/x', [1.0, float('nan')])
    collector.update()
    assert np.isnan(collector['Probe/x'])
    training_stats.report('Probe/x', [2.0, 4.0])
    collector.update()
    assert collector['Probe/x'] == 3.0 and collector.num('Probe/x') == 2


def test_report0_counts_only_on_rank0():
    c = training_stats.Collector(regex='ts_r0')
    training_stats.report0('ts_r0', 7.0)  # single process is rank 0
    c.update()
    assert c.num('ts_r0') == 1 and c.mean('ts_r0') == 7.0


def _stats_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        training_stats.init_multiprocessing(rank=rank, sync_device=None)
        c = training_stats.Collector(regex='dist/.*')
        # rank 0 reports [0, 1], rank 1 reports [10, 11, 12]; global: 5 values.
        training_stats.report('dist/loss', torch.arange(2 + rank, dtype=torch.float32) + 10 * rank)
        training_stats.report0('dist/only0', 5.0)
        if rank == 1:
            training_stats.report('dist/only1', [4.0, 6.0])  # a name rank 0 never reported
        c.update()
        out = {k: [v.num, v.mean, v.std] for k, v in c.as_dict().items()}
        training_stats.report('dist/loss', [100.0 * (rank + 1)])
        c.update()
        out['second'] = [c.num('dist/loss'), c.mean('dist/loss')]
        with open(os.path.join(out_dir, f'{rank}.json'), 'w') as f:
            json.dump(out, f)
    finally:
        torch.distributed.destroy_process_group()


def test_collector_reduces_across_two_ranks(tmp_path):
    torch.multiprocessing.spawn(_stats_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [json.load(open(tmp_path / f'{r}.json')) for r in range(2)]
    values = np.array([0.0, 1.0, 10.0, 11.0, 12.0])
    for r in res:  # every rank sees the same global statistics
        assert r['dist/loss'][0] == 5
        assert r['dist/loss'][1] == pytest.approx(values.mean())
        assert r['dist/loss'][2] == pytest.approx(values.std())
        assert r['dist/only0'][:2] == [1, 5.0]     # report0: rank 1's call only registered the name
        assert r['dist/only1'][:2] == [2, 5.0]     # known on rank 0 too although it never reported it
        assert r['second'] == [2, pytest.approx(150.0)]
