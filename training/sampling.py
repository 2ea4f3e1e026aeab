"""The sampler library: time steps, noise schedules, samplers, guidance, per-seed random numbers, batched
generation.

The paper's samplers (`edm_sampler`: Algorithm 2; `ablation_sampler`: Table 1), k-diffusion's collection
(`euler_ancestral`, `dpm_2`, `lms`, `dpmpp_2s_ancestral`, `dpmpp_2m`, `dpmpp_2m_sde`, `dpmpp_3m_sde`) and
UniPC (`unipc`). Every sampler has the signature

    fn(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
       sigma_max=80, rho=7, **its_options, sigmas=None) -> float64 images

and is registered in `SAMPLERS`. `sigmas` (N + 1 noise levels ending with 0) replaces the default EDM time
steps (`sampling_sigmas`). `net` is anything with the denoiser interface (`net(x, sigma, class_labels)`,
`round_sigma`, `sigma_min`, `sigma_max`, `img_resolution`, `img_channels`, `label_dim`); guidance is such a
denoiser (`guided_denoiser`), built once by the caller. `edm_sampler` alone also takes EDM2's `gnet`,
`guidance`. Noise comes only from `randn_like` (one generator per seed: images do not depend on the batch).
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

import dnnlib
from training.networks import iddpm_u, vp_sigma, vp_sigma_deriv, vp_sigma_inv  # Table 1 schedules, shared
from training.iddpm import iddpm_ddim_sampler, iddpm_sampler  # discrete-time iDDPM (respaced, DDIM)
from training.sde import pc_sampler  # Song et al. 2021's predictor-corrector sampler (training/sde.py)

# ----------------------------------------------------------------------------
# Time step discretisations (Table 1, "time steps"): small pure functions returning the float64
# noise levels sigma_0 > ... > sigma_{N-1} (sigma_N = 0 is appended by the samplers).


def step_fraction(num_steps: int, device=None) -> torch.Tensor:
    """i/(N-1) for i = 0..N-1. For N=1 this is [0] (start at sigma_max), not the 0/0 = NaN of the
    plain formula, so that a single step is one Euler step from sigma_max to 0."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return i / (num_steps - 1) if num_steps > 1 else i


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                    device=None) -> torch.Tensor:
    """EDM (Eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    f = step_fraction(num_steps, device)
    return (sigma_max ** (1 / rho) + f * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_time_steps(num_steps: int, epsilon_s: float = 1e-3, device=None) -> torch.Tensor:
    """VP (Song et al. 2021): t_i = 1 + i/(N-1) (epsilon_s - 1), uniform in t from 1 down to epsilon_s."""
    return 1 + step_fraction(num_steps, device) * (epsilon_s - 1)


def ve_sigma_steps(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100, device=None) -> torch.Tensor:
    """VE (Song et al. 2021): t_i = sigma_max^2 (sigma_min^2/sigma_max^2)^(i/(N-1)) with sigma(t) = sqrt(t),
    i.e. noise levels spaced geometrically."""
    t = sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** step_fraction(num_steps, device)
    return t.sqrt()


def iddpm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 81, M: int = 1000,
                      C_1: float = 0.001, C_2: float = 0.008, device=None) -> torch.Tensor:
    """iDDPM/DDIM: N of the u_j inside [sigma_min, sigma_max], picked at evenly spaced indices.
    (The default sigma_max=81 makes the first one u_8 = 80.2, i.e. j_0 = 8 as in the paper.)
    Indices are rounded half-to-even like torch.round, matching the public implementation."""
    u = iddpm_u(M, C_1, C_2, dtype=torch.float64, device=device)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    if len(u) == 0:
        raise ValueError(f'no iDDPM noise level inside [sigma_min={sigma_min}, sigma_max={sigma_max}]')
    index = ((len(u) - 1) * step_fraction(num_steps, device)).round().to(torch.int64)
    return u[index]


# ----------------------------------------------------------------------------
# Noise schedules sigma(t) and scalings s(t) (Table 1). All functions take and return float64 tensors.


def vp_betas(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) such that vp_sigma(epsilon_s) = sigma_min and vp_sigma(1) = sigma_max; the VP
    discretisation/schedule then spans exactly the requested noise range."""
    log_min, log_max = math.log(sigma_min ** 2 + 1), math.log(sigma_max ** 2 + 1)
    beta_d = 2 * (log_min / epsilon_s - log_max) / (epsilon_s - 1)
    beta_min = log_max - 0.5 * beta_d
    return beta_d, beta_min


class Schedule(NamedTuple):
    """sigma(t), its derivative and inverse; s(t) and its derivative."""
    sigma: Callable
    sigma_deriv: Callable
    sigma_inv: Callable
    s: Callable
    s_deriv: Callable


def make_schedule(schedule: str, scaling: str, beta_d: float = 19.9, beta_min: float = 0.1) -> Schedule:
    if schedule == 'vp':
        sigma = lambda t: vp_sigma(t, beta_d, beta_min)
        sigma_deriv = lambda t: vp_sigma_deriv(t, beta_d, beta_min)
        sigma_inv = lambda x: vp_sigma_inv(x, beta_d, beta_min)
    elif schedule == 've':  # sigma(t) = sqrt(t)
        sigma = lambda t: torch.as_tensor(t, dtype=torch.float64).sqrt()
        sigma_deriv = lambda t: 0.5 / torch.as_tensor(t, dtype=torch.float64).sqrt()
        sigma_inv = lambda x: torch.as_tensor(x, dtype=torch.float64) ** 2
    elif schedule == 'linear':  # sigma(t) = t (EDM)
        sigma = lambda t: torch.as_tensor(t, dtype=torch.float64)
        sigma_deriv = lambda t: torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
        sigma_inv = lambda x: torch.as_tensor(x, dtype=torch.float64)
    else:
        raise ValueError(f'unknown schedule {schedule!r}; expected vp|ve|linear')

    if scaling == 'vp':  # s(t) = 1/sqrt(1 + sigma(t)^2), so that s(t) x has unit-ish variance
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3
    elif scaling == 'none':
        s = lambda t: torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
        s_deriv = lambda t: torch.zeros_like(torch.as_tensor(t, dtype=torch.float64))
    else:
        raise ValueError(f'unknown scaling {scaling!r}; expected vp|none')
    return Schedule(sigma, sigma_deriv, sigma_inv, s, s_deriv)


