"""Improved DDPM's network family: improved-diffusion's own `UNetModel` (same constructor arguments and
state_dict names, so its released checkpoints load key for key) and `iDDPMDiscretePrecond`, the wrapper that
makes any eps/variance backbone (UNetModel, DhariwalUNet, SongUNet) both

- an EDM denoiser D(x; sigma) with iDDPMPrecond's formulas (Table 1 of EDM: c_in = 1/sqrt(sigma^2+1),
  c_out = -sigma, sigma snapped to the table u of the discrete process), for every sampler in
  training/sampling.py (with a DhariwalUNet backbone on the cosine schedule, `to_iddpm_precond` gives EDM's
  iDDPMPrecond itself, same state_dict), and
- a discrete-time iDDPM network: net(x_t, None, labels, timesteps=t) returns the raw [N, 2C] output
  (eps, v) at the original timestep t, for training.iddpm (loss, respaced/DDIM samplers, bits/dim).

Why a network of our own: DhariwalUNet (EDM's ADM) cannot express UNetModel exactly. UNetModel resamples with
separate strided/nearest convolutions instead of residual up/down blocks, sets attention by head count
instead of 64 channels per head, uses 32 normalisation groups at any width and splits qkv per head.

This module's source is embedded in network snapshots: it imports at module level only torch, numpy, the
standard library, `torch_utils.persistence` and names the paper's training.networks also has.
"""

import contextlib
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence
from training import networks

#----------------------------------------------------------------------------
# Initialisation: torch's default layer init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), zero for the layers
# improved-diffusion wraps in zero_module; skipped under no_weight_init (the safe loader uses it).

_init_state = threading.local()  # its own switch, not networks.py's: this module's embedded source must run
                                 # against the paper's training/networks.py, which has none

@contextlib.contextmanager
def no_weight_init():
    """Construct with uninitialised weights (no random numbers drawn), e.g. before loading a checkpoint."""
    prev = getattr(_init_state, 'skip', False)
    _init_state.skip = True
    try:
        yield
    finally:
        _init_state.skip = prev

def _param(shape, fan_in: int, init: str = 'default') -> torch.nn.Parameter:
    if getattr(_init_state, 'skip', False):
        return torch.nn.Parameter(torch.empty(shape))
    if init == 'zero':
        return torch.nn.Parameter(torch.zeros(shape))
    if init == 'ones':
        return torch.nn.Parameter(torch.ones(shape))
    if init == 'normal':
        return torch.nn.Parameter(torch.randn(shape))
    bound = 1 / math.sqrt(fan_in)
    return torch.nn.Parameter((torch.rand(shape) * 2 - 1) * bound)

#----------------------------------------------------------------------------
# Layers (state_dict names `weight`, `bias` as torch's).

@persistence.persistent_class
class Conv(torch.nn.Module):
    """Convolution over `dims` (1 or 2) spatial axes, kernel `kernel`, padding `padding`, stride `stride`."""
    def __init__(self, in_channels, out_channels, kernel, dims=2, stride=1, padding=0, zero_init=False):
        super().__init__()
        self.dims, self.stride, self.padding = dims, stride, padding
        fan_in = in_channels * kernel ** dims
        init = 'zero' if zero_init else 'default'
        self.weight = _param([out_channels, in_channels] + [kernel] * dims, fan_in, init)
        self.bias = _param([out_channels], fan_in, init)

    def forward(self, x):
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, self.weight.to(x.dtype), self.bias.to(x.dtype), stride=self.stride, padding=self.padding)

@persistence.persistent_class
class FullyConnected(torch.nn.Module):
    """improved-diffusion's linear() layer (named apart from training.networks.Linear: the loader picks classes by name)."""
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = _param([out_features, in_features], in_features)
        self.bias = _param([out_features], in_features)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

@persistence.persistent_class
class Embedding(torch.nn.Module):
    """Class embedding table [num_classes, dim] (torch.nn.Embedding's init and state)."""
    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.weight = _param([num_embeddings, embedding_dim], 1, 'normal')

    def forward(self, y):
        return F.embedding(y, self.weight)

@persistence.persistent_class
class GroupNorm32(torch.nn.Module):
    """GroupNorm with 32 groups at any width, computed in float32 (improved-diffusion's normalization())."""
    def __init__(self, num_channels, num_groups=32, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = _param([num_channels], 1, 'ones')
        self.bias = _param([num_channels], 1, 'zero')

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)

@persistence.persistent_class
class SiLU(torch.nn.Module):
    def forward(self, x):
        return F.silu(x)

