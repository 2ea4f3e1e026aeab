"""An adaptive Runge-Kutta ODE solver in torch: Dormand-Prince 5(4) ("dopri5"; Dormand & Prince 1980,
Hairer, Norsett & Wanner, "Solving Ordinary Differential Equations I", Sec. II.4-II.5), for batched states.

    y1, stats = dopri5(f, y0, t0, t1, rtol=1e-5, atol=1e-5)

f(t, y) -> dy/dt with y of shape [B, ...]. The local error is measured per batch element as the RMS of
err / (atol + rtol max(|y|, |y_new|)) and a step is accepted when every element's is <= 1, so all elements
share one step sequence (a batch is one ODE system). The 5th-order solution is propagated (local
extrapolation) and the last stage is reused as the next step's first (FSAL).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

# The Butcher tableau: nodes c, stage weights A (lower triangular), 5th-order weights B, and
# E = B - B_hat (B_hat: the embedded 4th-order weights), whose combination estimates the local error.
C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
B = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0]
B_HAT = [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
E = [b - bh for b, bh in zip(B, B_HAT)]


class SolverError(RuntimeError):
    """The solver cannot reach t1: too many steps, a step size that underflows, or a non-finite derivative."""


@dataclasses.dataclass
class SolverStats:
    nfe: int = 0        # evaluations of f
    accepted: int = 0   # accepted steps
    rejected: int = 0   # rejected steps


def error_norm(err: torch.Tensor, y: torch.Tensor, y_new: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per batch element: RMS of err / (atol + rtol max(|y|, |y_new|)) (Hairer et al. II.4, Eq. 4.11)."""
    scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
    return (err / scale).square().flatten(1).mean(1).sqrt()


def initial_step(f, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float, rtol: float, atol: float,
                 stats: SolverStats) -> float:
    """Starting step size from the size of y0, f(y0) and a 2nd derivative estimate (Hairer et al. II.4)."""
    scale = atol + rtol * y0.abs()
    d0 = float((y0 / scale).square().mean().sqrt())
    d1 = float((f0 / scale).square().mean().sqrt())
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = f(t0 + direction * h0, y0 + direction * h0 * f0)
    stats.nfe += 1
    d2 = float(((f1 - f0) / scale).square().mean().sqrt()) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1)


def dopri5(f: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float, t1: float,
           rtol: float = 1e-5, atol: float = 1e-5, first_step: float | None = None, max_steps: int = 10_000,
           safety: float = 0.9, min_factor: float = 0.2, max_factor: float = 10.0) -> tuple[torch.Tensor, SolverStats]:
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction); returns y(t1) and the solver statistics.

    Stops with SolverError (one line) after `max_steps` attempted steps, when the step size no longer moves
    t, or when the error estimate is NaN (e.g. f returned NaN), so it never loops forever."""
    if not all(math.isfinite(v) and v >= 0 for v in (rtol, atol)) or (rtol <= 0 and atol <= 0):
        raise ValueError(f'need finite rtol >= 0 and atol >= 0, not both 0 (got rtol={rtol}, atol={atol})')
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f'need finite t0 and t1 (got {t0}, {t1})')
    stats = SolverStats()
    t0, t1 = float(t0), float(t1)
    if t0 == t1:
        return y0, stats
    direction = 1.0 if t1 > t0 else -1.0
    t, y = t0, y0
    k1 = f(t, y)
    stats.nfe += 1
    h = abs(first_step) if first_step is not None else initial_step(f, t, y, k1, direction, rtol, atol, stats)
    last_rejected = False
    while direction * (t1 - t) > 0:
        if stats.accepted + stats.rejected >= max_steps:
            raise SolverError(f'dopri5: more than {max_steps} steps between t={t0:g} and t={t1:g} (at t={t:g}); '
                              f'loosen rtol/atol')
        h = min(h, abs(t1 - t))
        dt = direction * h
        if t + dt == t:
            raise SolverError(f'dopri5: the step size underflowed at t={t:g} (between t={t0:g} and t={t1:g}); '
                              f'loosen rtol/atol')
        ks = [k1]
        for i in range(1, 7):
            y_stage = y + dt * sum(a * k for a, k in zip(A[i], ks) if a != 0)
            ks.append(f(t + C[i] * dt, y_stage))
            stats.nfe += 1
        y_new = y_stage  # stage 7 is evaluated at the 5th-order solution (A[6] == B)
        err = dt * sum(e * k for e, k in zip(E, ks) if e != 0)
        norm = float(error_norm(err, y, y_new, rtol, atol).max())
        if math.isnan(norm):  # (an infinite one just rejects the step)
            raise SolverError(f'dopri5: NaN error estimate at t={t:g} (the derivative is not finite there)')
        if norm <= 1:
            t = t1 if h == abs(t1 - t) else t + dt
            y, k1 = y_new, ks[6]
            stats.accepted += 1
            grow = max_factor if not last_rejected else 1.0  # no growth right after a rejection
            factor = grow if norm == 0 else min(grow, max(min_factor, safety * norm ** (-1 / 5)))
            last_rejected = False
        else:
            stats.rejected += 1
            factor = max(min_factor, safety * norm ** (-1 / 5))
            last_rejected = True
        h = h * factor
    return y, stats
