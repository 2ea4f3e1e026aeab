"""train.py: options, presets and defaults of the paper's CLI, validation errors, run-folder naming,
provenance; slow end-to-end runs under torchrun (2 ranks, gloo): snapshot + state written, ranks hold
identical weights, SIGKILL + --resume=<run folder> reproduces the uninterrupted run, SIGTERM saves (exit 3)."""

import glob
import inspect
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from helpers import TINY_RUN, make_dataset_zip
from torch_utils import misc
from training import presets, training_loop as tl


pytestmark = pytest.mark.usefixtures('one_thread')



def options(args):
    """Parse a command line exactly as click would (defaults included) into train.py's opts."""
    ctx = train.main.make_context('train', list(args))
    return dnnlib.EasyDict(ctx.params)


# ---------------------------------------------------------------------------- options (fast)

def test_defaults_match_the_paper(tiny_zip, tmp_path):
    c, name = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip]), world=1)
    assert name == 'tiny'
    assert c.optimizer_kwargs == dict(class_name='torch.optim.Adam', lr=10e-4, betas=[0.9, 0.999], eps=1e-8)
    assert c.total_kimg == 200_000 and c.ema_halflife_kimg == 500 and c.batch_size == 512
    assert c.batch_gpu is None and c.loss_scaling == 1 and c.cudnn_benchmark is True
    assert (c.kimg_per_tick, c.snapshot_ticks, c.state_dump_ticks) == (50, 50, 500)
    assert c.network_kwargs.dropout == 0.13 and c.network_kwargs.use_fp16 is False
    assert c.augment_kwargs == dict(class_name='training.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1,
                                    scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    assert c.network_kwargs.augment_dim == 9
    assert c.dataset_kwargs == dict(class_name='training.dataset.ImageFolderDataset', path=tiny_zip,
                                    use_labels=False, xflip=False, cache=True, resolution=8, max_size=64)
    assert c.data_loader_kwargs == dict(pin_memory=True, num_workers=1, prefetch_factor=2)
    assert c.network_kwargs.class_name == 'training.networks.EDMPrecond'
    assert c.loss_kwargs == dict(class_name='training.loss.EDMLoss')
    assert 'resume_pkl' not in c and 'ema_rampup_ratio' not in c  # loop defaults: no resume, ratio 0.05


@pytest.mark.parametrize('arch,expected', [
    ('ddpmpp', dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                    decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                    channel_mult=[2, 2, 2])),
    ('ncsnpp', dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                    decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                    model_channels=128, channel_mult=[2, 2, 2])),
    ('adm', dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])),
])
def test_architecture_presets(tiny_zip, tmp_path, arch, expected):
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip, '--arch', arch]), 1)
    for key, value in expected.items():
        assert c.network_kwargs[key] == value, key
    assert 'num_blocks' not in c.network_kwargs  # the backbone's own default (4 for SongUNet, 3 for ADM)
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip, '--arch', arch,
                                                 '--cbase', '32', '--cres', '1,2', '--blocks', '2']), 1)
    assert c.network_kwargs.model_channels == 32 and c.network_kwargs.channel_mult == [1, 2]
    assert c.network_kwargs.num_blocks == 2


@pytest.mark.parametrize('precond,net,loss', [('vp', 'VPPrecond', 'VPLoss'), ('ve', 'VEPrecond', 'VELoss'),
                                              ('edm', 'EDMPrecond', 'EDMLoss')])
def test_precond_selects_network_and_loss(tiny_zip, tmp_path, precond, net, loss):
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip,
                                                 '--precond', precond]), 1)
    assert c.network_kwargs.class_name == f'training.networks.{net}'
    assert c.loss_kwargs.class_name == f'training.loss.{loss}'
    dnnlib.util.get_obj_by_name(c.network_kwargs.class_name)  # the names resolve
    dnnlib.util.get_obj_by_name(c.loss_kwargs.class_name)


