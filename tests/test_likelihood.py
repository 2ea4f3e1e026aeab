"""training/likelihood.py against closed forms: for Gaussian data N(mu, Sigma) the ideal denoiser is affine,
D(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), and the exact log-density of the data at
noise sigma_min is log N(x; mu, Sigma + sigma_min^2 I). The estimator's variance is known too: with a fixed
probe eps the trace integral is eps^T M eps, M = integral of dD/dx over ln sigma, whose variance is 2 tr(M^2)
for Gaussian probes and 2 sum_{i != j} M_ij^2 for Rademacher ones. Also the 8-bit discretisation
correction (fid.py nll, its command line, is tested in tests/test_fid.py)."""

from __future__ import annotations

import math

import pytest
import torch

from training import likelihood, sampling

SIGMA_MIN, SIGMA_MAX = 0.002, 1000.0  # sigma_max >> data scale: the N(0, sigma_max^2) prior is exact to ~1e-3


class GaussianDataDenoiser:
    """The ideal denoiser of N(mu, Sigma) on 1x2x2 images (4 dimensions, full covariance)."""
    img_channels, img_resolution, label_dim, sigma_min, sigma_max = 1, 2, 0, 0.0, float('inf')

    def __init__(self, mu, cov):
        self.mu, self.cov = mu, cov
        self.lam, self.Q = torch.linalg.eigh(cov)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        y = ((x.flatten(1) - self.mu) @ self.Q) * (self.lam / (self.lam + sigma ** 2))
        return (self.mu + y @ self.Q.T).reshape(x.shape)

    def log_density(self, x, sigma):
        cov = self.cov + sigma ** 2 * torch.eye(len(self.mu), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.mu, cov).log_prob(x.flatten(1))

    def trace_integral(self, sigma_min, sigma_max):
        """M = integral over ln sigma of Sigma (Sigma + sigma^2 I)^-1 (closed form per eigenvalue)."""
        m = 0.5 * torch.log1p(self.lam / sigma_min ** 2) - 0.5 * torch.log1p(self.lam / sigma_max ** 2)
        return self.Q @ torch.diag(m) @ self.Q.T


@pytest.fixture(scope='module')
def gaussian():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=torch.float64)) @ q.T
    net = GaussianDataDenoiser(torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64), cov)
    n = 2000
    chol = torch.linalg.cholesky(cov + SIGMA_MIN ** 2 * torch.eye(4, dtype=torch.float64))
    x = (net.mu + torch.randn(n, 4, generator=g, dtype=torch.float64) @ chol.T).reshape(n, 1, 2, 2)
    return net, x, net.log_density(x, SIGMA_MIN)


def seeded(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype)


def test_exact_trace_matches_the_closed_form(gaussian):
    """No estimator noise: what is left is the ODE solver's error and the prior's (zero-mean, ~|mu|/sigma_max)."""
    net, x, exact = gaussian
    result = likelihood.log_likelihood(net, x[:400], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, probe='exact',
                                       rtol=1e-7, atol=1e-7)
    diff = result.log_density - exact[:400]
    assert float(diff.abs().max()) < 3e-3 and abs(float(diff.mean())) < 2e-4, (diff.abs().max(), diff.mean())
    assert result.nfe > 20
    torch.testing.assert_close(result.log_density, result.prior_logp + result.delta_logp)
    # Loose tolerances are visibly worse: the solver tolerance is what controls the accuracy.
    loose = likelihood.log_likelihood(net, x[:400], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, probe='exact',
                                      rtol=1e-2, atol=1e-2)
    assert loose.nfe < result.nfe and float((loose.log_density - exact[:400]).abs().mean()) > float(diff.abs().mean())


@pytest.mark.parametrize('probe', ['rademacher', 'gaussian'])
def test_hutchinson_estimate_is_unbiased_with_the_predicted_variance(gaussian, probe):
    """n = 2000 images: the mean error is within 3.5 standard errors of 0, and the per-image variance is the
    Hutchinson variance predicted in closed form (so the standard error is the estimator's, not solver noise)."""
    net, x, exact = gaussian
    result = likelihood.log_likelihood(net, x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, probe=probe, rtol=1e-6,
                                       atol=1e-6, randn_like=seeded(1))
    diff = result.log_density - exact
    se = float(diff.std() / len(diff) ** 0.5)
    assert abs(float(diff.mean())) < 3.5 * se, (float(diff.mean()), se)
    M = net.trace_integral(SIGMA_MIN, SIGMA_MAX)
    predicted = 2 * float((M ** 2).sum()) if probe == 'gaussian' else 2 * float((M ** 2).sum() - (M.diag() ** 2).sum())
    assert 0.8 < float(diff.var()) / predicted < 1.25, (float(diff.var()), predicted)


def test_rademacher_probe_is_exact_for_a_diagonal_jacobian():
    """eps^T A eps = tr A for +-1 probes when A is diagonal: zero variance for independent pixels."""
    net = GaussianDataDenoiser(torch.zeros(4, dtype=torch.float64), torch.diag(torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64)))
    x = torch.randn([64, 1, 2, 2], generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    kwargs = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rtol=1e-7, atol=1e-7)
    hutchinson = likelihood.log_likelihood(net, x, probe='rademacher', randn_like=seeded(4), **kwargs)
    exact = likelihood.log_likelihood(net, x, probe='exact', **kwargs)
    torch.testing.assert_close(hutchinson.delta_logp, exact.delta_logp, rtol=1e-6, atol=1e-6)


def test_noise_range_and_probe_validation(gaussian):
    net, x, _ = gaussian
    with pytest.raises(ValueError, match='probe'):
        likelihood.log_likelihood(net, x[:2], probe='normal')
    with pytest.raises(ValueError, match='sigma_min < sigma_max'):
        likelihood.log_likelihood(net, x[:2], sigma_min=5, sigma_max=1)


# ----------------------------------------------------------------------------
# 8-bit data: dequantisation and bits per dimension.


def test_dequantisation_bins_invert_the_image_mapping():
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(4, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    x = likelihood.dequantize(images, lambda t: torch.rand(t.shape, generator=gen, dtype=t.dtype))
    centres = likelihood.dequantize(images, None)
    assert float((x - centres).abs().max()) <= 0.5 / 127.5
    assert torch.equal(sampling.images_to_uint8(x).permute(0, 3, 1, 2), images)  # each value stays in its bin
    assert torch.equal(sampling.images_to_uint8(centres).permute(0, 3, 1, 2), images)


def test_bits_per_dim_of_the_uniform_density_is_8():
    """The uniform density over the union of the 256 bins, (127.5/256)^d, is 8 bits per dimension exactly."""
    d = 12
    log_density = torch.tensor([d * math.log(127.5 / 256)], dtype=torch.float64)
    assert float(likelihood.bits_per_dim(log_density, d)) == pytest.approx(8.0, abs=1e-12)


def test_nll_bits_per_dim_of_gaussian_data(gaussian):
    net, x, _ = gaussian
    images = sampling.images_to_uint8(x[:200]).permute(0, 3, 1, 2)
    centres = likelihood.dequantize(images, None)
    bpd, nfe = likelihood.nll_bits_per_dim(net, images, dequantization=False, sigma_min=SIGMA_MIN,
                                           sigma_max=SIGMA_MAX, probe='exact', rtol=1e-7, atol=1e-7)
    expected = (-net.log_density(centres, SIGMA_MIN) / 4 + math.log(127.5)) / math.log(2)
    torch.testing.assert_close(bpd, expected, rtol=0, atol=2e-3)
    assert nfe > 0
