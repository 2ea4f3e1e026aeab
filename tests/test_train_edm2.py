"""train.py's EDM2 options: --arch=edm2, --preset, --loss=edm2, --uncertainty, --lr-schedule/--decay,
--ema-stds. Plain EDM command lines give exactly the kwargs they gave before these options existed; every
EDM2 combination builds and trains with a gradient for every parameter (a parameter without one breaks DDP
with more than one rank); an EDM2 run with two EMA profiles resumes bit-exactly on the CPU."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from training import presets, training_loop

pytestmark = pytest.mark.usefixtures('one_thread')



def options(args):
    """A command line as click parses it, with the options given recorded as train.main() records them."""
    ctx = train.main.make_context('train', list(args))
    opts = dnnlib.EasyDict(ctx.params)
    opts._given = train._given_on_command_line(ctx)
    return opts


def build(tiny_zip, tmp_path, *args):
    c, _ = train.build_training_options(options(['--outdir', str(tmp_path), '--data', tiny_zip, *args]), world=1)
    return c


def dry_run_options(tiny_zip, tmp_path, *args) -> dict:
    """training_options as `train.py -n` prints them (main's own bookkeeping of the options given)."""
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', tiny_zip, '-n', *args])
    assert result.exit_code == 0, result.output
    text = result.output.split('Training options:', 1)[1]
    return json.loads(text[:text.index('\n}\n') + 2])


# ---------------------------------------------------------------------------- the paper's command lines

# json.dumps(build_training_options(...)) of train.py before the EDM2 options (commit 1494f5f), --data=DATA.
PAPER_KWARGS = [
    ('',
     '{"dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "DATA", "use_labels'
     '": false, "xflip": false, "cache": true, "resolution": 8, "max_size": 64}, "data_loader_kwargs": {"p'
     'in_memory": true, "num_workers": 1, "prefetch_factor": 2}, "network_kwargs": {"model_type": "SongUNe'
     't", "embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard", "channel'
     '_mult_noise": 1, "resample_filter": [1, 1], "model_channels": 128, "channel_mult": [2, 2, 2], "class'
     '_name": "training.networks.EDMPrecond", "augment_dim": 9, "dropout": 0.13, "use_fp16": false}, "loss'
     '_kwargs": {"class_name": "training.loss.EDMLoss"}, "optimizer_kwargs": {"class_name": "torch.optim.A'
     'dam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08}, "augment_kwargs": {"class_name": "training.'
     'augment.AugmentPipe", "p": 0.12, "xflip": 100000000.0, "yflip": 1, "scale": 1, "rotate_frac": 1, "an'
     'iso": 1, "translate_frac": 1}, "total_kimg": 200000, "ema_halflife_kimg": 500, "lr_rampup_kimg": 100'
     '00.0, "batch_size": 512, "batch_gpu": null, "loss_scaling": 1.0, "cudnn_benchmark": true, "kimg_per_'
     'tick": 50, "snapshot_ticks": 50, "state_dump_ticks": 500}'),
    ('--cond=1 --arch=ncsnpp --precond=ve --augment=0 --fp16=1',
     '{"dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "DATA", "use_labels'
     '": true, "xflip": false, "cache": true, "resolution": 8, "max_size": 64}, "data_loader_kwargs": {"pi'
     'n_memory": true, "num_workers": 1, "prefetch_factor": 2}, "network_kwargs": {"model_type": "SongUNet'
     '", "embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard", "channel_mul'
     't_noise": 2, "resample_filter": [1, 3, 3, 1], "model_channels": 128, "channel_mult": [2, 2, 2], "cla'
     'ss_name": "training.networks.VEPrecond", "dropout": 0.13, "use_fp16": true}, "loss_kwargs": {"class_'
     'name": "training.loss.VELoss"}, "optimizer_kwargs": {"class_name": "torch.optim.Adam", "lr": 0.001, '
     '"betas": [0.9, 0.999], "eps": 1e-08}, "total_kimg": 200000, "ema_halflife_kimg": 500, "lr_rampup_kim'
     'g": 10000.0, "batch_size": 512, "batch_gpu": null, "loss_scaling": 1.0, "cudnn_benchmark": true, "ki'
     'mg_per_tick": 50, "snapshot_ticks": 50, "state_dump_ticks": 500}'),
    ('--arch=adm --cond=1 --ema=0.1 --lr=2e-4 --lr-rampup=5 --dropout=0.1 --bf16=1 --xflip=1 --P_mean=0 --sigma_data=0.6 --batch=64 --cbase=32 --cres=1,2 --blocks=2 --duration=0.5',
     '{"dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "DATA", "use_labels'
     '": true, "xflip": true, "cache": true, "resolution": 8, "max_size": 128}, "data_loader_kwargs": {"pi'
     'n_memory": true, "num_workers": 1, "prefetch_factor": 2}, "network_kwargs": {"model_type": "Dhariwal'
     'UNet", "model_channels": 32, "channel_mult": [1, 2], "class_name": "training.networks.EDMPrecond", "'
     'sigma_data": 0.6, "num_blocks": 2, "augment_dim": 9, "dropout": 0.1, "use_fp16": false, "use_bf16": '
     'true}, "loss_kwargs": {"class_name": "training.loss.EDMLoss", "P_mean": 0.0, "sigma_data": 0.6}, "op'
     'timizer_kwargs": {"class_name": "torch.optim.Adam", "lr": 0.0002, "betas": [0.9, 0.999], "eps": 1e-0'
     '8}, "augment_kwargs": {"class_name": "training.augment.AugmentPipe", "p": 0.12, "xflip": 100000000.0'
     ', "yflip": 1, "scale": 1, "rotate_frac": 1, "aniso": 1, "translate_frac": 1}, "total_kimg": 500, "em'
     'a_halflife_kimg": 100, "lr_rampup_kimg": 5.0, "batch_size": 64, "batch_gpu": null, "loss_scaling": 1'
     '.0, "cudnn_benchmark": true, "kimg_per_tick": 50, "snapshot_ticks": 50, "state_dump_ticks": 500}'),
]


@pytest.mark.parametrize('args,expected', PAPER_KWARGS)
def test_paper_command_lines_give_the_same_kwargs_byte_for_byte(tiny_zip, tmp_path, args, expected):
    c = build(tiny_zip, tmp_path, *shlex.split(args))
    c.dataset_kwargs.path = 'DATA'
    assert c.pop('nan_patience') == 100  # the divergence stop (issue 11), recorded since; not an EDM2 option
    assert json.dumps(c) == expected
    for key in ('lr_kwargs', 'ema_kwargs', 'nonfinite_grads'):
        assert key not in c


# ---------------------------------------------------------------------------- EDM2 options (fast)

def test_arch_edm2_has_edm2s_defaults(tiny_zip, tmp_path):
    c = build(tiny_zip, tmp_path, '--arch=edm2', '--cond=1')
    assert c.network_kwargs == dict(model_channels=192, class_name='training.networks_edm2.Precond', dropout=0.0,
                                    use_fp16=False)
    assert c.loss_kwargs == dict(class_name='training.loss.EDM2Loss', P_mean=-0.4, P_std=1.0)
    assert c.optimizer_kwargs == dict(class_name='torch.optim.Adam', lr=0.01, betas=[0.9, 0.99], eps=1e-8)
    assert c.lr_kwargs == dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=0.01,
                               ref_batches=70000, rampup_Mimg=10.0)
    assert c.ema_kwargs == dict(class_name='training.phema.PowerFunctionEMA', stds=[0.05, 0.1])
    assert c.nonfinite_grads == 'zero' and 'augment_kwargs' not in c
    for name in (c.network_kwargs.class_name, c.loss_kwargs.class_name, c.ema_kwargs.class_name):
        dnnlib.util.get_obj_by_name(name)
    # The paper's half-life EMA on request, EDM2's network otherwise unchanged.
    c = build(tiny_zip, tmp_path, '--arch=edm2', '--ema=0.05')
    assert 'ema_kwargs' not in c and c.ema_halflife_kimg == 50


