"""train.py: options, presets and defaults of the paper's CLI, validation errors, run-folder naming,
provenance; slow end-to-end runs under torchrun (2 ranks, gloo): snapshot + state written, ranks hold
identical weights, SIGKILL + --resume=<run folder> reproduces the uninterrupted run, SIGTERM saves (exit 3)."""

import glob
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from tinydata import make_dataset_zip


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


# ---------------------------------------------------------------------------- end to end (slow)

TINY = ['--cbase', '16', '--cres', '1', '--batch', '64', '--tick', '1', '--snap', '1', '--dump', '1',
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
    out = finish(torchrun(repo_root, env, ['--outdir', str(outdir), '--data', slow_data, '--cond', '1',
                                           '--duration', '0.003', '--workers', '1', '--batch-gpu', '16'] + TINY))
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
    args = ['--data', slow_data, '--cond', '1', '--duration', '0.003', '--workers', '0', '--batch-gpu', '16'] + TINY
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
    args = ['--data', slow_data, '--duration', '1', '--workers', '1', '--dump', '1000'] + TINY[:-6]
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

TINY_CPU = ['--cbase', '8', '--cres', '1', '--blocks', '1', '--batch', '4', '--workers', '0', '--seed', '0']


@pytest.mark.parametrize('option', ['--duration=inf', '--duration=nan', '--ema=nan', '--lr=inf', '--P_mean=nan'])
def test_non_finite_options_are_usage_errors(tiny_zip, tmp_path, option):
    """They passed the range checks and ended in a 22-line traceback, even with -n."""
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'r'), '--data', tiny_zip, '-n', option] + TINY_CPU)
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
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'r'), '--data', tiny_zip] + TINY_CPU)
    assert result.exit_code == 1 and 'Traceback' not in result.output, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'No space left on device' in errors[0], result.output
    assert 'training-state.pt' in errors[0] and f'the disk mounted at {train._disk_of(str(tmp_path))} is full' in errors[0]
    assert not isinstance(sys.stdout, train.dnnlib.util.Logger)


def test_nosubdir_refuses_a_folder_holding_another_run(tiny_zip, tmp_path):
    """--nosubdir into an existing run folder mixed two runs; a later --resume picked the wrong state."""
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'log.txt').write_text('an earlier run\n')
    args = ['--outdir', str(tmp_path / 'run'), '--data', tiny_zip, '--nosubdir', '-n'] + TINY_CPU
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 1 and 'is not empty' in result.output and '--resume=' in result.output, result.output
    # A new or empty folder, or resuming the run that is there, is fine.
    (tmp_path / 'empty').mkdir()
    assert CliRunner().invoke(train.main, [a if a != str(tmp_path / 'run') else str(tmp_path / 'empty')
                                           for a in args]).exit_code == 0
    train._check_nosubdir(dnnlib.EasyDict(outdir=str(tmp_path / 'run'), resume=str(tmp_path / 'run')))
    train._check_nosubdir(dnnlib.EasyDict(outdir=str(tmp_path / 'run'),
                                          resume=str(tmp_path / 'run' / 'training-state-000004.pt')))
