"""The metric formulas as small pure functions of feature arrays (numpy / torch, float64).

- `frechet_distance`: FID (Heusel et al. 2017) between N(mu, sigma) and N(mu_ref, sigma_ref); the exact
  float64/scipy path of the paper's fid.py, so numbers stay bit-identical.
- `kid_subset_terms`, `kid_subset_indices`, `kid`: KID (Bińkowski et al. 2018), the unbiased MMD^2 with the
  cubic polynomial kernel k(x, y) = (x^T y / d + 1)^3 averaged over random subsets, as StyleGAN2-ADA.
- `manifold_radii`, `inside_manifold`, `precision_recall`: improved precision and recall (Kynkäänniemi et
  al. 2019), k-nearest-neighbour balls in feature space (k = 3).
- `bootstrap_weights`, `ResampledFrechet`, `basic_interval`: the bootstrap behind FID's confidence interval
  and the paired comparison (see `basic_interval` for why the basic, not the percentile, interval).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.linalg
import torch

#----------------------------------------------------------------------------
# Fréchet distance (FID).


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal matrix square root, real part.

    The paper called sqrtm(..., disp=False), which returned (root, error_estimate); SciPy deprecated and
    then removed `disp`, and current versions return the root alone. Accept either return signature.
    """
    root = scipy.linalg.sqrtm(a)
    if isinstance(root, tuple):
        root = root[0]
    return np.real(root)


def frechet_distance(mu, sigma, mu_ref, sigma_ref) -> float:
    """||mu - mu_ref||^2 + Tr(sigma + sigma_ref - 2 (sigma sigma_ref)^(1/2)), in float64 (Heusel et al. 2017)."""
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


def mean_and_covariance(feature_sum: torch.Tensor, outer_sum: torch.Tensor, n: int):
    """Sample mean and unbiased covariance from running sums (float64):
    cov = (sum f f^T - n mean mean^T) / (n - 1)."""
    mean = feature_sum / n
    cov = (outer_sum - torch.outer(mean, mean) * n) / (n - 1)
    return mean, cov


