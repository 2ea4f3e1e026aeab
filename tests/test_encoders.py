"""training/encoders.py: the pixel <-> data-space maps of EDM2's encoders. StandardRGBEncoder is the samplers'
pixel mapping; StabilityVAEEncoder (with a stub in place of diffusers' VAE) normalises latents and undoes it
before decoding."""

import pickle

import torch

from training import encoders
from training.sampling import images_to_uint8


def test_standard_rgb_encoder_is_the_samplers_pixel_mapping():
    enc = encoders.StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)
    x = enc.encode(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(enc.decode(x), pixels)
    y = torch.linspace(-1.2, 1.2, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    assert torch.equal(enc.decode(y).permute(0, 2, 3, 1), images_to_uint8(y))
    copy = pickle.loads(pickle.dumps(enc))  # persistent: pickles in the paper's layout
    assert type(copy) is type(enc)


class _StubVAE(torch.nn.Module):
    """Stands in for diffusers' AutoencoderKL: 8x downsampling to 4 channels and back."""
    class _Posterior:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

    class _Out:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def encode(self, x):
        m = torch.nn.functional.avg_pool2d(x, 8)
        mean = torch.cat([m, m.mean(1, keepdim=True)], dim=1)
        return self._Out(latent_dist=self._Posterior(mean, torch.full_like(mean, 0.1)))

    def decode(self, z):
        return self._Out(sample=torch.nn.functional.interpolate(z[:, :3], scale_factor=8).tanh())


def test_vae_encoder_normalises_latents_and_undoes_it_before_decoding(monkeypatch):
    monkeypatch.setattr(encoders, 'require_vae_library', lambda: None)
    monkeypatch.setattr(encoders, 'load_stability_vae', lambda name, device: _StubVAE())
    enc = encoders.StabilityVAEEncoder(batch_size=3)
    assert '_vae' not in enc.__getstate__()  # the VAE is never pickled
    pixels = torch.randint(0, 256, [5, 3, 32, 32], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = enc.encode_pixels(pixels)
    assert raw.shape == (5, 8, 4, 4)
    raw = torch.cat([raw[:, :4], torch.zeros_like(raw[:, 4:])], dim=1)  # std 0: deterministic sample
    final = enc.encode_latents(raw)
    raw_mean, raw_std = torch.tensor([5.81, 3.25, 0.12, -2.15]), torch.tensor([4.17, 4.62, 3.71, 3.28])
    expected = (raw[:, :4] - raw_mean.view(1, 4, 1, 1)) / raw_std.view(1, 4, 1, 1) * 0.5
    assert torch.allclose(final, expected, atol=1e-6)
    decoded = enc.decode(final)
    direct = _StubVAE().decode(raw[:, :4]).sample
    assert decoded.dtype == torch.uint8 and decoded.shape == (5, 3, 32, 32)
    # decode undoes the normalisation in float32 (~1e-7 relative), so a value right at a rounding
    # boundary may land one level off; anything more is a wrong inverse.
    expected_pixels = (direct * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert (decoded.int() - expected_pixels.int()).abs().max() <= 1
    assert (decoded != expected_pixels).float().mean() < 0.01
