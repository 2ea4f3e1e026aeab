"""Compress a trained network and measure what it costs: size on disk, CPU speed and FID.

    python compress.py prune    --network=net.pkl --dest=net-l1-50.pkl --amount=0.5 --method=l1 --scope=global
    python compress.py quantize --network=net.pkl --dest=net-int8.pkl --dtype=int8
    python compress.py report   --network=net.pkl --network=net-l1-50.pkl --network=net-int8.pkl \\
                                --data=datasets/digits-16x16.zip --num=1000 --out=compress-out/report

`prune` and `quantize` read any network snapshot this project loads (a path or URL; the safe loader, no
embedded code runs) and write a snapshot in the same layout -- the dict with 'ema', 'loss_fn',
'augment_pipe', 'dataset_kwargs' -- so generate.py and fid.py use it unchanged. Only the 'ema' network is
compressed; int8 snapshots are for inference (their tensor names differ, so `train.py --transfer` refuses
one: start from the float snapshot). The snapshot also gets a 'compression' entry: a list of the steps applied
so far (oldest first), each a dict of plain values, e.g.
    {'method': 'prune', 'criterion': 'l1', 'scope': 'global', 'region': 'all', 'amount': 0.5, 'seed': 0,
     'source': 'net.pkl', 'sparsity': 0.5}
    {'method': 'quantize', 'dtype': 'int8', 'source': 'net-l1-50.pkl', 'layers': 151}

What is stored (training/compression.py has the formulas):
- prune: float32 weights with zeros, same classes; the raw file is as large as before, the zip-compressed one
  smaller.
- fp16 / bf16: every parameter stored in that dtype in the same classes (buffers stay float32). The layers
  cast weights to the activation dtype on use, so the network computes in float32 (or bfloat16 with
  `generate.py --bf16`).
- int8: conv/linear weights as int8 with one float32 scale per output channel (symmetric: scale = max|w|/127),
  other parameters float32, inside a `training.compression.Int8Network` wrapper that the safe loader
  rebuilds like our other classes. Weights are dequantised to float32 once, in memory, when first used;
  the file is ~4x smaller, compute is float32. `report --int8-dynamic` additionally runs the Linear layers
  of int8 networks with torch.ao dynamic int8 kernels (CPU).

Everything runs in one process on the CPU.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import re
import statistics
import time
import zipfile

import click
import torch
import tqdm

import dnnlib
import metrics
from torch_utils import cli, persistence, plot
from training import compression, sampling

REGION_HELP = ('all = every conv/linear weight; middle = encoder and decoder layers at the lowest resolution incl. '
               'the bottleneck; ends = encoder and decoder layers at the highest resolution incl. the input and '
               'output convs')

#----------------------------------------------------------------------------
# Snapshots in and out.


def save_snapshot(data: dict, dest: str, step: dict) -> None:
    """Append `step` to the snapshot's 'compression' list and write it atomically (the paper's pickle layout)."""
    data = dict(data)
    data['compression'] = list(data.get('compression') or []) + [step]
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(folder, exist_ok=True)
        persistence.save_network_pkl(data, dest)
    except OSError as e:
        raise click.ClickException(f'--dest {dest}: cannot write it ({e.strerror or cli.first_line(e)})') from None


def describe(steps) -> str:
    """One line for a snapshot's 'compression' list, e.g. 'prune l1 global all 50% + int8'."""
    parts = []
    for s in steps or []:
        if s.get('method') == 'prune':
            parts.append(f'prune {s.get("criterion")} {s.get("scope")} {s.get("region")} {100 * s.get("amount", 0):g}%')
        elif s.get('method') == 'quantize':
            parts.append(str(s.get('dtype')))
        elif s.get('method') == 'qat':
            parts.append(f'QAT int{s.get("bits")} {s.get("kimg"):g} kimg' + (' adam8bit' if s.get('optim') == 'adam8bit' else ''))
        else:
            parts.append(str(s.get('method')))
    return ' + '.join(parts) or 'none'


def print_sparsity(rows: list[dict]) -> None:
    print(f'{"region":<10} {"pruned":>6} {"tensors":>8} {"params":>12} {"zeros":>12} {"sparsity":>9}')
    for r in rows:
        pruned = '' if r['selected'] is None else ('yes' if r['selected'] else 'no')
        print(f'{r["region"]:<10} {pruned:>6} {r["tensors"]:>8} {r["params"]:>12,} {r["zeros"]:>12,} '
              f'{100 * r["sparsity"]:>8.2f}%')

