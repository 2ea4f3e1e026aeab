"""Log-likelihood (bits/dim) of images under a diffusion model through the probability-flow ODE (Song et al.
2021, Sec. 4.3) in the EDM parameterisation: dx/ds = x - D(x; sigma) in s = ln(sigma), integrated with the
divergence (Hutchinson's estimator with one fixed probe per image, or exact) by torch_utils.ode.dopri5 in
float64, plus the N(0, sigma_max^2 I) prior; 8-bit images by uniform dequantisation. The derivation is in
docs/design.md ("Samplers beyond the paper, guidance, likelihood").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from torch_utils.ode import dopri5

PROBES = ('rademacher', 'gaussian', 'exact')


class Likelihood(NamedTuple):
    log_density: torch.Tensor  # [B] float64: log p_{sigma_min}(x) in nats
    prior_logp: torch.Tensor   # [B] log N(x(sigma_max); 0, sigma_max^2 I)
    delta_logp: torch.Tensor   # [B] the integral of div v
    nfe: int                   # network evaluations (each with one vector-Jacobian product per probe)


def gaussian_log_density(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; 0, sigma^2 I) per batch element."""
    d = x[0].numel()
    return -0.5 * d * math.log(2 * math.pi * sigma ** 2) - x.flatten(1).square().sum(1) / (2 * sigma ** 2)


def draw_probe(kind: str, like: torch.Tensor, randn_like=torch.randn_like) -> torch.Tensor:
    """A Hutchinson probe with E[eps eps^T] = I: Rademacher (+-1 by the sign of a normal draw) or Gaussian."""
    eps = randn_like(like)
    return eps.sign() if kind == 'rademacher' else eps


def log_likelihood(net, x: torch.Tensor, class_labels=None, sigma_min: float = 0.002, sigma_max: float = 80,
                   probe: str = 'rademacher', rtol: float = 1e-5, atol: float = 1e-5,
                   randn_like=torch.randn_like) -> Likelihood:
    """log p_{sigma_min}(x) (nats per image) of the images x [B,C,H,W] (in [-1, 1]) under the denoiser `net`.

    `probe`: 'rademacher' | 'gaussian' (Hutchinson, unbiased; one fixed probe per image drawn with
    `randn_like`) or 'exact' (the full trace, C*H*W vector-Jacobian products per evaluation).
    `rtol`, `atol`: the ODE solver's tolerances. The noise range is clamped to the network's.
    """
    if probe not in PROBES:
        raise ValueError(f'unknown probe {probe!r}; expected {"|".join(PROBES)}')
    sigma_min, sigma_max = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}')
    x = x.to(torch.float64)
    shape, d = x.shape, x[0].numel()
    eps = None if probe == 'exact' else draw_probe(probe, x, randn_like)
    nfe = 0

    def trace_of_jacobian(x_in, denoised):
        if eps is not None:  # eps^T (dD/dx) eps
            (vjp,) = torch.autograd.grad(denoised, x_in, eps)
            return (vjp * eps).flatten(1).sum(1)
        trace = torch.zeros(shape[0], dtype=torch.float64, device=x.device)
        for i in range(d):  # e_i^T (dD/dx) e_i, one unit vector per dimension
            unit = torch.zeros_like(x_in).flatten(1)
            unit[:, i] = 1
            (vjp,) = torch.autograd.grad(denoised, x_in, unit.reshape(shape), retain_graph=i < d - 1)
            trace += vjp.flatten(1)[:, i]
        return trace

    def velocity(s, state):  # state = [x flattened, integral]; returns [v, div v]
        nonlocal nfe
        nfe += 1
        sigma = math.exp(s)
        with torch.enable_grad():
            x_in = state[:, :d].reshape(shape).detach().requires_grad_(True)
            denoised = net(x_in, torch.as_tensor(sigma, dtype=torch.float64), class_labels).to(torch.float64)
            divergence = d - trace_of_jacobian(x_in, denoised)
        v = (x_in - denoised).detach().flatten(1)
        return torch.cat([v, divergence.detach()[:, None]], dim=1)

    state = torch.cat([x.flatten(1), torch.zeros([shape[0], 1], dtype=torch.float64, device=x.device)], dim=1)
    state, _stats = dopri5(velocity, state, math.log(sigma_min), math.log(sigma_max), rtol=rtol, atol=atol)
    x_end, delta_logp = state[:, :d].reshape(shape), state[:, d]
    prior_logp = gaussian_log_density(x_end, sigma_max)
    return Likelihood(prior_logp + delta_logp, prior_logp, delta_logp, nfe)


def dequantize(images: torch.Tensor, rand_like=torch.rand_like) -> torch.Tensor:
    """uint8 images -> float64 in [-1, 1] with uniform noise over each pixel's bin (None: bin centres)."""
    x = images.to(torch.float64) / 127.5 - 1
    if rand_like is None:
        return x
    return x + (rand_like(x) - 0.5) / 127.5


def bits_per_dim(log_density: torch.Tensor, num_dims: int) -> torch.Tensor:
    """NLL of 8-bit data in bits per dimension from the log density of its dequantised version in [-1, 1]:
    (-log p / d + ln 127.5) / ln 2 (the bin volume (1/127.5)^d turns a density into a probability)."""
    return (-log_density / num_dims + math.log(127.5)) / math.log(2)


def nll_bits_per_dim(net, images: torch.Tensor, class_labels=None, dequantization: bool = True,
                     rand_like=torch.rand_like, randn_like=torch.randn_like, **kwargs) -> tuple[torch.Tensor, int]:
    """Per-image negative log-likelihood (bits/dim) of uint8 images [B,C,H,W]: uniform dequantisation (or bin
    centres without it), log_likelihood(**kwargs), the discretisation correction. Returns (bpd [B], nfe)."""
    x = dequantize(images, rand_like if dequantization else None)
    result = log_likelihood(net, x, class_labels, randn_like=randn_like, **kwargs)
    return bits_per_dim(result.log_density, x[0].numel()), result.nfe
