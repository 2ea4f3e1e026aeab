"""Plain helpers shared by several test files (their fixtures are in conftest.py): tiny datasets built here
(never downloaded), the tests' one relative-error measure, the exactly solvable Gaussian denoiser, tiny
networks, the stand-in FID detector with its independent numpy statistics, a tiny training-loop
configuration and click invocations."""

import io
import json
import math
import pathlib
import resource
import zipfile

import numpy as np
import PIL.Image
import torch
from click.testing import CliRunner

# ----------------------------------------------------------------------------
# Datasets in dataset_tool.py's layout.


def write_dataset_zip(path, images, labels=None) -> str:
    """Images (uint8 arrays HWC or HW, or PIL images) as 00000/img00000000.png ... plus dataset.json with
    [name, label] per image, or null without labels."""
    entries = []
    with zipfile.ZipFile(path, 'w') as z:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            (img if isinstance(img, PIL.Image.Image) else PIL.Image.fromarray(img)).save(buf, format='png')
            name = f'{i // 1000:05d}/img{i:08d}.png'
            z.writestr(name, buf.getvalue())
            entries.append([name, None if labels is None else labels[i]])
        z.writestr('dataset.json', json.dumps(dict(labels=entries if labels is not None else None)))
    return str(path)


def make_dataset_zip(path, num_images=64, resolution=8, num_classes=4, labels=True, seed=0) -> str:
    """Random RGB images as 00000/img00000000.png ... plus dataset.json (labels i % num_classes, or null)."""
    rnd = np.random.RandomState(seed)
    images = [rnd.randint(0, 256, size=[resolution, resolution, 3], dtype=np.uint8) for _ in range(num_images)]
    return write_dataset_zip(path, images, [i % num_classes for i in range(num_images)] if labels else None)

# ----------------------------------------------------------------------------
# Numbers.


def _float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 for tensors, arrays or numbers (0 when both are zero)."""
    a, b = _float64(a), _float64(b)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def jitter_params(net, std):
    """Add N(0, std^2) to every parameter in place (torch's global RNG), so that zero-initialised layers
    do not hide what the test looks at; returns net."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * std)
    return net

# ----------------------------------------------------------------------------
# An exactly solvable problem: data ~ N(mu, std^2) per pixel. The ideal denoiser is
#   D(x; sigma) = mu + std^2/(std^2 + sigma^2) (x - mu),
# and the probability-flow ODE dx/dsigma = (x - D)/sigma = (x - mu) sigma/(std^2 + sigma^2) gives
#   x(sigma) - mu = (x(sigma_0) - mu) sqrt((std^2 + sigma^2)/(std^2 + sigma_0^2)).


class GaussianDenoiser(torch.nn.Module):
    """Duck-types an EDM preconditioned network; counts network evaluations (NFE) and records sigmas."""

    def __init__(self, mu, std, sigma_min=0.0, sigma_max=float('inf'), img_channels=3, img_resolution=4,
                 label_dim=0, round_to=None):
        super().__init__()
        self.mu, self.std = mu, std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.img_channels, self.img_resolution, self.label_dim = img_channels, img_resolution, label_dim
        self.round_to = round_to
        self.nfe, self.sigmas = 0, []

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return sigma if self.round_to is None else (sigma / self.round_to).round() * self.round_to

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        self.sigmas.append(float(sigma))
        return self.mu + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x.to(torch.float64) - self.mu)


def gaussian_problem():
    """(mu, std, z): the Gaussian problem's data mean [1,3,4,4] and std, and two latents [2,3,4,4] (float64)."""
    g = torch.Generator().manual_seed(0)
    mu = 0.3 * torch.randn([1, 3, 4, 4], generator=g, dtype=torch.float64)
    z = torch.randn([2, 3, 4, 4], generator=g, dtype=torch.float64)
    return mu, 0.5, z


def exact_solution(mu, std, z, sigma_0, sigma=0.0):
    """x(sigma) for the ODE started at x(sigma_0) = sigma_0 z (s=1, so latents scale by sigma_0)."""
    return mu + (sigma_0 * z - mu) * math.sqrt((std ** 2 + sigma ** 2) / (std ** 2 + sigma_0 ** 2))


def expected_output(mu, std, z, sigmas, last_step_is_denoiser):
    """What a sampler with noise levels `sigmas` (then 0) converges to as N grows. With sigma(t)=t, s=1 the
    last (Euler) step lands exactly on D(x; sigma_{N-1}), so we reference the exact ODE state at
    sigma_{N-1} pushed through D, which removes the O(sigma_min^2) floor of that step from the error."""
    sigma_0, sigma_last = float(sigmas[0]), float(sigmas[-1])
    if not last_step_is_denoiser:
        return exact_solution(mu, std, z, sigma_0)
    x = exact_solution(mu, std, z, sigma_0, sigma_last)
    return mu + std ** 2 / (std ** 2 + sigma_last ** 2) * (x - mu)

# ----------------------------------------------------------------------------
# Tiny networks.