#----------------------------------------------------------------------------
# Measurements.


def file_sizes(path: str) -> tuple[int, int]:
    """(bytes on disk, bytes of a zip archive holding the file, deflate level 9)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, arcname=os.path.basename(path))
    return os.path.getsize(path), len(buf.getvalue())


def parameter_counts(net: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) as the network uses them (int8 weights count once each)."""
    total = nonzero = 0
    for _name, t in compression.named_weights(net):
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def sampler_latencies(nets: dict, sampler_kwargs: dict, batch: int = 1, runs: int = 5) -> dict[str, list[float]]:
    """{name: wall times per image of `runs` timed runs} of each network's sampler (`sampler_kwargs[name]`:
    'sampler' plus its options, default Heun with 18 steps) on a batch of `batch` images, after one untimed
    warm-up run of each network.

    The networks take turns run by run (round robin), so a burst of background load on a shared machine slows
    every network a little rather than one network a lot, and their medians stay comparable."""
    gen = torch.Generator().manual_seed(0)
    inputs, samplers = {}, {}
    for name, net in nets.items():
        latents = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
        labels = torch.eye(int(net.label_dim))[torch.arange(batch) % int(net.label_dim)] if net.label_dim else None
        inputs[name] = (latents, labels)
        options = dict(sampler_kwargs.get(name) or {})
        samplers[name] = (sampling.SAMPLERS[options.pop('sampler', 'edm')], options)
    times = {name: [] for name in nets}
    with torch.no_grad():
        for k in tqdm.tqdm(range(runs + 1), desc='latency', unit='round', dynamic_ncols=True, leave=False):
            for name, net in nets.items():
                sampler, options = samplers[name]
                start = time.perf_counter()
                sampler(net, *inputs[name], **options)
                if k > 0:  # round 0 warms up caches and allocators
                    times[name].append((time.perf_counter() - start) / batch)
    return times


def generated_scores(net, detector, ref: dict, num: int, sampler_kwargs: dict, batch: int, desc: str,
                     metric_names=('fid',), options=None) -> dict:
    """The metrics (default FID) of `num` images generated in memory (seeds 0..num-1, `sampler_kwargs`:
    'sampler' plus its options) against a reference."""
    source = metrics.NetworkSource(net, range(num), batch, name=desc, **sampler_kwargs)
    return cli.one_line_errors(metrics.score)(metric_names, source, ref, detector, options=options, desc=desc)


def parse_samplers(specs, num_steps: int) -> dict:
    """--sampler values '[BASELINE=]SPEC' (SPEC in the sweep's syntax, e.g. pc:sde=ve:num_steps=100) ->
    {baseline or None: generate_images kwargs}; None is every other baseline (default Heun, `num_steps`).
    Raises ValueError for a bad spec or a baseline named twice."""
    by_baseline = {None: dict(sampler='edm', num_steps=num_steps)}
    named = set()
    for arg in specs:
        head, sep, tail = arg.partition('=')
        baseline, spec = (head, tail) if sep and ':' not in head else (None, arg)
        if baseline in named:
            raise ValueError(f'{arg!r}: a second sampler for {"every baseline" if baseline is None else baseline!r}')
        named.add(baseline)
        _label, name, options = sampling.parse_sampler_spec(spec)
        by_baseline[baseline] = {'sampler': name, 'num_steps': num_steps, **options}
    return by_baseline


def describe_sampler(kwargs: dict) -> str:
    """'edm, 18 steps (35 network evaluations)', 'pc sde=ve, 100 steps (200 network evaluations)'."""
    options = {k: v for k, v in kwargs.items() if k not in ('sampler', 'num_steps')}
    nfe = sampling.count_nfe(kwargs['sampler'], **{k: v for k, v in kwargs.items() if k != 'sampler'})
    return (kwargs['sampler'] + ''.join(f' {k}={v}' for k, v in options.items())
            + f', {kwargs["num_steps"]} steps ({nfe} network evaluations)')


