"""Model architectures and preconditioning schemes of "Elucidating the Design Space of
Diffusion-Based Generative Models" (Karras et al., NeurIPS 2022).

- Layers: `Linear`, `Conv2d` (optional up/down-sampling by a FIR `resample_filter`), `GroupNorm`,
  `AttentionOp`, `UNetBlock`, `PositionalEmbedding`, `FourierEmbedding`.
- Backbones: `SongUNet` (DDPM++ / NCSN++, Song et al. 2021) and `DhariwalUNet` (ADM, Dhariwal & Nichol 2021).
- Preconditioners (Table 1 of the paper): `VPPrecond`, `VEPrecond`, `iDDPMPrecond`, `EDMPrecond`.
  The coefficient formulas are small pure functions (`edm_coefficients`, `vp_coefficients`,
  `ve_coefficients`, `iddpm_coefficients`, `vp_sigma`, `vp_sigma_deriv`, `vp_sigma_inv`, `iddpm_u`).
- `no_weight_init()`: build without random init (before loading a checkpoint, or on the meta device).

Module paths, class names, constructor kwargs and state_dict names match the paper's public code so
released checkpoints load unchanged (see torch_utils/persistence.py for the safe loader).

Precision: fp32 is the default. `use_fp16=True` runs the backbone in float16 on CUDA only (ignored on
CPU, like the paper). `use_bf16=True` (our addition) runs the backbone in bfloat16 on any device.
Softmax in attention is always computed in float32; `ATTENTION_IMPL` selects torch's fused SDPA
(default for fp32 on CUDA) or the explicit form (default on CPU, where it is faster).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence

#----------------------------------------------------------------------------
# Weight initialisation.

def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor for the given init mode (unit `init_weight`; callers scale)."""
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"; expected xavier_uniform, xavier_normal, '
                     f'kaiming_uniform or kaiming_normal')

_init_state = threading.local()

@contextlib.contextmanager
def no_weight_init():
    """Construct layers with uninitialised (torch.empty) weights, e.g. right before loading a
    checkpoint, or with `torch.device('meta')` to inspect shapes cheaply. No random numbers drawn."""
    prev = getattr(_init_state, 'skip', False)
    _init_state.skip = True
    try:
        yield
    finally:
        _init_state.skip = prev

def _init_param(shape, mode, fan_in, fan_out, scale) -> torch.Tensor:
    if getattr(_init_state, 'skip', False):
        return torch.empty(shape)
    return weight_init(shape, mode, fan_in, fan_out) * scale

#----------------------------------------------------------------------------
# Fully-connected layer. Weights are cast to the input dtype so one fp32 master
# copy serves fp32, fp16 and bf16 forward passes.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init_kwargs = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(_init_param([out_features, in_features], scale=init_weight, **init_kwargs))
        self.bias = torch.nn.Parameter(_init_param([out_features], scale=init_bias, **init_kwargs)) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x

#----------------------------------------------------------------------------
# Convolutional layer with optional up/down-sampling by a separable FIR filter.
# kernel=0 gives a pure resampling layer (no weights).

def make_resample_filter(resample_filter) -> torch.Tensor:
    """Normalised 2-D FIR filter [1, 1, k, k] from a 1-D tap list (e.g. [1,1] box, [1,3,3,1] bilinear)."""
    f = torch.as_tensor(resample_filter, dtype=torch.float32, device='cpu')
    return (f.ger(f) / f.sum().square()).unsqueeze(0).unsqueeze(1)

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self,
        in_channels, out_channels, kernel, bias=True, up=False, down=False,
        resample_filter=[1,1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0,
    ):
        assert not (up and down), 'Conv2d cannot both upsample and downsample'
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        init_kwargs = dict(mode=init_mode, fan_in=in_channels*kernel*kernel, fan_out=out_channels*kernel*kernel)
        self.weight = torch.nn.Parameter(_init_param([out_channels, in_channels, kernel, kernel], scale=init_weight, **init_kwargs)) if kernel else None
        self.bias = torch.nn.Parameter(_init_param([out_channels], scale=init_bias, **init_kwargs)) if kernel and bias else None
        self.register_buffer('resample_filter', make_resample_filter(resample_filter) if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            # Upsample without cropping, then a valid-ish convolution: one fewer padding pass.
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Convolve at full resolution with extra padding, then filter + decimate.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

#----------------------------------------------------------------------------
# Group normalisation; fewer groups for narrow layers (>= min_channels_per_group each).

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# Attention weights softmax(q^T k / sqrt(c)), always in float32.
# q, k: [N*heads, C/heads, L]. Returns [N*heads, L_q, L_k] in q.dtype.

class AttentionOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k):
        w = torch.einsum('ncq,nck->nqk', q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32)).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        w32 = w.to(torch.float32)
        dw32 = dw.to(torch.float32)
        db = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))  # softmax backward in fp32
        dq = torch.einsum('nck,nqk->ncq', k.to(torch.float32), db).to(q.dtype) / np.sqrt(k.shape[1])
        dk = torch.einsum('ncq,nqk->nck', q.to(torch.float32), db).to(k.dtype) / np.sqrt(k.shape[1])
        return dq, dk

