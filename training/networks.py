"""Model architectures and preconditioning schemes of "Elucidating the Design Space of
Diffusion-Based Generative Models" (Karras et al., NeurIPS 2022).

- Layers: `Linear`, `Conv2d` (optional up/down-sampling by a FIR `resample_filter`), `GroupNorm`,
  `AttentionOp` (and `ChunkedAttentionOp`, the same in cache-sized chunks), `UNetBlock`,
  `PositionalEmbedding`, `FourierEmbedding`.
- Backbones: `SongUNet` (DDPM++ / NCSN++, Song et al. 2021) and `DhariwalUNet` (ADM, Dhariwal & Nichol 2021).
- Preconditioners (Table 1 of the paper): `VPPrecond`, `VEPrecond`, `iDDPMPrecond`, `EDMPrecond`.
  The coefficient formulas are small pure functions (`edm_coefficients`, `vp_coefficients`,
  `ve_coefficients`, `iddpm_coefficients`, `vp_sigma`, `vp_sigma_deriv`, `vp_sigma_inv`, `iddpm_u`).
- Learned uncertainty (our addition, from EDM2): `VPPrecond`, `VEPrecond` and `EDMPrecond` take
  `logvar_channels=N` to add EDM2's log-variance head (`forward(..., return_logvar=True)`, used by
  `training.loss.EDM2Loss`); off by default, and then nothing changes.
- `no_weight_init()`: build without random init (before loading a checkpoint, or on the meta device).
- `conv_groups` (our addition, both U-Nets): grouped 3x3 convolutions inside the U-Net blocks, a smaller
  model; the default 1 is the paper's network and is never recorded in constructor kwargs.
- `fast_dropout` (our addition, both U-Nets): cheaper dropout masks (`fast_dropout_mask`), other random
  numbers than the paper's; off by default, and then never recorded in constructor kwargs.

Module paths, class names, constructor kwargs and state_dict names match the paper's public code so
released checkpoints load unchanged (see torch_utils/persistence.py for the safe loader).

Precision: fp32 is the default. `use_fp16=True` runs the backbone in float16 on CUDA only (ignored on
CPU, like the paper). `use_bf16=True` (our addition) runs the backbone in bfloat16 on any device.
Softmax in attention is always computed in float32; `ATTENTION_IMPL` selects torch's fused SDPA
(default for fp32 on CUDA) or the explicit form (default on CPU, where it is faster). Speed switches that
change nothing but float rounding: FUSED_CONV_BIAS, INPLACE_OPS, CHANNELS_LAST (benchmarks/ time them).
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
# Speed options (timings: README, "Speed"; benchmarks/bench_networks.py toggles them). None changes what is
# computed beyond float rounding.

FUSED_CONV_BIAS = True  # add the bias inside F.conv2d (one pass over the activations fewer)
INPLACE_OPS = True      # SiLU in place when no autograd graph needs its input (eval, no_grad,
                        # inference_mode); skip-connection scaling in place (autograd-safe)
CHANNELS_LAST = False  # on CPU, convolve channels_last (NHWC) activations: True always, 'auto' in bfloat16 only,
                       # False never (default). NCHW is the layout torch.autocast runs the paper's code in; in bf16
                       # on an AVX-512-BF16 CPU it measured faster than NHWC: NHWC convolutions are faster, but
                       # torch's channels_last bf16 GroupNorm backward is ~18x slower than its NCHW one.
                       # The backbones hand back the usual contiguous (NCHW) output either way.

def _conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.device.type != 'cpu' or not CHANNELS_LAST or (CHANNELS_LAST == 'auto' and x.dtype != torch.bfloat16):
        return torch.contiguous_format
    return torch.channels_last

def _conv_layout(x: torch.Tensor) -> torch.Tensor:
    """x in the memory layout the convolutions run fastest in (a no-op when it already is)."""
    if _conv_memory_format(x) == torch.channels_last and x.stride(1) != 1:
        # Not x.contiguous(memory_format=...): that keeps a 1-channel NCHW tensor as it is (it counts as
        # channels_last too), and oneDNN, reading its strides, would then run and return NCHW.
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
    return x

def dropout(x: torch.Tensor, p: float, training: bool, fast: bool = False) -> torch.Tensor:
    """F.dropout(x, p, training) with the same random numbers in any memory layout: the mask is drawn in
    logical (NCHW) order, exactly as F.dropout draws it for a contiguous x, then x * mask / (1 - p).
    fast=True draws the mask with `fast_dropout_mask` instead (other random numbers, cheaper)."""
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    if fast:
        return x * fast_dropout_mask(x.shape, p, x.dtype, x.device)
    if x.device.type == 'cpu' and BERNOULLI_DRAWS_UNIFORM64 and x.dtype != torch.float64:
        # The same mask as below (bit for bit, the same generator state after), ~35% cheaper to draw: the CPU
        # bernoulli_ kernel compares one float64 uniform per element with 1 - p, as torch.rand(float64) draws them.
        # The kept value 1 / (1 - p) is rounded as div_ rounds it: a float32 quotient (then x's dtype).
        scale = float(np.float32(1) / np.float32(1 - p))
        u = torch.rand(x.shape, dtype=torch.float64, device=x.device)
        return x * torch.where(u < 1 - p, scale, 0.0).to(x.dtype)
    mask = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)
    return x * mask

def bernoulli_draws_uniform64() -> bool:
    """Whether this CPU's bernoulli_(p) is rand(float64) < p on the same generator: torch's default kernel is
    (AMD and other CPUs); on Intel CPUs torch draws Bernoulli numbers with MKL's own generator instead."""
    g_bernoulli, g_uniform = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = torch.empty(1000).bernoulli_(0.7, generator=g_bernoulli)
    b = torch.rand(1000, dtype=torch.float64, generator=g_uniform) < 0.7
    return torch.equal(a.bool(), b) and torch.equal(g_bernoulli.get_state(), g_uniform.get_state())