def churn_gamma(sigma, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """gamma_i = min(S_churn/N, sqrt(2)-1) for S_min <= sigma_i <= S_max, else 0 (Algorithm 2)."""
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(sigma) <= S_max else 0.0


def _noise_range(net, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Clamp the requested noise range to what the network supports."""
    return max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max))


# ----------------------------------------------------------------------------
# Guidance: a denoiser built from two (Ho & Salimans 2022 classifier-free guidance; Karras et al. 2024
# autoguidance; Kynkaeanniemi et al. 2024 guidance interval). It has the denoiser interface, so every
# sampler guides every one of its network evaluations without knowing about guidance.


def guidance_applies(sigma, guidance_interval) -> torch.Tensor:
    """True where sigma lies in the closed interval [sigma_lo, sigma_hi] (always, for None)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if guidance_interval is None:
        return torch.ones_like(sigma, dtype=torch.bool)
    lo, hi = guidance_interval
    return (sigma >= lo) & (sigma <= hi)


class GuidedDenoiser:
    """D_guided(x, sigma) = D_g(x, sigma) + w (D(x, sigma) - D_g(x, sigma))  (EDM2: gnet(x).lerp(net(x), w)),
    with the denoiser interface of `net` (img_resolution, sigma_min, round_sigma, ... come from it).

    `gnet` is the guide: autoguidance uses a smaller or shorter-trained model, classifier-free guidance an
    unconditional model or `UnconditionalDenoiser(net)`. w = guidance = 1 is the plain network. The guide is
    not evaluated at w = 1, nor for sigma outside `guidance_interval` = (sigma_lo, sigma_hi), where the
    output is the plain network's. The blend is computed in float64 (w > 1 extrapolates, which magnifies
    float32 rounding)."""

    def __init__(self, net, gnet, guidance: float = 1, guidance_interval: tuple[float, float] | None = None):
        if guidance_interval is not None and not guidance_interval[0] <= guidance_interval[1]:
            raise ValueError(f'guidance_interval {tuple(guidance_interval)} must be (sigma_lo, sigma_hi) '
                             'with sigma_lo <= sigma_hi')
        self.net, self.gnet, self.guidance = net, gnet, float(guidance)
        self.guidance_interval = None if guidance_interval is None else tuple(map(float, guidance_interval))

    def __getattr__(self, name):
        if name in ('net', 'gnet', 'guidance', 'guidance_interval'):
            raise AttributeError(name)
        return getattr(self.net, name)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        denoised = self.net(x, sigma, class_labels, **kwargs)
        inside = guidance_applies(sigma, self.guidance_interval)
        if self.guidance == 1 or not bool(inside.any()):
            return denoised
        guide_labels = class_labels if _takes_labels(self.gnet) else None  # an unconditional guide gets none
        guide = self.gnet(x, sigma, guide_labels, **kwargs).to(torch.float64)
        w = self.guidance
        if inside.ndim:  # per-sample sigmas: weight 1 (exactly d, see torch.lerp) outside the interval
            w = torch.where(inside, w, 1.0).to(torch.float64).reshape(-1, *[1] * (x.ndim - 1))
        return guide.lerp(denoised.to(torch.float64), w)


class UnconditionalDenoiser:
    """The same network with its class labels zeroed: the unconditional model that label dropout
    (`label_dropout` > 0 in training) teaches a conditional network, i.e. the guide of classifier-free
    guidance without a second network."""

    def __init__(self, net):
        self.net = net

    def __getattr__(self, name):
        if name == 'net':
            raise AttributeError(name)
        return getattr(self.net, name)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        if class_labels is not None:
            class_labels = torch.zeros_like(class_labels)
        return self.net(x, sigma, class_labels, **kwargs)


def _takes_labels(denoiser) -> bool:
    """Whether a denoiser is class-conditional (one without `label_dim` is given the labels, as before)."""
    return int(getattr(denoiser, 'label_dim', 1)) != 0


def check_guide(net, gnet, source: str = 'the guiding network') -> None:
    """Raise ValueError unless `gnet` can guide `net`: callable, same image shape, and either the same class
    labels or none (an unconditional guide: CFG with a separately trained model, as in EDM2)."""
    missing = [a for a in ('img_resolution', 'img_channels', 'label_dim') if not hasattr(gnet, a)]
    if missing or not callable(gnet):
        raise ValueError(f'{source} is not a denoiser (missing {", ".join(missing) or "__call__"})')
    for attr in ('img_resolution', 'img_channels'):
        if int(getattr(gnet, attr)) != int(getattr(net, attr)):
            raise ValueError(f'{source} has {attr}={int(getattr(gnet, attr))} but the network has '
                             f'{int(getattr(net, attr))}; a guide must produce the same images')
    if int(gnet.label_dim) not in (0, int(net.label_dim)):
        raise ValueError(f'{source} has label_dim={int(gnet.label_dim)} but the network has {int(net.label_dim)}; '
                         f'a guide takes the same class labels or none (an unconditional model)')


def check_guidance(has_gnet: bool, guidance: float = 1, cfg: bool = False,
                   guidance_interval: tuple[float, float] | None = None, label_dim: int | None = None,
                   spell: Callable[[str], str] = str) -> None:
    """The one check of a guidance setting (library and CLIs): raise ValueError unless it is consistent.
    `label_dim` (the network's, when known) is checked for cfg; `spell` names an argument in the message
    (the CLIs pass their option spelling, e.g. 'gnet' -> '--gnet')."""
    if cfg and has_gnet:
        raise ValueError(f'classifier-free guidance ({spell("cfg")}) uses the network itself as the guide; '
                         f'do not also give {spell("gnet")}')
    if cfg and label_dim is not None and not int(label_dim):
        raise ValueError(f'classifier-free guidance ({spell("cfg")}) needs a class-conditional network; this one '
                         f'has no class labels')
    if not has_gnet and not cfg and (guidance != 1 or guidance_interval is not None):
        raise ValueError(f'{spell("guidance")} and {spell("guidance_interval")} need a guide: a second network '
                         f'({spell("gnet")}) or {spell("cfg")}')


def guided_denoiser(net, gnet=None, guidance: float = 1, cfg: bool = False,
                    guidance_interval: tuple[float, float] | None = None):
    """The denoiser to sample with: `net` itself when there is no guide (so the paper's numbers stay bit for
    bit), else `net` guided by `gnet` (autoguidance, or CFG with an unconditional model) or by itself without
    labels (`cfg`), with weight `guidance`, for sigma in `guidance_interval` only. Every sampler passes its
    `gnet`, `guidance` keywords (EDM2's names) through here; generate_images passes all five. This is
    where guidance is checked, and the one place a guided denoiser is built."""
    check_guidance(gnet is not None, guidance, cfg, guidance_interval, label_dim=net.label_dim)
    if cfg:
        gnet = UnconditionalDenoiser(net)
    elif gnet is None:
        return net
    else:
        check_guide(net, gnet)
    return GuidedDenoiser(net, gnet, guidance, guidance_interval)


# ----------------------------------------------------------------------------
# Samplers.


def sampling_sigmas(net, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                    device=None) -> torch.Tensor:
    """The EDM time steps every sampler here walks: sigma_0 > ... > sigma_{N-1} of Eq. 5 inside the
    network's noise range, snapped by net.round_sigma, then sigma_N = 0 (float64, N+1 values)."""
    sigma_min, sigma_max = _noise_range(net, sigma_min, sigma_max)
    t_steps = net.round_sigma(edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device))
    t_steps = torch.as_tensor(t_steps, dtype=torch.float64)
    return torch.cat([t_steps, t_steps.new_zeros(1)])  # t_N = 0


def check_sigmas(sigmas) -> torch.Tensor:
    """A sampler's `sigmas` argument (k-diffusion's convention): sigma_0 > ... > sigma_{N-1} > sigma_N = 0,
    N >= 1, finite. Returned as float64; raises ValueError with a one-line reason."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'sigmas must be a 1-D list of at least 2 noise levels ending with 0, '
                         f'got shape {list(sigmas.shape)}')
    if not bool(torch.isfinite(sigmas).all()) or sigmas[-1] != 0 or not bool((sigmas[:-1] > 0).all()) \
            or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f'sigmas must be finite, strictly decreasing and end with exactly one 0, '
                         f'got {sigmas.tolist()}')
    return sigmas


def noise_levels(net, sigmas, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                 device=None) -> torch.Tensor:
    """The noise levels a sampler walks: `sigmas` as given (checked; not clamped or rounded), or by default
    the EDM time steps of `sampling_sigmas`, bit for bit what the samplers walked before `sigmas` existed."""
    if sigmas is None:
        return sampling_sigmas(net, num_steps, sigma_min, sigma_max, rho, device=device)
    return check_sigmas(sigmas).to(device)


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
                gnet=None, guidance=1, sigmas=None):
    """The paper's sampler (Algorithm 2; Algorithm 1 when S_churn=0). Returns float64 images.

    Network evaluations: 2N-1 (Heun on every step except the last, which is an Euler step to sigma=0).
    `gnet`, `guidance`: EDM2's API for guidance (the only sampler that takes them; see `guided_denoiser`);
    off by default, leaving the paper's numbers. `sigmas`: noise levels to walk instead of Eq. 5's (N + 1
    values ending with 0; num_steps, sigma_min, sigma_max, rho are then unused).
    """
    net = guided_denoiser(net, gnet, guidance)
    t_steps = noise_levels(net, sigmas, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    num_steps = len(t_steps) - 1
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # i = 0..N-1
        x_cur = x_next

        # Increase noise temporarily. Noise is drawn on every step whenever churn is on (even when
        # gamma_i = 0) so the per-seed generators advance exactly as in the reference protocol.
        gamma = churn_gamma(t_cur, num_steps, S_churn, S_min, S_max)
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)
        x_hat = x_cur
        if S_churn > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).clamp(min=0).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # 2nd-order correction (not on the last step: t_next = 0 would divide by zero).
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def ablation_sigma_steps(discretization: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7,
                         epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                         device=None) -> torch.Tensor:
    """Noise levels sigma_0..sigma_{N-1} of the chosen discretisation (before net.round_sigma)."""
    if discretization == 'vp':
        beta_d, beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)
        return vp_sigma(vp_time_steps(num_steps, epsilon_s, device), beta_d, beta_min)
    if discretization == 've':
        return ve_sigma_steps(num_steps, sigma_min, sigma_max, device)
    if discretization == 'iddpm':
        return iddpm_sigma_steps(num_steps, sigma_min, sigma_max, M, C_1, C_2, device)
    if discretization == 'edm':
        return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device)
    raise ValueError(f'unknown discretization {discretization!r}; expected vp|ve|iddpm|edm')


# Default noise ranges per discretisation (Table 1); VP's follow from beta_d=19.9, beta_min=0.1, t in [eps_s, 1].
def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    return {
        'vp': (float(vp_sigma(epsilon_s)), float(vp_sigma(1))),
        've': (0.02, 100.0),
        'iddpm': (0.002, 81.0),
        'edm': (0.002, 80.0),
    }[discretization]


def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                     sigma_min=None, sigma_max=None, rho=7, solver='heun', discretization='edm',
                     schedule='linear', scaling='none', epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1,
                     S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, sigmas=None):
    """Generalised sampler of Table 1. Integrates the ODE (Eq. 4)
        dx/dt = [sigma'(t)/sigma(t) + s'(t)/s(t)] x - sigma'(t) s(t)/sigma(t) D(x/s(t); sigma(t))
    with Euler or 2nd-order Runge-Kutta (alpha=1: Heun), plus Algorithm 2's churn. Returns float64 images.
    `sigmas` (N + 1 noise levels ending with 0) replaces the discretisation; the VP schedule is then fitted
    to [sigma_{N-1}, sigma_0].
    """
    if solver not in ('euler', 'heun'):
        raise ValueError(f'unknown solver {solver!r}; expected euler|heun')
    if discretization not in ('vp', 've', 'iddpm', 'edm'):
        raise ValueError(f'unknown discretization {discretization!r}; expected vp|ve|iddpm|edm')
    if schedule not in ('vp', 've', 'linear'):
        raise ValueError(f'unknown schedule {schedule!r}; expected vp|ve|linear')
    if scaling not in ('vp', 'none'):
        raise ValueError(f'unknown scaling {scaling!r}; expected vp|none')

    if sigmas is not None:
        sigmas = check_sigmas(sigmas).to(latents.device)
        sigma_min, sigma_max, num_steps = float(sigmas[-2]), float(sigmas[0]), len(sigmas) - 1
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min, sigma_max = _noise_range(net, default_min if sigma_min is None else sigma_min,
                                        default_max if sigma_max is None else sigma_max)

    # The VP schedule is re-fitted to the (clamped) noise range.
    beta_d, beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)
    sigma, sigma_deriv, sigma_inv, s, s_deriv = make_schedule(schedule, scaling, beta_d, beta_min)

    if sigmas is None:
        sigma_steps = net.round_sigma(ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho,
                                                           epsilon_s, C_1, C_2, M, device=latents.device))
    else:
        sigma_steps = sigmas[:-1]
    t_steps = sigma_inv(sigma_steps).to(torch.float64)
    t_steps = torch.cat([t_steps, t_steps.new_zeros(1)])  # t_N = 0

    def ode_slope(x, t):  # dx/dt at (x, t); one network evaluation
        denoised = net(x / s(t), sigma(t), class_labels).to(torch.float64)
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # i = 0..N-1
        x_cur = x_next

        # Increase noise temporarily (drawn every step when churn is on; see edm_sampler).
        gamma = churn_gamma(sigma(t_cur), num_steps, S_churn, S_min, S_max)
        t_hat = sigma_inv(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = s(t_hat) / s(t_cur) * x_cur
        if S_churn > 0:
            x_hat = x_hat + ((sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clamp(min=0).sqrt() * s(t_hat) * S_noise
                             * randn_like(x_cur))

        # Euler step.
        h = t_next - t_hat
        d_cur = ode_slope(x_hat, t_hat)
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:  # 2nd-order Runge-Kutta: evaluate at t_hat + alpha h, then blend the slopes.
            x_prime, t_prime = x_hat + alpha * h * d_cur, t_hat + alpha * h
            d_prime = ode_slope(x_prime, t_prime)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


# ----------------------------------------------------------------------------
# Samplers beyond the paper, as collected in k-diffusion (Crowson): ancestral sampling, DPM-Solver-2,
# linear multistep, and DPM-Solver++ (Lu et al. 2022) with its SDE variants. All walk `sigmas` (default: the
# EDM time steps) in float64 and draw noise with `randn_like` once per step that ends above sigma = 0.
# The exponential integrators work in lambda = -ln(sigma) (log signal-to-noise ratio for s(t) = 1), where
# the probability-flow ODE in data prediction is dx/dlambda = D - x, exactly solvable for constant D.


def ode_derivative(x, sigma, denoised):
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE for sigma(t) = t, s(t) = 1 (Eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma, sigma_next, eta: float = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next: deterministic to sigma_down, then
    fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is DDPM's posterior
    variance sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, eta = 0 the ODE."""
    sigma, sigma_next = torch.as_tensor(sigma, dtype=torch.float64), torch.as_tensor(sigma_next, dtype=torch.float64)
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).sqrt())
    return (sigma_next ** 2 - sigma_up ** 2).sqrt(), sigma_up


