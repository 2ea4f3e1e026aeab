"""EDM2Loss (training/loss.py) against ../shared/golden/edm2_loss_*.pt, and the learned-uncertainty head
as an opt-in for the EDM networks (training/networks.py, logvar_channels)."""

import pytest
import torch

from helpers import rel_err
from training import loss as L
from training import networks as N
from training import networks_edm2 as E

pytestmark = pytest.mark.usefixtures('one_thread')

#----------------------------------------------------------------------------
# Goldens.

@pytest.mark.parametrize('case', ['edm2_loss_default', 'edm2_loss_custom'])
def test_golden_loss_and_grads(golden_dir, case):
    g = torch.load(golden_dir / f'{case}.pt', weights_only=True)
    gn = torch.load(golden_dir / g['net'], weights_only=True)
    net = E.Precond(**gn['kwargs'])
    net.load_state_dict(gn['state_dict'], strict=True)
    net.train()
    loss_fn = L.EDM2Loss(**g['loss_kwargs'])
    torch.manual_seed(g['torch_seed'])
    loss = loss_fn(net, g['images'], g['labels'])
    assert loss.shape == g['loss'].shape == g['images'].shape  # per element, not reduced
    assert rel_err(loss, g['loss']) <= 1e-5
    loss.sum().backward()
    params = dict(net.named_parameters())
    for name, ref in g['grads'].items():
        assert rel_err(params[name].grad, ref) <= 1e-5, name

def test_defaults_and_import_paths():
    from training import training_loop
    assert training_loop.EDM2Loss is L.EDM2Loss  # EDM2 pickles name training.training_loop.EDM2Loss
    loss_fn = L.EDM2Loss()
    assert (loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data) == (-0.4, 1.0, 0.5)

#----------------------------------------------------------------------------
# Formula and random-draw protocol with a stand-in network.

class FixedNet:
    """Returns D = 0.5 x and u = ln(sigma) (so e^u = sigma), recording its inputs."""
    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_labels=None, return_logvar=False, **kwargs):
        self.calls.append(dict(x=x, sigma=sigma, labels=class_labels, kwargs=kwargs))
        assert return_logvar
        return 0.5 * x, sigma.log()

def test_formula_and_draw_order():
    images = torch.randn(3, 2, 4, 4)
    labels = torch.eye(3)
    torch.manual_seed(7)
    z = torch.randn([3, 1, 1, 1])
    n = torch.randn_like(images)
    sigma = (z * 1.5 - 0.7).exp()
    net = FixedNet()
    torch.manual_seed(7)
    loss = L.EDM2Loss(P_mean=-0.7, P_std=1.5, sigma_data=0.4)(net, images, labels)
    call = net.calls[0]
    torch.testing.assert_close(call['sigma'], sigma)
    torch.testing.assert_close(call['x'], images + n * sigma)
    assert call['labels'] is labels and call['kwargs'] == {}
    weight = (sigma ** 2 + 0.16) / (sigma * 0.4) ** 2
    expected = weight / sigma * (0.5 * (images + n * sigma) - images) ** 2 + sigma.log()
    torch.testing.assert_close(loss, expected)

def test_optimal_uncertainty_is_the_expected_weighted_error():
    # For fixed errors, the mean of w e^-u (D-y)^2 + u is minimised at e^u = mean(w (D-y)^2): the head learns
    # the loss level per sigma, so every sigma contributes a unit-scale gradient. Checked through EDM2Loss with
    # a constant head u: at u = 0 the loss is the weighted error itself; at u* = ln(its mean) the loss must be
    # stationary in u, minimal, and equal to 1 + u*.
    images = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def mean_loss(u):
        net = lambda x, sigma, labels=None, return_logvar=False: (0.5 * x, u.expand(x.shape[0], 1, 1, 1))
        torch.manual_seed(1)  # the same sigma and noise at every call
        return L.EDM2Loss()(net, images).mean()

    weighted_error = mean_loss(torch.zeros([]))
    u_star = weighted_error.log().detach().requires_grad_()
    loss = mean_loss(u_star)
    loss.backward()
    assert abs(u_star.grad.item()) < 1e-5
    assert loss.item() == pytest.approx(1 + u_star.item(), rel=1e-5)
    for du in (-0.1, 0.1):
        assert mean_loss(u_star.detach() + du).item() > loss.item()

#----------------------------------------------------------------------------
# Learned uncertainty for the EDM networks (opt-in).

def tiny_edm(precond='EDMPrecond', **kw):
    kw = dict(dict(img_resolution=8, img_channels=2, label_dim=3, model_type='SongUNet', model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0), **kw)
    return getattr(N, precond)(**kw)

