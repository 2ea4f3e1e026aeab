"""Post-hoc EMA reconstruction (EDM2: "Analyzing and Improving the Training Dynamics of Diffusion Models",
Karras et al. 2024, Sec. 3 and Appendix C): a network for any relative EMA length sigma_rel, combined from the
snapshots of the power-function EMA profiles stored during training.

Training with a power-function EMA (train.py --arch=edm2, or --ema-stds) writes, every --snap ticks, one
snapshot per tracked profile, network-snapshot-<kimg:07d>-<std:.3f>.pkl. A wanted profile (t_out, sigma_out)
is the least-squares combination theta = sum_i x_i theta_i of the stored ones (training.phema.
solve_posthoc_coefficients), applied to the parameters (training.phema.combine_snapshots); buffers come from
the last input. Outputs are snapshots in the same layout, <outprefix>-<kimg:07d>-<std:.3f>.pkl.

    # One new EMA length from a training run
    python reconstruct_phema.py --indir=training-runs/00000-... --outdir=out --outstd=0.150

    # 31 lengths, streaming over the inputs 4 times (8 outputs at a time)
    python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=out \\
        --outstd=0.010,0.015,...,0.160 --batch=8

    # Our addition: score each reconstruction with FID (in memory) -> table and plot of FID against length
    python reconstruct_phema.py --indir=training-runs/00000-... --outdir=sweep --outstd=0.02,0.04,...,0.20 \\
        --sweep --ref=fid-refs/cifar10-32x32.npz --seeds=0-9999

Differences to EDM2's script: inputs are read with the safe loader (torch_utils.persistence), outputs keep
float32 weights (EDM2 casts them to float16), and the exact training time of each input is read from the
snapshot when our training loop recorded it (EDM2 infers it from the kimg in the file name, which is exact
for its batch sizes, multiples of 1024).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import pickletools
import re
import time
from typing import Iterator, Optional, Sequence

import click
import numpy as np
import torch
import tqdm

import dnnlib
import metrics
from torch_utils import cli, misc, persistence, plot
from training import phema

# ----------------------------------------------------------------------------
# Input snapshots.

_SNAPSHOT_RE = re.compile(r'(.*)-(\d+)-(\d+\.\d+)\.pkl')


def kimg_to_nimg(kimg: int) -> int:
    """EDM2's rule for a file name's kimg: the multiple of 1024 images n with n // 1000 == kimg."""
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != kimg:
        raise ValueError(f'no multiple of 1024 images has kimg {kimg}')
    return nimg


_PICKLE_FRAMING = ('PROTO', 'FRAME', 'EMPTY_DICT', 'MARK', 'MEMOIZE', 'PUT', 'BINPUT', 'LONG_BINPUT')


def recorded_nimg(path: str, max_ops: int = 16) -> Optional[int]:
    """The exact images seen that our training loop stores as the first key ('cur_nimg') of EDM2-layout
    snapshots, read from the first pickle opcodes without loading the network; None when absent."""
    key_seen = False
    try:
        with open(path, 'rb') as f:
            for count, (op, arg, _pos) in enumerate(pickletools.genops(f)):
                if count >= max_ops:
                    return None
                if op.name in _PICKLE_FRAMING:
                    continue
                if not key_seen:  # the first key of the dict (official EDM2 pickles start with a class name)
                    if arg != 'cur_nimg':
                        return None
                    key_seen = True
                    continue
                return arg if isinstance(arg, int) and not isinstance(arg, bool) else None
    except (OSError, ValueError):
        return None
    return None


def list_input_pickles(in_dir: str, in_prefix: Optional[str] = None,
                       in_std: Optional[Sequence[float]] = None) -> list[dnnlib.EasyDict]:
    """Snapshots <prefix>-<kimg>-<std>.pkl in `in_dir` (optionally only this prefix / these stds), as
    EasyDict(path, nimg, std) sorted by (nimg, std)."""
    if not os.path.isdir(in_dir):
        raise click.ClickException(f'--indir: "{in_dir}" is not a folder')
    wanted = None if in_std is None else {round(float(s), 3) for s in in_std}
    pkls = []
    for entry in os.scandir(in_dir):
        m = _SNAPSHOT_RE.fullmatch(entry.name)
        if m is None or not entry.is_file():
            continue
        prefix, kimg, std = m.group(1), int(m.group(2)), float(m.group(3))
        if (in_prefix is not None and prefix != in_prefix) or (wanted is not None and round(std, 3) not in wanted):
            continue
        nimg = recorded_nimg(entry.path)
        if nimg is None or nimg // 1000 != kimg:
            try:
                nimg = kimg_to_nimg(kimg)
            except ValueError as e:
                raise click.ClickException(f'{entry.path}: {e}') from None
        pkls.append(dnnlib.EasyDict(path=entry.path, nimg=nimg, std=std))
    return sorted(pkls, key=lambda p: (p.nimg, p.std))


