"""Improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"): discrete-time
diffusion with the cosine schedule, learned-range variances, the hybrid objective, respacing, ancestral and
DDIM sampling, and the variational bound in bits/dim.

Equations cite the paper (arXiv 2102.09672): Eq. 4-5 q(x_t|x_0); Eq. 10-12 the posterior q(x_{t-1}|x_t,x_0);
Eq. 15 Sigma = exp(v log beta_t + (1-v) log beta~_t); Eq. 16 L_hybrid = L_simple + lambda L_vlb; Eq. 17 the
cosine schedule; Eq. 18 importance-sampled L_vlb; Section 4 respacing. DDIM is Song et al. 2021, Eq. 12.

All schedule tables and all arithmetic on them are float64: the reference rounds every coefficient to
float32 (`_extract_into_tensor(...).float()`), which moves the variance-channel gradient at t = T-1 by O(1)
and the decoder term by 1e-2 (see ../shared/golden/README.md "iDDPM math"). Networks run in float32; their
output is promoted to float64 before it meets the tables.

Timesteps: a Diffusion may be respaced (`timestep_map`); functions take the *respaced* index i and the
network always receives the original timestep `timestep_map[i]` (the network wrapper may rescale it).

This module's source is embedded in network snapshots (iDDPMLoss is pickled as `loss_fn`), so it imports at
module level only torch, numpy, the standard library and `torch_utils.persistence`.
"""

import math

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Beta schedules (Section 3.2, Eq. 17) and respacing (Section 4).

def cosine_alpha_bar(u: float, s: float = 0.008) -> float:
    """f(t)/f(0) numerator: f(u) = cos^2((u + s)/(1 + s) * pi/2) at u = t/T (Eq. 17)."""
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

def betas_from_alpha_bar(T: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta), t = 0..T-1 (the clip avoids the
    singularity at t = T, Section 3.2)."""
    return np.array([min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta) for t in range(T)], dtype=np.float64)

def linear_betas(T: int) -> np.ndarray:
    """DDPM's linear schedule 1e-4 .. 0.02 for T = 1000, rescaled by 1000/T so other T keep its shape."""
    scale = 1000 / T
    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)

def named_beta_schedule(name: str, T: int) -> np.ndarray:
    """'cosine' (Eq. 17, s = 0.008, beta <= 0.999) or 'linear' (rescaled by 1000/T), float64 [T]."""
    if name == 'cosine':
        return betas_from_alpha_bar(T, cosine_alpha_bar)
    if name == 'linear':
        return linear_betas(T)
    raise ValueError(f'unknown noise schedule {name!r}; expected cosine or linear')

def _ddim_stride_steps(T: int, count: int) -> list[int]:
    """'ddimN': range(0, T, i) for the smallest integer stride i giving exactly N steps."""
    for stride in range(1, T):
        if len(range(0, T, stride)) == count:
            return list(range(0, T, stride))
    raise ValueError(f'cannot take exactly {count} equally strided steps out of {T}; use section counts such as "{count}"')

def _section_steps(start: int, size: int, count: int) -> list[int]:
    """`count` steps spread over [start, start + size): start + round(k * (size-1)/(count-1)), with the
    offset accumulated by repeated float addition and Python's round (half to even), as iDDPM does."""
    if count > size:
        raise ValueError(f'cannot take {count} steps from a section of {size} steps')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    steps, offset = [], 0.0
    for _ in range(count):
        steps.append(start + round(offset))
        offset += stride
    return steps

def space_timesteps(T: int, section_counts) -> list[int]:
    """The sorted original timesteps kept by a respacing: 'ddimN', a comma string '10,15' or a list of
    section counts. The T steps are cut into len(counts) sections (the first T mod len(counts) one step
    longer), and each section keeps its count of evenly spread steps."""
    if isinstance(section_counts, str):
        text = section_counts.strip()
        try:
            if text.startswith('ddim'):
                return _ddim_stride_steps(T, int(text[4:]))
            section_counts = [int(c) for c in text.split(',')]
        except ValueError as e:
            if 'invalid literal' not in str(e):
                raise
            raise ValueError(f'{text!r} is neither ddimN nor comma-separated section counts (e.g. ddim50, 10,15)') from None
    counts = [int(c) for c in section_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f'section counts must be positive integers, got {section_counts!r}')
    base, extra = divmod(T, len(counts))
    steps, start = [], 0
    for k, count in enumerate(counts):
        size = base + (1 if k < extra else 0)
        steps += _section_steps(start, size, count)
        start += size
    return sorted(set(steps))

