"""Weight averaging policies for the training loop, and the paper's EMA.

The loop keeps an average of the network's weights and samples from it. It builds the policy from
`ema_kwargs` (`class_name` plus constructor kwargs, constructed as `cls(net=net, **kwargs)`) and calls:

    update(cur_nimg, batch_size)  after every optimizer step; cur_nimg counts the images seen *including*
                                  this step (the EDM2 convention)
    get()                         [(averaged module, suffix), ...]: one snapshot per entry, named
                                  network-snapshot-<kimg>.pkl for suffix '' (the paper's layout) and
                                  network-snapshot-<kimg:07d><suffix>.pkl otherwise (EDM2's, e.g. '-0.050')
    state_dict() / load_state_dict(state)
                                  tensors and plain data only, saved in training-state-*.pt
    reset()                       restart every average from the network's current weights

`HalfLifeEMA` is the paper's EMA (Section 5 / Appendix F.1) and the default; `training.phema` has EDM2's
power-function EMA. A new policy is a class with these five methods, named in `ema_kwargs`.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch


def ema_halflife_nimg(cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio: Optional[float]) -> float:
    """EMA half-life in images; during ramp-up it is at most `ema_rampup_ratio` of the images seen."""
    halflife = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife = min(halflife, cur_nimg * ema_rampup_ratio)
    return halflife


def ema_beta(batch_size: int, cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio: Optional[float]) -> float:
    """Per-step EMA decay: beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))."""
    halflife = ema_halflife_nimg(cur_nimg, ema_halflife_kimg, ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


class HalfLifeEMA:
    """The half-life EMA: ema <- beta ema + (1 - beta) net for every parameter after each step, with
    beta = 0.5^(batch / h) and half-life h = `halflife_kimg` (ramped up as `rampup_ratio` x the images seen;
    None = no ramp-up). This class has the paper's conventions (Appendix F.1): beta from the images seen
    before the step, buffers keep the values they had when the copy was made, and the state_dict is the
    averaged module's (so training states written before policies existed still load).
    `training.phema.TraditionalEMA` is the same EMA with EDM2's conventions."""

    def __init__(self, net: torch.nn.Module, halflife_kimg: float = 500, rampup_ratio: Optional[float] = 0.05):
        self.net = net
        self.halflife_kimg = halflife_kimg
        self.rampup_ratio = rampup_ratio
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)

    def _beta(self, cur_nimg: int, batch_size: int) -> float:
        return ema_beta(batch_size, cur_nimg - batch_size, self.halflife_kimg, self.rampup_ratio)

    @staticmethod
    def _average(p_ema: torch.Tensor, p_net: torch.Tensor, beta: float) -> None:
        p_ema.copy_(p_net.lerp(p_ema, beta))  # the paper's rounding: net + beta (ema - net)

    @torch.no_grad()
    def reset(self) -> None:
        for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.copy_(p_net.detach())

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        beta = self._beta(cur_nimg, batch_size)
        for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
            self._average(p_ema, p_net.detach(), beta)

    def get(self) -> list:
        return [(self.ema, '')]

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state, strict=True)


def warmup_ema_decay(step_index: int, beta: float, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The per-step decay of the EMA that FutureXiang/edm2 uses (the ema_pytorch package with
    update_after_step=0, update_every=1; crowsonkb's EMA warm-up): 0 at the first update (a copy), then
    min(1 - (1 + k / inv_gamma)^(-power), beta) at update k = 1, 2, ...; beta = 0.9993 is reached after ~54k steps."""
    if step_index <= 0:
        return 0.0
    return min(1 - (1 + step_index / inv_gamma) ** -power, beta)


class WarmupEMA(HalfLifeEMA):
    """A per-step EMA with decay warmup_ema_decay(k, beta): ema <- d ema + (1 - d) net after step k (0-based,
    counted as cur_nimg / batch_size - 1, so a resumed run continues the same sequence). The EMA of the
    small-scale EDM2 ladder (training/networks_edm2small.py, beta 0.9993). Everything else (buffers, state_dict,
    snapshots) as HalfLifeEMA."""

    def __init__(self, net: torch.nn.Module, beta: float = 0.9993, inv_gamma: float = 1.0, power: float = 2 / 3):
        self.net = net
        self.beta = beta
        self.inv_gamma = inv_gamma
        self.power = power
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)

    def _beta(self, cur_nimg: int, batch_size: int) -> float:
        return warmup_ema_decay(round(cur_nimg / batch_size) - 1, self.beta, self.inv_gamma, self.power)
