"""Command-line option groups of the evaluation tools (fid.py, compress.py, reconstruct_phema.py, train.py), so
the options read the same everywhere and no CLI imports another; and the one-line error boundary."""

from __future__ import annotations

import functools

import click

from metrics.errors import MetricsError
from metrics.metric_specs import METRICS, resolve_metrics

_detector_options = [
    click.option('--detector', help='Feature detector: TorchScript file or pickle (Inception), or dinov2[:PATH]  '
                 '[default: standard Inception-v3 URL]', metavar='PATH|URL', type=str, default=None),
    click.option('--trust-pickle', help='Allow a --detector pickle to run its embedded code (trusted files only)',
                 is_flag=True),
]


def detector_options(fn):
    for option in reversed(_detector_options):
        fn = option(fn)
    return fn


def metric_list(ctx, param, value):
    """Click callback: 'fid,kid' -> the validated list of names (None stays None)."""
    if value is None:
        return None
    try:
        return [spec.name for spec in resolve_metrics(value)]
    except MetricsError as e:
        raise click.BadParameter(str(e)) from None


def metrics_option(default: str = 'fid', help_extra: str = ''):
    return click.option('--metrics', 'metric_names', help=f'Metrics: {", ".join(METRICS)}{help_extra}',
                        metavar='LIST', type=str, default=default, show_default=True, callback=metric_list)


def bootstrap_options(fn):
    for option in reversed([
        click.option('--bootstrap', help='Bootstrap replicates for intervals', metavar='INT',
                     type=click.IntRange(min=2), default=100, show_default=True),
        click.option('--confidence', help='Confidence level of intervals', metavar='FLOAT',
                     type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.95, show_default=True),
    ]):
        fn = option(fn)
    return fn


def one_line_errors(fn):
    """A library function whose MetricsError becomes a click.ClickException (one line, no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetricsError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


class Group(click.Group):
    """A click group whose subcommands report MetricsError as one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MetricsError as e:
            raise click.ClickException(str(e)) from None