@persistence.persistent_class
class Dropout(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, p=self.p, training=self.training)

@persistence.persistent_class
class Upsample(torch.nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (`conv`) when use_conv."""
    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.conv = Conv(channels, channels, 3, dims, padding=1) if use_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode='nearest')
        return self.conv(x) if self.conv is not None else x

@persistence.persistent_class
class Downsample(torch.nn.Module):
    """2x downsampling by a strided 3x3 convolution (`op`) when use_conv, else 2x2 average pooling."""
    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.op = Conv(channels, channels, 3, dims, stride=2, padding=1) if use_conv else None

    def forward(self, x):
        return self.op(x) if self.op is not None else F.avg_pool2d(x, 2)

def timestep_embedding(timesteps, dim: int, max_period: float = 10000) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = max_period^(-i/(dim/2)), i < dim/2 (zero-padded for odd dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb

@persistence.persistent_class
class ResBlock(torch.nn.Module):
    """Residual block: norm-SiLU-conv, + timestep embedding (added, or as scale/shift of the second norm
    when use_scale_shift_norm), norm-SiLU-dropout-conv(zero init), + skip (identity, 1x1, or 3x3 if use_conv)."""
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = torch.nn.Sequential(GroupNorm32(channels), SiLU(), Conv(channels, out_channels, 3, dims, padding=1))
        self.emb_layers = torch.nn.Sequential(SiLU(), FullyConnected(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = torch.nn.Sequential(GroupNorm32(out_channels), SiLU(), Dropout(dropout),
                                              Conv(out_channels, out_channels, 3, dims, padding=1, zero_init=True))
        if out_channels == channels:
            self.skip_connection = torch.nn.Identity()
        elif use_conv:
            self.skip_connection = Conv(channels, out_channels, 3, dims, padding=1)
        else:
            self.skip_connection = Conv(channels, out_channels, 1, dims)

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

@persistence.persistent_class
class AttentionBlock(torch.nn.Module):
    """Self-attention over positions with `num_heads` heads; qkv channels are laid out per head as
    [q, k, v] (improved-diffusion's order), q and k each scaled by ch^(-1/4)."""
    def __init__(self, channels, num_heads=1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = Conv(channels, channels * 3, 1, dims=1)
        self.proj_out = Conv(channels, channels, 1, dims=1, zero_init=True)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, -1, x.shape[2])
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
        weight = torch.einsum('bct,bcs->bts', q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        h = torch.einsum('bts,bcs->bct', weight, v).reshape(b, -1, x.shape[2])
        return (x + self.proj_out(h)).reshape(b, c, *spatial)

#----------------------------------------------------------------------------

@persistence.persistent_class
class UNetModel(torch.nn.Module):
    """improved-diffusion's U-Net (its constructor arguments and state_dict names).

    in_channels, out_channels -- image channels in; 2x image channels out for learned variances.
    model_channels -- base width; level i is model_channels * channel_mult[i] wide.
    num_res_blocks -- residual blocks per level (the decoder has one more).
    attention_resolutions -- downsampling *rates* (1, 2, 4, ...) at which blocks add attention
      (improved-diffusion's script turns "16,8" into image_size // 16, image_size // 8).
    dropout -- dropout in every residual block.
    channel_mult -- per-level width factors.
    conv_resample -- resample with learned convolutions (else nearest / average pooling).
    dims -- 2 (images); other values are not supported here.
    num_classes -- class count of a conditional model (an embedding added to the timestep embedding), or None.
    use_checkpoint -- gradient checkpointing in the reference; accepted and ignored (no effect on outputs).
    num_heads, num_heads_upsample -- attention heads (encoder/middle; decoder, -1: same).
    use_scale_shift_norm -- condition residual blocks by norm(h) (1 + scale) + shift.

    forward(x, timesteps, y=None): timesteps are what the diffusion feeds (the integer step, or
    t * 1000 / T with rescale_timesteps); y are class indices [N].
    """
    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, num_heads=1, num_heads_upsample=-1, use_scale_shift_norm=False):
        super().__init__()
        if dims != 2:
            raise ValueError(f'UNetModel: only dims=2 (images) is supported, got dims={dims}')
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.num_classes = num_classes
        self.model_channels = model_channels
        emb_channels = model_channels * 4
        block = dict(emb_channels=emb_channels, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, dims=dims)

        self.time_embed = torch.nn.Sequential(FullyConnected(model_channels, emb_channels), SiLU(), FullyConnected(emb_channels, emb_channels))
        if num_classes is not None:
            self.label_emb = Embedding(num_classes, emb_channels)

        # Encoder: input conv, then per level num_res_blocks blocks (+ attention) and a Downsample between levels.
        self.input_blocks = torch.nn.ModuleList([torch.nn.Sequential(Conv(in_channels, model_channels, 3, dims, padding=1))])
        skip_widths = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, out_channels=mult * model_channels, **block)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads))
                self.input_blocks.append(torch.nn.Sequential(*layers))
                skip_widths.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(torch.nn.Sequential(Downsample(ch, conv_resample, dims)))
                skip_widths.append(ch)
                ds *= 2

        self.middle_block = torch.nn.Sequential(ResBlock(ch, **block), AttentionBlock(ch, num_heads=num_heads), ResBlock(ch, **block))

        # Decoder: per level num_res_blocks + 1 blocks, each taking one encoder output; Upsample ends a level.
        self.output_blocks = torch.nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), out_channels=model_channels * mult, **block)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims))
                    ds //= 2
                self.output_blocks.append(torch.nn.Sequential(*layers))

        self.out = torch.nn.Sequential(GroupNorm32(ch), SiLU(), Conv(model_channels, out_channels, 3, dims, padding=1, zero_init=True))

    @staticmethod
    def _run(seq, h, emb):
        for layer in seq:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, timesteps, y=None):
        if (y is not None) != (self.num_classes is not None):
            raise ValueError('UNetModel: give class labels y if and only if the model is class-conditional')
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for module in self.input_blocks:
            h = self._run(module, h, emb)
            hs.append(h)
        h = self._run(self.middle_block, h, emb)
        for module in self.output_blocks:
            h = self._run(module, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

#----------------------------------------------------------------------------
# The wrapper: a discrete iDDPM process around a backbone, with iDDPMPrecond's EDM denoiser interface.

def _make_backbone(model_type, img_resolution, img_channels, out_channels, label_dim, **model_kwargs):
    if model_type == 'UNetModel':
        return UNetModel(in_channels=img_channels, out_channels=out_channels, num_classes=(label_dim or None), **model_kwargs)
    if model_type in ('DhariwalUNet', 'SongUNet'):
        cls = getattr(networks, model_type)
        return cls(img_resolution=img_resolution, in_channels=img_channels, out_channels=out_channels, label_dim=label_dim, **model_kwargs)
    raise ValueError(f'unknown model_type {model_type!r}; expected UNetModel, DhariwalUNet or SongUNet')

def sigma_table(schedule: str, M: int) -> torch.Tensor:
    """u_0 > ... > u_{M-1} > u_M = 0 with u_{M-1-t} = sqrt(1/abar_t - 1): the EDM noise level of iDDPM step
    t (float64). For the cosine schedule this is iDDPMPrecond's u (EDM Table 1) without float32 rounding."""
    from training import iddpm  # not at module level: the paper's loader has no training.iddpm
    abar = torch.from_numpy(np.cumprod(1.0 - iddpm.named_beta_schedule(schedule, M)))
    return torch.cat([(1 / abar - 1).sqrt().flip(0), torch.zeros(1, dtype=torch.float64, device='cpu')])

@persistence.persistent_class
class iDDPMDiscretePrecond(torch.nn.Module):
    """An iDDPM model: backbone with eps (and, with learn_sigma, v) outputs on a discrete process of M steps.

    img_resolution, img_channels, label_dim, use_fp16, use_bf16 -- as iDDPMPrecond.
    M -- number of diffusion steps T (1000 or 4000).
    schedule -- 'cosine' or 'linear' (training.iddpm.named_beta_schedule).
    learn_sigma -- 2C outputs with learned-range variances (Eq. 15 of iDDPM); False: C outputs.
    rescale_timesteps -- the backbone sees t * 1000 / M instead of t (improved-diffusion's flag; its released
      CIFAR-10 and unconditional ImageNet-64 models were trained with it).
    model_type -- 'UNetModel' (improved-diffusion's network), 'DhariwalUNet' (ADM) or 'SongUNet'.
    **model_kwargs -- the backbone's constructor arguments.

    net(x, sigma, class_labels) is the EDM denoiser (sigma snapped to the table u = sqrt(1/abar_t - 1));
    net(x_t, None, class_labels, timesteps=t) is the raw backbone output at original step t (float32).
    """
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, M=1000, schedule='cosine',
                 learn_sigma=True, rescale_timesteps=False, model_type='DhariwalUNet', use_bf16=False, **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.M = M
        self.schedule = schedule
        self.learn_sigma = learn_sigma
        self.rescale_timesteps = rescale_timesteps
        self.model_type = model_type
        out_channels = img_channels * (2 if learn_sigma else 1)
        self.model = _make_backbone(model_type, img_resolution, img_channels, out_channels, label_dim, **model_kwargs)
        u = sigma_table(schedule, M)
        self.register_buffer('u', u.to(torch.float32).to(self.model_device()))
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def round_sigma(self, sigma, return_index=False):
        """Nearest entry of the table u (or its index j; step t = M - 1 - j), as iDDPMPrecond.round_sigma."""
        sigma = torch.as_tensor(sigma)
        index = (sigma.to(self.u.device).to(torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def model_device(self):
        return next(iter(self.model.parameters())).device

    def var_type(self) -> str:
        return 'learned_range' if self.learn_sigma else 'fixed_large'

    def backbone_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the backbone receives for original step t: t, or t * 1000 / M (rescale_timesteps)."""
        t = t.to(torch.float32)
        return t * (1000.0 / self.M) if self.rescale_timesteps else t

    def raw(self, x, timesteps, class_labels=None, force_fp32=False, augment_labels=None):
        """The backbone output [N, C or 2C] (float32) for x_t at original steps `timesteps` [N]."""
        x = x.to(torch.float32)
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        dtype = networks._compute_dtype(x, self.use_fp16, self.use_bf16, force_fp32) if hasattr(networks, '_compute_dtype') else torch.float32
        c_noise = self.backbone_timesteps(timesteps)
        if self.model_type == 'UNetModel':
            if augment_labels is not None:
                raise ValueError('UNetModel takes no augmentation labels; train it without --augment')
            y = None
            if self.label_dim:
                if class_labels is None:
                    raise ValueError('this iDDPM model is class-conditional; pass class labels')
                y = class_labels.reshape(x.shape[0], -1).argmax(dim=1)
            out = self.model(x.to(dtype), c_noise, y)
        else:
            labels = None
            if self.label_dim:
                labels = torch.zeros([1, self.label_dim], device=x.device) if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
            kwargs = {} if augment_labels is None else dict(augment_labels=augment_labels)
            out = self.model(x.to(dtype), c_noise, class_labels=labels, **kwargs)
        return out.to(torch.float32)

    def forward(self, x, sigma=None, class_labels=None, force_fp32=False, timesteps=None, augment_labels=None):
        if timesteps is not None:
            return self.raw(x, timesteps, class_labels, force_fp32, augment_labels)
        if sigma is None:
            raise ValueError('iDDPMDiscretePrecond needs sigma (the EDM denoiser) or timesteps= (the raw output)')
        # EDM denoiser (Eq. 7 with iDDPM's Table 1 column): D = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)).
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        t = (self.M - 1 - self.round_sigma(sigma, return_index=True).reshape(-1)).clamp(min=0)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        eps = self.raw(c_in * x, t.expand(x.shape[0]), class_labels, force_fp32, augment_labels)[:, :self.img_channels]
        return x - sigma * eps

#----------------------------------------------------------------------------
# improved-diffusion checkpoints.

# The released models (improved-diffusion README, "Models and hyperparameters"): UNetModel arguments as its
# script_util.create_model derives them, plus the diffusion flags. Checkpoints are plain state_dicts
# (e.g. https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_50M_500K.pt).
RELEASED = {
    'cifar10_uncond_50M': dict(image_size=32, diffusion_steps=4000, noise_schedule='cosine', rescale_timesteps=True,
        kwargs=dict(in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3, attention_resolutions=[2, 4],
                    dropout=0.3, channel_mult=[1, 2, 2, 2], num_classes=None, use_checkpoint=False, num_heads=4,
                    num_heads_upsample=-1, use_scale_shift_norm=True)),
    'imagenet64_uncond_100M': dict(image_size=64, diffusion_steps=4000, noise_schedule='cosine', rescale_timesteps=True,
        kwargs=dict(in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3, attention_resolutions=[4, 8],
                    dropout=0.0, channel_mult=[1, 2, 3, 4], num_classes=None, use_checkpoint=False, num_heads=4,
                    num_heads_upsample=-1, use_scale_shift_norm=True)),
    'imagenet64_cond_270M': dict(image_size=64, diffusion_steps=4000, noise_schedule='cosine', rescale_timesteps=False,
        kwargs=dict(in_channels=3, model_channels=192, out_channels=6, num_res_blocks=3, attention_resolutions=[4, 8],
                    dropout=0.0, channel_mult=[1, 2, 3, 4], num_classes=1000, use_checkpoint=False, num_heads=4,
                    num_heads_upsample=-1, use_scale_shift_norm=True)),
}

def precond_kwargs_from_unet(kwargs: dict, image_size: int, diffusion_steps: int = 4000, noise_schedule: str = 'cosine',
                             rescale_timesteps: bool = True) -> dict:
    """iDDPMDiscretePrecond kwargs for an improved-diffusion UNetModel(**kwargs) and its diffusion flags."""
    kwargs = dict(kwargs)
    in_channels, out_channels = kwargs.pop('in_channels'), kwargs.pop('out_channels')
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f'UNetModel with {in_channels} input and {out_channels} output channels is not an eps model '
                         f'(expected {in_channels}, or {2 * in_channels} with learned sigmas)')
    num_classes = kwargs.pop('num_classes', None)
    return dict(img_resolution=image_size, img_channels=in_channels, label_dim=num_classes or 0, M=diffusion_steps,
                schedule=noise_schedule, learn_sigma=(out_channels == 2 * in_channels),
                rescale_timesteps=rescale_timesteps, model_type='UNetModel', **kwargs)

def convert_unet_state_dict(state_dict: dict) -> dict:
    """improved-diffusion UNetModel state_dict -> iDDPMDiscretePrecond's (the backbone keeps its names)."""
    return {f'model.{k}': v for k, v in state_dict.items()}

def from_improved_diffusion(state_dict: dict, kwargs: dict, image_size: int, diffusion_steps: int = 4000,
                            noise_schedule: str = 'cosine', rescale_timesteps: bool = True) -> iDDPMDiscretePrecond:
    """Build the network of an improved-diffusion checkpoint and load it; every key must match (strict)."""
    precond_kwargs = precond_kwargs_from_unet(kwargs, image_size, diffusion_steps, noise_schedule, rescale_timesteps)
    with no_weight_init():
        net = iDDPMDiscretePrecond(**precond_kwargs)
    converted = convert_unet_state_dict(state_dict)
    converted['u'] = net.u
    missing, unexpected = net.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f'checkpoint does not match UNetModel({kwargs}): missing {missing[:5]}, unexpected {unexpected[:5]}')
    return net.eval().requires_grad_(False)

def load_released(path, name: str) -> iDDPMDiscretePrecond:
    """A released improved-diffusion checkpoint (a .pt state_dict) as a samplable network; `name` is a key
    of RELEASED giving its architecture and diffusion flags."""
    if name not in RELEASED:
        raise ValueError(f'unknown released model {name!r}; expected one of {", ".join(RELEASED)}')
    spec = RELEASED[name]
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
    return from_improved_diffusion(state_dict, spec['kwargs'], spec['image_size'], spec['diffusion_steps'],
                                   spec['noise_schedule'], spec['rescale_timesteps'])

def to_iddpm_precond(net: iDDPMDiscretePrecond):
    """EDM's iDDPMPrecond with this network's weights: possible for a DhariwalUNet/SongUNet backbone with
    learned variances on the cosine schedule without timestep rescaling (what iDDPMPrecond assumes). The
    state_dicts have the same keys (model.*, u); u is kept from `net`."""
    if not (net.model_type in ('DhariwalUNet', 'SongUNet') and net.schedule == 'cosine' and net.learn_sigma and not net.rescale_timesteps):
        raise ValueError('iDDPMPrecond needs a DhariwalUNet/SongUNet backbone, learned sigmas, the cosine schedule and '
                         f'no timestep rescaling; this network has {net.model_type}, {net.schedule}, '
                         f'learn_sigma={net.learn_sigma}, rescale_timesteps={net.rescale_timesteps}')
    kwargs = dict(net.init_kwargs)
    for key in ('schedule', 'learn_sigma', 'rescale_timesteps'):
        kwargs.pop(key, None)
    precond = networks.iDDPMPrecond(**kwargs)
    precond.load_state_dict(net.state_dict())
    precond.sigma_min, precond.sigma_max = net.sigma_min, net.sigma_max
    return precond.train(net.training).requires_grad_(False)

def convert_released(pt_path, name: str, out_pkl) -> None:
    """Write a released improved-diffusion checkpoint as a network pickle ({'ema': net}, the snapshot layout)
    that generate.py / fid.py load like any other: e.g. convert_released('cifar10_uncond_50M_500K.pt',
    'cifar10_uncond_50M', 'iddpm-cifar10.pkl'), then generate.py --network=iddpm-cifar10.pkl --sampler=iddpm."""
    persistence.save_network_pkl(dict(ema=load_released(pt_path, name)), out_pkl)
