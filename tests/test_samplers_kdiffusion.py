"""The samplers beyond EDM (k-diffusion's collection): k-diffusion's outputs on the golden networks, their
convergence order on the exactly solvable Gaussian problem, the law of the stochastic ones, NFE counts and
the noise protocol."""

from __future__ import annotations

import inspect

import pytest
import torch

from helpers import GaussianDenoiser, expected_output, load_golden_net, rel_err
from training import sampling

NEW_SAMPLERS = ['euler_ancestral', 'dpm_2', 'lms', 'dpmpp_2s_ancestral', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m_sde',
                'unipc']
STOCHASTIC = ['euler_ancestral', 'dpmpp_2s_ancestral', 'dpmpp_2m_sde', 'dpmpp_3m_sde']


# ----------------------------------------------------------------------------
# Goldens: k-diffusion's samplers on the EDM golden networks, with the EDM random-number protocol.

GOLDEN_KSAMPLERS = ['ksampler_dpm_2', 'ksampler_dpmpp_2m', 'ksampler_dpmpp_2m_5', 'ksampler_dpmpp_2m_sde_heun',
                    'ksampler_dpmpp_2m_sde_midpoint', 'ksampler_dpmpp_2s_ancestral', 'ksampler_dpmpp_3m_sde',
                    'ksampler_euler_ancestral', 'ksampler_euler_ancestral_eta05', 'ksampler_lms4']


def test_all_ksampler_goldens_are_covered(golden_dir):
    assert sorted(p.stem for p in golden_dir.glob('ksampler_*.pt')) == sorted(GOLDEN_KSAMPLERS)


@pytest.mark.parametrize('name', GOLDEN_KSAMPLERS)
def test_ksampler_golden(golden_dir, name):
    ref = torch.load(golden_dir / f'{name}.pt', weights_only=True)
    net = load_golden_net(golden_dir, ref['net'])
    sampler = ref['reference_function'].rsplit('sample_', 1)[1]  # k_diffusion.sampling.sample_<name>
    assert sampler in sampling.SAMPLERS
    seeds = ref['seeds']
    rnd = sampling.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    class_labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[len(seeds)])]
    assert torch.equal(latents, ref['latents']) and torch.equal(class_labels, ref['class_labels'])
    steps = dict(num_steps=ref['num_steps'], sigma_min=ref['sigma_min'], sigma_max=ref['sigma_max'], rho=ref['rho'])
    sigmas = sampling.sampling_sigmas(net, **steps)
    torch.testing.assert_close(sigmas, ref['sigmas'], rtol=1e-12, atol=0)
    draws = []

    def randn_like(x):
        draws.append(x.dtype)
        return rnd.randn_like(x)
    with torch.no_grad():
        out = sampling.SAMPLERS[sampler](net, latents, class_labels, randn_like=randn_like, **steps, **ref['kwargs'])
    assert out.dtype == torch.float64 and out.shape == ref['output'].shape
    err = rel_err(out, ref['output'])
    assert err <= 1e-4, f'{name}: relative error {err:.2e}'
    # Noise: float64, once per step that ends above sigma = 0 (the stochastic samplers), never otherwise.
    assert draws == ([torch.float64] * (ref['num_steps'] - 1) if ref['stochastic'] else [])


# ----------------------------------------------------------------------------
# Convergence order on the Gaussian problem (ideal denoiser, exact ODE solution; see test_samplers.py).
# Bands: a method of order p has err(N)/err(2N) -> 2^p; the step counts are where the measured ratios
# have settled (printed by the assertion on failure). 1st order (1.6, 2.5), 2nd (3.2, 5.5), 3rd (6, 10),
# 4th: LMS-4 still approaches 16 from below (11.1, 13.5 at 32->64->128), so (10, 20).

