"""train.py --precond=iddpm (Improved DDPM, Nichol & Dhariwal 2021): the kwargs of --arch=adm / ddpmpp with
iDDPM's loss and its options (--iddpm-schedule, --iddpm-T, --iddpm-loss), the --preset=iddpm-* values, one tick
of training through the CLI whose snapshot samples with the discrete samplers and EDM's, and the option
combinations that are one-line usage errors."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from training import iddpm, presets, sampling

pytestmark = pytest.mark.usefixtures('one_thread')


def build(tiny_zip, tmp_path, *args):
    ctx = train.main.make_context('train', ['--outdir', str(tmp_path), '--data', tiny_zip, *args])
    opts = dnnlib.EasyDict(ctx.params)
    opts._given = train._given_on_command_line(ctx)
    c, _ = train.build_training_options(opts, world=1)
    return c


def test_precond_choices_are_the_table():
    precond = next(p for p in train.main.params if p.name == 'precond')
    assert list(precond.type.choices) == list(presets.PRECOND_PRESETS) == ['vp', 've', 'edm', 'iddpm']


@pytest.mark.parametrize('arch,model_type', [('adm', 'DhariwalUNet'), ('ddpmpp', 'SongUNet')])
def test_iddpm_kwargs_share_the_process_between_network_and_loss(tiny_zip, tmp_path, arch, model_type):
    c = build(tiny_zip, tmp_path, f'--arch={arch}', '--precond=iddpm')
    assert c.network_kwargs.class_name == 'training.networks_iddpm.iDDPMDiscretePrecond'
    assert c.network_kwargs.model_type == model_type
    assert (c.network_kwargs.schedule, c.network_kwargs.M, c.network_kwargs.learn_sigma) == ('cosine', 4000, True)
    assert c.loss_kwargs == dict(class_name='training.iddpm.iDDPMLoss', schedule='cosine', T=4000, loss_type='hybrid')
    c = build(tiny_zip, tmp_path, f'--arch={arch}', '--precond=iddpm', '--iddpm-schedule=linear', '--iddpm-T=1000',
              '--iddpm-loss=simple')
    assert (c.network_kwargs.schedule, c.network_kwargs.M, c.network_kwargs.learn_sigma) == ('linear', 1000, False)
    assert c.loss_kwargs == dict(class_name='training.iddpm.iDDPMLoss', schedule='linear', T=1000, loss_type='simple')
    c = build(tiny_zip, tmp_path, f'--arch={arch}', '--precond=iddpm', '--iddpm-loss=vlb-is')
    assert c.loss_kwargs.loss_type == 'vlb' and c.loss_kwargs.importance_sampling is True
    assert c.network_kwargs.learn_sigma is True
    for kwargs in (c.network_kwargs, c.loss_kwargs):
        dnnlib.util.get_obj_by_name(kwargs.class_name)


@pytest.mark.parametrize('name', list(iddpm.PRESETS))
def test_iddpm_presets_are_the_papers_adm_kwargs(tiny_zip, tmp_path, name):
    """--preset=iddpm-*: ADM with exactly iddpm.PRESETS[name]['adm_network_kwargs'], its loss and training values."""
    p = iddpm.PRESETS[name]
    c = build(tiny_zip, tmp_path, f'--preset={name}')
    expected = dict(p['adm_network_kwargs'])
    for key, value in expected.items():
        assert c.network_kwargs[key] == value, key
    assert dict(c.loss_kwargs, lambda_vlb=iddpm.iDDPMLoss().lambda_vlb) == p['loss_kwargs']  # lambda: the loss's default
    assert c.optimizer_kwargs.lr == p['training']['lr'] and c.batch_size == p['training']['batch']
    assert c.lr_rampup_kimg == 0 and 'augment_kwargs' not in c and 'augment_dim' not in c.network_kwargs
    assert c.ema_halflife_kimg == int(p['training']['ema_halflife_kimg'])  # 0.9999 per step at batch 128
    # Options given override the preset.
    c = build(tiny_zip, tmp_path, f'--preset={name}', '--iddpm-T=1000', '--attn=8')
    assert c.network_kwargs.M == c.loss_kwargs.T == 1000 and c.network_kwargs.attn_resolutions == [8]


def test_paper_kwargs_unchanged_by_the_new_options(tiny_zip, tmp_path):
    """--attn and the iDDPM options are left out of the kwargs unless given: the paper's command lines keep
    their exact kwargs (tests/test_train_edm2.py checks them byte for byte)."""
    c = build(tiny_zip, tmp_path)
    assert 'attn_resolutions' not in c.network_kwargs and c.loss_kwargs == dict(class_name='training.loss.EDMLoss')
    c = build(tiny_zip, tmp_path, '--arch=ncsnpp', '--attn=4,8')
    assert c.network_kwargs.attn_resolutions == [4, 8]


TINY = ['--cbase=16', '--cres=1', '--blocks=1', '--attn=4', '--batch=64', '--duration=0.001', '--tick=1', '--snap=1',
        '--dump=1', '--workers=0', '--seed=0', '--iddpm-T=40']


@pytest.mark.parametrize('arch', ['adm', 'ddpmpp'])
def test_train_py_trains_iddpm_one_tick_and_the_snapshot_samples(tiny_zip, tmp_path, arch):
    from torch_utils import persistence
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', tiny_zip, '--cond=1',
                                             f'--arch={arch}', '--precond=iddpm', *TINY])
    assert result.exit_code == 0, result.output
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert run.name.endswith(f'-tiny-cond-{arch}-iddpm-gpus1-batch64-fp32')
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert np.isfinite(stats[-1]['Loss/loss']['mean'])
    snap = persistence.load_network_pkl(str(run / 'network-snapshot-000001.pkl'))
    net, loss_fn = snap['ema'], snap['loss_fn']
    assert type(net).__name__ == 'iDDPMDiscretePrecond' and net.M == loss_fn.T == 40 and net.learn_sigma
    assert isinstance(loss_fn, iddpm.iDDPMLoss) and loss_fn.loss_type == 'hybrid'
    assert snap['augment_pipe'] is not None  # the CLI's default --augment=0.12: augment labels reach the backbone
    for sampler in ('iddpm', 'iddpm_ddim', 'edm'):
        batches = list(sampling.generate_images(net, [0, 1, 2], max_batch_size=2, sampler=sampler, num_steps=5))
        images = torch.cat([b for _s, b in batches])
        assert images.shape == (3, 8, 8, 3) and images.dtype == torch.uint8, sampler
    # The same seeds give the same images, whatever the batch size.
    a = torch.cat([b for _s, b in sampling.generate_images(net, [0, 1, 2], max_batch_size=3, sampler='iddpm', num_steps=5)])
    b = torch.cat([b for _s, b in sampling.generate_images(net, [0, 1, 2], max_batch_size=1, sampler='iddpm', num_steps=5)])
    assert torch.equal(a, b)


@pytest.mark.parametrize('extra,message', [
    (['--iddpm-T=100'], '--iddpm-T is an option of --precond=iddpm, not of --precond=edm'),
    (['--precond=vp', '--iddpm-loss=vlb'], '--iddpm-loss is an option of --precond=iddpm'),
    (['--precond=iddpm', '--uncertainty=1'], '--uncertainty=1 weights the losses of --precond=vp|ve|edm'),
    (['--arch=edm2', '--precond=iddpm'], '--arch=edm2 has its own (EDM) preconditioning'),
    (['--arch=edm2small-c', '--precond=iddpm'], '--arch=edm2small-c has its own (EDM) preconditioning'),
    (['--preset=iddpm-cifar10', '--precond=edm'], '--preset=iddpm-cifar10 is for --precond=iddpm, not --precond=edm'),
    (['--preset=iddpm-cifar10', '--arch=ddpmpp'], '--preset=iddpm-cifar10 is for --arch=adm'),
])
def test_bad_iddpm_combinations_are_one_line_usage_errors(tiny_zip, tmp_path, extra, message):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', tiny_zip, '-n'] + extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and message in errors[0], result.output
    assert 'Traceback' not in result.output and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('extra,message', [
    (['--precond=iddpm', '--P_mean=0'], 'only apply to --precond=edm'),
    (['--precond=iddpm', '--loss=edm'], '--loss=edm trains --precond=edm networks'),
    (['--precond=iddpm', '--iddpm-loss=kl'], "'kl' is not one of"),
    (['--precond=iddpm', '--iddpm-T=1'], '--iddpm-T'),
])
def test_other_iddpm_errors_are_one_line(tiny_zip, tmp_path, extra, message):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', tiny_zip, '-n'] + extra)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and message in errors[0], result.output
    assert 'Traceback' not in result.output


@pytest.mark.slow
def test_two_ranks_train_iddpm_with_importance_sampling(tiny_zip, tmp_path, repo_root):
    """Two gloo ranks: every parameter gets a gradient (DDP), and the importance sampler of --iddpm-loss=vlb-is
    sees every rank's losses (its draws stay in step: the ranks end with identical weights)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           f'--outdir={tmp_path}', f'--data={tiny_zip}', '--cond=1', '--arch=adm', '--precond=iddpm',
           '--iddpm-loss=vlb-is', '--iddpm-T=20', '--cbase=16', '--cres=1', '--blocks=1', '--attn=4', '--batch=32',
           '--duration=0.001', '--tick=1', '--workers=0', '--seed=1']
    result = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    state = torch.load(next(run.glob('training-state-*.pt')), weights_only=True)
    assert state['cur_nimg'] == 1024 and state['rank_digests'][0] == state['rank_digests'][1]
