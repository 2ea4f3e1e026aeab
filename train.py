"""Train diffusion-based generative models with the EDM recipe (or the VP / VE baselines).

This script turns command-line options into the keyword arguments of training.training_loop.training_loop,
checks them, names and creates the run folder, and starts training on every rank.

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import warnings

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training import phema, presets, training_loop
from training.dataset import dataset_fingerprint

# DDP reports a layout mismatch for the gradients of 1x1 convolutions; it copies them correctly anyway.
warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')

# ----------------------------------------------------------------------------

def parse_int_list(s):
    """Click type for --cres: '1,2,5-7' -> [1, 2, 5, 6, 7] (dnnlib.util.parse_int_list); lists pass through."""
    try:
        return dnnlib.util.parse_int_list(s)
    except ValueError:
        raise click.BadParameter(f'"{s}" is not a comma-separated list of integers (e.g. 2,2,2)') from None


# The presets live in training/presets.py (benchmarks read them too); these names stay importable from here.
ARCH_PRESETS, PRECOND_PRESETS = presets.ARCH_PRESETS, presets.PRECOND_PRESETS
CONFIG_PRESETS, LR_SCHEDULES = presets.CONFIG_PRESETS, presets.LR_SCHEDULES


def parse_std_list(s):
    """Click type for --ema-stds: EMA lengths sigma_rel, e.g. '0.05,0.1' or '0.05,0.10,...,0.25'."""
    try:
        return phema.parse_std_list(s)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None

_STATE_RE = re.compile(r'training-state-(\d+)\.pt')


def find_resume_state(path: str) -> str:
    """--resume: a training-state-*.pt file, or a run folder (its newest training-state-*.pt)."""
    if os.path.isdir(path):
        states = [f for f in os.listdir(path) if _STATE_RE.fullmatch(f)]
        if not states:
            raise click.ClickException(f'--resume: no training-state-*.pt in folder "{path}" '
                                       f'(was --dump larger than the run, or did it stop before the first dump?)')
        return os.path.join(path, max(states, key=lambda f: int(_STATE_RE.fullmatch(f).group(1))))
    if not _STATE_RE.fullmatch(os.path.basename(path)) or not os.path.isfile(path):
        raise click.ClickException(f'--resume must point to a training-state-*.pt file or a run folder '
                                   f'from a previous training run; got "{path}"')
    return path


def provenance(data_path: str, dataset_size: int, opts: dnnlib.EasyDict) -> dict:
    """Where this run came from: code commit, library versions, precision flags, dataset identity."""
    repo = os.path.dirname(os.path.abspath(__file__))
    git = dict(commit=None, dirty=None)
    try:
        git['commit'] = subprocess.run(['git', '-C', repo, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                       timeout=10, check=True).stdout.strip() or None
        status = subprocess.run(['git', '-C', repo, 'status', '--porcelain', '--untracked-files=no'],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        git['dirty'] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    for pkg in ('numpy', 'scipy', 'pillow', 'click', 'psutil'):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return dict(
        git=git,
        versions=versions,
        precision=dict(fp16=opts.fp16, bf16=opts.bf16, loss_scaling=opts.ls, allow_tf32=False,
                       cudnn_benchmark=opts.bench),
        dataset=dict(path=os.path.abspath(data_path), size=dataset_size, **dataset_fingerprint(data_path)),
        host=platform.node(),
        command=' '.join(sys.argv),
    )


# ----------------------------------------------------------------------------
# Command line. The options, their help texts and defaults are the paper's CLI (plus our additions), so a
# command line written for the original code trains the same model here; docs/cli/train.txt is their --help.


@click.command()
# The run: where to write it, what data, which model family.
@click.option('--outdir', help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--data', help='Path to the dataset', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Train class-conditional model', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--arch', help='Network architecture', metavar='ddpmpp|ncsnpp|adm|edm2',
              type=click.Choice(['ddpmpp', 'ncsnpp', 'adm', 'edm2']), default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning & loss function', metavar='vp|ve|edm',
              type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)
# Optimisation schedule, network size, regularisation and the EDM loss parameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=click.FloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--blocks', help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              default=10e-4, show_default=True)
@click.option('--lr-rampup', help='Learning rate ramp-up', metavar='KIMG', type=click.FloatRange(min=0),
              default=10000, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=click.FloatRange(min=0), default=0.5,
              show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=click.FloatRange(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--P_mean', 'P_mean', help='EDM loss: mean of ln(sigma)  [default: -1.2]', metavar='FLOAT',
              type=float)
@click.option('--P_std', 'P_std', help='EDM loss: std of ln(sigma)  [default: 1.2]', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_data', 'sigma_data', help='EDM: std of the data  [default: 0.5]', metavar='FLOAT',
              type=click.FloatRange(min=0, min_open=True))
# EDM2 (Karras et al. 2024); these add training options only when used.
@click.option('--preset', help='Configuration preset (edm2-img64-xs|s|m|l|xl, edm2-cifar10, edm2-digits); options '
              'given override it', metavar='NAME', type=click.Choice(list(CONFIG_PRESETS)))
@click.option('--loss', help='Loss  [default: that of --precond; edm2 for --arch=edm2]', metavar='vp|ve|edm|edm2',
              type=click.Choice(['vp', 've', 'edm', 'edm2']))
@click.option('--uncertainty', help='Learned uncertainty weighting of the loss  [default: on for edm2]',
              metavar='BOOL', type=bool)
@click.option('--lr-schedule', help='Learning rate schedule  [default: rampup; isqrt for --arch=edm2]',
              metavar='|'.join(LR_SCHEDULES), type=click.Choice(list(LR_SCHEDULES)))
@click.option('--decay', help='isqrt schedule: decay from  [default: 70000]', metavar='BATCHES',
              type=click.FloatRange(min=0))
@click.option('--ema-stds', help='Power-function EMA profiles, e.g. 0.05,0.1  [default: 0.050,0.100 for --arch=edm2]',
              metavar='LIST', type=parse_std_list)
# Speed and memory.
@click.option('--fp16', help='Enable mixed-precision training', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--bf16', help='Run the network backbone in bfloat16 (any device)', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1,
              show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True,
              show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=1,
              show_default=True)
# Output folder, reporting and checkpoint cadence, starting points.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=click.IntRange(min=1), default=50,
              show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1),
              default=50, show_default=True)
@click.option('--dump', help='How often to dump state', metavar='TICKS', type=click.IntRange(min=1), default=500,
              show_default=True)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=int)
@click.option('--transfer', help='Transfer learning from network pickle', metavar='PKL|URL', type=str)
@click.option('--resume', help='Resume from previous training state (file or run folder)', metavar='PT|DIR',
              type=str)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
def main(**kwargs):
    """Train diffusion-based generative model using the techniques described in the
    paper "Elucidating the Design Space of Diffusion-Based Generative Models".

    Examples:

    \b
    # Train DDPM++ model for class-conditional CIFAR-10 using 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
    """
    misc.set_malloc_thresholds()  # reuse activation buffers instead of returning them to the OS every step
    opts = dnnlib.EasyDict(kwargs)
    opts._given = _given_on_command_line(click.get_current_context())  # what --preset must not override
    torch.multiprocessing.set_start_method('spawn', force=True)
    dist.init()
    world = dist.get_world_size()
    is_main = dist.get_rank() == 0

    c, dataset_name = build_training_options(opts, world)
    c.seed = _shared_seed(opts.seed, world)
    precision = _precision_tag(opts)
    desc = _run_description(dataset_name, opts, world, c.batch_size, precision)
    c.run_dir = _choose_run_dir(opts, desc) if is_main else None
    if is_main:  # hashing the dataset listing and asking git is rank 0's job alone
        c.provenance = provenance(opts.data, c.dataset_kwargs.max_size, opts)

    _print_plan(c, opts, world, precision)
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    dist.print0('Creating output directory...')
    logger = _create_run_dir(c) if is_main else None
    try:
        result = training_loop.training_loop(**c, device=dist.default_device())
    except training_loop.CheckpointError as e:
        raise click.ClickException(str(e))
    finally:
        if logger is not None:
            logger.close()
    if result.stopped is not None:
        dist.print0(f'Stopped early at {result.cur_nimg / 1000:.1f} kimg; continue with --resume={c.run_dir}')


# ----------------------------------------------------------------------------
# Run identity: seed, folder name, folder.


def _shared_seed(seed: int | None, world: int) -> int:
    """--seed, or a random one drawn on rank 0 and sent to all ranks (they must agree on data order)."""
    if seed is not None:
        return seed
    drawn = torch.randint(1 << 31, size=[], device=dist.default_device())
    if world > 1:
        torch.distributed.broadcast(drawn, src=0)
    return int(drawn)


def _precision_tag(opts: dnnlib.EasyDict) -> str:
    return 'fp16' if opts.fp16 else 'bf16' if opts.bf16 else 'fp32'


def _run_description(dataset_name: str, opts: dnnlib.EasyDict, world: int, batch_size: int, precision: str) -> str:
    """The part of the run folder's name after its number, e.g. cifar10-32x32-cond-ddpmpp-edm-gpus8-batch512-fp32."""
    parts = [dataset_name, 'cond' if opts.cond else 'uncond', opts.arch, opts.precond, f'gpus{world:d}',
             f'batch{batch_size:d}', precision]
    if opts.desc is not None:
        parts.append(opts.desc)
    return '-'.join(parts)


