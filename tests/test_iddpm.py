"""training/iddpm.py against ../shared/golden/iddpm_*.pt (openai/improved-diffusion, float64 policy of the
golden README: our float64 implementation vs the primary keys within 1e-10 relative, whole tensors)."""

import math

import numpy as np
import pytest
import torch

from helpers import jitter_params, rel_err as rel
from training import iddpm

TOL = 1e-10


def load(golden_dir, filename):
    return torch.load(golden_dir / filename, weights_only=False)


def formula_model(T0):
    """The golden README's closed-form 'network' (eps and v channels) of the original timestep t."""
    def model(x, t):
        t = t.to(torch.float64).reshape(-1, 1, 1, 1)
        return torch.cat([0.7 * torch.tanh(x) + 0.1 * torch.cos(math.pi * t / T0), 0.5 * torch.sin(x) - 0.2 + 0.2 * t / T0], dim=1)
    return model


def replay(noises):
    """randn_like serving the recorded draws in call order."""
    it = iter(noises)
    return lambda like: next(it).to(like)

#----------------------------------------------------------------------------

def test_beta_schedules(golden_dir):
    g = load(golden_dir, 'iddpm_schedule.pt')
    for name, T in (('cosine', 1000), ('linear', 1000), ('linear', 4000)):
        assert rel(iddpm.named_beta_schedule(name, T), g[f'betas_{name}_{T}']) <= TOL
    assert rel(iddpm.make_diffusion('cosine', 1000).alphas_cumprod, g['alphas_cumprod_cosine_1000']) <= TOL
    assert iddpm.named_beta_schedule('cosine', 1000).max() == 0.999  # the clip is active at t = T-1


@pytest.mark.parametrize('key', ['ddim50', '10_15', '25', 'str_10_15', 'ddim25', '3_7_2'])
def test_respacing(golden_dir, key):
    g = load(golden_dir, 'iddpm_schedule.pt')
    steps = iddpm.space_timesteps(1000, g[f'space_{key}_arg'])
    assert steps == list(g[f'space_{key}'])
    for name in ('cosine', 'linear'):
        betas, timestep_map = iddpm.respaced_betas(iddpm.named_beta_schedule(name, 1000), steps)
        assert rel(betas, g[f'respaced_betas_{name}_{key}']) <= TOL
        assert list(timestep_map) == steps


def test_respacing_rejects_impossible_requests():
    with pytest.raises(ValueError, match='strided'):
        iddpm.space_timesteps(1000, 'ddim37')
    with pytest.raises(ValueError, match='section'):
        iddpm.space_timesteps(10, [6, 6])
    with pytest.raises(ValueError, match='T > 20'):
        iddpm.make_diffusion('linear', 20)


@pytest.mark.parametrize('filename', ['iddpm_hybrid_loss_cosine.pt', 'iddpm_hybrid_loss_linear4000.pt'])
def test_hybrid_loss_and_its_gradient(golden_dir, filename):
    g = load(golden_dir, filename)
    d = iddpm.make_diffusion(g['schedule'], g['T'])
    model_output = g['model_output'].detach().clone().requires_grad_(True)
    terms = iddpm.hybrid_loss_terms(d, model_output, g['x_start'], g['t'], g['noise'])
    terms['loss'].sum().backward()
    for key in ('x_t', 'mse', 'vb', 'loss'):
        assert rel(terms[key].detach(), g[key]) <= TOL, key
    assert rel(model_output.grad, g['grad']) <= TOL
    # The stop-gradient: the eps channels get exactly 2 (eps - noise) / (C H W), nothing from vb.
    C = g['x_start'].shape[1]
    expected = 2 * (g['model_output'][:, :C] - g['noise']) / g['noise'][0].numel()
    assert rel(model_output.grad[:, :C], expected) <= 1e-14


def test_p_mean_variance(golden_dir):
    g = load(golden_dir, 'iddpm_p_mean_variance.pt')
    d = iddpm.make_diffusion('cosine', g['T'])
    model_output = formula_model(g['T0'])(g['x'], g['t'])
    assert rel(model_output, g['model_output']) <= 1e-15
    out = iddpm.p_mean_variance(d, model_output, g['x'], g['t'], clip_denoised=g['clip_denoised'])
    for key in ('mean', 'variance', 'log_variance', 'pred_xstart'):
        assert rel(out[key], g[key]) <= TOL, key


