"""EDM2's small-scale ladder (training/networks_edm2small.py: configs C, E, G of FutureXiang/edm2) against
../shared/golden/edm2small_*: the networks in eval and train mode, the loss and its gradients, the
learning-rate schedules and the seed's configs."""

import io
import json
import pickle
from unittest import mock

import numpy as np
import pytest
import torch

from helpers import rel_err
from torch_utils import persistence
from training import networks_edm2small as S

pytestmark = pytest.mark.usefixtures('one_thread')

CONFIGS = ['C', 'E', 'G']


@pytest.fixture(scope='module')
def golden(golden_dir):
    cache = {}
    def get(name):
        if name not in cache:
            cache[name] = torch.load(golden_dir / name, weights_only=False)
        return cache[name]
    return get


def golden_edm(g):
    """The EDM wrapper built from a net file's seed arguments, its state_dict loaded strictly."""
    kwargs = dict(g['kwargs'])
    channels, height, width = kwargs.pop('image_shape')
    net = S.EDM(img_resolution=height, img_channels=channels, net_type=g['net_class'], **kwargs, **g['edm_kwargs'])
    net.load_state_dict(g['state_dict'], strict=True)
    return net


#----------------------------------------------------------------------------
# Networks.

@pytest.mark.parametrize('config', CONFIGS)
def test_golden_network_eval_and_train(golden, config):
    g = golden(f'edm2small_net_{config}.pt')
    net = golden_edm(g).eval()
    count = lambda m: sum(t.numel() for t in [*m.parameters(), *m.buffers()])  # the seed's Fourier parameters
    assert count(net.nn_model) == g['param_count']
    assert count(net.reweight_mlp) == g['reweight_param_count']
    with torch.no_grad():
        assert rel_err(net.D_x(g['x'], g['sigma']), g['output']) <= 3e-6
        assert rel_err(net.logvar(g['sigma']), g['logvar']) <= 3e-6
        assert rel_err(net.nn_model(g['unet_in'], g['c_noise']), g['unet_out']) <= 3e-6
        _, acts = net.D_x(g['x'], g['sigma'], use_amp=False, ret_activation=True)
        assert list(acts) == list(g['activations'])
        for name, ref in g['activations'].items():
            assert rel_err(acts[name], ref) <= 3e-6, name
        # The project's denoiser interface gives the same D and u.
        D, u = net(g['x'], g['sigma'].flatten(), None, return_logvar=True)
        assert rel_err(D, g['output']) <= 3e-6 and rel_err(u, g['logvar']) <= 3e-6

        before = {k: v.clone() for k, v in net.state_dict().items()}
        net.train()
        assert rel_err(net.D_x(g['x'], g['sigma']), g['output_train']) <= 3e-6
        assert rel_err(net.logvar(g['sigma']), g['logvar_train']) <= 3e-6
    after = net.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == sorted(g['changed_by_train_forward'])
    if g['state_dict_after_train_forward'] is not None:
        for k, ref in g['state_dict_after_train_forward'].items():
            assert rel_err(after[k], ref) <= 1e-6, k


def test_train_mode_renormalisation_is_visible(golden):
    """E's output in train mode differs from eval mode by the in-place renormalisation (1-2e-5), which the
    3e-6 tolerance resolves; C's does not change at all."""
    g = golden('edm2small_net_E.pt')
    assert rel_err(g['output_train'], g['output']) > 3e-6
    gc = golden('edm2small_net_C.pt')
    net = golden_edm(gc)
    with torch.no_grad():
        assert torch.equal(net.eval().D_x(gc['x'], gc['sigma']), net.train().D_x(gc['x'], gc['sigma']))


def test_mp_weight_layers_normalise_in_place_only_in_training():
    torch.manual_seed(0)
    conv = S.LadderConv2d(4, 3, 3, padding=1, config='E')
    w0 = conv.weight.detach().clone()
    x = torch.randn(2, 4, 5, 5)
    conv.eval()(x)
    assert torch.equal(conv.weight, w0)
    conv.train()(x)
    assert torch.allclose(conv.weight, S.normalize(w0))
    # normalize: unit RMS per output row.
    assert torch.allclose(conv.weight.square().mean(dim=[1, 2, 3]), torch.ones(3), atol=1e-3)


