"""Reference statistics files: the paper's npz with `mu` and `sigma` (published files keep working), plus
`num_images`, `dataset_sha256`, `detector` and, when asked for, `features` [N, D] float32 (what KID and
precision/recall compare against)."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np

import dnnlib
from metrics.errors import MetricsError
from metrics.features import FeatureStats

MAKE_REFERENCE = '`python fid.py ref --data=DATASET --dest=NPZ`'


def save_reference(dest_path: str, stats: FeatureStats, with_features: bool = False, **extra) -> None:
    """Atomically write mu, sigma (the paper's layout), num_images, extra keys and optionally the features."""
    if with_features and stats.features is None:
        raise ValueError('save_reference: with_features needs FeatureStats computed with keep_features=True')
    os.makedirs(os.path.dirname(dest_path) or '.', exist_ok=True)
    if with_features:
        extra = dict(extra, features=stats.features)
    with dnnlib.util.atomic_write(dest_path) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=np.int64(stats.num_images),
                 **{k: np.asarray(v) for k, v in extra.items()})


def load_reference(ref_path: str, verbose: bool = True) -> dict:
    """Load reference statistics (.npz path or URL) and check that mu, sigma (and features) fit together."""
    try:
        with dnnlib.util.open_url(ref_path, verbose=verbose) as f:
            data = f.read()
        if not data.startswith(b'PK'):  # np.load would take anything else for a pickle and say so
            raise MetricsError(f'{ref_path} is not a .npz file of reference statistics (it is '
                               f'{"empty" if not data else "not a zip archive"}); make one with {MAKE_REFERENCE}')
        ref = dict(np.load(io.BytesIO(data), allow_pickle=False))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, MetricsError):
            raise
        raise MetricsError(f'Could not load reference statistics from {ref_path}: {e}') from e
    if 'mu' not in ref or 'sigma' not in ref:
        raise MetricsError(f'{ref_path} has keys {sorted(ref)}; reference statistics need "mu" and '
                           f'"sigma" (make them with `python fid.py ref`)')
    mu, sigma = ref['mu'], ref['sigma']
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise MetricsError(f'{ref_path}: mu {mu.shape} and sigma {sigma.shape} do not fit together')
    for key in ('mu', 'sigma'):
        if not np.issubdtype(ref[key].dtype, np.number) or not np.isfinite(ref[key]).all():
            raise MetricsError(f'{ref_path}: "{key}" holds NaN/Inf or non-numbers; the reference is damaged, '
                               f'make it again with `python fid.py ref`')
    if 'features' in ref and (ref['features'].ndim != 2 or ref['features'].shape[1] != mu.shape[0]):
        raise MetricsError(f'{ref_path}: features {ref["features"].shape} do not fit mu {mu.shape}')
    ref['path'] = ref_path
    return ref


def check_dimension(stats: FeatureStats, ref: dict) -> None:
    if stats.mu.shape != ref['mu'].shape:
        raise MetricsError(f'The detector gives {stats.mu.shape[0]} features but {ref.get("path", "the reference")} '
                           f'has {ref["mu"].shape[0]}: the reference was made with another detector')