def test_arch_choices_are_the_architecture_table():
    arch = next(p for p in train.main.params if p.name == 'arch')
    assert list(arch.type.choices) == list(presets.ARCHITECTURES) and arch.metavar == '|'.join(presets.ARCHITECTURES)


def test_a_new_architecture_is_a_table_entry(tiny_zip, tmp_path, monkeypatch):
    """Every field of an Architecture record takes effect with no code for it in train.py."""
    toy = presets.Architecture(
        backbone=dict(model_type='SongUNet', model_channels=8, channel_mult=[1, 1], num_blocks=1),
        network='training.networks.EDMPrecond', loss='training.loss.EDM2Loss', loss_kwargs=dict(sigma_data=0.4),
        loss_options=('P_mean',), uncertainty=False, defaults=dict(lr=0.005, dropout=0.0, augment=0.0),
        training=dict(optimizer_kwargs=dict(betas=[0.8, 0.9]), nonfinite_grads='zero'), ema_stds=(0.1,),
        refuses=(presets.Refusal('xflip', (False,), '--arch=toy: no x-flips'),))
    monkeypatch.setitem(presets.ARCHITECTURES, 'toy', toy)
    opts = options(['--outdir', str(tmp_path), '--data', tiny_zip, '--P_mean=-1', '--P_std=2'])
    opts.arch = 'toy'
    c, _ = train.build_training_options(opts, world=1)
    assert c.network_kwargs == dict(toy.backbone, class_name='training.networks.EDMPrecond', dropout=0.0,
                                    use_fp16=False)
    assert c.loss_kwargs == dict(class_name='training.loss.EDM2Loss', sigma_data=0.4, P_mean=-1)  # not P_std
    assert c.optimizer_kwargs == dict(class_name='torch.optim.Adam', lr=0.005, betas=[0.8, 0.9], eps=1e-8)
    assert c.nonfinite_grads == 'zero' and 'augment_kwargs' not in c
    assert c.ema_kwargs == dict(class_name='training.phema.PowerFunctionEMA', stds=[0.1])
    assert toy.backbone['channel_mult'] == [1, 1]  # the record is not modified by a run's overrides
    opts = options(['--outdir', str(tmp_path), '--data', tiny_zip, '--xflip=1'])
    opts.arch = 'toy'
    with pytest.raises(train.click.ClickException, match='--arch=toy: no x-flips'):
        train.build_training_options(opts, world=1)