def _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho):
    """What every sampler below starts from: the denoiser D(x; sigma) in float64, the noise levels
    (`sigmas`, or the EDM time steps; sigma_N = 0), and x_0 = latents * sigma_0 in float64."""
    sigmas = noise_levels(net, sigmas, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    denoise = lambda x, sigma: net(x, sigma, class_labels).to(torch.float64)  # noqa: E731
    return denoise, sigmas, latents.to(torch.float64) * sigmas[0]


def _check_eta(eta: float, s_noise: float) -> None:
    if eta < 0 or s_noise < 0:
        raise ValueError(f'eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}')


def euler_ancestral_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                            sigma_min=0.002, sigma_max=80, rho=7, eta=1, s_noise=1, sigmas=None):
    """Euler steps down to sigma_down, then noise up to sigma_next (ancestral sampling). NFE = N."""
    _check_eta(eta, s_noise)
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * ode_derivative(x, sigma, denoise(x, sigma))
        if sigma_next > 0:
            x = x + randn_like(x) * s_noise * sigma_up
    return x


def dpm_2_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                  sigma_min=0.002, sigma_max=80, rho=7, sigmas=None):
    """DPM-Solver-2 in sigma (Karras et al. 2022, Eq. 4 with the midpoint at the geometric mean
    sigma_mid = sqrt(sigma sigma_next)): 2nd order; Euler on the last step. NFE = 2N - 1."""
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = ode_derivative(x, sigma, denoise(x, sigma))
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * d
            continue
        sigma_mid = (sigma.log() + 0.5 * (sigma_next.log() - sigma.log())).exp()
        x_mid = x + (sigma_mid - sigma) * d
        x = x + (sigma_next - sigma) * ode_derivative(x_mid, sigma_mid, denoise(x_mid, sigma_mid))
    return x


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """Linear multistep weights for the step sigma_i -> sigma_{i+1}: c_j = integral over [sigma_i, sigma_{i+1}]
    of the Lagrange basis polynomial of node sigma_{i-j} on the nodes sigma_i, ..., sigma_{i-order+1}
    (so x_{i+1} = x_i + sum_j c_j d_{i-j}). The integrand has degree order-1, so Gauss-Legendre with
    `order` nodes integrates it exactly."""
    t = [float(s) for s in sigmas]
    nodes = [t[i - k] for k in range(order)]
    gauss_x, gauss_w = np.polynomial.legendre.leggauss(order)
    half, mid = (t[i + 1] - t[i]) / 2, (t[i + 1] + t[i]) / 2
    taus = mid + half * gauss_x
    coeffs = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis *= (taus - nodes[k]) / (nodes[j] - nodes[k])
        coeffs.append(float(half * np.dot(gauss_w, basis)))
    return coeffs


