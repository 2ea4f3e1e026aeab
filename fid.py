"""Fréchet Inception Distance (FID), the metric the EDM paper reports, and the other metrics of `metrics/`.

FID = ||mu - mu_ref||^2 + Tr(Sigma + Sigma_ref - 2 (Sigma Sigma_ref)^(1/2))
over 2048-d pool features of the TensorFlow Inception-v3 (2015-12-05) network evaluated on uint8 images,
with the statistics accumulated in float64. Subcommands:

  python fid.py ref  --data=ZIP|DIR --dest=NPZ             reference statistics (mu, sigma [, --features]) of a dataset
  python fid.py calc --images=ZIP|DIR --ref=NPZ|URL        FID of a set of images (first --num picked by --seed)
  python fid.py net  --network=PKL --ref=NPZ|URL           the paper's protocol: FID of freshly generated
                                                           images on --repeats disjoint seed ranges, and min
  python fid.py sweep --network=PKL --ref=NPZ --outdir=DIR FID (with its interval) against NFE for several samplers
  python fid.py compare --network=A.pkl --network-b=B.pkl --ref=NPZ   paired difference of two networks / settings
  python fid.py nll  --network=PKL --data=ZIP|DIR          negative log-likelihood in bits/dim (probability-flow ODE,
                                                           or --method=vlb: an iDDPM network's variational bound)

`--metrics=fid,fid_ci,kid,pr,fd_dinov2` selects metrics (metrics/metric_specs.py); KID and precision/recall
need a reference made with `ref --features`. All run multi-process under `torchrun` (each rank a share of
the images, sums reduced across ranks).

The detector is the standard FID Inception-v3 network, downloaded once through the dnnlib download cache
(folder: $EDM_CACHE_DIR/downloads, see dnnlib.util.make_cache_dir_path). `--detector=PATH|URL` selects
another copy: a TorchScript module file, or a pickle like the official one. Pickles can execute code
when loaded, so they are first read with a restricted unpickler that only extracts an embedded TorchScript
module (the official file wraps one); running a pickle's own code needs trust: the official default URL is
trusted (as in the paper's code), anything else needs `--trust-pickle`. `--detector=dinov2[:PATH]` is
DINOv2 for FD_DINOv2 (weights supplied by the user, never downloaded).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Optional

import click
import numpy as np
import torch
import tqdm

import dnnlib
import metrics
from metrics import detectors as _detectors
from metrics import features as _features
from metrics import maths as _maths
from metrics import reference as _reference
from training.dataset import dataset_fingerprint
from training.sampling import MAX_SEED, override_sampler_kwargs, parse_sampler_spec  # noqa: F401 -- (re-exported)
from torch_utils import cli
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils.ode import SolverError

#----------------------------------------------------------------------------
# The library's functions under the names the paper's fid.py and earlier versions of this file used; errors
# as one-line click exceptions.

DETECTOR_URL = _detectors.DETECTOR_URL
TRUSTED_DETECTOR_URLS = _detectors.TRUSTED_DETECTOR_URLS
FeatureStats = _features.FeatureStats
calculate_fid_from_inception_stats = _maths.frechet_distance
load_detector = cli.one_line_errors(_detectors.load_detector)
compute_feature_stats = cli.one_line_errors(_features.compute_feature_stats)
check_image_shape = cli.one_line_errors(_features.check_image_shape)
save_reference = _reference.save_reference
load_reference = cli.one_line_errors(_reference.load_reference)
_rank_batches = _features.rank_batches
_all_reduce = _features._all_reduce  # pylint: disable=protected-access


@cli.one_line_errors
def calculate_inception_stats(image_path: str, num_expected: Optional[int] = None, seed: int = 0,
                              max_batch_size: int = 64, num_workers: int = 3, prefetch_factor: int = 2,
                              device=None, detector=None, trust_pickle: bool = False):
    """Inception mean and covariance (float64 numpy) of the images in a folder or zip.

    With `num_expected`, that many images are picked by `seed` (the dataset's max_size/random_seed
    selection, as in the paper). `detector` is a path/URL or a loaded module (default: the standard one).
    """
    device = torch.device(device) if device is not None else dist.default_device()
    source = metrics.ImageSource(image_path, num_expected, seed, max_batch_size, num_workers, prefetch_factor)
    det = _detectors.load_detector(detector, device=device, trust_pickle=trust_pickle, verbose=dist.get_rank() == 0)
    s = metrics.extract(source, det, device=device)
    return s.mu, s.sigma

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


def _device_and_detector(detector, trust_pickle, device):
    """The detector on this rank (call through _rank0_first: rank 0 fills the download cache)."""
    return metrics.load_detector(detector, device=device, trust_pickle=trust_pickle, verbose=dist.get_rank() == 0)


def _check_metrics(metric_names, ref, detector):
    """Before any image is generated: the reference holds what the metrics need (rank 0 holds the reference)."""
    metrics.check(metric_names, ref, detector)


def _metric_options(bootstrap: int = 100, confidence: float = 0.95) -> dict:
    return dict(bootstrap=bootstrap, confidence=confidence)


@click.group(cls=cli.Group)
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
    # Paired comparison with intervals: did autoguidance help? (A: guided, B: the same without)
    python fid.py compare --network=net.pkl --gnet=small.pkl --guidance=2 --b=guidance=1 \\
        --ref=fid-refs/cifar10-32x32.npz --seeds=0-9999 --metrics=fid,kid
    \b
    # Negative log-likelihood in bits/dim (probability-flow ODE; --method=vlb: iDDPM's bound)
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
@cli.metrics_option('fid')
@cli.bootstrap_options
@cli.detector_options
def calc(image_path, ref_path, num_expected, seed, batch, workers, metric_names, bootstrap, confidence, detector,
         trust_pickle):
    """Calculate FID (or --metrics) for a given set of images."""
    _start(workers)
    device = dist.default_device()
    dist.print0(f'Reference statistics: "{ref_path}"')
    ref = _rank0_first(lambda: load_reference(ref_path) if dist.get_rank() == 0 else None)
    if dist.get_rank() == 0:
        _check_metrics(metric_names, ref, detector)

    def open_source_and_detector():  # cheap dataset checks before the detector download
        source = metrics.ImageSource(image_path, num_expected, seed, batch, workers)
        return source, _device_and_detector(detector, trust_pickle, device)
    source, detector_net = _rank0_first(open_source_and_detector)
    dist.print0(f'Features of {len(source)} images in "{image_path}"')
    results = metrics.score(metric_names, source, ref, detector_net, device=device,
                            options=_metric_options(bootstrap, confidence))
    if dist.get_rank() == 0:
        print(f'{metrics.format_results(results)} ({results["num_images"]} images from "{image_path}")')
        key = [k for k in ('fid', 'fd_dinov2', 'kid', 'precision') if k in results][0]
        print(f'{key.upper() if key == "fid" else key} of {results["num_images"]} images from "{image_path}" against "{ref_path}":')
        print(f'{results[key]:g}')  # Last line: the bare number, as the paper's script prints it.
    dist.barrier()


@main.command()
@click.option('--data', 'dataset_path', help='Path to the dataset', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', type=str, required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes per rank', metavar='INT', type=click.IntRange(min=0),
              default=3, show_default=True)
@click.option('--features', 'with_features', help='Also store the features (needed by kid, pr)', is_flag=True)
@cli.detector_options
def ref(dataset_path, dest_path, batch, workers, with_features, detector, trust_pickle):
    """Calculate dataset reference statistics needed by 'calc'."""
    _start(workers)
    device = dist.default_device()

    def open_source_and_detector():
        source = metrics.ImageSource(dataset_path, None, 0, batch, workers)
        return source, _device_and_detector(detector, trust_pickle, device)
    source, detector_net = _rank0_first(open_source_and_detector)
    dist.print0(f'Features of {len(source)} images in "{dataset_path}"')
    stats = metrics.extract(source, detector_net, device=device, keep_features=with_features)
    if not dest_path.endswith('.npz'):
        dest_path += '.npz'  # What np.savez(dest_path) did in the paper's code.
    dist.print0(f'Writing reference statistics ({stats.num_images} images{", with features" if with_features else ""}) '
                f'to "{dest_path}"')
    if dist.get_rank() == 0:
        save_reference(dest_path, stats, with_features=with_features,
                       dataset_sha256=dataset_fingerprint(dataset_path)['sha256'], detector=(detector or DETECTOR_URL))
    dist.barrier()


def repeat_seeds(seeds: list[int], repeats: int) -> list[list[int]]:
    """Disjoint seed sets for repeated FID: shift by the seed range's span (its length when contiguous)."""
    span = max(seeds) - min(seeds) + 1
    return [[s + span * k for s in seeds] for k in range(repeats)]