def _next_run_dir(outdir: str, desc: str) -> str:
    """<outdir>/<NNNNN>-<desc>: NNNNN is one past the highest number that starts a folder name in outdir,
    so runs sort in the order they were started."""
    numbers = []
    if os.path.isdir(outdir):
        for entry in os.scandir(outdir):
            leading = re.match(r'\d+', entry.name)
            if leading is not None and entry.is_dir():
                numbers.append(int(leading.group()))
    return os.path.join(outdir, f'{max(numbers, default=-1) + 1:05d}-{desc}')


def _choose_run_dir(opts: dnnlib.EasyDict, desc: str) -> str:
    if opts.nosubdir:
        return opts.outdir
    run_dir = _next_run_dir(opts.outdir, desc)
    if os.path.exists(run_dir):
        raise click.ClickException(f'output folder "{run_dir}" already exists')
    return run_dir


def _print_plan(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, world: int, precision: str) -> None:
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    summary = [
        ('Output directory', c.run_dir),
        ('Dataset path', c.dataset_kwargs.path),
        ('Class-conditional', c.dataset_kwargs.use_labels),
        ('Network architecture', opts.arch),
        ('Preconditioning & loss', opts.precond),
        ('Number of GPUs', world),
        ('Batch size', c.batch_size),
        ('Mixed-precision', precision),
    ]
    for label, value in summary:
        dist.print0(f'{label + ":":<24s} {value}')
    dist.print0()