def lms_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                sigma_min=0.002, sigma_max=80, rho=7, order=4, sigmas=None):
    """Linear multistep (Adams-Bashforth on the non-uniform sigma grid) of the given order, starting with
    lower orders while the history fills. NFE = N."""
    if order < 1:
        raise ValueError(f'order must be >= 1, got {order}')
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    history = []  # d_i, d_{i-1}, ... (newest first)
    for i, sigma in enumerate(sigmas[:-1]):
        history = [ode_derivative(x, sigma, denoise(x, sigma))] + history[:order - 1]
        coeffs = lms_coefficients(sigmas, i, len(history))
        x = x + sum(c * d for c, d in zip(coeffs, history))
    return x


def lambda_of(sigma):
    """lambda = -ln(sigma), the half log-SNR DPM-Solver steps in (s(t) = 1)."""
    return -torch.as_tensor(sigma, dtype=torch.float64).log()


def dpmpp_2s_ancestral_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                               sigma_min=0.002, sigma_max=80, rho=7, eta=1, s_noise=1, sigmas=None):
    """DPM-Solver++(2S) single-step 2nd order to sigma_down, with the intermediate point halfway in lambda,
    then ancestral noise up to sigma_next; an Euler step where sigma_down = 0. NFE = 2N - 1."""
    _check_eta(eta, s_noise)
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (sigma_down - sigma) * ode_derivative(x, sigma, denoised)
        else:
            h = lambda_of(sigma_down) - lambda_of(sigma)
            sigma_mid = (-(lambda_of(sigma) + h / 2)).exp()
            x_mid = (sigma_mid / sigma) * x - torch.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - torch.expm1(-h) * denoise(x_mid, sigma_mid)
        if sigma_next > 0:
            x = x + randn_like(x) * s_noise * sigma_up
    return x


