"""Score an image source on a list of metrics (`score`), and two sources on the same seeds (`compare`)."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from metrics import maths
from metrics.errors import MetricsError
from metrics.features import FeatureStats, extract
from metrics.metric_specs import DEFAULT_OPTIONS, Context, check_requirements, resolve_metrics
from metrics.reference import check_dimension, load_reference
from torch_utils import distributed as dist


def _options(options: Optional[dict]) -> dict:
    merged = dict(DEFAULT_OPTIONS, **(options or {}))
    unknown = set(merged) - set(DEFAULT_OPTIONS)
    if unknown:
        raise MetricsError(f'unknown metric options {sorted(unknown)}; expected {sorted(DEFAULT_OPTIONS)}')
    if not 0 < merged['confidence'] < 1:
        raise MetricsError(f'confidence must lie in (0, 1), got {merged["confidence"]}')
    return merged


def check(metrics, ref: Optional[dict], detector) -> list:
    """The metric specs of `metrics`, after checking that the reference holds what they need and the detector
    (a Detector or a --detector spec) fits them: call before generating any image."""
    from metrics.detectors import Detector, detector_name
    specs = resolve_metrics(metrics)
    kind = detector.name if isinstance(detector, Detector) else detector_name(detector)
    check_requirements(specs, ref, kind)
    return specs


def evaluate(specs, stats: FeatureStats, ref: dict, options: Optional[dict] = None) -> dict:
    """Every spec's numbers for features already extracted (pure apart from the bootstrap's seeded RNG)."""
    check_dimension(stats, ref)
    ctx = Context(stats, ref, _options(options))
    results = {}
    for spec in specs:
        results.update(spec.compute(ctx))
    return results


def _prepare(metrics, options, ref, detector):
    """score's and compare's prelude: the metric specs, the options, the loaded reference (from its path) and
    detector, checked against each other before any image is made."""
    from metrics.detectors import load_detector
    specs = resolve_metrics(metrics)
    options = _options(options)
    if isinstance(ref, str):
        ref = load_reference(ref, verbose=dist.get_rank() == 0)
    detector = load_detector(detector) if detector is None or isinstance(detector, torch.nn.Module) else detector
    check_requirements(specs, ref, getattr(detector, 'name', 'inception'))
    return specs, options, ref, detector


def score(metrics, source, ref, detector, device=torch.device('cpu'), options: Optional[dict] = None,
          desc: str = 'features', progress: bool = True) -> Optional[dict]:
    """Score an image source on a list of metrics; returns {metric key: value, 'num_images', 'seconds'} on rank 0
    (None on the other ranks, which only help extracting features).

    `metrics`: names of metric_specs.METRICS ('fid,kid' or a list). `source`: an ImageSource, a NetworkSource
    or FeatureStats already extracted. `ref`: a loaded reference dict or its path; other ranks may pass None.
    `detector`: a loaded metrics.detectors.Detector (or a detector module). `options`: see DEFAULT_OPTIONS.
    """
    start = time.time()
    specs, options, ref, detector = _prepare(metrics, options, ref, detector)
    keep = any(spec.needs_gen_features for spec in specs)
    stats = source if isinstance(source, FeatureStats) else extract(source, detector, device=device, keep_features=keep,
                                                                     desc=desc, progress=progress)
    if dist.get_rank() != 0:
        return None
    results = evaluate(specs, stats, ref, options)
    results.update(num_images=stats.num_images, seconds=time.time() - start)
    return results


def compare(metrics, source_a, source_b, ref, detector, device=torch.device('cpu'), options: Optional[dict] = None,
            progress: bool = True) -> Optional[dict]:
    """Paired comparison of two sources on the same keys (seeds): for each metric key,
    {a, b, diff = a - b, lo, hi (the basic bootstrap interval of diff), significant (0 outside [lo, hi])}.

    The bootstrap resamples seeds, the same resample for both sources: seed-to-seed variation shared by the two
    (the latent noise, the class labels) cancels in the difference, which is why a paired interval is much
    narrower than two separate intervals. The reference is held fixed. Rank 0 gets the table, others None."""
    specs, options, ref, detector = _prepare(metrics, options, ref, detector)
    stats = [s if isinstance(s, FeatureStats) else extract(s, detector, device=device, keep_features=True,
                                                           desc=f'features {name}', progress=progress)
             for s, name in ((source_a, 'A'), (source_b, 'B'))]
    if dist.get_rank() != 0:
        return None
    if stats[0].keys is not None and stats[1].keys is not None and not np.array_equal(stats[0].keys, stats[1].keys):
        raise MetricsError('a paired comparison needs both sides scored on the same seeds')
    contexts = []
    for s in stats:
        check_dimension(s, ref)
        contexts.append(Context(s, ref, options))
    point = [{}, {}]
    for spec in specs:
        for k, ctx in enumerate(contexts):
            point[k].update(spec.compute(ctx))
    rng = np.random.default_rng(options['seed'])
    replicates = {}
    for weights in maths.bootstrap_weights(stats[0].num_images, options['bootstrap'], rng):
        for spec in specs:
            if spec.replicate is None:
                continue
            a, b = (spec.replicate(ctx, weights) for ctx in contexts)
            for key in a:
                replicates.setdefault(key, []).append(a[key] - b[key])
    table = {}
    for key, diffs in replicates.items():
        diff = point[0][key] - point[1][key]
        lo, hi = maths.basic_interval(diff, diffs, options['confidence'])
        table[key] = dict(a=point[0][key], b=point[1][key], diff=diff, lo=lo, hi=hi, significant=bool(not lo <= 0 <= hi))
    table['num_images'] = stats[0].num_images
    return table


def format_results(results: dict) -> str:
    """'FID 12.3 [11.8, 12.9]; KID 0.0123 +- 0.0004; precision 0.712; recall 0.520' for a score() result."""
    parts = []
    for key, label in (('fid', 'FID'), ('fd_dinov2', 'FD_DINOv2'), ('kid', 'KID'), ('precision', 'precision'),
                       ('recall', 'recall')):
        if key not in results:
            continue
        text = f'{label} {results[key]:.6g}'
        if f'{key}_lo' in results:
            text += f' [{results[key + "_lo"]:.6g}, {results[key + "_hi"]:.6g}]'
        if f'{key}_std' in results:
            text += f' +- {results[key + "_std"]:.3g}'
        parts.append(text)
    return '; '.join(parts)
