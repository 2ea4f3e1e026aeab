"""The magnitude-preserving U-Net of EDM2 ("Analyzing and Improving the Training Dynamics of Diffusion
Models", Karras et al., CVPR 2024): config G of the paper's Table 1, architecture in Figure 21, derivations
in Appendix B (Eqs. 47, 66, 75, 81, 88 and 103).

Every layer keeps the expected magnitude (RMS) of its activations at 1 when its inputs have unit magnitude:
- `normalize`: scale to unit RMS over the given dims (pixel norm for activations, per-output-channel for
  weights); `MPConv` uses it for weight normalisation, w_hat = w / ||w|| * gain / sqrt(fan_in), and on
  every training-mode forward also for *forced* weight normalisation, w <- w / ||w|| written back into
  the stored weight (config E), so weight growth cannot change the effective learning rate;
- `mp_silu` = SiLU / 0.596 (0.596 ~ E[silu(z)^2]^(1/2) for z ~ N(0, 1); config G);
- `mp_sum(a, b, t)` = ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) and `mp_cat`, its concatenation
  analogue, which give the two inputs relative weights (1 - t) : t at unit output magnitude;
- `MPFourier`: random Fourier features cos(2 pi (f x + phi)) * sqrt(2) (unit RMS for random phases).
No layer has a bias, there is no group normalisation; conditioning multiplies the residual branch by
1 + emb_linear(emb) (gain `emb_gain` initialised to 0), and the output layer has a learned gain
`out_gain` initialised to 0.

`Precond` is EDM preconditioning (c_skip, c_out, c_in of Karras et al. 2022; c_noise = ln(sigma) / 4) plus
the learned uncertainty u(sigma) = logvar_linear(logvar_fourier(c_noise)) of config B, used by
`training.loss.EDM2Loss`.

Module paths, class names, constructor kwargs, defaults and state_dict names follow the paper's public
code, so its checkpoints' state_dicts load into these classes. Additions: `Precond.round_sigma`, `sigma_min`,
`sigma_max` (the sampler interface of training/networks.py), and `use_bf16`.

This module's source is embedded in network pickles; it imports only numpy, torch and
torch_utils.persistence.
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence

#----------------------------------------------------------------------------
# Magnitude-preserving fixed-function operations (pure functions).

def normalize(x, dim=None, eps=1e-4):
    """x / (eps + ||x|| * sqrt(n_kept / n_total)): unit RMS over `dim` (default: all but the first).
    The norm is accumulated in float32 whatever the dtype of x."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

def resample(x, f=[1,1], mode='keep'):
    """2x resampling by the separable FIR filter with taps `f` (normalised): 'down' filters and decimates
    ([1,1]: average pooling), 'up' zero-stuffs and filters with gain 4 ([1,1]: nearest), 'keep' is identity."""
    if mode == 'keep':
        return x
    if mode not in ('down', 'up'):
        raise ValueError(f'Unknown resample mode {mode!r}; expected keep, down or up')
    f = torch.as_tensor(f, dtype=torch.float32)
    assert f.ndim == 1 and len(f) % 2 == 0, 'resample filter must be a 1-D list of an even number of taps'
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = f.ger(f).to(dtype=x.dtype, device=x.device)
    c = x.shape[1]
    if mode == 'down':
        return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    return F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))

def mp_silu(x):
    """SiLU divided by its output RMS for unit-normal input (0.596)."""
    return F.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    """Magnitude-preserving weighted sum: lerp(a, b, t) / sqrt((1 - t)^2 + t^2)."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation: a and b scaled so that they contribute in the ratio (1 - t) : t
    and the result has unit RMS over all Na + Nb channels."""
    Na = a.shape[dim]
    Nb = b.shape[dim]
    C = np.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / np.sqrt(Na) * (1 - t)
    wb = C / np.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)

#----------------------------------------------------------------------------
# Magnitude-preserving Fourier features for the noise level.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """cos(x * freqs + phases) * sqrt(2) with fixed random freqs = 2 pi N(0, bandwidth^2), phases = 2 pi U(0, 1)."""
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * np.sqrt(2)
        return y.to(x.dtype)

