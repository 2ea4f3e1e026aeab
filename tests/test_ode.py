"""torch_utils.ode.dopri5: the Dormand-Prince 5(4) tableau, accuracy that follows the tolerances, both
directions, batched states with one step sequence, and its limits."""

from __future__ import annotations

import math

import pytest
import torch

from torch_utils import ode


def test_tableau_is_consistent():
    """Row sums equal the nodes, both weight sets sum to 1, the 5th-order weights meet the order conditions
    sum b c^k = 1/(k+1) up to k = 4, the embedded ones up to k = 3 but not 4, and the last stage is B (FSAL)."""
    for row, c in zip(ode.A, ode.C):
        assert sum(row) == pytest.approx(c, abs=1e-15)
    for k in range(5):
        assert sum(b * c ** k for b, c in zip(ode.B, ode.C)) == pytest.approx(1 / (k + 1), abs=1e-14)
    for k in range(4):
        assert sum(b * c ** k for b, c in zip(ode.B_HAT, ode.C)) == pytest.approx(1 / (k + 1), abs=1e-14)
    assert abs(sum(b * c ** 4 for b, c in zip(ode.B_HAT, ode.C)) - 1 / 5) > 1e-4
    assert ode.A[6] == ode.B[:6]


def gaussian_decay(t, y):
    return -t * y  # y(t) = y(0) exp(-t^2/2)


def test_accuracy_follows_the_tolerance():
    y0 = torch.tensor([[1.0], [2.0], [-3.0]], dtype=torch.float64)
    exact = y0 * math.exp(-4.5)
    errors, nfes = [], []
    for tol in (1e-4, 1e-6, 1e-8, 1e-10):
        y, stats = ode.dopri5(gaussian_decay, y0, 0, 3, rtol=tol, atol=tol)
        errors.append(float((y - exact).abs().max()))
        nfes.append(stats.nfe)
        assert errors[-1] < 100 * tol
        assert stats.nfe == 2 + 6 * (stats.accepted + stats.rejected)  # f(y0), the initial-step probe, 6 per step
    assert errors == sorted(errors, reverse=True)
    # 5th order: cost grows like tol^(-1/5), i.e. ~6.3x per 1e4 tighter.
    assert 3 < nfes[3] / nfes[1] < 10, nfes


def test_both_directions_and_round_trip():
    def oscillator(t, y):
        return torch.stack([y[:, 1], -y[:, 0]], 1)
    y0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y1, _ = ode.dopri5(oscillator, y0, 0, 10, rtol=1e-9, atol=1e-9)
    expected = torch.stack([y0[:, 0] * math.cos(10) + y0[:, 1] * math.sin(10),
                            -y0[:, 0] * math.sin(10) + y0[:, 1] * math.cos(10)], 1)
    torch.testing.assert_close(y1, expected, rtol=0, atol=1e-7)
    back, _ = ode.dopri5(oscillator, y1, 10, 0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back, y0, rtol=0, atol=1e-7)
    same, stats = ode.dopri5(oscillator, y0, 3, 3)
    assert same is y0 and stats.nfe == 0


def test_steps_shrink_for_the_hardest_batch_element():
    """One step sequence for the batch: adding a fast-decaying element makes the slow one's steps smaller,
    and both stay accurate."""
    rates = torch.tensor([[1.0], [50.0]], dtype=torch.float64)
    f = lambda t, y: -rates[:y.shape[0]] * y
    y0 = torch.ones([2, 1], dtype=torch.float64)
    y_slow, alone = ode.dopri5(f, y0[:1], 0, 1, rtol=1e-8, atol=1e-10)
    y_both, both = ode.dopri5(f, y0, 0, 1, rtol=1e-8, atol=1e-10)
    assert both.accepted > alone.accepted and both.rejected >= 0
    assert float(y_both[0]) == pytest.approx(math.exp(-1), rel=1e-7)
    assert float(y_both[1]) == pytest.approx(math.exp(-50), abs=1e-9)


def test_limits():
    with pytest.raises(RuntimeError, match='steps'):
        ode.dopri5(gaussian_decay, torch.ones([1, 1], dtype=torch.float64), 0, 3, rtol=1e-12, atol=1e-12, max_steps=5)
    with pytest.raises(ValueError):
        ode.dopri5(gaussian_decay, torch.ones([1, 1], dtype=torch.float64), 0, 1, rtol=0, atol=0)


@pytest.mark.parametrize('rtol,atol', [(math.nan, math.nan), (math.nan, 1e-5), (1e-5, math.inf), (-1e-5, 1e-5)])
def test_non_finite_or_negative_tolerances_are_refused(rtol, atol):
    """NaN tolerances made every step 'rejected' with an ever smaller step: fid.py nll hung (issue 24)."""
    calls = []
    f = lambda t, y: calls.append(t) or -y  # noqa: E731
    with pytest.raises(ValueError, match='rtol'):
        ode.dopri5(f, torch.ones([1, 1], dtype=torch.float64), 0, 1, rtol=rtol, atol=atol)
    assert not calls


def test_a_nan_derivative_stops_at_once():
    f = lambda t, y: torch.full_like(y, math.nan)  # noqa: E731
    with pytest.raises(ode.SolverError, match='NaN error estimate') as e:
        ode.dopri5(f, torch.ones([1, 1], dtype=torch.float64), 0, 1, first_step=0.1)
    assert '\n' not in str(e.value)


def test_steps_are_bounded_with_one_line():
    """Whatever the tolerances, the solver ends: at max_steps (default 10,000) or when the step underflows."""
    stiff = lambda t, y: -1e12 * (y - math.cos(t))  # noqa: E731
    with pytest.raises(ode.SolverError, match='more than 50 steps') as e:
        ode.dopri5(stiff, torch.ones([1, 1], dtype=torch.float64), 0, 1, max_steps=50)
    assert '\n' not in str(e.value) and isinstance(e.value, RuntimeError)
    with pytest.raises(ode.SolverError, match='underflowed'):  # tolerances no step can meet
        ode.dopri5(lambda t, y: -y, torch.ones([1, 1], dtype=torch.float64), 1, 2, rtol=1e-300, atol=1e-300,
                   first_step=1e-3, max_steps=1000)