# 'auto': torch's fused scaled_dot_product_attention for fp32 on CUDA (same numbers to ~1e-7, far less
# memory); the explicit form elsewhere -- on CPU it measured 1.1-1.7x faster than SDPA for the U-Net's
# shapes (benchmarks/bench_networks.py) -- and always for fp16/bf16 so the softmax runs in float32.
ATTENTION_IMPL = 'auto'   # 'auto' | 'sdpa' | 'explicit'

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Multi-head self-attention on [N*heads, C/heads, L] tensors; returns [N*heads, C/heads, L]."""
    impl = impl or ATTENTION_IMPL
    if impl == 'auto':
        impl = 'sdpa' if (q.device.type == 'cuda' and q.dtype == torch.float32) else 'explicit'
    if impl == 'sdpa':
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2)
    if impl != 'explicit':
        raise ValueError(f'Unknown attention implementation {impl!r}; expected auto, sdpa or explicit')
    w = AttentionOp.apply(q, k)
    return torch.einsum('nqk,nck->ncq', w, v)

#----------------------------------------------------------------------------
# U-Net block: GroupNorm-SiLU-Conv, embedding-conditioned scale/shift, dropout,
# conv, skip connection, optional self-attention.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self,
        in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
        num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
        resample_filter=[1,1], resample_proj=False, adaptive_scale=True,
        init=dict(), init_zero=dict(init_weight=0), init_attn=None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels*(2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels*3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x.add_(params)))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            # qkv channels are laid out as [heads, C/heads, 3].
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            a = attention(q, k, v)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x

#----------------------------------------------------------------------------
# Timestep embeddings.

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Transformer sinusoidal embedding: [cos(x f_i), sin(x f_i)], f_i = (1/max_positions)^(i/n)."""
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels//2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features (NCSN++): fixed random frequencies with std `scale`."""
    def __init__(self, num_channels, scale=16):
        super().__init__()
        skip = getattr(_init_state, 'skip', False)
        self.register_buffer('freqs', torch.empty(num_channels // 2) if skip else torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Label dropout for classifier-free guidance: zero each sample's label with probability p.

def drop_labels(class_labels: torch.Tensor, p: float, training: bool, batch_size: int | None = None) -> torch.Tensor:
    """Zero each sample's label vector with probability p (training only). Draws
    torch.rand([batch_size, 1]) like the paper, so the random stream stays in sync."""
    if training and p:
        n = class_labels.shape[0] if batch_size is None else batch_size
        keep = torch.rand([n, 1], device=class_labels.device) >= p
        class_labels = class_labels * keep.to(class_labels.dtype)
    return class_labels

#----------------------------------------------------------------------------
# DDPM++ and NCSN++ (Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021).

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels      = 128,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,2,2],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 4,            # Number of residual blocks per resolution.
        attn_resolutions    = [16],         # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels for classifier-free guidance.

        embedding_type      = 'positional', # Timestep embedding type: 'positional' for DDPM++, 'fourier' for NCSN++.
        channel_mult_noise  = 1,            # Timestep embedding size: 1 for DDPM++, 2 for NCSN++.
        encoder_type        = 'standard',   # Encoder architecture: 'standard' for DDPM++, 'residual' for NCSN++.
        decoder_type        = 'standard',   # Decoder architecture: 'standard' for both DDPM++ and NCSN++.
        resample_filter     = [1,1],        # Resampling filter: [1,1] for DDPM++, [1,3,3,1] for NCSN++.
    ):
        assert embedding_type in ['fourier', 'positional'], f'invalid embedding_type {embedding_type!r}'
        assert encoder_type in ['standard', 'skip', 'residual'], f'invalid encoder_type {encoder_type!r}'
        assert decoder_type in ['standard', 'skip'], f'invalid decoder_type {decoder_type!r}'

        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping: noise level (+ class label + augmentation labels) -> embedding.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = (res in attn_resolutions)
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # swap cos/sin halves
        if self.map_label is not None:
            tmp = drop_labels(class_labels, self.label_dropout, self.training, batch_size=x.shape[0])
            emb = emb + self.map_label(tmp * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------
# ADM (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021).

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels      = 192,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,3,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 3,            # Number of residual blocks per resolution.
        attn_resolutions    = [32,16,8],    # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels for classifier-free guidance.
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = drop_labels(class_labels, self.label_dropout, self.training, batch_size=x.shape[0])
            emb = emb + self.map_label(tmp)
        emb = F.silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = self.out_conv(F.silu(self.out_norm(x)))
        return x

#----------------------------------------------------------------------------
# Preconditioning coefficients (Table 1 of the paper) as pure functions of sigma.
# D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).

def _as_tensor(x) -> torch.Tensor:
    # Leave tensors where they are (torch.as_tensor would follow a `with torch.device(...)` context);
    # Python numbers become float64 so that the samplers' float64 schedules stay float64.
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64, device='cpu')