def training_seconds(path: str, steps) -> float | None:
    """Training time behind a snapshot where it was (re)trained: the QAT fine-tuning recorded in its 'compression'
    steps, or for a train.py snapshot (no compression) the run's training time up to the snapshot's kimg from the
    stats.jsonl beside it: Timing/total_sec less the in-training metrics (Timing/metrics_total_sec), summed over
    resumed segments (each process restarts both clocks, as in the paper's loop). None for pruning and
    post-training quantisation, or when the run's log is not beside it."""
    recorded = [s['train_seconds'] for s in steps or [] if 'train_seconds' in s]
    if recorded:
        return float(sum(recorded))
    if steps:
        return None
    match = re.fullmatch(r'network-snapshot-(\d+)(?:-.*)?\.pkl', os.path.basename(path))
    stats = os.path.join(os.path.dirname(os.path.abspath(path)), 'stats.jsonl')
    if not match or not os.path.isfile(stats):
        return None
    done = 0.0        # training seconds of the finished segments
    segment = None    # training seconds of the current segment so far
    with open(stats) as f:
        for line in f:
            try:
                record = json.loads(line)
                kimg, total = record['Progress/kimg']['mean'], record['Timing/total_sec']['mean']
                metrics = record.get('Timing/metrics_total_sec', {}).get('mean', 0.0)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            seconds = total - metrics
            if segment is not None and seconds < segment:  # the clock restarted: a resumed segment
                done += segment
            segment = seconds
            if kimg >= int(match.group(1)):
                break
    return None if segment is None else done + segment


def split_baseline(arg: str) -> tuple[str | None, str]:
    """'[BASELINE=]PKL' -> (baseline or None, PKL); a path that exists as given is never split."""
    head, sep, tail = arg.partition('=')
    if sep and head and '/' not in head and not os.path.exists(arg):
        return head, tail
    return None, arg


def row_names(networks: list[str]) -> list[str]:
    """A table name per network: its file name without extension; a name that several files share gets their
    folder in front (vp/network-snapshot-000140, vp-g2/network-snapshot-000140); a file listed twice gets a '."""
    def base(path):
        return os.path.splitext(os.path.basename(path.rstrip('/')))[0]
    counts = collections.Counter(base(n) for n in {os.path.abspath(n) for n in networks})
    names = []
    for network in networks:
        name = base(network)
        if counts[name] > 1:
            name = os.path.basename(os.path.dirname(os.path.abspath(network.rstrip('/')))) + '/' + name
        while name in names:
            name += "'"
        names.append(name)
    return names


def assign_baselines(rows: list[dict]) -> None:
    """Fill each row's 'baseline': given explicitly, else that of the listed network its first compression step
    was made from ('source', followed back), else its own name (an uncompressed network is its own baseline)."""
    by_path = {os.path.abspath(r['path']): r for r in rows}

    def root(row, depth=0):
        parent = by_path.get(os.path.abspath(row['source'])) if row['source'] else None
        if row['baseline'] is not None or parent is None or parent is row or depth > len(rows):
            return row
        return root(parent, depth + 1)
    for row in rows:
        origin = root(row)
        row['baseline'] = origin['baseline'] or origin['network']


#----------------------------------------------------------------------------
# Report files: Markdown, CSV, JSON, and a PNG plot drawn with PIL.

COLUMNS = [('baseline', 'baseline'), ('network', 'network'), ('compression', 'compression'), ('params', 'parameters'),
           ('nonzero', 'non-zero'), ('bytes', 'bytes'), ('zip_bytes', 'zip bytes'), ('train_s', 'training s'),
           ('latency_s', 's / image'), ('fid', 'FID')]


def _fmt(key: str, value) -> str:
    if value is None:
        return '–'
    if key in ('params', 'nonzero', 'bytes', 'zip_bytes'):
        return f'{value:,}'
    if key == 'latency_s':
        return f'{value:.4g}'
    if key == 'train_s':
        return f'{value:,.0f}'
    if key == 'fid':
        return f'{value:.2f}'
    return str(value)


def _fmt_fid(row: dict) -> str:
    text = _fmt('fid', row.get('fid'))
    if row.get('fid_lo') is not None:
        text += f' [{row["fid_lo"]:.2f}, {row["fid_hi"]:.2f}]'
    return text


def _fmt_kid(row: dict) -> str:
    return '–' if row.get('kid') is None else f'{row["kid"]:.5f} ± {row["kid_std"]:.5f}'


def _cell(key: str, row: dict) -> str:
    return _fmt_fid(row) if key == 'fid' else _fmt_kid(row) if key == 'kid' else _fmt(key, row.get(key))


