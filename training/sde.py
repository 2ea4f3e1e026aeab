"""Score-based generative modelling through SDEs (Song et al., ICLR 2021): the VE and VP SDEs, the
predictor-corrector sampler (Algorithms 2-3) with the reverse-diffusion and Euler-Maruyama predictors and the
Langevin corrector, and `pc_sampler`, the registry sampler that runs them on any preconditioned network of
this project through the score s(x; sigma) = (D(x; sigma) - x) / sigma^2.

Conventions (those of the public score_sde code): time t runs from 1 down to eps on N points
t_i = 1 - i (1 - eps)/(N - 1); step i uses the discrete table entry k = N - 1 - i (= floor(t_i (N - 1))),
while the score always sees the continuous time t_i. Noise is drawn from `randn_like` in a fixed order:
the prior, then per step [each corrector step's z,] the predictor's z (also on the last step, whose noise
the denoised output x_mean does not use).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from training.networks import vp_sigma

PREDICTORS = ('reverse_diffusion', 'euler_maruyama')
CORRECTORS = ('langevin', 'none')
SDES = ('ve', 'vp')

# ----------------------------------------------------------------------------
# The two SDEs. Every table is float64.


class VESDE:
    """Variance exploding: dx = sqrt(d[sigma^2(t)]/dt) dw with sigma(t) = sigma_min (sigma_max/sigma_min)^t (Eq. 30);
    its discretisation is NCSN's geometric sigma_k, k = 0..N-1 (Eq. 47)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50, N: int = 1000):
        if not 0 < sigma_min < sigma_max or N < 1:
            raise ValueError(f'VE SDE needs 0 < sigma_min < sigma_max and N >= 1, got sigma_min={sigma_min}, '
                             f'sigma_max={sigma_max}, N={N}')
        self.sigma_min, self.sigma_max, self.N = float(sigma_min), float(sigma_max), int(N)
        self.discrete_sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), N, dtype=torch.float64).exp()

    def marginal_std(self, t):
        """Std of p_0t(x(t) | x(0)) = N(x(0), sigma(t)^2 I)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def prior(self, z):
        return self.sigma_max * z

    def drift_diffusion(self, x, t):
        """(f(x, t), g(t)) of the forward SDE: f = 0, g = sigma(t) sqrt(2 ln(sigma_max/sigma_min))."""
        return torch.zeros_like(x), self.marginal_std(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    def discretize(self, x, k: int):
        """(f_k, G_k) of the discrete forward chain x_{k} = x_{k-1} + f + G z (SMLD): f = 0,
        G = sqrt(sigma_k^2 - sigma_{k-1}^2) with sigma_{-1} = 0."""
        prev = self.discrete_sigmas[k - 1] if k > 0 else torch.zeros((), dtype=torch.float64)
        return torch.zeros_like(x), (self.discrete_sigmas[k] ** 2 - prev ** 2).sqrt()

    def langevin_alpha(self, k: int) -> float:
        return 1.0


class VPSDE:
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta(t) = beta_min + t (beta_max - beta_min)
    (Eq. 32); its discretisation is DDPM's beta_k = linspace(beta_min/N, beta_max/N, N), alpha_k = 1 - beta_k."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20, N: int = 1000):
        if not 0 <= beta_min < beta_max or N < 1:
            raise ValueError(f'VP SDE needs 0 <= beta_min < beta_max and N >= 1, got beta_min={beta_min}, '
                             f'beta_max={beta_max}, N={N}')
        self.beta_min, self.beta_max, self.N = float(beta_min), float(beta_max), int(N)
        self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
        self.alphas = 1 - self.discrete_betas

    def beta(self, t):
        return self.beta_min + torch.as_tensor(t, dtype=torch.float64) * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        """ln of the mean scale s(t) of p_0t: -t^2 (beta_max - beta_min)/4 - t beta_min/2 (Eq. 33)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal_std(self, t):
        """Std of p_0t(x(t) | x(0)) = N(s(t) x(0), (1 - s(t)^2) I)."""
        return (-torch.expm1(2 * self.log_mean_coeff(t))).sqrt()

    def edm_sigma(self, t):
        """The noise level of x(t)/s(t), i.e. EDM's VP sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""
        return vp_sigma(torch.as_tensor(t, dtype=torch.float64), self.beta_max - self.beta_min, self.beta_min)

    def prior(self, z):
        return z

    def drift_diffusion(self, x, t):
        beta = self.beta(t)
        return -0.5 * beta * x, beta.sqrt()

    def discretize(self, x, k: int):
        """(f_k, G_k) of DDPM's chain x_k = sqrt(alpha_k) x_{k-1} + sqrt(beta_k) z: f = (sqrt(alpha_k) - 1) x."""
        if self.alphas[k] < 0:
            raise ValueError(f'VP reverse diffusion needs beta_max/N <= 1 (alpha_k >= 0), got beta_max={self.beta_max}, '
                             f'N={self.N}; take at least {math.ceil(self.beta_max)} steps or the euler_maruyama predictor')
        return (self.alphas[k].sqrt() - 1) * x, self.discrete_betas[k].sqrt()

    def langevin_alpha(self, k: int) -> float:
        return float(self.alphas[k])