BERNOULLI_DRAWS_UNIFORM64 = bernoulli_draws_uniform64()  # probed once (microseconds); a constant to torch.compile

def fast_dropout_mask(shape, p: float, dtype=torch.float32, device='cpu') -> torch.Tensor:
    """Dropout mask (0 or 1 / (1 - p')) from 16 random bits per element: one int32 of the global torch
    generator serves two elements, where bernoulli_ draws a 64-bit uniform per element on CPUs without MKL's
    generator (AMD) -- several times cheaper. p is rounded to p' = k / 65536 (|p' - p| <= 2^-17) and kept
    values are scaled by 1 / (1 - p'), so the mask has mean 1 exactly."""
    numel = int(np.prod(shape))
    drop = min(max(round(p * 65536), 0), 65535)  # elements whose 16 bits fall below this many values drop
    bits = torch.randint(-2**31, 2**31 - 1, [(numel + 1) // 2], dtype=torch.int32, device=device)
    keep = bits.view(torch.int16)[:numel].reshape(shape) >= drop - 32768
    return keep.to(dtype).mul_(65536 / (65536 - drop))

def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU; overwrites x when nothing needs it for backward. Callers pass fresh intermediates only."""
    return F.silu(x, inplace=INPLACE_OPS and not x.requires_grad)

#----------------------------------------------------------------------------
# Fully-connected layer. Weights are cast to the input dtype so one fp32 master
# copy serves fp32, fp16 and bf16 forward passes.

@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully-connected layer y = x W^T + b with selectable initialisation.

    init_mode -- a `weight_init` mode; fan-in / fan-out are the feature counts.
    init_weight, init_bias -- gains on the random draws. A gain of 0 gives an all-zero start, but
      the numbers are still drawn so the random stream matches the reference layout.
    """
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(_init_param([out_features, in_features], init_mode, scale=init_weight, **fans))
        self.bias = torch.nn.Parameter(_init_param([out_features], init_mode, scale=init_bias, **fans)) if bias else None

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
    """Square-kernel 2-D convolution (size-preserving padding), optionally with 2x resampling.

    kernel -- kernel size; 0 means no weights, i.e. a pure up/down-sampling layer.
    bias -- learn a per-channel bias (only when kernel > 0).
    up, down -- resample by 2 (at most one of them) with the normalised FIR filter built from
      the `resample_filter` taps ([1,1] box, [1,3,3,1] bilinear).
    fused_resample -- fold resampling and convolution into one padded pass (different border
      handling from the separate path); NCSN++'s 'residual' input pyramid uses it.
    init_mode, init_weight, init_bias -- as in `Linear`, with fans = channels * kernel**2 / groups.
    groups -- (our addition) grouped convolution: input and output channels are split into `groups`
      groups, each output group sees only its input group (weight [out, in / groups, k, k]). Must
      divide both channel counts. 1 (the default) is the ordinary dense convolution.
    """
    groups = 1  # class default; set on the instance only when grouped
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1,1], fused_resample=False, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0, groups=1):
        assert not (up and down), 'Conv2d cannot both upsample and downsample'
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f'Conv2d groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        if groups != 1:  # else the class default, so a default layer's pickled state stays the paper's
            self.groups = groups
        taps = kernel * kernel
        fans = dict(fan_in=in_channels // groups * taps, fan_out=out_channels // groups * taps)
        self.weight = torch.nn.Parameter(_init_param([out_channels, in_channels // groups, kernel, kernel], init_mode, scale=init_weight, **fans)) if kernel else None
        self.bias = torch.nn.Parameter(_init_param([out_channels], init_mode, scale=init_bias, **fans)) if kernel and bias else None
        self.register_buffer('resample_filter', make_resample_filter(resample_filter) if up or down else None)

    def forward(self, x):
        x = _conv_layout(x)
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            # Upsample without cropping, then a valid-ish convolution: one fewer padding pass.
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, b if FUSED_CONV_BIAS else None, padding=max(w_pad - f_pad, 0), groups=self.groups)
            b = b if not FUSED_CONV_BIAS else None
        elif self.fused_resample and self.down and w is not None:
            # Convolve at full resolution with extra padding, then filter + decimate.
            x = F.conv2d(x, w, padding=w_pad + f_pad, groups=self.groups)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, b if FUSED_CONV_BIAS else None, padding=w_pad, groups=self.groups)
                b = b if not FUSED_CONV_BIAS else None
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

#----------------------------------------------------------------------------
# Group normalisation; fewer groups for narrow layers (>= min_channels_per_group each).

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with a learned per-channel affine.

    Uses min(num_groups, num_channels // min_channels_per_group) groups, so narrow layers keep at
    least `min_channels_per_group` channels in every group.
    """
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

def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(c)) over the keys, computed in float32, returned in q.dtype (the paper's AttentionOp)."""
    return torch.bmm(q.to(torch.float32).transpose(1, 2), (k / np.sqrt(k.shape[1])).to(torch.float32)).softmax(dim=2).to(q.dtype)

def attention_weights_backward(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, dw: torch.Tensor,
                               dq: torch.Tensor | None = None, dk: torch.Tensor | None = None):
    """Gradients of attention_weights (into dq/dk when given). The softmax backward w * (dw - sum(dw * w)) runs
    in fp32 as one fused pass; then the two products, scaled in place."""
    db = torch._softmax_backward_data(dw.to(torch.float32), w.to(torch.float32), 2, torch.float32)
    scale = np.sqrt(k.shape[1])
    dq = torch.div(torch.bmm(k.to(torch.float32), db.transpose(1, 2)).to(q.dtype), scale, out=dq)
    dk = torch.div(torch.bmm(q.to(torch.float32), db).to(k.dtype), scale, out=dk)
    return dq, dk

class AttentionOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k):
        w = attention_weights(q, k)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        return attention_weights_backward(q, k, w, dw)

# The explicit form works through the N*heads axis in chunks whose weights [chunk, L_q, L_k] stay in cache, and
# runs the whole chain (weights, softmax, product with v; backward: both products and the softmax backward) one
# chunk at a time. The arithmetic is that of the unchunked ops, element for element (bit-identical where
# measured; tests hold it to float rounding), but the [N*heads, L, L] temporaries no longer stream through memory
# several times: the quick start's attention (64 x 32 x 256) ran 2.8x faster forward, 1.2-2.2x forward+backward
# (benchmarks/bench_networks.py --attn-only); shapes whose weights fit in cache anyway run as fast as unchunked.
ATTENTION_CHUNK_BYTES = 2 * 2**20

def _attention_chunks(q: torch.Tensor, k: torch.Tensor):
    if q.device.type != 'cpu':  # a CPU cache optimisation; on a GPU, chunks would only add kernel launches
        return [slice(None)]
    step = max(1, ATTENTION_CHUNK_BYTES // (q.shape[2] * k.shape[2] * 4))
    return [slice(i, i + step) for i in range(0, q.shape[0], step)]

def _chunked_attention_forward(q, k, v, save_weights: bool):
    """[N*heads, L_q, C_v] output (and the weights [N*heads, L_q, L_k] if save_weights), chunk by chunk."""
    chunks = _attention_chunks(q, k)
    if len(chunks) == 1:  # one chunk (always off the CPU): the plain ops, no buffers to fill and no copy of w
        w = attention_weights(q, k)
        return torch.bmm(w, v.transpose(1, 2)), (w if save_weights else None)
    out = torch.empty([q.shape[0], q.shape[2], v.shape[1]], dtype=q.dtype, device=q.device)
    weights = torch.empty([q.shape[0], q.shape[2], k.shape[2]], dtype=q.dtype, device=q.device) if save_weights else None
    for s in chunks:
        w = attention_weights(q[s], k[s])
        torch.bmm(w, v[s].transpose(1, 2), out=out[s])
        if save_weights:
            weights[s] = w
    return out, weights

class ChunkedAttentionOp(torch.autograd.Function):
    """softmax(q^T k / sqrt(c)) v^T for [N*heads, C/heads, L] q, k, v, chunked (ATTENTION_CHUNK_BYTES); returns
    [N*heads, L_q, C_v]. The same numbers as AttentionOp followed by torch.bmm, forward and backward."""
    @staticmethod
    def forward(ctx, q, k, v):
        out, weights = _chunked_attention_forward(q, k, v, save_weights=True)
        ctx.save_for_backward(q, k, v, weights)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, weights = ctx.saved_tensors
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty([v.shape[0], v.shape[2], v.shape[1]], dtype=v.dtype, device=v.device)  # grad of v^T
        for s in _attention_chunks(q, k):
            w = weights[s]
            torch.bmm(w.transpose(1, 2), dout[s], out=dv[s])
            attention_weights_backward(q[s], k[s], w, torch.bmm(dout[s], v[s]), dq=dq[s], dk=dk[s])
        return dq, dk, dv.transpose(1, 2)

# 'auto': torch's fused scaled_dot_product_attention for fp32 on CUDA (same numbers to ~1e-7, far less
# memory); the explicit form elsewhere (faster than SDPA on CPU for the U-Net's shapes) and always for
# fp16/bf16, so the softmax runs in float32.
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
    # Computed as [N*heads, L_q, C/heads] so that the weights' gradient comes out contiguous (the fused softmax
    # backward would copy a transposed one); returned as a transposed view.
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return ChunkedAttentionOp.apply(q, k, v).transpose(1, 2)
    return _chunked_attention_forward(q, k, v, save_weights=False)[0].transpose(1, 2)

#----------------------------------------------------------------------------
# Grouped convolutions (our addition): an opt-in way to shrink the U-Nets. A group count G applies to
# the 3x3 convolutions inside every UNetBlock; the input conv and the output conv (image channels),
# the NCSN++ input pyramid and all 1x1 convolutions stay dense. G = 1 is the paper's architecture, and
# is never recorded in constructor kwargs, so default networks pickle exactly as before.

def _only_if_grouped(**kwargs) -> dict:
    """The given group-count kwargs, or {} when they are all 1 (keeps default kwargs the paper's)."""
    return kwargs if any(v != 1 for v in kwargs.values()) else {}

def _only_if_on(**flags) -> dict:
    """The given boolean kwargs that are on (opt-in options stay out of the paper's constructor kwargs)."""
    return {name: True for name, on in flags.items() if on}

def conv_groups_mismatch(conv_groups: int, model_channels: int, channel_mult) -> tuple[int, int] | None:
    """First (level, width) of a U-Net whose width model_channels * channel_mult[level] is not divisible
    by conv_groups >= 1, or None when G divides them all (then it also divides every block's input width,
    a sum of level widths in the decoder)."""
    for level, mult in enumerate(channel_mult):
        if (model_channels * mult) % conv_groups:
            return level, model_channels * mult
    return None

def check_conv_groups(conv_groups: int, model_channels: int, channel_mult) -> None:
    """Raise a one-line ValueError unless conv_groups >= 1 divides every level's width."""
    if conv_groups < 1:
        raise ValueError(f'conv_groups must be >= 1, got {conv_groups}')
    bad = conv_groups_mismatch(conv_groups, model_channels, channel_mult)
    if bad is None:
        return
    level, width = bad
    raise ValueError(f'conv_groups={conv_groups} does not divide the {width} channels of level {level} '
                     f'(model_channels={model_channels} x channel_mult[{level}]={channel_mult[level]}); '
                     f'choose a divisor of every level width')

#----------------------------------------------------------------------------
# U-Net block: GroupNorm-SiLU-Conv, embedding-conditioned scale/shift, dropout,
# conv, skip connection, optional self-attention.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block shared by both U-Nets, optionally followed by self-attention.

    in_channels, out_channels -- widths of the block's input and output.
    emb_channels -- width of the conditioning vector `emb`.
    up, down -- resample by 2 inside the block (first conv and skip path).
    attention -- append self-attention, with `num_heads` heads if given, otherwise
      out_channels // channels_per_head heads.
    dropout -- rate applied just before the second conv.
    skip_scale -- factor on every residual sum (sqrt(1/2) for DDPM++/NCSN++, 1 for ADM).
    eps -- GroupNorm epsilon.
    resample_filter -- FIR taps used for resampling (see `Conv2d`).
    resample_proj -- give a resampling skip path a 1x1 conv even when the width is unchanged.
    adaptive_scale -- condition as norm(h) * (1 + scale) + shift (ADM); otherwise `emb` is just
      added before the second norm (DDPM++/NCSN++).
    init -- init kwargs for ordinary layers; init_zero -- for conv1 and proj, which write into
      the residual sum; init_attn -- for qkv (falls back to `init`).
    conv_groups -- (our addition) groups of the two 3x3 convolutions conv0 and conv1 (see `Conv2d`);
      the 1x1 skip projection, qkv and proj stay dense and mix the channels across groups.
    fast_dropout -- (our addition) draw the dropout mask with `fast_dropout_mask` (cheaper, other random
      numbers than the paper's F.dropout; same distribution up to p rounded to a multiple of 2^-16).
    """
    fast_dropout = False  # class default; set on the instance only when on
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
                 attention=False, num_heads=None, channels_per_head=64, dropout=0, skip_scale=1,
                 eps=1e-5, resample_filter=[1,1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None, conv_groups=1, fast_dropout=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:
            self.num_heads = out_channels // channels_per_head
        self.dropout = dropout
        if fast_dropout:  # else the class default, so a default block's pickled state stays the paper's
            self.fast_dropout = True
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        # `affine` maps emb to a (scale, shift) pair, or to a shift only.
        cond_width = 2 * out_channels if adaptive_scale else out_channels

        grouped = _only_if_grouped(groups=conv_groups)
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init, **grouped)
        self.affine = Linear(in_features=emb_channels, out_features=cond_width, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero, **grouped)

        # Identity skip unless the shape changes; then a 1x1 projection when the width changes
        # (or resample_proj asks for one), else a weightless resampler.
        self.skip = None
        if out_channels != in_channels or up or down:
            project = resample_proj or out_channels != in_channels
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=(1 if project else 0), up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels*3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))

        x = self.conv1(dropout(x, p=self.dropout, training=self.training, fast=self.fast_dropout))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = self._scale(x)

        if self.num_heads:
            # qkv channels are laid out as [heads, C/heads, 3].
            q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            a = attention(q, k, v).reshape(*x.shape)  # a view when possible, in whichever layout
            x = self.proj(a.contiguous(memory_format=_conv_memory_format(a))).add_(x)
            x = self._scale(x)
        return x

    def _scale(self, x):
        # x is a fresh sum here; scaling by a constant needs nothing saved, so in place is autograd-safe.
        # float(): the paper's skip_scale is a numpy scalar, which torch.compile would trace as a tensor.
        skip_scale = float(self.skip_scale)
        if not INPLACE_OPS:
            return x * skip_scale
        return x if skip_scale == 1 else x.mul_(skip_scale)

#----------------------------------------------------------------------------
# Noise-level encodings: sinusoidal (DDPM++, ADM) or random Fourier features (NCSN++).

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
    """U-Net backbone of DDPM++ and NCSN++ (Song et al. 2021), configured per Table 7 of EDM.

    Input/output:
      img_resolution -- side length of the square images the network consumes and produces.
      in_channels, out_channels -- channels of the input tensor and of the prediction.
      label_dim -- size of the one-hot class vector; 0 builds an unconditional network.
      augment_dim -- size of the augmentation-parameter vector produced by `AugmentPipe`
        (non-leaking augmentation, EDM Appendix); 0 turns that conditioning off.

    Capacity:
      model_channels -- width at full resolution; each level's width is this times its
        `channel_mult` entry.
      channel_mult -- one width factor per level; level i runs at img_resolution / 2**i.
      channel_mult_emb -- width of the conditioning vector given to every block, in units of
        `model_channels`.
      num_blocks -- residual blocks per level in the encoder (the decoder uses one more).
      attn_resolutions -- side lengths at which blocks also apply self-attention.
      dropout -- dropout rate inside every residual block (before its second conv).
      label_dropout -- training-time probability of blanking a sample's class label, so one
        network also learns the unconditional score (classifier-free guidance).

    DDPM++ vs. NCSN++ (the two columns of Table 7):
      embedding_type -- noise-level encoding: 'positional' sinusoids (DDPM++) or random
        'fourier' features (NCSN++).
      channel_mult_noise -- width of that encoding in units of `model_channels` (1 / 2).
      encoder_type -- 'standard' (DDPM++); 'skip' injects a downsampled copy of the input at
        every level; 'residual' (NCSN++) runs a strided-conv input pyramid merged into the main
        path at every level.
      decoder_type -- 'standard' (both) predicts from the finest level only; 'skip' sums
        upsampled predictions from all levels.
      resample_filter -- 1-D FIR taps for up/down-sampling: [1,1] (DDPM++), [1,3,3,1] (NCSN++).

    Size and speed (our additions):
      conv_groups -- group count G of the 3x3 convolutions inside every UNetBlock (their weights
        shrink by G); must divide every level width. 1 is the paper's dense network.
      fast_dropout -- draw the blocks' dropout masks with `fast_dropout_mask` (cheaper; other random
        numbers than the paper's F.dropout). Off by default, and then not recorded in the kwargs.
    """
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1,2,2,2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard',
                 resample_filter=[1,1], conv_groups=1, fast_dropout=False):
        assert embedding_type in ['fourier', 'positional'], f'invalid embedding_type {embedding_type!r}'
        assert encoder_type in ['standard', 'skip', 'residual'], f'invalid encoder_type {encoder_type!r}'
        assert decoder_type in ['standard', 'skip'], f'invalid decoder_type {decoder_type!r}'
        check_conv_groups(conv_groups, model_channels, channel_mult)

        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        # Xavier-uniform everywhere; layers that write into the residual stream start near zero,
        # attention's qkv projection at sqrt(0.2) gain.
        init_std = dict(init_mode='xavier_uniform')
        init_out = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_qkv = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_cfg = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init_std, init_zero=init_out, init_attn=init_qkv, **_only_if_grouped(conv_groups=conv_groups),
            **_only_if_on(fast_dropout=fast_dropout),
        )

        # Conditioning MLP: noise-level features (+ class, + augmentation terms) -> emb_channels.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init_std) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init_std) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init_std)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init_std)

        # Contracting path, finest level first. Level 0 opens with a 3x3 conv to model_channels;
        # every later level opens with a strided block (plus the optional input-pyramid layers).
        # `ch` tracks the main path's width, `ch_img` the width of the input pyramid.
        self.enc = torch.nn.ModuleDict()
        ch = in_channels
        ch_img = in_channels
        for lvl, factor in enumerate(channel_mult):
            r = img_resolution >> lvl
            tag = f'{r}x{r}'
            if lvl == 0:
                self.enc[f'{tag}_conv'] = Conv2d(in_channels=ch, out_channels=model_channels, kernel=3, **init_std)
                ch = model_channels
            else:
                self.enc[f'{tag}_down'] = UNetBlock(in_channels=ch, out_channels=ch, down=True, **block_cfg)
                if encoder_type == 'skip':
                    self.enc[f'{tag}_aux_down'] = Conv2d(in_channels=ch_img, out_channels=ch_img, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{tag}_aux_skip'] = Conv2d(in_channels=ch_img, out_channels=ch, kernel=1, **init_std)
                if encoder_type == 'residual':
                    self.enc[f'{tag}_aux_residual'] = Conv2d(in_channels=ch_img, out_channels=ch, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init_std)
                    ch_img = ch
            width = model_channels * factor
            for i in range(num_blocks):
                self.enc[f'{tag}_block{i}'] = UNetBlock(in_channels=ch, out_channels=width, attention=(r in attn_resolutions), **block_cfg)
                ch = width
        # Widths of the activations the encoder hands to the decoder (input-pyramid layers excluded).
        saved_widths = [m.out_channels for key, m in self.enc.items() if 'aux' not in key]

        # Expanding path, coarsest level first. Each level concatenates one saved activation per
        # block; the finest level (or every level, for decoder_type='skip') emits an image.
        self.dec = torch.nn.ModuleDict()
        coarsest = len(channel_mult) - 1
        for lvl in range(coarsest, -1, -1):
            r = img_resolution >> lvl
            tag = f'{r}x{r}'
            if lvl == coarsest:
                self.dec[f'{tag}_in0'] = UNetBlock(in_channels=ch, out_channels=ch, attention=True, **block_cfg)
                self.dec[f'{tag}_in1'] = UNetBlock(in_channels=ch, out_channels=ch, **block_cfg)
            else:
                self.dec[f'{tag}_up'] = UNetBlock(in_channels=ch, out_channels=ch, up=True, **block_cfg)
            width = model_channels * channel_mult[lvl]
            for i in range(num_blocks + 1):
                use_attn = i == num_blocks and r in attn_resolutions
                self.dec[f'{tag}_block{i}'] = UNetBlock(in_channels=ch + saved_widths.pop(), out_channels=width, attention=use_attn, **block_cfg)
                ch = width
            if decoder_type == 'skip' or lvl == 0:
                if decoder_type == 'skip' and lvl < coarsest:
                    self.dec[f'{tag}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{tag}_aux_norm'] = GroupNorm(num_channels=ch, eps=1e-6)
                self.dec[f'{tag}_aux_conv'] = Conv2d(in_channels=ch, out_channels=out_channels, kernel=3, **init_out)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Conditioning vector: noise level, then class and augmentation labels, through a 2-layer MLP.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # DDPM++ orders sin before cos
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training, batch_size=x.shape[0])
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Contracting path; every block output is kept for the skip connections. `aux` carries the
        # downsampled input image for the skip/residual encoders.
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

        # Expanding path; the image leaves through the aux_norm/aux_conv output heads (summed over
        # resolutions, upsampled in between, for the skip decoder).
        aux = None
        head = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                head = block(x)
            elif 'aux_conv' in name:
                head = block(silu(head))
                aux = head if aux is None else head + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux.contiguous()  # NCHW again after channels_last convolutions (no-op otherwise)

#----------------------------------------------------------------------------
# ADM (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021).

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021), the backbone EDM uses for ImageNet-64 (Table 7).

    Input/output:
      img_resolution -- side length of the square images the network consumes and produces.
      in_channels, out_channels -- channels of the input tensor and of the prediction
        (iDDPMPrecond asks for twice the image channels: mean and variance outputs).
      label_dim -- size of the one-hot class vector; 0 builds an unconditional network.
      augment_dim -- size of the `AugmentPipe` parameter vector; 0 turns that conditioning off.

    Capacity:
      model_channels -- base width; level i is `model_channels * channel_mult[i]` wide and the
        sinusoidal noise encoding has this many features.
      channel_mult -- one width factor per level; level i runs at img_resolution / 2**i.
      channel_mult_emb -- width of the conditioning vector given to every block, in units of
        `model_channels`.
      num_blocks -- residual blocks per level in the encoder (the decoder uses one more).
      attn_resolutions -- side lengths whose blocks (encoder and decoder) add self-attention
        with 64 channels per head.
      dropout -- dropout rate inside every residual block (before its second conv).
      label_dropout -- training-time probability of blanking a sample's class label
        (classifier-free guidance).

    Size and speed (our additions):
      conv_groups -- group count G of the 3x3 convolutions inside every UNetBlock (their weights
        shrink by G); must divide every level width. 1 is the paper's dense network.
      fast_dropout -- draw the blocks' dropout masks with `fast_dropout_mask` (cheaper; other random
        numbers than the paper's F.dropout). Off by default, and then not recorded in the kwargs.
    """
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1,2,3,4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32,16,8], dropout=0.10, label_dropout=0, conv_groups=1, fast_dropout=False):
        check_conv_groups(conv_groups, model_channels, channel_mult)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        # Kaiming-uniform with gain sqrt(1/3) (torch's default layer init); layers that write into
        # the residual stream, and the augmentation mapping, start at exactly zero.
        init_std = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_out = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_cfg = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init_std, init_zero=init_out,
                         **_only_if_grouped(conv_groups=conv_groups), **_only_if_on(fast_dropout=fast_dropout))

        # Conditioning MLP: sinusoidal noise features (+ augmentation) -> emb_channels; the class
        # embedding is added after the MLP (see forward).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_out) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init_std)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init_std)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Contracting path, finest level first: a 3x3 input conv at level 0, a strided block at
        # every later level, then num_blocks residual blocks. `ch` tracks the current width.
        self.enc = torch.nn.ModuleDict()
        ch = in_channels
        for lvl, factor in enumerate(channel_mult):
            r = img_resolution >> lvl
            tag = f'{r}x{r}'
            width = model_channels * factor
            if lvl == 0:
                self.enc[f'{tag}_conv'] = Conv2d(in_channels=ch, out_channels=width, kernel=3, **init_std)
                ch = width
            else:
                self.enc[f'{tag}_down'] = UNetBlock(in_channels=ch, out_channels=ch, down=True, **block_cfg)
            for i in range(num_blocks):
                self.enc[f'{tag}_block{i}'] = UNetBlock(in_channels=ch, out_channels=width, attention=(r in attn_resolutions), **block_cfg)
                ch = width
        # Every encoder output is handed to the decoder; remember their widths.
        saved_widths = [m.out_channels for m in self.enc.values()]

        # Expanding path, coarsest level first; each block concatenates one saved activation.
        self.dec = torch.nn.ModuleDict()
        coarsest = len(channel_mult) - 1
        for lvl in range(coarsest, -1, -1):
            r = img_resolution >> lvl
            tag = f'{r}x{r}'
            if lvl == coarsest:
                self.dec[f'{tag}_in0'] = UNetBlock(in_channels=ch, out_channels=ch, attention=True, **block_cfg)
                self.dec[f'{tag}_in1'] = UNetBlock(in_channels=ch, out_channels=ch, **block_cfg)
            else:
                self.dec[f'{tag}_up'] = UNetBlock(in_channels=ch, out_channels=ch, up=True, **block_cfg)
            width = model_channels * channel_mult[lvl]
            for i in range(num_blocks + 1):
                self.dec[f'{tag}_block{i}'] = UNetBlock(in_channels=ch + saved_widths.pop(), out_channels=width, attention=(r in attn_resolutions), **block_cfg)
                ch = width
        self.out_norm = GroupNorm(num_channels=ch)
        self.out_conv = Conv2d(in_channels=ch, out_channels=out_channels, kernel=3, **init_out)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Conditioning vector: noise level (+ augmentation labels) through the MLP, class labels added last.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training, batch_size=x.shape[0])
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        # Contracting path, keeping every block output for the skip connections.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Expanding path: concatenate a skip whenever a block expects more channels than it gets.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        x = self.out_conv(silu(self.out_norm(x)))
        return x.contiguous()  # NCHW again after channels_last convolutions (no-op otherwise)

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

