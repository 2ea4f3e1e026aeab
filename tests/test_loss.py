"""Losses of EDM Table 1: golden reproduction with the real networks, the random-draw protocol with
a recording stand-in network, the training sigma distributions and the loss weights."""

import math

import pytest
import torch

from helpers import load_golden_net, rel_err
from training import loss as L
from training import networks
from training.augment import AugmentPipe


class RecordingNet:
    """Stand-in denoiser: returns a fixed function of its input and records every argument."""
    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, class_labels=class_labels, augment_labels=augment_labels))
        return 0.5 * x


class RecordingPipe:
    """Stand-in augmentation: flips the images and draws from the global RNG like the real pipe."""
    def __call__(self, images):
        labels = torch.rand([images.shape[0], 3])
        return images.flip(3), labels

# --- golden vectors (need training/networks.py) -----------------------------------------------

@pytest.mark.parametrize('name', ['loss_vp', 'loss_ve', 'loss_edm_aug'])
def test_golden(golden_dir, name):
    g = torch.load(golden_dir / f'{name}.pt', weights_only=True)
    net = load_golden_net(golden_dir, g['net'], train=True)
    pipe = AugmentPipe(**g['augment']) if g['augment'] is not None else None
    loss_fn = getattr(L, g['loss'])()
    torch.manual_seed(g['torch_seed'])
    with torch.no_grad():
        out = loss_fn(net=net, images=g['images'], labels=g['labels'], augment_pipe=pipe)
    assert out.shape == g['output'].shape
    assert rel_err(out, g['output']) <= 1e-5

# --- random-draw protocol and the loss formula ------------------------------------------------

