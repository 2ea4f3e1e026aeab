"""Training losses of EDM Table 1 ("Elucidating the Design Space of Diffusion-Based Generative
Models", Karras et al. 2022): VP and VE (Song et al. 2021) and the paper's EDM loss.

Each loss draws one noise level sigma per image from the training distribution p_train(sigma),
noises the (optionally augmented) image y, asks the denoiser D for y, and returns the
per-pixel loss lambda(sigma) * (D(y + n; sigma) - y)^2 without reducing it (the training loop
sums/means it). Random draws, in this order (part of the reproducibility contract):
  1. sigma noise: torch.rand([N,1,1,1]) for VP/VE, torch.randn([N,1,1,1]) for EDM;
  2. whatever the augmentation pipe draws;
  3. torch.randn_like(y) for the noise n.
"""

import torch

from torch_utils import persistence

# This module's source is embedded in every network snapshot, and the paper's loader executes it with the
# paper's own modules on sys.path. So it imports nothing from this project but `persistence` (names the
# paper's modules also have; tests/test_persistence_paper.py checks every embedded module against that list).

#----------------------------------------------------------------------------
# Pure formulas (Table 1). `u` ~ U(0,1), `z` ~ N(0,1).

def vp_t_from_uniform(u, epsilon_t=1e-5):
    """t ~ U(epsilon_t, 1), mapped from u ~ U(0,1) as 1 + u (epsilon_t - 1) (u=0 -> t=1)."""
    return 1 + u * (epsilon_t - 1)

def ve_sigma_from_uniform(u, sigma_min=0.02, sigma_max=100):
    """Log-uniform sigma in [sigma_min, sigma_max]: sigma_min (sigma_max / sigma_min)^u."""
    return sigma_min * ((sigma_max / sigma_min) ** u)

def edm_sigma_from_normal(z, P_mean=-1.2, P_std=1.2):
    """Log-normal sigma: ln(sigma) ~ N(P_mean, P_std^2)."""
    return (z * P_std + P_mean).exp()

def snr_weight(sigma):
    """lambda(sigma) = 1 / sigma^2 (VP and VE)."""
    return 1 / sigma ** 2

def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1). The same formula as
    training.networks.vp_sigma, written here because this module may not import it (see the top);
    a test holds the two equal."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()

def edm_weight(sigma, sigma_data=0.5):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out(sigma)^2, so the
    effective training target of the raw network F has unit weight at every noise level."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

#----------------------------------------------------------------------------

def _denoise(net, images, sigma, labels, augment_pipe, **net_kwargs):
    """The prelude every loss shares (Eq. 2 / Table 1): optionally augment the clean images y, add Gaussian
    noise n of std `sigma`, and denoise. Draws: the augmentation pipe's, then the noise. The network gets
    `augment_labels` only when there is a pipe (EDM2's networks take none). Returns (y, net's output)."""
    model_kwargs = {}
    if augment_pipe is not None:
        images, model_kwargs['augment_labels'] = augment_pipe(images)
    noise = torch.randn_like(images) * sigma
    return images, net(images + noise, sigma, labels, **net_kwargs, **model_kwargs)


def _denoising_loss(net, images, sigma, weight, labels, augment_pipe):
    """lambda(sigma) * (D(y + n; sigma) - y)^2 per pixel."""
    clean, denoised = _denoise(net, images, sigma, labels, augment_pipe)
    return weight * ((denoised - clean) ** 2)


def _uncertainty_weighted_loss(net, images, sigma, weight, labels, augment_pipe):
    """EDM2's loss (config B, after Kendall et al. 2018): weight / e^u(sigma) * (D - y)^2 + u(sigma), with
    u(sigma) the network's log-variance head (net(..., return_logvar=True))."""
    clean, (denoised, logvar) = _denoise(net, images, sigma, labels, augment_pipe, return_logvar=True)
    return (weight / logvar.exp()) * ((denoised - clean) ** 2) + logvar


def _per_image(draw, images):
    """One random number per image, shaped to broadcast over C, H, W."""
    return draw([images.shape[0], 1, 1, 1], device=images.device)