def test_architecture_builder_lr_and_ema_fields(tiny_zip, tmp_path, monkeypatch):
    """The fields for a family with its own constructor, lr schedule and EMA: network_builder/network_options,
    lr_kwargs/lr_options/lr_epoch_kwargs (the epoch from the dataset, before x-flips), ema_kwargs."""
    toy = presets.Architecture(
        backbone=dict(net_type='UNetG'), network_builder='training.networks_edm2small.ladder_network_kwargs',
        network_options=('cbase', 'blocks'), loss='training.networks_edm2small.EDMSmallLoss', uncertainty=True,
        lr_kwargs=dict(func_name='training.networks_edm2small.ladder_lr_schedule', rampup_kimg=1),
        lr_options=dict(lr='ref_lr', decay='ref_batches'), lr_epoch_kwargs=('epoch_kimg',),
        ema_kwargs=dict(class_name='training.ema.WarmupEMA', beta=0.99))
    monkeypatch.setitem(presets.ARCHITECTURES, 'toy', toy)
    opts = options(['--outdir', str(tmp_path), '--data', tiny_zip, '--cbase=16', '--cres=1', '--xflip=1',
                    '--decay=10', '--augment=0'])
    opts.arch = 'toy'
    c, _ = train.build_training_options(opts, world=1)
    assert c.network_kwargs.class_name == 'training.networks_edm2small.EDM' and c.network_kwargs.net_type == 'UNetG'
    assert c.network_kwargs.n_channels == 16 and c.network_kwargs.ch_mults == [1, 2, 2, 2]  # --cres not passed
    assert c.lr_kwargs == dict(func_name='training.networks_edm2small.ladder_lr_schedule', rampup_kimg=1, ref_lr=1e-3,
                               ref_batches=10, epoch_kimg=0.064)
    assert c.ema_kwargs == dict(class_name='training.ema.WarmupEMA', beta=0.99)
    opts = options(['--outdir', str(tmp_path), '--data', tiny_zip, '--ema=0.1', '--augment=0'])
    opts.arch = 'toy'
    c, _ = train.build_training_options(opts, world=1)
    assert 'ema_kwargs' not in c and c.ema_halflife_kimg == 100  # --ema: the paper's EMA instead
    assert 'ref_batches' not in c.lr_kwargs


@pytest.mark.parametrize('name', [n for n, p in presets.CONFIG_PRESETS.items() if p['arch'] == 'edm2'])
def test_presets_fill_in_their_numbers(tiny_zip, tmp_path, name):
    preset = presets.CONFIG_PRESETS[name]
    c = build(tiny_zip, tmp_path, f'--preset={name}')
    assert c.network_kwargs.class_name == presets.EDM2_NETWORK
    assert c.total_kimg == int(preset['duration'] * 1000) and c.batch_size == preset['batch']
    assert c.network_kwargs.model_channels == preset['cbase'] and c.network_kwargs.dropout == preset['dropout']
    assert c.network_kwargs.get('channel_mult') == preset.get('cres')
    assert c.network_kwargs.get('num_blocks') == preset.get('blocks')
    assert c.optimizer_kwargs.lr == c.lr_kwargs.ref_lr == preset['lr'] and c.lr_kwargs.ref_batches == preset['decay']
    assert (c.loss_kwargs.P_mean, c.loss_kwargs.P_std) == (preset['P_mean'], preset['P_std'])
    assert c.dataset_kwargs.xflip == preset.get('xflip', False)