def test_hyperparameter_options(tiny_zip, tmp_path):
    c, _ = train.build_training_options(options([
        '--outdir', str(tmp_path), '--data', tiny_zip, '--duration', '0.0005', '--ema', '0.05', '--lr', '2e-4',
        '--augment', '0', '--fp16', '1', '--ls', '100', '--batch', '64', '--batch-gpu', '16', '--tick', '2',
        '--snap', '3', '--dump', '4', '--P_mean', '-1.0', '--P_std', '1.4', '--sigma_data', '0.6',
        '--lr-rampup', '5', '--workers', '0', '--bench', '0']), world=1)
    assert c.total_kimg == 1  # at least one kimg
    assert c.ema_halflife_kimg == 50 and c.optimizer_kwargs.lr == 2e-4 and c.lr_rampup_kimg == 5
    assert 'augment_kwargs' not in c and 'augment_dim' not in c.network_kwargs
    assert c.network_kwargs.use_fp16 is True and c.loss_scaling == 100 and c.cudnn_benchmark is False
    assert 'use_bf16' not in c.network_kwargs
    assert (c.batch_size, c.batch_gpu) == (64, 16)
    assert (c.kimg_per_tick, c.snapshot_ticks, c.state_dump_ticks) == (2, 3, 4)
    assert c.loss_kwargs == dict(class_name='training.loss.EDMLoss', P_mean=-1.0, P_std=1.4, sigma_data=0.6)
    assert c.network_kwargs.sigma_data == 0.6  # preconditioning and loss agree on sigma_data
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip, '--bf16', '1']), 1)
    assert c.network_kwargs.use_bf16 is True and c.network_kwargs.use_fp16 is False
    assert 'fast_dropout' not in c.network_kwargs  # off by default: the paper's kwargs
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip, '--fast-dropout', '1']), 1)
    assert c.network_kwargs.fast_dropout is True


def test_label_dropout_option(tiny_zip, tmp_path):
    """--label-dropout reaches the network's own label_dropout argument, and only when set: the default
    network kwargs stay the paper's."""
    base = ['--outdir', str(tmp_path), '--data', tiny_zip, '--cond', '1', '--cbase', '8', '--cres', '1',
            '--blocks', '1']
    c, _ = train.build_training_options(options(base), 1)
    assert 'label_dropout' not in c.network_kwargs
    for arch in ('ddpmpp', 'adm'):
        c, _ = train.build_training_options(options(base + ['--arch', arch, '--label-dropout', '0.1']), 1)
        assert c.network_kwargs.label_dropout == 0.1
        net = dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=8, img_channels=3, label_dim=4)
        assert net.model.label_dropout == 0.1


def test_transfer_and_resume_options(tiny_zip, tmp_path):
    pkl = tmp_path / 'net.pkl'
    pkl.write_bytes(b'x')
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip,
                                                 '--transfer', str(pkl)]), 1)
    assert c.resume_pkl == str(pkl) and c.ema_rampup_ratio is None
    run = tmp_path / 'run'
    run.mkdir()
    for kimg in (2, 10, 7):
        (run / f'training-state-{kimg:06d}.pt').write_bytes(b'x')
    (run / 'network-snapshot-000010.pkl').write_bytes(b'x')
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip,
                                                 '--resume', str(run)]), 1)
    assert c.resume_state_dump == str(run / 'training-state-000010.pt')  # latest, not last listed
    assert c.resume_kimg == 10 and c.resume_pkl == str(run / 'network-snapshot-000010.pkl')
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip,
                                                 '--resume', str(run / 'training-state-000007.pt')]), 1)
    assert c.resume_kimg == 7 and c.resume_pkl is None


@pytest.mark.parametrize('extra,message', [
    (['--cond', '1'], '--cond=True requires labels'),
    (['--batch', '30', '--batch-gpu', '4'], 'not divisible by ranks (1) x --batch-gpu=4'),
    (['--precond', 'vp', '--P_mean', '0'], 'only apply to --precond=edm'),
    (['--fp16', '1', '--bf16', '1'], 'mutually exclusive'),
    (['--resume', 'EMPTY'], 'no training-state-*.pt in folder'),
    (['--resume', 'net.pkl'], '--resume must point to a training-state-*.pt file or a run folder'),
    (['--transfer', 'net.pkl', '--resume', 'EMPTY'], 'cannot be specified at the same time'),
    (['--transfer', 'missing.pkl'], 'is neither a file nor a URL'),
    (['--cres', '2,x'], 'not a comma-separated list of integers'),
    (['--label-dropout', '0.1'], '--label-dropout drops class labels; it needs --cond=1'),
])
def test_cli_errors_are_one_line(tmp_path, extra, message):
    data = make_dataset_zip(tmp_path / 'nolabels.zip', num_images=8, labels=False)
    (tmp_path / 'EMPTY').mkdir()
    (tmp_path / 'net.pkl').write_bytes(b'x')
    extra = [str(tmp_path / a) if a in ('EMPTY', 'net.pkl', 'missing.pkl') else a for a in extra]
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', data, '-n'] + extra)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert 'Traceback' not in result.output
    assert not (tmp_path / 'out').exists()


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', str(tmp_path / 'nope.zip')])
    assert result.exit_code != 0 and 'does not exist' in result.output and 'dataset_tool.py' in result.output