def output_path(out_dir: str, out_prefix: str, nimg: int, std: float) -> str:
    return os.path.join(out_dir, f'{out_prefix}-{nimg // 1000:07d}-{std:.3f}.pkl')

# ----------------------------------------------------------------------------
# Reconstruction.


def reconstruction_plan(in_pkls: Sequence[dnnlib.EasyDict], out_kimg: Optional[int] = None) -> tuple[list, int]:
    """(inputs to use, out_nimg): the reconstruction time is the latest input's, or that of the input whose
    kimg is `out_kimg`; inputs after it (and at time 0) are left out."""
    if out_kimg is None:
        out_nimg = max((p.nimg for p in in_pkls), default=0)
    else:
        times = sorted({p.nimg for p in in_pkls if p.nimg // 1000 == out_kimg})
        if not times:
            raise click.ClickException(f'--outkimg={out_kimg}: no input snapshot at that kimg; the reconstruction '
                                       f'time must be one of the inputs\' times')
        out_nimg = times[-1]
    used = [p for p in in_pkls if 0 < p.nimg <= out_nimg]
    if not used:
        raise click.ClickException('no input snapshots to reconstruct from (expected <prefix>-<kimg>-<std>.pkl '
                                   'files written with a power-function EMA, e.g. train.py --arch=edm2)')
    seen = {}
    for p in used:
        other = seen.setdefault((p.nimg, p.std), p.path)
        if other != p.path:
            raise click.ClickException(f'{other} and {p.path} hold the same profile at the same time; '
                                       f'choose one set with --inprefix')
    return used, out_nimg


def check_profiles(in_pkls: Sequence[dnnlib.EasyDict], out_std: Sequence[float]) -> None:
    """Snapshots of a single EMA profile can only reproduce that profile: refuse other lengths."""
    in_std = sorted({round(p.std, 3) for p in in_pkls})
    other = [s for s in out_std if round(float(s), 3) not in in_std]
    if len(in_std) == 1 and other:
        raise click.ClickException(f'the input snapshots hold one EMA profile (sigma_rel {in_std[0]:.3f}), from which '
                                   f'only that profile can be reconstructed, not {other[0]:.3f}; train with two or '
                                   f'more --ema-stds (e.g. 0.05,0.1), or pass --outstd={in_std[0]:.3f}')


def _with_network(data: dict, params: dict, nimg: int) -> dict:
    """A copy of the snapshot dict `data` whose 'ema' holds `params` (buffers and everything else as in data)."""
    out = copy.deepcopy(data)
    net = out['ema']
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(params[name].to(p.dtype))
    out.pop('cur_nimg', None)
    return dict(cur_nimg=int(nimg), **out)


def reconstruct(in_pkls: Sequence[dnnlib.EasyDict], out_std: Sequence[float], out_nimg: int,
                max_batch_size: int = 8, progress=None) -> Iterator[dnnlib.EasyDict]:
    """Yield EasyDict(std, nimg, data) for each wanted sigma_rel in `out_std` at time `out_nimg`, `data` being a
    snapshot dict whose 'ema' is the reconstruction. Outputs are made in batches of `max_batch_size`; each
    batch reads every input once (one at a time) and calls progress() after each."""
    in_nimg = [p.nimg for p in in_pkls]
    in_std = [p.std for p in in_pkls]
    out_std = sorted(set(float(s) for s in out_std))
    for batch in np.array_split(np.float64(out_std), max((len(out_std) - 1) // max_batch_size + 1, 1)):
        if len(batch) == 0:
            continue
        coefs = phema.solve_posthoc_coefficients(in_nimg, in_std, out_nimg, batch)
        last = {}

        def parameters():
            for pkl in in_pkls:
                last['data'] = cli.load_snapshot(pkl.path, option='--indir', verbose=False)[0]
                yield {name: p.detach() for name, p in last['data']['ema'].named_parameters()}
                if progress is not None:
                    progress()

        combined = phema.combine_snapshots(parameters(), coefs)
        for std, params in zip(batch, combined):
            yield dnnlib.EasyDict(std=float(std), nimg=int(out_nimg), data=_with_network(last['data'], params, out_nimg))

# ----------------------------------------------------------------------------
# Our addition: FID (and --metrics) of each reconstruction, generated in memory, scored by the metrics library.


def write_sweep_table(rows: list[dict], stem: str, meta: dict) -> list[str]:
    """The sweep as <stem>.csv, .json (rows + how they were measured), .md and a PNG plot of FID against
    sigma_rel (torch_utils.plot). Returns the paths written."""
    values = [k for k in ('fid', 'fid_lo', 'fid_hi', 'kid', 'kid_std', 'precision', 'recall', 'fd_dinov2')
              if any(k in row for row in rows)]
    columns = ['std', *values, 'num_images', 'kimg', 'network']
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in columns} for row in rows)
    best = min(rows, key=lambda row: row['fid'])
    md = [f'| sigma_rel | FID (n={rows[0]["num_images"]}) |', '|---|---|']
    interval = lambda row: f' [{row["fid_lo"]:.2f}, {row["fid_hi"]:.2f}]' if 'fid_lo' in row else ''  # noqa: E731
    md += [f'| {row["std"]:.3f} | {row["fid"]:.2f}{interval(row)}{" (best)" if row is best else ""} |' for row in rows]
    paths = []
    for ext, content in (('csv', text.getvalue()), ('json', json.dumps(dict(meta, rows=rows), indent=2) + '\n'),
                         ('md', '\n'.join(md) + '\n')):
        paths.append(f'{stem}.{ext}')
        with dnnlib.util.atomic_write(paths[-1], 'w') as f:
            f.write(content)
    paths.append(f'{stem}.png')
    intervals = {'FID': ([r.get('fid_lo', float('nan')) for r in rows], [r.get('fid_hi', float('nan')) for r in rows])}
    plot.line_plot({'FID': ([r['std'] for r in rows], [r['fid'] for r in rows])}, paths[-1], intervals=intervals,
                   xlabel='EMA length sigma_rel', ylabel=f'FID (n={rows[0]["num_images"]})',
                   title=f'Post-hoc EMA at {rows[0]["kimg"]} kimg', highlight=(best['std'], best['fid']))
    return paths

# ----------------------------------------------------------------------------
# Command line.


def _std_list(ctx, param, value):
    if value is None:
        return None
    try:
        return phema.parse_std_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _sweep_options(fn):
    """--sweep and its options: the metrics' detector, metric and interval options, and the sampler options."""
    fn = cli.detector_options(fn)
    fn = cli.bootstrap_options(fn)
    fn = cli.metrics_option('fid_ci', ' (--sweep; fid is always scored)')(fn)
    fn = cli.sampler_options(fn)
    for option in reversed([
        click.option('--sweep', help='Also score every reconstruction with FID: table + plot in --outdir', is_flag=True),
        click.option('--ref', 'ref_path', help='--sweep: dataset reference statistics', metavar='NPZ|URL', type=str),
        click.option('--seeds', help='--sweep: seeds of the generated images', metavar='LIST', callback=cli.seeds_callback(min_count=2, example='0-999'),
                     default='0-49999', show_default=True),
        click.option('--gen-batch', help='--sweep: maximum batch size when generating', metavar='INT',
                     type=click.IntRange(min=1), default=64, show_default=True),
    ]):
        fn = option(fn)
    return fn


@click.command()
@click.option('--indir', 'in_dir', help='Folder of the input snapshots', metavar='DIR', type=str, required=True)
@click.option('--inprefix', 'in_prefix', help='Only inputs with this file name prefix', metavar='STR', type=str)
@click.option('--instd', 'in_std', help='Only inputs with these EMA lengths', metavar='LIST', callback=_std_list)
@click.option('--outdir', 'out_dir', help='Where to write the reconstructed snapshots', metavar='DIR', type=str,
              required=True)
@click.option('--outprefix', 'out_prefix', help='Output file name prefix', metavar='STR', type=str, default='phema',
              show_default=True)
@click.option('--outstd', 'out_std', help='EMA lengths sigma_rel to reconstruct, e.g. 0.010,0.015,...,0.250',
              metavar='LIST', callback=_std_list, required=True)
@click.option('--outkimg', 'out_kimg', help='Training time to reconstruct  [default: latest input]', metavar='KIMG',
              type=click.IntRange(min=1))
@click.option('--skip', 'skip_existing', help='Skip outputs that already exist', is_flag=True)
@click.option('--batch', 'max_batch_size', help='Maximum simultaneous reconstructions', metavar='INT',
              type=click.IntRange(min=1), default=8, show_default=True)
@_sweep_options
def main(in_dir, in_prefix, in_std, out_dir, out_prefix, out_std, out_kimg, skip_existing, max_batch_size,
         sweep, ref_path, seeds, gen_batch, metric_names, bootstrap, confidence, detector, trust_pickle,
         **sampler_kwargs):
    """Reconstruct networks with any EMA length from the power-function EMA snapshots of a training run
    (post-hoc EMA of "Analyzing and Improving the Training Dynamics of Diffusion Models").

    \b
    # A network with EMA length 0.150 from the latest snapshots of a run
    python reconstruct_phema.py --indir=training-runs/00000-digits-cond-edm2-edm-gpus1-batch64-fp32 \\
        --outdir=out --outstd=0.150

    \b
    # Scan lengths 0.02..0.20 by FID (in memory); writes the snapshots, a table and a plot
    python reconstruct_phema.py --indir=RUN --outdir=sweep --outstd=0.02,0.04,...,0.20 \\
        --sweep --ref=fid-refs/digits-16x16.npz --seeds=0-999
    """
    if os.environ.get('WORLD_SIZE', '1') != '1':
        raise click.ClickException('reconstruct_phema.py runs in one process; start it without torchrun')
    sampler_kwargs = cli.sampler_kwargs_from_cli(click.get_current_context(), sampler_kwargs)
    if sweep and ref_path is None:
        raise click.UsageError('--sweep needs --ref (reference statistics, from `fid.py ref`)')
    in_pkls, out_nimg = reconstruction_plan(list_input_pickles(in_dir, in_prefix, in_std), out_kimg)
    check_profiles(in_pkls, out_std)
    if skip_existing and not sweep:
        out_std = [s for s in out_std if not os.path.isfile(output_path(out_dir, out_prefix, out_nimg, s))]
    print(f'Reconstructing {len(out_std)} EMA length(s) at {out_nimg} images from {len(in_pkls)} snapshots '
          f'(lengths {", ".join(f"{s:g}" for s in sorted({p.std for p in in_pkls}))}) in "{in_dir}"')
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f'--outdir {out_dir}: cannot create it ({e.strerror or e})') from None

    if 'fid' not in metric_names and 'fid_ci' not in metric_names:
        metric_names = ['fid'] + metric_names
    scorer = _make_scorer(ref_path, detector, trust_pickle, seeds, gen_batch, sampler_kwargs, metric_names,
                          dict(bootstrap=bootstrap, confidence=confidence)) if sweep else None
    rows = []
    num_batches = (len(out_std) - 1) // max_batch_size + 1 if out_std else 0
    with tqdm.tqdm(total=num_batches * len(in_pkls), unit='snapshot', dynamic_ncols=True) as bar:
        for result in reconstruct(in_pkls, out_std, out_nimg, max_batch_size, progress=lambda: bar.update(1)):
            path = output_path(out_dir, out_prefix, result.nimg, result.std)
            if not (skip_existing and os.path.isfile(path)):
                persistence.save_network_pkl(result.data, path)
            if scorer is not None:
                scores = scorer(result.data['ema'], f'sigma_rel {result.std:.3f}')
                n = scores.pop('num_images')
                scores.pop('seconds')
                rows.append(dict(std=result.std, **scores, num_images=n, kimg=result.nimg // 1000, network=path))
                interval = f' [{scores["fid_lo"]:g}, {scores["fid_hi"]:g}]' if 'fid_lo' in scores else ''
                bar.write(f'sigma_rel {result.std:.3f}: FID {scores["fid"]:g}{interval} ({n} images)')
    if scorer is not None and rows:
        stem = os.path.join(out_dir, f'{out_prefix}-{out_nimg // 1000:07d}-fid-sweep')
        contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
        meta = dict(in_dir=in_dir, in_std=sorted({p.std for p in in_pkls}), num_inputs=len(in_pkls),
                    out_nimg=out_nimg, ref=ref_path, detector=detector, metrics=metric_names, bootstrap=bootstrap,
                    confidence=confidence,
                    seeds=f'{seeds[0]}-{seeds[-1]}' if contiguous else seeds,
                    sampler={k: str(v) if isinstance(v, float) and not np.isfinite(v) else v  # JSON has no inf
                             for k, v in sampler_kwargs.items()},
                    time=time.strftime('%Y-%m-%d %H:%M:%S'))
        for path in write_sweep_table(rows, stem, meta):
            print(f'Wrote {path}')
    print('Done.')


def _make_scorer(ref_path, detector, trust_pickle, seeds, gen_batch, sampler_kwargs, metric_names, options):
    """The reference statistics and detector, loaded once; returns score(net, desc) -> metrics.score's dict."""
    misc.set_malloc_thresholds()
    device = torch.device('cpu') if not torch.cuda.is_available() else torch.device('cuda')
    ref = cli.one_line_errors(metrics.load_reference)(ref_path)
    detector_net = cli.one_line_errors(metrics.load_detector)(detector, device=device, trust_pickle=trust_pickle)
    cli.one_line_errors(metrics.check)(metric_names, ref, detector_net)  # before the first reconstruction is generated

    def score(net, desc):
        source = metrics.NetworkSource(net.eval().requires_grad_(False).to(device), seeds, gen_batch, name=desc,
                                       **sampler_kwargs)
        return cli.one_line_errors(metrics.score)(metric_names, source, ref, detector_net, device=device, options=options,
                                              desc=desc)
    return score


if __name__ == '__main__':
    main()
