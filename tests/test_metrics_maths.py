"""metrics/maths.py: KID, precision/recall and FID against StyleGAN2-ADA's metrics (golden metrics_kid_pr.pt, at
the golden README's tolerances), and the statistical properties of KID and of the FID bootstrap interval."""

import numpy as np
import pytest
import torch

from helpers import rel_err
from metrics import maths
from metrics.features import FeatureStats
from metrics.metric_specs import METRICS, Context, DEFAULT_OPTIONS


@pytest.fixture(scope='module')
def golden(golden_dir):
    return torch.load(golden_dir / 'metrics_kid_pr.pt', weights_only=False)


def test_kid_reproduces_stylegan2_ada(golden):
    real, gen = golden['real'].double().numpy(), golden['gen'].double().numpy()
    for name in ('kid_1subset', 'kid_100x50'):
        idx_gen, idx_real = golden[f'{name}_idx_gen'].numpy(), golden[f'{name}_idx_real'].numpy()
        terms = maths.kid_subset_terms(gen, real, idx_gen, idx_real)
        assert rel_err(terms.mean(), golden[f'{name}_f64']) <= 1e-10
        assert rel_err(terms.mean(), golden[name]) <= 1e-5  # the published float32 computation
    terms = maths.kid_subset_terms(gen, real, golden['kid_100x50_idx_gen'].numpy(), golden['kid_100x50_idx_real'].numpy())
    assert rel_err(terms, golden['kid_100x50_per_subset_f64'].numpy()) <= 1e-10
    # Equal counts: every subset is a permutation of everything, so the value does not depend on the draw.
    value, std = maths.kid(gen, real[:180], num_subsets=3, max_subset_size=1000)
    assert rel_err(value, golden['kid_equal_counts_real180_f64']) <= 1e-10 and std < 1e-9 * abs(value)
    # Our subset draw is the reference's: numpy's legacy generator, gen first, then real.
    for name, (num, size) in (('kid_1subset', (1, 1000)), ('kid_100x50', (100, 50))):
        idx = maths.kid_subset_indices(len(gen), len(real), num, size, np.random.RandomState(golden['kid_np_seed']))
        np.testing.assert_array_equal(idx[0], golden[f'{name}_idx_gen'].numpy())
        np.testing.assert_array_equal(idx[1], golden[f'{name}_idx_real'].numpy())
        assert rel_err(maths.kid(gen, real, num, size, seed=golden['kid_np_seed'])[0], golden[f'{name}_f64']) <= 1e-10


def test_precision_recall_reproduce_stylegan2_ada(golden):
    assert golden['nhood_size'] == 3
    precision, recall = maths.precision_recall(golden['gen'].numpy(), golden['real'].numpy(), k=3)
    assert abs(precision - golden['precision']) < 1e-6 and abs(recall - golden['recall']) < 1e-6
    assert 0 < precision < recall < 1  # the shifted, wider gen distribution: recall high, precision low