def markdown_table(rows: list[dict], settings: dict) -> str:
    columns = COLUMNS + ([('kid', 'KID')] if any(r.get('kid') is not None for r in rows) else [])
    lines = ['| ' + ' | '.join(title for _key, title in columns) + ' |',
             '|' + '|'.join('---' if key in ('baseline', 'network', 'compression') else '---:' for key, _ in columns) + '|']
    lines += ['| ' + ' | '.join(_cell(key, r) for key, _ in columns) + ' |' for r in rows]
    notes = []
    if settings['latency_runs']:
        notes.append(f'Latency: batch {settings["latency_batch"]}, median of {settings["latency_runs"]} runs '
                     f'taken in turns with the other networks (fastest run in the CSV/JSON), '
                     f'{settings["threads"]} CPU thread(s).')
    if settings['num']:
        notes.append(f'FID: {settings["num"]} images (seeds 0-{settings["num"] - 1}) '
                     f'against {settings["reference"]} ({settings["reference_images"]} images); '
                     f'detector {settings["detector"]}'
                     + (f'; [lo, hi]: {100 * settings["confidence"]:g}% bootstrap interval over the generated images'
                        if any(r.get('fid_lo') is not None for r in rows) else '') + '.')
    if settings['latency_runs'] or settings['num']:
        notes.append('Sampler (FID and latency): ' + '; '.join(f'{b}: {s}' for b, s in settings['samplers'].items()) + '.')
    notes.append('zip bytes: the file in a zip archive (deflate, level 9). training s: the (re)training behind the '
                 'network (QAT fine-tuning, or the run of a train.py snapshot); blank for pruning and post-training '
                 'quantisation.')
    return '\n'.join(lines) + '\n\n' + '\n'.join(notes) + '\n'


def _write_text(path: str, text: str) -> None:
    with dnnlib.util.atomic_write(path, 'w') as f:
        f.write(text)