def time_steps(N: int, eps: float) -> torch.Tensor:
    """t_i = linspace(1, eps, N), float64."""
    return torch.linspace(1, eps, N, dtype=torch.float64)

# ----------------------------------------------------------------------------
# One update each. `score` is s(x, t) already evaluated; `z` the update's standard normal draw.
# Each returns (x, x_mean): the new state and its mean (the state without this update's noise).


def reverse_diffusion_step(sde, x, k: int, score, z):
    """Reverse-diffusion predictor (Eq. 46): x_mean = x - f_k + G_k^2 s, x = x_mean + G_k z."""
    f, G = sde.discretize(x, k)
    x_mean = x - f + G ** 2 * score
    return x_mean + G * z, x_mean


def euler_maruyama_step(sde, x, t, score, z):
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 s] dt + g dw with dt = -1/N:
    x_mean = x - (f - g^2 s)/N, x = x_mean + g sqrt(1/N) z."""
    f, g = sde.drift_diffusion(x, t)
    dt = 1 / sde.N
    x_mean = x - (f - g ** 2 * score) * dt
    return x_mean + g * math.sqrt(dt) * z, x_mean


def langevin_step_size(score, z, snr: float, alpha: float, per_sample: bool = False):
    """Langevin corrector step (Algorithm 4): eps = 2 alpha (snr ||z|| / ||s||)^2. score_sde averages the per-sample
    norms over the batch (one step for all); `per_sample` uses each sample's own norms, so that a sample does not
    depend on the others in its batch. Returns a tensor broadcastable against x."""
    g_norm = score.flatten(1).norm(dim=1)
    z_norm = z.flatten(1).norm(dim=1)
    if not per_sample:
        g_norm, z_norm = g_norm.mean(), z_norm.mean()
    step = (snr * z_norm / g_norm) ** 2 * 2 * alpha
    return step.reshape(-1, *[1] * (score.ndim - 1)) if per_sample else step


def langevin_step(x, score, z, step_size):
    """x_mean = x + eps s, x = x_mean + sqrt(2 eps) z."""
    x_mean = x + step_size * score
    return x_mean + (2 * step_size).sqrt() * z, x_mean

# ----------------------------------------------------------------------------
# The predictor-corrector loop (Algorithm 1 of the paper's appendix, as in score_sde's get_pc_sampler).


def pc_trajectory(sde, score_fn: Callable, z_prior, randn_like=torch.randn_like, predictor: str = 'reverse_diffusion',
                  corrector: str = 'langevin', snr: float = 0.16, n_steps: int = 1, eps: float = 1e-3,
                  per_sample: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (i, x, x_mean) after step i's predictor, i = 0..N-1, starting from x = sde.prior(z_prior).

    score_fn(x, t) -- the score at float64 time t (a 0-d tensor); called n_steps + 1 times per step (n_steps
    with the corrector, 1 without)."""
    if predictor not in PREDICTORS:
        raise ValueError(f'unknown predictor {predictor!r}; expected one of {", ".join(PREDICTORS)}')
    if corrector not in CORRECTORS:
        raise ValueError(f'unknown corrector {corrector!r}; expected one of {", ".join(CORRECTORS)}')
    if snr < 0 or n_steps < 0 or not 0 < eps < 1:
        raise ValueError(f'need snr >= 0, corrector steps >= 0 and 0 < eps < 1, got snr={snr}, n_steps={n_steps}, eps={eps}')
    x = sde.prior(z_prior.to(torch.float64))
    for i, t in enumerate(time_steps(sde.N, eps)):
        k = sde.N - 1 - i
        if corrector == 'langevin':
            for _ in range(n_steps):
                score, z = score_fn(x, t), randn_like(x)
                x, _ = langevin_step(x, score, z, langevin_step_size(score, z, snr, sde.langevin_alpha(k), per_sample))
        if predictor == 'reverse_diffusion':
            x, x_mean = reverse_diffusion_step(sde, x, k, score_fn(x, t), randn_like(x))
        else:
            x, x_mean = euler_maruyama_step(sde, x, t, score_fn(x, t), randn_like(x))
        yield i, x, x_mean