def test_uncertainty_off_changes_nothing(golden_dir):
    # Off by default: the state_dict keys are those of the paper's network, the recorded constructor
    # kwargs gain nothing, and the golden output is reproduced (test_networks.py covers all goldens).
    g = torch.load(golden_dir / 'net_edm_ddpmpp_cond_aug.pt', weights_only=True)
    net = N.EDMPrecond(**g['kwargs'])
    assert list(net.state_dict().keys()) == list(g['state_dict'].keys())
    assert net._init_kwargs == g['kwargs']
    assert not any('logvar' in name for name, _ in net.named_modules())
    with pytest.raises(ValueError, match='logvar_channels'):
        net(g['x'], g['sigma'], g['class_labels'], augment_labels=g['augment_labels'], return_logvar=True)

@pytest.mark.parametrize('precond', ['EDMPrecond', 'VPPrecond', 'VEPrecond'])
def test_uncertainty_on_adds_edm2_head(precond):
    torch.manual_seed(0)
    off = tiny_edm(precond)
    torch.manual_seed(0)
    on = tiny_edm(precond, logvar_channels=16)
    # The head is appended after the backbone: same backbone init, extra keys with EDM2's names only.
    sd_off, sd_on = off.state_dict(), on.state_dict()
    assert [k for k in sd_on if k not in sd_off] == ['logvar_fourier.freqs', 'logvar_fourier.phases', 'logvar_linear.weight']
    assert all(torch.equal(sd_on[k], v) for k, v in sd_off.items())
    assert on._init_kwargs['logvar_channels'] == 16
    x = torch.randn(4, 2, 8, 8)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    labels = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        D, logvar = on.eval()(x, sigma, labels, return_logvar=True)
        D_off = off.eval()(x, sigma, labels)
    assert logvar.shape == (4, 1, 1, 1) and logvar.dtype == torch.float32
    assert torch.equal(D, D_off)  # the head does not touch the denoiser
    # u(sigma) is EDM2's head on c_noise = ln(sigma) / 4.
    ref = on.logvar_linear(on.logvar_fourier(sigma.log() / 4)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(logvar, ref)

def test_uncertainty_head_survives_snapshot_round_trip(tmp_path):
    from torch_utils import persistence
    torch.manual_seed(0)
    net = tiny_edm(logvar_channels=8).eval()
    persistence.save_network_pkl(dict(ema=net), tmp_path / 'snap.pkl')
    loaded = persistence.load_network_pkl(tmp_path / 'snap.pkl')['ema']
    x, sigma, labels = torch.randn(2, 2, 8, 8), torch.tensor([0.2, 5.0]), torch.eye(3)[:2]
    with torch.no_grad():
        for a, b in zip(net(x, sigma, labels, return_logvar=True), loaded.eval()(x, sigma, labels, return_logvar=True)):
            assert torch.equal(a, b)

def test_edm2_loss_trains_the_edm_head():
    torch.manual_seed(0)
    net = tiny_edm(logvar_channels=8).train()
    images = torch.randn(4, 2, 8, 8) * 0.5
    labels = torch.eye(3)[[0, 1, 2, 0]]
    loss = L.EDM2Loss()(net, images, labels)
    assert loss.shape == images.shape
    loss.sum().backward()
    assert net.logvar_linear.weight.grad is not None and net.logvar_linear.weight.grad.abs().sum() > 0
    assert net.model.enc['8x8_conv'].weight.grad.abs().sum() > 0
    assert net.logvar_fourier.freqs.grad is None  # fixed buffers

def test_edm2_loss_with_augment_pipe():
    # Our addition: EDM networks trained with augmentation; draws sigma, then the pipe, then the noise.
    class Pipe:
        def __call__(self, images):
            return images.flip(3), torch.rand([images.shape[0], 9])
    torch.manual_seed(0)
    net = tiny_edm(logvar_channels=8, augment_dim=9).train()
    images = torch.randn(2, 2, 8, 8)
    torch.manual_seed(3)
    loss = L.EDM2Loss()(net, images, torch.eye(3)[:2], augment_pipe=Pipe())
    torch.manual_seed(3)
    z = torch.randn([2, 1, 1, 1])
    aug = torch.rand([2, 9])
    noise = torch.randn_like(images)
    sigma = (z * 1.0 - 0.4).exp()
    with torch.no_grad():
        D, u = net(images.flip(3) + noise * sigma, sigma, torch.eye(3)[:2], augment_labels=aug, return_logvar=True)
    expected = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 / u.exp() * (D - images.flip(3)) ** 2 + u
    torch.testing.assert_close(loss.detach(), expected)