def dpmpp_2m_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                     sigma_min=0.002, sigma_max=80, rho=7, sigmas=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, variable steps): the exact solution of dx/dlambda = D - x
    with D extrapolated linearly in lambda from the last two evaluations; 1st order on the first step and
    to sigma = 0 (which lands on D). NFE = N."""
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    denoised_prev = h_prev = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
            break
        h = lambda_of(sigma_next) - lambda_of(sigma)
        d = denoised
        if denoised_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        denoised_prev, h_prev = denoised, h
    return x


def dpmpp_2m_sde_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                         sigma_min=0.002, sigma_max=80, rho=7, eta=1, s_noise=1, solver_type='midpoint',
                         sigmas=None):
    """DPM-Solver++(2M) SDE: the 2M step of the SDE whose noise is eta times the ancestral one; per step
    x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + 2nd-order history term
       + sigma' sqrt(1 - e^{-2 eta h}) s_noise eps,
    the history term by the 'midpoint' or 'heun' rule. eta = 0 is the ODE ('midpoint': exactly 2M). NFE = N."""
    _check_eta(eta, s_noise)
    if solver_type not in ('midpoint', 'heun'):
        raise ValueError(f'unknown solver_type {solver_type!r}; expected midpoint|heun')
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    denoised_prev = h_prev = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
            break
        h = lambda_of(sigma_next) - lambda_of(sigma)
        eta_h = eta * h
        phi_1 = -torch.expm1(-h - eta_h)  # 1 - e^{-(1+eta) h}
        x = (sigma_next / sigma) * (-eta_h).exp() * x + phi_1 * denoised
        if denoised_prev is not None:
            r = h_prev / h
            slope = (denoised - denoised_prev) / r  # h dD/dlambda, estimated
            if solver_type == 'heun':
                x = x + (phi_1 / (-h - eta_h) + 1) * slope
            else:
                x = x + 0.5 * phi_1 * slope
        if eta:
            x = x + randn_like(x) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        denoised_prev, h_prev = denoised, h
    return x


def dpmpp_3m_sde_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                         sigma_min=0.002, sigma_max=80, rho=7, eta=1, s_noise=1, sigmas=None):
    """DPM-Solver++(3M) SDE: as dpmpp_2m_sde with D extrapolated quadratically in lambda from the last three
    evaluations (phi_2, phi_3 of the exponential integrator at step h (1 + eta)); 1st and 2nd order while
    the history fills. NFE = N.

    Order: d2 below estimates h^2 D''/2, while the exact integral of the quadratic term is -phi_3 h^2 D''
    (= -2 phi_3 d2). We keep k-diffusion's weight -phi_3 d2 (the goldens hold its outputs), so the ODE solver
    (eta = 0) is only 2nd order as N grows (tests/test_samplers_kdiffusion.py: error ratios -> 4 per doubling; with
    2 phi_3 they reach 8), though with a smaller error than dpmpp_2m."""
    _check_eta(eta, s_noise)
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    history = []  # (D, h) of the previous steps, newest first
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
            break
        h = lambda_of(sigma_next) - lambda_of(sigma)
        h_eta = h * (eta + 1)
        x = (-h_eta).exp() * x - torch.expm1(-h_eta) * denoised
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        if len(history) >= 2:
            (denoised_1, h_1), (denoised_2, h_2) = history[:2]
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif history:
            denoised_1, h_1 = history[0]
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = x + randn_like(x) * sigma_next * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
        history = [(denoised, h)] + history[:1]
    return x


def unipc_coefficients(r: Sequence[float], h: float) -> list[float]:
    """UniPC's weights rho_1..rho_K (Zhao et al. 2023, B(h) = e^{-h} - 1, "bh2") for the normalised differences
    (D_{r_m} - D) / r_m at lambda + r_m h: the solution of sum_m rho_m r_m^(k-1) = -k! h phi_{k+1}(h) / B(h),
    k = 1..K, which makes B(h) sum_m rho_m (D_{r_m} - D)/r_m match the exponential integrator's Taylor terms
    int_0^h e^{-(h - tau)} D^(k) tau^k / k! dtau = h^{k+1} phi_{k+1}(h) D^(k) up to k = K."""
    h = float(h)
    rhs, g, factorial = [], math.expm1(-h) / -h - 1, 1.0  # g_k = -h phi_{k+1}(h), from g_1 = -h phi_2(h)
    for k in range(1, len(r) + 1):
        rhs.append(g * factorial / math.expm1(-h))
        factorial *= k + 1
        g = -g / h - 1 / factorial
    R = np.array([[float(r_m) ** (k - 1) for r_m in r] for k in range(1, len(r) + 1)])
    return np.linalg.solve(R, np.array(rhs)).tolist()


def unipc_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18,
                  sigma_min=0.002, sigma_max=80, rho=7, order=2, sigmas=None):
    """UniPC (Zhao et al. 2023), multistep, data prediction, B(h) = e^{-h} - 1 ("bh2"): each step predicts with
    UniP-p (the exponential integrator plus p-1 history differences), evaluates D there, and corrects with
    UniC-p (adding the new difference), which lifts the order from p to p + 1 at no extra evaluation; the
    history keeps the evaluations at the predicted points. Lower orders while the history fills; the output
    is D at the last predicted point (sigma_{N-1}). Global order p + 1 (tests: error ratios 4, 8, 16 per
    doubling for order = 1, 2, 3). NFE = N."""
    if order not in (1, 2, 3):
        raise ValueError(f'UniPC order must be 1, 2 or 3, got {order}')
    denoise, sigmas, x = _start(net, latents, class_labels, sigmas, num_steps, sigma_min, sigma_max, rho)
    history = [(lambda_of(sigmas[0]), denoise(x, sigmas[0]))]  # (lambda, D), oldest first
    for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):  # the step to sigma = 0 is D itself
        lam, denoised = history[-1]
        h = lambda_of(sigma_next) - lam
        earlier = history[-2::-1][:order - 1]  # the p - 1 evaluations before this one, newest first
        r = [float((lam_m - lam) / h) for lam_m, _ in earlier]  # negative: they lie behind
        differences = [(d_m - denoised) / r_m for (_, d_m), r_m in zip(earlier, r)]
        x_base = (sigma_next / sigma) * x - torch.expm1(-h) * denoised  # DPM-Solver++(1) = DDIM
        x_pred = x_base
        if earlier:
            x_pred = x_base - torch.expm1(-h) * sum(c * d for c, d in zip(unipc_coefficients(r, h), differences))
        denoised_next = denoise(x_pred, sigma_next)
        rho_c = unipc_coefficients(r + [1.0], h)
        x = x_base - torch.expm1(-h) * (sum(c * d for c, d in zip(rho_c, differences))
                                        + rho_c[-1] * (denoised_next - denoised))
        history = (history + [(lambda_of(sigma_next), denoised_next)])[-order:]
    return history[-1][1]


# ----------------------------------------------------------------------------
# Random numbers and seeds.


MAX_SEED = (1 << 32) - 1  # generators are seeded with seed % 2**32: a larger seed would repeat an image
MAX_SEEDS = 10_000_000    # per command; 200x the 50k images of an FID run, and a list that still fits in memory


def parse_seeds(s) -> list[int]:
    """A seed list as generate.py and fid.py take it ('0-63', '1,2,5-10'): seeds in 0..MAX_SEED, at most
    MAX_SEEDS of them (checked before ranges are expanded). Raises ValueError with a one-line reason."""
    return dnnlib.util.parse_int_list(s, min_value=0, max_value=MAX_SEED, max_count=MAX_SEEDS)


class StackedRandomGenerator:
    """One torch.Generator per sample (seeded with seed % 2**32), so that every image depends only on its
    own seed, whatever the batch size or the number of processes. A drop-in for torch.randn etc."""

    def __init__(self, device, seeds: Sequence[int]):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check(self, size):
        size = list(size)
        if not size or size[0] != len(self.generators):
            raise ValueError(f'leading dimension must equal the number of seeds ({len(self.generators)}), got {size}')
        return size

    def randn(self, size, **kwargs) -> torch.Tensor:
        size = self._check(size)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def rand_like(self, input: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) numbers, one generator per sample (e.g. dequantisation noise in training.likelihood)."""
        size = self._check(input.shape)
        return torch.stack([torch.rand(size[1:], generator=gen, dtype=input.dtype, device=input.device)
                            for gen in self.generators])

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        size = self._check(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


# ----------------------------------------------------------------------------
# The registry and the denoiser interface.

SAMPLERS: dict[str, Callable] = {
    'edm': edm_sampler,
    'ablation': ablation_sampler,
    'euler_ancestral': euler_ancestral_sampler,
    'dpm_2': dpm_2_sampler,
    'lms': lms_sampler,
    'dpmpp_2s_ancestral': dpmpp_2s_ancestral_sampler,
    'dpmpp_2m': dpmpp_2m_sampler,
    'dpmpp_2m_sde': dpmpp_2m_sde_sampler,
    'dpmpp_3m_sde': dpmpp_3m_sde_sampler,
    'unipc': unipc_sampler,
    'iddpm': iddpm_sampler,
    'iddpm_ddim': iddpm_ddim_sampler,
    'pc': pc_sampler,
}

# The options that select the ablation sampler when no sampler is named (the paper's generate.py rule).
ABLATION_KWARGS = ('solver', 'discretization', 'schedule', 'scaling')

# Every sampler's inputs (`sigmas`: optional noise levels, a tensor rather than an option), and edm_sampler's
# EDM2 guidance keywords: not options of one sampler (generate_images takes guidance as its own arguments and
# hands the sampler a guided denoiser).
SAMPLER_INPUTS = ('net', 'latents', 'class_labels', 'randn_like', 'sigmas')
GUIDANCE_KWARGS = ('gnet', 'guidance')

DENOISER_ATTRIBUTES = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'round_sigma')


