"""Post-hoc EMA of EDM2 ("Analyzing and Improving the Training Dynamics of Diffusion Models", Karras et al.,
CVPR 2024, Sec. 3 and Appendix C).

A power-function EMA averages the training trajectory theta(tau), tau in [0, t], with the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Its width is described by the relative standard
deviation sigma_rel of that profile divided by t:

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))                      (exp_to_std)

and the inverse is the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma
+ (12 - sigma_rel^-2) = 0 (std_to_exp). Tracked step by step, it is an ordinary EMA whose decay depends on
the images seen so far, beta(t) = (1 - delta_t / t)^(gamma + 1) for steps of delta_t images
(power_function_beta).

Post-hoc reconstruction (Sec. 3; the correlation-based solve of Appendix C, Algorithm 3): snapshots of a few tracked profiles
(t_i, gamma_i) are combined linearly, theta_out = sum_i x_i theta_i, with x the least-squares fit of the
wanted profile in L2 over tau: A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_out>
(power_function_correlation gives <p_a, p_b> in closed form), then normalised so the weights sum to 1
(solve_posthoc_coefficients). `combine_snapshots` applies the coefficients.

EDM2's EMA policies for the training loop (interface: training/ema.py): `PowerFunctionEMA` (the EDM2
default, one EMA per sigma_rel) and `TraditionalEMA` (training.ema.HalfLifeEMA with EDM2's conventions).
Both evaluate beta at the images seen including the step (the paper's EMA: before it).

Post-hoc math is float64 numpy; EMA weights are updated in the network's own dtype.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

import dnnlib
from training.ema import HalfLifeEMA, ema_beta

#----------------------------------------------------------------------------
# Profile width <-> exponent.

def exp_to_std(exp):
    """sigma_rel of the power-function profile with exponent gamma (float64, same shape)."""
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))

STD_MAX = float(np.sqrt(1 / 12))  # sigma_rel as gamma -> 0 (exp_to_std(0)): longer profiles do not exist

def parse_std_list(s):
    """EMA lengths sigma_rel from a command line, '0.05,0.1' or EDM2's '0.010,0.015,...,0.250': sorted,
    distinct, each in (0, STD_MAX). Raises ValueError with a one-line reason."""
    stds = dnnlib.util.parse_float_list(s)
    if not stds or not all(0 < std < STD_MAX for std in stds):
        raise ValueError(f'"{s}": EMA lengths (sigma_rel) must lie in (0, {STD_MAX:.4f})')
    return stds

def std_to_exp(std):
    """Exponent gamma with exp_to_std(gamma) = std: the largest real root of the cubic above (float64,
    same shape). Only 0 < std < ~0.289 (gamma > 0) is meaningful."""
    std = np.float64(std)
    inv_var = std.reshape(-1) ** -2
    exp = [np.roots([1, 7, 16 - s, 12 - s]).real.max() for s in inv_var]
    return np.float64(exp).reshape(std.shape)

#----------------------------------------------------------------------------
# Power-function profiles.

def power_function_response(ofs, std, len, axis=0):
    """The discrete profiles themselves: for each (ofs, std) pair the weight of steps t = 0 .. len-1,
    proportional to (t / ofs)^gamma for t <= ofs and 0 after, normalised to sum 1. The step axis is
    inserted at `axis` (useful for plots of the profiles a reconstruction achieves)."""
    ofs, std = np.broadcast_arrays(np.float64(ofs), np.float64(std))
    ofs = np.expand_dims(ofs, axis)
    exp = np.expand_dims(std_to_exp(std), axis)
    shape = [1] * ofs.ndim
    shape[axis] = -1
    t = np.arange(len, dtype=np.float64).reshape(shape)
    resp = np.where(t <= ofs, (t / ofs) ** exp, 0) * (exp + 1) / ofs
    return resp / np.sum(resp, axis=axis, keepdims=True)

def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for profiles ending at a_ofs and b_ofs. With
    T = max(a_ofs, b_ofs) and the shorter profile's end m = min(a_ofs, b_ofs) the integral is
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) / T * (m / T)^gamma_long, where gamma_long belongs to
    the profile ending at T. Broadcasts; float64."""
    a_exp = std_to_exp(a_std)
    b_exp = std_to_exp(b_std)
    a_ofs = np.float64(a_ofs)
    b_ofs = np.float64(b_ofs)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)  # (a/b)^gamma_b when b is longer, (b/a)^gamma_a otherwise
    t_max = np.maximum(a_ofs, b_ofs)
    return (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp / ((a_exp + b_exp + 1) * t_max)

def power_function_beta(std, t_next, t_delta):
    """Per-step decay of a power-function EMA that reaches t_next images after a step of t_delta images:
    (1 - t_delta / t_next)^(gamma + 1). Zero at the first step (t_next = t_delta)."""
    return (1 - np.float64(t_delta) / np.float64(t_next)) ** (std_to_exp(std) + 1)

def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Coefficients [len(in), len(out)] that combine the stored profiles (in_ofs[i], in_std[i]) into each
    wanted profile (out_ofs[j], out_std[j]): least squares in L2 (Algorithm 3), columns normalised to sum 1."""
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std))
    col = lambda v: v.reshape(-1, 1)
    row = lambda v: v.reshape(1, -1)
    A = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
    B = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
    X = np.linalg.solve(A, B)
    return X / np.sum(X, axis=0)

def combine_snapshots(inputs, coefs):
    """out_j = sum_i coefs[i, j] * inputs[i], accumulated in float32. `inputs` is an iterable (it may be a
    generator that loads one snapshot at a time) of tensors or of dicts of tensors (state_dicts);
    returns a list of len(out) results of the same kind. Non-floating tensors (e.g. integer buffers) are
    taken from the last input."""
    coefs = np.float64(coefs)
    outs = None
    num_inputs = 0
    for i, item in enumerate(inputs):
        if i >= coefs.shape[0]:
            raise ValueError(f'combine_snapshots: more inputs than the {coefs.shape[0]} rows of coefs')
        single = torch.is_tensor(item)
        entries = {'': item} if single else item
        if outs is None:
            outs = [{k: torch.zeros_like(v, dtype=torch.float32) if v.is_floating_point() else v.clone()
                     for k, v in entries.items()} for _ in range(coefs.shape[1])]
        for j, out in enumerate(outs):
            for k, v in entries.items():
                if v.is_floating_point():
                    out[k].add_(v.to(torch.float32), alpha=float(coefs[i, j]))
                else:
                    out[k] = v.clone()
        num_inputs += 1
    if num_inputs != coefs.shape[0]:
        raise ValueError(f'combine_snapshots: {num_inputs} inputs but coefs has {coefs.shape[0]} rows')
    return [out[''] if single else out for out in outs]

#----------------------------------------------------------------------------
# EMA policies for the training loop: constructed as cls(net=net, **kwargs); update() after each optimizer
# step; get() -> [(module, snapshot-name suffix)]; state_dict() holds tensors and plain data only.

def _ema_copy(net: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(net).eval().requires_grad_(False)

@torch.no_grad()
def _sync_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for b_src, b_dst in zip(src.buffers(), dst.buffers()):
        b_dst.copy_(b_src)

@torch.no_grad()
def _copy_params_and_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for p_src, p_dst in zip(src.parameters(), dst.parameters()):
        p_dst.copy_(p_src.detach())
    _sync_buffers(src, dst)

@torch.no_grad()
def _lerp_params(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, parameters only."""
    for p_net, p_ema in zip(net.parameters(), ema.parameters()):
        p_ema.lerp_(p_net.detach(), 1 - float(beta))

class PowerFunctionEMA:
    """One power-function EMA of `net` per relative standard deviation in `stds` (EDM2 tracks 0.050 and
    0.100 and reconstructs any other length post hoc). Snapshot suffixes are '-0.050', '-0.100'."""

    def __init__(self, net: torch.nn.Module, stds=[0.050, 0.100]):
        self.net = net
        self.stds = [float(std) for std in stds]
        self.emas = [_ema_copy(net) for _ in self.stds]

    def reset(self) -> None:
        for ema in self.emas:
            _copy_params_and_buffers(self.net, ema)

    def update(self, cur_nimg: int, batch_size: int) -> None:
        for std, ema in zip(self.stds, self.emas):
            _lerp_params(ema, self.net, power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size))

    def get(self) -> list:
        for ema in self.emas:
            _sync_buffers(self.net, ema)
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self) -> dict:
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state['stds']] != self.stds:
            raise ValueError(f'EMA state tracks stds {state["stds"]} but this run asks for {self.stds}; '
                             f'use the same EMA lengths as the run that wrote it')
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)