def write_report(rows: list[dict], settings: dict, prefix: str) -> list[str]:
    """PREFIX.md, PREFIX.csv, PREFIX.json and (when FID was measured) PREFIX.png; returns the paths written."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    written = []
    _write_text(prefix + '.md', markdown_table(rows, settings))
    written.append(prefix + '.md')
    buf = io.StringIO()
    keys = ['baseline', 'network', 'path', 'compression', 'params', 'nonzero', 'bytes', 'zip_bytes', 'train_s',
            'latency_s', 'latency_min_s', 'threads', 'fid', 'fid_lo', 'fid_hi', 'kid', 'kid_std', 'precision',
            'recall', 'fid_images']
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    _write_text(prefix + '.csv', buf.getvalue())
    written.append(prefix + '.csv')
    _write_text(prefix + '.json', json.dumps(dict(settings=settings, networks=rows), indent=2) + '\n')
    written.append(prefix + '.json')
    measured = [r for r in rows if r.get('fid') is not None]
    if measured:
        unit, div = ('MB', 1e6) if max(r['zip_bytes'] for r in measured) >= 1e6 else ('kB', 1e3)
        several = len({r['baseline'] for r in measured}) > 1  # one plot for all baselines, a colour each
        points = [(r['network'], r['zip_bytes'] / div, r['fid']) for r in measured]
        intervals = [(r.get('fid_lo', float('nan')), r.get('fid_hi', float('nan'))) for r in measured]
        fids = [r['fid'] for r in measured]
        log_y = min(fids) > 0 and max(fids) / min(fids) > 20  # a destroyed network (FID ~450) beside good ones (~15)
        plot.scatter_plot(points, prefix + '.png', xlabel=f'zip-compressed size ({unit})', ylabel='FID', intervals=intervals,
                          title=f'FID vs. compressed size ({settings["num"]} images)', log_y=log_y,
                          groups=[r['baseline'] for r in measured] if several else None)
        written.append(prefix + '.png')
    return written


#----------------------------------------------------------------------------
# Command line.


@click.group()
def main():
    """Prune or quantise a network snapshot, and tabulate size, CPU speed and FID.

    \b
    # 50% global L1 pruning of all conv/linear weights; int8 weights; the table and plot
    python compress.py prune --network=net.pkl --dest=net-l1-50.pkl --amount=0.5
    python compress.py quantize --network=net.pkl --dest=net-int8.pkl --dtype=int8
    python compress.py report --network=net.pkl --network=net-l1-50.pkl --network=net-int8.pkl \\
        --data=datasets/digits-16x16.zip --num=1000 --out=compress-out/report
    """


@main.command()
@click.option('--network', 'network', help='Network snapshot to prune', metavar='PKL|URL', type=str, required=True)
@click.option('--dest', help='Where to write the pruned snapshot', metavar='PKL', type=str, required=True)
@click.option('--amount', help='Fraction of the selected weights to zero', metavar='FLOAT',
              type=cli.FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=0.5, show_default=True)
@click.option('--method', help='Which weights: smallest magnitude or random', type=click.Choice(['l1', 'random']),
              default='l1', show_default=True)
@click.option('--scope', help='global: rank all selected weights together; local: prune each tensor by --amount',
              type=click.Choice(['global', 'local']), default='global', show_default=True)
@click.option('--region', help=f'Which layers: {REGION_HELP}', type=click.Choice(list(compression.SELECTABLE_REGIONS)),
              default='all', show_default=True)
@click.option('--seed', help='Random seed for --method=random', metavar='INT', type=int, default=0, show_default=True)
def prune(network, dest, amount, method, scope, region, seed):
    """Unstructured pruning of conv and linear weights (torch.nn.utils.prune, made permanent).

    Only weights are pruned (not biases, normalisation gains or buffers). Regions are found from the layer
    names of SongUNet/DhariwalUNet (enc.<R>x<R>_* and dec.<R>x<R>_* run at resolution R); the strided
    block that enters a resolution belongs to it. Prints the sparsity reached per region: embedding (the
    noise/class mapping network), ends, between (the other resolutions), middle, and the total.
    """
    data, _path = cli.load_snapshot(network)
    net = data['ema']
    if isinstance(net, compression.Int8Network):
        raise click.ClickException(f'--network {network} holds int8 weights; prune the float network first, '
                                   f'then quantise')
    try:
        compression.prune_network(net, amount, method=method, scope=scope, region=region, seed=seed,
                                  progress=lambda layers: tqdm.tqdm(layers, desc='pruning', unit='layer', leave=False))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--region') from None
    rows = compression.sparsity_rows(net, selected=set(compression.REGIONS) if region == 'all' else {region})
    print_sparsity(rows)
    chosen = [r for r in rows if r['selected']]
    reached = sum(r['zeros'] for r in chosen) / max(sum(r['params'] for r in chosen), 1)
    save_snapshot(data, dest, dict(method='prune', criterion=method, scope=scope, region=region, amount=amount,
                                   seed=seed, source=network, sparsity=reached))
    print(f'Wrote {dest}')


@main.command()
@click.option('--network', 'network', help='Network snapshot to quantise', metavar='PKL|URL', type=str, required=True)
@click.option('--dest', help='Where to write the quantised snapshot', metavar='PKL', type=str, required=True)
@click.option('--dtype', help='int8/int4: conv/linear weights per-output-channel symmetric int8, or int4 packed two '
              'per byte (dequantised on load); fp16/bf16: all parameters in that dtype (computed in float32)',
              type=click.Choice(['int8', 'int4', 'fp16', 'bf16']), required=True)
def quantize(network, dest, dtype):
    """Store the weights of a snapshot's network in low precision."""
    data, _path = cli.load_snapshot(network)
    net = data['ema']
    if isinstance(net, compression.Int8Network):
        raise click.ClickException(f'--network {network} already holds int{net.bits} weights')
    progress = lambda layers: tqdm.tqdm(layers, desc=f'quantising to {dtype}', unit='layer', leave=False)  # noqa: E731
    try:
        if dtype in ('int8', 'int4'):
            data['ema'] = compression.quantize_weights(net, int(dtype[3:]), progress=progress)
            layers = len(data['ema'].int8_layers)
        else:
            compression.to_low_precision(net, dtype)
            layers = len(compression.compressible_layers(net))
    except ValueError as e:
        raise click.ClickException(f'--network {network}: {e}') from None
    save_snapshot(data, dest, dict(method='quantize', dtype=dtype, source=network, layers=layers))
    print(f'Wrote {dest} ({dtype}, {layers} conv/linear layers, {os.path.getsize(dest):,} bytes)')