@pytest.mark.parametrize('kind', ['VPLoss', 'VELoss', 'EDMLoss'])
@pytest.mark.parametrize('with_pipe', [False, True])
def test_draw_order_and_per_pixel_loss(kind, with_pipe):
    images = torch.rand([5, 3, 8, 8], generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.eye(4)[[0, 1, 2, 3, 0]]
    loss_fn = getattr(L, kind)()
    net = RecordingNet()
    pipe = RecordingPipe() if with_pipe else None
    torch.manual_seed(123)
    out = loss_fn(net, images, labels, augment_pipe=pipe)

    # Replay the documented protocol: sigma noise, then the pipe, then randn_like(y).
    torch.manual_seed(123)
    if kind == 'EDMLoss':
        sigma = L.edm_sigma_from_normal(torch.randn([5, 1, 1, 1]))
        weight = L.edm_weight(sigma)
    else:
        u = torch.rand([5, 1, 1, 1])
        sigma = L.vp_sigma(L.vp_t_from_uniform(u)) if kind == 'VPLoss' else L.ve_sigma_from_uniform(u)
        weight = L.snr_weight(sigma)
    y, aug = pipe(images) if with_pipe else (images, None)
    n = torch.randn_like(y) * sigma

    (call,) = net.calls
    torch.testing.assert_close(call['sigma'], sigma, rtol=0, atol=0)
    torch.testing.assert_close(call['x'], y + n, rtol=0, atol=0)
    assert call['class_labels'] is labels
    if with_pipe:
        torch.testing.assert_close(call['augment_labels'], aug, rtol=0, atol=0)
    else:
        assert call['augment_labels'] is None
    assert out.shape == images.shape  # unreduced, per pixel
    torch.testing.assert_close(out, weight * (0.5 * (y + n) - y) ** 2)


def test_loss_backpropagates():
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    denoise = lambda x, sigma, labels, augment_labels=None: net(x)
    torch.manual_seed(0)
    L.EDMLoss()(denoise, torch.randn([2, 3, 8, 8])).sum().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all() and net.weight.grad.abs().sum() > 0

# --- training sigma distributions -------------------------------------------------------------

def drawn_sigmas(loss_fn, n=20000) -> torch.Tensor:
    net = RecordingNet()
    torch.manual_seed(0)
    loss_fn(net, torch.zeros([n, 1, 1, 1]))
    return net.calls[0]['sigma'].flatten().double()


def test_ve_sigma_is_log_uniform_within_bounds():
    assert L.ve_sigma_from_uniform(torch.tensor(0.0)).item() == pytest.approx(0.02)
    assert L.ve_sigma_from_uniform(torch.tensor(1.0)).item() == pytest.approx(100)
    sigma = drawn_sigmas(L.VELoss(sigma_min=0.02, sigma_max=100))
    assert sigma.min() >= 0.02 and sigma.max() <= 100
    # ln(sigma) is uniform on [ln 0.02, ln 100]: the normalised value passes a KS test against U(0,1).
    u = ((sigma.log() - math.log(0.02)) / (math.log(100) - math.log(0.02))).numpy()
    from scipy import stats
    assert stats.kstest(u, 'uniform').pvalue > 1e-3
    assert stats.kstest(sigma.numpy() / 100, 'uniform').pvalue < 1e-6  # and not uniform in sigma itself


def test_edm_sigma_is_log_normal():
    sigma = drawn_sigmas(L.EDMLoss(P_mean=-1.2, P_std=1.2))
    ln = sigma.log()
    assert abs(ln.mean().item() + 1.2) < 0.05 and abs(ln.std().item() - 1.2) < 0.05
    from scipy import stats
    assert stats.kstest(((ln + 1.2) / 1.2).numpy(), 'norm').pvalue > 1e-3


def test_vp_sigma_range_and_schedule():
    beta_d, beta_min, eps = 19.9, 0.1, 1e-5
    # The VP SDE's linear beta(t) = beta_min + beta_d t is the rate of ln(1 + sigma(t)^2) (1 + sigma^2 =
    # 1 / alpha_bar(t) = exp(int_0^t beta)), and sigma(0) = 0. ln(1 + sigma^2) is quadratic in t, so the
    # central difference is exact up to rounding.
    tt, h = torch.linspace(0.05, 1, 20, dtype=torch.float64), 1e-5
    log1p_var = lambda t: L.vp_sigma(t, beta_d, beta_min).square().log1p()
    torch.testing.assert_close((log1p_var(tt + h) - log1p_var(tt - h)) / (2 * h), beta_min + beta_d * tt,
                               rtol=1e-8, atol=0)
    assert L.vp_sigma(0.0, beta_d, beta_min).item() == 0
    t = torch.tensor([eps, 0.1, 0.5, 1.0], dtype=torch.float64)
    # loss.py keeps its own copy of the formula (it may not import training.networks): the two agree.
    assert torch.equal(L.vp_sigma(t, 18.0, 0.2), networks.vp_sigma(t, 18.0, 0.2))
    assert L.vp_t_from_uniform(0.0, eps) == 1 and L.vp_t_from_uniform(1.0, eps) == pytest.approx(eps)
    sigma = drawn_sigmas(L.VPLoss(beta_d, beta_min, eps))
    lo, hi = L.vp_sigma(torch.tensor(eps, dtype=torch.float64)), L.vp_sigma(torch.tensor(1.0, dtype=torch.float64))
    assert sigma.min() >= lo * (1 - 1e-5) and sigma.max() <= hi * (1 + 1e-5)
    assert L.VPLoss().sigma(1.0).item() == pytest.approx(hi.item(), rel=1e-6)

# --- loss weights -----------------------------------------------------------------------------

def test_edm_weight_is_one_over_c_out_squared_of_the_network():
    # The loss weight and the network's preconditioning are written in two modules; they must agree
    # (lambda = 1/c_out^2 gives the raw network F a unit-weight target at every noise level).
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    for sigma_data in (0.5, 0.3, 1.0):
        _c_skip, c_out, _c_in, _c_noise = networks.edm_coefficients(sigma, sigma_data)
        torch.testing.assert_close(L.edm_weight(sigma, sigma_data) * c_out ** 2, torch.ones_like(sigma),
                                   rtol=1e-12, atol=0)


def test_loss_hyperparameters_are_used():
    # P_mean / P_std / sigma_data change the draw and the weight (train.py exposes them on the CLI).
    a = drawn_sigmas(L.EDMLoss(P_mean=0.0, P_std=0.1), n=4000).log()
    assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 0.1) < 0.01
    net = RecordingNet()
    torch.manual_seed(0)
    x = torch.ones([3, 1, 2, 2])
    out = L.EDMLoss(sigma_data=1.0)(net, x)
    sigma = net.calls[0]['sigma']
    torch.testing.assert_close(out, L.edm_weight(sigma, 1.0) * (0.5 * net.calls[0]['x'] - x) ** 2)

# --- snapshots: loss_fn and augment_pipe travel in network-snapshot-*.pkl ---------------------

def test_snapshot_round_trip(tmp_path):
    from torch_utils import persistence
    data = dict(loss_fn=L.EDMLoss(P_mean=-1.0, P_std=1.4, sigma_data=0.6),
                augment_pipe=AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1))
    path = tmp_path / 'network-snapshot-000000.pkl'
    persistence.save_network_pkl(data, path)
    loaded = persistence.load_network_pkl(path)
    loss_fn, pipe = loaded['loss_fn'], loaded['augment_pipe']
    assert type(loss_fn) is L.EDMLoss and type(pipe) is AugmentPipe
    assert (loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data) == (-1.0, 1.4, 0.6)
    # Same behaviour as the originals under the same seed.
    x = torch.rand([3, 3, 8, 8])
    outs = []
    for fn, aug in [(data['loss_fn'], data['augment_pipe']), (loss_fn, pipe)]:
        torch.manual_seed(5)
        outs.append(fn(RecordingNet(), x, augment_pipe=aug))
    assert torch.equal(outs[0], outs[1])