def test_dry_run_names_the_run_folder_and_creates_nothing(tiny_zip, tmp_path):
    (tmp_path / '00003-old').mkdir()
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', tiny_zip, '--cond', '1',
                                             '--arch', 'ncsnpp', '--precond', 've', '--batch', '64', '--fp16', '1',
                                             '--seed', '5', '--dry-run'])
    assert result.exit_code == 0, result.output
    expected = os.path.join(str(tmp_path), '00004-tiny-cond-ncsnpp-ve-gpus1-batch64-fp16')
    assert f'Output directory:        {expected}' in result.output
    assert 'Dry run; exiting.' in result.output
    assert sorted(os.listdir(tmp_path)) == ['00003-old']


def test_provenance_records_versions_precision_and_dataset_hash(tiny_zip, tmp_path):
    opts = options(['--outdir', str(tmp_path), '--data', tiny_zip, '--bf16', '1'])
    p = train.provenance(tiny_zip, 64, opts)
    assert p['versions']['torch'] == torch.__version__ and p['versions']['numpy'] == np.__version__
    assert p['precision']['bf16'] is True and p['precision']['fp16'] is False
    assert p['dataset']['size'] == 64 and len(p['dataset']['sha256']) == 64
    assert set(p['git']) == {'commit', 'dirty'}
    json.dumps(p)
    # Same content -> same hash; different pixels -> different hash.
    same = make_dataset_zip(tmp_path / 'same.zip')
    other = make_dataset_zip(tmp_path / 'other.zip', seed=1)
    assert train.dataset_fingerprint(same)['sha256'] == p['dataset']['sha256']
    assert train.dataset_fingerprint(other)['sha256'] != p['dataset']['sha256']


@pytest.mark.parametrize('arch,precond', [('ncsnpp', 've'), ('adm', 'edm'), ('ddpmpp', 'vp')])
def test_cli_options_drive_one_training_step(tiny_zip, tmp_path, arch, precond):
    """The kwargs train.py builds construct and train every architecture / preconditioning pair."""
    from training import training_loop
    c, _ = train.build_training_options(options([
        '--outdir', str(tmp_path), '--data', tiny_zip, '--cond', '1', '--arch', arch, '--precond', precond,
        '--cbase', '16', '--cres', '1,1', '--batch', '8', '--workers', '0']), world=1)
    c.update(total_kimg=0.008, run_dir=str(tmp_path / 'run'), seed=0, print_summary=False)
    res = training_loop.training_loop(**c, device=torch.device('cpu'))
    assert res.cur_nimg == 8
    state = torch.load(tmp_path / 'run' / 'training-state-000000.pt', weights_only=True)
    assert any(k.startswith('model.map_label') for k in state['net'])  # conditional network
    stats = json.loads((tmp_path / 'run' / 'stats.jsonl').read_text().splitlines()[-1])
    assert np.isfinite(stats['Loss/loss']['mean'])


def test_train_optim_option(tmp_path, monkeypatch):
    data = make_dataset_zip(tmp_path / 'tiny.zip', num_images=8)
    ctx = train.main.make_context('train', ['--outdir', str(tmp_path), '--data', data])
    c, _ = train.build_training_options(dnnlib.EasyDict(ctx.params), world=1)
    assert c.optimizer_kwargs.class_name == 'torch.optim.Adam'
    monkeypatch.setattr(presets, 'check_optimizer', lambda name: None)  # as if bitsandbytes were installed
    ctx = train.main.make_context('train', ['--outdir', str(tmp_path), '--data', data, '--optim', 'adam8bit', '--lr', '2e-4'])
    c, _ = train.build_training_options(dnnlib.EasyDict(ctx.params), world=1)
    assert c.optimizer_kwargs == dict(class_name='bitsandbytes.optim.Adam8bit', betas=[0.9, 0.999], eps=1e-8, lr=2e-4)
    monkeypatch.undo()
    import importlib.util
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)  # as if it were not
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', data, '--optim', 'adam8bit',
                                             '--dry-run'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(errors) == 1 and 'pip install' in errors[0], result.output