def load_golden_net(golden_dir, name, train=False):
    """The golden network net_<name>.pt (training/networks.py), in eval mode without gradients, or in
    train mode (the loss goldens' protocol)."""
    from training import networks
    ref = torch.load(golden_dir / f'net_{name}.pt', weights_only=True)
    net = getattr(networks, ref['precond'])(**ref['kwargs'])
    net.load_state_dict(ref['state_dict'], strict=True)
    return net.train() if train else net.eval().requires_grad_(False)


def make_tiny_net(img_channels=3, label_dim=4, seed=0):
    """An 8x8 EDMPrecond (SongUNet, 8 channels) whose every parameter is redrawn, so that its images carry
    real per-seed structure (fresh SongUNets output ~0: their last layers are scaled by 1e-5)."""
    from training import networks
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=8, img_channels=img_channels, label_dim=label_dim,
                              model_type='SongUNet', model_channels=8, channel_mult=[1, 1], num_blocks=1,
                              attn_resolutions=[], dropout=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


def read_pngs(folder):
    """{file name: bytes} of every PNG below folder."""
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).rglob('*.png'))}

# ----------------------------------------------------------------------------
# The stand-in FID detector (never the real Inception download) and independent numpy statistics.

FEATURE_DIM = 8


class StandInDetector(torch.nn.Module):
    """Deterministic uint8 images -> FEATURE_DIM features, with the official detector's call signature."""

    def __init__(self, dim: int = FEATURE_DIM):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.register_buffer('proj', torch.randn([3 * 4 * 4, dim], generator=g) * 2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, [4, 4]).flatten(1)
        return torch.tanh((x - 0.5) @ self.proj)


def make_images(seed: int, n: int, size: int = 16, mode: str = 'RGB') -> np.ndarray:
    """n random-ish images [n,H,W,C] uint8 with smooth structure so pooled features vary."""
    rnd = np.random.RandomState(seed)
    base = rnd.randint(0, 256, size=[n, 4, 4, 3]).astype(np.float64)
    img = base.repeat(size // 4, axis=1).repeat(size // 4, axis=2) + rnd.randint(-20, 21, size=[n, size, size, 3])
    img = np.clip(img, 0, 255).astype(np.uint8)
    if mode == 'L':
        img = img[..., :1]
    return img


def write_folder(path: pathlib.Path, images: np.ndarray) -> pathlib.Path:
    path.mkdir(parents=True)
    for i, img in enumerate(images):
        PIL.Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path / f'img{i:04d}.png')
    return path


def direct_features(images: np.ndarray) -> np.ndarray:
    """Features of [N,H,W,C] uint8 images from the stand-in, gray repeated to RGB, as float64."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat([1, 3, 1, 1])
    with torch.no_grad():
        return StandInDetector()(x, return_features=True).double().numpy()


def direct_stats(features: np.ndarray):
    return features.mean(0), np.cov(features, rowvar=False, ddof=1)


def direct_fid(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr sqrt(S1 S2) = sum of square roots of the (real, >= 0) eigenvalues of S1 S2."""
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())

# ----------------------------------------------------------------------------
# The training loop and the command lines.


def loop_kwargs(data, run_dir, total_kimg, **extra):
    """training_loop(**kwargs) of a tiny EDM run (16 channels, one level) on the CPU, with `extra` on top."""
    kw = dict(
        run_dir=str(run_dir),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True,
                            cache=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
                            embedding_type='positional', encoder_type='standard', decoder_type='standard',
                            channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1],
                            augment_dim=9, dropout=0.13),
        loss_kwargs=dict(class_name='training.loss.EDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1,
                            rotate_frac=1, aniso=1, translate_frac=1),
        seed=3, batch_size=16, total_kimg=total_kimg, ema_halflife_kimg=0.1, lr_rampup_kimg=0.2,
        kimg_per_tick=0.032, snapshot_ticks=None, state_dump_ticks=1, device=torch.device('cpu'),
        print_summary=False)
    kw.update(extra)
    return kw


def edm2_loop_kwargs(data, run_dir, **extra):
    """training_loop(**kwargs) of a tiny EDM2 run (Precond, 8 channels, two levels, learned uncertainty, EDM2Loss,
    Adam) on the CPU; `extra` holds the schedules, EMA, batch and duration."""
    return dict(
        run_dir=str(run_dir), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data,
                                                  use_labels=True, cache=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='training.networks_edm2.Precond', model_channels=8, channel_mult=[1, 2],
                            num_blocks=1, attn_resolutions=[4], channels_per_head=8, logvar_channels=8),
        loss_kwargs=dict(class_name='training.loss.EDM2Loss', P_mean=-0.8, P_std=1.6),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-2, betas=[0.9, 0.99], eps=1e-8),
        device=torch.device('cpu'), print_summary=False, **extra)


# The options of train.py's tiny in-process runs (test_train.py's failure tests, conftest's finished_run).
TINY_RUN = ['--cbase', '16', '--cres', '1', '--augment', '0', '--workers', '0', '--seed', '1', '--tick', '1',
            '--snap', '1', '--dump', '1']


def limited_memory():
    """preexec_fn: at most 3 GB of address space, so a regression fails with MemoryError, not an OOM."""
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def invoke(command, args, expect_ok=True, **kwargs):
    """Run a click command in-process on str(args); with expect_ok, assert that it exited with status 0."""
    result = CliRunner().invoke(command, [str(a) for a in args], **kwargs)
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result
