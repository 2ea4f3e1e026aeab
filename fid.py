"""Fréchet Inception Distance (FID), the metric the EDM paper reports.

FID = ||mu - mu_ref||^2 + Tr(Sigma + Sigma_ref - 2 (Sigma Sigma_ref)^(1/2))
over 2048-d pool features of the TensorFlow Inception-v3 (2015-12-05) network evaluated on uint8 images,
with the statistics accumulated in float64. Subcommands:

  python fid.py ref  --data=ZIP|DIR --dest=NPZ             reference statistics (mu, sigma) of a dataset
  python fid.py calc --images=ZIP|DIR --ref=NPZ|URL        FID of a set of images (first --num picked by --seed)
  python fid.py net  --network=PKL --ref=NPZ|URL           the paper's protocol: FID of freshly generated
                                                           images on --repeats disjoint seed ranges, and min
  python fid.py sweep --network=PKL --ref=NPZ --outdir=DIR FID against NFE for several samplers (CSV, JSON, PNG)
  python fid.py nll  --network=PKL --data=ZIP|DIR          negative log-likelihood in bits/dim (probability-flow ODE)

All run multi-process under `torchrun` (each rank a share of the images, sums reduced across ranks).

The detector is the standard FID Inception-v3 network, downloaded once through the dnnlib download cache
(folder: $EDM_CACHE_DIR/downloads, see dnnlib.util.make_cache_dir_path). `--detector=PATH|URL` selects
another copy: a TorchScript module file, or a pickle like the official one. Pickles can execute code
when loaded, so they are first read with a restricted unpickler that only extracts an embedded TorchScript
module (the official file wraps one); running a pickle's own code needs trust: the official default URL is
trusted (as in the paper's code), anything else needs `--trust-pickle`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import pickle
import sys
import time
import types
import zipfile
from typing import Iterable, Optional

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
import generate
from training.dataset import dataset_fingerprint
from training.sampling import MAX_SEED, generate_images, parse_seeds
from torch_utils import distributed as dist
from torch_utils import misc

DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                'inception-2015-12-05.pkl')
TRUSTED_DETECTOR_URLS = frozenset([DETECTOR_URL])  # Pickles from here may run their embedded code.

#----------------------------------------------------------------------------
# Fréchet distance between two Gaussians (pure numpy/scipy, float64).


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal matrix square root, real part.

    The paper called sqrtm(..., disp=False), which returned (root, error_estimate); SciPy deprecated and
    then removed `disp`, and current versions return the root alone. Accept either return signature.
    """
    root = scipy.linalg.sqrtm(a)
    if isinstance(root, tuple):
        root = root[0]
    return np.real(root)


def calculate_fid_from_inception_stats(mu, sigma, mu_ref, sigma_ref) -> float:
    """FID between N(mu, sigma) and N(mu_ref, sigma_ref), computed in float64."""
    mu, mu_ref = np.asarray(mu, np.float64), np.asarray(mu_ref, np.float64)
    sigma, sigma_ref = np.asarray(sigma, np.float64), np.asarray(sigma_ref, np.float64)
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape or sigma.shape != mu.shape * 2:
        raise ValueError(f'Mismatched statistics: mu {mu.shape}, sigma {sigma.shape} vs '
                         f'mu_ref {mu_ref.shape}, sigma_ref {sigma_ref.shape}')
    # Squared distance of the means, plus the trace term of the 2-Wasserstein distance between the
    # Gaussians, which needs the square root of the (generally non-symmetric) product of covariances.
    mean_term = np.square(mu - mu_ref).sum()
    cov_root = _sqrtm(np.dot(sigma, sigma_ref))
    return float(mean_term + np.trace(sigma + sigma_ref - cov_root * 2))

#----------------------------------------------------------------------------
# Detector loading: TorchScript files, or pickles (restricted unpickler first, full pickle only if trusted).


class UntrustedPickleError(pickle.UnpicklingError):
    """The pickle needs to run code to load and nobody said it may."""


_ZIP_MAGIC = b'PK\x03\x04'

# Globals a data-only pickle may reference: none of them can run caller-chosen code.
_SAFE_GLOBALS = dnnlib.util.allow_exactly([
    ('collections', 'OrderedDict'), ('builtins', 'bytearray'), ('builtins', 'set'), ('builtins', 'frozenset'),
    ('_codecs', 'encode'),  # how protocol-2 pickles store bytes
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
])


def _find_torchscript(obj, depth: int = 0) -> Optional[torch.jit.ScriptModule]:
    """Search a plain-data object tree for serialised TorchScript bytes and load the first one found."""
    if depth > 8:
        return None
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        obj = obj.tobytes()
    if isinstance(obj, (bytes, bytearray)):
        if bytes(obj[:4]) != _ZIP_MAGIC:
            return None
        try:
            module = torch.jit.load(io.BytesIO(bytes(obj)), map_location='cpu')
        except Exception:  # A zip that is not TorchScript: keep looking.
            return None
        # Only a module with the detector's own interface can stand for the wrapper object.
        args = [a.name for a in module.forward.schema.arguments]
        return module if 'return_features' in args else None
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for child in children:
        found = _find_torchscript(child, depth + 1)
        if found is not None:
            return found
    return None


