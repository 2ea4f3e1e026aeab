"""Guidance (classifier-free guidance, autoguidance, guidance interval) in every sampler of training/sampling.py:
the formula, its limits, the interval, CFG's label zeroing, EDM2's guided-sampler goldens and generate_images
(generate.py's guidance options are tested in tests/test_generate.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

from helpers import GaussianDenoiser, gaussian_problem
from training import sampling

SAMPLER_NAMES = list(sampling.SAMPLERS)


class LabelRecorder(GaussianDenoiser):
    """The Gaussian denoiser, conditional: records the labels it was called with; its mean moves with them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels = []

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.labels.append(None if class_labels is None else class_labels.clone())
        out = super().forward(x, sigma)
        if class_labels is not None:
            out = out + 0.1 * class_labels.argmax(1).to(out.dtype).reshape(-1, 1, 1, 1) * class_labels.sum(1).reshape(-1, 1, 1, 1)
        return out


@pytest.fixture
def pair():
    mu, std, z = gaussian_problem()
    net = lambda: GaussianDenoiser(mu, std)
    gnet = lambda: GaussianDenoiser(mu + 0.2, 0.7)  # a "worse" model: wrong mean and spread
    return net, gnet, z


def _run(name, net, z, gnet=None, guidance=1, **kwargs):
    """Sample with SAMPLERS[name]; a guide is applied as the callers apply it, once, as a guided denoiser."""
    gen = torch.Generator().manual_seed(5)
    randn_like = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)
    net = sampling.guided_denoiser(net, gnet, guidance)
    return sampling.SAMPLERS[name](net, z, num_steps=5, randn_like=randn_like, **kwargs)


# ----------------------------------------------------------------------------
# The guided denoiser.


def test_guided_denoiser_formula(pair):
    net, gnet, z = pair
    x, sigma = z * 3, torch.tensor(2.5, dtype=torch.float64)
    d, g = net()(x, sigma), gnet()(x, sigma)
    for w in (0.0, 0.5, 1.0, 1.7, 3.0):
        out = sampling.GuidedDenoiser(net(), gnet(), w)(x, sigma)
        torch.testing.assert_close(out, g + w * (d - g), rtol=1e-12, atol=1e-12)
    assert torch.equal(sampling.GuidedDenoiser(net(), gnet(), 0)(x, sigma), g)
    # Per-sample sigmas (k-diffusion style): the interval applies sample by sample.
    sigmas = torch.tensor([0.5, 4.0], dtype=torch.float64)
    per_sample = lambda std: lambda x, s, labels=None: x * std ** 2 / (std ** 2 + s.reshape(-1, 1, 1, 1) ** 2)
    out = sampling.GuidedDenoiser(per_sample(0.5), per_sample(0.7), 2.0, guidance_interval=(1, 5))(x, sigmas)
    plain, guide = per_sample(0.5)(x, sigmas), per_sample(0.7)(x, sigmas)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], (guide + 2 * (plain - guide))[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', SAMPLER_NAMES)
def test_guidance_limits_in_every_sampler(pair, name):
    """w = 1 is the plain network bit for bit, and never evaluates the guide; w = 0 samples the guide."""
    net, gnet, z = pair
    plain = _run(name, net(), z)
    guide = gnet()
    assert torch.equal(_run(name, net(), z, gnet=guide, guidance=1), plain) and guide.nfe == 0
    assert torch.equal(_run(name, sampling.GuidedDenoiser(net(), gnet(), 1), z), plain)
    torch.testing.assert_close(_run(name, net(), z, gnet=gnet(), guidance=0), _run(name, gnet(), z),
                               rtol=1e-12, atol=1e-12)
    guided = _run(name, net(), z, gnet=gnet(), guidance=2)
    assert not torch.allclose(guided, plain)
    assert torch.equal(guided, _run(name, sampling.GuidedDenoiser(net(), gnet(), 2), z))


def test_only_edm_sampler_takes_the_guidance_keywords(pair):
    """EDM2's API: edm_sampler(net, ..., gnet=, guidance=) is the guided denoiser applied once; the other
    samplers take a guided denoiser as their net and have no guidance keywords."""
    net, gnet, z = pair
    gen = torch.Generator().manual_seed(5)
    randn_like = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)
    by_keywords = sampling.edm_sampler(net(), z, num_steps=5, randn_like=randn_like, gnet=gnet(), guidance=2)
    assert torch.equal(by_keywords, _run('edm', net(), z, gnet=gnet(), guidance=2))
    for name, fn in sampling.SAMPLERS.items():
        params = set(inspect.signature(fn).parameters)
        assert ('gnet' in params) == (name == 'edm') and ('guidance' in params) == (name == 'edm'), name