# ---------------------------------------------------------------------------- failures (one line, nothing left behind)
# In-process runs through click's CliRunner on helpers.TINY_RUN (tiny network, tiny 8x8 data); tests that need
# separate processes start them.

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


def crafted_pickle(path):
    """A network pickle that asks to call os.system while loading (the safe loader must refuse)."""
    class Evil:
        def __reduce__(self):
            return os.system, ('echo pwned',)
    path.write_bytes(pickle.dumps({'ema': Evil()}))
    return str(path)


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


def test_diverging_cli_run_exits_non_zero_with_one_line(tiny_zip, tmp_path):
    result = run_train(['--outdir', tmp_path, '--data', tiny_zip, '--batch', '16', '--lr', '1e6', '--lr-rampup', '0',
                        '--nan-patience', '3', '--duration', '1'] + TINY_RUN)
    assert_one_line_error(result, 'NaN/Inf for 3 consecutive steps')
    assert 'loss ' in result.output  # the tick line shows the loss


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
    result = run_train(['--outdir', outdir, '--data', data, '--duration', '1'] + TINY_RUN + batch + extra)
    assert_one_line_error(result, name, says)
    if case == 'outdir is a file':
        assert outdir.read_text() == 'not a folder'
    else:
        assert not outdir.exists(), os.listdir(outdir)


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
    result = run_train(['--outdir', outdir, '--data', data, '--batch', '64', '--duration', '0.004'] + TINY_RUN
                       + ['--snap', '100', '--workers', workers])
    run = outdir / os.listdir(outdir)[0]
    line = assert_one_line_error(result, f'{data}:{member(idx)}: cannot read image', f'--resume={run}')
    assert '\n' not in line
    state = tl.load_training_state(str(run / 'training-state-000001.pt'))
    assert state['cur_nimg'] == 17 * 64
    assert not [f for f in os.listdir(run) if f.endswith('.tmp')]


def test_resume_folder_with_damaged_newest_state(tiny_zip, finished_run, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    good = run / 'training-state-000000.pt'
    good.write_bytes((finished_run / 'training-state-000000.pt').read_bytes())
    bad = run / 'training-state-000005.pt'
    bad.write_bytes(good.read_bytes()[:3000])
    args = ['--outdir', tmp_path / 'out', '--data', tiny_zip, '--batch', '16', '--resume', run, '-n'] + TINY_RUN
    result = run_train(args)
    assert_one_line_error(result, str(bad), 'truncated training state', '--resume-fallback=1')
    result = run_train(args + ['--resume-fallback', '1'])
    assert result.exit_code == 0, result.output
    assert f'Warning: --resume-fallback: {bad}: truncated training state' in result.output
    assert f'"resume_state_dump": "{good}"' in result.output
    assert not (tmp_path / 'out').exists()


def test_signal_stop_exits_with_its_own_status(tiny_zip, tmp_path):
    outdir = tmp_path / 'out'

    def preempt():
        deadline = time.time() + 60
        while not list(outdir.glob('*/stats.jsonl')) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    result = run_train(['--outdir', outdir, '--data', tiny_zip, '--batch', '16', '--duration', '10'] + TINY_RUN)
    assert result.exit_code == 3, result.output[-2000:]
    assert train.EXIT_STOPPED == 3
    assert 'Stop requested (SIGTERM)' in result.output and 'continue with --resume=' in result.output
    assert list(outdir.glob('*/training-state-*.pt'))


def test_everything_a_run_writes_has_the_usual_permissions(tiny_zip, tmp_path):
    old = os.umask(0o027)
    try:
        result = run_train(['--outdir', tmp_path / 'out', '--data', tiny_zip, '--batch', '64', '--duration', '0.001']
                           + TINY_RUN)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output[-2000:]
    run = tmp_path / 'out' / os.listdir(tmp_path / 'out')[0]
    files = sorted(os.listdir(run))
    assert {'log.txt', 'stats.jsonl', 'training_options.json', 'training-state-000001.pt',
            'network-snapshot-000001.pkl'} <= set(files)
    assert {f: oct(os.stat(run / f).st_mode & 0o777) for f in files} == {f: oct(0o640) for f in files}
    assert oct(os.stat(run).st_mode & 0o777) == oct(0o750)


# ---------------------------------------------------------------------------- end to end (slow)

# Not TINY: that name is rebound further down (the reliability tests' options), and these tests, which run after
# the module is loaded, then got the later list (batch 4) and failed.
TINY_TORCHRUN = ['--cbase', '16', '--cres', '1', '--batch', '64', '--tick', '1', '--snap', '1', '--dump', '1',
                 '--seed', '7', '--lr-rampup', '0.5', '--ema', '0.001', '--augment', '0.2']


def torchrun(repo_root, env, args, **popen_kwargs):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(str(repo_root), 'train.py')] + list(args)
    return subprocess.Popen(cmd, cwd=str(repo_root), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen_kwargs)