def test_fid_reproduces_stylegan2_ada(golden):
    real, gen = golden['real'].double().numpy(), golden['gen'].double().numpy()
    # StyleGAN2-ADA's population covariance (1/N) ...
    got = maths.frechet_distance(gen.mean(0), np.cov(gen, rowvar=False, ddof=0), real.mean(0), np.cov(real, rowvar=False, ddof=0))
    assert rel_err(got, golden['fid']) <= 1e-8
    got = maths.frechet_distance(golden['mu_gen'], golden['cov_gen'], golden['mu_real'], golden['cov_real'])
    assert rel_err(got, golden['fid']) <= 1e-8
    # ... and the paper's fid.py convention (1/(N-1)), which our feature statistics use.
    s = lambda x: (torch.from_numpy(x.sum(0)), torch.from_numpy(x.T @ x))  # noqa: E731
    mu_g, cov_g = maths.mean_and_covariance(*s(gen), len(gen))
    mu_r, cov_r = maths.mean_and_covariance(*s(real), len(real))
    assert rel_err(maths.frechet_distance(mu_g.numpy(), cov_g.numpy(), mu_r.numpy(), cov_r.numpy()),
               golden['fid_unbiased_cov']) <= 1e-8
    # The bootstrap's eigenvalue routes (n > d here, and n < d on 40 of the images) agree with sqrtm.
    fast = maths.ResampledFrechet(gen, mu_r.numpy(), cov_r.numpy())
    assert fast(np.ones(len(gen))) == pytest.approx(golden['fid_unbiased_cov'], rel=1e-9)
    weights = np.random.default_rng(0).multinomial(40, np.full(40, 1 / 40))
    small = gen[np.repeat(np.arange(40), weights)]
    cov_s = np.cov(small, rowvar=False)
    expected = maths.frechet_distance(small.mean(0), cov_s, mu_r.numpy(), cov_r.numpy())
    # Rank < d: the square roots of the product's numerically noisy zero eigenvalues (~1e-13 each) limit any
    # two routes to agree to ~1e-7 relative.
    assert maths.ResampledFrechet(gen[:40], mu_r.numpy(), cov_r.numpy())(weights) == pytest.approx(expected, rel=1e-6)


def test_kid_of_one_distribution_is_zero_within_its_standard_error():
    """Unbiased MMD^2: two samples of one distribution average to 0; a shifted one does not."""
    rng = np.random.default_rng(0)
    d, n, repeats = 8, 120, 40
    values = [maths.kid(rng.standard_normal([n, d]), rng.standard_normal([n, d]), num_subsets=1, max_subset_size=n)[0]
              for _ in range(repeats)]
    mean, se = np.mean(values), np.std(values, ddof=1) / np.sqrt(repeats)
    assert abs(mean) < 3 * se
    shifted = maths.kid(rng.standard_normal([n, d]) + 0.5, rng.standard_normal([n, d]), 20, 60)
    assert shifted[0] > 5 * shifted[1] / np.sqrt(20) > 0


def test_fid_interval_covers_the_closed_form_fid_at_its_nominal_rate():
    """The FID of samples of N(mu_g, S_g) against the population N(mu_r, S_r): the 90% basic bootstrap
    interval contains the closed-form FID of the two Gaussians in about 90% of repeated draws."""
    rng = np.random.default_rng(1)
    d, n, draws = 3, 400, 60
    a = rng.standard_normal([d, d]) * 0.4
    sigma_g, sigma_r = np.eye(d) + a @ a.T, np.eye(d)
    mu_g, mu_r = np.full(d, 0.4), np.zeros(d)
    truth = maths.frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
    chol = np.linalg.cholesky(sigma_g)
    ref = dict(mu=mu_r, sigma=sigma_r)
    covered, widths = 0, []
    for k in range(draws):
        x = mu_g + rng.standard_normal([n, d]) @ chol.T
        stats = FeatureStats(mu=x.mean(0), sigma=np.cov(x, rowvar=False), num_images=n, features=x.astype(np.float32))
        out = METRICS['fid_ci'].compute(Context(stats, ref, dict(DEFAULT_OPTIONS, bootstrap=100, confidence=0.9, seed=k)))
        covered += out['fid_lo'] <= truth <= out['fid_hi']
        widths.append(out['fid_hi'] - out['fid_lo'])
        assert out['fid_lo'] < out['fid'] < out['fid_hi']
    # Binomial(60, 0.9): 95% of runs fall in [49, 58]; the bounds are a little wider so the test is not flaky.
    assert 47 <= covered <= 59, covered
    assert 0 < np.mean(widths) < truth


def test_bootstrap_helpers():
    rng = np.random.default_rng(0)
    w = maths.bootstrap_weights(7, 5, rng)
    assert w.shape == (5, 7) and (w.sum(1) == 7).all()
    # Basic interval: replicates shifted up by b move the interval down by b.
    assert maths.basic_interval(10.0, np.linspace(11, 13, 101), 0.9) == pytest.approx((7.1, 8.9))
