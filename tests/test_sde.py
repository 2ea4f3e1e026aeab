"""training/sde.py: score_sde's predictor-corrector and Euler-Maruyama samplers (the pc_sampler_*.pt goldens),
the denoiser -> score mapping on the exactly solvable Gaussian problem, and the registry sampler `pc`."""

from __future__ import annotations

import pytest
import torch

from helpers import GaussianDenoiser, rel_err
from training import sampling, sde as sde_lib

# ----------------------------------------------------------------------------
# Goldens: score_sde's get_pc_sampler with the formula score and a recorded noise list (float64 primary keys).

GOLDEN_PC = ['pc_sampler_ve', 'pc_sampler_ve_em', 'pc_sampler_vp']
PREDICTOR = {'ReverseDiffusionPredictor': 'reverse_diffusion', 'EulerMaruyamaPredictor': 'euler_maruyama'}
CORRECTOR = {'LangevinCorrector': 'langevin', None: 'none'}


def formula_score(sde):
    """The golden README's score_formula: -x/(sigma^2 + 0.25) + 0.05 sin(x)/(sigma + 1), sigma the marginal std."""
    def score_fn(x, t):
        sigma = sde.marginal_std(t)
        return -x / (sigma ** 2 + 0.25) + 0.05 * torch.sin(x) / (sigma + 1)
    return score_fn


def test_all_pc_goldens_are_covered(golden_dir):
    assert sorted(p.stem for p in golden_dir.glob('pc_sampler_*.pt')) == sorted(GOLDEN_PC)


@pytest.mark.parametrize('name', GOLDEN_PC)
def test_pc_sampler_golden(golden_dir, name):
    ref = torch.load(golden_dir / f'{name}.pt', weights_only=True)
    assert not ref['probability_flow'] and ref['denoise']
    sde = (sde_lib.VESDE if ref['sde'] == 'VESDE' else sde_lib.VPSDE)(**ref['sde_kwargs'])
    N, eps = sde.N, ref['eps']
    tol = dict(rtol=1e-10, atol=0)
    torch.testing.assert_close(sde_lib.time_steps(N, eps), ref['t_steps'], **tol)
    torch.testing.assert_close(sde.marginal_std(ref['t_steps']), ref['sigma_steps'], **tol)
    if ref['sde'] == 'VESDE':
        torch.testing.assert_close(sde.discrete_sigmas, ref['discrete_sigmas'], **tol)
    else:
        torch.testing.assert_close(sde.discrete_betas, ref['discrete_betas'], **tol)
        torch.testing.assert_close(sde.alphas, ref['alphas'], **tol)
    torch.testing.assert_close(sde.prior(ref['z_prior']), ref['x_init'], **tol)
    # The discrete index of step i is floor(t_i (N - 1)) in the reference; we use N - 1 - i.
    assert (ref['t_steps'] * (N - 1)).floor().long().tolist() == list(range(N - 1, -1, -1))

    noises = iter(ref['noises'])
    score = formula_score(sde)
    calls = []

    def counted_score(x, t):
        calls.append(float(t))
        return score(x, t)

    xs, x_means = [], []
    for _i, x, x_mean in sde_lib.pc_trajectory(
            sde, counted_score, ref['z_prior'], randn_like=lambda x: next(noises), predictor=PREDICTOR[ref['predictor']],
            corrector=CORRECTOR[ref['corrector']], snr=ref['snr'], n_steps=ref['n_steps'], eps=eps):
        xs.append(x)
        x_means.append(x_mean)
    assert next(noises, None) is None  # every recorded draw used, in order
    xs, x_means = torch.stack(xs), torch.stack(x_means)
    # Whole-tensor relative error (golden README: <= 1e-10 for a float64 implementation).
    assert rel_err(xs, ref['x_steps']) <= 1e-10
    assert rel_err(x_means, ref['x_mean_steps']) <= 1e-10
    assert rel_err(x_means[-1], ref['sample']) <= 1e-10
    # The reference reports N (n_steps + 1) evaluations whether or not a corrector runs; EM alone makes N.
    assert len(calls) == (ref['nfe'] if ref['corrector'] else N)
    # pc_sample's output is the last predictor's mean; the float32-table reference is within its measured 5.7e-7.
    noises = iter(ref['noises'])
    out = sde_lib.pc_sample(sde, score, ref['z_prior'], randn_like=lambda x: next(noises),
                            predictor=PREDICTOR[ref['predictor']], corrector=CORRECTOR[ref['corrector']],
                            snr=ref['snr'], n_steps=ref['n_steps'], eps=eps)
    assert torch.equal(out, x_means[-1])
    assert rel_err(out, ref['as_published']['sample']) <= 1e-6


def test_vp_first_step_with_n_20_is_2x_plus_score():
    """beta_19 = beta_max/N = 1 makes alpha_19 = 0: the Langevin step is 0 and reverse diffusion gives 2x + s."""
    sde = sde_lib.VPSDE(0.1, 20, 20)
    assert sde.alphas[-1] == 0 and sde.langevin_alpha(19) == 0
    x, s = torch.randn([2, 1, 3, 3], dtype=torch.float64), torch.randn([2, 1, 3, 3], dtype=torch.float64)
    _, x_mean = sde_lib.reverse_diffusion_step(sde, x, 19, s, torch.zeros_like(x))
    torch.testing.assert_close(x_mean, 2 * x + s, rtol=1e-15, atol=1e-15)
    assert float(sde_lib.langevin_step_size(s, x, 0.16, sde.langevin_alpha(19))) == 0
    with pytest.raises(ValueError, match='beta_max/N'):
        sde_lib.VPSDE(0.1, 20, 18).discretize(x, 17)

