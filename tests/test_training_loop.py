"""training/training_loop.py: the lr / EMA schedules (as formulas and as wired into the loop), gradient
sanitising, the files a run writes, exact resume, preemption by SIGTERM, and checkpoint errors.
All runs are in-process on CPU with a tiny network on a tiny 8x8 dataset built here."""

import json
import os
import pickle
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch

from training import training_loop as tl
from training.training_loop import ema_beta, linear_rampup_schedule
from helpers import loop_kwargs, make_dataset_zip


pytestmark = pytest.mark.usefixtures('one_thread')


# ---------------------------------------------------------------------------- schedules as formulas

def test_learning_rate_ramps_up_linearly_then_stays():
    lr = lambda ref_lr, cur_nimg, rampup_kimg: linear_rampup_schedule(cur_nimg, 64, ref_lr, rampup_kimg)
    assert lr(1e-3, 0, 10000) == 0
    assert lr(1e-3, 2_500_000, 10000) == pytest.approx(0.25e-3)
    assert lr(1e-3, 10_000_000, 10000) == pytest.approx(1e-3)
    assert lr(1e-3, 50_000_000, 10000) == pytest.approx(1e-3)
    assert lr(2e-4, 123, 0) == 2e-4  # no ramp-up


def test_edm2_learning_rate_schedule_golden(golden_dir):
    """EDM2's learning_rate_schedule(cur_nimg, **kwargs) as recorded from NVlabs/edm2: defaults, ramp-up,
    inverse-sqrt decay, and both parts switched off, up to 2^31 images."""
    rows = json.loads((golden_dir / 'edm2_schedule.json').read_text())
    assert len(rows) >= 20 and {r['cur_nimg'] for r in rows} >= {0, 10_000_000, 2**31}
    for row in rows:
        lr = tl.learning_rate_schedule(row['cur_nimg'], **row['kwargs'])
        assert lr == pytest.approx(row['lr'], rel=1e-12, abs=0), row


def test_ema_beta_follows_halflife_and_rampup():
    batch = 512
    # Ramp-up: half-life = 5% of the images seen, while that is below the configured half-life.
    nimg = 1_000_000
    assert ema_beta(batch, nimg, 500, 0.05) == pytest.approx(0.5 ** (batch / (0.05 * nimg)))
    # After ramp-up the half-life is 500 kimg: applying beta for (halflife / batch) steps halves the weight.
    beta = ema_beta(batch, 100_000_000, 500, 0.05)
    assert beta ** (500_000 / batch) == pytest.approx(0.5, rel=1e-9)
    # No ramp-up (transfer learning): the configured half-life from the first step on.
    assert ema_beta(batch, 0, 500, None) == pytest.approx(0.5 ** (batch / 500_000))
    # First step with ramp-up: half-life 0 -> beta 0, the EMA just copies the weights.
    assert ema_beta(batch, 0, 500, 0.05) == 0.0
    # beta increases monotonically during ramp-up.
    betas = [ema_beta(batch, n, 500, 0.05) for n in range(0, 20_000_000, 1_000_000)]
    assert all(a <= b for a, b in zip(betas, betas[1:]))


def test_sanitize_gradients_zeroes_nan_and_clamps_inf():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float('nan'), float('inf'), -float('inf'), 2.0])
    q = torch.nn.Parameter(torch.zeros(1))  # no grad: skipped
    tl.sanitize_gradients([p, q])
    assert torch.equal(p.grad, torch.tensor([0.0, 1e5, -1e5, 2.0]))


# ---------------------------------------------------------------------------- in-process tiny runs

def only_state(run_dir):
    states = sorted(f for f in os.listdir(run_dir) if f.startswith('training-state-'))
    assert len(states) == 1, states
    return os.path.join(run_dir, states[0])