#----------------------------------------------------------------------------
# Magnitude-preserving convolution or fully-connected layer (kernel=[]), no bias.

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """y = conv(x, w_hat) with w_hat = normalize(w) * gain / sqrt(fan_in): unit-RMS output for unit-RMS input
    when gain = 1. In training mode the stored weight is first replaced by normalize(w) (forced weight
    normalisation), so the optimizer always steps from unit-norm rows."""
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        w = normalize(self.weight.to(torch.float32))
        w = w * (gain / np.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        assert w.ndim == 4
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

#----------------------------------------------------------------------------
# U-Net block: encoder flavour (resample, skip conv, pixel norm, then the residual branch) or decoder
# flavour (resample, residual branch, skip conv on the shortcut); optional self-attention.

@persistence.persistent_class
class Block(torch.nn.Module):
    """One block of Figure 21.

    in_channels, out_channels, emb_channels -- widths of input, output and conditioning vector.
    flavor -- 'enc' or 'dec'.
    resample_mode, resample_filter -- 'keep' | 'down' | 'up' at the block input, with these FIR taps.
    attention, channels_per_head -- self-attention with out_channels // channels_per_head heads.
    dropout -- dropout rate before the second convolution (training only).
    res_balance, attn_balance -- mp_sum weight of the residual branch and of the attention output.
    clip_act -- clamp activations to +-clip_act (None: no clamp), a guard against fp16 overflow.
    """
    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=[1,1], attention=False, channels_per_head=64, dropout=0, res_balance=0.3,
                 attn_balance=0.3, clip_act=256):
        super().__init__()
        assert flavor in ('enc', 'dec'), f'invalid block flavor {flavor!r}'
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3,3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3,3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1,1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1,1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1,1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: the encoder's skip path has no other magnitude control

        # Residual branch, modulated by 1 + (learned-gain linear map of emb).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention with per-head pixel-normalised q, k, v (cosine attention); channels are laid out
        # as [heads, C/heads, 3].
        if self.num_heads != 0:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)
            logits = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2]))
            w = logits.softmax(dim=3, dtype=torch.float32).to(v.dtype)
            y = torch.einsum('nhqk,nhck->nhcq', w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x

#----------------------------------------------------------------------------
# The EDM2 U-Net (Figure 21).

@persistence.persistent_class
class UNet(torch.nn.Module):
    """Magnitude-preserving U-Net.

    img_resolution, img_channels, label_dim -- image size, channels, class-vector size (0: unconditional).
    model_channels, channel_mult -- level i is model_channels * channel_mult[i] wide, at img_resolution / 2**i.
    channel_mult_noise -- width of the Fourier noise embedding / model_channels (None: the first level's width).
    channel_mult_emb -- width of the conditioning vector / model_channels (None: the widest level's width).
    num_blocks -- blocks per encoder level (the decoder has one more per level).
    attn_resolutions -- resolutions whose blocks add self-attention (the decoder's first block always asks).
    label_balance -- mp_sum weight of the class embedding against the noise embedding.
    concat_balance -- mp_cat weight of the skip connection against the decoder path.
    **block_kwargs -- forwarded to every Block (resample_filter, channels_per_head, dropout, res_balance,
      attn_balance, clip_act).
    """
    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=[1,2,3,4],
                 channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=[16,8],
                 label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Conditioning: Fourier features of c_noise (+ class embedding).
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder, finest level first; the input gets a constant ones channel (so the first conv can
        # produce an offset without a bias).
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3,3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc', attention=(res in attn_resolutions), **block_kwargs)

        # Decoder, coarsest level first; every block concatenates one encoder output.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec', attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3,3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

#----------------------------------------------------------------------------
# EDM preconditioning with the learned uncertainty head.

def edm2_coefficients(sigma, sigma_data=0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM preconditioning with c_noise = ln(sigma) / 4 (flattened).
    The formulas of training.networks.edm_coefficients, restated because this module must load without
    training.networks (EDM2's code, which executes our embedded source, has no such module)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.flatten().log() / 4
    return c_skip, c_out, c_in, c_noise

@persistence.persistent_class
class Precond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), and optionally the uncertainty u(sigma).

    img_resolution, img_channels, label_dim -- as in UNet.
    use_fp16 -- run the U-Net in float16; honoured on CUDA only, ignored on CPU.
    sigma_data -- standard deviation of the data.
    logvar_channels -- width of the Fourier features the uncertainty head reads.
    use_bf16 -- (our addition) run the U-Net in bfloat16 on any device.
    **unet_kwargs -- forwarded to UNet.

    Sampler interface (our addition): `round_sigma`, and `sigma_min` / `sigma_max`, the EDM sampler's
    defaults (the network itself takes any sigma > 0).
    """
    sigma_min = 0.002
    sigma_max = 80

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
                 logvar_channels=128, use_bf16=False, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        if force_fp32:
            dtype = torch.float32
        elif self.use_fp16 and x.device.type == 'cuda':
            dtype = torch.float16
        elif self.use_bf16:
            dtype = torch.bfloat16
        else:
            dtype = torch.float32

        c_skip, c_out, c_in, c_noise = edm2_coefficients(sigma, self.sigma_data)
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x, logvar

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