def respaced_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
    """(new betas, timestep_map): the process restricted to the kept steps, beta_k = 1 - abar_k/abar_prev
    (abar_prev = 1 before the first kept step), keeping every kept step's alpha_bar."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    kept = sorted(int(t) for t in use_timesteps)
    new_betas, last = [], 1.0
    for t in kept:
        new_betas.append(1 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.array(new_betas, dtype=np.float64), np.array(kept, dtype=np.int64)

#----------------------------------------------------------------------------
# The process: float64 tables of one (possibly respaced) beta schedule.

VAR_TYPES = ('learned_range', 'fixed_large', 'fixed_small')

class Diffusion:
    """Float64 tables of a discrete Gaussian diffusion with betas [T'] (T' respaced steps of an original
    process of `original_T` steps; `timestep_map[i]` is the original step of respaced index i).

    var_type -- 'learned_range' (Eq. 15, the network has 2C outputs), 'fixed_large' (beta_t, with beta~_1
      at t = 0) or 'fixed_small' (beta~_t)."""

    def __init__(self, betas, timestep_map=None, var_type: str = 'learned_range', original_T: int | None = None):
        if var_type not in VAR_TYPES:
            raise ValueError(f'unknown variance type {var_type!r}; expected one of {", ".join(VAR_TYPES)}')
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError('betas must be a 1-D array in (0, 1) (the linear schedule needs T > 20: its last beta is 20/T)')
        self.var_type = var_type
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        self.original_T = int(original_T if original_T is not None else (self.timestep_map[-1] + 1))
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # beta~_t (Eq. 10)
        tables = dict(
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=posterior_variance,
            # beta~_0 = 0, so log beta~_0 is replaced by log beta~_1 ("clipped"). A one-step process has no
            # beta~_1 (the reference raises IndexError); beta_0 stands in: its last step adds no noise anyway.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1] if len(betas) > 1 else betas[0],
                                                            posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),               # Eq. 11, x_0
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),      # Eq. 11, x_t
        )
        for name, value in tables.items():
            setattr(self, name, torch.from_numpy(value))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps the network sees for respaced indices t."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t]

def make_diffusion(schedule: str = 'cosine', T: int = 1000, spacing=None, var_type: str = 'learned_range') -> Diffusion:
    """The diffusion of a named schedule with T steps, respaced by `spacing` (None: all steps)."""
    betas = named_beta_schedule(schedule, T)
    if spacing is None:
        return Diffusion(betas, var_type=var_type, original_T=T)
    new_betas, timestep_map = respaced_betas(betas, space_timesteps(T, spacing))
    return Diffusion(new_betas, timestep_map, var_type=var_type, original_T=T)

def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] as float64 [N, 1, 1, ...] on like's device (no float32 rounding, unlike the reference)."""
    values = table.to(like.device)[t.to(like.device)]
    return values.reshape(-1, *[1] * (like.ndim - 1))

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))

#----------------------------------------------------------------------------
# Forward process, posterior, and the model's reverse step.