def test_edm2_img64_presets_are_the_papers():
    p = presets.CONFIG_PRESETS
    assert [p[f'edm2-img64-{s}']['cbase'] for s in ('xs', 's', 'm', 'l', 'xl')] == [128, 192, 256, 320, 384]
    assert [p[f'edm2-img64-{s}']['lr'] for s in ('xs', 's', 'm', 'l', 'xl')] == [0.012, 0.010, 0.009, 0.008, 0.007]
    assert [p[f'edm2-img64-{s}']['dropout'] for s in ('xs', 's', 'm', 'l', 'xl')] == [0, 0, 0.1, 0.1, 0.1]
    assert {p[f'edm2-img64-{s}']['decay'] for s in ('xs', 's', 'm', 'l', 'xl')} == {35000}
    assert [round(p[f'edm2-img64-{s}']['duration'] * 1e6) >> 20 for s in ('xs', 's', 'm', 'l', 'xl')] == \
        [1024, 1024, 2048, 1024, 640]  # Mi images
    assert all(p[f'edm2-img64-{s}']['batch'] == 2048 and (p[f'edm2-img64-{s}']['P_mean'], p[f'edm2-img64-{s}']['P_std'])
               == (-0.8, 1.6) for s in ('xs', 's', 'm', 'l', 'xl'))


def test_options_given_override_the_preset_even_at_their_cli_default(tiny_zip, tmp_path):
    # --batch=512 and --lr-rampup=10000 are the CLI defaults: given explicitly, they still win over the preset.
    opts = dry_run_options(tiny_zip, tmp_path, '--preset=edm2-digits', '--batch=512', '--lr-rampup=10000',
                           '--cbase=16', '--P_std=1.5', '--ema-stds=0.05,0.07,0.1')
    assert opts['batch_size'] == 512 and opts['lr_kwargs']['rampup_Mimg'] == 10.0
    assert opts['network_kwargs']['model_channels'] == 16 and opts['network_kwargs']['channel_mult'] == [1, 2, 2]
    assert opts['loss_kwargs'] == dict(class_name='training.loss.EDM2Loss', P_mean=-1.2, P_std=1.5)
    assert opts['ema_kwargs']['stds'] == [0.05, 0.07, 0.1] and opts['total_kimg'] == 40
    assert os.path.basename(opts['run_dir']).endswith('-tiny-uncond-edm2-edm-gpus1-batch512-fp32')


@pytest.mark.parametrize('args,net_class,loss', [
    (['--precond=edm', '--uncertainty=1'], 'training.networks.EDMPrecond',
     dict(class_name='training.loss.EDM2Loss', P_mean=-1.2, P_std=1.2)),
    (['--precond=edm', '--uncertainty=1', '--P_mean=-1.0'], 'training.networks.EDMPrecond',
     dict(class_name='training.loss.EDM2Loss', P_mean=-1.0, P_std=1.2)),
    (['--precond=vp', '--uncertainty=1'], 'training.networks.VPPrecond', dict(class_name='training.loss.VPUncertaintyLoss')),
    (['--precond=ve', '--uncertainty=1'], 'training.networks.VEPrecond', dict(class_name='training.loss.VEUncertaintyLoss')),
    (['--loss=edm2'], 'training.networks.EDMPrecond', dict(class_name='training.loss.EDM2Loss')),
    (['--loss=edm2', '--uncertainty=1'], 'training.networks.EDMPrecond', dict(class_name='training.loss.EDM2Loss')),
])
def test_uncertainty_adds_the_head_and_the_loss_that_trains_it(tiny_zip, tmp_path, args, net_class, loss):
    c = build(tiny_zip, tmp_path, '--arch=ddpmpp', *args)
    assert c.network_kwargs.class_name == net_class and c.network_kwargs.logvar_channels == 128
    assert c.loss_kwargs == loss
    assert c.optimizer_kwargs.betas == [0.9, 0.999] and 'nonfinite_grads' not in c  # the paper's loop otherwise
    c = build(tiny_zip, tmp_path, '--arch=ddpmpp', '--uncertainty=0', *[a for a in args if 'uncertainty' not in a
                                                                           and 'loss' not in a])
    assert 'logvar_channels' not in c.network_kwargs and 'Uncertainty' not in c.loss_kwargs.class_name


