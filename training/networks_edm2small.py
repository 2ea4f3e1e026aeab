"""EDM2's configurations C, E and G at small scale ("Analyzing and Improving the Training Dynamics of
Diffusion Models", Karras et al. 2024, Table 1), after the public re-implementation FutureXiang/edm2 (the
"seed"): its U-Nets `UNetC`, `UNetE`, `UNetG` (constructor arguments `image_shape, n_channels, ch_mults,
is_attn, attn_channels_per_head, dropout, n_blocks`) inside its `EDM` wrapper (EDM preconditioning and the
learned loss weighting u(sigma), `reweight_mlp`). State_dict names are the seed's, so its checkpoints load.

The ladder (how the three differ; everything has no bias and no additive embedding):
- C: PyTorch Conv2d/Linear, pre-activation residual blocks GroupNorm(32) -> SiLU -> conv -> GroupNorm ->
  *(1 + Linear(emb)) -> SiLU -> dropout -> conv, plain sums and concatenations, cosine attention.
- E: C with magnitude-preserving learned layers: weights N(0,1) at init, used as normalize(w)/sqrt(fan_in),
  and in training mode *forced* weight normalisation (the stored weight is overwritten by normalize(w) on
  every forward, EDM2 config E); every block output clipped to +-256.
- G: E without any normalisation layer, with MP-SiLU, MP-sum / MP-concat (EDM2 Appendix B), pixel-normed
  encoder skip paths, scalar gains on the embedding modulation and on the output.

`EDM` also has the project's denoiser interface (`net(x, sigma, class_labels)`, `round_sigma`, `sigma_min`,
`sigma_max`, `img_resolution`, `img_channels`, `label_dim`); `EDMSmallLoss` is the seed's loss as a project
loss callable. `LADDER_RECIPES` are the seed's training recipes as data.

This module's source is embedded in network pickles; it imports only numpy, torch, the standard library and
torch_utils.persistence.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence

#----------------------------------------------------------------------------
# Pure functions.

def f32_sqrt(x):
    """sqrt in float32 (the seed's constants are float32 numbers)."""
    return np.sqrt(x, dtype=np.float32)

def normalize(w, eps=1e-4):
    """Unit RMS per output row (EDM2's normalize): w / (eps + ||w_i|| / sqrt(fan_in)) over all dims but the first."""
    dim = list(range(1, w.ndim))
    norm = torch.linalg.vector_norm(w, dim=dim, keepdim=True)
    return w / torch.add(eps, norm, alpha=f32_sqrt(norm.numel() / w.numel()))

def pixel_norm(x, dim=1, eps=1e-8):
    """x / sqrt(mean(x^2) + eps) over `dim`."""
    return x / torch.sqrt(torch.mean(x ** 2, dim=dim, keepdim=True) + eps)

def mp_silu(x):
    """SiLU / 0.596: unit output RMS for unit-normal input (config G)."""
    return F.silu(x) / 0.596

def mp_sum(a, b, t=0.3):
    """Magnitude-preserving sum ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (EDM2 Appendix B; G uses t = 0.3)."""
    wa = 1.0 - t
    return (wa * a + t * b) / f32_sqrt(wa ** 2 + t ** 2)

def mp_cat(a, b, t=0.5):
    """Magnitude-preserving concatenation over channels (EDM2 Appendix B): a and b contribute (1 - t) : t."""
    wa = 1.0 - t
    na, nb = a.shape[1], b.shape[1]
    c = torch.cat([wa * a / f32_sqrt(na), t * b / f32_sqrt(nb)], dim=1)
    return c * f32_sqrt(na + nb) / f32_sqrt(wa ** 2 + t ** 2)

def edm_small_coefficients(sigma, sigma_data=0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM preconditioning (Karras et al. 2022, Table 1), c_noise = ln(sigma)/4,
    in the seed's operation order (float32 sigma)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise

def edm_small_weight(sigma, sigma_data=0.5):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM's loss weight)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

def seed_epoch_lr(ep, lrate, warm_epoch, tref_epoch=None):
    """The seed's per-epoch learning rate (0-based epoch `ep`): linear warm-up lrate * (ep + 1) / warm_epoch
    for ep < warm_epoch, then lrate / sqrt(max(ep / tref_epoch, 1)) (EDM2's inverse square-root decay, config E, in
    epochs). tref_epoch=None: no decay (the seed's default t_ref = n_epoch is never reached)."""
    if ep < warm_epoch:
        return lrate * min((ep + 1.0) / warm_epoch, 1.0)
    if tref_epoch is None:
        return lrate
    return lrate / math.sqrt(max(ep / tref_epoch, 1.0))

def epoch_lr_schedule(cur_nimg, batch_size, ref_lr, epoch_kimg, warm_epoch=200, tref_epoch=None):
    """seed_epoch_lr in the training loop's lr_kwargs convention (func_name
    'training.networks_edm2small.epoch_lr_schedule'): epoch = cur_nimg // (epoch_kimg * 1000), the lr held
    for the whole epoch. epoch_kimg is the dataset size in thousands of images."""
    del batch_size
    ep = int(cur_nimg // max(round(epoch_kimg * 1000), 1))
    return float(seed_epoch_lr(ep, ref_lr, warm_epoch, tref_epoch))

#----------------------------------------------------------------------------
# Layers. Every module class is persistent (the safe loader admits only those and torch containers): C's
# LadderConv2d/LadderLinear are PyTorch's layers re-declared (bias-free, PyTorch's default init), E and G's are
# magnitude-preserving. A module's config ('C', 'E' or 'G') selects its variant. The seed's layer names carry a
# 'Ladder' prefix here: checkpoints name persistent classes by name alone, and Conv2d, UNetBlock, ... are taken
# by training/networks.py and networks_iddpm.py (state_dict keys are the seed's).

def _mp_weights(config):
    return config in ('E', 'G')   # forced weight normalisation, and the +-256 clip after every block

def _mp(config):
    return config == 'G'          # magnitude-preserving functions, no normalisation layers

def _forced_weight(layer):
    """normalize(w) / sqrt(fan_in); in training mode the stored weight first becomes normalize(w) (EDM2's
    forced weight normalisation)."""
    if layer.training:
        with torch.no_grad():
            layer.weight.copy_(normalize(layer.weight))
    return normalize(layer.weight) / f32_sqrt(layer.weight[0].numel())


@persistence.persistent_class
class LadderConv2d(torch.nn.Module):
    """Bias-free 2-D convolution. Config C: torch.nn.Conv2d's weight and init (kaiming_uniform_, a = sqrt 5);
    E, G: N(0,1) init and forced weight normalisation."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, config='C'):
        super().__init__()
        self.config = config
        self.padding = padding
        self.weight = torch.nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        if _mp_weights(config):
            with torch.no_grad():
                self.weight.copy_(torch.randn(self.weight.shape))
        else:
            torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        w = _forced_weight(self) if _mp_weights(self.config) else self.weight
        return F.conv2d(x, w, None, 1, self.padding)


@persistence.persistent_class
class LadderLinear(torch.nn.Module):
    """Bias-free linear layer; init and weight treatment as Conv2d."""

    def __init__(self, in_features, out_features, config='C'):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        if _mp_weights(config):
            with torch.no_grad():
                self.weight.copy_(torch.randn(self.weight.shape))
        else:
            torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        w = _forced_weight(self) if _mp_weights(self.config) else self.weight
        return F.linear(x, w)


@persistence.persistent_class
class LadderDropout(torch.nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training) if self.p > 0 else x


@persistence.persistent_class
class LadderGroupNorm(torch.nn.Module):
    """GroupNorm without affine parameters (eps 1e-5)."""

    def __init__(self, num_groups=32):
        super().__init__()
        self.num_groups = num_groups

    def forward(self, x):
        return F.group_norm(x, self.num_groups, eps=1e-5)


@persistence.persistent_class
class LadderSiLU(torch.nn.Module):
    def forward(self, x):
        return F.silu(x)


@persistence.persistent_class
class Gain(torch.nn.Module):
    """A learned scalar gain g (config G): 1 on the embedding modulation, 0 on the output."""

    def __init__(self, init=0.0):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.g


@persistence.persistent_class
class Fourier(torch.nn.Module):
    """cos(2 pi (f a + phi)) with fixed random f ~ N(0,1), phi ~ U(0,1); times sqrt(2) in config G (unit
    RMS). The seed stores f and phi as parameters with requires_grad=False; here they are buffers (the same
    state_dict keys), so a training loop's requires_grad_(True) cannot make them trainable."""

    def __init__(self, embedding_size=256, mp=False):
        super().__init__()
        self.register_buffer('frequencies', torch.randn(embedding_size))
        self.register_buffer('phases', torch.rand(embedding_size))
        self.mp = mp

    def forward(self, a):
        b = torch.cos((2 * np.pi) * (a[:, None] * self.frequencies[None, :] + self.phases[None, :]))
        return b * f32_sqrt(2.0) if self.mp else b


def _act(config, x):
    return mp_silu(x) if _mp(config) else F.silu(x)


def _group_norm(x, groups=32):
    return F.group_norm(x, groups, eps=1e-5)

#----------------------------------------------------------------------------
# Blocks. State_dict names: res.{linear, gain, shortcut, conv1, conv2.1}, attn.{projection, output}.

@persistence.persistent_class
class LadderEmbedding(torch.nn.Module):
    """Noise embedding of width n_channels from c_noise: Fourier(n_channels / 4) -> Linear -> SiLU -> Linear
    -> SiLU (C, E); -> Linear -> MP-SiLU (G)."""

    def __init__(self, n_channels, config):
        super().__init__()
        self.config = config
        self.fourier = Fourier(n_channels // 4, mp=_mp(config))
        self.linear1 = LadderLinear(n_channels // 4, n_channels, config=config)
        if not _mp(config):
            self.linear2 = LadderLinear(n_channels, n_channels, config=config)

    def forward(self, c_noise):
        emb = _act(self.config, self.linear1(self.fourier(c_noise)))
        if not _mp(self.config):
            emb = F.silu(self.linear2(emb))
        return emb


@persistence.persistent_class
class Reweighting(torch.nn.Module):
    """The learned uncertainty u(sigma) = Linear(Fourier(256)(ln(sigma) / 4)) (EDM2's logvar)."""

    def __init__(self, config, n_channels=256):
        super().__init__()
        self.fourier = Fourier(n_channels, mp=_mp(config))
        self.linear = LadderLinear(n_channels, 1, config=config)

    def forward(self, c_noise):
        return self.linear(self.fourier(c_noise))


@persistence.persistent_class
class LadderResBlock(torch.nn.Module):
    """Residual block with multiplicative conditioning; `kind` 'enc' resamples with 2x2 average pooling
    ('down'), 'dec' with nearest 2x ('up')."""

    def __init__(self, in_channels, out_channels, emb_channels, dropout, resample, kind, config):
        super().__init__()
        self.config = config
        self.kind = kind
        self.resample = resample
        self.linear = LadderLinear(emb_channels, out_channels, config=config)
        if _mp(config):
            self.gain = Gain(1.0)
        if in_channels != out_channels:
            self.shortcut = LadderConv2d(in_channels, out_channels, 1, config=config)
        conv1_in = out_channels if (_mp(config) and kind == 'enc') else in_channels
        self.conv1 = LadderConv2d(conv1_in, out_channels, 3, padding=1, config=config)
        self.conv2 = torch.nn.Sequential(LadderDropout(dropout),
                                         LadderConv2d(out_channels, out_channels, 3, padding=1, config=config))

    def _resample(self, x):
        if not self.resample:
            return x
        if self.kind == 'enc':
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2, mode='nearest')

    def _shortcut(self, x):
        return self.shortcut(x) if hasattr(self, 'shortcut') else x

    def _modulation(self, emb):
        emb = self.linear(emb)
        if _mp(self.config):
            emb = self.gain(emb)
        return (1 + emb)[:, :, None, None]

    def forward(self, x, emb):
        act = lambda x: _act(self.config, x)
        if not _mp(self.config):  # C, E: pre-activation with GroupNorm, plain sum
            r = _group_norm(self.conv1(self._resample(act(_group_norm(x)))))
            r = self.conv2(act(r * self._modulation(emb)))
            return self._shortcut(self._resample(x)) + r
        if self.kind == 'enc':  # G encoder: the pixel-normed skip path starts the residual branch
            main = pixel_norm(self._shortcut(self._resample(x)))
            r = self.conv1(act(main))
        else:                   # G decoder: conv1 reads the input, the 1x1 shortcut comes after
            main = self._resample(x)
            r = self.conv1(act(main))
            main = self._shortcut(main)
        r = self.conv2(act(r * self._modulation(emb)))
        return mp_sum(main, r)


@persistence.persistent_class
class LadderAttentionBlock(torch.nn.Module):
    """Cosine self-attention: 1x1 qkv projection grouped per head as [q|k|v], q, k, v pixel-normalised over
    the head dimension, q and k scaled by d_k^(-1/4), softmax over keys, 1x1 output conv; joined by a plain
    sum (C, E) or mp_sum (G). attn_channels_per_head None: one head."""

    def __init__(self, n_channels, d_k, config):
        super().__init__()
        self.config = config
        d_k = n_channels if d_k is None else d_k
        if n_channels % d_k != 0:
            raise ValueError(f'attn_channels_per_head={d_k} does not divide {n_channels} channels')
        self.n_heads = n_channels // d_k
        self.d_k = d_k
        self.scale = 1 / math.sqrt(math.sqrt(d_k))
        self.projection = LadderConv2d(n_channels, n_channels * 3, 1, config=config)
        self.output = LadderConv2d(n_channels, n_channels, 1, config=config)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.projection(x).flatten(2).permute(0, 2, 1).reshape(b, h * w, self.n_heads, 3 * self.d_k)
        q, k, v = (pixel_norm(t, dim=3) for t in qkv.chunk(3, dim=-1))
        attn = torch.einsum('bihd,bjhd->bijh', q * self.scale, k * self.scale).softmax(dim=2)
        res = torch.einsum('bijh,bjhd->bihd', attn, v).reshape(b, h * w, c).permute(0, 2, 1).reshape(b, c, h, w)
        res = self.output(res)
        return mp_sum(x, res) if _mp(self.config) else x + res


@persistence.persistent_class
class LadderUNetBlock(torch.nn.Module):
    """A residual block, optional attention, and (E, G) the +-256 clip. `up` marks the up-sampling decoder
    blocks, which take no U-Net skip."""

    def __init__(self, in_channels, out_channels, emb_channels, dropout, resample, has_attn, attn_channels_per_head,
                 kind, config):
        super().__init__()
        self.config = config
        self.up = resample and kind == 'dec'
        self.res = LadderResBlock(in_channels, out_channels, emb_channels, dropout, resample, kind, config)
        if has_attn:
            self.attn = LadderAttentionBlock(out_channels, attn_channels_per_head, config)

    def forward(self, x, emb):
        x = self.res(x, emb)
        if hasattr(self, 'attn'):
            x = self.attn(x)
        if _mp_weights(self.config):
            x = torch.clip(x, -256, 256)
        return x

#----------------------------------------------------------------------------
# The U-Nets.

class _UNet(torch.nn.Module):
    """The seed's U-Net of config `CONFIG`. Per level: n_blocks - 1 encoder blocks and a down-sampling block
    (none at the lowest level), n_blocks decoder blocks and an up-sampling block (none at the highest);
    middle: a block with attention and a plain one. The input gets a constant-ones channel.

    forward(x, t, ret_activation=False): `t` is c_noise = ln(sigma)/4 of shape [N] (or [1], broadcast);
    with ret_activation, also {'out_k': output of the k-th decoder block of `up`}."""
    CONFIG = None

    def __init__(self, image_shape=(3, 32, 32), n_channels=128, ch_mults=(1, 2, 2, 2),
                 is_attn=(False, True, False, False), attn_channels_per_head=None, dropout=0.1, n_blocks=3):
        super().__init__()
        if len(is_attn) != len(ch_mults):
            raise ValueError(f'is_attn has {len(is_attn)} entries, ch_mults {len(ch_mults)}; give one per level')
        if n_blocks < 2:
            raise ValueError(f'n_blocks must be at least 2 (got {n_blocks})')
        self.image_shape = list(image_shape)
        config = self.CONFIG
        emb_channels = n_channels * 4
        block = lambda cin, cout, resample, attn, kind: LadderUNetBlock(
            cin, cout, emb_channels, dropout, resample, attn, attn_channels_per_head, kind, config)

        self.image_proj = LadderConv2d(image_shape[0] + 1, n_channels, 3, padding=1, config=config)
        self.embedding = LadderEmbedding(emb_channels, config)

        down, skips = [], [n_channels]
        cin = n_channels
        for level, mult in enumerate(ch_mults):
            cout = n_channels * mult
            for _ in range(n_blocks - 1):
                down.append(block(cin, cout, False, is_attn[level], 'enc'))
                skips.append(cout)
                cin = cout
            if level < len(ch_mults) - 1:
                down.append(block(cout, cout, True, False, 'enc'))
                skips.append(cout)
        self.down = torch.nn.ModuleList(down)
        self.middle1 = block(cin, cin, False, True, 'enc')
        self.middle2 = block(cin, cin, False, False, 'enc')

        up = []
        for level in reversed(range(len(ch_mults))):
            cout = n_channels * ch_mults[level]
            for _ in range(n_blocks):
                up.append(block(cin + skips.pop(), cout, False, is_attn[level], 'dec'))
                cin = cout
            if level > 0:
                up.append(block(cout, cout, True, False, 'dec'))
        self.up = torch.nn.ModuleList(up)

        if _mp(config):
            self.final = torch.nn.Sequential(LadderConv2d(cin, image_shape[0], 3, padding=1, config=config), Gain(0.0))
        else:
            self.final = torch.nn.Sequential(LadderGroupNorm(8), LadderSiLU(),
                                             LadderConv2d(cin, image_shape[0], 3, padding=1, config=config))

    def forward(self, x, t, ret_activation=False):
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        x = self.image_proj(x)
        emb = self.embedding(t)
        skips = [x]
        for m in self.down:
            x = m(x, emb)
            skips.append(x)
        x = self.middle2(self.middle1(x, emb), emb)
        acts = {}
        for m in self.up:
            if not m.up:
                s = skips.pop()
                x = mp_cat(x, s) if _mp(self.CONFIG) else torch.cat([x, s], dim=1)
            x = m(x, emb)
            acts[f'out_{len(acts) + 1}'] = x
        x = self.final(x)
        return (x, acts) if ret_activation else x

    def get_reweighting(self):
        return Reweighting(self.CONFIG)

    @staticmethod
    def forward_reweighting(mlp, sigma):
        """u(sigma) as [N,1,1,1] from sigma of any shape."""
        return mlp(sigma.flatten().log() / 4)[:, :, None, None]


@persistence.persistent_class
class UNetC(_UNet):
    """Config C: standard layers (see the module docstring)."""
    CONFIG = 'C'

@persistence.persistent_class
class UNetE(_UNet):
    """Config E: C with forced weight normalisation and the +-256 clip."""
    CONFIG = 'E'

@persistence.persistent_class
class UNetG(_UNet):
    """Config G: E without normalisation layers, magnitude-preserving functions and learned gains."""
    CONFIG = 'G'

NET_TYPES = {'UNetC': UNetC, 'UNetE': UNetE, 'UNetG': UNetG}

#----------------------------------------------------------------------------
# The EDM wrapper.

@persistence.persistent_class
class EDM(torch.nn.Module):
    """The seed's EDM module: `nn_model` (UNetC/E/G built from net_type and the seed's network arguments)
    and `reweight_mlp` (u(sigma)). D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4) (Karras et al. 2022,
    Eq. 7 and Table 1).

    img_resolution, img_channels, label_dim -- the project's network interface (image_shape =
        [img_channels, img_resolution, img_resolution]); the seed's networks are unconditional (label_dim 0).
    net_type -- 'UNetC', 'UNetE' or 'UNetG'.
    n_channels, ch_mults, is_attn, attn_channels_per_head, dropout, n_blocks -- the U-Net's (the seed's names).
    sigma_data, p_mean, p_std, sigma_min, sigma_max, rho, S_min, S_max, S_noise -- the seed's `diffusion`
        block (p_mean / p_std are used by EDMSmallLoss's defaults only through train.py; S_* are unused).

    forward(x, sigma, class_labels=None, return_logvar=False) is the project's denoiser; D_x is the seed's.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, net_type='UNetC', n_channels=128,
                 ch_mults=(1, 2, 2, 2), is_attn=(False, True, False, False), attn_channels_per_head=None,
                 dropout=0.1, n_blocks=3, sigma_data=0.5, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80,
                 rho=7, S_min=0.01, S_max=1, S_noise=1.007):
        super().__init__()
        if net_type not in NET_TYPES:
            raise ValueError(f'unknown net_type {net_type!r}; expected one of {", ".join(NET_TYPES)}')
        if label_dim:
            raise ValueError(f'the C/E/G networks are unconditional; got label_dim={label_dim} (train with --cond=0)')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = 0
        self.net_type = net_type
        self.sigma_data = sigma_data
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho
        self.S_min, self.S_max, self.S_noise = S_min, S_max, S_noise
        self.nn_model = NET_TYPES[net_type](
            image_shape=[img_channels, img_resolution, img_resolution], n_channels=n_channels, ch_mults=ch_mults,
            is_attn=is_attn, attn_channels_per_head=attn_channels_per_head, dropout=dropout, n_blocks=n_blocks)
        self.reweight_mlp = self.nn_model.get_reweighting()

    def D_x(self, x_noised, sigma, use_amp=False, ret_activation=False):
        """The seed's denoiser: float32 x and sigma (sigma broadcastable to [N,1,1,1], or one scalar); with
        ret_activation also {'out_k': k-th decoder block's output}. use_amp: the U-Net under CUDA autocast."""
        x_noised = x_noised.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x_noised.device).to(torch.float32)
        c_skip, c_out, c_in, c_noise = edm_small_coefficients(sigma, self.sigma_data)
        with torch.autocast('cuda', enabled=bool(use_amp) and x_noised.device.type == 'cuda'):
            F_x = self.nn_model(c_in * x_noised, c_noise.flatten(), ret_activation)
        if ret_activation:
            return c_skip * x_noised + c_out * F_x[0], F_x[1]
        return c_skip * x_noised + c_out * F_x

    def logvar(self, sigma):
        """u(sigma) as [N,1,1,1]."""
        return self.nn_model.forward_reweighting(self.reweight_mlp, torch.as_tensor(sigma).to(torch.float32))

    def forward(self, x, sigma, class_labels=None, return_logvar=False, augment_labels=None):
        if augment_labels is not None:
            raise ValueError('the C/E/G networks take no augmentation labels (train with --augment=0)')
        del class_labels  # unconditional
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        D_x = self.D_x(x, sigma)
        if not return_logvar:
            return D_x
        return D_x, self.logvar(sigma)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def edm_from_config(config):
    """An EDM from one of the seed's configs (a parsed config/<dataset>/<C|E|G>.yaml: `net_type`, `network`,
    `diffusion`), e.g. ../shared/golden/edm2small_configs.json's entries."""
    network = dict(config['network'])
    image_shape = network.pop('image_shape')
    if image_shape[1] != image_shape[2]:
        raise ValueError(f'image_shape {image_shape}: only square images are supported')
    return EDM(img_resolution=image_shape[1], img_channels=image_shape[0], net_type=config['net_type'],
               **network, **config['diffusion'])

#----------------------------------------------------------------------------
# The loss.

@persistence.persistent_class
class EDMSmallLoss:
    """The seed's loss (EDM.forward) as a project loss: ln(sigma) ~ N(P_mean, P_std^2),

        L = lambda(sigma) (y - D(y + sigma n; sigma))^2 / e^u(sigma) + u(sigma),

    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, u the network's reweight_mlp (EDM2's
    uncertainty weighting). `images` are in [-1, 1] (the seed maps its [0, 1] input there itself). Returns the
    unreduced loss (the seed returns its mean). Draws torch.randn([N,1,1,1]) for sigma, then torch.randn_like
    for the noise (the seed's order). Augmentation is refused: the networks have no augmentation labels."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        del labels
        if augment_pipe is not None:
            raise ValueError('EDMSmallLoss takes no augmentation pipe (the C/E/G networks have no augmentation labels)')
        rnd_normal = torch.randn((images.shape[0], 1, 1, 1), device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        noise = torch.randn_like(images)
        x_noised = images + noise * sigma
        weight = edm_small_weight(sigma, self.sigma_data)
        denoised, u = net(x_noised, sigma, None, return_logvar=True)
        return weight * ((images - denoised) ** 2) / u.exp() + u

#----------------------------------------------------------------------------
# The seed's recipes as data (config/<dataset>/<C|E>.yaml of the newest commit; G.yaml of commit ffdda02, with
# today's train.py rule), plus the quick-start digits. `network` holds EDM's arguments, `train` the seed's
# training values in its units (epochs, per-step EMA decay), `linear` its probe settings.

_DIFFUSION = dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80, rho=7,
                  S_min=0.01, S_max=1, S_noise=1.007)
_CIFAR_NET = dict(n_channels=128, ch_mults=[1, 2, 2, 2], is_attn=[False, True, False, False],
                  attn_channels_per_head=None, dropout=0.13, n_blocks=3)
# The digits (scripts/quickstart.py: 1,797 16x16 grayscale images): the EDM quick start's size (32 channels x
# [1,2,2], one block per level: n_blocks 2 here), attention at 8x8, no dropout.
_DIGITS_NET = dict(n_channels=32, ch_mults=[1, 2, 2], is_attn=[False, True, False],
                   attn_channels_per_head=None, dropout=0.0, n_blocks=2)
_LINEAR = dict(n_epoch=15, batch_size=128, lrate=0.001, timestep=4, blockname='out_6')


def _recipe(net_type, network, n_epoch, batch_size, lrate, warm_epoch, tref_epoch, dataset_size, xflip=True,
            ema=0.9993, linear=None):
    return dict(network=dict(net_type=net_type, **network, **_DIFFUSION),
                train=dict(n_epoch=n_epoch, batch_size=batch_size, lrate=lrate, warm_epoch=warm_epoch,
                           tref_epoch=tref_epoch, dataset_size=dataset_size, ema=ema, xflip=xflip,
                           P_mean=-1.2, P_std=1.2),
                linear=dict(_LINEAR, **(linear or {})))

# Digits: 40 kimg at batch 64 (the EDM quick start's budget) = 22 epochs of 1,797 images. Warm-up 2 epochs
# and t_ref 4 epochs keep the seed's proportions (warm-up 1/10 of its C run, t_ref 1/5 of its E run). No
# x-flips (a mirrored digit is another symbol). The probe's block is out_2, the second decoder block at
# 1/4 resolution, as out_6 is at CIFAR's; its 490 epochs of 1,438 images (an 80% split) give the classifier
# the seed's number of steps on CIFAR-10 (15 x 391); 15 epochs would leave it far from converged.
_DIGITS = dict(n_epoch=22, batch_size=64, warm_epoch=2, dataset_size=1797, xflip=False,
               linear=dict(blockname='out_2', n_epoch=490))

LADDER_RECIPES = {
    'cifar10/C': _recipe('UNetC', _CIFAR_NET, 1000, 512, 4e-4, 200, None, 50000),
    'cifar10/E': _recipe('UNetE', _CIFAR_NET, 2000, 512, 2e-2, 200, 400, 50000),
    'cifar10/G': _recipe('UNetG', _CIFAR_NET, 2000, 128, 5e-3, 200, 400, 50000),
    'cifar100/C': _recipe('UNetC', _CIFAR_NET, 1000, 512, 4e-4, 200, None, 50000),
    'cifar100/E': _recipe('UNetE', _CIFAR_NET, 2000, 512, 2e-2, 200, 400, 50000),
    'cifar100/G': _recipe('UNetG', _CIFAR_NET, 2000, 128, 5e-3, 200, 400, 50000),
    'digits/C': _recipe('UNetC', _DIGITS_NET, lrate=4e-4, tref_epoch=None, **_DIGITS),
    'digits/E': _recipe('UNetE', _DIGITS_NET, lrate=2e-2, tref_epoch=4, **_DIGITS),
    'digits/G': _recipe('UNetG', _DIGITS_NET, lrate=5e-3, tref_epoch=4, **_DIGITS),
}


def ema_halflife_kimg(beta, batch_size):
    """The half-life (thousands of images) of a per-step EMA with decay beta: batch * ln(1/2) / ln(beta).
    The seed's 0.9993 is 990 steps: 507 kimg at batch 512, 63 kimg at batch 64."""
    return batch_size * math.log(0.5) / math.log(beta) / 1000


def recipe_training_kwargs(key):
    """The training loop's kwargs for LADDER_RECIPES[key]: network_kwargs (without the dataset's shape),
    loss_kwargs, lr_kwargs, ema_kwargs (the seed's per-step EMA with warm-up), batch_size, total_kimg, xflip."""
    r = LADDER_RECIPES[key]
    t = r['train']
    network_kwargs = dict(class_name='training.networks_edm2small.EDM', **r['network'])
    loss_kwargs = dict(class_name='training.networks_edm2small.EDMSmallLoss', P_mean=t['P_mean'], P_std=t['P_std'],
                       sigma_data=r['network']['sigma_data'])
    lr_kwargs = dict(func_name='training.networks_edm2small.epoch_lr_schedule', ref_lr=t['lrate'],
                     epoch_kimg=t['dataset_size'] / 1000, warm_epoch=t['warm_epoch'], tref_epoch=t['tref_epoch'])
    return dict(network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, lr_kwargs=lr_kwargs,
                ema_kwargs=dict(class_name='training.ema.WarmupEMA', beta=t['ema']),
                batch_size=t['batch_size'], total_kimg=t['n_epoch'] * t['dataset_size'] / 1000, xflip=t['xflip'])

#----------------------------------------------------------------------------
# What train.py's architecture table needs for --arch=edm2small-{c,e,g} (its records are in
# training/presets.py; the option names are train.py's). The network's img_resolution / img_channels /
# label_dim come from the dataset as for every family.

def ladder_network_kwargs(net_type, cbase=None, cres=None, blocks=None, dropout=None, attn_levels=None,
                          sigma_data=None):
    """network_kwargs for train.py (the architecture record's network_builder): the seed's CIFAR layout (128
    channels x [1,2,2,2], 3 blocks, attention at the second level, dropout 0.13) with --cbase/--cres/--blocks/
    --dropout/--sigma_data applied (attention stays at level 1 unless attn_levels lists the levels)."""
    ch_mults = list(cres) if cres is not None else list(_CIFAR_NET['ch_mults'])
    levels = [1] if attn_levels is None else list(attn_levels)
    diffusion = dict(_DIFFUSION, **({} if sigma_data is None else dict(sigma_data=sigma_data)))
    return dict(class_name='training.networks_edm2small.EDM', net_type=net_type,
                n_channels=cbase if cbase is not None else _CIFAR_NET['n_channels'], ch_mults=ch_mults,
                is_attn=[i in levels for i in range(len(ch_mults))], attn_channels_per_head=None,
                dropout=dropout if dropout is not None else _CIFAR_NET['dropout'],
                n_blocks=blocks if blocks is not None else _CIFAR_NET['n_blocks'], **diffusion)


def ladder_lr_schedule(cur_nimg, batch_size, ref_lr, epoch_kimg, rampup_kimg=10000, ref_batches=None):
    """epoch_lr_schedule with its warm-up and decay in train.py's units (--lr-rampup in kimg, --decay in
    batches, as EDM2's isqrt schedule): warm_epoch = rampup_kimg / epoch_kimg epochs, tref_epoch = ref_batches *
    batch_size / (1000 epoch_kimg) epochs (ref_batches None or 0: no decay, the seed's config C). The lr is still
    set per epoch; the seed's recipes convert exactly (recipe_options). epoch_kimg comes from the dataset."""
    warm_epoch = rampup_kimg / epoch_kimg
    tref_epoch = ref_batches * batch_size / 1000 / epoch_kimg if ref_batches else None
    return epoch_lr_schedule(cur_nimg, batch_size, ref_lr, epoch_kimg, warm_epoch, tref_epoch)


def recipe_options(key):
    """LADDER_RECIPES[key] as train.py option values (a --preset): the network through --cbase/--cres/--blocks/
    --dropout, warm-up as --lr-rampup = warm_epoch epochs in kimg, t_ref as --decay = tref_epoch epochs in
    batches (left out for C: no decay), the duration n_epoch epochs. The seed's per-step EMA (beta 0.9993) is
    the architecture's own."""
    r, t = LADDER_RECIPES[key], LADDER_RECIPES[key]['train']
    n = r['network']
    options = dict(arch=f'edm2small-{n["net_type"][-1].lower()}', cond=False,
                   duration=t['n_epoch'] * t['dataset_size'] / 1e6, batch=t['batch_size'], cbase=n['n_channels'],
                   cres=list(n['ch_mults']), blocks=n['n_blocks'], dropout=n['dropout'], lr=t['lrate'],
                   lr_rampup=t['warm_epoch'] * t['dataset_size'] / 1000, xflip=t['xflip'], augment=0.0,
                   P_mean=t['P_mean'], P_std=t['P_std'])
    if t['tref_epoch'] is not None:
        options['decay'] = t['tref_epoch'] * t['dataset_size'] / t['batch_size']
    return options

# --preset names: edm2small-{c,e,g}-{cifar10,cifar100,digits} (training/presets.py adds them to CONFIG_PRESETS).
LADDER_PRESETS = {f'edm2small-{k.split("/")[1].lower()}-{k.split("/")[0]}': recipe_options(k) for k in LADDER_RECIPES}

#----------------------------------------------------------------------------
