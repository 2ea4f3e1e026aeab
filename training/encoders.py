"""Pixels <-> what an EDM2 network is trained on (EDM2's training/encoders.py: same class names, constructor
kwargs and methods, so the `encoder` object of an EDM2 training snapshot loads into these classes).

An encoder maps raw uint8 pixels [N, C, H, W] to the network's data space in two steps,

    encode(x) = encode_latents(encode_pixels(x))

where `encode_pixels` is the deterministic, expensive part (run once when a dataset is prepared) and
`encode_latents` the cheap, possibly random part (run per training batch); `decode` maps the network's
output back to uint8 pixels.

- `StandardRGBEncoder`: pixel space. Data space is [-1, 1] (x / 127.5 - 1), decoding is the mapping
  every sampler in this project uses (training.sampling.images_to_uint8).
- `StabilityVAEEncoder`: the latent space of the Stable Diffusion VAE (EDM2's ImageNet-512 models,
  `edm2-img512-*`). It needs the optional package `diffusers`; without it, constructing the encoder (and
  so loading such a snapshot) fails with a one-line ImportError that says what to install.

This module's source is embedded in snapshots that contain an encoder; it imports only numpy, torch and
torch_utils.persistence (the VAE library only when a VAE encoder is used).
"""

import importlib.util

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

class Encoder:
    """Interface of all encoders; `init(device)` does any lazy set-up (e.g. loading the VAE) up front."""
    def __init__(self):
        pass

    def init(self, device):
        pass

    def encode(self, x):
        """Raw pixels -> data space of the network."""
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):
        """Raw pixels -> raw latents (deterministic)."""
        raise NotImplementedError

    def encode_latents(self, x):
        """Raw latents -> data space of the network."""
        raise NotImplementedError

    def decode(self, x):
        """Data space of the network -> uint8 pixels."""
        raise NotImplementedError

#----------------------------------------------------------------------------

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixel space: raw latents are the uint8 pixels themselves, data space is [-1, 1]."""
    def __init__(self):
        super().__init__()

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------

VAE_DEPENDENCY = 'diffusers'

def require_vae_library():
    """Raise a one-line ImportError unless the optional VAE library can be imported."""
    if importlib.util.find_spec(VAE_DEPENDENCY) is None:
        raise ImportError(f'latent-space EDM2 models (StabilityVAEEncoder, e.g. edm2-img512-*) need the Stable '
                          f'Diffusion VAE from the optional package "{VAE_DEPENDENCY}", which is not installed; '
                          f'run: pip install {VAE_DEPENDENCY}')

def load_stability_vae(vae_name, device):
    """The VAE `vae_name` (a Hugging Face model id or folder) through diffusers, in eval mode on `device`."""
    require_vae_library()
    import diffusers  # pylint: disable=import-outside-toplevel
    vae = diffusers.models.AutoencoderKL.from_pretrained(vae_name)
    return vae.eval().requires_grad_(False).to(device)

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Latent space of the Stable Diffusion VAE `vae_name`, 8x smaller than the pixels, 4 channels.

    Raw latents are the VAE posterior's mean and standard deviation, concatenated (8 channels): that is what
    an EDM2 latent dataset stores. encode_latents samples the posterior and normalises each channel from the
    assumed statistics (raw_mean, raw_std) to (final_mean, final_std); decode undoes the normalisation and
    runs the VAE decoder in chunks of `batch_size`.
    """
    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15],
                 raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8):
        super().__init__()
        require_vae_library()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != '_vae'}  # the VAE is reloaded, never pickled

    def init(self, device):
        if self._vae is None:
            self._vae = load_stability_vae(self.vae_name, device)
        else:
            self._vae.to(device)

    def _per_channel(self, values, like):
        return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)

    def _chunks(self, x):
        return x.split(self.batch_size) if self.batch_size > 0 else [x]

    @torch.no_grad()
    def encode_pixels(self, x):
        self.init(x.device)
        out = []
        for chunk in self._chunks(x.to(torch.float32) / 127.5 - 1):
            posterior = self._vae.encode(chunk).latent_dist
            out.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(out)

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * std
        return z * self._per_channel(self.scale, z) + self._per_channel(self.bias, z)

    @torch.no_grad()
    def decode(self, x):
        self.init(x.device)
        z = (x.to(torch.float32) - self._per_channel(self.bias, x)) / self._per_channel(self.scale, x)
        images = torch.cat([self._vae.decode(chunk).sample for chunk in self._chunks(z)])
        return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------