@pytest.mark.parametrize('case', ['p_ddim50', 'p_25', 'ddim50_eta0', 'ddim50_eta1'])
def test_respaced_sampling(golden_dir, case):
    g = load(golden_dir, 'iddpm_sample_respaced.pt')
    c = g['cases'][case]
    d = iddpm.make_diffusion('cosine', g['T'], spacing=c['spacing'])
    assert list(d.timestep_map) == list(c['use_timesteps'])
    assert rel(d.betas, c['respaced_betas']) <= TOL
    seen = []
    model = formula_model(g['T0'])
    def model_fn(x, t):
        seen.append(int(t[0]))
        return model(x, t)
    eta = None if c['loop'] == 'p_sample_loop' else c['eta']
    sample = iddpm.sample_loop(model_fn, d, c['x_T'], replay(c['noises']), eta=eta, clip_denoised=g['clip_denoised'])
    assert seen == [int(t) for t in c['model_timesteps']]
    assert rel(sample, c['sample']) <= TOL


def test_calc_bpd_loop(golden_dir):
    g = load(golden_dir, 'iddpm_bpd.pt')
    d = iddpm.Diffusion(g['betas'].numpy())
    assert rel(d.betas, iddpm.named_beta_schedule('cosine', g['T'])) <= TOL
    out = iddpm.calc_bpd_loop(formula_model(g['T0']), d, g['x_start'], replay(g['noises']), clip_denoised=g['clip_denoised'])
    for key in ('total_bpd', 'prior_bpd', 'vb', 'xstart_mse', 'mse'):
        assert rel(out[key], g[key]) <= TOL, key

#----------------------------------------------------------------------------
# Properties the goldens do not cover.

def test_importance_sampler_weights_are_unbiased():
    sampler = iddpm.LossSecondMomentSampler(T=5, history=2)
    assert np.allclose(sampler.probabilities(), 0.2)  # uniform until warmed up
    for _ in range(2):
        sampler.update(torch.arange(5), torch.tensor([1.0, 2, 3, 4, 5]))
    p = sampler.probabilities()
    assert p[4] > p[0] and abs(p.sum() - 1) < 1e-12
    # E_p[w L_t] = mean_t L_t for the weights 1/(T p_t).
    L = np.arange(1.0, 6.0)
    assert abs((p * L / (5 * p)).sum() - L.mean()) < 1e-12
    t, w = sampler.sample(3, 'cpu')
    assert torch.allclose(w, 1 / (5 * torch.from_numpy(p)[t]))

#----------------------------------------------------------------------------
# The loss and the samplers on a tiny iDDPM network.

def tiny_net(**overrides):
    from training import networks_iddpm
    kwargs = dict(img_resolution=8, img_channels=3, M=50, model_type='UNetModel', model_channels=32, num_res_blocks=1,
                  attention_resolutions=[2], channel_mult=[1, 2], num_heads=1)
    kwargs.update(overrides)
    torch.manual_seed(0)
    net = networks_iddpm.iDDPMDiscretePrecond(**kwargs)
    return jitter_params(net, 0.02)  # the zero-initialised output layer would make every output 0


def test_loss_is_the_hybrid_objective_per_element():
    net = tiny_net()
    loss_fn = iddpm.iDDPMLoss(schedule='cosine', T=50)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(1)
    loss = loss_fn(net=net, images=images)
    assert loss.shape == images.shape
    torch.manual_seed(1)
    t = torch.randint(50, [4])
    noise = torch.randn_like(images.double())
    x_t = iddpm.q_sample(loss_fn.diffusion(), images.double(), t, noise)
    ref = iddpm.hybrid_loss_terms(loss_fn.diffusion(), net(x_t.float(), None, timesteps=t), images.double(), t, noise)
    assert rel(loss.mean(dim=[1, 2, 3]), ref['loss'].detach()) <= 1e-6
    loss.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match='M'):
        iddpm.iDDPMLoss(T=1000)(net=net, images=images)