def _create_run_dir(c: dnnlib.EasyDict) -> training_loop.Logger:
    """Rank 0: make the folder, record the options (atomically), and start teeing output into log.txt."""
    os.makedirs(c.run_dir, exist_ok=True)
    with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'w') as f:
        json.dump(c, f, indent=2)
    return training_loop.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)


# ----------------------------------------------------------------------------
# Options -> training_loop kwargs.


def build_training_options(opts: dnnlib.EasyDict, world: int):
    """CLI options -> training_loop kwargs (validated). Returns (options, dataset name).

    Checks run in this order: the dataset, then option combinations, then --transfer / --resume; the first
    problem found is reported as a one-line click error."""
    _apply_presets(opts)
    dataset = _inspect_dataset(opts)
    _validate_edm2(opts)
    _validate(opts, world)

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(_dataset_base_kwargs(opts), resolution=dataset.resolution,
                                       max_size=dataset.size)  # pinned: the loop must see the same data
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=opts.workers, prefetch_factor=2)
    c.network_kwargs = _network_kwargs(opts)
    c.loss_kwargs = _loss_kwargs(opts)
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)
    if opts.augment:
        # Appendix F: geometric augmentations only (x-flips effectively always candidates), each applied with
        # probability --augment; the network is told which were applied (augment_dim = 9 labels).
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, xflip=1e8,
                                           yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    c.total_kimg = max(int(opts.duration * 1000), 1)
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.lr_rampup_kimg = opts.lr_rampup
    c.batch_size = opts.batch
    c.batch_gpu = opts.batch_gpu
    c.loss_scaling = opts.ls
    c.cudnn_benchmark = opts.bench
    c.kimg_per_tick = opts.tick
    c.snapshot_ticks = opts.snap
    c.state_dump_ticks = opts.dump
    c.update(_starting_point(opts))
    _add_edm2_options(c, opts)
    return c, dataset.name


def _dataset_base_kwargs(opts: dnnlib.EasyDict) -> dict:
    return dict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond,
                xflip=opts.xflip, cache=opts.cache)