def _persistent_kwargs(obj, what: str) -> dict | None:
    """`class_name` + constructor kwargs of a persistent object from a snapshot (how training_loop builds one)."""
    if obj is None:
        return None
    if not persistence.is_persistent(obj) or obj.init_args:
        raise click.ClickException(f'the snapshot\'s {what} ({type(obj).__name__}) cannot be rebuilt for training')
    return dnnlib.EasyDict(class_name=f'{type(obj).__module__}.{type(obj).__name__}', **obj.init_kwargs)


def _latest_snapshot(run_dir: str) -> str:
    names = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-') and f.endswith('.pkl'))
    if not names:
        raise click.ClickException(f'{run_dir}: training wrote no network snapshot')
    return os.path.join(run_dir, names[-1])


@main.command()
@click.option('--network', 'network', help='Float network snapshot to fine-tune', metavar='PKL|URL', type=str,
              required=True)
@click.option('--data', help='Training dataset (the one the network was trained on)', metavar='ZIP|DIR', type=str,
              required=True)
@click.option('--dest', help='Where to write the exported low-bit snapshot', metavar='PKL', type=str, required=True)
@click.option('--bits', help='Weight width of the conv/linear layers', type=click.Choice(['8', '4']), required=True)
@click.option('--kimg', help='Fine-tuning length', metavar='KIMG', type=cli.FiniteFloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=128,
              show_default=True)
@click.option('--lr', help='Learning rate (after --lr-rampup)', metavar='FLOAT',
              type=cli.FiniteFloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option('--lr-rampup', help='Learning rate ramp-up', metavar='KIMG', type=cli.FiniteFloatRange(min=0, min_open=True),
              default=10, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='KIMG', type=cli.FiniteFloatRange(min=0), default=10,
              show_default=True)
@click.option('--optim', help='Optimizer: Adam, or 8-bit Adam (bitsandbytes)', type=click.Choice(['adam', 'adam8bit']),
              default='adam', show_default=True)
@click.option('--run-dir', help='Training folder (log, snapshots)  [default: DEST without .pkl + "-run"]',
              metavar='DIR', type=str)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=click.IntRange(min=1), default=10,
              show_default=True)
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
def qat(network, data, dest, bits, kimg, batch, lr, lr_rampup, ema, optim, run_dir, tick, seed):
    """Quantisation-aware fine-tuning, then export at that precision.

    Starts from a float snapshot's EMA network, trains it with fake-quantised conv/linear weights
    (per-output-channel symmetric, straight-through gradient; training.compression.QATNetwork) with the
    snapshot's own loss and augmentation through training/training_loop.py, and writes --dest: the last EMA
    network with its weights stored at --bits (int8, or int4 packed two per byte) plus float32 scales, loaded
    by generate.py and fid.py like any snapshot. The training time is recorded in the snapshot's
    'compression' entry (the report's training-time column).
    """
    from torch_utils import distributed as dist
    from training import presets, training_loop
    bits = int(bits)
    snapshot, _path = cli.load_snapshot(network)
    if optim == 'adam8bit':
        try:
            presets.check_optimizer(optim)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint='--optim') from None
    if not os.path.exists(data):
        raise click.BadParameter(f'{data}: no such dataset', param_hint='--data')
    try:
        net = compression.qat_network(snapshot['ema'], bits)
    except ValueError as e:
        raise click.ClickException(f'--network {network}: {e}') from None
    if snapshot.get('loss_fn') is None:
        raise click.ClickException(f'--network {network}: the snapshot has no loss_fn to fine-tune with')
    run_dir = run_dir or os.path.splitext(dest)[0] + '-run'
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise click.ClickException(f'--run-dir {run_dir} is not empty; remove it or pass another folder')
    os.makedirs(run_dir, exist_ok=True)
    start_pkl = os.path.join(run_dir, 'qat-start.pkl')  # the float weights under the QAT wrapper's names
    persistence.save_network_pkl(dict(snapshot, ema=net), start_pkl)
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=bool(net.label_dim),
                          xflip=bool((snapshot.get('dataset_kwargs') or {}).get('xflip', False)), cache=True)
    network_kwargs = dnnlib.EasyDict(class_name='training.compression.QATNetwork', net_class=net.init_kwargs.net_class,
                                     net_args=net.init_kwargs.net_args, net_kwargs=net.init_kwargs.net_kwargs, bits=bits)
    start = time.time()
    result = training_loop.training_loop(
        run_dir=run_dir, dataset_kwargs=dataset_kwargs, data_loader_kwargs=dict(num_workers=0),
        network_kwargs=network_kwargs, loss_kwargs=_persistent_kwargs(snapshot['loss_fn'], 'loss_fn'),
        optimizer_kwargs=dict(presets.optimizer_kwargs(optim), lr=lr),
        augment_kwargs=_persistent_kwargs(snapshot.get('augment_pipe'), 'augment_pipe'), seed=seed,
        batch_size=batch, total_kimg=kimg, ema_halflife_kimg=ema, lr_rampup_kimg=lr_rampup, kimg_per_tick=tick,
        snapshot_ticks=10 ** 9, state_dump_ticks=None, resume_pkl=start_pkl, device=torch.device('cpu'),
        print_summary=False)
    seconds = time.time() - start
    dist.shutdown()
    trained, _ = cli.load_snapshot(_latest_snapshot(run_dir))
    data = dict(snapshot, ema=compression.quantize_weights(trained['ema'], bits))
    save_snapshot(data, dest, dict(method='qat', bits=bits, kimg=result.cur_nimg / 1000, batch=batch, lr=lr,
                                   optim=optim, source=network, train_seconds=seconds))
    print(f'Wrote {dest} (QAT int{bits}, {result.cur_nimg / 1000:g} kimg in {seconds:.0f} s, '
          f'{os.path.getsize(dest):,} bytes)')


