"""Failure modes (issue 11): concurrent starts share no run folder; a diverging run stops with a message and
keeps its good checkpoints; a failed start leaves nothing at --outdir; a damaged image in the dataset stops
training with one line naming it; absurd or negative seeds are one-line errors; dataset_tool.py says when it
replaces --dest and cleans up on SIGTERM; --resume of a folder whose newest state is damaged names it and can
fall back; a signal stop has its own exit status; the safe loader refuses to build huge networks; a run's
files get the usual permissions; fid.py says when --ref is not an .npz.

CLI tests run train.py in-process through click's CliRunner (tiny network, tiny 8x8 data); tests that need
a separate process or a memory limit run one (and are marked slow when they start several)."""

import io
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import dnnlib
import fid
import train
from tinydata import make_dataset_zip
from torch_utils import misc, persistence, training_stats
from training import training_loop as tl
from training.dataset import DatasetError, ImageFolderDataset

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = ['--cbase', '16', '--cres', '1', '--augment', '0', '--workers', '0', '--seed', '1', '--tick', '1',
        '--snap', '1', '--dump', '1']


def run_train(args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def last_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    return lines[-1] if lines else ''


def assert_one_line_error(result, *fragments):
    """Exit status 1 from a click error (not an exception escaping), ending with one 'Error: ...' line."""
    assert result.exit_code == 1, result.output[-3000:]
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    line = last_line(result)
    assert line.startswith('Error: '), result.output[-3000:]
    for fragment in fragments:
        assert fragment in line, line
    assert 'Traceback' not in result.output and 'weights_only' not in result.output
    return line


def damage_member(src, dst, member):
    """A copy of a dataset zip whose `member` PNG has its header overwritten (the zip itself stays valid)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == member:
                data = b'\0' * 32 + data[32:]
            zout.writestr(info, data)
    return str(dst)


def member(idx):
    return f'{idx // 1000:05d}/img{idx:08d}.png'


def first_positions(num_images, seed, count):
    """Where each image first appears in the training loop's data stream (one rank)."""
    class Sized:
        def __len__(self):
            return num_images
    first = {}
    for pos, idx in enumerate(misc.InfiniteSampler(Sized(), seed=seed)):
        first.setdefault(int(idx), pos)
        if pos >= count:
            return first


def sampled_by_train_py(num_images):
    n = train.DATASET_SAMPLE
    return {round(i * (num_images - 1) / (n - 1)) for i in range(n)}


@pytest.fixture(scope='module')
def tiny_zip(tmp_path_factory):
    return make_dataset_zip(tmp_path_factory.mktemp('data') / 'tiny.zip', num_images=64, labels=False)


@pytest.fixture(scope='module')
def finished_run(tiny_zip, tmp_path_factory):
    """A run folder of train.py's tiny configuration with training-state-000000.pt and its snapshot."""
    outdir = tmp_path_factory.mktemp('runs')
    opts = train.main.make_context('train', ['--outdir', str(outdir), '--data', tiny_zip, '--batch', '16'] + TINY).params
    c, _ = train.build_training_options(dnnlib.EasyDict(opts), world=1)
    c.update(run_dir=str(outdir / 'run'), total_kimg=0.016, seed=1, print_summary=False)
    tl.training_loop(**c, device=torch.device('cpu'))
    return outdir / 'run'


# ---------------------------------------------------------------------------- 1. concurrent starts

CLAIMER = r'''
import os, sys, time
import dnnlib, train
from training import training_loop
start, outdir, data, desc, ready = sys.argv[1:6]

def run(run_dir, **kwargs):  # stands in for training: every run writes into its folder
    with open(os.path.join(run_dir, 'owner.txt'), 'a') as f:
        f.write(f'{os.getpid()}\n')
    time.sleep(0.5)
    return dnnlib.EasyDict(cur_nimg=0, stopped=None)

training_loop.training_loop = run
open(ready, 'w').close()
while not os.path.exists(start):  # all processes leave this loop within a millisecond or two
    time.sleep(0.001)
args = ['--outdir', outdir, '--data', data, '--cbase', '16', '--cres', '1', '--workers', '0', '--seed', '1']
train.main(args + (['--desc', desc] if desc != '-' else []))
'''


@pytest.mark.slow
def test_concurrent_starts_get_their_own_run_folders(tiny_zip, tmp_path, subprocess_env):
    """Four train.py processes released at the same instant (three identical command lines, one with
    another --desc): four folders with four distinct numbers, each holding only its own run's files."""
    (tmp_path / 'claimer.py').write_text(CLAIMER)
    start, outdir = tmp_path / 'go', tmp_path / 'out'
    procs = [subprocess.Popen([sys.executable, str(tmp_path / 'claimer.py'), str(start), str(outdir), tiny_zip, desc,
                               str(tmp_path / f'ready{i}')],
                              env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, desc in enumerate(['-', '-', '-', 'other'])]
    deadline = time.time() + 120
    while len(list(tmp_path.glob('ready*'))) < 4 and time.time() < deadline:  # all at the starting line
        time.sleep(0.01)
    start.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    folders = sorted(os.listdir(outdir))
    assert len(folders) == 4, folders
    assert len({int(name[:5]) for name in folders}) == 4, folders  # distinct run numbers
    owners = []
    for name in folders:
        lines = (outdir / name / 'owner.txt').read_text().split()
        assert len(lines) == 1, (name, lines)  # one run per folder
        owners += lines
        assert json.loads((outdir / name / 'training_options.json').read_text())['run_dir'] == str(outdir / name)
    assert sorted(owners) == sorted(str(p.pid) for p in procs)


def test_claim_run_dir_skips_taken_numbers(tmp_path):
    (tmp_path / '00004-old').mkdir()
    first = train.claim_run_dir(str(tmp_path), 'x')
    second = train.claim_run_dir(str(tmp_path), 'x')
    assert [os.path.basename(first), os.path.basename(second)] == ['00005-x', '00006-x']


# ---------------------------------------------------------------------------- 2. diverging runs

def nan_kwargs(data, run_dir, total_kimg, **extra):
    from test_training_loop import loop_kwargs
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


def test_collector_intervals_recover_after_a_nan():
    collector = training_stats.Collector(regex='Probe/.*', keep_previous=False)
    training_stats.report('Probe/x', [1.0, float('nan')])
    collector.update()
    assert np.isnan(collector['Probe/x'])
    training_stats.report('Probe/x', [2.0, 4.0])
    collector.update()
    assert collector['Probe/x'] == 3.0 and collector.num('Probe/x') == 2


def test_diverging_cli_run_exits_non_zero_with_one_line(tiny_zip, tmp_path):
    result = run_train(['--outdir', tmp_path, '--data', tiny_zip, '--batch', '16', '--lr', '1e6', '--lr-rampup', '0',
                        '--nan-patience', '3', '--duration', '1'] + TINY)
    assert_one_line_error(result, 'NaN/Inf for 3 consecutive steps')
    assert 'loss ' in result.output  # the tick line shows the loss


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


# ---------------------------------------------------------------------------- 3./5. failed starts

def crafted_pickle(path):
    """A network pickle that asks to call os.system while loading (the safe loader must refuse)."""
    class Evil:
        def __reduce__(self):
            return os.system, ('echo pwned',)
    path.write_bytes(pickle.dumps({'ema': Evil()}))
    return str(path)


@pytest.mark.parametrize('case', ['garbage state', 'truncated state', 'other architecture', 'damaged image',
                                  'damaged image, first step', 'refused transfer pickle', 'outdir is a file'])
def test_failed_start_leaves_nothing_and_names_the_file(case, tiny_zip, finished_run, tmp_path):
    outdir = tmp_path / 'out'
    data, extra = tiny_zip, []
    state = finished_run / 'training-state-000000.pt'
    if case == 'garbage state':
        bad = tmp_path / 'training-state-000007.pt'
        bad.write_bytes(np.random.RandomState(0).bytes(4096))
        extra, name, says = ['--resume', bad], str(bad), 'not a training state'
    elif case == 'truncated state':
        bad = tmp_path / 'training-state-000007.pt'
        bad.write_bytes(state.read_bytes()[:5000])
        extra, name, says = ['--resume', bad], str(bad), 'truncated training state'
    elif case == 'other architecture':
        extra, name, says = ['--resume', finished_run, '--cbase', '32'], str(state), 'does not match the network'
    elif case == 'damaged image':  # one of the images train.py decodes before starting
        idx = sorted(sampled_by_train_py(64))[3]
        data = damage_member(tiny_zip, tmp_path / 'damaged.zip', member(idx))
        name, says = f'{data}:{member(idx)}', 'cannot read image'
    elif case == 'damaged image, first step':  # not checked before the start: read in the first batch
        idx = min(set(range(64)) - sampled_by_train_py(64))
        data = damage_member(tiny_zip, tmp_path / 'damaged.zip', member(idx))
        name, says = f'{data}:{member(idx)}', 'cannot read image'
        extra = ['--batch', '64']
    elif case == 'refused transfer pickle':
        pkl = crafted_pickle(tmp_path / 'evil.pkl')
        extra, name, says = ['--transfer', pkl], pkl, 'refusing to load posix.system'
    elif case == 'outdir is a file':
        outdir.write_text('not a folder')
        name, says = str(outdir), 'is a file, not a folder'
    batch = ['--batch', '16'] if '--batch' not in extra else []
    result = run_train(['--outdir', outdir, '--data', data, '--duration', '1'] + TINY + batch + extra)
    assert_one_line_error(result, name, says)
    if case == 'outdir is a file':
        assert outdir.read_text() == 'not a folder'
    else:
        assert not outdir.exists(), os.listdir(outdir)


def test_dataset_errors_survive_dataloader_workers():
    """torch re-raises a worker's exception with the worker's traceback as its message; DatasetError
    keeps its own one line."""
    try:
        raise DatasetError('data.zip:00000/img00000003.png: cannot read image (not a readable image); re-create it')
    except DatasetError:
        wrapper = torch._utils.ExceptionWrapper(sys.exc_info(), where='in DataLoader worker process 0')
    with pytest.raises(DatasetError) as info:
        wrapper.reraise()
    assert str(info.value) == 'data.zip:00000/img00000003.png: cannot read image (not a readable image); re-create it'


# ---------------------------------------------------------------------------- 4. damaged image during training

@pytest.mark.parametrize('workers', [0, pytest.param(1, marks=pytest.mark.slow)])
def test_damaged_image_during_training_stops_with_one_line_and_keeps_the_state(tmp_path, workers):
    """2048 images, batch 64: tick 1 ends after 17 steps (1088 images) with a training state; the damaged
    image first comes up later. The run stops with one line naming archive and member, the state stays."""
    n, seed = 2048, 1
    first = first_positions(n, seed, 4 * n)
    idx = min(i for i, pos in first.items() if 1200 <= pos < 1600 and i not in sampled_by_train_py(n))
    data = damage_member(make_dataset_zip(tmp_path / 'big.zip', num_images=n, labels=False), tmp_path / 'damaged.zip',
                         member(idx))
    outdir = tmp_path / 'out'
    result = run_train(['--outdir', outdir, '--data', data, '--batch', '64', '--duration', '0.004'] + TINY
                       + ['--snap', '100', '--workers', workers])
    run = outdir / os.listdir(outdir)[0]
    line = assert_one_line_error(result, f'{data}:{member(idx)}: cannot read image', f'--resume={run}')
    assert '\n' not in line
    state = tl.load_training_state(str(run / 'training-state-000001.pt'))
    assert state['cur_nimg'] == 17 * 64
    assert not [f for f in os.listdir(run) if f.endswith('.tmp')]


# ---------------------------------------------------------------------------- 6. seeds

def limited_memory():
    """preexec_fn: at most 3 GB of address space, so a regression fails with MemoryError, not an OOM."""
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_parse_seeds_bounds():
    from training.sampling import parse_seeds
    assert parse_seeds('0-3,7') == [0, 1, 2, 3, 7] and parse_seeds(f'{2**32 - 1}') == [2**32 - 1]
    for seeds, says in [('-1', "'-1' is below 0"), ('0-99999999999', "'0-99999999999' is above 4294967295"),
                        ('0-4000000000', 'has 4,000,000,001 numbers, more than the 10,000,000 allowed'),
                        ('0-6000000,10000000-15000000', 'has 11,000,002 numbers')]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_seeds(seeds)


@pytest.mark.parametrize('cli,seeds,says', [
    ('generate.py', '0-4000000000', 'more than the 10,000,000 allowed'),
    ('generate.py', '5,-3--1', "'-3--1' is below 0"),
    ('fid.py', '0-99999999999', "'0-99999999999' is above 4294967295"),
])
def test_absurd_and_negative_seeds_are_one_line_errors(cli, seeds, says, repo_root, subprocess_env, tmp_path):
    cmd = [sys.executable, str(repo_root / cli)] + (['net', '--ref', 'x.npz'] if cli == 'fid.py' else ['--outdir', str(tmp_path)])
    t0 = time.time()
    proc = subprocess.run(cmd + ['--network', 'net.pkl', f'--seeds={seeds}'], env=subprocess_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, preexec_fn=limited_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and 'Traceback' not in proc.stderr and 'MemoryError' not in proc.stderr, proc.stderr
    assert time.time() - t0 < 60
    assert not list(tmp_path.glob('*.png'))


# ---------------------------------------------------------------------------- dataset_tool.py

def test_dataset_tool_says_when_it_replaces_dest(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    import PIL.Image
    for i in range(3):
        PIL.Image.fromarray(np.full([8, 8, 3], i * 40, np.uint8)).save(src / f'{i}.png')
    dest = tmp_path / 'out.zip'
    dest.write_bytes(b'an older dataset')
    result = CliRunner().invoke(dataset_tool.main, ['--source', str(src), '--dest', str(dest)])
    assert result.exit_code == 0, result.output
    assert f'--dest {dest} exists and will be replaced' in result.output
    assert len(ImageFolderDataset(str(dest))) == 3
    result = CliRunner().invoke(dataset_tool.main, ['--source', str(src), '--dest', str(tmp_path / 'new.zip')])
    assert 'replaced' not in result.output


@pytest.mark.slow
def test_dataset_tool_sigterm_removes_its_temporary_output(tmp_path, repo_root, subprocess_env):
    n = 30000  # MNIST-style source, big enough that the conversion is still running when the signal comes
    images = np.random.RandomState(0).randint(0, 256, size=[n, 28, 28], dtype=np.uint8)
    header = lambda magic, *dims: b''.join(int(v).to_bytes(4, 'big') for v in (magic,) + dims)  # noqa: E731
    (tmp_path / 'train-images-idx3-ubyte').write_bytes(header(0x803, n, 28, 28) + images.tobytes())
    (tmp_path / 'train-labels-idx1-ubyte').write_bytes(header(0x801, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
    dest = tmp_path / 'mnist.zip'
    dest.write_bytes(b'previous')
    proc = subprocess.Popen([sys.executable, str(repo_root / 'dataset_tool.py'), '--source',
                             str(tmp_path / 'train-images-idx3-ubyte'), '--dest', str(dest)], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob('.mnist.zip.*')):
        time.sleep(0.02)
    assert list(tmp_path.glob('.mnist.zip.*')), 'no temporary output appeared'
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and 'Aborted!' in out, out[-2000:]
    assert not list(tmp_path.glob('.mnist.zip.*'))  # the partial zip is gone
    assert dest.read_bytes() == b'previous'  # and --dest untouched


# ---------------------------------------------------------------------------- --resume of a damaged folder

def test_resume_folder_with_damaged_newest_state(tiny_zip, finished_run, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    good = run / 'training-state-000000.pt'
    good.write_bytes((finished_run / 'training-state-000000.pt').read_bytes())
    bad = run / 'training-state-000005.pt'
    bad.write_bytes(good.read_bytes()[:3000])
    args = ['--outdir', tmp_path / 'out', '--data', tiny_zip, '--batch', '16', '--resume', run, '-n'] + TINY
    result = run_train(args)
    assert_one_line_error(result, str(bad), 'truncated training state', '--resume-fallback=1')
    result = run_train(args + ['--resume-fallback', '1'])
    assert result.exit_code == 0, result.output
    assert f'Warning: --resume-fallback: {bad}: truncated training state' in result.output
    assert f'"resume_state_dump": "{good}"' in result.output
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------- exit status of a signal stop

def test_signal_stop_exits_with_its_own_status(tiny_zip, tmp_path):
    outdir = tmp_path / 'out'

    def preempt():
        deadline = time.time() + 60
        while not list(outdir.glob('*/stats.jsonl')) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    result = run_train(['--outdir', outdir, '--data', tiny_zip, '--batch', '16', '--duration', '10'] + TINY)
    assert result.exit_code == 3, result.output[-2000:]
    assert train.EXIT_STOPPED == 3
    assert 'Stop requested (SIGTERM)' in result.output and 'continue with --resume=' in result.output
    assert list(outdir.glob('*/training-state-*.pt'))


# ---------------------------------------------------------------------------- safe loader size bound

CRAFTED_LOAD = r'''
import io, pickle, sys, time
from torch_utils import persistence

class Crafted:  # 373 bytes asking for EDMPrecond(model_channels=8192): 2.5e11 parameters, no tensors
    def __reduce__(self):
        kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=8192)
        meta = dict(type='class', version=6, module_src='', class_name='EDMPrecond',
                    state=dict(_init_args=(), _init_kwargs=kwargs, training=False))
        return persistence._reconstruct_persistent_obj, (meta,)

t0 = time.time()
try:
    persistence.load_network_pkl(io.BytesIO(pickle.dumps({'ema': Crafted()}, protocol=2)))
    print('loaded')
except persistence.CheckpointError as e:
    print(f'refused in {time.time() - t0:.1f}s: {e}')
'''


def test_safe_loader_refuses_implausibly_large_networks(repo_root, subprocess_env, tmp_path):
    (tmp_path / 'crafted.py').write_text(CRAFTED_LOAD)
    proc = subprocess.run([sys.executable, str(tmp_path / 'crafted.py')], env=subprocess_env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limited_memory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'refused in ([\d.]+)s: .*ask for ([\d,]+) parameters, more than the limit of 10,000,000,000',
                  proc.stdout)
    assert m, proc.stdout + proc.stderr[-2000:]
    assert int(m.group(2).replace(',', '')) > 10**11 and float(m.group(1)) < 30


def test_parameter_limit_is_configurable(finished_run):
    pkl = str(finished_run / 'network-snapshot-000000.pkl')
    net = persistence.load_network_pkl(pkl)['ema']
    count = sum(t.numel() for _, t in misc.named_params_and_buffers(net))
    assert persistence.count_params_on_meta(type(net), (), net.init_kwargs) == count
    with pytest.raises(persistence.CheckpointError, match=f'ask for {count:,} parameters, more than the limit of 1,000'):
        persistence.load_network_pkl(pkl, max_params=1000)
    persistence.load_network_pkl(pkl, max_params=count)


# ---------------------------------------------------------------------------- permissions

def test_everything_a_run_writes_has_the_usual_permissions(tiny_zip, tmp_path):
    old = os.umask(0o027)
    try:
        result = run_train(['--outdir', tmp_path / 'out', '--data', tiny_zip, '--batch', '64', '--duration', '0.001']
                           + TINY)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output[-2000:]
    run = tmp_path / 'out' / os.listdir(tmp_path / 'out')[0]
    files = sorted(os.listdir(run))
    assert {'log.txt', 'stats.jsonl', 'training_options.json', 'training-state-000001.pt',
            'network-snapshot-000001.pkl'} <= set(files)
    assert {f: oct(os.stat(run / f).st_mode & 0o777) for f in files} == {f: oct(0o640) for f in files}
    assert oct(os.stat(run).st_mode & 0o777) == oct(0o750)


# ---------------------------------------------------------------------------- fid.py --ref

def test_fid_ref_that_is_not_an_npz(tmp_path):
    ref = tmp_path / 'ref.txt'
    ref.write_text('mu 1 2 3\n')
    result = CliRunner().invoke(fid.main, ['calc', '--images', str(tmp_path), '--ref', str(ref)])
    assert result.exit_code == 1
    assert f'Error: {ref} is not a .npz file of reference statistics' in result.output
    assert 'pickled' not in result.output
