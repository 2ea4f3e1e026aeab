"""EDM2's magnitude-preserving network (training/networks_edm2.py) against the reference outputs
(../shared/golden/edm2_net_*.pt), plus the closed-form properties its layers are designed for."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from training import networks_edm2 as E

NET_CASES = ['edm2_net_cond', 'edm2_net_noattn', 'edm2_net_uncond']

pytestmark = pytest.mark.usefixtures('one_thread')

def rms(x):
    return x.double().square().mean().sqrt().item()

def golden_net(g):
    net = E.Precond(**g['kwargs'])
    net.load_state_dict(g['state_dict'], strict=True)
    return net

#----------------------------------------------------------------------------
# Goldens.

@pytest.mark.parametrize('case', NET_CASES)
def test_golden_state_dict_layout_and_param_count(golden, case):
    g = golden(case)
    net = E.Precond(**g['kwargs'])
    sd = net.state_dict()
    assert list(sd.keys()) == list(g['state_dict'].keys())  # same names in the same order
    assert all(sd[k].shape == v.shape for k, v in g['state_dict'].items())
    assert sum(p.numel() for p in net.parameters()) == g['param_count']

@pytest.mark.parametrize('case', NET_CASES)
def test_golden_forward_eval(golden, case):
    g = golden(case)
    net = golden_net(g).eval()
    with torch.no_grad():
        out, logvar = net(g['x'], g['sigma'], g['class_labels'], return_logvar=True)
        plain = net(g['x'], g['sigma'], g['class_labels'])
    assert out.dtype == torch.float32 and out.shape == g['output'].shape
    assert logvar.shape == g['logvar'].shape == (g['x'].shape[0], 1, 1, 1)
    assert rel_err(out, g['output']) <= 1e-5
    assert rel_err(logvar, g['logvar']) <= 1e-5
    assert torch.equal(plain, out)
    # Eval mode never touches the stored weights.
    assert all(torch.equal(v, g['state_dict'][k]) for k, v in net.state_dict().items())

@pytest.mark.parametrize('case', NET_CASES)
def test_golden_forward_train_and_forced_weight_normalisation(golden, case):
    g = golden(case)
    net = golden_net(g).train()
    with torch.no_grad():
        out = net(g['x'], g['sigma'], g['class_labels'])
    assert rel_err(out, g['output_train']) <= 1e-5
    # The train-mode output differs from the eval-mode one by only 2e-6..7e-6 (the forward normalises the
    # freshly normalised weight once more), so check it also at 1e-6 (measured: <= 2.1e-7) to make that count.
    assert rel_err(g['output_train'], g['output']) > 1e-6
    assert rel_err(out, g['output_train']) <= 1e-6
    after = net.state_dict()
    for key, ref in g['state_dict_after_train_forward'].items():
        if ref.norm() == 0:
            assert torch.equal(after[key], ref), key
        else:
            assert rel_err(after[key], ref) <= 1e-6, key
    changed = [k for k in after if not torch.equal(g['state_dict'][k], g['state_dict_after_train_forward'][k])]
    assert changed and all(k.endswith('.weight') for k in changed)  # only MPConv weights are rewritten

def test_sampler_interface_and_recorded_kwargs(golden):
    g = golden('edm2_net_cond')
    net = golden_net(g)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 1, 10)
    assert (net.sigma_min, net.sigma_max) == (0.002, 80)
    sigma = torch.tensor([0.1, 2.0], dtype=torch.float64)
    assert torch.equal(net.round_sigma(sigma), sigma) and net.round_sigma(sigma).dtype == torch.float64
    assert net._init_kwargs == g['kwargs']  # the sampler attributes are not constructor arguments
    # Missing labels on a conditional net mean the zero vector; float64 inputs give float32 output.
    with torch.no_grad():
        a = net.eval()(g['x'][:2].double(), 1.5)
        b = net(g['x'][:2], torch.full([2], 1.5), torch.zeros([2, 10]))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

def test_snapshot_round_trip_through_the_safe_loader(golden, tmp_path):
    from torch_utils import persistence
    g = golden('edm2_net_noattn')
    net = golden_net(g).eval()
    persistence.save_network_pkl(dict(ema=net), tmp_path / 'snap.pkl')
    loaded = persistence.load_network_pkl(tmp_path / 'snap.pkl')['ema']
    assert type(loaded) is E.Precond and loaded._init_kwargs == g['kwargs']
    with torch.no_grad():
        out, logvar = loaded.eval()(g['x'], g['sigma'], g['class_labels'], return_logvar=True)
    assert torch.equal(out, net(g['x'], g['sigma'], g['class_labels']))
    assert rel_err(logvar, g['logvar']) <= 1e-5

def test_precision_options_on_cpu(golden):
    g = golden('edm2_net_uncond')
    kwargs = dict(g['kwargs'], use_fp16=True)
    net = E.Precond(**kwargs)
    net.load_state_dict(g['state_dict'])
    with torch.no_grad():
        out16 = net.eval()(g['x'], g['sigma'])
    assert torch.equal(out16, golden_net(g).eval()(g['x'], g['sigma']).detach())  # fp16 ignored on CPU
    net = E.Precond(**dict(g['kwargs'], use_bf16=True))
    net.load_state_dict(g['state_dict'])
    with torch.no_grad():
        outbf = net.eval()(g['x'], g['sigma'])
        out32 = net(g['x'], g['sigma'], force_fp32=True)
    assert outbf.dtype == torch.float32
    assert rel_err(out32, g['output']) <= 1e-5
    assert 0 < rel_err(outbf, g['output']) <= 3e-2  # bf16 has an 8-bit mantissa

#----------------------------------------------------------------------------
# Closed-form properties of the magnitude-preserving layers.
#
# Statistical tolerance: for N iid unit-variance samples the mean square has standard deviation
# sqrt(Var[x^2] / N); Var[x^2] = 2 for a Gaussian and smaller for mp_silu's output, so with N = 2^20 it is
# <= 1.4e-3 and a tolerance of 1e-2 on the RMS (2e-2 on the mean square) is > 10 sigma, while a missing or
# wrong normalisation constant is off by >= 5%. The generator is seeded, so the test is deterministic.

N_SAMPLES = 1 << 20

def unit_normal(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

def test_mp_silu_preserves_magnitude():
    # E[mp_silu(z)^2] for z ~ N(0, 1) by quadrature on a fine grid (no sampling noise): the 3-digit
    # constant 0.596 leaves RMS 1.0008; a constant off by 1% (e.g. 0.6) fails.
    z = torch.linspace(-12, 12, 240001, dtype=torch.float64)
    density = torch.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
    dz = (z[1] - z[0]).item()
    rms_exact = np.sqrt((E.mp_silu(z) ** 2 * density).sum().item() * dz)
    assert abs(rms_exact - 1) < 1.5e-3
    assert abs(rms(E.mp_silu(unit_normal(N_SAMPLES))) - 1) < 1e-2
    assert abs(rms(F.silu(unit_normal(N_SAMPLES))) - 1) > 0.3  # plain SiLU does not

@pytest.mark.parametrize('t', [0.2, 0.3, 0.5, 0.8])
def test_mp_sum_preserves_magnitude(t):
    a, b = unit_normal(N_SAMPLES, seed=1), unit_normal(N_SAMPLES, seed=2)
    y = E.mp_sum(a, b, t)
    assert abs(rms(y) - 1) < 1e-2
    torch.testing.assert_close(y * np.sqrt((1 - t) ** 2 + t ** 2), (1 - t) * a + t * b)

@pytest.mark.parametrize('Na,Nb,t', [(16, 16, 0.5), (8, 24, 0.3), (32, 16, 0.6)])
def test_mp_cat_preserves_magnitude_and_balance(Na, Nb, t):
    a = unit_normal(4096, Na, seed=3)
    b = unit_normal(4096, Nb, seed=4)
    y = E.mp_cat(a, b, dim=1, t=t)
    assert y.shape == (4096, Na + Nb)
    assert abs(rms(y) - 1) < 1e-2
    # Energy shares of the two parts are (1 - t)^2 : t^2.
    ea, eb = y[:, :Na].square().sum().item(), y[:, Na:].square().sum().item()
    assert abs(ea / (ea + eb) - (1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)) < 1e-2

def test_normalize_gives_unit_rms():
    x = torch.randn(3, 5, 4, 4) * torch.tensor([0.1, 3.0, 100.0]).reshape(3, 1, 1, 1)
    # x / (eps + RMS(x)): unit RMS up to the eps = 1e-4 regulariser.
    r = x.square().mean(dim=[1, 2, 3]).sqrt()
    per_row = E.normalize(x).square().mean(dim=[1, 2, 3]).sqrt()
    torch.testing.assert_close(per_row, r / (1e-4 + r), rtol=1e-6, atol=0)
    assert (per_row - 1).abs().max() < 2e-3
    r = x.square().mean(dim=1).sqrt()
    pixel = E.normalize(x, dim=1).square().mean(dim=1).sqrt()
    torch.testing.assert_close(pixel, r / (1e-4 + r), rtol=1e-6, atol=0)

@pytest.mark.parametrize('kernel', [[], [1, 1], [3, 3]])
def test_mpconv_forced_weight_normalisation(kernel):
    torch.manual_seed(0)
    conv = E.MPConv(6, 5, kernel)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 10, 5).reshape(-1, *[1] * (conv.weight.ndim - 1)))
    x = torch.randn(2, 6, 8, 8) if kernel else torch.randn(2, 6)
    before = conv.weight.detach().clone()
    conv.eval()(x)
    assert torch.equal(conv.weight, before)  # eval mode leaves the stored weight alone
    conv.train()(x)
    fan_in = conv.weight[0].numel()
    row_rms = conv.weight.detach().reshape(5, -1).square().mean(dim=1).sqrt()
    # normalize() divides by eps + ||w||/sqrt(fan_in), so unit-RMS rows up to eps relative (1e-4 / row RMS).
    torch.testing.assert_close(row_rms, torch.ones(5), rtol=2e-3, atol=0)
    assert not torch.allclose(before.reshape(5, -1).square().mean(dim=1).sqrt(), torch.ones(5), rtol=0.05)
    # Directions are kept: the rewritten weight is a positive multiple of the old one, row by row.
    cos = F.cosine_similarity(conv.weight.detach().reshape(5, -1), before.reshape(5, -1), dim=1)
    torch.testing.assert_close(cos, torch.ones(5))
    assert fan_in == 6 * int(np.prod(kernel or [1]))

def test_mpconv_output_is_magnitude_preserving():
    # A fully-connected MPConv maps iid unit-variance inputs to unit-variance outputs whatever the scale of
    # the stored weight (each output is a unit-norm combination of fan_in inputs); gain scales it.
    torch.manual_seed(0)
    lin = E.MPConv(64, 32, kernel=[]).eval()
    with torch.no_grad():
        lin.weight.mul_(7)
    x = unit_normal(32768, 64, seed=5).float()
    with torch.no_grad():
        assert abs(rms(lin(x)) - 1) < 1e-2
        assert abs(rms(lin(x, gain=0.5)) - 0.5) < 5e-3
        assert torch.equal(lin(x, gain=torch.zeros([])), torch.zeros(32768, 32))

def test_resample_box_filter_is_avgpool_and_nearest():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(E.resample(x, mode='down'), F.avg_pool2d(x, 2))
    torch.testing.assert_close(E.resample(x, mode='up'), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert E.resample(x, mode='keep') is x
    y = E.resample(x, f=[1, 3, 3, 1], mode='up')
    assert y.shape == (2, 3, 16, 16)
    torch.testing.assert_close(E.resample(torch.ones(1, 2, 8, 8), f=[1, 3, 3, 1], mode='down')[..., 1:-1, 1:-1],
                               torch.ones(1, 2, 2, 2))  # unit DC gain away from the zero-padded border
    with pytest.raises(ValueError, match='resample mode'):
        E.resample(x, mode='sideways')

def test_mpfourier_has_unit_rms():
    torch.manual_seed(0)
    fourier = E.MPFourier(4096)
    y = fourier(torch.linspace(-3, 3, 64))
    assert y.shape == (64, 4096)
    assert abs(rms(y) - 1) < 2e-2  # cos of a random phase has mean square 1/2; 4096*64 samples, not iid

def test_zero_init_gains_make_a_fresh_network_output_c_skip_x():
    # emb_gain and out_gain start at 0: the fresh network's F is 0, so D(x) = c_skip x.
    torch.manual_seed(0)
    net = E.Precond(img_resolution=8, img_channels=2, label_dim=0, use_fp16=False, model_channels=8,
                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8, logvar_channels=4)
    x = torch.randn(3, 2, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        out = net.eval()(x, sigma)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(out, c_skip.reshape(-1, 1, 1, 1) * x)
    assert all(p.item() == 0 for n, p in net.named_parameters() if n.endswith('_gain'))