def _format_seeds(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f'{seeds[0]}-{seeds[-1]}'
    return f'{len(seeds)} seeds from {min(seeds)} to {max(seeds)}'


def _load_for_scoring(ref_path, detector, trust_pickle, network_pkl, sampler_kwargs, device, metric_names=('fid',)):
    """What `net`, `sweep` and `compare` score with: the reference statistics (rank 0 only; checked to hold
    what the metrics need), the detector, the network, and the sampler kwargs with a --gnet guide loaded.
    Called through _rank0_first."""
    verbose = dist.get_rank() == 0
    ref = load_reference(ref_path) if verbose else None
    if verbose:
        _check_metrics(metric_names, ref, detector)
    detector_net = _device_and_detector(detector, trust_pickle, device)
    network = cli.load_net(network_pkl, device=device, verbose=verbose)
    return ref, detector_net, network, cli.load_guide(sampler_kwargs, network, device, verbose=verbose)


def _headline(results: dict) -> str:
    """The key whose value a command prints last: FID when scored, else the first metric's first number."""
    return next(k for k in ('fid', 'fd_dinov2', 'kid', 'precision') if k in results)


@main.command()
@click.option('--network', 'network_pkl', help='Network pickle', metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--seeds', help='Seeds of the first repeat, e.g. 0-49999', metavar='LIST', type=str,
              callback=cli.seeds_callback(min_count=2, example='0-49999'), default='0-49999', show_default=True)
@click.option('--repeats', help='Number of disjoint seed ranges', metavar='INT', type=click.IntRange(min=1),
              default=3, show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@cli.metrics_option('fid')
@cli.bootstrap_options
@cli.sampler_options
@cli.compile_option
@cli.detector_options
def net(network_pkl, ref_path, seeds, repeats, class_idx, max_batch_size, metric_names, bootstrap, confidence,
        compile_network, detector, trust_pickle, **sampler_kwargs):
    """FID of a network on --repeats disjoint seed ranges, images generated in memory; reports the minimum."""
    if max(repeat_seeds(seeds, repeats)[-1]) > MAX_SEED:
        raise click.BadParameter(f'the last of {repeats} repeats would need seeds above {MAX_SEED}; '
                                 f'use lower --seeds or fewer --repeats', param_hint='--seeds')
    sampler_kwargs = dict(cli.sampler_kwargs_from_cli(click.get_current_context(), sampler_kwargs),
                          compile=compile_network)
    _start(0)
    device = dist.default_device()
    dist.print0(f'Network: "{network_pkl}"')
    ref, detector_net, network, sampler_kwargs = _rank0_first(
        lambda: _load_for_scoring(ref_path, detector, trust_pickle, network_pkl, sampler_kwargs, device, metric_names))
    cli.check_class(class_idx, network)  # (every rank has the network: all stop alike)

    values = []
    for k, rep_seeds in enumerate(repeat_seeds(seeds, repeats)):
        source = metrics.NetworkSource(network, rep_seeds, max_batch_size, class_idx, name=network_pkl, **sampler_kwargs)
        results = metrics.score(metric_names, source, ref, detector_net, device=device,
                                options=_metric_options(bootstrap, confidence), desc=f'repeat {k + 1}/{repeats}')
        if dist.get_rank() == 0:
            values.append(results[_headline(results)])
            print(f'repeat {k + 1}/{repeats}: seeds {_format_seeds(rep_seeds)}: {metrics.format_results(results)} '
                  f'({results["num_images"]} images)')
    if dist.get_rank() == 0:
        label = 'FID' if _headline(results) == 'fid' else _headline(results)
        print(f'{label} of {network_pkl} against "{ref_path}": '
              f'{", ".join(f"{x:g}" for x in values)}; minimum of {repeats}:')
        print(f'{min(values):g}')
    dist.barrier()


#----------------------------------------------------------------------------
# NFE-FID sweep: FID of one network for several samplers at several numbers of network evaluations.

DEFAULT_SWEEP_SAMPLERS = 'edm,euler,euler_ancestral,dpm_2,lms,dpmpp_2s_ancestral,dpmpp_2m,dpmpp_2m_sde,dpmpp_3m_sde,unipc'


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
    values = [k for k in ('fid', 'fid_lo', 'fid_hi', 'fd_dinov2', 'kid', 'kid_std', 'precision', 'recall')
              if any(k in row for row in rows)]
    columns = ['sampler', 'nfe', 'num_steps', *values, 'num_images', 'seconds']
    with dnnlib.util.atomic_write(os.path.join(outdir, 'sweep.csv'), 'w') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(columns)
        for row in rows:
            writer.writerow([('' if row.get(c) is None else f'{row[c]:.4f}' if c in values or c == 'seconds'
                              else row[c]) for c in columns])
    series, intervals = {}, {}
    for row in rows:
        series.setdefault(row['sampler'], ([], []))
        series[row['sampler']][0].append(row['nfe'])
        series[row['sampler']][1].append(row['fid'])
        intervals.setdefault(row['sampler'], ([], []))
        intervals[row['sampler']][0].append(row.get('fid_lo', float('nan')))
        intervals[row['sampler']][1].append(row.get('fid_hi', float('nan')))
    n = rows[0]['num_images'] if rows else 0
    ci = f', {100 * config.get("confidence", 0.95):g}% intervals' if any('fid_lo' in row for row in rows) else ''
    line_plot(series, os.path.join(outdir, 'sweep.png'), title=f'FID against NFE ({os.path.basename(config["network"])}, '
              f'n = {n} images{ci})', xlabel='NFE (network evaluations)', ylabel='FID', log_y=True, intervals=intervals)


def _sweep_outdir(outdir: str) -> None:
    """Create --outdir (rank 0); one line when it is a file or cannot be created."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} is a file; pass a folder (created if missing)', param_hint='--outdir')
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f'--outdir {outdir}: cannot create it ({e.strerror or cli.first_line(e)})') from None


@contextlib.contextmanager
def _sweep_lock(outdir: str):
    """Hold OUTDIR/.sweep.lock (an advisory lock; the OS releases it when the process ends) while reading
    and rewriting sweep.json, so sweeps into one folder merge their points instead of overwriting them."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(os.path.join(outdir, '.sweep.lock'), 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _previous_rows(outdir: str, config: dict) -> dict:
    """Rows of an earlier sweep into the same folder with the same configuration, by (sampler, num_steps).
    A damaged sweep.json, or one of another configuration, is refused (its points are never overwritten)."""
    import json
    path = os.path.join(outdir, 'sweep.json')
    try:
        with open(path) as f:
            previous = json.load(f)
        if not isinstance(previous, dict) or not isinstance(previous.get('rows', []), list):
            raise ValueError('not a sweep table')
        rows = {(row['sampler'], row['num_steps']): row for row in previous.get('rows', [])}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise click.ClickException(f'{path} is damaged ({cli.first_line(e)}); move it away to start a new '
                                   f'table, or pass another --outdir') from None
    if previous.get('config') != config:
        differ = sorted(k for k in set(config) | set(previous.get('config') or {})
                        if config.get(k) != (previous.get('config') or {}).get(k))
        raise click.ClickException(f'{path} holds a sweep with another {", ".join(differ) or "configuration"}; '
                                   f'pass another --outdir (its points are kept)')
    return rows


def _merge_sweep(outdir: str, config: dict, rows: list[dict], specs: list[str]) -> list[dict]:
    """Under the folder's lock: this run's points merged into the table now on disk (which other sweeps into
    the same folder may have extended meanwhile), written back; returns the merged rows."""
    with _sweep_lock(outdir):
        merged = _merged_rows(rows, _previous_rows(outdir, config), [spec.strip() for spec in specs])
        _write_sweep(outdir, config, merged)
    return merged


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
              callback=cli.seeds_callback(min_count=2, example='0-999'), show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@click.option('--outdir', help='Where to write sweep.csv, sweep.json, sweep.png', metavar='DIR', type=str,
              required=True)
@cli.metrics_option('fid_ci', ' (fid is always scored)')
@cli.bootstrap_options
@cli.guidance_options
@cli.compile_option
@cli.detector_options
def sweep(network_pkl, ref_path, samplers, nfes, seeds, class_idx, max_batch_size, outdir, metric_names, bootstrap,
          confidence, compile_network, detector, trust_pickle, **guidance):
    """FID against NFE: every sampler at every NFE, images generated in memory.

    \b
    Each sampler takes the most steps whose network evaluations fit the NFE (edm/heun, dpm_2 and
    dpmpp_2s_ancestral: 2N-1; the others: N); the table reports the NFE actually used. Points already in
    OUTDIR/sweep.json from the same network, reference, seeds, detector and guidance are reused and kept,
    so an interrupted sweep continues and later runs add points to the same table. Sweeps running into
    one folder at once merge their points (under a lock); a damaged sweep.json, or one from another
    configuration, is refused and kept. With fid_ci (the default) every point carries its bootstrap
    interval (fid_lo, fid_hi) and the plot draws it.
    """
    if 'fid' not in metric_names and 'fid_ci' not in metric_names:
        metric_names = ['fid'] + metric_names
    try:
        nfe_list = dnnlib.util.parse_int_list(nfes)
    except ValueError as e:
        raise click.BadParameter(f'{e}; expected e.g. 5,9,17,35', param_hint='--nfe') from None
    if not nfe_list or min(nfe_list) < 1:
        raise click.BadParameter('need NFE values >= 1', param_hint='--nfe')
    guidance = cli.guidance_kwargs_from_cli(guidance)
    specs = [s for s in samplers.split(',') if s.strip()]
    try:
        plan = _sweep_plan(specs, nfe_list)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint='--samplers') from None
    if not plan:
        raise click.BadParameter('no sampler fits any of the NFE values', param_hint='--nfe')
    config = dict(network=network_pkl, ref=ref_path, seeds=_format_seeds(seeds), num_images=len(seeds),
                  class_idx=class_idx, detector=detector or DETECTOR_URL,
                  guidance={k: list(v) if isinstance(v, tuple) else v for k, v in guidance.items()},
                  metrics=metric_names, bootstrap=bootstrap, confidence=confidence)
    _start(0)
    device = dist.default_device()

    def load_all():
        if dist.get_rank() == 0:
            _sweep_outdir(outdir)
            with _sweep_lock(outdir):
                _previous_rows(outdir, config)  # refuse a damaged table or another sweep's before any work
        return _load_for_scoring(ref_path, detector, trust_pickle, network_pkl, guidance, device, metric_names)
    ref, detector_net, network, guidance = _rank0_first(load_all)
    cli.check_class(class_idx, network)
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
        source = metrics.NetworkSource(network, seeds, max_batch_size, class_idx, name=network_pkl,
                                       sampler=point['name'], num_steps=point['num_steps'], **point['options'],
                                       compile=compile_network, **guidance)
        results = metrics.score(metric_names, source, ref, detector_net, device=device,
                                options=_metric_options(bootstrap, confidence),
                                desc=f'{point["sampler"]} NFE {point["nfe"]}')
        if dist.get_rank() == 0:
            values = {k: v for k, v in results.items() if k not in ('num_images', 'seconds')}
            rows.append(dict(sampler=point['sampler'], nfe=point['nfe'], num_steps=point['num_steps'], **values,
                             num_images=results['num_images'], seconds=time.time() - start,
                             nfe_requested=point['nfe_requested']))
            print(f'[{k + 1}/{len(plan)}] {point["sampler"]} NFE {point["nfe"]} ({point["num_steps"]} steps): '
                  f'{metrics.format_results(results)} ({results["num_images"]} images, {time.time() - start:.0f} s)', flush=True)
            _merge_sweep(outdir, config, rows, specs)
    if dist.get_rank() == 0:
        rows = _merge_sweep(outdir, config, rows, specs)
        print(f'Wrote {os.path.join(outdir, "sweep.csv")}, sweep.json and sweep.png ({len(rows)} points)')
    dist.barrier()


#----------------------------------------------------------------------------
# Paired comparison: two networks, or one network under two sampler settings, on the same seeds.


def format_comparison(table: dict, confidence: float) -> list[str]:
    lines = [f'{"metric":<10} {"A":>10} {"B":>10} {"A - B":>10}  {100 * confidence:g}% interval of A - B']
    for key, row in table.items():
        if key == 'num_images':
            continue
        lines.append(f'{key:<10} {row["a"]:>10.5g} {row["b"]:>10.5g} {row["diff"]:>+10.4g}  [{row["lo"]:+.4g}, '
                     f'{row["hi"]:+.4g}]  {"significant" if row["significant"] else "not significant"}')
    return lines


@main.command()
@click.option('--network', 'network_pkl', help='Network pickle (side A)', metavar='PATH|URL', type=str, required=True)
@click.option('--network-b', 'network_b', help='Network pickle of side B  [default: --network]', metavar='PATH|URL',
              type=str)
@click.option('--b', 'b_overrides', help="Side B's sampler settings: A's with these changes, e.g. guidance=1 or "
              'sampler=dpmpp_2m:num_steps=9', metavar='KEY=VALUE[:...]', type=str, default='')
@click.option('--ref', 'ref_path', help='Dataset reference statistics', metavar='NPZ|URL', type=str, required=True)
@click.option('--seeds', help='Seeds (the same for both sides)', metavar='LIST', type=str, default='0-999',
              callback=cli.seeds_callback(min_count=2, example='0-999'), show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT',
              type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@click.option('--out', 'out_path', help='Also write the table as JSON', metavar='JSON', type=str)
@cli.metrics_option('fid')
@cli.bootstrap_options
@cli.sampler_options
@cli.detector_options
def compare(network_pkl, network_b, b_overrides, ref_path, seeds, class_idx, max_batch_size, out_path, metric_names,
            bootstrap, confidence, detector, trust_pickle, **sampler_kwargs):
    """Paired comparison: two networks, or two sampler settings, on the same seeds and reference.

    \b
    Each metric's difference A - B comes with a paired bootstrap interval over the seeds (the same
    resample for both sides, so what the seeds share cancels) and is called significant when the
    interval excludes 0. Example: did autoguidance help?
      python fid.py compare --network=net.pkl --gnet=small.pkl --guidance=2 --b=guidance=1 \\
          --ref=ref.npz --seeds=0-999 --metrics=fid,kid
    """
    sampler_kwargs = cli.sampler_kwargs_from_cli(click.get_current_context(), sampler_kwargs)
    try:
        kwargs_b = override_sampler_kwargs(sampler_kwargs, b_overrides)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint='--b') from None
    if network_b in (None, network_pkl) and kwargs_b == sampler_kwargs:
        raise click.UsageError('both sides are the same: give --network-b or --b')
    _start(0)
    device = dist.default_device()

    def load_all():
        ref, det, net_a, kw_a = _load_for_scoring(ref_path, detector, trust_pickle, network_pkl, sampler_kwargs,
                                                  device, metric_names)
        net_b = net_a if network_b in (None, network_pkl) else cli.load_net(
            network_b, device=device, verbose=dist.get_rank() == 0, option='--network-b')
        return ref, det, net_a, kw_a, net_b, cli.load_guide(kwargs_b, net_b, device, verbose=dist.get_rank() == 0)
    ref, detector_net, net_a, kw_a, net_b, kw_b = _rank0_first(load_all)
    sources = [metrics.NetworkSource(net, seeds, max_batch_size, class_idx, name=name, **kw)
               for net, kw, name in ((net_a, kw_a, network_pkl), (net_b, kw_b, network_b or network_pkl))]
    table = metrics.compare(metric_names, *sources, ref, detector_net, device=device,
                            options=_metric_options(bootstrap, confidence))
    if dist.get_rank() == 0:
        describe = lambda kw: ', '.join(f'{k}={type(v).__name__ if isinstance(v, torch.nn.Module) else v}'  # noqa: E731
                                        for k, v in kw.items())
        print(f'A: {network_pkl} ({describe(kw_a)})')
        print(f'B: {network_b or network_pkl} ({describe(kw_b)})')
        print(f'{table["num_images"]} seeds ({_format_seeds(seeds)}), reference "{ref_path}", {bootstrap} paired '
              f'bootstrap replicates')
        for line in format_comparison(table, confidence):
            print(line)
        if out_path:
            import json
            with dnnlib.util.atomic_write(out_path, 'w') as f:
                json.dump(dict(a=network_pkl, b=network_b or network_pkl, b_overrides=b_overrides,
                               seeds=_format_seeds(seeds), ref=ref_path, confidence=confidence, bootstrap=bootstrap,
                               table=table), f, indent=1)
    dist.barrier()


#----------------------------------------------------------------------------
# Negative log-likelihood in bits per dimension (training/likelihood.py, or training/iddpm.py's bound),
# multi-process.

# --method: the options each method takes (those of the others given explicitly are a usage error).
NLL_METHODS = {
    'ode': ('probe', 'rtol', 'atol', 'sigma_min', 'sigma_max', 'dequantize'),
    'vlb': (),
}


@main.command()
@click.option('--network', 'network_pkl', help='Network pickle', metavar='PATH|URL', type=str, required=True)
@click.option('--data', 'dataset_path', help='Images to score', metavar='PATH|ZIP', type=str, required=True)
@click.option('--num', 'num_expected', help='Number of images (picked by --seed)  [default: all]', metavar='INT',
              type=click.IntRange(min=2))
@click.option('--seed', help='Random seed: image selection, dequantisation noise and probes', metavar='INT', type=int,
              default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1),
              default=64, show_default=True)