def _denoise(precond, x, sigma, class_labels, force_fp32, model_kwargs, coefficients):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7): the backbone runs in the chosen dtype, the
    skip connection and output scaling in float32. Extra output channels (iDDPM's variances) are dropped."""
    c_skip, c_out, c_in, c_noise = coefficients
    dtype = _compute_dtype(x, precond.use_fp16, getattr(precond, 'use_bf16', False), force_fp32)
    F_x = precond.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
    assert F_x.dtype == dtype
    return c_skip * x + c_out * F_x[:, :precond.img_channels].to(torch.float32)

def _make_model(model_type, **kwargs):
    models = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
    if model_type not in models:
        raise ValueError(f'Unknown model_type {model_type!r}; expected one of {sorted(models)}')
    return models[model_type](**kwargs)

#----------------------------------------------------------------------------
# Learned uncertainty (our addition, from EDM2: Karras et al. 2024, config B). An opt-in head
# u(sigma) = logvar_linear(logvar_fourier(ln(sigma) / 4)), EDM2's own MPFourier + MPConv layers with EDM2's
# state_dict names, read by training.loss.EDM2Loss through forward(..., return_logvar=True). The head always
# sees ln(sigma) / 4 (EDM2's c_noise), whatever the preconditioner's own c_noise: the Fourier features
# expect O(1) inputs (VP's c_noise reaches 999). Off (logvar_channels=None), nothing is added.

def _add_logvar_head(precond, logvar_channels) -> None:
    if not logvar_channels:
        return
    from training import networks_edm2  # imported only when asked: this module's source must stay loadable
                                        # by the paper's code, which has no networks_edm2
    # Build after the backbone so its initialisation is unchanged; under no_weight_init draw from a forked
    # stream so the global one is left alone.
    with torch.random.fork_rng(devices=[]) if getattr(_init_state, 'skip', False) else contextlib.nullcontext():
        precond.logvar_fourier = networks_edm2.MPFourier(logvar_channels)
        precond.logvar_linear = networks_edm2.MPConv(logvar_channels, 1, kernel=[])

def _logvar(precond, sigma) -> torch.Tensor:
    """u(sigma) as [N, 1, 1, 1] float32, for sigma of shape [N, 1, 1, 1]."""
    if getattr(precond, 'logvar_linear', None) is None:
        raise ValueError(f'{type(precond).__name__} has no uncertainty head; construct it with logvar_channels=N '
                         f'(train.py --uncertainty=1) to use return_logvar / EDM2Loss')
    c_noise = sigma.to(torch.float32).flatten().log() / 4
    return precond.logvar_linear(precond.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

#----------------------------------------------------------------------------
# VP preconditioning (Song et al. 2021, DDPM++).

@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    """Variance-preserving preconditioning (Song et al. 2021; 'VP' column of EDM Table 1).

    img_resolution, img_channels -- image size and channel count (the backbone maps
      img_channels -> img_channels).
    label_dim -- class-vector size, 0 for an unconditional model.
    use_fp16 -- run the backbone in float16; honoured on CUDA only, ignored on CPU.
    beta_d, beta_min -- the VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1):
      beta_d sets its overall extent, beta_min its slope at t = 0.
    M -- number of discrete DDPM steps; c_noise = (M - 1) t rescales t to that range.
    epsilon_t -- smallest t seen in training; sigma(epsilon_t) becomes `sigma_min`.
    model_type -- backbone class name ('SongUNet' or 'DhariwalUNet').
    use_bf16 -- (our addition) run the backbone in bfloat16 on any device.
    logvar_channels -- (our addition) add EDM2's learned-uncertainty head with this many Fourier features
      (EDM2 uses 128), for forward(..., return_logvar=True) and EDM2Loss; None: no head.
    **model_kwargs -- forwarded to the backbone constructor.
    """
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9,
                 beta_min=0.1, M=1000, epsilon_t=1e-5, model_type='SongUNet', use_bf16=False,
                 logvar_channels=None, **model_kwargs):
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
        _add_logvar_head(self, logvar_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **model_kwargs):
        x, sigma, class_labels = _prepare_inputs(x, sigma, class_labels, self.label_dim)
        D_x = _denoise(self, x, sigma, class_labels, force_fp32, model_kwargs, vp_coefficients(sigma, self.M, self.beta_d, self.beta_min))
        return (D_x, _logvar(self, sigma)) if return_logvar else D_x

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
    """Variance-exploding preconditioning (Song et al. 2021; 'VE' column of EDM Table 1).

    img_resolution, img_channels -- image size and channel count.
    label_dim -- class-vector size, 0 for an unconditional model.
    use_fp16 -- run the backbone in float16; honoured on CUDA only, ignored on CPU.
    sigma_min, sigma_max -- noise-level range the model was trained for (samplers read them).
    model_type -- backbone class name ('SongUNet' or 'DhariwalUNet').
    use_bf16 -- (our addition) run the backbone in bfloat16 on any device.
    logvar_channels -- (our addition) add EDM2's learned-uncertainty head with this many Fourier features
      (EDM2 uses 128), for forward(..., return_logvar=True) and EDM2Loss; None: no head.
    **model_kwargs -- forwarded to the backbone constructor.
    """
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02,
                 sigma_max=100, model_type='SongUNet', use_bf16=False, logvar_channels=None,
                 **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _make_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)
        _add_logvar_head(self, logvar_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **model_kwargs):
        x, sigma, class_labels = _prepare_inputs(x, sigma, class_labels, self.label_dim)
        D_x = _denoise(self, x, sigma, class_labels, force_fp32, model_kwargs, ve_coefficients(sigma))
        return (D_x, _logvar(self, sigma)) if return_logvar else D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# Improved DDPM preconditioning (Nichol & Dhariwal 2021, ADM backbone).