def test_mp_functions_preserve_magnitude():
    torch.manual_seed(0)
    a, b = torch.randn(4, 64, 8, 8), torch.randn(4, 32, 8, 8)
    assert abs(S.mp_sum(a, torch.randn_like(a)).square().mean().item() - 1) < 0.05
    assert abs(S.mp_cat(a, b).square().mean().item() - 1) < 0.05
    assert abs(S.mp_silu(torch.randn(100000)).square().mean().sqrt().item() - 1) < 0.01


def test_denoiser_interface_and_pickle():
    net = S.EDM(img_resolution=8, img_channels=1, net_type='UNetE', n_channels=32, ch_mults=[1, 2],
                is_attn=[False, True], dropout=0, n_blocks=2).eval()
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        D = net(x, sigma)
        assert D.shape == x.shape and net.round_sigma(0.5) == 0.5
        assert net.sigma_min == 0.002 and net.sigma_max == 80 and net.label_dim == 0
        clone = pickle.loads(pickle.dumps(net))
        assert torch.equal(clone(x, sigma), D)
        # The safe loader (persistent classes and torch containers only) rebuilds every config.
        for net_type in S.NET_TYPES:
            net = S.EDM(img_resolution=8, img_channels=1, net_type=net_type, n_channels=32, ch_mults=[1, 2],
                        is_attn=[False, True], dropout=0.1, n_blocks=2).eval()
            buf = io.BytesIO(pickle.dumps(dict(ema=net)))
            loaded = persistence.load_network_pkl(buf)['ema']
            assert type(loaded).__name__ == 'EDM' and torch.equal(loaded(x, sigma), net(x, sigma))
    with pytest.raises(ValueError, match='unconditional'):
        S.EDM(img_resolution=8, img_channels=1, label_dim=10)
    with pytest.raises(ValueError, match='net_type'):
        S.EDM(img_resolution=8, img_channels=1, net_type='UNetX')


#----------------------------------------------------------------------------
# Loss and gradients.

@pytest.mark.parametrize('config', CONFIGS)
def test_golden_loss_and_gradients(golden, config):
    L = golden(f'edm2small_loss_{config}.pt')
    net = golden_edm(golden(L['net'])).train()
    loss_fn = S.EDMSmallLoss(P_mean=L['edm_kwargs']['p_mean'], P_std=L['edm_kwargs']['p_std'],
                             sigma_data=L['edm_kwargs']['sigma_data'])
    # The seed's two draws, in order: randn([N,1,1,1]) for ln(sigma), then randn_like for the noise.
    with mock.patch('torch.randn', lambda *a, **k: L['rnd_normal'].clone()), \
         mock.patch('torch.randn_like', lambda *a, **k: L['noise'].clone()):
        elements = loss_fn(net=net, images=2 * L['images'] - 1, labels=None, augment_pipe=None)
    loss = elements.mean()
    assert rel_err(elements, L['loss_elements']) <= 3e-6
    assert abs(loss.item() - L['loss'].item()) <= 1e-6 * abs(L['loss'].item())
    loss.backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    assert sorted(grads) == sorted(L['grads'])
    # The seed's parameters without gradient (the Fourier tensors) are buffers here, under the same names.
    assert sorted(k for k, _ in net.named_buffers()) == sorted(L['no_grad_params'])
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(L['grads'])])
    assert rel_err(flat(grads), flat(L['grads'])) <= 1e-5
    for k, ref in L['grads'].items():
        if ref.norm() > 0:
            assert rel_err(grads[k], ref) <= 1e-4, k


def test_loss_refuses_augmentation():
    net = S.EDM(img_resolution=8, img_channels=1, n_channels=32, ch_mults=[1], is_attn=[False], n_blocks=2)
    with pytest.raises(ValueError, match='augmentation'):
        S.EDMSmallLoss()(net=net, images=torch.zeros(1, 1, 8, 8), augment_pipe=object())


#----------------------------------------------------------------------------
# Learning-rate schedules.