def test_lr_schedule_and_ema_stds_for_the_papers_networks(tiny_zip, tmp_path):
    c = build(tiny_zip, tmp_path, '--lr-schedule=isqrt', '--decay=100', '--lr=2e-3', '--lr-rampup=5',
              '--ema-stds=0.05,0.10,...,0.20')
    assert c.lr_kwargs == dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=2e-3,
                               ref_batches=100, rampup_Mimg=0.005)
    assert c.ema_kwargs == dict(class_name='training.phema.PowerFunctionEMA', stds=[0.05, 0.1, 0.15, 0.2])
    assert c.network_kwargs.class_name == 'training.networks.EDMPrecond' and c.loss_kwargs.class_name.endswith('EDMLoss')
    c = build(tiny_zip, tmp_path, '--arch=edm2', '--lr-schedule=rampup', '--lr-rampup=3')
    assert 'lr_kwargs' not in c and c.lr_rampup_kimg == 3 and c.optimizer_kwargs.lr == 0.01  # the paper's schedule
    lr = dnnlib.util.call_func_by_name(cur_nimg=10**7, batch_size=512, **build(tiny_zip, tmp_path, '--arch=edm2').lr_kwargs)
    assert lr == pytest.approx(training_loop.learning_rate_schedule(10**7, 512, 0.01, 70000, 10))


@pytest.mark.parametrize('extra,message', [
    (['--arch=edm2', '--precond=vp'], '--arch=edm2 has its own (EDM) preconditioning'),
    (['--arch=edm2', '--loss=edm'], 'trains its uncertainty head with --loss=edm2'),
    (['--arch=edm2', '--uncertainty=0'], 'trains its uncertainty head with --loss=edm2'),
    (['--arch=edm2', '--augment=0.1'], 'trains without augmentation'),
    (['--arch=edm2', '--conv-groups=2'], 'not of --arch=edm2'),
    (['--loss=edm2', '--precond=vp'], 'use --uncertainty=1 for vp/ve'),
    (['--loss=edm2', '--uncertainty=0'], 'uncertainty-weighted'),
    (['--loss=vp'], '--loss=vp trains --precond=vp networks'),
    (['--decay=100'], '--decay applies to --lr-schedule=isqrt only'),
    (['--ema=0.1', '--ema-stds=0.05'], 'are alternatives'),
    (['--ema-stds=0.05,0.3'], 'must lie in (0, 0.2887)'),
    (['--ema-stds=0.05,...,0.1'], "needs two numbers before it"),
    (['--preset=edm2-digits', '--arch=adm'], '--preset=edm2-digits is for --arch=edm2'),
    (['--preset=nope'], "'nope' is not one of"),
])
def test_edm2_option_errors_are_one_line(tiny_zip, tmp_path, extra, message):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', tiny_zip, '-n'] + extra)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert 'Traceback' not in result.output and not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------- training (fast, tiny)

@pytest.mark.parametrize('args', [
    ['--arch=edm2', '--cbase=8', '--cres=1,2', '--blocks=1'],
    ['--arch=ddpmpp', '--precond=vp', '--uncertainty=1', '--cbase=16', '--cres=1,1'],
    ['--arch=ncsnpp', '--precond=ve', '--uncertainty=1', '--cbase=16', '--cres=1,1'],
    ['--arch=adm', '--loss=edm2', '--cbase=16', '--cres=1,1', '--augment=0.5'],
])
def test_every_parameter_gets_a_gradient(tiny_zip, tmp_path, args):
    """What DDP needs with several ranks: no parameter without a gradient (the uncertainty head included)."""
    c = build(tiny_zip, tmp_path, '--cond=1', '--batch=4', *args)
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=8, img_channels=3, label_dim=4)
    loss_fn = dnnlib.util.construct_class_by_name(**c.loss_kwargs)
    pipe = dnnlib.util.construct_class_by_name(**c.augment_kwargs) if 'augment_kwargs' in c else None
    images = torch.rand([4, 3, 8, 8]) * 2 - 1
    labels = torch.eye(4)[[0, 1, 2, 3]]
    loss_fn(net=net.train(), images=images, labels=labels, augment_pipe=pipe).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert any(n.startswith('logvar_linear') for n, _ in net.named_parameters())