@persistence.persistent_class
class iDDPMPrecond(torch.nn.Module):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021; 'iDDPM' column of EDM Table 1).

    img_resolution, img_channels -- image size and channel count (the backbone outputs twice as
      many channels; the variance half is ignored).
    label_dim -- class-vector size, 0 for an unconditional model.
    use_fp16 -- run the backbone in float16; honoured on CUDA only, ignored on CPU.
    C_1 -- lower clamp on alpha_bar(j-1) / alpha_bar(j) in the recursion that builds the sigma
      table u_j; it caps how fast u grows per step at the noisy end.
    C_2 -- the cosine schedule's offset s: alpha_bar(j) = sin^2(pi/2 * j / (M (C_2 + 1))); it
      keeps the lowest noise levels from collapsing to zero.
    M -- number of discrete steps; sigma is snapped to the nearest entry of the table u.
    model_type -- backbone class name ('DhariwalUNet' or 'SongUNet').
    use_bf16 -- (our addition) run the backbone in bfloat16 on any device.
    **model_kwargs -- forwarded to the backbone constructor.
    """
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001,
                 C_2=0.008, M=1000, model_type='DhariwalUNet', use_bf16=False, **model_kwargs):
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
        index = self.round_sigma(sigma, return_index=True).to(torch.float32)
        return _denoise(self, x, sigma, class_labels, force_fp32, model_kwargs, iddpm_coefficients(sigma, index, self.M))

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
    """EDM preconditioning (Karras et al. 2022, Sec. 5; 'Ours' column of Table 1).

    img_resolution, img_channels -- image size and channel count.
    label_dim -- class-vector size, 0 for an unconditional model.
    use_fp16 -- run the backbone in float16; honoured on CUDA only, ignored on CPU.
    sigma_min, sigma_max -- noise-level range the model supports (default: unrestricted).
    sigma_data -- standard deviation of the data distribution, which sets c_skip, c_out and c_in.
    model_type -- backbone class name ('DhariwalUNet' or 'SongUNet').
    use_bf16 -- (our addition) run the backbone in bfloat16 on any device.
    logvar_channels -- (our addition) add EDM2's learned-uncertainty head with this many Fourier features
      (EDM2 uses 128), for forward(..., return_logvar=True) and EDM2Loss; None: no head.
    **model_kwargs -- forwarded to the backbone constructor.
    """
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', use_bf16=False,
                 logvar_channels=None, **model_kwargs):
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
        _add_logvar_head(self, logvar_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **model_kwargs):
        x, sigma, class_labels = _prepare_inputs(x, sigma, class_labels, self.label_dim)
        D_x = _denoise(self, x, sigma, class_labels, force_fp32, model_kwargs, edm_coefficients(sigma, self.sigma_data))
        return (D_x, _logvar(self, sigma)) if return_logvar else D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