def sampler_options_of(name: str) -> tuple[str, ...]:
    """The keyword options sampler `name` takes besides its inputs and the guidance keywords."""
    if name not in SAMPLERS:
        raise ValueError(f'unknown sampler {name!r}; expected one of {", ".join(SAMPLERS)}')
    params = inspect.signature(SAMPLERS[name]).parameters
    return tuple(p for p in params if p not in SAMPLER_INPUTS + GUIDANCE_KWARGS)


def resolve_sampler(name: str | None, sampler_kwargs: dict) -> tuple[str, dict]:
    """(sampler name, its kwargs) from a name (None: 'ablation' if an ablation option is set, else 'edm',
    as in the paper's generate.py) and options where None means "not given". Options the sampler does not
    take are an error, so a typo or a wrong sampler never silently falls back to defaults."""
    given = {k: v for k, v in sampler_kwargs.items() if v is not None}
    if name is None:
        name = 'ablation' if any(k in given for k in ABLATION_KWARGS) else 'edm'
    accepted = sampler_options_of(name)
    unknown = sorted(set(given) - set(accepted))
    if unknown:  # TypeError, as for any unexpected keyword argument
        raise TypeError(f'sampler {name!r} does not take {", ".join(unknown)}; it takes {", ".join(accepted)}')
    return name, given