def finish(proc, timeout=85):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def run_dirs(outdir):
    return sorted(glob.glob(os.path.join(str(outdir), '0*')))


@pytest.fixture(scope='module')
def slow_data(tmp_path_factory):
    return make_dataset_zip(tmp_path_factory.mktemp('slowdata') / 'tiny8.zip', num_images=256)


@pytest.fixture(scope='module')
def straight_run(slow_data, tmp_path_factory, repo_root):
    """Uninterrupted 2-rank run of 3 kimg (DataLoader with one worker process per rank)."""
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1')
    outdir = tmp_path_factory.mktemp('straight')
    t0 = time.time()
    out = finish(torchrun(repo_root, env, ['--outdir', str(outdir), '--data', slow_data, '--cond', '1', '--duration',
                                           '0.003', '--workers', '1', '--batch-gpu', '16'] + TINY_TORCHRUN))
    return dnnlib.EasyDict(run_dir=run_dirs(outdir)[0], out=out, seconds=time.time() - t0)


@pytest.mark.slow
def test_torchrun_two_ranks_writes_snapshot_state_and_ranks_agree(straight_run):
    run = straight_run.run_dir
    assert os.path.basename(run) == '00000-tiny8-cond-ddpmpp-edm-gpus2-batch64-fp32'
    files = set(os.listdir(run))
    assert {'training_options.json', 'log.txt', 'stats.jsonl', 'network-snapshot-000003.pkl',
            'training-state-000003.pt'} <= files
    opts = json.load(open(os.path.join(run, 'training_options.json')))
    assert opts['batch_size'] == 64 and opts['batch_gpu'] == 16  # 2 ranks x 2 accumulation rounds x 16
    assert opts['seed'] == 7 and opts['provenance']['dataset']['size'] == 256
    from training.training_loop import training_loop
    inspect.signature(training_loop).bind(**opts)  # the file is a valid training_loop(**kwargs) call
    state = torch.load(os.path.join(run, 'training-state-000003.pt'), weights_only=True)
    assert state['world_size'] == 2 and state['cur_nimg'] == 3008  # 47 steps of 64
    assert len(state['rank_digests']) == 2 and state['rank_digests'][0] == state['rank_digests'][1]
    assert len(state['rng']) == 2 and not torch.equal(state['rng'][0]['torch'], state['rng'][1]['torch'])
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'tick 3' in log and 'Exiting...' in log
    stats = [json.loads(line) for line in open(os.path.join(run, 'stats.jsonl'))]
    assert stats[0]['Loss/loss']['num'] == 64 * 3 * 8 * 8  # first tick: one step, both ranks' losses


@pytest.mark.slow
def test_sigkill_then_resume_from_folder_matches_straight_run(straight_run, slow_data, tmp_path, repo_root):
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1')
    args = ['--data', slow_data, '--cond', '1', '--duration', '0.003', '--workers', '0', '--batch-gpu', '16']
    args += TINY_TORCHRUN
    killed_out = tmp_path / 'killed'
    proc = torchrun(repo_root, env, ['--outdir', str(killed_out)] + args)
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(str(killed_out / '*' / 'training-state-000001.pt')):
        time.sleep(0.05)
    # SIGKILL torchrun and its workers (they run in sessions of their own): no chance to clean up, so
    # the last atomically written state must be usable.
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate()
    psutil.wait_procs(tree, timeout=10)
    killed = run_dirs(killed_out)[0]
    assert not os.path.exists(os.path.join(killed, 'training-state-000003.pt')), 'run finished before the kill'

    out = finish(torchrun(repo_root, env, ['--outdir', str(killed_out), '--resume', killed] + args))
    assert 'Loading training state from' in out
    resumed = run_dirs(killed_out)[1]  # a new run folder, as in the paper
    final = torch.load(os.path.join(resumed, 'training-state-000003.pt'), weights_only=True)
    ref = torch.load(os.path.join(straight_run.run_dir, 'training-state-000003.pt'), weights_only=True)
    assert final['cur_nimg'] == ref['cur_nimg'] == 3008
    for key in ('net', 'ema'):  # bit-identical on CPU
        assert set(final[key]) == set(ref[key])
        for name in ref[key]:
            assert torch.equal(final[key][name], ref[key][name]), (key, name)
    assert final['rank_digests'] == ref['rank_digests']