def pc_sample(sde, score_fn, z_prior, randn_like=torch.randn_like, denoise: bool = True, **kwargs):
    """The sample of pc_trajectory: the last x_mean (denoise) or x."""
    for _i, x, x_mean in pc_trajectory(sde, score_fn, z_prior, randn_like, **kwargs):
        pass
    return x_mean if denoise else x

# ----------------------------------------------------------------------------
# The registry sampler: any preconditioned network D(x; sigma) as the score of the VE or VP SDE.


def network_sde(name: str, N: int, sigma_min: float, sigma_max: float, eps: float):
    """The SDE spanning the EDM noise range [sigma_min, sigma_max]: VE with sigma(0) = sigma_min, sigma(1) = sigma_max;
    VP with beta(t) fitted so that its EDM sigma(eps) = sigma_min and sigma(1) = sigma_max (as Table 1's VP)."""
    from training.sampling import vp_betas  # the one VP fit; imported here (sampling imports this module)
    if name == 've':
        return VESDE(sigma_min, sigma_max, N)
    if name == 'vp':
        beta_d, beta_min = vp_betas(sigma_min, sigma_max, eps)
        return VPSDE(beta_min, beta_min + beta_d, N)
    raise ValueError(f'unknown SDE {name!r}; expected one of {", ".join(SDES)}')


def denoiser_score(denoise: Callable, sde, round_sigma=lambda s: s) -> Callable:
    """score_fn(x, t) of the SDE from a denoiser D(x; sigma) of the variance-exploding process x0 + sigma n:
    VE: s(x, t) = (D(x; sigma) - x)/sigma^2 with sigma = sigma(t);
    VP: x(t) = s(t) (x0 + sigma n) with sigma the EDM sigma(t), so s(x, t) = (D(x/s; sigma) - x/s)/(s sigma^2)."""
    def score_fn(x, t):
        if isinstance(sde, VPSDE):
            sigma = torch.as_tensor(round_sigma(sde.edm_sigma(t)), dtype=torch.float64)
            scale = 1 / (1 + sigma ** 2).sqrt()
            y = x / scale
            return (denoise(y, sigma) - y) / (scale * sigma ** 2)
        sigma = torch.as_tensor(round_sigma(sde.marginal_std(t)), dtype=torch.float64)
        return (denoise(x, sigma) - x) / sigma ** 2
    return score_fn


def pc_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=None,
               sigma_max=None, sde='ve', predictor='reverse_diffusion', corrector='langevin', snr=0.16,
               corrector_steps=1, epsilon_s=1e-3):
    """Song et al. 2021's predictor-corrector sampler on a preconditioned network. Returns float64 images.

    sde -- 've' (sigma range default 0.02..100, Table 1's VE) or 'vp' (beta_min = 0.1, beta_max = 20 by default);
      the range is clamped to the network's and sets the SDE (see network_sde). num_steps is the SDE's N.
    predictor, corrector -- 'reverse_diffusion' | 'euler_maruyama'; 'langevin' | 'none'. snr, corrector_steps:
      the Langevin corrector's signal-to-noise ratio and steps per time step. epsilon_s: the last time.
    The Langevin step size uses each sample's own norms (score_sde averages them over the batch), so that a
    seed gives the same image in any batch. Returns the last predictor's mean (score_sde's denoise=True).
    NFE = N (corrector_steps + 1) with the corrector, N without. Time steps are uniform in t: no rho."""
    from training.sampling import _noise_range, default_sigma_range
    if sde not in SDES:
        raise ValueError(f'unknown SDE {sde!r}; expected one of {", ".join(SDES)}')
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise ValueError(f'corrector_steps must be a non-negative integer, got {corrector_steps}')
    default_min, default_max = default_sigma_range(sde, epsilon_s)
    sigma_min, sigma_max = _noise_range(net, default_min if sigma_min is None else sigma_min,
                                        default_max if sigma_max is None else sigma_max)
    process = network_sde(sde, num_steps, sigma_min, sigma_max, epsilon_s)
    denoise = lambda x, sigma: net(x, sigma, class_labels).to(torch.float64)  # noqa: E731
    score_fn = denoiser_score(denoise, process, net.round_sigma)
    return pc_sample(process, score_fn, latents, randn_like, denoise=True, predictor=predictor, corrector=corrector,
                     snr=snr, n_steps=int(corrector_steps), eps=epsilon_s, per_sample=True)
