"""training/presets.py's optimizers: 'adam' is the paper's Adam; 8-bit Adam (OPTIMIZERS['adam8bit'] = bitsandbytes'
block-wise Adam8bit, an optional package) tracks float32 Adam over 100 steps of a small network, stores its
moments in 8 bits and resumes exactly from a weights-only training state (train.py --optim is tested in
tests/test_train.py)."""

from __future__ import annotations

import io

import pytest
import torch

import dnnlib
from torch_utils import misc
from training import presets

pytestmark = pytest.mark.usefixtures('one_thread')


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                               torch.nn.Linear(256, 8))


def make_optimizer(name, params, lr=1e-3):
    return dnnlib.util.construct_class_by_name(params=params, **presets.optimizer_kwargs(name), lr=lr)


def fit(name, steps=100, net=None, opt=None):
    """`steps` Adam steps of a regression on fixed data; returns (flat weights, losses, net, optimizer)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn([64, 32], generator=g), torch.randn([64, 8], generator=g)
    net = net or small_net()
    opt = opt or make_optimizer(name, net.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return torch.cat([p.detach().flatten() for p in net.parameters()]), losses, net, opt


def test_adam_preset_is_the_papers_adam():
    assert presets.optimizer_kwargs('adam') == dict(class_name='torch.optim.Adam', betas=[0.9, 0.999], eps=1e-8)
    with pytest.raises(ValueError, match='unknown optimizer'):
        presets.optimizer_kwargs('sgd')


@pytest.mark.slow  # importing bitsandbytes takes ~3 s
def test_adam8bit_tracks_fp32_adam_over_100_steps():
    """Tolerance: the weights after 100 steps differ from fp32 Adam's by at most 10% of the distance fp32 Adam moved
    them (measured: ~5%), and the final loss by at most 2% (the loss falls ~10x over the run)."""
    pytest.importorskip('bitsandbytes')
    start = torch.cat([p.detach().flatten() for p in small_net().parameters()])
    ref, ref_losses, _, _ = fit('adam')
    out, losses, net, opt = fit('adam8bit')
    assert ref_losses[-1] < 0.2 * ref_losses[0]
    assert float((out - ref).norm() / (ref - start).norm()) < 0.10
    assert abs(losses[-1] / ref_losses[-1] - 1) < 0.02
    # The moments of the large tensors are 8-bit: 2 bytes a weight (+ a float32 absmax per block) instead of 8.
    big = net[2].weight
    assert {t.dtype for k, t in opt.state[big].items() if k.startswith('state')} == {torch.uint8}
    per_weight = sum(t.numel() * t.element_size() for t in opt.state[big].values() if torch.is_tensor(t)) / big.numel()
    assert per_weight < 2.1
    _, _, _, fp32_opt = fit('adam', steps=1)
    assert misc.optimizer_state_bytes(opt) < 0.3 * misc.optimizer_state_bytes(fp32_opt)


@pytest.mark.slow  # run alone it pays the bitsandbytes import (~2 s)
def test_adam8bit_resumes_exactly_from_a_weights_only_state():
    pytest.importorskip('bitsandbytes')
    straight, _, _, _ = fit('adam8bit', steps=20)
    _, _, net, opt = fit('adam8bit', steps=10)
    buf = io.BytesIO()
    torch.save(dict(net=net.state_dict(), opt=opt.state_dict()), buf)  # as training_loop's training state
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    net2 = small_net()
    net2.load_state_dict(state['net'])
    opt2 = make_optimizer('adam8bit', net2.parameters())
    opt2.load_state_dict(state['opt'])
    resumed, _, _, _ = fit('adam8bit', steps=10, net=net2, opt=opt2)
    assert torch.equal(resumed, straight)