@main.command()
@click.option('--network', 'networks', help='Network snapshot (repeat for each network); BASELINE= names the baseline '
              'it belongs to  [default: the listed network it was compressed from, else itself]', metavar='[BASELINE=]PKL|URL',
              type=str, multiple=True, required=True)
@click.option('--data', help='Reference dataset for FID (statistics computed here)', metavar='ZIP|DIR', type=str)
@click.option('--ref', 'ref_path', help='Reference statistics for FID instead of --data', metavar='NPZ|URL', type=str)
@click.option('--num', help='Images per network for FID; 0 skips FID', metavar='INT', type=click.IntRange(min=0),
              default=1000, show_default=True)
@click.option('--steps', 'num_steps', help='Sampling steps (FID and latency), unless --sampler sets num_steps',
              metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--sampler', 'sampler_specs', help='Sampler (FID and latency) in the sweep syntax, for every baseline or '
              'the one named, e.g. ve=pc:sde=ve:num_steps=100 (repeat per baseline)  [default: edm (Heun)]',
              metavar='[BASELINE=]SPEC', type=str, multiple=True)
@click.option('--batch', help='Generation batch size for FID', metavar='INT', type=click.IntRange(min=1), default=64,
              show_default=True)
@click.option('--threads', help='CPU threads  [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--latency-runs', help='Timed sampling runs per network (median; networks take turns); 0 skips latency',
              metavar='INT',
              type=click.IntRange(min=0), default=5, show_default=True)
@click.option('--latency-batch', help='Images per timed run', metavar='INT', type=click.IntRange(min=1), default=1,
              show_default=True)
@click.option('--int8-dynamic', help='Run the Linear layers of int8 networks with torch.ao dynamic int8 kernels',
              is_flag=True)
@click.option('--out', 'prefix', help='Output prefix: writes PREFIX.md, .csv, .json and .png', metavar='PREFIX',
              type=str, default='compress-report', show_default=True)