# Sampler-spec names that are not registry names: the paper's two ODE solvers on the EDM time steps.
SAMPLER_ALIASES = {
    'heun': ('edm', {}),                         # Algorithm 1: Heun, NFE = 2N - 1
    'euler': ('ablation', {'solver': 'euler'}),  # Algorithm 1 with Euler steps (sigma(t) = t, s(t) = 1), NFE = N
}


def _typed_like(default, value: str):
    """A spec's value string as the type of the option's default (int defaults also accept floats); numbers
    must be finite."""
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            number = int(value) if isinstance(default, int) else float(value)
        except ValueError:
            number = float(value)
        if not math.isfinite(number):
            raise ValueError(f'{value!r} is not a finite number')
        return number
    return value


def parse_sampler_spec(spec: str) -> tuple[str, str, dict]:
    """The one sampler-spec syntax, 'name[:option=value...]' -> (label, registry name, options), e.g.
    'dpmpp_2m_sde:eta=0.5:solver_type=heun'; names are SAMPLERS or SAMPLER_ALIASES. Values take the type of
    the option's default. Raises ValueError for unknown samplers, options or non-numbers (TypeError, as
    resolve_sampler, for options the sampler does not take)."""
    name, *assignments = spec.strip().split(':')
    if name not in SAMPLERS and name not in SAMPLER_ALIASES:
        raise ValueError(f'unknown sampler {name!r}; expected one of {", ".join(list(SAMPLERS) + list(SAMPLER_ALIASES))}')
    name, options = SAMPLER_ALIASES.get(name, (name, {}))
    options = dict(options)
    params = inspect.signature(SAMPLERS[name]).parameters
    for item in assignments:
        key, sep, value = item.partition('=')
        if not sep or key not in params:
            raise ValueError(f'{spec!r}: {item!r} is not option=value for an option of sampler {name!r}')
        try:
            options[key] = _typed_like(params[key].default, value)
        except ValueError as e:
            raise ValueError(f'{spec!r}: {key}={value!r} is not a {"finite " if "finite" in str(e) else ""}number') from None
    resolve_sampler(name, options)
    return spec.strip(), name, options


def override_sampler_kwargs(a_kwargs: dict, overrides: str) -> dict:
    """generate_images kwargs `a_kwargs` with `overrides` ('key=value:key=value', the sweep's syntax,
    e.g. 'guidance=1' or 'sampler=dpmpp_2m:num_steps=9') applied (fid.py compare's side B). A new sampler
    keeps only the guidance and num_steps. Raises ValueError for unknown options."""
    pairs = [item.partition('=') for item in overrides.split(':') if item.strip()] if overrides else []
    if any(not sep for _k, sep, _v in pairs):
        raise ValueError(f'{overrides!r} is not key=value[:key=value...]')
    changes = {k.strip(): v.strip() for k, _sep, v in pairs}
    name = changes.pop('sampler', a_kwargs.get('sampler', 'edm'))
    if name not in SAMPLERS:
        raise ValueError(f'unknown sampler {name!r}; expected one of {", ".join(SAMPLERS)}')
    keep = {k: v for k, v in a_kwargs.items() if k != 'sampler'}
    if name != a_kwargs.get('sampler'):
        keep = {k: v for k, v in keep.items() if k in GUIDANCE_KWARGS or k in ('num_steps', 'cfg', 'guidance_interval')}
    defaults = {k: p.default for k, p in inspect.signature(SAMPLERS[name]).parameters.items()}
    for key, value in changes.items():
        if key == 'gnet':
            keep[key] = value
        elif key == 'cfg':
            keep[key] = value.lower() in ('1', 'true', 'yes')
        elif key in ('guidance',):
            keep[key] = float(value)
        else:
            default = keep.get(key, defaults.get(key, 0.0))
            keep[key] = _typed_like(default if default is not None else 0.0, value)
    if keep.get('gnet') is None and not keep.get('cfg'):  # no guide: guidance keys would be an error
        for key in ('gnet', 'guidance', 'cfg', 'guidance_interval'):
            keep.pop(key, None)
    guidance = {k: keep.pop(k) for k in ('gnet', 'guidance', 'cfg', 'guidance_interval') if k in keep}
    name, options = resolve_sampler(name, keep)
    return dict(sampler=name, **options, **guidance)