@pytest.mark.slow
def test_sigterm_saves_state_and_exits_with_status_3(slow_data, tmp_path, repo_root, subprocess_env):
    args = ['--data', slow_data, '--duration', '1', '--workers', '1', '--dump', '1000'] + TINY_TORCHRUN[:-6]
    proc = subprocess.Popen([sys.executable, 'train.py', '--outdir', str(tmp_path)] + args, cwd=str(repo_root),
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(str(tmp_path / '*' / 'stats.jsonl')):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out[-3000:]  # train.EXIT_STOPPED: a requeue wrapper can tell it from the end
    assert 'Stop requested (SIGTERM)' in out and 'continue with --resume=' in out
    run = run_dirs(tmp_path)[0]
    states = glob.glob(os.path.join(run, 'training-state-*.pt'))
    assert len(states) == 1
    state = torch.load(states[0], weights_only=True)
    assert 0 < state['cur_nimg'] < 1_000_000


# ----------------------------------------------------------------------------
# Reliability (issue 24).

TINY_CLI = ['--cbase', '8', '--cres', '1', '--blocks', '1', '--batch', '4', '--workers', '0', '--seed', '0']


@pytest.mark.parametrize('option', ['--duration=inf', '--duration=nan', '--ema=nan', '--lr=inf', '--P_mean=nan'])
def test_non_finite_options_are_usage_errors(tiny_zip, tmp_path, option):
    """They passed the range checks and ended in a 22-line traceback, even with -n."""
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'r'), '--data', tiny_zip, '-n', option] + TINY_CLI)
    assert result.exit_code == 2 and 'Traceback' not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'is not a finite number' in errors[0]


def test_full_disk_is_one_line_naming_the_disk(tiny_zip, tmp_path, monkeypatch):
    """A write failing with ENOSPC (and log.txt failing with it) ends in one line, not two tracebacks."""
    import errno as errno_module

    def full_disk(run_dir, **kwargs):
        class FullFile:
            def write(self, text):
                raise OSError(errno_module.ENOSPC, 'No space left on device')
            flush = close = lambda self: FullFile.write(self, '')
        assert isinstance(sys.stdout, train.dnnlib.util.Logger)
        sys.stdout.file = FullFile()  # train.py's log.txt tee
        raise OSError(errno_module.ENOSPC, 'No space left on device', os.path.join(run_dir, 'training-state.pt'))
    monkeypatch.setattr(train.training_loop, 'training_loop', full_disk)
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'r'), '--data', tiny_zip] + TINY_CLI)
    assert result.exit_code == 1 and 'Traceback' not in result.output, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'No space left on device' in errors[0], result.output
    assert 'training-state.pt' in errors[0] and f'the disk mounted at {train._disk_of(str(tmp_path))} is full' in errors[0]
    assert not isinstance(sys.stdout, train.dnnlib.util.Logger)


def test_nosubdir_refuses_a_folder_holding_another_run(tiny_zip, tmp_path):
    """--nosubdir into an existing run folder mixed two runs; a later --resume picked the wrong state."""
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'log.txt').write_text('an earlier run\n')
    args = ['--outdir', str(tmp_path / 'run'), '--data', tiny_zip, '--nosubdir', '-n'] + TINY_CLI
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 1 and 'is not empty' in result.output and '--resume=' in result.output, result.output
    # A new or empty folder, or resuming the run that is there, is fine.
    (tmp_path / 'empty').mkdir()
    assert CliRunner().invoke(train.main, [a if a != str(tmp_path / 'run') else str(tmp_path / 'empty')
                                           for a in args]).exit_code == 0
    train._check_nosubdir(dnnlib.EasyDict(outdir=str(tmp_path / 'run'), resume=str(tmp_path / 'run')))
    train._check_nosubdir(dnnlib.EasyDict(outdir=str(tmp_path / 'run'),
                                          resume=str(tmp_path / 'run' / 'training-state-000004.pt')))