@cli.metrics_option('fid_ci', ' (fid is always scored)')
@cli.bootstrap_options
@cli.detector_options
def report(networks, data, ref_path, num, num_steps, sampler_specs, batch, threads, latency_runs, latency_batch, int8_dynamic,
           prefix, metric_names, bootstrap, confidence, detector, trust_pickle):
    """Parameters, non-zero parameters, bytes on disk (raw and zip), training time, CPU latency and FID of each
    network, in one table and plot for one or several baselines (e.g. a VP/DDPM++ and a VE/NCSN++ model)."""
    if num and (data is None) == (ref_path is None):
        raise click.UsageError('FID needs exactly one of --data or --ref (or --num 0 to skip FID)')
    if num == 1:
        raise click.BadParameter('FID needs at least 2 images', param_hint='--num')
    try:
        samplers = parse_samplers(sampler_specs, num_steps)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint='--sampler') from None
    given = [split_baseline(n) for n in networks]
    networks = [path for _baseline, path in given]
    for network in networks:  # cheap checks first, before any slow step
        if not dnnlib.util.is_url(network, allow_file_urls=True) and not os.path.isfile(network):
            raise click.ClickException(f'--network {network}: no such file; pass a network snapshot path or URL')
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()

    if 'fid' not in metric_names and 'fid_ci' not in metric_names:
        metric_names = ['fid'] + metric_names
    specs = cli.one_line_errors(metrics.resolve_metrics)(metric_names)
    detector_net, ref, ref_images = None, None, None
    if num:
        detector_net = cli.one_line_errors(metrics.load_detector)(detector, trust_pickle=trust_pickle)
        if ref_path is not None:
            ref = cli.one_line_errors(metrics.load_reference)(ref_path)
            ref_images = int(ref['num_images']) if 'num_images' in ref else None
            cli.one_line_errors(metrics.check)(metric_names, ref, detector_net)
        else:  # one process, no DataLoader workers: the detector, not the loading, is the bottleneck
            keep = any(spec.needs_ref_features for spec in specs)
            stats = cli.one_line_errors(lambda: metrics.extract(metrics.ImageSource(data, num_workers=0), detector_net,
                                                            keep_features=keep, desc='reference'))()
            ref, ref_images = dict(mu=stats.mu, sigma=stats.sigma, path=data), stats.num_images
            if keep:
                ref['features'] = stats.features

    rows, nets = [], {}
    for (baseline, network), name in zip(given, row_names([network for _baseline, network in given])):
        snapshot, path = cli.load_snapshot(network)
        net = snapshot['ema']
        how = describe(snapshot.get('compression'))
        params, nonzero = parameter_counts(net)
        if int8_dynamic and isinstance(net, compression.Int8Network) and net.bits == 8:
            net = compression.dynamic_int8_linear(net)
            how += ' (dynamic int8 Linear)'
        raw, zipped = file_sizes(path)
        steps = snapshot.get('compression') or []
        rows.append(dict(baseline=baseline, network=name, path=network, source=steps[0].get('source') if steps else None,
                         compression=how, params=params, nonzero=nonzero, bytes=raw, zip_bytes=zipped,
                         train_s=training_seconds(path, steps), latency_s=None, latency_min_s=None, latency_runs_s=None, threads=threads,
                         fid=None, fid_images=num or None))
        nets[name] = net
    assign_baselines(rows)
    unknown = set(samplers) - {None} - {row['baseline'] for row in rows}
    if unknown:
        raise click.BadParameter(f'no baseline named {", ".join(sorted(unknown))}; the baselines are '
                                 f'{", ".join(sorted({row["baseline"] for row in rows}))}', param_hint='--sampler')
    for row in rows:
        row['sampler'] = samplers.get(row['baseline'], samplers[None])
    if latency_runs:
        sampler_of = {row['network']: row['sampler'] for row in rows}
        for row, times in zip(rows, sampler_latencies(nets, sampler_of, latency_batch, latency_runs).values()):
            row.update(latency_s=statistics.median(times), latency_min_s=min(times), latency_runs_s=times)
    for row, net in zip(rows, nets.values()):
        if num:
            scores = generated_scores(net, detector_net, ref, num, row['sampler'], batch, f'FID {row["network"]}',
                                      metric_names, dict(bootstrap=bootstrap, confidence=confidence))
            row.update({k: v for k, v in scores.items() if k not in ('num_images', 'seconds')})
        print(f'{row["network"]}: {row["compression"]}; {row["params"]:,} parameters ({row["nonzero"]:,} non-zero); '
              f'{row["bytes"]:,} bytes ({row["zip_bytes"]:,} zipped)'
              + (f'; {row["latency_s"]:.4g} s/image' if row['latency_s'] is not None else '')
              + (f'; FID {_fmt_fid(row)}' if row['fid'] is not None else '')
              + (f'; KID {_fmt_kid(row)}' if row.get('kid') is not None else ''))

    settings = dict(samplers={b: describe_sampler(s) for b, s in {r['baseline']: r['sampler'] for r in rows}.items()},
                    threads=threads, latency_runs=latency_runs, latency_batch=latency_batch,
                    num=num, reference=ref_path or data, reference_images=ref_images,
                    detector=detector or 'standard Inception-v3', int8_dynamic=int8_dynamic, metrics=metric_names,
                    bootstrap=bootstrap, confidence=confidence)
    written = write_report(rows, settings, prefix)
    print(markdown_table(rows, settings))
    print('Wrote ' + ', '.join(written))


if __name__ == '__main__':
    main()
