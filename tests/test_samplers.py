"""Sampler math: the paper's goldens, convergence order on an exactly solvable problem, step schedules,
NFE counts, edge cases, and the per-seed random-number protocol."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import dnnlib
import generate
from helpers import GaussianDenoiser, expected_output, jitter_params, load_golden_net, rel_err
from training import sampling

# ----------------------------------------------------------------------------
# The exactly solvable Gaussian problem (helpers.GaussianDenoiser, conftest's `problem` fixture).


def first_sigma(discretization, num_steps, epsilon_s=1e-3):
    lo, hi = sampling.default_sigma_range(discretization, epsilon_s)
    return float(sampling.ablation_sigma_steps(discretization, num_steps, lo, hi)[0])


def convergence_ratios(mu, std, z, steps, **kwargs):
    """Error ratios err(N)/err(2N) of ablation_sampler on the Gaussian problem."""
    errors = []
    for n in steps:
        disc = kwargs.get('discretization', 'edm')
        eps = kwargs.get('epsilon_s', 1e-3)
        lo, hi = sampling.default_sigma_range(disc, eps)
        lo = kwargs.get('sigma_min', lo)
        sigmas = sampling.ablation_sigma_steps(disc, n, lo, hi, epsilon_s=eps)
        linear = kwargs.get('schedule', 'linear') == 'linear' and kwargs.get('scaling', 'none') == 'none'
        out = sampling.ablation_sampler(GaussianDenoiser(mu, std), z, num_steps=n, **kwargs)
        errors.append(rel_err(out, expected_output(mu, std, z, sigmas, linear)))
    return errors, [a / b for a, b in zip(errors, errors[1:])]


# For vp/ve schedules the last step is not exactly D, so push sigma_min down until its error is negligible.
ABLATION_CONFIGS = [
    dict(discretization='edm', schedule='linear', scaling='none'),
    dict(discretization='vp', schedule='vp', scaling='vp', epsilon_s=1e-5),
    dict(discretization='ve', schedule='ve', scaling='none', sigma_min=1e-4),
    dict(discretization='iddpm', schedule='linear', scaling='none'),
    dict(discretization='edm', schedule='vp', scaling='vp', sigma_min=1e-4),
]


def test_edm_sampler_heun_is_second_order(problem):
    mu, std, z = problem
    errors = []
    for n in (16, 32, 64):
        out = sampling.edm_sampler(GaussianDenoiser(mu, std), z, num_steps=n)
        errors.append(rel_err(out, expected_output(mu, std, z, sampling.edm_sigma_steps(n), True)))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert errors[-1] < 1e-2
    assert all(3.2 < r < 5.5 for r in ratios), (errors, ratios)  # 2nd order: error / 4 per doubling


@pytest.mark.parametrize('cfg', ABLATION_CONFIGS, ids=lambda c: f"{c['discretization']}-{c['schedule']}")
@pytest.mark.parametrize('solver,band', [('heun', (3.2, 5.5)), ('euler', (1.6, 2.5))])
def test_ablation_sampler_convergence_order(problem, cfg, solver, band):
    """Every discretisation/schedule/scaling integrates the same ODE, so each must converge to the same
    closed-form answer, at 2nd order for Heun and 1st order for Euler."""
    mu, std, z = problem
    steps = (64, 128, 256) if cfg['discretization'] == 've' else (32, 64, 128)  # VE's geometric steps need more
    errors, ratios = convergence_ratios(mu, std, z, steps, solver=solver, **cfg)
    assert all(band[0] < r < band[1] for r in ratios), (errors, ratios)


def test_ablation_matches_edm_sampler_for_edm_settings(problem):
    mu, std, z = problem
    for kwargs in (dict(), dict(S_churn=20, S_min=0.1, S_max=20, S_noise=1.01)):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        a = sampling.edm_sampler(GaussianDenoiser(mu, std), z, num_steps=7,
                                 randn_like=lambda x: torch.randn(x.shape, generator=g1, dtype=x.dtype), **kwargs)
        b = sampling.ablation_sampler(GaussianDenoiser(mu, std), z, num_steps=7,
                                      randn_like=lambda x: torch.randn(x.shape, generator=g2, dtype=x.dtype), **kwargs)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_heun_alpha_generalisation_is_second_order(problem):
    mu, std, z = problem
    errors, ratios = convergence_ratios(mu, std, z, (32, 64, 128), solver='heun', alpha=0.75)
    assert all(3.2 < r < 5.5 for r in ratios), (errors, ratios)
    # alpha=1/2 (explicit midpoint) is at least 2nd order; on this problem its leading error term cancels.
    errors, ratios = convergence_ratios(mu, std, z, (32, 64, 128), solver='heun', alpha=0.5)
    assert all(r > 3.2 for r in ratios), (errors, ratios)


# ----------------------------------------------------------------------------
# Edge cases and NFE.


def test_single_step_is_one_euler_step_to_the_denoised_image(problem):
    mu, std, z = problem
    net = GaussianDenoiser(mu, std)
    out = sampling.edm_sampler(net, z, num_steps=1)
    expected = net(80.0 * z, torch.tensor(80.0, dtype=torch.float64))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for disc in ('vp', 've', 'iddpm', 'edm'):
        for solver in ('euler', 'heun'):
            net = GaussianDenoiser(mu, std)
            out = sampling.ablation_sampler(net, z, num_steps=1, solver=solver, discretization=disc)
            assert torch.isfinite(out).all() and net.nfe == 1, (disc, solver)
            assert net.sigmas == [pytest.approx(first_sigma(disc, 1))]


@pytest.mark.parametrize('n', [1, 2, 5, 18])
def test_nfe(problem, n):
    mu, std, z = problem
    net = GaussianDenoiser(mu, std)
    sampling.edm_sampler(net, z, num_steps=n)
    assert net.nfe == 2 * n - 1
    net = GaussianDenoiser(mu, std)
    sampling.ablation_sampler(net, z, num_steps=n, solver='heun')
    assert net.nfe == 2 * n - 1
    net = GaussianDenoiser(mu, std)
    sampling.ablation_sampler(net, z, num_steps=n, solver='euler')
    assert net.nfe == n


def test_edm_sampler_uses_clamped_and_rounded_sigmas(problem):
    mu, std, z = problem
    net = GaussianDenoiser(mu, std, sigma_min=0.05, sigma_max=10.0, round_to=0.01)
    out = sampling.edm_sampler(net, z, num_steps=6)
    assert out.dtype == torch.float64
    expected = net.round_sigma(sampling.edm_sigma_steps(6, 0.05, 10.0, 7)).tolist()
    assert net.sigmas[0] == pytest.approx(10.0) and min(net.sigmas) == pytest.approx(0.05)
    assert sorted(set(round(s, 9) for s in net.sigmas), reverse=True) == pytest.approx(expected)


def test_stochastic_sampling_noise_protocol(problem):
    """Churn draws noise on every step (also where gamma=0), in float64 like the state; S_churn=0 draws none."""
    mu, std, z = problem
    calls = []

    def randn_like(x):
        calls.append(x.dtype)
        return torch.ones_like(x)

    det = sampling.edm_sampler(GaussianDenoiser(mu, std), z, num_steps=6, randn_like=randn_like)
    assert calls == []
    sto = sampling.edm_sampler(GaussianDenoiser(mu, std), z, num_steps=6, randn_like=randn_like,
                               S_churn=10, S_min=0.5, S_max=5)
    assert calls == [torch.float64] * 6
    assert not torch.allclose(det, sto)
    net = GaussianDenoiser(mu, std)
    sampling.edm_sampler(net, z, num_steps=6, randn_like=randn_like, S_churn=10, S_min=0.5, S_max=5)
    steps = sampling.edm_sigma_steps(6).tolist()
    gamma = min(10 / 6, math.sqrt(2) - 1)
    # Euler evaluations happen at t_hat = t_i (1 + gamma_i); only steps inside [S_min, S_max] are raised.
    euler_sigmas = net.sigmas[0::2]
    for t, seen in zip(steps, euler_sigmas):
        assert seen == pytest.approx(t * (1 + gamma) if 0.5 <= t <= 5 else t)


def test_churn_gamma():
    assert sampling.churn_gamma(1.0, 10, 40, 0.05, 50) == pytest.approx(math.sqrt(2) - 1)  # capped
    assert sampling.churn_gamma(1.0, 10, 2, 0.05, 50) == pytest.approx(0.2)
    assert sampling.churn_gamma(60.0, 10, 40, 0.05, 50) == 0
    assert sampling.churn_gamma(0.01, 10, 40, 0.05, 50) == 0


def test_bad_sampler_options_raise(problem):
    mu, std, z = problem
    for bad in (dict(solver='rk4'), dict(discretization='cosine'), dict(schedule='exp'), dict(scaling='ve')):
        with pytest.raises(ValueError):
            sampling.ablation_sampler(GaussianDenoiser(mu, std), z, **bad)
    with pytest.raises(ValueError):
        sampling.edm_sampler(GaussianDenoiser(mu, std), z, num_steps=0)


# ----------------------------------------------------------------------------
# Step schedules (Table 1) as pure functions.


def test_edm_sigma_steps():
    s = sampling.edm_sigma_steps(18, 0.002, 80, 7)
    assert s.dtype == torch.float64 and len(s) == 18
    assert float(s[0]) == pytest.approx(80) and float(s[-1]) == pytest.approx(0.002)
    assert bool((s[1:] < s[:-1]).all())
    # Uniform in sigma^(1/rho).
    d = np.diff(s.numpy() ** (1 / 7))
    assert np.allclose(d, d[0])
    assert sampling.edm_sigma_steps(1, 0.002, 80, 7).tolist() == [pytest.approx(80)]


def test_vp_schedule_functions():
    # One home for the VP schedule: training.networks' functions (inverse and derivative tested there).
    from training import networks
    for name in ('vp_sigma', 'vp_sigma_inv', 'vp_sigma_deriv'):
        assert getattr(sampling, name) is getattr(networks, name), name
    beta_d, beta_min = sampling.vp_betas(float(sampling.vp_sigma(1e-3)), float(sampling.vp_sigma(1)), 1e-3)
    assert beta_d == pytest.approx(19.9) and beta_min == pytest.approx(0.1)
    bd, bm = sampling.vp_betas(0.01, 50.0, 1e-3)
    assert float(sampling.vp_sigma(1e-3, bd, bm)) == pytest.approx(0.01)
    assert float(sampling.vp_sigma(1.0, bd, bm)) == pytest.approx(50.0)
    steps = sampling.vp_time_steps(5, 1e-3)
    assert steps.tolist() == pytest.approx([1, 0.75025, 0.5005, 0.25075, 1e-3])


def test_ve_and_iddpm_steps():
    s = sampling.ve_sigma_steps(10, 0.02, 100)
    assert float(s[0]) == pytest.approx(100) and float(s[-1]) == pytest.approx(0.02)
    assert np.allclose(np.diff(np.log(s.numpy())), np.log(0.02 / 100) / 9)  # geometric
    u = sampling.iddpm_u(dtype=torch.float64)  # the sampler works in float64
    assert len(u) == 1001 and float(u[-1]) == 0 and bool((u[1:] < u[:-1]).all())
    # The paper's j_0 = 8 follows from sigma_max = 81: u_8 = 80.2 is the first level below it.
    assert float(u[8]) == pytest.approx(80.2037, abs=1e-3) and float(u[7]) > 81
    steps = sampling.iddpm_sigma_steps(12, 0.002, 81)
    assert float(steps[0]) == float(u[8]) and float(steps[-1]) == float(u[999])
    assert all(any(abs(float(x) - float(v)) < 1e-12 for v in u) for x in steps)  # every step is a u_j


@pytest.mark.parametrize('name,kwargs,nfe', [
    ('edm', {}, lambda n: 2 * n - 1), ('ablation', dict(solver='heun'), lambda n: 2 * n - 1),
    ('ablation', dict(solver='euler'), lambda n: n), ('dpm_2', {}, lambda n: 2 * n - 1),
    ('dpmpp_2s_ancestral', {}, lambda n: 2 * n - 1), ('euler_ancestral', {}, lambda n: n), ('lms', {}, lambda n: n),
    ('dpmpp_2m', {}, lambda n: n), ('dpmpp_2m_sde', {}, lambda n: n), ('dpmpp_3m_sde', {}, lambda n: n),
    ('unipc', dict(order=3), lambda n: n), ('iddpm', {}, lambda n: n), ('iddpm_ddim', {}, lambda n: n)])
def test_count_nfe_and_steps_for_nfe(name, kwargs, nfe):
    mu = torch.zeros([1, 3, 4, 4], dtype=torch.float64)
    for n in (1, 2, 7):
        net = GaussianDenoiser(mu, 0.5)  # the real count, on a real denoiser
        sampling.SAMPLERS[name](net, torch.randn([1, 3, 4, 4], dtype=torch.float64), num_steps=n, **kwargs)
        assert sampling.count_nfe(name, n, **kwargs) == net.nfe == nfe(n)
    for budget in (5, 6, 35):
        n = sampling.steps_for_nfe(name, budget, **kwargs)
        assert nfe(n) <= budget < nfe(n + 1)
    with pytest.raises(ValueError):
        sampling.steps_for_nfe(name, 0, **kwargs)


# ----------------------------------------------------------------------------
# Random numbers and seeds.


def test_stacked_random_generator_protocol():
    seeds = [0, 7, 2 ** 32 + 7, 123456]
    rnd = sampling.StackedRandomGenerator('cpu', seeds)
    x = rnd.randn([4, 3, 2, 2])
    for k, seed in enumerate(seeds):
        ref = torch.randn([3, 2, 2], generator=torch.Generator().manual_seed(seed % 2 ** 32))
        assert torch.equal(x[k], ref)
    assert torch.equal(x[1], x[2])  # seeds are taken modulo 2**32
    # A sample depends only on its own seed, not on the batch it is in.
    alone = sampling.StackedRandomGenerator('cpu', [123456]).randn([1, 3, 2, 2])
    assert torch.equal(alone[0], x[3])
    y = rnd.randn_like(torch.zeros([4, 5], dtype=torch.float64))
    assert y.dtype == torch.float64 and y.shape == (4, 5)
    labels = rnd.randint(10, size=[4])
    assert labels.shape == (4,) and labels.dtype == torch.int64 and bool(((labels >= 0) & (labels < 10)).all())
    with pytest.raises(ValueError):
        rnd.randn([3, 2])


def test_parse_seeds_bounds():
    from training.sampling import parse_seeds
    assert parse_seeds('0-3,7') == [0, 1, 2, 3, 7] and parse_seeds(f'{2**32 - 1}') == [2**32 - 1]
    for seeds, says in [('-1', "'-1' is below 0"), ('0-99999999999', "'0-99999999999' is above 4294967295"),
                        ('0-4000000000', 'has 4,000,000,001 numbers, more than the 10,000,000 allowed'),
                        ('0-6000000,10000000-15000000', 'has 11,000,002 numbers')]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_seeds(seeds)


@pytest.mark.parametrize('num_seeds,batch,world', [(64, 64, 1), (100, 16, 2), (5, 4, 3), (1, 64, 4), (65, 64, 2),
                                                   (0, 8, 2)])
def test_seed_batches_partition(num_seeds, batch, world):
    seeds = list(range(1000, 1000 + num_seeds))
    batches = sampling.seed_batches(seeds, batch, world)
    assert len(batches) % world == 0
    assert all(len(b) <= batch for b in batches)
    shares = [np.concatenate(batches[r::world]) for r in range(world)]
    assert sorted(np.concatenate(shares).tolist()) == seeds  # every seed exactly once
    if 0 < num_seeds <= batch * world:
        assert len(batches) == world  # one round is enough
    # Same number of batches on every rank (ranks stay in step).
    assert len({len(batches[r::world]) for r in range(world)}) == 1


def test_seed_batches_follow_the_paper_split():
    # num_batches = ((100-1)//(16*2)+1)*2 = 8, np.array_split: sizes 13,13,13,13,12,12,12,12.
    batches = sampling.seed_batches(list(range(100)), 16, 2)
    assert [len(b) for b in batches] == [13] * 4 + [12] * 4
    assert batches[1].tolist() == list(range(13, 26))
    assert [len(b) for b in sampling.seed_batches(list(range(5)), 4, 3)] == [2, 2, 1]


# ----------------------------------------------------------------------------
# Goldens: the reference implementation's outputs on small random networks.


GOLDEN_SAMPLERS = ['sampler_edm_det18', 'sampler_edm_stoch', 'sampler_abl_edm_heun_stoch',
                   'sampler_abl_edm_heun_vpnet', 'sampler_abl_iddpm_euler', 'sampler_abl_ve_euler',
                   'sampler_abl_vp_euler']


def test_all_sampler_goldens_are_covered(golden_dir):
    assert sorted(p.stem for p in golden_dir.glob('sampler_*.pt')) == sorted(GOLDEN_SAMPLERS)


@pytest.mark.parametrize('name', GOLDEN_SAMPLERS)
def test_sampler_golden(golden_dir, name):
    ref = torch.load(golden_dir / f'{name}.pt', weights_only=True)
    net = load_golden_net(golden_dir, ref['net'])
    seeds = ref['seeds']
    rnd = sampling.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    class_labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[len(seeds)])] if net.label_dim else None
    assert torch.equal(latents, ref['latents'])
    if ref['class_labels'] is None:
        assert class_labels is None
    else:
        assert torch.equal(class_labels, ref['class_labels'])
    with torch.no_grad():
        out = getattr(generate, ref['sampler'])(net, latents, class_labels, randn_like=rnd.randn_like, **ref['kwargs'])
    assert out.dtype == torch.float64 and out.shape == ref['output'].shape
    err = rel_err(out, ref['output'].to(torch.float64))
    assert err <= 1e-4, f'{name}: relative error {err:.2e}'


# --- compiled sampling (generate.py / fid.py --compile) -------------------------------------------------------

def _tiny_random_network():
    from training import presets
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(**presets.network_kwargs('tiny-8')).eval().requires_grad_(False)
    return jitter_params(net, 0.05)  # the zero-initialised output layers would hide differences


def test_compile_network_wraps_the_backbone_only():
    net = _tiny_random_network()
    compiled = sampling.compile_network(net)
    assert net.model is not compiled.model and isinstance(net.model, torch.nn.Module)  # net itself unchanged
    assert compiled.model._orig_mod is net.model and compiled.sigma_data == net.sigma_data
    with pytest.raises(ValueError, match='no backbone'):
        sampling.compile_network(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_sampling_matches_eager():
    # Tolerance: inductor fuses and reorders float32 sums, so samples agree to float rounding (relative 1e-4
    # after the sampler's steps) and the 8-bit images to one level at most.
    import shutil
    if not (shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')):
        pytest.skip('torch.compile on CPU needs a C++ compiler')
    net = _tiny_random_network()
    latents = torch.randn([2, 3, 8, 8], dtype=torch.float64)
    labels = torch.eye(10)[[1, 7]]
    eager = sampling.edm_sampler(net, latents, labels, num_steps=3)
    compiled = sampling.edm_sampler(sampling.compile_network(net), latents, labels, num_steps=3)
    assert float((compiled - eager).norm() / eager.norm()) < 1e-4
    images = [b for _, b in sampling.generate_images(net, [0, 1], num_steps=3)]
    images_c = [b for _, b in sampling.generate_images(net, [0, 1], num_steps=3, compile=True)]
    assert int((images[0].int() - images_c[0].int()).abs().max()) <= 1