# ----------------------------------------------------------------------------
# The denoiser -> score mapping, exact on Gaussian data N(mu, std^2): the VE marginal is N(mu, std^2 + sigma^2),
# the VP marginal N(s mu, s^2 std^2 + 1 - s^2).


@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_denoiser_score_is_the_marginal_score(kind):
    g = torch.Generator().manual_seed(1)
    mu, std = 0.3 * torch.randn([1, 1, 4, 4], generator=g, dtype=torch.float64), 0.5
    x = torch.randn([3, 1, 4, 4], generator=g, dtype=torch.float64)
    net = GaussianDenoiser(mu, std, img_channels=1)
    sde = sde_lib.network_sde(kind, 10, 0.02, 80.0, 1e-3)
    score_fn = sde_lib.denoiser_score(lambda x, sigma: net(x, sigma), sde)
    for t in (1e-3, 0.3, 1.0):
        t = torch.tensor(t, dtype=torch.float64)
        if kind == 've':
            expected = -(x - mu) / (std ** 2 + sde.marginal_std(t) ** 2)
        else:
            s = sde.log_mean_coeff(t).exp()
            expected = -(x - s * mu) / (s ** 2 * std ** 2 + 1 - s ** 2)
        torch.testing.assert_close(score_fn(x, t), expected, rtol=1e-12, atol=1e-12)
    if kind == 'vp':  # fitted to the range: EDM sigma(eps) = sigma_min, sigma(1) = sigma_max
        torch.testing.assert_close(sde.edm_sigma(torch.tensor([1e-3, 1.0])), torch.tensor([0.02, 80.0], dtype=torch.float64))


@pytest.mark.parametrize('kwargs', [dict(sde='ve'), dict(sde='vp', num_steps=200),
                                    dict(sde='ve', predictor='euler_maruyama', corrector='none')])
def test_pc_sampler_draws_the_gaussian_data(kwargs):
    """On N(mu, std^2) data the sampler's output has per-pixel mean mu and std ~ std. (The per-sample Langevin
    step needs images of realistic size: with 16 pixels the norm ratio's spread inflates the std by ~13%.)"""
    g = torch.Generator().manual_seed(2)
    n, mu, std = 256, 0.5 * torch.randn([1, 1, 16, 16], generator=g, dtype=torch.float64), 0.5
    z = torch.randn([n, 1, 16, 16], generator=g, dtype=torch.float64)
    kwargs = dict(dict(num_steps=100), **kwargs)
    out = sampling.SAMPLERS['pc'](GaussianDenoiser(mu, std, img_channels=1, img_resolution=16), z,
                                  randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype), **kwargs)
    assert out.dtype == torch.float64
    assert float((out.mean(0, keepdim=True) - mu).abs().mean()) < 1.5 * std / n ** 0.5  # E|N(0, std^2/n)| = 0.8 std/sqrt(n)
    assert abs(float(out.std(0).mean()) / std - 1) < 0.04

# ----------------------------------------------------------------------------
# Registry conventions: options, NFE, the network's noise range, per-seed images whatever the batch.


def test_registry_options_and_nfe():
    assert sampling.sampler_options_of('pc') == ('num_steps', 'sigma_min', 'sigma_max', 'sde', 'predictor',
                                                 'corrector', 'snr', 'corrector_steps', 'epsilon_s')
    assert sampling.count_nfe('pc', 7) == 14
    assert sampling.count_nfe('pc', 7, corrector_steps=3) == 28
    assert sampling.count_nfe('pc', 7, predictor='euler_maruyama', corrector='none') == 7
    assert sampling.steps_for_nfe('pc', 15) == 7
    with pytest.raises(ValueError, match='beta_max/N'):
        sampling.count_nfe('pc', 10, sde='vp')
    for bad in (dict(sde='subvp'), dict(predictor='ald'), dict(corrector='ald'), dict(snr=-1), dict(corrector_steps=1.5)):
        with pytest.raises(ValueError):
            sampling.count_nfe('pc', 3, **bad)


def test_pc_sampler_uses_the_network_noise_range():
    mu = torch.zeros([1, 1, 4, 4], dtype=torch.float64)
    net = GaussianDenoiser(mu, 0.5, sigma_min=0.05, sigma_max=10.0, img_channels=1)
    sampling.SAMPLERS['pc'](net, torch.randn([2, 1, 4, 4]), num_steps=5)
    assert net.sigmas[0] == pytest.approx(10.0) and min(net.sigmas) >= 0.05
    net = GaussianDenoiser(mu, 0.5, img_channels=1)
    sampling.SAMPLERS['pc'](net, torch.randn([2, 1, 4, 4]), num_steps=20, sde='vp', epsilon_s=1e-3)
    lo, hi = sampling.default_sigma_range('vp', 1e-3)
    assert net.sigmas[0] == pytest.approx(hi) and net.sigmas[-1] == pytest.approx(lo)


def test_pc_sampler_images_do_not_depend_on_the_batch():
    mu = 0.2 * torch.ones([1, 1, 4, 4], dtype=torch.float64)
    net = GaussianDenoiser(mu, 0.5, img_channels=1)
    seeds = [3, 4, 5]
    together = torch.cat([images for _s, images in sampling.generate_images(net, seeds, max_batch_size=3,
                                                                            sampler='pc', num_steps=6)])
    alone = torch.cat([images for _s, images in sampling.generate_images(net, seeds, max_batch_size=1,
                                                                         sampler='pc', num_steps=6)])
    assert torch.equal(together, alone)