class ResampledFrechet:
    """The Fréchet distance of resamples of one feature set [n, d] against one reference, for bootstraps:
    `fd(weights)` with weights[i] copies of row i. Agrees with `frechet_distance` of the resample's mean and
    unbiased covariance to rounding (used for replicates, never for the reported value).

    Tr (sigma sigma_ref)^(1/2) is the sum of the square roots of the eigenvalues of S sigma S (S = sigma_ref^(1/2)),
    a symmetric d x d matrix. With sigma = C^T W C / (n - 1) (C the rows centred on the resample's mean,
    W = diag(weights)), S sigma S = A^T A for A = W^(1/2) C S / (n - 1)^(1/2), whose non-zero eigenvalues are
    those of the n x n matrix A A^T = W^(1/2) C sigma_ref C^T W^(1/2) / (n - 1): when n < d (1,000 images
    of 2048-d Inception features) each replicate is an n x n, not a d x d, eigenproblem."""

    def __init__(self, features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.f = np.asarray(features, np.float64)
        self.mu_ref, self.sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
        self.trace_ref = float(np.trace(self.sigma_ref))
        n, d = self.f.shape
        self.sq_norms = np.square(self.f).sum(1)
        if n < d:
            self.f_sigma = self.f @ self.sigma_ref           # [n, d]
            self.gram = self.f_sigma @ self.f.T               # F sigma_ref F^T [n, n]
        else:
            w, v = np.linalg.eigh(self.sigma_ref)
            self.sqrt_ref = (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    def __call__(self, weights: np.ndarray) -> float:
        w = np.asarray(weights, np.float64)
        n = w.sum()
        mu = w @ self.f / n
        trace = (w @ self.sq_norms - n * mu @ mu) / (n - 1)
        if hasattr(self, 'gram'):
            keep = w > 0
            v = self.f_sigma[keep] @ mu
            g = self.gram[np.ix_(keep, keep)] - v[:, None] - v[None, :] + mu @ self.sigma_ref @ mu
            r = np.sqrt(w[keep])
            m = g * r[:, None] * r[None, :] / (n - 1)
        else:
            centred = self.f - mu
            sigma = (centred * w[:, None]).T @ centred / (n - 1)
            m = self.sqrt_ref @ sigma @ self.sqrt_ref
        eig = np.linalg.eigvalsh((m + m.T) / 2)
        return float(np.square(mu - self.mu_ref).sum() + trace + self.trace_ref - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


#----------------------------------------------------------------------------
# Kernel Inception Distance (KID).


def kid_subset_indices(n_gen: int, n_real: int, num_subsets: int, subset_size: int,
                       rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """[num_subsets, m] indices into gen and real, m = min(n_gen, n_real, subset_size), drawn without
    replacement per subset, gen first then real (StyleGAN2-ADA's order of np.random.choice calls)."""
    m = min(n_gen, n_real, subset_size)
    idx_gen, idx_real = [], []
    for _ in range(num_subsets):
        idx_gen.append(rng.choice(n_gen, m, replace=False))
        idx_real.append(rng.choice(n_real, m, replace=False))
    return np.stack(idx_gen), np.stack(idx_real)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of equal-size samples x, y [m, d] with k(u, v) = (u^T v / d + 1)^3:
    (sum_{i != j} k(x_i, x_j) + k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2."""
    m, d = x.shape
    a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
    b = (x @ y.T / d + 1) ** 3
    return float(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)


def kid_subset_terms(gen: np.ndarray, real: np.ndarray, idx_gen: np.ndarray, idx_real: np.ndarray) -> np.ndarray:
    """MMD^2 of each subset (row of the index arrays); their mean is the KID."""
    return np.array([mmd2_unbiased(gen[ig], real[ir]) for ig, ir in zip(idx_gen, idx_real)])


def kid(gen, real, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(KID, standard deviation over subsets), float64; subsets drawn by np.random.RandomState(seed)."""
    gen, real = np.asarray(gen, np.float64), np.asarray(real, np.float64)
    if gen.ndim != 2 or real.ndim != 2 or gen.shape[1] != real.shape[1]:
        raise ValueError(f'KID needs features [N, D] of one dimension, got {gen.shape} and {real.shape}')
    if min(len(gen), len(real), max_subset_size) < 2:
        raise ValueError('KID needs subsets of at least 2 images')
    idx = kid_subset_indices(len(gen), len(real), num_subsets, max_subset_size, np.random.RandomState(seed))
    terms = kid_subset_terms(gen, real, *idx)
    return float(terms.mean()), float(terms.std(ddof=1)) if len(terms) > 1 else 0.0

#----------------------------------------------------------------------------
# Precision and recall (k-nearest-neighbour manifolds).


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)


def manifold_radii(features: torch.Tensor, k: int = 3, row_batch: int = 1024) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point (the (k+1)-th counting itself)."""
    radii = [_distances(features[i:i + row_batch], features).kthvalue(k + 1, dim=1).values
             for i in range(0, len(features), row_batch)]
    return torch.cat(radii)


def inside_manifold(probes: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor,
                    row_batch: int = 1024) -> torch.Tensor:
    """Per probe: is it within radii[j] of some manifold point j (bool [N_probes])?"""
    return torch.cat([(_distances(probes[i:i + row_batch], manifold) <= radii.unsqueeze(0)).any(dim=1)
                      for i in range(0, len(probes), row_batch)])


def precision_recall(gen, real, k: int = 3) -> tuple[float, float]:
    """precision = share of gen inside the real manifold, recall = share of real inside the gen manifold
    (Kynkäänniemi et al. 2019), in float64."""
    gen, real = torch.as_tensor(np.asarray(gen), dtype=torch.float64), torch.as_tensor(np.asarray(real), dtype=torch.float64)
    if min(len(gen), len(real)) <= k:
        raise ValueError(f'precision/recall with k = {k} needs more than {k} images on each side')
    precision = inside_manifold(gen, real, manifold_radii(real, k)).double().mean()
    recall = inside_manifold(real, gen, manifold_radii(gen, k)).double().mean()
    return float(precision), float(recall)

#----------------------------------------------------------------------------
# Bootstrap.


def bootstrap_weights(n: int, num: int, rng: np.random.Generator) -> np.ndarray:
    """[num, n] resample counts: each row draws n of n items with replacement."""
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(num)])


def basic_interval(estimate: float, replicates, confidence: float = 0.95) -> tuple[float, float]:
    """The basic (reverse-percentile) bootstrap interval [2 t - q_hi, 2 t - q_lo].

    Why not the percentile interval [q_lo, q_hi]: FID (and KID on a resample with duplicates, and recall) is
    biased at finite n, and a resample of n images with duplicates is biased further in the same direction.
    The replicates then sit around t + bias, and reflecting them about t subtracts that bias once, so the
    interval centres on the population value instead of on a value shifted twice."""
    reps = np.asarray(replicates, np.float64)
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2:
        return float('nan'), float('nan')
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return float(2 * estimate - hi), float(2 * estimate - lo)