def test_unconditional_guide_for_a_conditional_network(pair):
    """CFG with a separately trained unconditional model (EDM2's use): the guide gets no labels, the
    network its labels (issue 24, defect 2: this was refused as 'label_dim=0 but the network has 4')."""
    _, _, z = pair
    mu = torch.zeros([1, 3, 4, 4], dtype=torch.float64)
    net, guide = LabelRecorder(mu, 0.5, label_dim=4), LabelRecorder(mu + 0.1, 0.7, label_dim=0)
    labels = torch.eye(4, dtype=torch.float64)[[1, 3]]
    denoiser = sampling.guided_denoiser(net, guide, guidance=2)
    x, sigma = 2 * z, torch.tensor(1.5, dtype=torch.float64)
    out = denoiser(x, sigma, labels)
    assert torch.equal(net.labels[0], labels) and guide.labels == [None]
    torch.testing.assert_close(out, guide(x, sigma) + 2 * (net(x, sigma, labels) - guide(x, sigma)),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match='label_dim=3 but the network has 4'):  # other labels: still refused
        sampling.guided_denoiser(net, LabelRecorder(mu, 0.7, label_dim=3), guidance=2)


def test_guidance_applies_to_every_network_evaluation(pair):
    net, gnet, z = pair
    for name in ('edm', 'dpm_2', 'dpmpp_2s_ancestral', 'lms'):
        n, g = net(), gnet()
        _run(name, n, z, gnet=g, guidance=1.5)
        assert g.nfe == n.nfe and g.sigmas == n.sigmas


def test_guidance_interval(pair):
    net, gnet, z = pair
    lo, hi = 0.3, 5.0
    n, g = net(), gnet()
    guided = _run('edm', sampling.GuidedDenoiser(n, g, 2.0, guidance_interval=(lo, hi)), z)
    assert g.sigmas == [s for s in n.sigmas if lo <= s <= hi] and 0 < g.nfe < n.nfe
    assert not torch.equal(guided, _run('edm', net(), z))
    assert not torch.allclose(guided, _run('edm', net(), z, gnet=gnet(), guidance=2.0))
    # An interval that covers every sigma is plain guidance; one that misses them all is no guidance.
    everywhere = _run('edm', sampling.GuidedDenoiser(net(), gnet(), 2.0, guidance_interval=(0, 1e9)), z)
    assert torch.equal(everywhere, _run('edm', net(), z, gnet=gnet(), guidance=2.0))
    nowhere = _run('edm', sampling.GuidedDenoiser(net(), gnet(), 2.0, guidance_interval=(1e3, 1e4)), z)
    assert torch.equal(nowhere, _run('edm', net(), z))
    with pytest.raises(ValueError, match='sigma_lo <= sigma_hi'):
        sampling.GuidedDenoiser(net(), gnet(), 2.0, guidance_interval=(5, 1))


def test_cfg_guides_with_the_network_without_labels(pair):
    _, _, z = pair
    mu = torch.zeros([1, 3, 4, 4], dtype=torch.float64)
    net = LabelRecorder(mu, 0.5, label_dim=4)
    labels = torch.eye(4, dtype=torch.float64)[[1, 3]]
    denoiser = sampling.guided_denoiser(net, guidance=3, cfg=True)
    assert isinstance(denoiser.gnet, sampling.UnconditionalDenoiser) and denoiser.gnet.net is net
    x, sigma = 2 * z, torch.tensor(1.5, dtype=torch.float64)
    out = denoiser(x, sigma, labels)
    assert torch.equal(net.labels[0], labels) and torch.equal(net.labels[1], torch.zeros_like(labels))
    cond, uncond = net(x, sigma, labels), net(x, sigma, torch.zeros_like(labels))
    torch.testing.assert_close(out, uncond + 3 * (cond - uncond), rtol=1e-12, atol=1e-12)
    assert torch.equal(labels, torch.eye(4, dtype=torch.float64)[[1, 3]])  # the caller's labels untouched