def test_run_writes_logs_snapshot_and_weights_only_state(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    run = tmp_path / 'run'
    res = tl.training_loop(**loop_kwargs(data, run, 0.048, snapshot_ticks=1, print_summary=True))
    assert res.cur_nimg == 48 and res.stopped is None
    log = (run / 'log.txt').read_text()
    assert 'tick 0' in log and 'sec/kimg' in log and 'cpumem' in log and 'gpumem' in log and 'Exiting' in log
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert len(stats) == 2 and stats[-1]['Progress/kimg']['mean'] == pytest.approx(0.048)
    assert stats[0]['Loss/loss']['num'] == 16 * 3 * 8 * 8  # first tick = first step, per-pixel loss
    assert np.isfinite(stats[-1]['Loss/loss']['mean'])

    # training-state: tensors and plain data only.
    state = torch.load(only_state(run), weights_only=True)
    assert state['cur_nimg'] == 48 and set(state['net']) == set(state['ema'])
    assert all(isinstance(v, torch.Tensor) for v in state['net'].values())

    # network-snapshot: the paper's dict, loadable by the safe loader, EMA weights equal the state's.
    from torch_utils import persistence
    snap = persistence.load_network_pkl(str(run / 'network-snapshot-000000.pkl'))
    assert set(snap) >= {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    assert snap['dataset_kwargs']['path'] == data
    ema_sd = snap['ema'].state_dict()
    assert all(torch.equal(ema_sd[k], state['ema'][k]) for k in state['ema'])
    assert not any(f.endswith('.tmp') or '.tmp' in f for f in os.listdir(run))  # atomic writes left nothing


def _tensors_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_and_schedules_are_applied(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    # Straight run: 5 steps of 16 images.
    tl.training_loop(**loop_kwargs(data, tmp_path / 'a', 0.080))
    straight = torch.load(only_state(tmp_path / 'a'), weights_only=True)
    assert straight['cur_nimg'] == 80

    # Interrupted run: 3 steps, then one resumed step, then the rest.
    tl.training_loop(**loop_kwargs(data, tmp_path / 'b1', 0.048))
    s1 = torch.load(only_state(tmp_path / 'b1'), weights_only=True)
    tl.training_loop(**loop_kwargs(data, tmp_path / 'b2', 0.064, resume_state_dump=only_state(tmp_path / 'b1')))
    s2 = torch.load(only_state(tmp_path / 'b2'), weights_only=True)
    assert (s1['cur_nimg'], s2['cur_nimg']) == (48, 64)

    # The one resumed step used lr(nimg=48) and EMA beta(nimg=48): ema2 = lerp(net2, ema1, beta).
    kw = loop_kwargs(data, '.', 0)
    lr = s2['optimizer_state']['param_groups'][0]['lr']
    assert lr == pytest.approx(linear_rampup_schedule(48, 16, 1e-3, kw['lr_rampup_kimg']), rel=1e-12) and lr < 1e-3
    beta = ema_beta(16, 48, kw['ema_halflife_kimg'], 0.05)  # loop default ema_rampup_ratio
    assert 0 < beta < 1
    for k in s2['ema']:
        expected = s2['net'][k].lerp(s1['ema'][k], beta) if s2['net'][k].is_floating_point() else s2['net'][k]
        assert torch.equal(s2['ema'][k], expected), k
    assert not _tensors_equal(s2['net'], s1['net'])  # the step did update the weights

    tl.training_loop(**loop_kwargs(data, tmp_path / 'b3', 0.080, resume_state_dump=only_state(tmp_path / 'b2')))
    resumed = torch.load(only_state(tmp_path / 'b3'), weights_only=True)
    assert resumed['cur_nimg'] == 80
    # Bit-identical to the uninterrupted run: weights, EMA, Adam moments and step counts.
    assert _tensors_equal(resumed['net'], straight['net'])
    assert _tensors_equal(resumed['ema'], straight['ema'])
    for idx, st in straight['optimizer_state']['state'].items():
        for name, value in st.items():
            assert torch.equal(value, resumed['optimizer_state']['state'][idx][name]), (idx, name)

    # Resuming a finished run does nothing.
    res = tl.training_loop(**loop_kwargs(data, tmp_path / 'b4', 0.080, resume_state_dump=only_state(tmp_path / 'b3')))
    assert res.cur_nimg == 80 and not any(f.startswith('training-state') for f in os.listdir(tmp_path / 'b4'))


def test_gradient_accumulation_and_bf16(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    run = tmp_path / 'run'
    kw = loop_kwargs(data, run, 0.016, batch_gpu=8, lr_rampup_kimg=0)
    kw['network_kwargs'] = dict(kw['network_kwargs'], use_bf16=True)  # what train.py --bf16=1 sets
    res = tl.training_loop(**kw)
    assert res.cur_nimg == 16  # 1 step of 16 images as 2 accumulation rounds of 8
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert stats[0]['Loss/loss']['num'] == 16 * 3 * 8 * 8 and np.isfinite(stats[-1]['Loss/loss']['mean'])
    state = torch.load(only_state(run), weights_only=True)
    assert state['optimizer_state']['state'][0]['step'] == 1  # one optimizer step for both rounds
    assert all(v.dtype == torch.float32 for v in state['net'].values() if v.is_floating_point())  # fp32 master
    assert all(torch.isfinite(v).all() for v in state['net'].values())
    with pytest.raises(ValueError, match='not divisible by batch_gpu=5'):
        tl.training_loop(**loop_kwargs(data, tmp_path / 'bad', 0.016, batch_gpu=5))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_state_and_returns(tmp_path, signum):
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    run = tmp_path / 'run'
    stats = run / 'stats.jsonl'

    def preempt():
        deadline = time.time() + 60
        while not stats.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)  # delivered to the main thread, which runs the loop

    threading.Thread(target=preempt, daemon=True).start()
    res = tl.training_loop(**loop_kwargs(data, run, 1000, state_dump_ticks=None))  # saves anyway
    assert res.stopped == signum
    assert 0 < res.cur_nimg < 1_000_000
    state = torch.load(only_state(run), weights_only=True)
    assert state['cur_nimg'] == res.cur_nimg  # saved exactly where it stopped
    assert f'Stop requested ({signal.Signals(signum).name})' in (run / 'log.txt').read_text()
    assert signal.getsignal(signum) is not tl._request_stop  # handlers restored


def test_checkpoint_errors_are_one_line(tmp_path):
    bad = tmp_path / 'training-state-000000.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(tl.CheckpointError, match='not a training state'):
        tl.load_training_state(str(bad))
    torch.save(dict(foo=torch.zeros(1)), bad)
    with pytest.raises(tl.CheckpointError, match='not a training state written by this training loop'):
        tl.load_training_state(str(bad))
    # A legacy state that pickles a live module is refused (never unpickled with code execution).
    torch.save(dict(net=torch.nn.Linear(1, 1)), bad)
    with pytest.raises(tl.CheckpointError, match='pickles live modules'):
        tl.load_training_state(str(bad))

    # A state from another architecture: clear message naming the options to check.
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    tl.training_loop(**loop_kwargs(data, tmp_path / 'a', 0.016))
    kw = loop_kwargs(data, tmp_path / 'b', 0.032, resume_state_dump=only_state(tmp_path / 'a'))
    kw['network_kwargs'] = dict(kw['network_kwargs'], model_channels=8)
    with pytest.raises(tl.CheckpointError, match='does not match the network'):
        tl.training_loop(**kw)


def test_transfer_from_snapshot_and_resume_with_other_world_size(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    tl.training_loop(**loop_kwargs(data, tmp_path / 'a', 0.016, snapshot_ticks=1))
    from torch_utils import persistence
    pkl = str(tmp_path / 'a' / 'network-snapshot-000000.pkl')
    ema = persistence.load_network_pkl(pkl)['ema'].state_dict()

    # --transfer: weights start from the snapshot's EMA; the first step has lr 0, so they are unchanged.
    tl.training_loop(**loop_kwargs(data, tmp_path / 'b', 0.016, resume_pkl=pkl, ema_rampup_ratio=None))
    state = torch.load(only_state(tmp_path / 'b'), weights_only=True)
    assert state['optimizer_state']['param_groups'][0]['lr'] == 0
    assert _tensors_equal(state['net'], ema) and _tensors_equal(state['ema'], ema)

    # A state written by 2 ranks resumed by 1: continues (re-seeded), says so.
    state['rng'] = state['rng'] * 2
    torch.save(state, tmp_path / 'two-ranks.pt')
    res = tl.training_loop(**loop_kwargs(data, tmp_path / 'c', 0.032, resume_state_dump=str(tmp_path / 'two-ranks.pt')))
    assert res.cur_nimg == 32
    assert 'written by 2 ranks, now 1; random streams are re-seeded' in (tmp_path / 'c' / 'log.txt').read_text()


def test_version_1_states_still_resume_and_newer_ones_are_refused(tmp_path):
    # Before EMA policies, a state held the EMA module's state_dict under 'ema' and version 1: the
    # default policy's state_dict is exactly that, so such a state continues the run unchanged.
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    tl.training_loop(**loop_kwargs(data, tmp_path / 'a', 0.032))
    tl.training_loop(**loop_kwargs(data, tmp_path / 'a1', 0.016))
    state = torch.load(only_state(tmp_path / 'a1'), weights_only=True)
    assert state['version'] == tl.STATE_VERSION == 2
    legacy = {k: v for k, v in state.items() if k != 'ema_class'}
    legacy['version'] = 1
    torch.save(legacy, tmp_path / 'legacy.pt')
    tl.training_loop(**loop_kwargs(data, tmp_path / 'b', 0.032, resume_state_dump=str(tmp_path / 'legacy.pt')))
    straight, resumed = (torch.load(only_state(tmp_path / d), weights_only=True) for d in ('a', 'b'))
    assert _tensors_equal(straight['net'], resumed['net']) and _tensors_equal(straight['ema'], resumed['ema'])

    state['version'] = tl.STATE_VERSION + 1
    torch.save(state, tmp_path / 'future.pt')
    with pytest.raises(tl.CheckpointError, match='version 3 is not one this code reads'):
        tl.load_training_state(str(tmp_path / 'future.pt'))


# ---------------------------------------------------------------------------- diverging runs

def nan_kwargs(data, run_dir, total_kimg, **extra):
    kw = loop_kwargs(data, run_dir, total_kimg, kimg_per_tick=0.016, snapshot_ticks=1, state_dump_ticks=1,
                     augment_kwargs=None)
    kw['network_kwargs'] = dict(kw['network_kwargs'], augment_dim=0)
    kw.update(extra)
    return kw


def test_diverging_loss_stops_the_run_and_keeps_the_good_checkpoints(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    run = tmp_path / 'run'
    # Steps 0-3 are fine, the loss is NaN from step 4 on; one tick per step, a checkpoint at every tick.
    kw = nan_kwargs(data, run, 1, loss_kwargs=dict(class_name='train_probes.NonFiniteLoss', first=4),
                    nan_patience=3)
    with pytest.raises(tl.TrainingDiverged) as info:
        tl.training_loop(**kw)
    message = str(info.value)
    assert '\n' not in message and 'NaN/Inf for 3 consecutive steps' in message
    # The checkpoints hold the weights after step 3 (the last good one), not the weights of steps 4-6.
    state = tl.load_training_state(str(run / 'training-state-000000.pt'))
    assert state['cur_nimg'] == 4 * 16
    with open(run / 'network-snapshot-000000.pkl', 'rb') as f:  # our own file (it pickles the probe loss)
        snapshot = pickle.load(f)['ema']
    assert all(torch.equal(snapshot.state_dict()[k], v) for k, v in state['ema'].items())
    # Counted in stats.jsonl, shown on the tick line with the loss.
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert sum(s['Loss/nonfinite']['mean'] * s['Loss/nonfinite']['num'] for s in stats) == 3
    log = (run / 'log.txt').read_text()
    assert re.search(r'tick 3 .* loss \d+\.\d{4}', log) and re.search(r'tick 4 .* loss nan +nonfinite 1', log)
    assert 'skipping the checkpoints' in log


def test_a_transient_nan_is_counted_but_does_not_stop_or_poison_the_stats(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    run = tmp_path / 'run'
    kw = nan_kwargs(data, run, 0.096, loss_kwargs=dict(class_name='train_probes.NonFiniteLoss', first=2, count=1),
                    nan_patience=2)
    assert tl.training_loop(**kw).cur_nimg == 96
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert [s['Loss/nonfinite']['mean'] for s in stats] == [0, 0, 1, 0, 0, 0]
    assert np.isnan(stats[2]['Loss/loss']['mean'])
    assert all(np.isfinite(s['Loss/loss']['mean']) for s in stats[3:])  # one NaN does not poison later ticks


@pytest.mark.slow
def test_ranks_agree_on_divergence(tmp_path):
    """Only rank 1 sees a NaN loss: both ranks stop after the same step, neither hangs."""
    from torch_utils.distributed import free_port
    from train_probes import diverging_worker
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    kw = nan_kwargs(data, tmp_path / 'run', 1, batch_size=32, print_summary=False,
                    loss_kwargs=dict(class_name='train_probes.NonFiniteLoss', first=2, ranks=[1]), nan_patience=2)
    ctx = torch.multiprocessing.start_processes(diverging_worker, args=(2, free_port(), kw, str(tmp_path)), nprocs=2,
                                                join=False, start_method='spawn')
    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail('ranks did not finish (hang)')
    outcomes = [(tmp_path / f'rank{r}.txt').read_text() for r in range(2)]
    assert all(o.startswith('diverged: the loss has been NaN/Inf for 2 consecutive steps (at 0.1 kimg)')
               for o in outcomes), outcomes