def q_mean_variance(d: Diffusion, x_start, t):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Eq. 9): (mean, variance, log variance)."""
    mean = extract(d.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = extract(1.0 - d.alphas_cumprod, t, x_start)
    return mean, variance, extract(d.log_one_minus_alphas_cumprod, t, x_start)

def q_sample(d: Diffusion, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 9)."""
    return extract(d.sqrt_alphas_cumprod, t, x_start) * x_start + extract(d.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

def q_posterior(d: Diffusion, x_start, x_t, t):
    """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (Eq. 10-11): (mean, variance, clipped log variance)."""
    mean = extract(d.posterior_mean_coef1, t, x_t) * x_start + extract(d.posterior_mean_coef2, t, x_t) * x_t
    return mean, extract(d.posterior_variance, t, x_t), extract(d.posterior_log_variance_clipped, t, x_t)

def predict_xstart_from_eps(d: Diffusion, x_t, t, eps):
    """x^_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (Eq. 9 solved for x_0)."""
    return extract(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(d.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

def predict_eps_from_xstart(d: Diffusion, x_t, t, xstart):
    """eps = (sqrt(1/abar_t) x_t - x^_0) / sqrt(1/abar_t - 1)."""
    return (extract(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t - xstart) / extract(d.sqrt_recipm1_alphas_cumprod, t, x_t)

def learned_range_log_variance(d: Diffusion, v, t):
    """log Sigma = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1)/2 (Eq. 15)."""
    frac = (v + 1) / 2
    return frac * extract(d.log_betas, t, v) + (1 - frac) * extract(d.posterior_log_variance_clipped, t, v)

def model_log_variance(d: Diffusion, model_output, x, t):
    """(log variance, eps channels) of the network output under d.var_type."""
    C = x.shape[1]
    if d.var_type == 'learned_range':
        if model_output.shape[1] != 2 * C:
            raise ValueError(f'learned variances need {2 * C} output channels, the network gives {model_output.shape[1]}')
        eps, v = model_output[:, :C], model_output[:, C:]
        return learned_range_log_variance(d, v, t), eps
    if d.var_type == 'fixed_large':  # log beta_t, with the clipped log beta~ at t = 0 (a better decoder, as in DDPM)
        table = torch.cat([d.posterior_log_variance_clipped[:1], d.log_betas[1:]])
    else:
        table = d.posterior_log_variance_clipped
    return extract(table, t, x).expand_as(x), model_output[:, :C]

def p_mean_variance(d: Diffusion, model_output, x, t, clip_denoised: bool = True) -> dict:
    """p(x_{t-1} | x_t) from the network output (eps-prediction): mean = mu~_t(x^_0, x_t) (Eq. 11-13) with
    x^_0 from eps (clamped to [-1, 1] if clip_denoised), and the (learned) variance."""
    model_output = model_output.to(torch.float64)
    log_variance, eps = model_log_variance(d, model_output, x, t)
    pred_xstart = predict_xstart_from_eps(d, x, t, eps)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean, _, _ = q_posterior(d, pred_xstart, x, t)
    return dict(mean=mean, variance=log_variance.exp(), log_variance=log_variance, pred_xstart=pred_xstart)

#----------------------------------------------------------------------------
# The variational bound (Eq. 4-6): Gaussian KLs, the discretised decoder, the prior.

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))

def approx_standard_normal_cdf(x):
    """Phi(x) by the tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as the reference."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x | x_1) per element for 8-bit data in [-1, 1] (Eq. 13 of DDPM): the Gaussian mass of the
    pixel's bin [x - 1/255, x + 1/255], with the edge bins extended to -inf / +inf."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))

def vb_terms_per_dim(d: Diffusion, model_output, x_start, x_t, t, clip_denoised: bool = True):
    """L_t per element in bits (Eq. 5-6): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder
    -log p(x_0|x_1) at t = 0. Returns (per-element bits, p_mean_variance dict)."""
    true_mean, _, true_log_variance = q_posterior(d, x_start, x_t, t)
    out = p_mean_variance(d, model_output, x_t, t, clip_denoised)
    kl = normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance']) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x_start, out['mean'], 0.5 * out['log_variance']) / math.log(2.0)
    first = (t == 0).reshape(-1, *[1] * (x_t.ndim - 1))
    return torch.where(first, decoder_nll, kl), out

def prior_bpd(d: Diffusion, x_start):
    """L_T in bits/dim: KL(q(x_{T-1}|x_0) || N(0, I)), per image (no parameters; ~0 for a good schedule)."""
    t = torch.full([x_start.shape[0]], d.num_timesteps - 1, dtype=torch.int64, device=x_start.device)
    mean, _, log_variance = q_mean_variance(d, x_start, t)
    return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

#----------------------------------------------------------------------------
# Training objectives (Section 3.1).

def hybrid_loss_per_dim(d: Diffusion, model_output, x_start, t, noise, lambda_vlb: float = 0.001):
    """L_hybrid = L_simple + lambda L_vlb per element (Eq. 16): (eps - eps^)^2 + lambda T L_t, L_t in bits
    from cat(eps^.detach(), v) so L_vlb trains only the variances (stop-gradient on the mean, Section 3.1).
    T L_t is the one-sample estimate of L_vlb = sum_t L_t (without L_T). Returns (loss, mse, vb, x_t)."""
    C = x_start.shape[1]
    model_output = model_output.to(torch.float64)
    x_t = q_sample(d, x_start, t, noise)
    frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
    vb, _ = vb_terms_per_dim(d, frozen, x_start, x_t, t, clip_denoised=False)
    vb = vb * (lambda_vlb * d.num_timesteps)
    mse = (noise - model_output[:, :C]) ** 2
    return mse + vb, mse, vb, x_t

def hybrid_loss_terms(d: Diffusion, model_output, x_start, t, noise, lambda_vlb: float = 0.001) -> dict:
    """Per-image terms as iDDPM's training_losses reports them (LEARNED_RANGE + RESCALED_MSE): mse (mean over
    C,H,W), vb (bits/dim, times lambda T = T/1000), loss = mse + vb, and x_t."""
    loss, mse, vb, x_t = hybrid_loss_per_dim(d, model_output, x_start, t, noise, lambda_vlb)
    return dict(loss=mean_flat(loss), mse=mean_flat(mse), vb=mean_flat(vb), x_t=x_t)

def vlb_loss_per_dim(d: Diffusion, model_output, x_start, t, noise):
    """L_t in bits per element with gradients into both mean and variance (pure L_vlb training)."""
    x_t = q_sample(d, x_start, t, noise)
    vb, _ = vb_terms_per_dim(d, model_output.to(torch.float64), x_start, x_t, t, clip_denoised=False)
    return vb

@persistence.persistent_class
class LossSecondMomentSampler:
    """Importance sampling of t for L_vlb (Eq. 18): p_t proportional to sqrt(E[L_t^2]) over the last
    `history` values of each L_t, mixed with `uniform_prob` of the uniform law; uniform until every t has
    `history` values. sample() returns (t, weights 1/(T p_t)) so that E[w L_t] = mean_t L_t. Its history is
    training state that snapshots do not restore (the safe loader rebuilds objects from their arguments):
    after a resume it warms up again."""

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        self.T, self.history, self.uniform_prob = T, history, uniform_prob
        self.loss_history = np.zeros([T, history], dtype=np.float64)
        self.loss_counts = np.zeros([T], dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        if not (self.loss_counts == self.history).all():
            return np.full([self.T], 1.0 / self.T)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w = w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.T
        return w / w.sum()

    def sample(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.from_numpy(self.probabilities())
        t = torch.multinomial(p, batch_size, replacement=True)
        weights = 1.0 / (self.T * p[t])
        return t.to(device), weights.to(device)

    def update(self, t, losses) -> None:
        for ti, loss in zip(torch.as_tensor(t).tolist(), torch.as_tensor(losses, dtype=torch.float64).tolist()):
            if self.loss_counts[ti] == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, self.loss_counts[ti]] = loss
                self.loss_counts[ti] += 1

def _gather_all(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over all ranks (x itself when not distributed), so every rank's sampler sees the
    same losses and keeps the same weights."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)

def _unwrap(net):
    return getattr(net, 'module', net)  # DistributedDataParallel keeps the network in .module

@persistence.persistent_class
class iDDPMLoss:
    """iDDPM's training objective for an eps-predicting network with learned variances (the network must
    accept net(x_t, None, labels, timesteps=t, augment_labels=...) and return the raw [N, 2C] output, as
    training.networks_iddpm.iDDPMDiscretePrecond does).

    schedule, T -- the diffusion ('cosine' or 'linear', T steps); must match the network's.
    loss_type -- 'hybrid' (L_simple + lambda L_vlb, Eq. 16), 'vlb' (L_vlb alone, Eq. 18) or 'simple'
      (L_simple alone; the variance channels then get no gradient).
    lambda_vlb -- lambda of Eq. 16 (0.001).
    importance_sampling -- for 'vlb': draw t by LossSecondMomentSampler instead of uniformly.

    Returns the per-element loss [N, C, H, W]; its mean over C, H, W is iDDPM's per-image loss. Random draws,
    in order: t (torch.randint, or the importance sampler's multinomial), the augmentation pipe, then
    torch.randn_like for eps.
    """

    def __init__(self, schedule: str = 'cosine', T: int = 1000, loss_type: str = 'hybrid', lambda_vlb: float = 0.001,
                 importance_sampling: bool = False):
        if loss_type not in ('hybrid', 'vlb', 'simple'):
            raise ValueError(f'unknown iDDPM loss_type {loss_type!r}; expected hybrid, vlb or simple')
        if importance_sampling and loss_type != 'vlb':
            raise ValueError('importance sampling of t is for loss_type="vlb" (the paper does not use it with L_hybrid)')
        self.schedule = schedule
        self.T = int(T)
        self.loss_type = loss_type
        self.lambda_vlb = float(lambda_vlb)
        self.importance_sampling = bool(importance_sampling)
        self.sampler = LossSecondMomentSampler(self.T) if importance_sampling else None
        self._diffusion = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_diffusion'] = None  # tables are rebuilt on demand, not pickled
        return state

    def diffusion(self) -> Diffusion:
        if self._diffusion is None:
            self._diffusion = make_diffusion(self.schedule, self.T)
        return self._diffusion

    def _check_net(self, net) -> None:
        inner = _unwrap(net)
        for attr, mine in (('schedule', self.schedule), ('M', self.T)):
            theirs = getattr(inner, attr, None)
            if theirs is not None and theirs != mine:
                raise ValueError(f'iDDPMLoss has {attr}={mine!r} but the network has {theirs!r}; build both from one preset')

    def __call__(self, net, images, labels=None, augment_pipe=None):
        self._check_net(net)
        d = self.diffusion()
        N = images.shape[0]
        if self.sampler is not None:
            t, weights = self.sampler.sample(N, images.device)
        else:
            t, weights = torch.randint(self.T, [N], device=images.device), None
        augment_labels = None
        if augment_pipe is not None:
            images, augment_labels = augment_pipe(images)
        x_start = images.to(torch.float64)
        noise = torch.randn_like(x_start)
        x_t = q_sample(d, x_start, t, noise)
        model_output = net(x_t.to(torch.float32), None, labels, timesteps=t, augment_labels=augment_labels)
        if self.loss_type == 'hybrid':
            loss = hybrid_loss_per_dim(d, model_output, x_start, t, noise, self.lambda_vlb)[0]
        elif self.loss_type == 'simple':
            loss = (noise - model_output.to(torch.float64)[:, :images.shape[1]]) ** 2
        else:
            loss = vlb_loss_per_dim(d, model_output, x_start, t, noise)
            if self.sampler is not None:
                self.sampler.update(_gather_all(t), _gather_all(mean_flat(loss).detach()))
                loss = loss * weights.reshape(-1, 1, 1, 1)
        return loss.to(torch.float32)

#----------------------------------------------------------------------------
# Sampling (Algorithm 2 of DDPM with learned variances; DDIM, Song et al. 2021 Eq. 12).

def p_sample_step(d: Diffusion, model_output, x, i, z, clip_denoised: bool = True):
    """x_{i-1} = mean + [i != 0] exp(log Sigma / 2) z. Returns (x_{i-1}, pred_xstart)."""
    out = p_mean_variance(d, model_output, x, i, clip_denoised)
    nonzero = (i != 0).to(torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    return out['mean'] + nonzero * torch.exp(0.5 * out['log_variance']) * z, out['pred_xstart']

def ddim_sigma(alpha_bar, alpha_bar_prev, eta: float):
    """sigma_i = eta sqrt((1 - abar_{i-1})/(1 - abar_i)) sqrt(1 - abar_i/abar_{i-1}) (DDIM Eq. 16)."""
    return eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)

def ddim_step(d: Diffusion, model_output, x, i, z, eta: float = 0.0, clip_denoised: bool = True):
    """x_{i-1} = x^_0 sqrt(abar_{i-1}) + sqrt(1 - abar_{i-1} - sigma^2) eps' + [i != 0] sigma z (DDIM Eq. 12),
    eps' re-derived from the (clipped) x^_0. Returns (x_{i-1}, pred_xstart)."""
    out = p_mean_variance(d, model_output, x, i, clip_denoised)
    eps = predict_eps_from_xstart(d, x, i, out['pred_xstart'])
    alpha_bar = extract(d.alphas_cumprod, i, x)
    alpha_bar_prev = extract(d.alphas_cumprod_prev, i, x)
    sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
    mean = out['pred_xstart'] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    nonzero = (i != 0).to(torch.float64).reshape(-1, *[1] * (x.ndim - 1))
    return mean + nonzero * sigma * z, out['pred_xstart']

def sample_loop(model_fn, d: Diffusion, x_T, randn_like=torch.randn_like, eta: float | None = None,
                clip_denoised: bool = True):
    """Run the respaced chain i = T'-1 .. 0 from x_T (float64): ancestral steps (eta None) or DDIM with eta.
    model_fn(x, t) gets the original timesteps t [N] (int64) and returns the raw output. Each step draws
    randn_like(x) once, also where the draw is multiplied by zero (the reference's noise protocol)."""
    x = x_T.to(torch.float64)
    for i in reversed(range(d.num_timesteps)):
        index = torch.full([x.shape[0]], i, dtype=torch.int64, device=x.device)
        model_output = model_fn(x, d.model_timesteps(index))
        z = randn_like(x)
        if eta is None:
            x, _ = p_sample_step(d, model_output, x, index, z, clip_denoised)
        else:
            x, _ = ddim_step(d, model_output, x, index, z, eta, clip_denoised)
    return x

#----------------------------------------------------------------------------
# Likelihood: the full bound in bits/dim (iDDPM's calc_bpd_loop).

def calc_bpd_loop(model_fn, d: Diffusion, x_start, randn_like=torch.randn_like, clip_denoised: bool = True) -> dict:
    """-log p(x_0) <= L_vlb = L_T + sum_t L_t in bits/dim (Eq. 4-6), every term evaluated once, for 8-bit
    images x_start in [-1, 1]. Step j (t = T'-1-j) draws z = randn_like(x_start), x_t = q_sample(x_0, t, z).
    Returns per-image total_bpd, prior_bpd and, per loop column j, vb, xstart_mse, mse."""
    x_start = x_start.to(torch.float64)
    vb, xstart_mse, mse = [], [], []
    for t in reversed(range(d.num_timesteps)):
        t_batch = torch.full([x_start.shape[0]], t, dtype=torch.int64, device=x_start.device)
        noise = randn_like(x_start)
        x_t = q_sample(d, x_start, t_batch, noise)
        terms, out = vb_terms_per_dim(d, model_fn(x_t, d.model_timesteps(t_batch)), x_start, x_t, t_batch, clip_denoised)
        vb.append(mean_flat(terms))
        xstart_mse.append(mean_flat((out['pred_xstart'] - x_start) ** 2))
        mse.append(mean_flat((predict_eps_from_xstart(d, x_t, t_batch, out['pred_xstart']) - noise) ** 2))
    vb, xstart_mse, mse = torch.stack(vb, dim=1), torch.stack(xstart_mse, dim=1), torch.stack(mse, dim=1)
    prior = prior_bpd(d, x_start)
    return dict(total_bpd=vb.sum(dim=1) + prior, prior_bpd=prior, vb=vb, xstart_mse=xstart_mse, mse=mse)

#----------------------------------------------------------------------------
# Networks: the diffusion and the raw output of an iDDPM network, the samplers of the registry, bits/dim.

def _is_iddpm_net(net) -> bool:
    """iDDPMDiscretePrecond or EDM's iDDPMPrecond (a step count M, a table u and a backbone). A guided
    denoiser is not a Module (it forwards attributes, so the type is tested, not hasattr)."""
    return isinstance(net, torch.nn.Module) and hasattr(net, 'M') and hasattr(net, 'model') and isinstance(getattr(net, 'u', None), torch.Tensor)

def _check_iddpm_net(net, what: str) -> None:
    if not _is_iddpm_net(net):
        raise ValueError(f'{what} needs an iDDPM network (iDDPMDiscretePrecond or iDDPMPrecond, with its variance '
                         f'outputs), got {type(net).__name__}')

def diffusion_of(net, spacing=None) -> Diffusion:
    """The process a network was trained on, respaced by `spacing`: iDDPMDiscretePrecond records schedule,
    M and learn_sigma; EDM's iDDPMPrecond (ADM) is cosine with M steps and learned variances."""
    _check_iddpm_net(net, 'diffusion_of')
    var_type = 'learned_range' if getattr(net, 'learn_sigma', True) else 'fixed_large'
    return make_diffusion(getattr(net, 'schedule', 'cosine'), int(net.M), spacing, var_type)

def model_fn_of(net, class_labels=None):
    """(x_t, t) -> the network's raw output (float64) at original steps t, as the functions above expect."""
    _check_iddpm_net(net, 'model_fn_of')
    if hasattr(net, 'raw'):
        return lambda x, t: net.raw(x, t, class_labels).to(torch.float64)
    # EDM's iDDPMPrecond: its backbone takes c_noise = the step index and one-hot labels.
    def model_fn(x, t):
        labels = None
        if net.label_dim:
            labels = torch.zeros([1, net.label_dim], device=x.device) if class_labels is None else class_labels.to(torch.float32)
        return net.model(x.to(torch.float32), t.to(torch.float32), class_labels=labels).to(torch.float64)
    return model_fn

def _spacing(num_steps, spacing):
    """spacing ('ddim50', '10,15', [25]) if given, else num_steps evenly spread steps (section count N)."""
    return spacing if spacing is not None else [int(num_steps)]

def denoiser_model_fn(denoise, d: Diffusion, class_labels=None):
    """(x_t, t) -> eps from any EDM denoiser D(x; sigma) (Eq. 7 of EDM with the VP scaling): at step t,
    sigma = sqrt(1/abar_t - 1), x = x_t / sqrt(abar_t) and eps = (x - D(x; sigma)) / sigma."""
    sigma_of = torch.zeros(d.original_T, dtype=torch.float64)
    sigma_of[torch.as_tensor(d.timestep_map)] = (1 / d.alphas_cumprod - 1).sqrt()
    def model_fn(x, t):
        sigma = sigma_of[int(t[0])]  # the whole batch is at one step
        x_scaled = x * (sigma ** 2 + 1).sqrt()
        return (x_scaled - denoise(x_scaled, sigma, class_labels).to(torch.float64)) / sigma
    return model_fn

def _sampling_process(net, class_labels, num_steps, spacing):
    """(diffusion, model_fn) for the registry samplers. An iDDPM network is evaluated raw, with its learned
    variances (exactly iDDPM). Any other denoiser, or a guided one (generate_images hands the samplers a
    GuidedDenoiser), is evaluated through D(x; sigma) on the network's process (cosine, M = 1000 unless it
    says otherwise) with fixed variances beta_t ('fixed_large', iDDPM's choice without learned sigmas)."""
    spacing = _spacing(num_steps, spacing)
    denoise = net
    if _is_iddpm_net(denoise):
        return diffusion_of(denoise, spacing), model_fn_of(denoise, class_labels)
    d = make_diffusion(getattr(net, 'schedule', 'cosine'), int(getattr(net, 'M', 1000)), spacing, 'fixed_large')
    return d, denoiser_model_fn(denoise, d, class_labels)

def iddpm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=50, spacing=None,
                  clip_denoised=True):
    """iDDPM's ancestral sampler (p_sample_loop) on the process respaced to `num_steps` evenly spread steps,
    or to `spacing` ('ddimN', section counts '10,15'). x_T = latents (N(0, I)); one randn_like per step."""
    d, model_fn = _sampling_process(net, class_labels, num_steps, spacing)
    return sample_loop(model_fn, d, latents, randn_like, eta=None, clip_denoised=clip_denoised)