def test_golden_schedules(golden):
    sched = golden('edm2small_schedule_E.pt')['schedules']
    for key, s in sched.items():
        dataset_size = 100000 if key.startswith('tinyimagenet') else 50000
        for (ep, step), ref in zip(s['points'], s['lr']):
            assert abs(S.seed_epoch_lr(ep, s['lrate'], s['warm_epoch'], s['tref_epoch']) - ref) <= 1e-12 * ref, key
            # The loop's convention: images seen before the step -> the epoch's lr.
            cur_nimg = ep * dataset_size + step * s['batch_size']
            lr = S.epoch_lr_schedule(cur_nimg=cur_nimg, batch_size=s['batch_size'], ref_lr=s['lrate'],
                                     epoch_kimg=dataset_size / 1000, warm_epoch=s['warm_epoch'],
                                     tref_epoch=s['tref_epoch'])
            assert abs(lr - ref) <= 1e-12 * ref, (key, ep, step)


#----------------------------------------------------------------------------
# The seed's configs and recipes.

def test_golden_configs_build(golden_dir):
    configs = json.loads((golden_dir / 'edm2small_configs.json').read_text())['configs']
    for key, cfg in configs.items():
        with torch.device('meta'):
            net = S.edm_from_config(cfg)
        assert type(net.nn_model).__name__ == cfg['net_type'], key
        assert net.img_resolution == cfg['network']['image_shape'][1]
        assert net.sigma_max == cfg['diffusion']['sigma_max'] and net.rho == cfg['diffusion']['rho']
        if key in S.LADDER_RECIPES:  # the recipes hold the seed's values
            r = S.LADDER_RECIPES[key]
            assert r['network']['net_type'] == cfg['net_type']
            for name in ('n_channels', 'ch_mults', 'is_attn', 'dropout', 'n_blocks'):
                assert r['network'][name] == cfg['network'][name], (key, name)
            for name in ('n_epoch', 'batch_size', 'lrate', 'warm_epoch', 'ema'):
                assert r['train'][name] == cfg[name], (key, name)
            assert r['train']['tref_epoch'] == cfg.get('tref_epoch'), key
            assert r['train']['xflip'] == cfg['flip']
            assert r['linear'] == cfg['linear'], key


def test_full_cifar_sizes_match_the_seed():
    """The seed's own parameter counts of its CIFAR-10 U-Nets (unet{C,G}.py): 39.509888M and 39.542685M."""
    with torch.device('meta'):
        for net_type, count in [('UNetC', 39509888), ('UNetE', 39509888), ('UNetG', 39542685)]:
            net = S.NET_TYPES[net_type](image_shape=[3, 32, 32])
            assert sum(p.numel() for p in net.parameters() if p.requires_grad) == count


def test_recipe_training_kwargs():
    kw = S.recipe_training_kwargs('cifar10/E')
    assert kw['network_kwargs']['class_name'] == 'training.networks_edm2small.EDM'
    assert kw['total_kimg'] == 2000 * 50
    schedule = lambda lr_kwargs: {k: v for k, v in lr_kwargs.items() if k != 'func_name'}
    lr = lambda nimg: S.epoch_lr_schedule(cur_nimg=nimg, batch_size=512, **schedule(kw['lr_kwargs']))
    assert lr(0) == pytest.approx(2e-2 / 200) and lr(800 * 50000) == pytest.approx(2e-2 / np.sqrt(2))
    c = S.recipe_training_kwargs('digits/C')['lr_kwargs']
    assert S.epoch_lr_schedule(cur_nimg=21 * 1797, batch_size=64, **schedule(c)) == 4e-4
    # Presets: train.py option values that rebuild the recipe's network.
    p = S.LADDER_PRESETS['edm2small-e-cifar10']
    assert p['arch'] == 'edm2small-e' and p['duration'] == 100 and not p['cond']
    assert p['lr_rampup'] == 10000 and p['decay'] == 400 * 50000 / 512  # 200 and 400 epochs of 50k images
    assert 'decay' not in S.LADDER_PRESETS['edm2small-c-digits']     # C: no decay
    o = S.LADDER_PRESETS['edm2small-g-digits']
    kw = S.ladder_network_kwargs('UNetG', cbase=o['cbase'], cres=o['cres'], blocks=o['blocks'], dropout=o['dropout'])
    assert {k: kw[k] for k in S.LADDER_RECIPES['digits/G']['network']} == S.LADDER_RECIPES['digits/G']['network']
    assert not o['xflip'] and o['duration'] == pytest.approx(0.0395, abs=1e-3)