def _reconstruct_detector_safely(meta):
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj that never runs module_src.

    Persistent objects carry their class source code plus `state`; a detector wrapping a TorchScript
    module must keep that module serialised in its state (ScriptModules cannot be pickled directly).
    """
    state = meta.get('state') if isinstance(meta, dict) else None
    found = _find_torchscript(state)
    if found is None:
        raise UntrustedPickleError('persistent object without an embedded TorchScript module '
                                   '(loading it would run its embedded source code)')
    return found


def _safe_detector_global(module: str, name: str):
    """Allowlist for reading a detector pickle without running its code (dnnlib.util.RestrictedUnpickler)."""
    if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
        return _reconstruct_detector_safely
    return _SAFE_GLOBALS(module, name)


def _reconstruct_with_source(meta):
    """The paper's persistent-object protocol: run the embedded module source, rebuild the class, set state.

    Used only for trusted pickles (it executes code from the file)."""
    if not isinstance(meta, dict) or meta.get('type') != 'class':
        raise pickle.UnpicklingError('unsupported persistent object record')
    src = meta['module_src']
    module = types.ModuleType('_fid_detector_' + hashlib.sha256(src.encode('utf-8')).hexdigest()[:16])
    sys.modules[module.__name__] = module
    exec(compile(src, module.__name__, 'exec'), module.__dict__)  # noqa: S102 -- trusted input only
    cls = getattr(module, meta['class_name'])
    obj = cls.__new__(cls)
    state = meta.get('state') or {}
    if callable(getattr(obj, '__setstate__', None)):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj


def _trusted_detector_global(module: str, name: str):
    """Everything, as plain pickle would, with persistent objects rebuilt from their embedded source."""
    if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
        return _reconstruct_with_source  # our persistence module never runs embedded source
    return True


def _load_detector_bytes(data: bytes, source: str, trusted: bool) -> torch.nn.Module:
    if data[:4] == _ZIP_MAGIC:  # TorchScript archive: code-free as far as Python is concerned.
        try:
            return torch.jit.load(io.BytesIO(data), map_location='cpu')
        except Exception as e:
            raise click.ClickException(f'Detector {source} is a zip archive but not a TorchScript module '
                                       f'(save one with torch.jit.save): {e}') from e
    try:
        obj = dnnlib.util.RestrictedUnpickler(io.BytesIO(data), _safe_detector_global, what='detector pickle').load()
    except (UntrustedPickleError, dnnlib.util.DisallowedPickleError) as e:
        if not trusted:
            raise click.ClickException(
                f'Detector {source} is a pickle that runs code when loaded ({e}). Pass --trust-pickle if you '
                f'trust this file, or convert it once with torch.jit.save and pass the TorchScript file') from e
        try:  # Trusted: what the paper's pickle.load does, including the embedded source code.
            obj = dnnlib.util.RestrictedUnpickler(io.BytesIO(data), _trusted_detector_global, what='trusted detector pickle').load()
        except Exception as e2:
            raise click.ClickException(f'Could not unpickle the detector {source}: {e2}') from e2
    except Exception as e:
        raise click.ClickException(f'Detector {source} is neither a TorchScript module nor a readable '
                                   f'pickle: {e}') from e
    if not isinstance(obj, torch.nn.Module):
        raise click.ClickException(f'Detector {source} holds a {type(obj).__name__}, not a torch module')
    return obj


def load_detector(detector: Optional[str] = None, device=torch.device('cpu'), trust_pickle: bool = False,
                  verbose: bool = True, num_attempts: int = 10) -> torch.nn.Module:
    """Load the feature detector: called as detector(uint8 [N,3,H,W], return_features=True) -> [N, D]."""
    source = detector or DETECTOR_URL
    try:
        with dnnlib.util.open_url(source, verbose=verbose, num_attempts=num_attempts) as f:
            data = f.read()
    except (OSError, ValueError) as e:
        cache = ''
        if dnnlib.util.is_url(source):
            cache = f' (cache folder: {dnnlib.util.make_cache_dir_path("downloads")}, set by $EDM_CACHE_DIR)'
        raise click.ClickException(f'Could not load the FID detector: {e}{cache} A local copy can also be given '
                                   f'as --detector=PATH (a TorchScript file or the official pickle).') from e
    net = _load_detector_bytes(data, source, trusted=trust_pickle or source in TRUSTED_DETECTOR_URLS)
    for param in net.parameters():  # (ScriptModules lack requires_grad_.)
        param.requires_grad_(False)
    return net.eval().to(device)

#----------------------------------------------------------------------------
# Feature statistics: float64 sums and outer-product sums, reduced across ranks.


@dataclasses.dataclass
class FeatureStats:
    mu: np.ndarray      # [D] float64
    sigma: np.ndarray   # [D, D] float64, unbiased (N - 1)
    num_images: int


def _all_reduce(x: torch.Tensor, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(x, op=op)
    return x


def check_image_shape(shape, source: str) -> None:
    """Images must be [C, H, W] uint8 with C = 1 (repeated to RGB) or 3, at least 2x2 pixels."""
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 2:
        raise click.ClickException(f'Images in {source} have shape {list(shape)} (C,H,W); FID needs '
                                   f'1 (grayscale) or 3 (RGB) channels and at least 2x2 pixels')


def compute_feature_stats(detector: torch.nn.Module, batches: Iterable[torch.Tensor], num_images: int,
                          device=torch.device('cpu'), desc: str = 'FID features',
                          source: str = 'images') -> FeatureStats:
    """Accumulate this rank's uint8 [N,C,H,W] batches, reduce over ranks, return mean and covariance.

    `num_images` is the total over all ranks (it sizes the progress bar and is checked at the end).
    """
    world = dist.get_world_size()
    feature_sum = outer_sum = None  # sum of f and sum of f f^T over this rank's images
    count = 0
    with tqdm.tqdm(total=num_images, unit='img', desc=desc, disable=(dist.get_rank() != 0),
                   dynamic_ncols=True) as bar:
        for images in batches:
            if images.shape[0] == 0:
                continue
            check_image_shape(images.shape[1:], source)
            if images.shape[1] == 1:
                images = images.repeat([1, 3, 1, 1])
            try:
                with torch.no_grad():
                    features = detector(images.to(device), return_features=True)
            except RuntimeError as e:
                raise click.ClickException(f'The detector failed on images of shape {list(images.shape)} '
                                           f'from {source}: {str(e).splitlines()[0]}') from e
            features = features.to(torch.float64).reshape(images.shape[0], -1)
            if feature_sum is None:
                feature_sum, outer_sum = _zero_sums(features.shape[1], device)
            feature_sum += features.sum(0)
            outer_sum += features.T @ features
            count += images.shape[0]
            bar.update(images.shape[0] * world)  # Ranks progress in step; show the global rate.

    # Ranks without images still take part in the reductions: agree on the feature dimension first.
    local_dim = 0 if feature_sum is None else feature_sum.shape[0]
    dim = _all_reduce(torch.tensor([local_dim], dtype=torch.int64, device=device),
                      op=torch.distributed.ReduceOp.MAX).item()
    if feature_sum is None:
        feature_sum, outer_sum = _zero_sums(dim, device)
    n = int(_all_reduce(torch.tensor([count], dtype=torch.int64, device=device)).item())
    _all_reduce(feature_sum)
    _all_reduce(outer_sum)
    if n != num_images:
        raise RuntimeError(f'Expected {num_images} images over all ranks, got {n}')
    if n < 2:
        raise click.ClickException(f'Need at least 2 images to estimate a covariance, got {n} from {source}')
    mean, cov = _mean_and_covariance(feature_sum, outer_sum, n)
    return FeatureStats(mu=mean.cpu().numpy(), sigma=cov.cpu().numpy(), num_images=n)


def _zero_sums(dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros([dim], dtype=torch.float64, device=device),
            torch.zeros([dim, dim], dtype=torch.float64, device=device))


def _mean_and_covariance(feature_sum: torch.Tensor, outer_sum: torch.Tensor, n: int):
    """Sample mean and unbiased covariance from the running sums:
    cov = (sum f f^T - n mean mean^T) / (n - 1)."""
    mean = feature_sum / n
    cov = (outer_sum - torch.outer(mean, mean) * n) / (n - 1)
    return mean, cov


def _open_dataset(image_path: str, num_expected: Optional[int], seed: int, use_labels: bool = False):
    from training import dataset  # Imported here: fid.py's math and `net` need no dataset code.
    if not os.path.exists(image_path):
        raise click.ClickException(f'No such image folder or zip: {image_path}')
    try:
        dataset_obj = dataset.ImageFolderDataset(path=image_path, max_size=num_expected, random_seed=seed,
                                                 use_labels=use_labels)
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
        raise click.ClickException(f'Could not read images from {image_path}: {e}') from e
    if num_expected is not None and len(dataset_obj) < num_expected:
        raise click.ClickException(f'Found {len(dataset_obj)} images in {image_path}, but --num asks for '
                                   f'{num_expected}: add images or lower --num')
    if len(dataset_obj) < 2:
        raise click.ClickException(f'Found {len(dataset_obj)} images in {image_path}; need at least 2')
    check_image_shape(dataset_obj.image_shape, image_path)
    return dataset_obj


def _rank_batches(num_items: int, max_batch_size: int) -> list[list[int]]:
    """This rank's batches of item indices.

    0..num_items-1 is cut into the fewest near-equal consecutive slots (at most max_batch_size items
    each) that divide evenly among the ranks; slots are dealt round-robin, so rank r takes slots r,
    r + world, r + 2 world, ... Empty slots (fewer items than slots) are dropped.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    slots_per_rank = -(-num_items // (max_batch_size * world))  # ceiling division
    slots = torch.arange(num_items).tensor_split(slots_per_rank * world)
    return [slot.tolist() for slot in slots[rank::world] if len(slot) > 0]


def _dataset_feature_stats(image_path: str, num_expected: Optional[int] = None, seed: int = 0,
                           max_batch_size: int = 64, num_workers: int = 3, prefetch_factor: int = 2,
                           device=None, detector=None, trust_pickle: bool = False) -> FeatureStats:
    device = torch.device(device) if device is not None else dist.default_device()

    def open_data_and_detector():  # cheap dataset checks before the detector download
        dataset_obj = _open_dataset(image_path, num_expected, seed)
        det = detector if isinstance(detector, torch.nn.Module) else load_detector(
            detector, device=device, trust_pickle=trust_pickle, verbose=(dist.get_rank() == 0))
        return dataset_obj, det
    dataset_obj, detector = _rank0_first(open_data_and_detector)
    dist.print0(f'Inception features of {len(dataset_obj)} images in "{image_path}"')

    if hasattr(os, 'sched_getaffinity'):
        num_workers = min(num_workers, len(os.sched_getaffinity(0)))  # More than the cores only adds overhead.
    loader = torch.utils.data.DataLoader(dataset_obj, batch_sampler=_rank_batches(len(dataset_obj), max_batch_size),
                                         num_workers=num_workers,
                                         prefetch_factor=(prefetch_factor if num_workers > 0 else None))
    return compute_feature_stats(detector, _images_from(loader, image_path), len(dataset_obj), device=device,
                                 source=image_path)


def _images_from(loader, source: str):
    """The loader's image batches; unreadable or mismatched images become a one-line error."""
    try:
        for images, _labels in loader:
            yield images
    except (OSError, ValueError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]  # Worker errors end with the cause.
        raise click.ClickException(f'Could not read images from {source}: {lines[-1] if lines else e}') from e


def calculate_inception_stats(image_path: str, num_expected: Optional[int] = None, seed: int = 0,
                              max_batch_size: int = 64, num_workers: int = 3, prefetch_factor: int = 2,
                              device=None, detector=None, trust_pickle: bool = False):
    """Inception mean and covariance (float64 numpy) of the images in a folder or zip.

    With `num_expected`, that many images are picked by `seed` (the dataset's max_size/random_seed
    selection, as in the paper). `detector` is a path/URL or a loaded module (default: the standard one).
    """
    s = _dataset_feature_stats(image_path, num_expected=num_expected, seed=seed, max_batch_size=max_batch_size,
                               num_workers=num_workers, prefetch_factor=prefetch_factor, device=device,
                               detector=detector, trust_pickle=trust_pickle)
    return s.mu, s.sigma

#----------------------------------------------------------------------------
# Reference statistics files.


def save_reference(dest_path: str, stats: FeatureStats, **extra) -> None:
    """Atomically write mu, sigma (the paper's layout) plus extra keys such as num_images."""
    os.makedirs(os.path.dirname(dest_path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(dest_path) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=np.int64(stats.num_images),
                 **{k: np.asarray(v) for k, v in extra.items()})


def load_reference(ref_path: str) -> dict:
    """Load reference statistics (.npz path or URL) and check that mu and sigma fit together."""
    try:
        with dnnlib.util.open_url(ref_path, verbose=(dist.get_rank() == 0)) as f:
            data = f.read()
        if not data.startswith(b'PK'):  # np.load would take anything else for a pickle and say so
            raise click.ClickException(f'{ref_path} is not a .npz file of reference statistics (it is '
                                       f'{"empty" if not data else "not a zip archive"}); make one with '
                                       f'`python fid.py ref --data=... --dest=...`')
        ref = dict(np.load(io.BytesIO(data), allow_pickle=False))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise click.ClickException(f'Could not load reference statistics from {ref_path}: {e}') from e
    if 'mu' not in ref or 'sigma' not in ref:
        raise click.ClickException(f'{ref_path} has keys {sorted(ref)}; reference statistics need "mu" and '
                                   f'"sigma" (make them with `python fid.py ref`)')
    mu, sigma = ref['mu'], ref['sigma']
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise click.ClickException(f'{ref_path}: mu {mu.shape} and sigma {sigma.shape} do not fit together')
    return ref


def _fid_against(stats: FeatureStats, ref: dict, ref_path: str) -> float:
    if stats.mu.shape != ref['mu'].shape:
        raise click.ClickException(f'The detector gives {stats.mu.shape[0]} features but {ref_path} has '
                                   f'{ref["mu"].shape[0]}: the reference was made with another detector')
    return calculate_fid_from_inception_stats(stats.mu, stats.sigma, ref['mu'], ref['sigma'])

#----------------------------------------------------------------------------
# Command line.


def _rank0_first(fn):
    """fn() on rank 0 first (it fills the download cache), then on the others; a failure on any rank
    stops every rank with a one-line error instead of leaving the others in a collective until it times out."""
    return dist.rank0_first(fn, other_error=lambda: click.ClickException('failed on another process (rank 0 '
                                                                         'prints the reason)'))


def _start(workers: int) -> None:
    misc.set_malloc_thresholds()  # reuse activation buffers instead of returning them to the OS per batch
    if torch.cuda.is_available() and workers > 0:
        try:  # CUDA in forked DataLoader workers is unsafe.
            torch.multiprocessing.set_start_method('spawn')
        except RuntimeError:
            pass
    dist.init()


_detector_options = [
    click.option('--detector', help='Feature detector: TorchScript file or pickle  [default: standard '
                 'Inception-v3 URL]', metavar='PATH|URL', type=str, default=None),
    click.option('--trust-pickle', help='Allow a --detector pickle to run its embedded code (trusted files only)',
                 is_flag=True),
]


def detector_options(fn):
    for option in reversed(_detector_options):
        fn = option(fn)
    return fn


@click.group()
def main():
    """Calculate Frechet Inception Distance (FID); FID against NFE (sweep); log-likelihood (nll).

    \b
    Examples:
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    \b
    # FID of 50k generated images
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=fid-refs/cifar10-32x32.npz
    \b
    # The paper's protocol: three disjoint 50k seed ranges, generated in memory, report the minimum
    torchrun --standalone --nproc_per_node=8 fid.py net --network=network-snapshot.pkl \\
        --ref=fid-refs/cifar10-32x32.npz --seeds=0-49999 --repeats=3
    \b
    # FID against NFE for several samplers: sweep/sweep.csv, sweep.json, sweep.png
    python fid.py sweep --network=network-snapshot.pkl --ref=fid-refs/cifar10-32x32.npz \\
        --samplers=edm,euler,dpmpp_2m,dpmpp_3m_sde --nfe=5,9,17,35 --outdir=sweep
    \b
    # Negative log-likelihood in bits/dim (probability-flow ODE)
    python fid.py nll --network=network-snapshot.pkl --data=datasets/cifar10-32x32.zip --num=1000
    """


@main.command()
@click.option('--images', 'image_path', help='Path to the images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics ', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', 'num_expected', help='Number of images to use', metavar='INT', type=click.IntRange(min=2),
              default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0,
              show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes per rank', metavar='INT', type=click.IntRange(min=0),
              default=3, show_default=True)
@detector_options
def calc(image_path, ref_path, num_expected, seed, batch, workers, detector, trust_pickle):
    """Calculate FID for a given set of images."""
    _start(workers)
    dist.print0(f'Reference statistics: "{ref_path}"')
    ref = _rank0_first(lambda: load_reference(ref_path) if dist.get_rank() == 0 else None)
    stats = _dataset_feature_stats(image_path, num_expected=num_expected, seed=seed, max_batch_size=batch,
                                   num_workers=workers, detector=detector, trust_pickle=trust_pickle)
    if dist.get_rank() == 0:
        fid = _fid_against(stats, ref, ref_path)
        print(f'FID of {stats.num_images} images from "{image_path}" against "{ref_path}":')
        print(f'{fid:g}')  # Last line: the bare number, as the paper's script prints it.
    dist.barrier()


@main.command()
@click.option('--data', 'dataset_path', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes per rank', metavar='INT', type=click.IntRange(min=0),
              default=3, show_default=True)
@detector_options
def ref(dataset_path, dest_path, batch, workers, detector, trust_pickle):
    """Calculate dataset reference statistics needed by 'calc'."""
    _start(workers)
    stats = _dataset_feature_stats(dataset_path, max_batch_size=batch, num_workers=workers, detector=detector,
                                   trust_pickle=trust_pickle)
    if not dest_path.endswith('.npz'):
        dest_path += '.npz'  # What np.savez(dest_path) did in the paper's code.
    dist.print0(f'Writing reference statistics ({stats.num_images} images) to "{dest_path}"')
    if dist.get_rank() == 0:
        save_reference(dest_path, stats, dataset_sha256=dataset_fingerprint(dataset_path)['sha256'],
                       detector=(detector or DETECTOR_URL))
    dist.barrier()


def repeat_seeds(seeds: list[int], repeats: int) -> list[list[int]]:
    """Disjoint seed sets for repeated FID: shift by the seed range's span (its length when contiguous)."""
    span = max(seeds) - min(seeds) + 1
    return [[s + span * k for s in seeds] for k in range(repeats)]


def _format_seeds(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f'{seeds[0]}-{seeds[-1]}'
    return f'{len(seeds)} seeds from {min(seeds)} to {max(seeds)}'


def _load_for_scoring(ref_path, detector, trust_pickle, network_pkl, sampler_kwargs, device):
    """What `net` and `sweep` score with: the reference statistics (rank 0 only), the detector, the network,
    and the sampler kwargs with a --gnet guide loaded. Called through _rank0_first."""
    verbose = dist.get_rank() == 0
    ref = load_reference(ref_path) if verbose else None
    detector_net = load_detector(detector, device=device, trust_pickle=trust_pickle, verbose=verbose)
    network = generate.load_net(network_pkl, device=device, verbose=verbose)
    return ref, detector_net, network, generate.load_guide(sampler_kwargs, network, device, verbose=verbose)


def _parse_seeds(s: str) -> list[int]:
    try:
        values = parse_seeds(s)
    except ValueError as e:
        raise click.BadParameter(f'{e}; expected e.g. 0-49999', param_hint='--seeds') from None
    if len(values) < 2 or len(set(values)) != len(values):
        raise click.BadParameter('need at least 2 distinct seeds', param_hint='--seeds')
    return values


@main.command()
@click.option('--network', 'network_pkl', help='Network pickle', metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--seeds', help='Seeds of the first repeat, e.g. 0-49999', metavar='LIST', type=str,
              default='0-49999', show_default=True)
@click.option('--repeats', help='Number of disjoint seed ranges', metavar='INT', type=click.IntRange(min=1),
              default=3, show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@generate.sampler_options
@detector_options
def net(network_pkl, ref_path, seeds, repeats, class_idx, max_batch_size, detector, trust_pickle,
        **sampler_kwargs):
    """FID of a network on --repeats disjoint seed ranges, images generated in memory; reports the minimum."""
    seeds = _parse_seeds(seeds)
    if max(repeat_seeds(seeds, repeats)[-1]) > MAX_SEED:
        raise click.BadParameter(f'the last of {repeats} repeats would need seeds above {MAX_SEED}; '
                                 f'use lower --seeds or fewer --repeats', param_hint='--seeds')
    sampler_kwargs = generate.sampler_kwargs_from_cli(click.get_current_context(), sampler_kwargs)
    _start(0)
    device = dist.default_device()
    dist.print0(f'Network: "{network_pkl}"')
    ref, detector_net, network, sampler_kwargs = _rank0_first(
        lambda: _load_for_scoring(ref_path, detector, trust_pickle, network_pkl, sampler_kwargs, device))

    fids = []
    for k, rep_seeds in enumerate(repeat_seeds(seeds, repeats)):
        batches = (images.permute(0, 3, 1, 2) for _batch_seeds, images in
                   generate_images(network, rep_seeds, max_batch_size=max_batch_size,
                                            class_idx=class_idx, device=device, **sampler_kwargs))
        stats = compute_feature_stats(detector_net, batches, len(rep_seeds), device=device,
                                      desc=f'repeat {k + 1}/{repeats}', source=network_pkl)
        if dist.get_rank() == 0:
            fids.append(_fid_against(stats, ref, ref_path))
            print(f'repeat {k + 1}/{repeats}: seeds {_format_seeds(rep_seeds)}: FID {fids[-1]:g} '
                  f'({stats.num_images} images)')
    if dist.get_rank() == 0:
        print(f'FID of {network_pkl} against "{ref_path}": '
              f'{", ".join(f"{x:g}" for x in fids)}; minimum of {repeats}:')
        print(f'{min(fids):g}')
    dist.barrier()


#----------------------------------------------------------------------------
# NFE-FID sweep: FID of one network for several samplers at several numbers of network evaluations.

# Sweep names that are not registry names: the paper's two ODE solvers on the EDM time steps.
SWEEP_ALIASES = {
    'heun': ('edm', {}),                       # Algorithm 1: Heun, NFE = 2N - 1
    'euler': ('ablation', {'solver': 'euler'}),  # Algorithm 1 with Euler steps (sigma(t) = t, s(t) = 1), NFE = N
}
DEFAULT_SWEEP_SAMPLERS = 'edm,euler,euler_ancestral,dpm_2,lms,dpmpp_2s_ancestral,dpmpp_2m,dpmpp_2m_sde,dpmpp_3m_sde,unipc'


def _typed_like(default, value: str):
    """A command-line string as the type of an option's default (int defaults also accept floats)."""
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return int(value) if isinstance(default, int) else float(value)
        except ValueError:
            return float(value)
    return value


def parse_sampler_spec(spec: str) -> tuple[str, str, dict]:
    """'name[:option=value...]' -> (label, registry name, options), e.g. 'dpmpp_2m_sde:eta=0.5:solver_type=heun'.
    Values take the type of the option's default. Raises ValueError for unknown samplers or options."""
    import inspect
    from training.sampling import SAMPLERS, resolve_sampler
    name, *assignments = spec.strip().split(':')
    if name not in SAMPLERS and name not in SWEEP_ALIASES:
        raise ValueError(f'unknown sampler {name!r}; expected one of {", ".join(list(SAMPLERS) + list(SWEEP_ALIASES))}')
    name, options = SWEEP_ALIASES.get(name, (name, {}))
    options = dict(options)
    params = inspect.signature(SAMPLERS[name]).parameters
    for item in assignments:
        key, sep, value = item.partition('=')
        if not sep or key not in params:
            raise ValueError(f'{spec!r}: {item!r} is not option=value for an option of sampler {name!r}')
        try:
            options[key] = _typed_like(params[key].default, value)
        except ValueError:
            raise ValueError(f'{spec!r}: {key}={value!r} is not a number') from None
    resolve_sampler(name, options)  # TypeError for options the sampler does not take
    return spec.strip(), name, options


def _sweep_plan(specs: list[str], nfes: list[int]) -> list[dict]:
    """One entry per distinct (sampler spec, number of steps): the most steps within each requested NFE."""
    from training.sampling import count_nfe, steps_for_nfe
    plan, seen = [], set()
    for spec in specs:
        label, name, options = parse_sampler_spec(spec)
        for nfe in nfes:
            try:
                num_steps = steps_for_nfe(name, nfe, **options)
            except ValueError:
                continue  # e.g. Heun at NFE 2: not even one step fits
            if (label, num_steps) not in seen:
                seen.add((label, num_steps))
                plan.append(dict(sampler=label, name=name, options=options, nfe_requested=nfe, num_steps=num_steps,
                                 nfe=count_nfe(name, num_steps, **options)))
    return plan


def _write_sweep(outdir: str, config: dict, rows: list[dict]) -> None:
    """sweep.json (config + rows), sweep.csv and sweep.png (FID against NFE, log scale), all atomic."""
    import csv
    import json
    from torch_utils.plot import line_plot
    with dnnlib.util.atomic_write(os.path.join(outdir, 'sweep.json'), 'w') as f:
        json.dump(dict(config=config, rows=rows), f, indent=1)
    columns = ['sampler', 'nfe', 'num_steps', 'fid', 'num_images', 'seconds']
    with dnnlib.util.atomic_write(os.path.join(outdir, 'sweep.csv'), 'w') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(columns)
        for row in rows:
            writer.writerow([f'{row[c]:.4f}' if c in ('fid', 'seconds') else row[c] for c in columns])
    series = {}
    for row in rows:
        series.setdefault(row['sampler'], ([], []))
        series[row['sampler']][0].append(row['nfe'])
        series[row['sampler']][1].append(row['fid'])
    n = rows[0]['num_images'] if rows else 0
    line_plot(series, os.path.join(outdir, 'sweep.png'), title=f'FID against NFE ({os.path.basename(config["network"])}, '
              f'n = {n} images)', xlabel='NFE (network evaluations)', ylabel='FID', log_y=True)


def _previous_rows(outdir: str, config: dict) -> dict:
    """Rows of an earlier sweep into the same folder with the same configuration, by (sampler, num_steps)."""
    import json
    try:
        with open(os.path.join(outdir, 'sweep.json')) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(previous, dict) or previous.get('config') != config:
        return {}
    return {(row['sampler'], row['num_steps']): row for row in previous.get('rows', [])}


def _merged_rows(rows: list[dict], previous: dict, order: list[str]) -> list[dict]:
    """This run's points plus the earlier points of the same configuration it did not repeat, ordered by
    sampler (as listed, earlier-only ones last) and NFE: the folder accumulates one table."""
    merged = {(row['sampler'], row['num_steps']): row for row in previous.values()}
    merged.update({(row['sampler'], row['num_steps']): row for row in rows})
    rank = {name: k for k, name in enumerate(order)}
    return sorted(merged.values(), key=lambda row: (rank.get(row['sampler'], len(order)), row['sampler'], row['nfe']))


@main.command()
@click.option('--network', 'network_pkl', help='Network pickle', metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--samplers', help='Samplers, NAME[:option=value...] each (heun = edm; euler = ablation:solver=euler)',
              metavar='LIST', type=str, default=DEFAULT_SWEEP_SAMPLERS, show_default=True)
@click.option('--nfe', 'nfes', help='Numbers of network evaluations', metavar='LIST', type=str,
              default='5,7,9,13,17,25,35', show_default=True)
@click.option('--seeds', help='Seeds (the same for every point)', metavar='LIST', type=str, default='0-999',
              show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@click.option('--outdir', help='Where to write sweep.csv, sweep.json, sweep.png', metavar='DIR', type=str,
              required=True)
@generate.guidance_options
@detector_options
def sweep(network_pkl, ref_path, samplers, nfes, seeds, class_idx, max_batch_size, outdir, detector, trust_pickle,
          **guidance):
    """FID against NFE: every sampler at every NFE, images generated in memory.

    \b
    Each sampler takes the most steps whose network evaluations fit the NFE (edm/heun, dpm_2 and
    dpmpp_2s_ancestral: 2N-1; the others: N); the table reports the NFE actually used. Points already in
    OUTDIR/sweep.json from the same network, reference, seeds, detector and guidance are reused and kept,
    so an interrupted sweep continues and later runs add points to the same table.
    """
    seeds = _parse_seeds(seeds)
    try:
        nfe_list = dnnlib.util.parse_int_list(nfes)
    except ValueError as e:
        raise click.BadParameter(f'{e}; expected e.g. 5,9,17,35', param_hint='--nfe') from None
    if not nfe_list or min(nfe_list) < 1:
        raise click.BadParameter('need NFE values >= 1', param_hint='--nfe')
    guidance = generate.guidance_kwargs_from_cli(guidance)
    specs = [s for s in samplers.split(',') if s.strip()]
    try:
        plan = _sweep_plan(specs, nfe_list)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint='--samplers') from None
    if not plan:
        raise click.BadParameter('no sampler fits any of the NFE values', param_hint='--nfe')
    config = dict(network=network_pkl, ref=ref_path, seeds=_format_seeds(seeds), num_images=len(seeds),
                  class_idx=class_idx, detector=detector or DETECTOR_URL,
                  guidance={k: list(v) if isinstance(v, tuple) else v for k, v in guidance.items()})
    _start(0)
    device = dist.default_device()

    def load_all():
        os.makedirs(outdir, exist_ok=True)
        return _load_for_scoring(ref_path, detector, trust_pickle, network_pkl, guidance, device)
    ref, detector_net, network, guidance = _rank0_first(load_all)
    previous = _previous_rows(outdir, config)
    rows = []
    for k, point in enumerate(plan):
        key = (point['sampler'], point['num_steps'])
        if key in previous:
            rows.append(previous[key])
            dist.print0(f'[{k + 1}/{len(plan)}] {point["sampler"]} NFE {point["nfe"]}: FID {previous[key]["fid"]:g} '
                        f'(from the previous run)')
            continue
        start = time.time()
        batches = (images.permute(0, 3, 1, 2) for _seeds, images in
                   generate_images(network, seeds, max_batch_size=max_batch_size, class_idx=class_idx,
                                   device=device, sampler=point['name'], num_steps=point['num_steps'],
                                   **point['options'], **guidance))
        stats = compute_feature_stats(detector_net, batches, len(seeds), device=device,
                                      desc=f'{point["sampler"]} NFE {point["nfe"]}', source=network_pkl)
        if dist.get_rank() == 0:
            fid = _fid_against(stats, ref, ref_path)
            rows.append(dict(sampler=point['sampler'], nfe=point['nfe'], num_steps=point['num_steps'], fid=fid,
                             num_images=stats.num_images, seconds=time.time() - start,
                             nfe_requested=point['nfe_requested']))
            print(f'[{k + 1}/{len(plan)}] {point["sampler"]} NFE {point["nfe"]} ({point["num_steps"]} steps): '
                  f'FID {fid:g} ({stats.num_images} images, {time.time() - start:.0f} s)', flush=True)
            _write_sweep(outdir, config, _merged_rows(rows, previous, [spec.strip() for spec in specs]))
    if dist.get_rank() == 0:
        rows = _merged_rows(rows, previous, [spec.strip() for spec in specs])
        _write_sweep(outdir, config, rows)
        print(f'Wrote {os.path.join(outdir, "sweep.csv")}, sweep.json and sweep.png ({len(rows)} points)')
    dist.barrier()


#----------------------------------------------------------------------------
# Negative log-likelihood in bits per dimension (training/likelihood.py), multi-process.


@main.command()
@click.option('--network', 'network_pkl', help='Network pickle', metavar='PATH|URL', type=str, required=True)
@click.option('--data', 'dataset_path', help='Images to score', metavar='PATH|ZIP', type=str, required=True)
@click.option('--num', 'num_expected', help='Number of images (picked by --seed)  [default: all]', metavar='INT',
              type=click.IntRange(min=2))
@click.option('--seed', help='Random seed: image selection, dequantisation noise and probes', metavar='INT', type=int,
              default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@click.option('--probe', help='Trace estimator: Hutchinson probes, or the exact trace (C*H*W passes)',
              type=click.Choice(['rademacher', 'gaussian', 'exact']), default='rademacher', show_default=True)
@click.option('--rtol', help='ODE solver relative tolerance', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=1e-5, show_default=True)
@click.option('--atol', help='ODE solver absolute tolerance', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=1e-5, show_default=True)
@click.option('--sigma_min', help='Lowest noise level (the density is that of the data at this noise)', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max', help='Highest noise level (prior N(0, sigma_max^2 I))', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option('--dequantize/--no-dequantize', help='Uniform dequantisation of the 8-bit pixels (else bin centres)',
              default=True, show_default=True)
def nll(network_pkl, dataset_path, num_expected, seed, max_batch_size, probe, rtol, atol, sigma_min, sigma_max,
        dequantize):
    """Negative log-likelihood in bits/dim via the probability-flow ODE.

    \b
    Each image gets its own dequantisation noise and probe (seeded by --seed and its index), so the
    estimate is unbiased; the mean over images is printed with its standard error.
    """
    from training import likelihood
    from training.sampling import StackedRandomGenerator
    if sigma_min >= sigma_max:
        raise click.BadParameter('--sigma_min must be smaller than --sigma_max', param_hint='--sigma_min')
    _start(0)
    device = dist.default_device()

    def load_all():
        network = generate.load_net(network_pkl, device=device, verbose=dist.get_rank() == 0)
        dataset_obj = _open_dataset(dataset_path, num_expected, seed, use_labels=bool(network.label_dim))
        shape = [network.img_channels, network.img_resolution, network.img_resolution]
        if list(dataset_obj.image_shape) != shape:
            raise click.ClickException(f'{dataset_path} holds images of shape {list(dataset_obj.image_shape)} (C,H,W) '
                                       f'but the network models {shape}')
        if network.label_dim and dataset_obj.label_dim != network.label_dim:
            raise click.ClickException(f'the network is conditional on {network.label_dim} classes but '
                                       f'{dataset_path} has {"no labels" if not dataset_obj.has_labels else f"{dataset_obj.label_dim} classes"}')
        return network, dataset_obj
    network, dataset_obj = _rank0_first(load_all)
    num = len(dataset_obj)
    dist.print0(f'NLL of {num} images from "{dataset_path}" under "{network_pkl}" ({probe} probes, rtol {rtol:g}, '
                f'atol {atol:g}, sigma {sigma_min:g}..{sigma_max:g})')

    sums = torch.zeros([3], dtype=torch.float64)  # sum of bpd, of bpd^2, count
    nfe = 0
    with tqdm.tqdm(total=num, unit='img', disable=(dist.get_rank() != 0), dynamic_ncols=True) as bar:
        for indices in _rank_batches(num, max_batch_size):
            images = torch.stack([torch.as_tensor(dataset_obj[i][0]) for i in indices]).to(device)
            labels = None
            if network.label_dim:
                labels = torch.stack([torch.as_tensor(dataset_obj[i][1]) for i in indices]).to(device)
            rnd = StackedRandomGenerator(device, [seed * num + i for i in indices])
            bpd, batch_nfe = likelihood.nll_bits_per_dim(
                network, images, labels, dequantization=dequantize, rand_like=rnd.rand_like, randn_like=rnd.randn_like,
                sigma_min=sigma_min, sigma_max=sigma_max, probe=probe, rtol=rtol, atol=atol)
            sums += torch.stack([bpd.sum(), bpd.square().sum(), torch.tensor(float(len(indices)), dtype=torch.float64)]).cpu()
            nfe = max(nfe, batch_nfe)
            bar.update(len(indices) * dist.get_world_size())
    total, total_sq, count = _all_reduce(sums.to(device)).tolist()
    if dist.get_rank() == 0:
        mean = total / count
        se = math.sqrt(max(total_sq / count - mean ** 2, 0) / (count - 1)) if count > 1 else float('nan')
        print(f'NLL: {mean:.4f} +- {se:.4f} bits/dim (mean +- standard error over {int(count)} images; '
              f'at most {nfe} ODE evaluations per batch)')
        print(f'{mean:g}')
    dist.barrier()


#----------------------------------------------------------------------------
# probe: linear-probe accuracy of a network's features (training/probe.py).

def _labelled_images(path: str, what: str):
    """All images (uint8 [N,C,H,W]) and class indices of a labelled dataset."""
    dataset_obj = _open_dataset(path, None, 0, use_labels=True)
    if not dataset_obj.has_labels:
        raise click.ClickException(f'{path} has no labels ({what} needs class labels in dataset.json)')
    images = torch.stack([torch.as_tensor(dataset_obj[i][0]) for i in range(len(dataset_obj))])
    labels = torch.as_tensor(np.stack([dataset_obj.get_label(i) for i in range(len(dataset_obj))])).argmax(dim=1)
    return images, labels


@main.command()
@click.option('--network', 'network_pkl', help='Network pickle (its EMA network is probed)', metavar='PATH|URL', type=str, required=True)
@click.option('--data', 'dataset_path', help='Labelled training images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--test-data', 'test_path', help='Labelled test images  [default: --holdout of --data]', metavar='PATH|ZIP', type=str, default=None)
@click.option('--holdout', help='Fraction of --data held out for testing when there is no --test-data', metavar='FLOAT',
              type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.2, show_default=True)
@click.option('--timesteps', help='Timesteps of the 18-step schedule (1 = sigma_min, 18 = sigma_max)', metavar='LIST',
              type=str, default='4', show_default=True)
@click.option('--blocks', help='Decoder blocks out_1, out_2, ... (comma-separated) or all', metavar='LIST', type=str,
              default='all', show_default=True)
@click.option('--epochs', help='Classifier training epochs', metavar='INT', type=click.IntRange(min=1), default=15, show_default=True)
@click.option('--batch', 'batch_size', help='Batch size (features and classifier)', metavar='INT', type=click.IntRange(min=1),
              default=128, show_default=True)
@click.option('--lr', help='Classifier learning rate (Adam, cosine decay)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=1e-3, show_default=True)
@click.option('--passes', help='Training-feature passes (fresh noise and flips each; --epochs = the seed)', metavar='INT',
              type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--xflip/--no-xflip', help='Random x-flips of the training images', default=True, show_default=True)
@click.option('--seed', help='Random seed (split, noise, flips, classifier)', metavar='INT', type=int, default=0, show_default=True)
@click.option('--outdir', help='Where to write probe.csv, probe.json, probe.png', metavar='DIR', type=str, default=None)
def probe(network_pkl, dataset_path, test_path, holdout, timesteps, blocks, epochs, batch_size, lr, passes, xflip, seed,
          outdir):
    """Linear-probe accuracy of a network's decoder features at several noise levels.

    \b
    Examples:
    # The seed's grid: timesteps 3-5, every decoder block; 20% of the digits held out
    python fid.py probe --network=network-snapshot.pkl --data=datasets/digits-16x16.zip \\
        --timesteps=3-5 --outdir=probe
    \b
    # CIFAR-10 at the seed's choice (timestep 4, block out_6)
    torchrun --standalone --nproc_per_node=2 fid.py probe --network=net.pkl \\
        --data=datasets/cifar10-32x32.zip --test-data=datasets/cifar10-test-32x32.zip --blocks=out_6
    """
    from training import probe as probe_lib
    _start(0)
    device = dist.default_device()
    try:
        steps = dnnlib.util.parse_int_list(timesteps, min_value=1, max_value=18)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--timesteps')

    def load_all():
        network = generate.load_net(network_pkl, device=device, verbose=dist.get_rank() == 0)
        images, labels = _labelled_images(dataset_path, 'probe')
        if test_path is not None:
            test_images, test_labels = _labelled_images(test_path, 'probe')
        else:
            train_idx, test_idx = probe_lib.split_indices(len(images), holdout, seed)
            images, labels, test_images, test_labels = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
        shape = [network.img_channels, network.img_resolution, network.img_resolution]
        if list(images.shape[1:]) != shape or list(test_images.shape[1:]) != shape:
            raise click.ClickException(f'the images are {list(images.shape[1:])} / {list(test_images.shape[1:])} (C,H,W) '
                                       f'but the network models {shape}')
        return network, images, labels, test_images, test_labels
    network, images, labels, test_images, test_labels = _rank0_first(load_all)
    try:
        names = list(probe_lib.named_blocks(network))
    except ValueError as e:
        raise click.ClickException(str(e))
    if blocks != 'all':
        wanted = [b.strip() for b in blocks.split(',') if b.strip()]
        unknown = [b for b in wanted if b not in names]
        if unknown:
            raise click.BadParameter(f'unknown blocks {unknown}; this network has {", ".join(names)}', param_hint='--blocks')
        names = wanted
    dist.print0(f'Probing {len(steps)} timestep(s) x {len(names)} block(s) of "{network_pkl}": {len(images)} training, '
                f'{len(test_images)} test images')
    total = passes * len(images) + len(test_images)
    with tqdm.tqdm(total=total, unit='img', disable=(dist.get_rank() != 0), dynamic_ncols=True) as bar:
        results = probe_lib.linear_probe(network, images, labels, test_images, test_labels, timesteps=steps, blocks=names,
                                         epochs=epochs, batch_size=batch_size, lr=lr, passes=passes, xflip=xflip,
                                         seed=seed, progress=lambda n: bar.update(min(n, total - bar.n)), device=device)
    if dist.get_rank() == 0:
        for r in results:
            print(f't={r.timestep:2d} sigma={r.sigma:<9.4g} {r.block:>7s} ({r.module}, {r.channels} ch): '
                  f'{100 * r.accuracy:.2f}%')
        best = max(results, key=lambda r: r.accuracy)
        print(f'best: t={best.timestep} {best.block} {100 * best.accuracy:.2f}%')
        if outdir is not None:
            config = dict(network=network_pkl, data=dataset_path, test_data=test_path, holdout=None if test_path else holdout,
                          timesteps=steps, blocks=names, epochs=epochs, batch=batch_size, lr=lr, passes=passes,
                          xflip=xflip, seed=seed, world_size=dist.get_world_size())
            probe_lib.write_results(outdir, results, config)
            print(f'wrote {os.path.join(outdir, "probe.csv")}, probe.json, probe.png')
    dist.barrier()


if __name__ == '__main__':
    main()