class _CountingDenoiser:
    """A 1-pixel stand-in network that counts its evaluations (D = 0)."""
    img_resolution, img_channels, label_dim, sigma_min, sigma_max = 1, 1, 0, 0, float('inf')

    def __init__(self):
        self.nfe = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        self.nfe += 1
        return torch.zeros_like(x)


def count_nfe(name: str, num_steps: int, **sampler_kwargs) -> int:
    """Network evaluations of sampler `name` with `num_steps` steps, counted by running it on a 1-pixel
    stand-in (exact for every sampler here, whose evaluation count does not depend on the data):
    edm/ablation-heun/dpm_2/dpmpp_2s_ancestral 2N-1, the others N."""
    name, sampler_kwargs = resolve_sampler(name, dict(sampler_kwargs, num_steps=num_steps))
    net = _CountingDenoiser()
    SAMPLERS[name](net, torch.zeros([1, 1, 1, 1]), randn_like=torch.zeros_like, **sampler_kwargs)
    return net.nfe


def steps_for_nfe(name: str, nfe: int, **sampler_kwargs) -> int:
    """The largest number of steps whose network evaluations do not exceed `nfe` (e.g. Heun: (nfe+1)//2)."""
    if count_nfe(name, 1, **sampler_kwargs) > nfe:
        raise ValueError(f'sampler {name!r} needs more than {nfe} network evaluations even for one step')
    num_steps = 1
    while count_nfe(name, num_steps + 1, **sampler_kwargs) <= nfe:
        num_steps += 1
    return num_steps


def check_denoiser(net, source: str = 'the network') -> None:
    """Raise ValueError unless `net` has the denoiser interface the samplers use."""
    missing = [a for a in DENOISER_ATTRIBUTES if not hasattr(net, a)]
    if missing or not callable(net):
        raise ValueError(f'{source} is not a preconditioned denoiser (missing {", ".join(missing) or "__call__"})')


# ----------------------------------------------------------------------------
# Library entry point: sampling of this rank's share of the seeds.


def seed_batches(seeds: Sequence[int], max_batch_size: int, world_size: int = 1) -> list[np.ndarray]:
    """All batches, as the paper splits them: a multiple of world_size batches of <= max_batch_size seeds
    (np.array_split: sizes differ by at most one, larger first, empties last). Rank r takes [r::world_size]."""
    if len(seeds) == 0:
        return [np.zeros([0], dtype=np.int64)] * world_size
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    return np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW float -> uint8 NHWC on the CPU (the paper's mapping x*127.5+128, clipped, truncated)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def compile_network(net: torch.nn.Module, **compile_kwargs) -> torch.nn.Module:
    """`net` with its backbone (`net.model`) compiled by torch.compile (inductor; needs a C++ compiler on CPU):
    the same weights and denoiser interface, the preconditioning stays eager. `net` itself is not modified.
    Outputs match eager to float rounding (fused kernels reorder sums). Compilation happens at the first call
    (seconds to minutes) and again for every new batch shape."""
    if not isinstance(getattr(net, 'model', None), torch.nn.Module):
        raise ValueError(f'compile_network: {type(net).__name__} has no backbone module `model` to compile')
    compiled = copy.copy(net)
    compiled._modules = dict(net._modules)  # a shallow copy shares the submodule table; give it its own
    compiled._modules['model'] = torch.compile(net.model, **compile_kwargs)
    return compiled


def make_grid(images: Sequence[np.ndarray]) -> np.ndarray:
    """Tile HWC uint8 images row-major into a near-square grid (unused cells black)."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images[0].shape
    grid = np.zeros([rows * h, cols * w, c], dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def generate_images(net, seeds: Sequence[int], max_batch_size: int = 64, class_idx: int | None = None,
                    device=torch.device('cpu'), sampler: str | None = None, gnet=None, guidance: float | None = 1,
                    cfg: bool = False, guidance_interval: tuple[float, float] | None = None,
                    sigmas=None, compile: bool = False, **sampler_kwargs) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (batch_seeds, uint8 images [N,H,W,C] on the CPU) for THIS rank's share of the seed batches.

    `sampler` names an entry of SAMPLERS (None: the paper's rule, see resolve_sampler); sampler_kwargs
    are its options, None meaning "default". `gnet`, `guidance`, `cfg`, `guidance_interval`: guidance of
    every network evaluation (see guided_denoiser); off by default. `sigmas`: noise levels for the sampler
    to walk instead of its default time steps. `compile`: run the backbones through torch.compile
    (compile_network); images within float rounding of eager.
    """
    from torch_utils import distributed as dist

    if compile:
        net = compile_network(net)
        gnet = compile_network(gnet) if gnet is not None else None

    sampler, sampler_kwargs = resolve_sampler(sampler, sampler_kwargs)
    sampler_fn = SAMPLERS[sampler]
    if sigmas is not None:
        if 'sigmas' not in inspect.signature(sampler_fn).parameters:
            raise ValueError(f'sampler {sampler!r} walks its own time grid and takes no sigmas')
        sampler_kwargs['sigmas'] = check_sigmas(sigmas).to(device)
    denoiser = guided_denoiser(net, gnet, 1 if guidance is None else guidance, cfg, guidance_interval)
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size must be >= 1, got {max_batch_size}')
    label_dim = int(net.label_dim)
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError(f'class {class_idx} is out of range: the network has '
                         + (f'{label_dim} classes (0..{label_dim - 1})' if label_dim else 'no class labels'))
    device = torch.device(device)

    rank, world_size = dist.get_rank(), dist.get_world_size()
    for batch_seeds in seed_batches(seeds, max_batch_size, world_size)[rank::world_size]:
        batch_size = len(batch_seeds)
        if batch_size == 0:
            continue
        rnd = StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([batch_size, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        class_labels = None
        if label_dim:  # drawn even with a fixed class, so the noise stream matches the reference
            class_labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[batch_size], device=device)]
            if class_idx is not None:
                class_labels[:, :] = 0
                class_labels[:, class_idx] = 1
        with torch.no_grad():
            images = sampler_fn(denoiser, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
        yield [int(seed) for seed in batch_seeds], images_to_uint8(images)
