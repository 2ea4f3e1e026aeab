"""training/ema.py's WarmupEMA: the per-step EMA with warm-up of the small-scale EDM2 ladder."""

import pytest
import torch

from training import ema


def test_warmup_ema_decay_formula():
    assert ema.warmup_ema_decay(0, 0.9993) == 0  # the first update copies
    assert ema.warmup_ema_decay(1, 0.9993) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.warmup_ema_decay(7, 0.9993) == pytest.approx(0.75)  # 1 - 8^(-2/3)
    assert ema.warmup_ema_decay(10 ** 6, 0.9993) == 0.9993  # capped at beta
    # beta is reached after (1 - beta)^(-3/2) - 1 updates.
    k = round(0.0007 ** -1.5) - 1
    assert ema.warmup_ema_decay(k - 100, 0.9993) < 0.9993 and ema.warmup_ema_decay(k + 100, 0.9993) == 0.9993


def test_warmup_ema_averages_with_the_decay_sequence():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0)
    policy = ema.WarmupEMA(net, beta=0.5)
    expected = 0.0
    for step in range(1, 6):  # the net's weight is the step number after each step
        with torch.no_grad():
            net.weight.fill_(step)
        policy.update(cur_nimg=step * 4, batch_size=4)
        d = ema.warmup_ema_decay(step - 1, 0.5)
        expected = d * expected + (1 - d) * step
        assert policy.get()[0][0].weight.item() == pytest.approx(expected)
    state = policy.state_dict()
    other = ema.WarmupEMA(net, beta=0.5)
    other.load_state_dict(state)
    assert other.get()[0][0].weight.item() == pytest.approx(expected)