def test_vlb_loss_with_importance_sampling_records_losses(tmp_path):
    import pickle
    net = tiny_net()
    loss_fn = iddpm.iDDPMLoss(schedule='cosine', T=50, loss_type='vlb', importance_sampling=True)
    loss = loss_fn(net=net, images=torch.rand(6, 3, 8, 8) * 2 - 1)
    assert torch.isfinite(loss).all() and loss_fn.sampler.loss_counts.sum() == 6
    clone = pickle.loads(pickle.dumps(loss_fn))
    assert clone._diffusion is None and clone.sampler.loss_counts.sum() == 6
    # In a snapshot, the safe loader rebuilds the loss from its arguments.
    from torch_utils import persistence
    persistence.save_network_pkl(dict(loss_fn=loss_fn), tmp_path / 'loss.pkl')
    rebuilt = persistence.load_network_pkl(str(tmp_path / 'loss.pkl'))['loss_fn']
    assert rebuilt.importance_sampling and rebuilt.sampler.loss_counts.sum() == 0


def test_samplers_raw_and_through_the_denoiser_agree():
    from training import sampling
    net = tiny_net().eval()
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        raw = sampling.SAMPLERS['iddpm_ddim'](net, z, num_steps=5)
        # A guided denoiser is evaluated through D(x; sigma) (EDM's interface); DDIM needs no variances.
        via_d = sampling.SAMPLERS['iddpm_ddim'](sampling.GuidedDenoiser(net, net, 1), z, num_steps=5)
        ancestral = sampling.SAMPLERS['iddpm'](net, z, num_steps=5, randn_like=lambda x: torch.zeros_like(x))
        edm = sampling.edm_sampler(net, z, num_steps=3)
    assert rel(via_d, raw) <= 1e-5
    assert torch.isfinite(ancestral).all() and torch.isfinite(edm).all()
    assert ancestral.abs().max() <= 1 and not torch.allclose(ancestral, raw)
    assert sampling.count_nfe('iddpm', 7) == 7


def test_training_loop_trains_samples_and_scores_an_iddpm_model(tmp_path):
    """One tiny run through training_loop (ADM backbone with augmentation labels, hybrid loss, snapshot), then
    the snapshot samples with the discrete samplers and EDM's, and gets a VLB bits/dim."""
    from helpers import make_dataset_zip
    from torch_utils import persistence
    from training import sampling, training_loop as tl
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    tl.training_loop(
        run_dir=str(tmp_path / 'run'), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='training.networks_iddpm.iDDPMDiscretePrecond', M=40, schedule='linear',
                            model_type='DhariwalUNet', model_channels=16, channel_mult=[1], num_blocks=1,
                            attn_resolutions=[], augment_dim=9),
        loss_kwargs=dict(class_name='training.iddpm.iDDPMLoss', schedule='linear', T=40),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1),
        seed=0, batch_size=8, total_kimg=0.016, ema_halflife_kimg=0.1, lr_rampup_kimg=0, kimg_per_tick=0.016,
        snapshot_ticks=1, state_dump_ticks=None, device=torch.device('cpu'), print_summary=True)
    snap = persistence.load_network_pkl(str(tmp_path / 'run' / 'network-snapshot-000000.pkl'))
    net, loss_fn = snap['ema'], snap['loss_fn']
    assert isinstance(loss_fn, iddpm.iDDPMLoss) and loss_fn.T == net.M == 40
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.eye(net.label_dim)[:2]
    with torch.no_grad():
        for name in ('iddpm', 'iddpm_ddim', 'edm'):
            assert torch.isfinite(sampling.SAMPLERS[name](net, z, labels, num_steps=4)).all(), name
        images = torch.randint(0, 256, [2, 3, 8, 8], dtype=torch.uint8)
        bpd, nfe = iddpm.vlb_bits_per_dim(net, images, labels)
    assert nfe == 40 and bpd.shape == (2,) and (bpd > 0).all()


def test_samplers_run_edms_own_iddpmprecond_raw():
    # EDM's iDDPMPrecond (ADM, cosine, M steps, model sees the step index): raw with its variances, and
    # through D(x; sigma) as any denoiser; DDIM, which needs no variances, agrees between the two.
    from training import networks, sampling
    torch.manual_seed(0)
    net = networks.iDDPMPrecond(img_resolution=8, img_channels=3, label_dim=2, M=100, model_channels=16,
                                channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval()
    with torch.no_grad():
        for p in net.model.out_conv.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        z, labels = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.eye(2)
        raw = sampling.SAMPLERS['iddpm_ddim'](net, z, labels, num_steps=4)
        via_d = sampling.SAMPLERS['iddpm_ddim'](sampling.GuidedDenoiser(net, net, 1), z, labels, num_steps=4)
    assert iddpm.diffusion_of(net).var_type == 'learned_range'
    assert rel(via_d, raw) <= 1e-4
