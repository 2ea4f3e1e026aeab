"""The table of metrics: one `MetricSpec` per name. Adding a metric is adding an entry to `METRICS`.

A spec says what it needs (the generated images' features, the reference's features, a detector kind) and
gives two functions of a `Context` (generated FeatureStats, reference dict, options, a cache):
`compute(ctx) -> {key: value}` the reported numbers, and optionally `replicate(ctx, weights) -> {key: value}`
the same numbers on a bootstrap resample of the generated images given as counts per image (used for
confidence intervals and by the paired comparison).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from metrics import maths
from metrics.errors import MetricsError
from metrics.reference import MAKE_REFERENCE


@dataclasses.dataclass
class Context:
    gen: object            # FeatureStats of the generated (or scored) images
    ref: dict              # reference: mu, sigma [, features]
    options: dict          # see DEFAULT_OPTIONS
    cache: dict = dataclasses.field(default_factory=dict)

    def resampled_fd(self) -> maths.ResampledFrechet:
        """The Fréchet distance of bootstrap resamples of these generated features, set up once."""
        if 'resampled_fd' not in self.cache:
            self.cache['resampled_fd'] = maths.ResampledFrechet(self.gen.features, self.ref['mu'], self.ref['sigma'])
        return self.cache['resampled_fd']


DEFAULT_OPTIONS = dict(
    bootstrap=100,          # bootstrap replicates (FID interval, paired comparison)
    confidence=0.95,        # level of every interval
    kid_subsets=100,        # KID: number of subsets ...
    kid_subset_size=1000,   # ... and their size (StyleGAN2-ADA's defaults)
    kid_replicate_subsets=10,  # KID subsets per bootstrap replicate
    pr_k=3,                 # precision/recall: k-th nearest neighbour (Kynkäänniemi et al. 2019)
    seed=0,                 # KID subsets and bootstrap resamples
)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    description: str
    compute: Callable[[Context], dict]
    replicate: Optional[Callable[[Context, np.ndarray], dict]] = None
    needs_gen_features: bool = False
    needs_ref_features: bool = False
    detector: Optional[str] = None  # 'inception' / 'dinov2': the detector kind it is defined with


def _expanded(ctx: Context, weights: np.ndarray) -> np.ndarray:
    return ctx.gen.features[np.repeat(np.arange(len(weights)), weights)]


def _fd(ctx: Context) -> float:
    return maths.frechet_distance(ctx.gen.mu, ctx.gen.sigma, ctx.ref['mu'], ctx.ref['sigma'])


def _fd_replicate(ctx: Context, weights: np.ndarray) -> float:
    return ctx.resampled_fd()(weights)


def bootstrap_replicates(ctx: Context, replicate: Callable, num: int, seed: int) -> dict:
    """{key: [num values]} of `replicate` on `num` resamples of the generated images."""
    rng = np.random.default_rng(seed)
    out = {}
    for weights in maths.bootstrap_weights(ctx.gen.num_images, num, rng):
        for key, value in replicate(ctx, weights).items():
            out.setdefault(key, []).append(value)
    return out


def _fid_ci(ctx: Context) -> dict:
    fid = _fd(ctx)
    reps = bootstrap_replicates(ctx, lambda c, w: dict(fid=_fd_replicate(c, w)), ctx.options['bootstrap'],
                                ctx.options['seed'])
    lo, hi = maths.basic_interval(fid, reps['fid'], ctx.options['confidence'])
    return dict(fid=fid, fid_lo=max(lo, 0.0), fid_hi=hi)  # a Fréchet distance is never negative


def _kid(ctx: Context) -> dict:
    o = ctx.options
    mean, std = maths.kid(ctx.gen.features, ctx.ref['features'], o['kid_subsets'], o['kid_subset_size'], o['seed'])
    return dict(kid=mean, kid_std=std)


def _kid_replicate(ctx: Context, weights: np.ndarray) -> dict:
    o = ctx.options
    # Subsets seeded by the resample itself: the two sides of a paired comparison draw the same subsets.
    head = weights[:64]
    subset_seed = (o["seed"] + int(np.dot(head, np.arange(1, len(head) + 1)))) % 2**32
    return dict(kid=maths.kid(_expanded(ctx, weights), ctx.ref['features'], o['kid_replicate_subsets'],
                              o['kid_subset_size'], subset_seed)[0])


def _pr(ctx: Context, gen=None) -> dict:
    precision, recall = maths.precision_recall(ctx.gen.features if gen is None else gen, ctx.ref['features'],
                                               ctx.options['pr_k'])
    return dict(precision=precision, recall=recall)


METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in [
    MetricSpec('fid', 'Fréchet Inception Distance (the paper\'s number)',
               compute=lambda ctx: dict(fid=_fd(ctx)), replicate=lambda ctx, w: dict(fid=_fd_replicate(ctx, w))),
    MetricSpec('fid_ci', 'FID with a bootstrap confidence interval over the generated images (fid_lo, fid_hi)',
               compute=_fid_ci, replicate=lambda ctx, w: dict(fid=_fd_replicate(ctx, w)), needs_gen_features=True),
    MetricSpec('kid', 'Kernel Inception Distance, mean and std over subsets (kid, kid_std)',
               compute=_kid, replicate=_kid_replicate, needs_gen_features=True, needs_ref_features=True),
    MetricSpec('pr', 'Precision and recall, k-NN manifolds (precision, recall)',
               compute=_pr, replicate=lambda ctx, w: _pr(ctx, _expanded(ctx, w)), needs_gen_features=True,
               needs_ref_features=True),
    MetricSpec('fd_dinov2', 'Fréchet distance in DINOv2 feature space (EDM2); needs --detector=dinov2[:PATH]',
               compute=lambda ctx: dict(fd_dinov2=_fd(ctx)),
               replicate=lambda ctx, w: dict(fd_dinov2=_fd_replicate(ctx, w)), detector='dinov2'),
]}


def resolve_metrics(names) -> list[MetricSpec]:
    """'fid,kid' or ['fid', 'kid'] -> specs; unknown or empty lists are a one-line error."""
    if isinstance(names, str):
        names = names.split(',')
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise MetricsError(f'unknown metric {", ".join(unknown) or "(none given)"}; expected a list of '
                           f'{", ".join(METRICS)}')
    return [METRICS[n] for n in dict.fromkeys(names)]


def check_requirements(specs: list[MetricSpec], ref: Optional[dict], detector_kind: str) -> None:
    """Before any image is generated: the reference has what each metric needs, the detector fits."""
    for spec in specs:
        if spec.detector is not None and spec.detector != detector_kind:
            raise MetricsError(f'{spec.name} is defined with the {spec.detector} detector; pass '
                               f'--detector={spec.detector}[:PATH] (and a reference made with it)')
        if spec.detector is None and detector_kind == 'dinov2' and spec.name in ('fid', 'fid_ci'):
            raise MetricsError(f'{spec.name} needs the Inception detector; use fd_dinov2 with a DINOv2 detector')
        if ref is not None and spec.needs_ref_features and 'features' not in ref:
            raise MetricsError(f'{spec.name} needs the reference features, but {ref.get("path", "the reference")} '
                               f'holds only mu/sigma; remake it with {MAKE_REFERENCE[:-1]} --features`')
    if ref is not None and 'detector' in ref and str(ref['detector']) and detector_kind == 'dinov2' \
            and 'dinov2' not in str(ref['detector']):
        raise MetricsError(f'{ref.get("path", "the reference")} was made with {ref["detector"]}, not DINOv2')