def iddpm_ddim_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=50, spacing=None,
                       eta=0.0, clip_denoised=True):
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity eta (0: deterministic) on the respaced process, as
    iDDPM's ddim_sample_loop. Steps, x_T and the noise protocol as iddpm_sampler."""
    d, model_fn = _sampling_process(net, class_labels, num_steps, spacing)
    return sample_loop(model_fn, d, latents, randn_like, eta=float(eta), clip_denoised=clip_denoised)

def vlb_bits_per_dim(net, images: torch.Tensor, class_labels=None, randn_like=torch.randn_like,
                     clip_denoised: bool = True, spacing=None) -> tuple[torch.Tensor, int]:
    """Per-image negative log-likelihood bound (bits/dim) of uint8 images [B,C,H,W] by calc_bpd_loop on the
    network's process (optionally respaced, a looser bound). No dequantisation: the decoder is discrete.
    Returns (total bpd [B], network evaluations), like training.likelihood.nll_bits_per_dim."""
    d = diffusion_of(net, spacing)
    x_start = images.to(torch.float64) / 127.5 - 1
    out = calc_bpd_loop(model_fn_of(net, class_labels), d, x_start, randn_like, clip_denoised)
    return out['total_bpd'], d.num_timesteps

#----------------------------------------------------------------------------
# Presets as plain data (improved-diffusion README, "Models and hyperparameters"; iDDPM Appendix A).
# A record gives the network (class name + kwargs, as train.py's network_kwargs), the loss (class name +
# kwargs, loss_kwargs) and training defaults. `network_kwargs` is improved-diffusion's own UNetModel (the
# published architecture, parameter for parameter); `adm_network_kwargs` the same widths on EDM's DhariwalUNet
# (ADM: residual up/down blocks, 64 channels per attention head). Attention at 16x16 and 8x8, i.e. the
# downsampling rates 2, 4 at 32x32 and 4, 8 at 64x64. EMA 0.9999 per step, also as EDM's half-life:
# h = batch ln(0.5) / ln(0.9999) images.