def test_guided_denoiser_validation(pair):
    net, gnet, _ = pair
    with pytest.raises(ValueError, match='need a guide'):
        sampling.edm_sampler(net(), torch.zeros([1, 3, 4, 4]), guidance=2)
    with pytest.raises(ValueError, match='need a guide'):
        sampling.guided_denoiser(net(), guidance_interval=(0.1, 1))
    with pytest.raises(ValueError, match='class-conditional'):
        sampling.guided_denoiser(net(), guidance=2, cfg=True)
    with pytest.raises(ValueError, match='do not also give gnet'):
        sampling.guided_denoiser(GaussianDenoiser(0, 0.5, label_dim=3), gnet(), guidance=2, cfg=True)
    with pytest.raises(ValueError, match='img_resolution=8'):
        sampling.guided_denoiser(net(), GaussianDenoiser(0, 0.5, img_resolution=8), guidance=2)
    plain = net()
    assert sampling.guided_denoiser(plain) is plain  # no guide: the network itself
    assert sampling.GuidedDenoiser(net(), gnet(), 2).img_resolution == 4  # the denoiser interface passes through


def test_generate_images_with_guidance(pair):
    net, gnet, _ = pair
    seeds = list(range(6))
    base = [im for _, im in sampling.generate_images(net(), seeds, num_steps=4)]
    same = [im for _, im in sampling.generate_images(net(), seeds, num_steps=4, gnet=gnet(), guidance=1)]
    assert all(torch.equal(a, b) for a, b in zip(base, same))
    guided = [im for _, im in sampling.generate_images(net(), seeds, num_steps=4, gnet=gnet(), guidance=2,
                                                       sampler='dpmpp_2m')]
    by_hand = [im for _, im in sampling.generate_images(sampling.GuidedDenoiser(net(), gnet(), 2), seeds,
                                                        num_steps=4, sampler='dpmpp_2m')]
    assert all(torch.equal(a, b) for a, b in zip(guided, by_hand))
    with pytest.raises(ValueError):
        next(sampling.generate_images(net(), seeds, guidance=2))


# ----------------------------------------------------------------------------
# EDM2's guided sampler (NVlabs/edm2 generate_images.edm_sampler) on EDM2 networks.

EDM2_SAMPLER_GOLDENS = ['edm2_sampler_plain', 'edm2_sampler_guided', 'edm2_sampler_guided_w05']


@pytest.mark.parametrize('name', EDM2_SAMPLER_GOLDENS)
def test_edm2_guided_sampler_golden(golden_dir, name):
    from training import networks_edm2 as edm2
    ref = torch.load(golden_dir / f'{name}.pt', weights_only=True)
    net_ref = torch.load(golden_dir / ref['net'], weights_only=True)

    def load(state_dict):
        net = edm2.Precond(**net_ref['kwargs'])
        net.load_state_dict(state_dict, strict=True)
        return net.eval().requires_grad_(False)
    net = load(net_ref['state_dict'])
    gnet = load(torch.load(golden_dir / ref['gnet'], weights_only=True)['gnet_state_dict'])
    with torch.no_grad():
        out = sampling.edm_sampler(net, ref['noise'], ref['labels'], gnet=gnet, **ref['sampler_kwargs'])
    err = float((out - ref['output']).norm() / ref['output'].norm())
    assert err <= 1e-4, f'{name}: relative error {err:.2e}'  # float64 vs the reference's float32: ~3e-6


def test_all_edm2_sampler_goldens_are_covered(golden_dir):
    assert sorted(p.stem for p in golden_dir.glob('edm2_sampler_*.pt')) == sorted(EDM2_SAMPLER_GOLDENS + ['edm2_sampler_gnet'])