def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = _as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()

def vp_sigma_deriv(t, beta_d=19.9, beta_min=0.1):
    """d sigma / dt for the VP schedule."""
    t = _as_tensor(t)
    return 0.5 * (beta_min + beta_d * t) * (vp_sigma(t, beta_d, beta_min) + 1 / vp_sigma(t, beta_d, beta_min))

def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    """Inverse of vp_sigma: t such that sigma(t) = sigma."""
    sigma = _as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d

def vp_coefficients(sigma, M=1000, beta_d=19.9, beta_min=0.1):
    """(c_skip, c_out, c_in, c_noise) for VP: 1, -sigma, 1/sqrt(sigma^2+1), (M-1) t(sigma)."""
    c_skip = 1
    c_out = -sigma
    c_in = 1 / (sigma ** 2 + 1).sqrt()
    c_noise = (M - 1) * vp_sigma_inv(sigma, beta_d, beta_min)
    return c_skip, c_out, c_in, c_noise

def ve_coefficients(sigma):
    """(c_skip, c_out, c_in, c_noise) for VE: 1, sigma, 1, log(sigma/2)."""
    c_skip = 1
    c_out = sigma
    c_in = 1
    c_noise = (0.5 * sigma).log()
    return c_skip, c_out, c_in, c_noise

def iddpm_alpha_bar(j, M=1000, C_2=0.008):
    """iDDPM cosine schedule alpha_bar(j) = sin^2(pi/2 j / (M (C_2 + 1)))."""
    j = _as_tensor(j)
    return (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2

def iddpm_u(M=1000, C_1=0.001, C_2=0.008, dtype=torch.float32, device='cpu') -> torch.Tensor:
    """The iDDPM discretisation u_0 > ... > u_M = 0 (u_{j-1} = sqrt((u_j^2+1)/max(abar_{j-1}/abar_j, C_1) - 1)).
    iDDPMPrecond keeps it as a float32 buffer; the ablation sampler recomputes it in float64."""
    # An explicit device keeps this valid under a `with torch.device('meta')` construction.
    alpha_bar = iddpm_alpha_bar(torch.arange(M + 1, dtype=dtype, device=device), M, C_2)
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)  # abar_{j-1}/abar_j for j = 1..M
    u = torch.zeros(M + 1, dtype=dtype, device=device)
    for j in range(M, 0, -1):  # the recursion runs from u_M = 0 upwards
        u[j - 1] = ((u[j] ** 2 + 1) / ratio[j - 1] - 1).sqrt()
    return u

def iddpm_coefficients(sigma, index, M=1000):
    """(c_skip, c_out, c_in, c_noise) for iDDPM: 1, -sigma, 1/sqrt(sigma^2+1), M-1-j (j = index of sigma in u)."""
    c_skip = 1
    c_out = -sigma
    c_in = 1 / (sigma ** 2 + 1).sqrt()
    c_noise = M - 1 - index
    return c_skip, c_out, c_in, c_noise