def ema_halflife_kimg(ema_decay: float, batch: int) -> float:
    """The half-life (kimg) of a per-step EMA decay at a batch size: beta = 0.5^(batch / h)."""
    return batch * math.log(0.5) / math.log(ema_decay) / 1000

def _preset(img_resolution, channel_mult, attention_rates, dropout, model_channels=128, num_heads=4, lr=1e-4, batch=128):
    common = dict(class_name='training.networks_iddpm.iDDPMDiscretePrecond', M=4000, schedule='cosine', learn_sigma=True)
    return dict(
        img_resolution=img_resolution,
        network_kwargs=dict(common, model_type='UNetModel', model_channels=model_channels, channel_mult=list(channel_mult),
                            num_res_blocks=3, attention_resolutions=list(attention_rates), num_heads=num_heads,
                            use_scale_shift_norm=True, dropout=dropout),
        adm_network_kwargs=dict(common, model_type='DhariwalUNet', model_channels=model_channels, channel_mult=list(channel_mult),
                                num_blocks=3, attn_resolutions=[img_resolution // r for r in attention_rates], dropout=dropout),
        loss_kwargs=dict(class_name='training.iddpm.iDDPMLoss', schedule='cosine', T=4000, loss_type='hybrid', lambda_vlb=0.001),
        training=dict(lr=lr, batch=batch, ema_decay=0.9999, ema_halflife_kimg=ema_halflife_kimg(0.9999, batch), ema_rampup_ratio=None,
                      lr_rampup_kimg=0, augment=0),
    )

PRESETS = {
    'iddpm-cifar10': _preset(32, [1, 2, 2, 2], [2, 4], dropout=0.3),      # 52.5M parameters (UNetModel)
    'iddpm-imagenet64': _preset(64, [1, 2, 3, 4], [4, 8], dropout=0.0),   # 121M parameters (UNetModel)
}
