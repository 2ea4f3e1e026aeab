"""Evaluation: detectors, feature extraction, reference statistics, metric maths and the table of metrics.

    import metrics
    det = metrics.load_detector('inception.pt')
    src = metrics.NetworkSource(net, seeds=range(1000), sampler='edm', num_steps=18)
    metrics.score('fid_ci,kid,pr', src, 'ref.npz', det)   # {'fid': .., 'fid_lo': .., 'kid': .., ...}

Layout (after StyleGAN2-ADA's metrics/): `maths` (pure formulas), `detectors`, `features` (extraction and
image sources), `reference` (npz files), `metric_specs` (the METRICS table), `scoring` (score, compare),
`training_hook` (metrics during training). Library code raises MetricsError; CLIs print it as one line.
"""

from metrics.detectors import DETECTOR_URL, Detector, load_detector
from metrics.errors import MetricsError
from metrics.features import FeatureStats, ImageSource, NetworkSource, compute_feature_stats, extract
from metrics.metric_specs import DEFAULT_OPTIONS, METRICS, MetricSpec, resolve_metrics
from metrics.reference import load_reference, save_reference
from metrics.scoring import check, compare, evaluate, format_results, score