def edm_coefficients(sigma, sigma_data=0.5):
    """(c_skip, c_out, c_in, c_noise) for EDM (Sec. 5 / Table 1)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise

#----------------------------------------------------------------------------
# Shared preconditioner plumbing.

def _compute_dtype(x: torch.Tensor, use_fp16: bool, use_bf16: bool, force_fp32: bool) -> torch.dtype:
    """Backbone dtype: fp16 only on CUDA (as in the paper), bf16 wherever asked, else fp32."""
    if force_fp32:
        return torch.float32
    if use_fp16 and x.device.type == 'cuda':
        return torch.float16
    if use_bf16:
        return torch.bfloat16
    return torch.float32

def _prepare_inputs(x, sigma, class_labels, label_dim):
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    if label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, label_dim)
    return x, sigma, class_labels

def _make_model(model_type, **kwargs):
    models = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
    if model_type not in models:
        raise ValueError(f'Unknown model_type {model_type!r}; expected one of {sorted(models)}')
    return models[model_type](**kwargs)

#----------------------------------------------------------------------------
# VP preconditioning (Song et al. 2021, DDPM++).

@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision (CUDA only)?
        beta_d          = 19.9,         # Extent of the noise level schedule.
        beta_min        = 0.1,          # Initial slope of the noise level schedule.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        epsilon_t       = 1e-5,         # Minimum t-value used during training.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        use_bf16        = False,        # Execute the underlying model at bfloat16 precision (any device)?
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(torch.as_tensor(epsilon_t, device='cpu')))
        self.sigma_max = float(self.sigma(torch.as_tensor(1.0, device='cpu')))
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _compute_dtype(x, self.use_fp16, getattr(self, 'use_bf16', False), force_fp32)
        c_skip, c_out, c_in, c_noise = vp_coefficients(sigma, self.M, self.beta_d, self.beta_min)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_deriv(self, t):
        return vp_sigma_deriv(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# VE preconditioning (Song et al. 2021, NCSN++).

@persistence.persistent_class
class VEPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision (CUDA only)?
        sigma_min       = 0.02,         # Minimum supported noise level.
        sigma_max       = 100,          # Maximum supported noise level.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        use_bf16        = False,        # Execute the underlying model at bfloat16 precision (any device)?
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _compute_dtype(x, self.use_fp16, getattr(self, 'use_bf16', False), force_fp32)
        c_skip, c_out, c_in, c_noise = ve_coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# Improved DDPM preconditioning (Nichol & Dhariwal 2021, ADM backbone).

@persistence.persistent_class
class iDDPMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of class labels, 0 = unconditional.
        use_fp16        = False,            # Execute the underlying model at FP16 precision (CUDA only)?
        C_1             = 0.001,            # Timestep adjustment at low noise levels.
        C_2             = 0.008,            # Timestep adjustment at high noise levels.
        M               = 1000,             # Original number of timesteps in the DDPM formulation.
        model_type      = 'DhariwalUNet',   # Class name of the underlying model.
        use_bf16        = False,            # Execute the underlying model at bfloat16 precision (any device)?
        **model_kwargs,                     # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # The model also predicts variances (ignored here), hence 2x output channels.
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels*2, label_dim=label_dim, **model_kwargs)

        u = iddpm_u(M, C_1, C_2)
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _compute_dtype(x, self.use_fp16, getattr(self, 'use_bf16', False), force_fp32)
        index = self.round_sigma(sigma, return_index=True).to(torch.float32)
        c_skip, c_out, c_in, c_noise = iddpm_coefficients(sigma, index, self.M)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)
        return D_x

    def alpha_bar(self, j):
        return iddpm_alpha_bar(j, self.M, self.C_2)

    def round_sigma(self, sigma, return_index=False):
        """Nearest entry of the u table (or its index)."""
        sigma = torch.as_tensor(sigma)
        dist = (sigma.to(self.u.device).to(torch.float32).reshape(-1, 1) - self.u.reshape(1, -1)).abs()
        index = dist.argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

#----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Sec. 5 and Table 1).

@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of class labels, 0 = unconditional.
        use_fp16        = False,            # Execute the underlying model at FP16 precision (CUDA only)?
        sigma_min       = 0,                # Minimum supported noise level.
        sigma_max       = float('inf'),     # Maximum supported noise level.
        sigma_data      = 0.5,              # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet',   # Class name of the underlying model.
        use_bf16        = False,            # Execute the underlying model at bfloat16 precision (any device)?
        **model_kwargs,                     # Keyword arguments for the underlying model.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare_inputs(x, sigma, class_labels, self.label_dim)
        dtype = _compute_dtype(x, self.use_fp16, getattr(self, 'use_bf16', False), force_fp32)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