#----------------------------------------------------------------------------

@persistence.persistent_class
class VPLoss:
    """Variance preserving loss of Song et al. 2021 ("DDPM++ cont. (VP)"): t ~ U(epsilon_t, 1),
    sigma = sigma_vp(t; beta_d, beta_min), weight 1/sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        t = vp_t_from_uniform(_per_image(torch.rand, images), self.epsilon_t)
        sigma = self.sigma(t)
        return _denoising_loss(net, images, sigma, snr_weight(sigma), labels, augment_pipe)

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

#----------------------------------------------------------------------------

@persistence.persistent_class
class VELoss:
    """Variance exploding loss of Song et al. 2021 ("NCSN++ cont. (VE)"): sigma log-uniform in
    [sigma_min, sigma_max], weight 1/sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = ve_sigma_from_uniform(_per_image(torch.rand, images), self.sigma_min, self.sigma_max)
        return _denoising_loss(net, images, sigma, snr_weight(sigma), labels, augment_pipe)

#----------------------------------------------------------------------------

@persistence.persistent_class
class EDMLoss:
    """The paper's loss (Section 5, Table 1): ln(sigma) ~ N(P_mean, P_std^2) and
    lambda(sigma) = 1 / c_out(sigma)^2 for data standard deviation sigma_data."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = edm_sigma_from_normal(_per_image(torch.randn, images), self.P_mean, self.P_std)
        return _denoising_loss(net, images, sigma, edm_weight(sigma, self.sigma_data), labels, augment_pipe)

#----------------------------------------------------------------------------

@persistence.persistent_class
class EDM2Loss:
    """EDM2's loss with learned uncertainty weighting ("Analyzing and Improving the Training Dynamics of
    Diffusion Models", Karras et al. 2024, config B of Table 1, after Kendall et al. 2018):

        L = lambda(sigma) / e^u(sigma) * (D(y + n; sigma) - y)^2 + u(sigma),

    ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) = 1 / c_out(sigma)^2 as in EDMLoss, and u(sigma) the
    network's log-variance head (`net(..., return_logvar=True)`; EDM2's Precond, or an EDM network built
    with `logvar_channels`). Minimising over u gives e^u = E[lambda (D - y)^2 | sigma], so every noise level
    contributes an equal share of the gradient. Returns the per-element loss, not reduced. Draws
    torch.randn([N,1,1,1]) for sigma, then (our addition, for EDM networks) whatever `augment_pipe` draws,
    then torch.randn_like for the noise. EDM2 itself trains without augmentation (augment_pipe=None)."""

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = edm_sigma_from_normal(_per_image(torch.randn, images), self.P_mean, self.P_std)
        return _uncertainty_weighted_loss(net, images, sigma, edm_weight(sigma, self.sigma_data), labels, augment_pipe)

#----------------------------------------------------------------------------
# Learned uncertainty weighting for the VP and VE rows of Table 1 (our addition, train.py --uncertainty=1;
# the EDM row is EDM2Loss(P_mean=-1.2, P_std=1.2)): the same sigma distribution and lambda(sigma) as VPLoss /
# VELoss, the same random draws in the same order, and the loss of EDM2Loss.

@persistence.persistent_class
class VPUncertaintyLoss(VPLoss):
    """VPLoss with learned uncertainty weighting: lambda(sigma) / e^u(sigma) * (D - y)^2 + u(sigma)."""

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = self.sigma(vp_t_from_uniform(_per_image(torch.rand, images), self.epsilon_t))
        return _uncertainty_weighted_loss(net, images, sigma, snr_weight(sigma), labels, augment_pipe)

@persistence.persistent_class
class VEUncertaintyLoss(VELoss):
    """VELoss with learned uncertainty weighting: lambda(sigma) / e^u(sigma) * (D - y)^2 + u(sigma)."""

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = ve_sigma_from_uniform(_per_image(torch.rand, images), self.sigma_min, self.sigma_max)
        return _uncertainty_weighted_loss(net, images, sigma, snr_weight(sigma), labels, augment_pipe)