ODE_CASES = [
    # (sampler, kwargs, ends with x = D(x; sigma_{N-1}), band, steps)
    ('euler_ancestral', dict(eta=0), True, (1.6, 2.5), (32, 64, 128)),
    ('dpm_2', {}, True, (3.2, 5.5), (32, 64, 128)),
    ('lms', dict(order=1), False, (1.6, 2.5), (32, 64, 128)),
    ('lms', dict(order=2), False, (3.2, 5.5), (32, 64, 128)),
    ('lms', dict(order=3), False, (6.0, 10.0), (32, 64, 128)),
    ('lms', dict(order=4), False, (10.0, 20.0), (32, 64, 128)),
    ('dpmpp_2s_ancestral', dict(eta=0), True, (3.2, 5.5), (32, 64, 128)),
    ('dpmpp_2m', {}, True, (3.2, 5.5), (32, 64, 128)),
    ('dpmpp_2m_sde', dict(eta=0, solver_type='heun'), True, (3.2, 5.5), (32, 64, 128)),
    # 2nd order asymptotically (see dpmpp_3m_sde's docstring); ratios 3.3, 3.7, 3.9 from 64 steps on.
    ('dpmpp_3m_sde', dict(eta=0), True, (3.0, 5.5), (64, 128, 256)),
    # UniPC-p is of order p + 1 (the corrector adds one): measured 4.1, 4.1 / 9.0, 8.5 / 17.1, 16.6.
    ('unipc', dict(order=1), True, (3.2, 5.5), (32, 64, 128)),
    ('unipc', dict(order=2), True, (6.0, 10.0), (32, 64, 128)),
    ('unipc', dict(order=3), True, (12.0, 20.0), (32, 64, 128)),
]


def _errors(name, kwargs, last_is_denoiser, steps, mu, std, z):
    errors = []
    for n in steps:
        out = sampling.SAMPLERS[name](GaussianDenoiser(mu, std), z, num_steps=n, **kwargs)
        errors.append(rel_err(out, expected_output(mu, std, z, sampling.edm_sigma_steps(n), last_is_denoiser)))
    return errors