def _run(tiny_zip, run_dir, total_images, *args):
    c = build(tiny_zip, run_dir, '--preset=edm2-digits', '--cond=1', '--cbase=8', '--cres=1,2', '--batch=8',
              '--workers=0', '--seed=3', '--decay=2', '--lr-rampup=0.016', *args)
    c.update(run_dir=str(run_dir), total_kimg=total_images / 1000, kimg_per_tick=0.016, snapshot_ticks=1,
             state_dump_ticks=1, print_summary=False)
    return training_loop.training_loop(**c, device=torch.device('cpu'))


def test_edm2_run_with_two_ema_profiles_resumes_bit_exactly(tiny_zip, tmp_path):
    from torch_utils import persistence
    _run(tiny_zip, tmp_path / 'straight', 48)  # 6 steps of 8 images
    _run(tiny_zip, tmp_path / 'first', 32)
    _run(tiny_zip, tmp_path / 'resumed', 48, f'--resume={tmp_path / "first"}')  # train.py picks the latest state

    def state(run):
        return torch.load(run / 'training-state-000000.pt', weights_only=True)
    straight, resumed = state(tmp_path / 'straight'), state(tmp_path / 'resumed')
    assert straight['cur_nimg'] == resumed['cur_nimg'] == 48 and state(tmp_path / 'first')['cur_nimg'] == 32
    assert straight['ema']['stds'] == resumed['ema']['stds'] == [0.05, 0.1]
    for key, value in straight['net'].items():
        assert torch.equal(resumed['net'][key], value), key
    for a, b in zip(straight['ema']['emas'], resumed['ema']['emas']):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a, b) for a, b in zip(straight['ema']['emas'][0].values(),
                                                      straight['ema']['emas'][1].values()))  # two different profiles
    assert straight['optimizer_state']['param_groups'][0]['betas'] == (0.9, 0.99)
    # The snapshots of both profiles, EDM2's names, and the exact images seen recorded in them.
    for std in ('0.050', '0.100'):
        a = persistence.load_network_pkl(str(tmp_path / 'straight' / f'network-snapshot-0000000-{std}.pkl'))
        b = persistence.load_network_pkl(str(tmp_path / 'resumed' / f'network-snapshot-0000000-{std}.pkl'))
        assert a['cur_nimg'] == b['cur_nimg'] == 48 and a['augment_pipe'] is None
        assert all(torch.equal(x, y) for x, y in zip(a['ema'].state_dict().values(), b['ema'].state_dict().values()))


def test_edm2_gradients_zero_infinities(tiny_zip, tmp_path):
    grads = [torch.tensor([float('nan'), float('inf'), -float('inf'), 2.0])]
    params = [torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = grads[0].clone()
    training_loop.sanitize_gradients(params, posinf=training_loop.NONFINITE_GRAD_VALUES['zero'])
    assert params[0].grad.tolist() == [0, 0, 0, 2]
    params[0].grad = grads[0].clone()
    training_loop.sanitize_gradients(params, posinf=training_loop.NONFINITE_GRAD_VALUES['clamp'])
    assert params[0].grad.tolist() == [0, 1e5, -1e5, 2]
    with pytest.raises(ValueError, match='nonfinite_grads'):
        training_loop.training_loop(run_dir=None, optimizer_kwargs=dict(lr=1), nonfinite_grads='ignore')


# ---------------------------------------------------------------------------- two ranks (slow)

@pytest.mark.slow
@pytest.mark.parametrize('args', [['--arch=edm2', '--cbase=8', '--cres=1,2'],
                                  ['--arch=ncsnpp', '--precond=vp', '--uncertainty=1', '--cbase=16', '--cres=1']])
def test_two_ranks_train_networks_with_the_uncertainty_head(tiny_zip, tmp_path, repo_root, args):
    """Every parameter gets a gradient (DDP), and the random buffers (Fourier features) agree across ranks."""
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           f'--outdir={tmp_path}', f'--data={tiny_zip}', '--cond=1', '--batch=64', '--duration=0.001',
           '--tick=1', '--workers=0', '--seed=1'] + args
    result = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    state = torch.load(next(run.glob('training-state-*.pt')), weights_only=True)
    assert state['cur_nimg'] == 1024 and state['rank_digests'][0] == state['rank_digests'][1]  # 16 steps of 64