def _inspect_dataset(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """Open --data once to learn its name, resolution and size, and check it has labels if --cond asks for them."""
    if not os.path.exists(opts.data):
        raise click.ClickException(f'--data: "{opts.data}" does not exist; create a dataset with dataset_tool.py')
    try:
        dataset = dnnlib.util.construct_class_by_name(**_dataset_base_kwargs(opts))
        if opts.cond and not dataset.has_labels:
            raise click.ClickException(f'--cond=True requires labels, but "{opts.data}" has no labels in its '
                                       f'dataset.json; use --cond=False or a labelled dataset')
        return dnnlib.EasyDict(name=dataset.name, resolution=dataset.resolution, size=len(dataset))
    except OSError as err:
        raise click.ClickException(f'--data: {err}')


def _edm_loss_options(opts: dnnlib.EasyDict) -> dict:
    """The EDM loss parameters given on the command line (unset ones keep the loss's defaults)."""
    return {k: opts[k] for k in ('P_mean', 'P_std', 'sigma_data') if opts.get(k) is not None}


def _validate(opts: dnnlib.EasyDict, world: int) -> None:
    """Reject option combinations that cannot work, before anything is built."""
    edm_only = _edm_loss_options(opts)
    if edm_only and opts.precond != 'edm':
        raise click.ClickException(f'--{"/--".join(edm_only)} only apply to --precond=edm')
    if opts.cres is not None and (len(opts.cres) == 0 or min(opts.cres) < 1):
        raise click.BadParameter('--cres needs positive channel multipliers, e.g. 2,2,2', param_hint='--cres')
    if opts.fp16 and opts.bf16:
        raise click.ClickException('--fp16 and --bf16 are mutually exclusive')
    if opts.batch % world != 0:
        raise click.ClickException(f'--batch={opts.batch} is not divisible by the number of ranks ({world})')
    per_rank = opts.batch // world
    if opts.batch_gpu is not None and opts.batch_gpu < per_rank and per_rank % opts.batch_gpu != 0:
        raise click.ClickException(f'--batch={opts.batch} is not divisible by ranks ({world}) x --batch-gpu='
                                   f'{opts.batch_gpu}; pick --batch-gpu dividing {per_rank}')


def _network_kwargs(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """Architecture preset, preconditioning class, then the per-run overrides."""
    kwargs = dnnlib.EasyDict(ARCH_PRESETS[opts.arch])
    kwargs.class_name = PRECOND_PRESETS[opts.precond][0]
    sigma_data = _edm_loss_options(opts).get('sigma_data')
    if sigma_data is not None:  # c_skip, c_out, c_in must use the sigma_data the loss weights with
        kwargs.sigma_data = sigma_data
    if opts.cbase is not None:
        kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        kwargs.channel_mult = opts.cres
    if opts.blocks is not None:
        kwargs.num_blocks = opts.blocks
    if opts.augment:
        kwargs.augment_dim = 9
    kwargs.dropout = opts.dropout
    kwargs.use_fp16 = opts.fp16
    if opts.bf16:
        kwargs.use_bf16 = True  # our addition; left out otherwise so the kwargs match the paper's
    return kwargs


def _loss_kwargs(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    return dnnlib.EasyDict(class_name=PRECOND_PRESETS[opts.precond][1], **_edm_loss_options(opts))


def _starting_point(opts: dnnlib.EasyDict) -> dict:
    """Where training starts: from scratch ({}), from a network pickle (--transfer: weights only, EMA without
    ramp-up), or from a training state (--resume: everything, with the matching snapshot if present)."""
    if opts.transfer is not None:
        if opts.resume is not None:
            raise click.ClickException('--transfer and --resume cannot be specified at the same time')
        if not dnnlib.util.is_url(opts.transfer) and not os.path.isfile(opts.transfer):
            raise click.ClickException(f'--transfer: "{opts.transfer}" is neither a file nor a URL')
        return dict(resume_pkl=opts.transfer, ema_rampup_ratio=None)
    if opts.resume is None:
        return {}
    state_path = find_resume_state(opts.resume)
    kimg = _STATE_RE.fullmatch(os.path.basename(state_path)).group(1)
    pkl = os.path.join(os.path.dirname(state_path), f'network-snapshot-{kimg}.pkl')
    return dict(resume_pkl=pkl if os.path.isfile(pkl) else None, resume_kimg=int(kimg), resume_state_dump=state_path)


# ----------------------------------------------------------------------------
# EDM2 options -> training_loop kwargs. A command line without them gives exactly the paper's kwargs.


def _given_on_command_line(ctx: click.Context) -> set:
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT,
                                                      click.core.ParameterSource.DEFAULT_MAP)}


def _given(opts: dnnlib.EasyDict) -> set:
    """Options given explicitly: recorded by main(); for programmatic callers, those that differ from the default."""
    if opts.get('_given') is not None:
        return set(opts._given)
    defaults = main.make_context('train', ['--outdir', '-', '--data', '-']).params
    return {name for name, value in defaults.items() if name in opts and opts[name] != value}


def _apply_presets(opts: dnnlib.EasyDict) -> None:
    """Fill in defaults in place, in layers: the CLI's < EDM2's (--arch=edm2) < --preset < options given."""
    given = _given(opts)
    opts._given = given
    preset = CONFIG_PRESETS.get(opts.get('preset'), {})
    if 'arch' in preset:
        if 'arch' in given and opts.arch != preset['arch']:
            raise click.ClickException(f'--preset={opts.preset} is for --arch={preset["arch"]}, not --arch={opts.arch}')
        opts.arch = preset['arch']
    layers = [presets.EDM2_DEFAULTS] if opts.arch == 'edm2' else []
    for layer in layers + [preset]:
        for name, value in layer.items():
            if name not in given:
                opts[name] = copy.deepcopy(value)


def _uses_uncertainty(opts: dnnlib.EasyDict) -> bool:
    return opts.arch == 'edm2' or opts.loss == 'edm2' or bool(opts.uncertainty)


def _validate_edm2(opts: dnnlib.EasyDict) -> None:
    """The EDM2 combinations that cannot work. A network with the uncertainty head must train with a loss that
    reads it (its parameters would get no gradient, which DDP with several ranks rejects), and vice versa."""
    given = opts._given
    if opts.arch == 'edm2':
        if opts.precond != 'edm':
            raise click.ClickException('--arch=edm2 has its own (EDM) preconditioning; drop --precond')
        if opts.loss not in (None, 'edm2') or opts.uncertainty is False:
            raise click.ClickException('--arch=edm2 trains its uncertainty head with --loss=edm2; drop --loss/--uncertainty')
        if opts.augment:
            raise click.ClickException('--arch=edm2 trains without augmentation (its network takes no augment labels); '
                                       'use --augment=0')
    if opts.loss == 'edm2':
        if opts.precond != 'edm':
            raise click.ClickException('--loss=edm2 trains --precond=edm networks; use --uncertainty=1 for vp/ve')
        if opts.uncertainty is False:
            raise click.ClickException('--loss=edm2 is uncertainty-weighted; drop --uncertainty=0')
    elif opts.loss is not None and opts.loss != opts.precond:
        raise click.ClickException(f'--loss={opts.loss} trains --precond={opts.loss} networks; use --precond={opts.loss}, '
                                   f'or --loss=edm2 with --precond=edm')
    if 'decay' in given and opts.lr_schedule != 'isqrt':
        raise click.ClickException('--decay applies to --lr-schedule=isqrt only')
    if opts.ema_stds is not None and 'ema' in given:
        raise click.ClickException('--ema (half-life) and --ema-stds (power-function EMA) are alternatives; give one')


def _add_edm2_options(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> None:
    """Network family, loss, optimizer, lr schedule and EMA policy of the EDM2 options, added to `c` in place."""
    ema_stds = opts.ema_stds
    if opts.arch == 'edm2':
        c.network_kwargs.class_name = presets.EDM2_NETWORK
        c.optimizer_kwargs.betas = [0.9, 0.99]
        c.nonfinite_grads = 'zero'  # EDM2 zeroes +-Inf gradients too (the paper clamps them)
        if ema_stds is None and 'ema' not in opts._given:  # EDM2's EMA unless the paper's is asked for
            ema_stds = presets.EDM2_EMA_STDS
    elif _uses_uncertainty(opts):
        c.network_kwargs.logvar_channels = presets.LOGVAR_CHANNELS
    if _uses_uncertainty(opts):
        if opts.arch == 'edm2' or opts.loss == 'edm2':
            c.loss_kwargs = dnnlib.EasyDict(class_name=presets.EDM2_LOSS, **_edm_loss_options(opts))
        else:  # the --precond loss (and, for EDM, its sigma distribution), uncertainty-weighted
            base = dnnlib.util.construct_class_by_name(class_name=PRECOND_PRESETS[opts.precond][1])
            P = {k: getattr(base, k) for k in ('P_mean', 'P_std') if hasattr(base, k)}  # EDMLoss's defaults
            c.loss_kwargs = dnnlib.EasyDict(class_name=presets.UNCERTAINTY_LOSSES[opts.precond],
                                            **dict(P, **_edm_loss_options(opts)))
    if opts.lr_schedule == 'isqrt':
        c.lr_kwargs = dnnlib.EasyDict(func_name=LR_SCHEDULES['isqrt'], ref_lr=opts.lr,
                                      ref_batches=70000 if opts.decay is None else opts.decay,
                                      rampup_Mimg=opts.lr_rampup / 1000)
    if ema_stds is not None:
        c.ema_kwargs = dnnlib.EasyDict(class_name='training.phema.PowerFunctionEMA', stds=list(ema_stds))


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