@pytest.mark.parametrize('name,kwargs,last,band,steps', ODE_CASES, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_convergence_order(problem, name, kwargs, last, band, steps):
    mu, std, z = problem
    errors = _errors(name, kwargs, last, steps, mu, std, z)
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(band[0] < r < band[1] for r in ratios), (errors, ratios)
    assert errors[-1] < 3e-2  # converging to the exact answer, not merely at a rate


def test_higher_order_is_more_accurate(problem):
    """LMS gains accuracy with its order; 3M beats 2M even though both end up 2nd order."""
    mu, std, z = problem
    lms = [_errors('lms', dict(order=k), False, (64,), mu, std, z)[0] for k in (1, 2, 3, 4)]
    assert lms == sorted(lms, reverse=True) and lms[3] < lms[1] / 10, lms
    for n in (32, 64, 128):
        e2 = _errors('dpmpp_2m', {}, True, (n,), mu, std, z)[0]
        e3 = _errors('dpmpp_3m_sde', dict(eta=0), True, (n,), mu, std, z)[0]
        assert e3 < e2 / 3, (n, e2, e3)


def test_deterministic_limits_agree(problem):
    """eta = 0 turns the stochastic samplers into ODE solvers: euler_ancestral into Euler (the ablation
    sampler's EDM settings), dpmpp_2m_sde 'midpoint' into dpmpp_2m."""
    mu, std, z = problem
    a = sampling.euler_ancestral_sampler(GaussianDenoiser(mu, std), z, num_steps=9, eta=0)
    b = sampling.ablation_sampler(GaussianDenoiser(mu, std), z, num_steps=9, solver='euler')
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a = sampling.dpmpp_2m_sde_sampler(GaussianDenoiser(mu, std), z, num_steps=9, eta=0)
    b = sampling.dpmpp_2m_sampler(GaussianDenoiser(mu, std), z, num_steps=9)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_unipc_coefficients_meet_their_order_conditions():
    """sum_m rho_m r_m^(k-1) = -k! h phi_{k+1}(h) / B(h) with phi from its integral definition (quadrature), and
    for h -> 0 the one-point corrector weight tends to 1/2 (the trapezoidal rule)."""
    import math
    from scipy.integrate import quad
    for h in (0.05, 0.4, 1.5):
        for r in ([1.0], [-0.8, 1.0], [-0.7, -1.9, 1.0], [-1.1], [-0.9, -2.2]):
            rho = sampling.unipc_coefficients(r, h)
            for k in range(1, len(r) + 1):
                phi = quad(lambda u: math.exp(-h * (1 - u)) * u ** k / math.factorial(k), 0, 1)[0]
                expected = -math.factorial(k) * h * phi / math.expm1(-h)
                assert sum(c * rm ** (k - 1) for c, rm in zip(rho, r)) == pytest.approx(expected, rel=1e-9)
    assert sampling.unipc_coefficients([1.0], 1e-4)[0] == pytest.approx(0.5, abs=1e-4)


def test_lms_coefficients_are_exact():
    """The weights integrate every polynomial of degree < order exactly over the step: sum_j c_j p(t_{i-j})
    = integral of p over [t_i, t_{i+1}]; for order 1 this is Euler's (t_{i+1} - t_i)."""
    t = [80.0, 42.4, 21.1, 9.7, 4.07, 1.5, 0.0]
    for order in (1, 2, 3, 4):
        for i in range(order - 1, len(t) - 1):
            c = sampling.lms_coefficients(t, i, order)
            for degree in range(order):
                exact = (t[i + 1] ** (degree + 1) - t[i] ** (degree + 1)) / (degree + 1)
                got = sum(c[j] * t[i - j] ** degree for j in range(order))
                assert got == pytest.approx(exact, rel=1e-10), (order, i, degree)
    assert sampling.lms_coefficients(t, 2, 1) == [pytest.approx(t[3] - t[2])]


# ----------------------------------------------------------------------------
# Stochastic samplers: the law of their output. With Gaussian data and its (affine) ideal denoiser every
# sampler is an affine map of the latents and of its noise draws, so with mu = 0 the output variance is
# the sum of squares of the outputs when the latent, then each noise draw in turn, is a unit vector
# (batch element k carries the k-th source). That variance must approach the data's std^2 at the method's
# weak order, and Monte Carlo draws through randn_like must match it.


def exact_output_variance(name, num_steps, std=0.5, **kwargs):
    draws = [0]
    z = torch.zeros([num_steps + 1, 1, 1, 1], dtype=torch.float64)
    z[0] = 1

    def unit_noise(x):
        draws[0] += 1
        e = torch.zeros_like(x)
        e[draws[0]] = 1
        return e
    net = GaussianDenoiser(torch.zeros([]), std, img_channels=1, img_resolution=1)
    out = sampling.SAMPLERS[name](net, z, num_steps=num_steps, randn_like=unit_noise, **kwargs)
    return float((out ** 2).sum()), draws[0]


@pytest.mark.parametrize('name,kwargs,band', [
    ('euler_ancestral', {}, (1.6, 2.5)),            # weak order 1
    ('euler_ancestral', dict(eta=0.5), (1.6, 2.5)),
    ('dpmpp_2s_ancestral', {}, (3.2, 5.5)),          # measured 3.6, 3.8, 3.9: the 2nd-order step dominates
    ('dpmpp_2m_sde', {}, (3.2, 5.5)),
    ('dpmpp_2m_sde', dict(solver_type='heun', eta=0.5), (3.2, 5.5)),
    ('dpmpp_3m_sde', {}, (3.2, 5.5)),
])
def test_stochastic_output_law_converges_to_the_data(name, kwargs, band):
    std = 0.5
    results = [exact_output_variance(name, n, std, **kwargs) for n in (32, 64, 128, 256)]
    assert [d for _, d in results] == [31, 63, 127, 255]  # one draw per step that ends above sigma = 0
    errors = [abs(v / std ** 2 - 1) for v, _ in results]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(band[0] < r < band[1] for r in ratios), (errors, ratios)
    assert errors[-1] < 0.05


@pytest.mark.parametrize('name', STOCHASTIC)
def test_stochastic_monte_carlo_matches_the_law(name):
    """20000 draws per sampler: the sample mean is mu (within 4.5 standard errors per pixel) and the sample
    variance the exact law's (within 5 relative standard errors). Reusing one noise tensor for every draw
    (a protocol bug) changes the variance by far more, so this test can fail."""
    std, n_steps, n = 0.5, 24, 5000
    mu = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    z = torch.randn([n, 1, 2, 2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, _ = exact_output_variance(name, n_steps, std)
    rel_se = (2 / (n - 1)) ** 0.5 / 2  # the four pixels are independent: pooled over 4n values

    def sample(randn_like):
        net = GaussianDenoiser(mu, std, img_channels=1, img_resolution=2)
        return sampling.SAMPLERS[name](net, z, num_steps=n_steps, randn_like=randn_like)
    gen = torch.Generator().manual_seed(2)
    out = sample(lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))
    mean_err = (out.mean(0) - mu[0]).abs().max() / (out.std(0).max() / n ** 0.5)
    assert mean_err < 4.5
    var = float(((out - mu) ** 2).mean())
    assert abs(var / expected - 1) < 5 * rel_se, (var, expected)
    frozen = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    var_frozen = float(((sample(lambda x: frozen.clone()) - mu) ** 2).mean())
    assert abs(var_frozen / expected - 1) > 10 * rel_se, (var_frozen, expected)


def test_s_noise_and_eta_scale_the_noise():
    base, _ = exact_output_variance('dpmpp_2m_sde', 32)
    more, _ = exact_output_variance('dpmpp_2m_sde', 32, s_noise=1.1)
    ode, draws = exact_output_variance('dpmpp_2m_sde', 32, eta=0)
    assert more > base * 1.1 and draws == 0  # eta = 0: no noise drawn at all (k-diffusion's `if eta`)
    assert ode != base


# ----------------------------------------------------------------------------
# NFE, options and validation.

NFE = {'euler_ancestral': lambda n: n, 'dpm_2': lambda n: 2 * n - 1, 'lms': lambda n: n,
       'dpmpp_2s_ancestral': lambda n: 2 * n - 1, 'dpmpp_2m': lambda n: n, 'dpmpp_2m_sde': lambda n: n,
       'dpmpp_3m_sde': lambda n: n, 'unipc': lambda n: n}


@pytest.mark.parametrize('name', NEW_SAMPLERS)
@pytest.mark.parametrize('n', [1, 2, 5])
def test_nfe_and_edge_cases(problem, name, n):
    mu, std, z = problem
    net = GaussianDenoiser(mu, std)
    out = sampling.SAMPLERS[name](net, z, num_steps=n)
    assert net.nfe == NFE[name](n)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert max(net.sigmas) == pytest.approx(80) and min(net.sigmas) > 0  # never evaluated at sigma = 0
    if n == 1:  # one step from sigma_max to 0 lands on the denoised latent
        torch.testing.assert_close(out, GaussianDenoiser(mu, std)(80.0 * z, torch.tensor(80.0)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', NEW_SAMPLERS)
def test_samplers_use_the_network_noise_range_and_round_sigma(problem, name):
    mu, std, z = problem
    net = GaussianDenoiser(mu, std, sigma_min=0.05, sigma_max=10.0, round_to=0.01)
    sampling.SAMPLERS[name](net, z, num_steps=6)
    steps = net.round_sigma(sampling.edm_sigma_steps(6, 0.05, 10.0, 7)).tolist()
    assert net.sigmas[0] == pytest.approx(10.0)
    assert all(any(abs(s - t) < 1e-9 for t in steps) for s in net.sigmas[::2 if name in ('dpm_2', 'dpmpp_2s_ancestral') else 1])


# Samplers on their own time grid take no `sigmas`: iDDPM's discrete steps, the score SDE's uniform t.
OWN_TIME_GRID = {'iddpm', 'iddpm_ddim', 'pc'}


def test_every_continuous_sigma_sampler_takes_sigmas():
    without = {name for name, fn in sampling.SAMPLERS.items() if 'sigmas' not in inspect.signature(fn).parameters}
    assert without == OWN_TIME_GRID


@pytest.mark.parametrize('name', [name for name in sampling.SAMPLERS if name not in OWN_TIME_GRID])
def test_sigmas_default_is_the_edm_time_steps_bit_for_bit(problem, name):
    """sigmas=None walks sampling_sigmas; passing those same sigmas gives the same output bit for bit, and
    other sigmas are walked as given (not clamped or rounded)."""
    mu, std, z = problem
    kwargs = dict(discretization='edm', sigma_min=0.002, sigma_max=80) if name == 'ablation' else {}
    net = lambda: GaussianDenoiser(mu, std, sigma_min=0.05, sigma_max=10.0, round_to=0.01)
    gen = lambda: torch.Generator().manual_seed(3)

    def run(n, **extra):
        g = gen()
        return sampling.SAMPLERS[name](n, z, num_steps=5, randn_like=lambda x: torch.randn(x.shape, generator=g,
                                       dtype=x.dtype), **kwargs, **extra)
    default = run(net())
    sigmas = sampling.sampling_sigmas(net(), 5, 0.002, 80, 7)
    assert torch.equal(run(net(), sigmas=sigmas), default)
    custom = torch.tensor([7.5, 2.123, 0.5, 0.0375, 0], dtype=torch.float64)
    n = GaussianDenoiser(mu, std, sigma_min=0.05, sigma_max=10.0)
    run(n, sigmas=custom)
    assert n.sigmas[0] == 7.5 and set(custom[:-1].tolist()) <= set(n.sigmas)  # 0.0375 < sigma_min: not clamped


def test_generate_images_passes_sigmas(problem):
    mu, std, _ = problem
    net = GaussianDenoiser(mu, std, sigma_min=0.002, sigma_max=80)
    batches = lambda **kw: [im for _, im in sampling.generate_images(net, range(3), sampler='dpmpp_2m', **kw)]
    default = batches(num_steps=4)
    same = batches(sigmas=sampling.sampling_sigmas(net, 4, 0.002, 80, 7))
    other = batches(sigmas=[80.0, 3.0, 0.1, 0.0])
    assert torch.equal(default[0], same[0]) and not torch.equal(default[0], other[0])


def test_bad_sigmas_are_one_line_errors(problem):
    mu, std, z = problem
    for bad in ([3.0, 1.0], [1.0, 3.0, 0.0], [3.0, 0.0, 0.0], [[3.0, 0.0]], [float('nan'), 0.0], [5.0]):
        with pytest.raises(ValueError, match='sigmas must'):
            sampling.dpmpp_2m_sampler(GaussianDenoiser(mu, std), z, sigmas=torch.tensor(bad))


def test_registry_and_options():
    assert set(NEW_SAMPLERS) <= set(sampling.SAMPLERS)
    common = ('num_steps', 'sigma_min', 'sigma_max', 'rho')
    assert sampling.sampler_options_of('euler_ancestral') == common + ('eta', 's_noise')
    assert sampling.sampler_options_of('lms') == common + ('order',)
    assert sampling.sampler_options_of('dpmpp_2m_sde') == common + ('eta', 's_noise', 'solver_type')
    assert sampling.sampler_options_of('dpmpp_2m') == common
    assert sampling.sampler_options_of('unipc') == common + ('order',)
    with pytest.raises(TypeError, match='does not take S_churn'):
        sampling.resolve_sampler('dpmpp_2m', dict(S_churn=1))


def test_bad_options_raise(problem):
    mu, std, z = problem
    for name, bad in (('lms', dict(order=0)), ('dpmpp_2m_sde', dict(solver_type='rk4')),
                      ('euler_ancestral', dict(eta=-1)), ('dpmpp_3m_sde', dict(s_noise=-0.5)),
                      ('unipc', dict(order=4)), ('unipc', dict(order=0))):
        with pytest.raises(ValueError):
            sampling.SAMPLERS[name](GaussianDenoiser(mu, std), z, num_steps=4, **bad)