@click.option('--method', help='ode: the probability-flow ODE (any network); vlb: the variational bound of an iDDPM '
              'network (M evaluations per image)', type=click.Choice(list(NLL_METHODS)), default='ode', show_default=True)
@click.option('--probe', help='Trace estimator: Hutchinson probes, or the exact trace (C*H*W passes)',
              type=click.Choice(['rademacher', 'gaussian', 'exact']), default='rademacher', show_default=True)
@click.option('--rtol', help='ODE solver relative tolerance', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True),
              default=1e-5, show_default=True)
@click.option('--atol', help='ODE solver absolute tolerance', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True),
              default=1e-5, show_default=True)
@click.option('--sigma_min', help='Lowest noise level (the density is that of the data at this noise)', metavar='FLOAT',
              type=cli.FiniteFloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max', help='Highest noise level (prior N(0, sigma_max^2 I))', metavar='FLOAT',
              type=cli.FiniteFloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option('--dequantize/--no-dequantize', help='Uniform dequantisation of the 8-bit pixels (else bin centres)',
              default=True, show_default=True)
def nll(network_pkl, dataset_path, num_expected, seed, max_batch_size, method, probe, rtol, atol, sigma_min, sigma_max,
        dequantize):
    """Negative log-likelihood in bits/dim via the probability-flow ODE, or (--method=vlb) iDDPM's bound.

    \b
    ode: each image gets its own dequantisation noise and probe (seeded by --seed and its index), so the
    estimate is unbiased. vlb: L_T + sum_t L_t on the network's discrete process (training.iddpm), one
    q-sample per step and image (seeded alike), no dequantisation (the decoder is discrete); needs an
    iDDPM network (train.py --precond=iddpm). The mean over images is printed with its standard error.
    """
    from training import iddpm, likelihood
    from training.sampling import StackedRandomGenerator
    if method != 'ode':
        ctx = click.get_current_context()
        given = [p for p in ctx.command.params if p.name in NLL_METHODS['ode']
                 and ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f'{given[0].opts[0]} is an option of --method=ode, not --method={method}')
    if sigma_min >= sigma_max:
        raise click.BadParameter('--sigma_min must be smaller than --sigma_max', param_hint='--sigma_min')
    _start(0)
    device = dist.default_device()

    def load_all():
        network = cli.load_net(network_pkl, device=device, verbose=dist.get_rank() == 0)
        dataset_obj = _features.open_dataset(dataset_path, num_expected, seed, use_labels=bool(network.label_dim))
        shape = [network.img_channels, network.img_resolution, network.img_resolution]
        if list(dataset_obj.image_shape) != shape:
            raise click.ClickException(f'{dataset_path} holds images of shape {list(dataset_obj.image_shape)} (C,H,W) '
                                       f'but the network models {shape}')
        if network.label_dim and dataset_obj.label_dim != network.label_dim:
            raise click.ClickException(f'the network is conditional on {network.label_dim} classes but '
                                       f'{dataset_path} has {"no labels" if not dataset_obj.has_labels else f"{dataset_obj.label_dim} classes"}')
        if method == 'vlb':
            try:
                iddpm.diffusion_of(network)
            except ValueError as e:
                raise click.ClickException(f'--method=vlb: {network_pkl}: {cli.first_line(e)}; use --method=ode') from None
        return network, dataset_obj
    network, dataset_obj = _rank0_first(load_all)
    num = len(dataset_obj)
    if method == 'vlb':
        dist.print0(f'NLL of {num} images from "{dataset_path}" under "{network_pkl}" (variational bound, '
                    f'{int(network.M)} steps)')
    else:
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
            try:
                if method == 'vlb':
                    bpd, batch_nfe = iddpm.vlb_bits_per_dim(network, images, labels, randn_like=rnd.randn_like)
                else:
                    bpd, batch_nfe = likelihood.nll_bits_per_dim(
                        network, images, labels, dequantization=dequantize, rand_like=rnd.rand_like,
                        randn_like=rnd.randn_like, sigma_min=sigma_min, sigma_max=sigma_max, probe=probe, rtol=rtol,
                        atol=atol)
            except SolverError as e:
                raise click.ClickException(f'--rtol/--atol: {cli.first_line(e)}') from None
            sums += torch.stack([bpd.sum(), bpd.square().sum(), torch.tensor(float(len(indices)), dtype=torch.float64)]).cpu()
            nfe = max(nfe, batch_nfe)
            bar.update(len(indices) * dist.get_world_size())
    total, total_sq, count = _all_reduce(sums.to(device)).tolist()
    if dist.get_rank() == 0:
        mean = total / count
        se = math.sqrt(max(total_sq / count - mean ** 2, 0) / (count - 1)) if count > 1 else float('nan')
        evaluations = 'ODE evaluations per batch' if method == 'ode' else 'network evaluations per image'
        print(f'NLL: {mean:.4f} +- {se:.4f} bits/dim (mean +- standard error over {int(count)} images; '
              f'at most {nfe} {evaluations})')
        print(f'{mean:g}')
    dist.barrier()


#----------------------------------------------------------------------------
# probe: linear-probe accuracy of a network's features (training/probe.py).

def _labelled_images(path: str, what: str):
    """All images (uint8 [N,C,H,W]) and class indices of a labelled dataset."""
    dataset_obj = _features.open_dataset(path, None, 0, use_labels=True)
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
              type=cli.FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=0.2, show_default=True)
@click.option('--timesteps', help='Timesteps of the 18-step schedule (1 = sigma_min, 18 = sigma_max)', metavar='LIST',
              type=str, default='4', show_default=True)
@click.option('--blocks', help='Decoder blocks out_1, out_2, ... (comma-separated) or all', metavar='LIST', type=str,
              default='all', show_default=True)
@click.option('--epochs', help='Classifier training epochs', metavar='INT', type=click.IntRange(min=1), default=15, show_default=True)
@click.option('--batch', 'batch_size', help='Batch size (features and classifier)', metavar='INT', type=click.IntRange(min=1),
              default=128, show_default=True)
@click.option('--lr', help='Classifier learning rate (Adam, cosine decay)', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True),
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
        network = cli.load_net(network_pkl, device=device, verbose=dist.get_rank() == 0)
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