class TraditionalEMA(HalfLifeEMA):
    """EDM2's half-life EMA: training.ema.HalfLifeEMA with EDM2's conventions. Half-life `halflife_Mimg`
    million images (ramped up as `rampup_ratio` x the images seen; None: no ramp-up); beta from the images
    seen including the step; reset and get() also copy the buffers; state_dict is dict(ema=...). Snapshot
    suffix ''."""

    def __init__(self, net: torch.nn.Module, halflife_Mimg: float = float('inf'), rampup_ratio: float | None = 0.09):
        super().__init__(net, halflife_kimg=halflife_Mimg * 1000, rampup_ratio=rampup_ratio)
        self.halflife_Mimg = halflife_Mimg

    def _beta(self, cur_nimg: int, batch_size: int) -> float:
        return ema_beta(batch_size, cur_nimg, self.halflife_kimg, self.rampup_ratio)

    @staticmethod
    def _average(p_ema: torch.Tensor, p_net: torch.Tensor, beta: float) -> None:
        p_ema.lerp_(p_net, 1 - float(beta))  # EDM2's rounding: ema + (1 - beta) (net - ema)

    def reset(self) -> None:
        _copy_params_and_buffers(self.net, self.ema)

    def get(self) -> list:
        _sync_buffers(self.net, self.ema)
        return [(self.ema, '')]

    def state_dict(self) -> dict:
        return dict(ema=self.ema.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state['ema'])

#----------------------------------------------------------------------------