@pytest.mark.parametrize('key', list(S.LADDER_RECIPES))
def test_presets_schedule_is_the_recipes_epoch_schedule(key):
    """ladder_lr_schedule (train.py's units: --lr-rampup kimg, --decay batches) on a preset's options is the seed's
    per-epoch schedule of its recipe, exactly, at every epoch boundary and within epochs."""
    t = S.LADDER_RECIPES[key]['train']
    o = S.recipe_options(key)
    epoch = t['dataset_size']
    for ep in [0, 1, 2, 3, 4, 5, 199, 200, 201, 399, 400, 401, 799, 800, 1999]:
        for nimg in (ep * epoch, ep * epoch + epoch // 2):
            ours = S.ladder_lr_schedule(nimg, o['batch'], ref_lr=o['lr'], epoch_kimg=epoch / 1000,
                                        rampup_kimg=o['lr_rampup'], ref_batches=o.get('decay'))
            seed = S.seed_epoch_lr(ep, t['lrate'], t['warm_epoch'], t['tref_epoch'])
            assert ours == seed, (key, ep, nimg)


#----------------------------------------------------------------------------
# train.py --arch=edm2small-{c,e,g} (the records in training/presets.py ARCHITECTURES).

TINY = ['--cbase=32', '--cres=1,1', '--blocks=2', '--batch=64', '--duration=0.001', '--tick=1', '--snap=1', '--dump=1',
        '--workers=0', '--seed=0']


@pytest.mark.parametrize('config', CONFIGS)
def test_train_py_trains_each_config_one_tick(tiny_zip, tmp_path, config):
    """train.py --arch=edm2small-<c|e|g>: its network, loss, per-epoch schedule (the epoch from the dataset) and
    per-step EMA, one tick of training, and a snapshot the safe loader rebuilds and the probe reads."""
    import train
    from click.testing import CliRunner
    from training import probe
    arch = f'edm2small-{config.lower()}'
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', tiny_zip, f'--arch={arch}', *TINY])
    assert result.exit_code == 0, result.output
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert run.name.endswith(f'-tiny-uncond-{arch}-edm-gpus1-batch64-fp32')
    opts = json.loads((run / 'training_options.json').read_text())
    assert opts['network_kwargs']['class_name'] == 'training.networks_edm2small.EDM'
    assert opts['network_kwargs']['net_type'] == f'UNet{config}' and opts['network_kwargs']['is_attn'] == [False, True]
    assert opts['loss_kwargs'] == dict(class_name='training.networks_edm2small.EDMSmallLoss', P_mean=-1.2, P_std=1.2)
    recipe = S.recipe_options(f'cifar10/{config}')  # the defaults: the seed's CIFAR-10 recipe of the config
    assert opts['lr_kwargs'] == dict(func_name='training.networks_edm2small.ladder_lr_schedule', ref_lr=recipe['lr'],
                                     rampup_kimg=10000.0, epoch_kimg=0.064,  # 64 images, before the x-flips
                                     **({'ref_batches': recipe['decay']} if 'decay' in recipe else {}))
    assert opts['ema_kwargs'] == dict(class_name='training.ema.WarmupEMA', beta=0.9993)
    assert opts['dataset_kwargs']['xflip'] is True and 'augment_kwargs' not in opts
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert np.isfinite(stats[-1]['Loss/loss']['mean'])
    net = persistence.load_network(str(run / 'network-snapshot-000001.pkl'))
    assert type(net).__name__ == 'EDM' and net.net_type == f'UNet{config}'
    if config != 'C':  # forced weight normalisation held during training: unit-RMS rows
        w = net.nn_model.up[0].res.conv1.weight
        assert torch.allclose(w.square().mean(dim=[1, 2, 3]), torch.ones(w.shape[0]), atol=1e-2)
    feats = probe.extract_features(net, torch.rand(2, 3, 8, 8) * 2 - 1, [4])
    assert list(feats[4]) == ['out_1', 'out_2', 'out_3', 'out_4', 'out_5']


def test_train_py_ladder_preset_and_options(tiny_zip, tmp_path):
    """--preset=edm2small-g-digits fills in the recipe; options given override it; --ema selects the paper's EMA."""
    import train
    ctx = train.main.make_context('train', ['--outdir', str(tmp_path), '--data', tiny_zip, '--preset=edm2small-g-digits',
                                            '--cbase=16', '--sigma_data=0.6', '--ema=0.05'])
    opts = train.dnnlib.EasyDict(ctx.params)
    opts._given = train._given_on_command_line(ctx)
    c, _ = train.build_training_options(opts, world=1)
    assert c.network_kwargs.n_channels == 16 and c.network_kwargs.ch_mults == [1, 2, 2] and c.network_kwargs.n_blocks == 2
    assert c.network_kwargs.sigma_data == c.loss_kwargs.sigma_data == 0.6
    assert c.batch_size == 64 and c.dataset_kwargs.xflip is False and c.total_kimg == 39
    assert c.lr_kwargs.rampup_kimg == 3.594 and c.lr_kwargs.ref_batches == 112.3125 and c.lr_kwargs.ref_lr == 5e-3
    assert 'ema_kwargs' not in c and c.ema_halflife_kimg == 50


@pytest.mark.parametrize('extra,message', [
    (['--arch=edm2small-c', '--cond=1'], 'the C/E/G networks are unconditional'),
    (['--arch=edm2small-e', '--augment=0.1'], 'trains without augmentation'),
    (['--arch=edm2small-g', '--precond=vp'], 'has its own (EDM) preconditioning'),
    (['--arch=edm2small-g', '--loss=edm2'], 'with its own loss (EDMSmallLoss)'),
    (['--arch=edm2small-g', '--uncertainty=0'], 'with its own loss (EDMSmallLoss)'),
    (['--arch=edm2small-e', '--lr-schedule=isqrt'], 'drop --lr-schedule'),
    (['--arch=edm2small-c', '--fp16=1'], 'float32 only'),
    (['--arch=edm2small-c', '--conv-groups=2'], 'not of --arch=edm2small-c'),
    (['--arch=edm2small-c', '--attn=4'], 'drop --attn'),
    (['--preset=edm2small-c-digits', '--arch=adm'], '--preset=edm2small-c-digits is for --arch=edm2small-c'),
])
def test_train_py_refusals_are_one_line_usage_errors(tiny_zip, tmp_path, extra, message):
    import train
    from click.testing import CliRunner
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', tiny_zip, '-n'] + extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and message in errors[0], result.output
    assert 'Traceback' not in result.output and not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_two_ranks_train_config_g(tiny_zip, tmp_path, repo_root):
    """train.py --arch=edm2small-g on two gloo ranks: every parameter (u(sigma)'s head included) gets a gradient,
    the random Fourier buffers agree, and the ranks end with identical weights."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           f'--outdir={tmp_path}', f'--data={tiny_zip}', '--arch=edm2small-g', '--cbase=16', '--cres=1,1', '--blocks=2',
           '--batch=32', '--duration=0.001', '--tick=1', '--workers=0', '--seed=1']
    result = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    state = torch.load(next(run.glob('training-state-*.pt')), weights_only=True)
    assert state['cur_nimg'] == 1024 and state['rank_digests'][0] == state['rank_digests'][1]


def test_ema_half_life_of_the_seeds_beta():
    assert S.ema_halflife_kimg(0.9993, 512) == pytest.approx(506.8, abs=0.1)


def test_embedded_source_runs_with_the_papers_modules(golden_dir):
    """The snapshot-compatibility rule (docs/design.md): this module's embedded source imports only what the
    paper's modules have, and executes under the paper's loader (tests/test_persistence_paper.py's check)."""
    from test_persistence_paper import test_embedded_source_imports_only_names_the_paper_has as check
    paper_names = json.loads((golden_dir / 'paper_module_names.json').read_text())['modules']
    check('training.networks_edm2small', paper_names)


def test_project_samplers_run_on_the_ladder():
    """The denoiser interface is what the samplers use: Heun's sampler (float64 state) and a k-diffusion
    sampler run on a C/E/G network and return finite images of the latents' shape."""
    from training import sampling
    torch.manual_seed(0)
    net = S.EDM(img_resolution=8, img_channels=1, net_type='UNetG', n_channels=32, ch_mults=[1, 2],
                is_attn=[False, True], n_blocks=2, dropout=0).eval()
    latents = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for name in ('edm', 'dpmpp_2m'):
            out = sampling.SAMPLERS[name](net, latents, num_steps=3)
            assert out.shape == latents.shape and torch.isfinite(out).all(), name
