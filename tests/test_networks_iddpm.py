"""training/networks_iddpm.py: improved-diffusion's UNetModel reproduced from its own state_dicts
(../shared/golden/iddpm_unet_*.pt), the released layouts converted key for key, and iDDPMDiscretePrecond's
two interfaces (EDM denoiser and raw discrete output)."""

import json
import pickle

import pytest
import torch

from helpers import jitter_params, rel_err as rel
from torch_utils import persistence
from training import iddpm, networks, networks_iddpm


@pytest.mark.parametrize('name', ['cond_scaleshift', 'uncond_plain'])
def test_golden_unet_outputs_after_conversion(golden_dir, name):
    g = torch.load(golden_dir / f'iddpm_unet_{name}.pt', weights_only=False)
    net = networks_iddpm.from_improved_diffusion(g['state_dict'], g['kwargs'], image_size=g['x'].shape[-1], rescale_timesteps=False)
    labels = None
    if g['y'] is not None:
        labels = torch.nn.functional.one_hot(g['y'], net.label_dim).float()
    with torch.no_grad():
        out = net(g['x'], None, labels, timesteps=g['timesteps'])
        direct = net.model(g['x'], g['timesteps'].float(), g['y'])
    assert rel(out, g['output']) <= 1e-5
    assert rel(direct, g['output']) <= 1e-5


def test_released_layouts_convert_completely(golden_dir):
    layouts = json.loads((golden_dir / 'iddpm_unet_layouts.json').read_text())
    assert set(layouts) == set(networks_iddpm.RELEASED)
    for name, layout in layouts.items():
        spec = networks_iddpm.RELEASED[name]
        assert spec['kwargs'] == layout['kwargs'], name
        kwargs = networks_iddpm.precond_kwargs_from_unet(layout['kwargs'], spec['image_size'])
        with torch.device('meta'), networks_iddpm.no_weight_init():
            net = networks_iddpm.iDDPMDiscretePrecond(**kwargs)
        ours = {k: list(v.shape) for k, v in net.state_dict().items() if k != 'u'}
        converted = networks_iddpm.convert_unet_state_dict({k: torch.empty(s, device='meta') for k, s in layout['keys'].items()})
        assert set(converted) == set(ours), (name, sorted(set(converted) ^ set(ours))[:5])
        assert all(list(converted[k].shape) == ours[k] for k in ours), name
        assert sum(v.numel() for k, v in net.state_dict().items() if k != 'u') == layout['params']


UNET = dict(model_type='UNetModel', model_channels=32, num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2], num_heads=1)
ADM = dict(model_type='DhariwalUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def _tiny(backbone=UNET, **overrides):
    kwargs = {**dict(img_resolution=8, img_channels=3, M=100), **backbone, **overrides}
    torch.manual_seed(0)
    net = networks_iddpm.iDDPMDiscretePrecond(**kwargs)
    return jitter_params(net, 0.02).eval()  # the zero-initialised output layer would make every output 0


def test_denoiser_interface_is_the_raw_output_at_the_snapped_step():
    net = _tiny()
    d = iddpm.make_diffusion('cosine', 100)
    assert rel(net.u[:-1].double().flip(0), (1 / d.alphas_cumprod - 1).sqrt()) <= 1e-7
    t = torch.tensor([0, 37, 99])
    sigma = net.u[net.M - 1 - t]
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        D = net(x, sigma)
        eps = net(x / (sigma ** 2 + 1).sqrt().reshape(-1, 1, 1, 1), None, timesteps=t)[:, :3]
    assert rel(D, x - sigma.reshape(-1, 1, 1, 1) * eps) <= 1e-5  # float32 c_in, amplified by sigma up to 2e3


def test_cosine_sigma_table_is_iddpmprecond_table():
    # The EDM paper's iDDPMPrecond builds the same u (in float32, from the un-normalised alpha_bar ratios).
    assert rel(networks_iddpm.sigma_table('cosine', 1000).float(), networks.iddpm_u(1000)) <= 1e-5


def test_rescale_timesteps_and_pickling():
    net = _tiny(ADM, rescale_timesteps=True)
    assert float(net.backbone_timesteps(torch.tensor([50]))) == 500.0
    x = torch.randn(2, 3, 8, 8)
    clone = pickle.loads(pickle.dumps(net))
    with torch.no_grad():
        assert torch.equal(clone(x, None, timesteps=torch.tensor([3, 4])), net(x, None, timesteps=torch.tensor([3, 4])))


def test_edm_iddpmprecond_with_the_same_weights_is_the_same_denoiser():
    net = _tiny(ADM, M=1000)
    precond = networks_iddpm.to_iddpm_precond(net)
    assert isinstance(precond, networks.iDDPMPrecond)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert rel(precond(x, sigma), net(x, sigma)) <= 1e-6
    with pytest.raises(ValueError, match='UNetModel'):
        networks_iddpm.to_iddpm_precond(_tiny())


def test_safe_loader_rebuilds_a_snapshot(tmp_path):
    net = _tiny()
    persistence.save_network_pkl(dict(ema=net), tmp_path / 'net.pkl')
    loaded = persistence.load_network(tmp_path / 'net.pkl')
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, None, timesteps=torch.tensor([1, 2])), net(x, None, timesteps=torch.tensor([1, 2])))


def test_released_checkpoint_path_converts_a_state_dict_file(golden_dir, tmp_path, monkeypatch):
    # The released files are not downloaded in tests: the same path on the small golden network.
    g = torch.load(golden_dir / 'iddpm_unet_uncond_plain.pt', weights_only=False)
    torch.save(g['state_dict'], tmp_path / 'model.pt')
    spec = dict(image_size=8, diffusion_steps=1000, noise_schedule='cosine', rescale_timesteps=False, kwargs=g['kwargs'])
    monkeypatch.setitem(networks_iddpm.RELEASED, 'tiny', spec)
    networks_iddpm.convert_released(tmp_path / 'model.pt', 'tiny', tmp_path / 'net.pkl')
    net = persistence.load_network(tmp_path / 'net.pkl')
    assert not net.learn_sigma and net.M == 1000
    with torch.no_grad():
        assert rel(net(g['x'], None, timesteps=g['timesteps']), g['output']) <= 1e-5
        from training import iddpm, sampling
        assert iddpm.diffusion_of(net).var_type == 'fixed_large'  # 3 output channels: no learned sigmas
        assert torch.isfinite(sampling.SAMPLERS['iddpm'](net, torch.randn(1, 3, 8, 8, dtype=torch.float64), num_steps=3)).all()
    with pytest.raises(ValueError, match='unknown released'):
        networks_iddpm.load_released(tmp_path / 'model.pt', 'nope')
    bad = dict(g['state_dict'], extra=torch.zeros(1))
    with pytest.raises(ValueError, match='unexpected'):
        networks_iddpm.from_improved_diffusion(bad, g['kwargs'], image_size=8)
