"""Train diffusion-based generative models with the EDM recipe (or VP / VE / iDDPM, EDM2, the EDM2 ladder).

This script turns command-line options into the keyword arguments of training.training_loop.training_loop,
checks them, names and creates the run folder, and starts training on every rank.

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
"""

from __future__ import annotations

import contextlib
import copy
import errno
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import warnings

import click
import torch

import dnnlib
from torch_utils import cli
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from torch_utils.persistence import CheckpointError
from training import phema, presets, training_loop
from training.dataset import DatasetError, dataset_fingerprint
from training.networks import conv_groups_mismatch
from metrics.errors import MetricsError

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
ARCHITECTURES = presets.ARCHITECTURES  # --arch: one record per architecture, applied generically below


def parse_std_list(s):
    """Click type for --ema-stds: EMA lengths sigma_rel, e.g. '0.05,0.1' or '0.05,0.10,...,0.25'."""
    try:
        return phema.parse_std_list(s)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None

_STATE_RE = re.compile(r'training-state-(\d+)\.pt')


# Exit statuses (README, "Failure modes"): 0 finished, 1 error (one line says which file or option and what to
# do), 2 command-line usage error, EXIT_STOPPED stopped by SIGTERM/SIGINT (or the cluster's stop hook) after
# writing a training state: resubmit with --resume=<run folder>.
EXIT_STOPPED = 3


def find_resume_state(path: str, fallback: bool = False) -> str:
    """--resume: a training-state-*.pt file, or a run folder (its newest training-state-*.pt). With
    `fallback`, a folder's unreadable newest states are skipped (with a warning) for the newest readable one."""
    if os.path.isdir(path):
        states = [f for f in os.listdir(path) if _STATE_RE.fullmatch(f)]
        if not states:
            raise click.ClickException(f'--resume: no training-state-*.pt in folder "{path}" '
                                       f'(was --dump larger than the run, or did it stop before the first dump?)')
        states = [os.path.join(path, f) for f in sorted(states, key=lambda f: -int(_STATE_RE.fullmatch(f).group(1)))]
        if not fallback:
            return states[0]
        for candidate in states:
            try:
                training_loop.load_training_state(candidate, mmap=True)  # maps the tensors, reads no data
                return candidate
            except CheckpointError as e:
                dist.print0(f'Warning: --resume-fallback: {str(e).split("; ")[0]}; trying the previous state')
        raise click.ClickException(f'--resume: none of the {len(states)} training states in "{path}" is readable; '
                                   f'start a new run or use --transfer with one of its network-snapshot-*.pkl')
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
@click.option('--arch', help='Network architecture', metavar='|'.join(ARCHITECTURES),
              type=click.Choice(list(ARCHITECTURES)), default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning & loss function', metavar='|'.join(PRECOND_PRESETS),
              type=click.Choice(list(PRECOND_PRESETS)), default='edm', show_default=True)
# Optimisation schedule, network size, regularisation and the EDM loss parameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=cli.FiniteFloatRange(min=0, min_open=True),
              default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512,
              show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--blocks', help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn', help='Resolutions with self-attention, e.g. 16,8  [default: varies]', metavar='LIST',
              type=parse_int_list)
@click.option('--conv-groups', help='Groups of the 3x3 convs in U-Net blocks (must divide the widths)', metavar='INT',
              type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True),
              default=10e-4, show_default=True)
@click.option('--optim', help='Optimizer: Adam, or 8-bit Adam (needs bitsandbytes)', type=click.Choice(['adam', 'adam8bit']),
              default='adam', show_default=True)
@click.option('--lr-rampup', help='Learning rate ramp-up', metavar='KIMG', type=cli.FiniteFloatRange(min=0),
              default=10000, show_default=True)
@click.option('--ema', help='EMA half-life (edm2small-*: a per-step 0.9993 unless given)', metavar='MIMG',
              type=cli.FiniteFloatRange(min=0), default=0.5, show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, max=1),
              default=0.13, show_default=True)
@click.option('--label-dropout', 'label_dropout', help='Class-label dropout probability (trains the unconditional '
              'model classifier-free guidance uses)', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, max=1), default=0,
              show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, max=1),
              default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--P_mean', 'P_mean', help='EDM loss: mean of ln(sigma)  [default: -1.2]', metavar='FLOAT',
              type=cli.FLOAT)
@click.option('--P_std', 'P_std', help='EDM loss: std of ln(sigma)  [default: 1.2]', metavar='FLOAT',
              type=cli.FiniteFloatRange(min=0, min_open=True))
@click.option('--sigma_data', 'sigma_data', help='EDM: std of the data  [default: 0.5]', metavar='FLOAT',
              type=cli.FiniteFloatRange(min=0, min_open=True))
# Improved DDPM (Nichol & Dhariwal 2021): options of --precond=iddpm.
@click.option('--iddpm-schedule', 'iddpm_schedule', help='iDDPM: noise schedule  [default: cosine]',
              metavar='cosine|linear', type=click.Choice(['cosine', 'linear']))
@click.option('--iddpm-T', 'iddpm_T', help='iDDPM: diffusion steps T  [default: 4000]', metavar='INT',
              type=click.IntRange(min=2))
@click.option('--iddpm-loss', 'iddpm_loss', help='iDDPM: objective (vlb-is: t importance-sampled; simple: fixed '
              'variances)  [default: hybrid]', metavar='|'.join(presets.IDDPM_LOSSES),
              type=click.Choice(list(presets.IDDPM_LOSSES)))
# EDM2 (Karras et al. 2024); these add training options only when used.
@click.option('--preset', help='Configuration preset (edm2-img64-xs|s|m|l|xl, edm2-cifar10, edm2-digits, '
              'edm2small-c|e|g-cifar10|cifar100|digits, iddpm-cifar10, iddpm-imagenet64); options given override it',
              metavar='NAME', type=click.Choice(list(CONFIG_PRESETS)))
@click.option('--loss', help='Loss  [default: that of --precond; edm2 for --arch=edm2]', metavar='vp|ve|edm|edm2',
              type=click.Choice(['vp', 've', 'edm', 'edm2']))
@click.option('--uncertainty', help='Learned uncertainty weighting of the loss  [default: on for edm2, edm2small-*]',
              metavar='BOOL', type=bool)
@click.option('--lr-schedule', help='Learning rate schedule  [default: rampup; isqrt for --arch=edm2; edm2small-*: '
              'their own per-epoch one]',
              metavar='|'.join(LR_SCHEDULES), type=click.Choice(list(LR_SCHEDULES)))
@click.option('--decay', help='isqrt and edm2small-* schedules: decay from  [default: 70000; varies]',
              metavar='BATCHES', type=cli.FiniteFloatRange(min=0))
@click.option('--ema-stds', help='Power-function EMA profiles, e.g. 0.05,0.1  [default: 0.050,0.100 for --arch=edm2]',
              metavar='LIST', type=parse_std_list)
# Speed and memory.
@click.option('--fp16', help='Enable mixed-precision training', metavar='BOOL', type=bool, default=False,
              show_default=True)
@click.option('--bf16', help='Run the network backbone in bfloat16 (fast only with native bf16: CUDA, AVX-512/AMX '
              'CPUs; slower than fp32 on AVX2-only CPUs and for tiny models)', metavar='BOOL', type=bool,
              default=False, show_default=True)
@click.option('--fast-dropout', help='Cheaper dropout masks (other random numbers than the paper)', metavar='BOOL',
              type=bool, default=False, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True), default=1,
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
@click.option('--resume-fallback', help='--resume=DIR: use the newest readable state if the newest is damaged',
              metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--nan-patience', help='Stop when the loss is NaN/Inf this many steps in a row (0 = never)',
              metavar='STEPS', type=click.IntRange(min=0), default=100, show_default=True)
@click.option('--metrics', help='Score the EMA network at every snapshot (e.g. fid,kid)  [default: none]',
              metavar='LIST', type=str, callback=cli.metric_list)
@click.option('--metrics-ref', help='--metrics: reference statistics (fid.py ref [--features])', metavar='NPZ|URL', type=str)
@click.option('--metrics-num', help='--metrics: images generated (seeds 0..N-1)', metavar='INT',
              type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--metrics-detector', help='--metrics: feature detector  [default: standard Inception-v3 URL]',
              metavar='PATH|URL', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
def main(**kwargs):
    """Train diffusion-based generative model using the techniques described in the
    paper "Elucidating the Design Space of Diffusion-Based Generative Models".

    Examples:

    \b
    # Train DDPM++ model for class-conditional CIFAR-10 using 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    Exit status: 0 finished; 1 error (one line names the file or option and what to do; a run that
    fails before its first tick leaves nothing at --outdir); 2 command-line usage error; 3 stopped by
    SIGTERM/SIGINT after writing a training state (continue with --resume=<run folder>). A loss that
    stays NaN/Inf for --nan-patience steps stops the run (status 1) without writing the broken weights.
    """
    misc.set_malloc_thresholds()  # reuse activation buffers instead of returning them to the OS every step
    opts = dnnlib.EasyDict(kwargs)
    opts._given = _given_on_command_line(click.get_current_context())  # what --preset must not override
    torch.multiprocessing.set_start_method('spawn', force=True)
    owns_process_group = not dist.is_initialized()  # a caller (e.g. a test) may have set one up already
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
    # Everything that can be checked is checked before the run folder exists (rank 0 first: it fills the
    # download cache for a --transfer URL; any rank failing stops all of them).
    dist.rank0_first(lambda: check_starting_point(c, opts),
                     other_error=lambda: click.ClickException('checking --resume/--transfer failed on another process'))

    _print_plan(c, opts, world, precision)
    if opts.bf16 and misc.bf16_warning(dist.default_device()):
        dist.print0(misc.bf16_warning(dist.default_device()))
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    dist.print0('Creating output directory...')
    created = []  # folders this run made (removed again if it fails before its first tick ends)
    if is_main:
        c.run_dir, created = _make_run_dir(opts, desc, c.run_dir)
    logger = _create_run_dir(c) if is_main else None
    error, result = None, None
    try:
        result = training_loop.training_loop(**c, device=dist.default_device())
    except (CheckpointError, DatasetError, MetricsError, training_loop.TrainingDiverged) as e:
        error = click.ClickException(_failure_message(e, c.run_dir))
    except OSError as e:  # e.g. a full disk; the checkpoints written so far stay complete (atomic writes)
        error = click.ClickException(_failure_message(_write_error(e, c.run_dir), c.run_dir))
    finally:
        if logger is not None:
            _close_log(logger, error)
        if result is None and created:
            _remove_failed_start(created)
        # Tear the process group down before interpreter exit; left to static destructors it sometimes
        # aborted a finished 2-rank run ("terminate called without an active exception", exit -6).
        if owns_process_group:
            dist.shutdown()
    if error is not None:
        raise error
    if result.stopped is not None:
        dist.print0(f'Stopped early at {result.cur_nimg / 1000:.1f} kimg; continue with --resume={c.run_dir}')
        click.get_current_context().exit(EXIT_STOPPED)


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


def _next_run_number(outdir: str) -> int:
    """One past the highest number that starts a folder name in outdir, so runs sort in the order they
    were started."""
    numbers = []
    if os.path.isdir(outdir):
        for entry in os.scandir(outdir):
            leading = re.match(r'\d+', entry.name)
            if leading is not None and entry.is_dir():
                numbers.append(int(leading.group()))
    return max(numbers, default=-1) + 1


def _next_run_dir(outdir: str, desc: str) -> str:
    """<outdir>/<NNNNN>-<desc> with the next run number (what the run will most likely get; see claim_run_dir)."""
    return os.path.join(outdir, f'{_next_run_number(outdir):05d}-{desc}')


def claim_run_dir(outdir: str, desc: str, attempts: int = 1000) -> str:
    """Create <outdir>/<NNNNN>-<desc> with the next free number and return it. os.mkdir either creates the
    folder or fails because it exists, so runs started at the same moment (cluster array jobs) each get
    a folder of their own; one that then sees another folder with its number (another --desc) gives the
    number up and tries again, so numbers stay unique too."""
    number = -1
    for _ in range(attempts):
        number = max(number + 1, _next_run_number(outdir))
        path = os.path.join(outdir, f'{number:05d}-{desc}')
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        rivals = [e.name for e in os.scandir(outdir) if e.is_dir() and e.name != os.path.basename(path)
                  and re.match(r'\d+', e.name) and int(re.match(r'\d+', e.name).group()) == number]
        if not rivals:
            return path
        os.rmdir(path)
        time.sleep(random.uniform(0, 0.05))  # de-synchronise the runs that collided
    raise click.ClickException(f'--outdir: could not claim a run folder in "{outdir}" after {attempts} attempts')


def _choose_run_dir(opts: dnnlib.EasyDict, desc: str) -> str:
    if opts.nosubdir:
        _check_nosubdir(opts)
        return opts.outdir
    run_dir = _next_run_dir(opts.outdir, desc)
    if os.path.exists(run_dir):
        raise click.ClickException(f'output folder "{run_dir}" already exists')
    return run_dir


def _check_nosubdir(opts: dnnlib.EasyDict) -> None:
    """--nosubdir writes into --outdir itself: it must be empty (or new), unless --resume continues the run
    that is there (a later --resume would otherwise pick another run's newer state)."""
    outdir = opts.outdir
    if not os.path.isdir(outdir) or not os.listdir(outdir):
        return
    if opts.get('resume') is not None:
        resumed = opts.resume if os.path.isdir(opts.resume) else os.path.dirname(os.path.abspath(opts.resume))
        if os.path.isdir(resumed) and os.path.samefile(resumed, outdir):
            return
    raise click.ClickException(f'--nosubdir: "{outdir}" is not empty (its files would mix with this run\'s); '
                               f'pass a new or empty folder, or --resume={outdir} to continue the run in it')


def _make_run_dir(opts: dnnlib.EasyDict, desc: str, planned: str) -> tuple[str, list]:
    """Rank 0: create the run folder (claimed atomically unless --nosubdir). Returns the folder and the
    folders this made, innermost first."""
    created = []
    try:
        outdir = os.path.abspath(opts.outdir)
        missing = []
        while not os.path.exists(outdir):
            missing.append(outdir)
            outdir = os.path.dirname(outdir)
        os.makedirs(opts.outdir, exist_ok=True)
        created = [p for p in missing if os.path.isdir(p)]  # innermost first
        if opts.nosubdir:
            return opts.outdir, created
        run_dir = claim_run_dir(opts.outdir, desc)
    except OSError as e:
        raise click.ClickException(f'--outdir: cannot create a run folder in "{opts.outdir}" ({e.strerror or e})')
    if run_dir != planned:
        print(f'{planned} was taken by another run meanwhile; using {run_dir}')
    return run_dir, [run_dir] + created


def _remove_failed_start(created: list) -> None:
    """A run that failed before its first tick ended leaves only what train.py wrote itself (log.txt,
    training_options.json): remove the folders it made, so a failed start leaves nothing at --outdir and
    uses up no run number. A folder holding anything more (stats, checkpoints) is kept."""
    run_dir, *parents = created  # the run folder, then the folders made to hold it (removed only if empty)
    try:
        if set(os.listdir(run_dir)) <= {'log.txt', 'training_options.json'}:
            shutil.rmtree(run_dir)
            for folder in parents:
                os.rmdir(folder)
    except OSError:
        pass


def _disk_of(path: str) -> str:
    """The mount point of the file system holding `path`."""
    path = os.path.abspath(path)
    while not os.path.ismount(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _write_error(e: OSError, run_dir: str | None) -> str:
    """One line for a failed write during training, naming the file and, when it is full, the disk."""
    where = e.filename or run_dir or '--outdir'
    message = f'cannot write {where}: {e.strerror or cli.first_line(e)}'
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        message += f' (the disk mounted at {_disk_of(os.fspath(where))} is full: free space on it or pass another --outdir)'
    return message


def _close_log(logger: dnnlib.util.Logger, error: click.ClickException | None) -> None:
    """Record the error in log.txt and stop teeing into it; a log that cannot be written (full disk) is
    given up quietly, since the error itself is printed."""
    try:
        if error is not None:
            logger.file.write(f'Error: {error.message}\n')
        logger.close()
    except OSError:
        if sys.stdout is logger:
            sys.stdout = logger.stdout
        if sys.stderr is logger:
            sys.stderr = logger.stderr
        with contextlib.suppress(OSError):
            logger.file.close()


def _failure_message(e: BaseException, run_dir: str | None) -> str:
    """One line for a run that stopped with an error: the error (which names the file and what to do),
    plus where the checkpoints written so far are."""
    message = ' '.join(str(e).split())
    states = [f for f in os.listdir(run_dir) if _STATE_RE.fullmatch(f)] if run_dir and os.path.isdir(run_dir) else []
    if states:
        message += f' (training states so far are in {run_dir}; continue with --resume={run_dir})'
    return message


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


def _create_run_dir(c: dnnlib.EasyDict) -> dnnlib.util.Logger:
    """Rank 0: record the options in the new run folder (atomically), and start teeing output into log.txt."""
    with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'w') as f:
        json.dump(c, f, indent=2)
    return dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)


# ----------------------------------------------------------------------------
# Options -> training_loop kwargs.


def build_training_options(opts: dnnlib.EasyDict, world: int):
    """CLI options -> training_loop kwargs (validated). Returns (options, dataset name).

    Checks run in this order: the dataset, then option combinations and --outdir, then --transfer / --resume
    (that the files exist; check_starting_point reads them); the first problem found is reported as a
    one-line click error."""
    _apply_presets(opts)
    dataset = _inspect_dataset(opts)
    _validate_arch(opts)
    _validate_loss_and_schedule(opts)
    _validate(opts, world)
    _check_outdir(opts.outdir)

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(_dataset_base_kwargs(opts), resolution=dataset.resolution,
                                       max_size=dataset.size)  # pinned: the loop must see the same data
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=opts.workers, prefetch_factor=2)
    c.network_kwargs = _network_kwargs(opts)
    c.loss_kwargs = _loss_kwargs(opts)
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)
    if opts.get('optim', 'adam') != 'adam':  # 8-bit Adam: the same Adam with block-wise 8-bit moments (training/presets.py)
        try:
            presets.check_optimizer(opts.optim)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        c.optimizer_kwargs = dnnlib.EasyDict(presets.optimizer_kwargs(opts.optim), lr=opts.lr)
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
    c.nan_patience = opts.nan_patience or None
    c.update(_starting_point(opts))
    c.update(_metrics_options(opts))
    _add_arch_training(c, opts)
    _add_schedule_and_ema(c, opts, dataset.images)
    return c, dataset.name


def _dataset_base_kwargs(opts: dnnlib.EasyDict) -> dict:
    return dict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond,
                xflip=opts.xflip, cache=opts.cache)


DATASET_SAMPLE = 16  # images decoded before training, spread over the dataset (a moment even for millions)


def _inspect_dataset(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """Open --data once to learn its name, resolution and size, check it has labels if --cond asks for them,
    and decode DATASET_SAMPLE images spread over it (a damaged or mixed-up dataset shows at once; an image
    damaged elsewhere stops training later with its name)."""
    if not os.path.exists(opts.data):
        raise click.ClickException(f'--data: "{opts.data}" does not exist; create a dataset with dataset_tool.py')
    try:
        dataset = dnnlib.util.construct_class_by_name(**_dataset_base_kwargs(opts))
        if opts.cond and not dataset.has_labels:
            raise click.ClickException(f'--cond=True requires labels, but "{opts.data}" has no labels in its '
                                       f'dataset.json; use --cond=False or a labelled dataset')
        for idx in sorted({round(i * (len(dataset) - 1) / max(DATASET_SAMPLE - 1, 1)) for i in range(DATASET_SAMPLE)}):
            dataset[idx]
        return dnnlib.EasyDict(name=dataset.name, resolution=dataset.resolution, size=len(dataset),
                               images=len(dataset) // 2 if opts.xflip else len(dataset))  # images: before x-flips
    except (OSError, ValueError) as err:  # DatasetError is both
        raise click.ClickException(f'--data: {err}')
    except AssertionError as err:  # e.g. images that are not square
        raise click.ClickException(f'--data: "{opts.data}": {err}; re-create the dataset with dataset_tool.py')


def _check_outdir(outdir: str) -> None:
    """--outdir must be a folder (or not exist yet) that we can write in."""
    path = os.path.abspath(outdir)
    while not os.path.exists(path):  # the nearest existing ancestor must be a folder we may write in
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise click.ClickException(f'--outdir: "{path}" is a file, not a folder; pass a folder (created if missing)')
    if not os.access(path, os.W_OK | os.X_OK):
        raise click.ClickException(f'--outdir: no permission to write in "{path}"; pass a folder you can write to')


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
    _validate_conv_groups(opts)
    if opts.label_dropout > 0 and not opts.cond:
        raise click.ClickException('--label-dropout drops class labels; it needs --cond=1')
    if opts.batch % world != 0:
        raise click.ClickException(f'--batch={opts.batch} is not divisible by the number of ranks ({world})')
    per_rank = opts.batch // world
    if opts.batch_gpu is not None and opts.batch_gpu < per_rank and per_rank % opts.batch_gpu != 0:
        raise click.ClickException(f'--batch={opts.batch} is not divisible by ranks ({world}) x --batch-gpu='
                                   f'{opts.batch_gpu}; pick --batch-gpu dividing {per_rank}')


def _validate_conv_groups(opts: dnnlib.EasyDict) -> None:
    """--conv-groups must divide every level width (--cbase x --cres), checked before the network is built."""
    groups = opts.get('conv_groups', 1)
    if groups == 1:
        return
    preset = ARCHITECTURES[opts.arch].backbone
    cbase = opts.cbase if opts.cbase is not None else preset['model_channels']
    cres = opts.cres if opts.cres is not None else preset['channel_mult']
    bad = conv_groups_mismatch(groups, cbase, cres)
    if bad is not None:
        level, width = bad
        raise click.BadParameter(f'{groups} does not divide the {width} channels of level {level} '
                                 f'(--cbase={cbase} x --cres[{level}]={cres[level]}); choose a divisor of every '
                                 f'level width', param_hint='--conv-groups')


def _option_kwargs(mapping: dict, opts: dnnlib.EasyDict) -> dict:
    """Class kwargs from option values by a record's mapping (option -> kwarg name, or -> {value: kwargs});
    options that are None are left out."""
    kwargs = {}
    for option, target in mapping.items():
        value = opts.get(option)
        if value is None:
            continue
        if isinstance(target, str):
            kwargs[target] = copy.deepcopy(value)
        else:
            kwargs.update(copy.deepcopy(target[value]))
    return kwargs


def _network_kwargs(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """Architecture preset, network class (the architecture's, else the preconditioner's), then the per-run
    overrides; or, for an architecture with a network builder, what the builder makes of the options."""
    arch = ARCHITECTURES[opts.arch]
    if arch.network_builder is not None:
        options = {name: copy.deepcopy(opts.get(name)) for name in arch.network_options}
        return dnnlib.EasyDict(dnnlib.util.call_func_by_name(func_name=arch.network_builder,
                                                             **copy.deepcopy(arch.backbone), **options))
    kwargs = dnnlib.EasyDict(copy.deepcopy(arch.backbone))
    precond = PRECOND_PRESETS[opts.precond]
    kwargs.class_name = arch.network or precond.network
    if arch.network is None:
        kwargs.update(_option_kwargs(precond.network_options, opts))
    sigma_data = _edm_loss_options(opts).get('sigma_data')
    if sigma_data is not None:  # c_skip, c_out, c_in must use the sigma_data the loss weights with
        kwargs.sigma_data = sigma_data
    if opts.cbase is not None:
        kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        kwargs.channel_mult = opts.cres
    if opts.blocks is not None:
        kwargs.num_blocks = opts.blocks
    if opts.get('attn') is not None:
        kwargs.attn_resolutions = opts.attn
    if opts.get('conv_groups', 1) != 1:
        kwargs.conv_groups = opts.conv_groups  # our addition; left out at 1 so the kwargs match the paper's
    if opts.augment:
        kwargs.augment_dim = 9
    kwargs.dropout = opts.dropout
    if opts.label_dropout > 0:  # only then, so the default kwargs stay the paper's
        kwargs.label_dropout = opts.label_dropout
    kwargs.use_fp16 = opts.fp16
    if opts.bf16:
        kwargs.use_bf16 = True  # our addition; left out otherwise so the kwargs match the paper's
    if opts.get('fast_dropout'):
        kwargs.fast_dropout = True  # our addition (training.networks.fast_dropout_mask); left out when off
    return kwargs


def _loss_kwargs(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """The architecture's own loss with the loss options given; else --loss=edm2's; else the --precond loss,
    uncertainty-weighted under --uncertainty (for EDM with EDMLoss's sigma distribution)."""
    arch = ARCHITECTURES[opts.arch]
    if arch.loss is not None:
        given = {k: opts[k] for k in arch.loss_options if opts.get(k) is not None}
        return dnnlib.EasyDict(class_name=arch.loss, **copy.deepcopy(arch.loss_kwargs), **given)
    if opts.loss == 'edm2':
        return dnnlib.EasyDict(class_name=presets.EDM2_LOSS, **_edm_loss_options(opts))
    precond = PRECOND_PRESETS[opts.precond]
    if _uses_uncertainty(opts):
        base = dnnlib.util.construct_class_by_name(class_name=precond.loss)
        P = {k: getattr(base, k) for k in ('P_mean', 'P_std') if hasattr(base, k)}  # EDMLoss's defaults
        return dnnlib.EasyDict(class_name=presets.UNCERTAINTY_LOSSES[opts.precond],
                               **dict(P, **_edm_loss_options(opts)))
    return dnnlib.EasyDict(class_name=precond.loss, **_option_kwargs(precond.loss_options, opts),
                           **_edm_loss_options(opts))


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
    state_path = find_resume_state(opts.resume, fallback=opts.get('resume_fallback', False))
    kimg = _STATE_RE.fullmatch(os.path.basename(state_path)).group(1)
    pkl = os.path.join(os.path.dirname(state_path), f'network-snapshot-{kimg}.pkl')
    return dict(resume_pkl=pkl if os.path.isfile(pkl) else None, resume_kimg=int(kimg), resume_state_dump=state_path)


def check_starting_point(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> None:
    """--resume / --transfer: read the file now (a training state is only mapped into memory) and compare its
    tensors with the network the options build (built on the meta device: no memory), so that a wrong,
    damaged or foreign file stops the run with one line before its folder exists."""
    state_path, pkl_path = c.get('resume_state_dump'), c.get('resume_pkl')
    if state_path is None and pkl_path is None:
        return
    option = '--resume' if state_path is not None else '--transfer'
    try:
        net = _meta_network(c)
        if state_path is not None:  # the loop then ignores the snapshot beside it (strict load_state_dict)
            try:
                state = training_loop.load_training_state(state_path, mmap=True)
            except CheckpointError as e:
                if opts.get('resume') and os.path.isdir(opts.resume) and not opts.get('resume_fallback'):
                    raise CheckpointError(f'{e} (or add --resume-fallback=1 to use the newest readable state '
                                          f'in that folder)') from None
                raise
            expected = {name: tuple(t.shape) for name, t in net.state_dict().items()}
            found = {name: tuple(t.shape) for name, t in state['net'].items() if isinstance(t, torch.Tensor)}
            _compare_tensors(state_path, found, expected, missing_ok=False)
        else:
            ema = persistence.load_network(pkl_path, verbose=dist.get_rank() == 0)
            if getattr(ema, 'label_dim', None) not in (None, getattr(net, 'label_dim', None)):
                raise CheckpointError(f'{pkl_path}: network has label_dim={ema.label_dim} but the dataset gives '
                                      f'{net.label_dim} (check --cond and the dataset labels)')
            expected = dict((name, tuple(t.shape)) for name, t in misc.named_params_and_buffers(net))
            found = dict((name, tuple(t.shape)) for name, t in misc.named_params_and_buffers(ema))
            _compare_tensors(pkl_path, found, expected, missing_ok=True)
    except CheckpointError as e:
        raise click.ClickException(f'{option}: {" ".join(str(e).split())}') from None


def _meta_network(c: dnnlib.EasyDict) -> torch.nn.Module:
    """The network training_loop will build from c, on the meta device: shapes only, no memory or RNG use."""
    dataset = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    with torch.device('meta'):
        return dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=dataset.resolution,
                                                   img_channels=dataset.num_channels, label_dim=dataset.label_dim)


def _compare_tensors(path: str, found: dict, expected: dict, missing_ok: bool) -> None:
    """Raise CheckpointError naming the first tensor of the network built from the options that the file
    lacks (unless missing_ok) or holds with another shape."""
    for name, shape in expected.items():
        if name not in found:
            if missing_ok:
                continue
            problem = f'has no tensor "{name}"'
        elif found[name] != shape:
            problem = f'has "{name}" of shape {list(found[name])}, but the options build {list(shape)}'
        else:
            continue
        raise CheckpointError(f'{path}: does not match the network built from the current options ({problem}); '
                              f'use the same --arch/--precond/--cbase/--cres/--blocks/--cond/--augment as the run '
                              f'that wrote it')
    if not missing_ok and set(found) - set(expected):
        extra = sorted(set(found) - set(expected))[0]
        raise CheckpointError(f'{path}: does not match the network built from the current options (has an '
                              f'extra tensor "{extra}"); use the same --arch/--precond/--cbase/--cres/--blocks/'
                              f'--cond/--augment as the run that wrote it')


# ----------------------------------------------------------------------------
# Architecture records and the EDM2 options (--preset, --loss, --uncertainty, --lr-schedule, --decay,
# --ema-stds) -> training_loop kwargs. A command line without them gives exactly the paper's kwargs.


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
    """Fill in defaults in place, in layers: the CLI's < the architecture's < the preconditioner's < --preset <
    options given. A preset's --arch / --precond are its own: another one given is an error."""
    given = _given(opts)
    opts._given = given
    preset = CONFIG_PRESETS.get(opts.get('preset'), {})
    for name in ('arch', 'precond'):
        if name in preset:
            if name in given and opts[name] != preset[name]:
                raise click.UsageError(f'--preset={opts.preset} is for --{name}={preset[name]}, not --{name}={opts[name]}')
            opts[name] = preset[name]
    for layer in (ARCHITECTURES[opts.arch].defaults, PRECOND_PRESETS[opts.precond].defaults, preset):
        for name, value in layer.items():
            if name not in given:
                opts[name] = copy.deepcopy(value)


def _uses_uncertainty(opts: dnnlib.EasyDict) -> bool:
    return ARCHITECTURES[opts.arch].uncertainty or opts.loss == 'edm2' or bool(opts.uncertainty)


def _validate_arch(opts: dnnlib.EasyDict) -> None:
    """The option values the architecture refuses (its record's `refuses`), and the options of another
    preconditioner than --precond's (one-line usage errors)."""
    for refusal in ARCHITECTURES[opts.arch].refuses:
        if opts.get(refusal.option) not in refusal.allowed:
            raise click.UsageError(refusal.message)
    for name, precond in PRECOND_PRESETS.items():
        if name == opts.precond:
            continue
        for option in precond.options:
            if opts.get(option) is not None:
                raise click.UsageError(f'{_spelling(option)} is an option of --precond={name}, not of '
                                       f'--precond={opts.precond}')


def _spelling(name: str) -> str:
    """An option's command-line name ('iddpm_T' -> '--iddpm-T')."""
    for param in main.params:
        if param.name == name:
            return max(param.opts, key=len)
    return '--' + name.replace('_', '-')


def _validate_loss_and_schedule(opts: dnnlib.EasyDict) -> None:
    """The EDM2 option combinations that cannot work. A network with the uncertainty head must train with a loss
    that reads it (its parameters would get no gradient, which DDP with several ranks rejects), and vice versa."""
    given = opts._given
    if opts.loss == 'edm2':
        if opts.precond != 'edm':
            raise click.ClickException('--loss=edm2 trains --precond=edm networks; use --uncertainty=1 for vp/ve')
        if opts.uncertainty is False:
            raise click.ClickException('--loss=edm2 is uncertainty-weighted; drop --uncertainty=0')
    elif opts.loss is not None and opts.loss != opts.precond:
        raise click.ClickException(f'--loss={opts.loss} trains --precond={opts.loss} networks; use --precond={opts.loss}, '
                                   f'or --loss=edm2 with --precond=edm')
    if opts.get('uncertainty') and opts.precond not in presets.UNCERTAINTY_LOSSES:
        raise click.UsageError(f'--uncertainty=1 weights the losses of --precond={"|".join(presets.UNCERTAINTY_LOSSES)}, '
                               f'not --precond={opts.precond}\'s')
    if 'decay' in given and opts.lr_schedule != 'isqrt' and 'decay' not in ARCHITECTURES[opts.arch].lr_options:
        raise click.ClickException('--decay applies to --lr-schedule=isqrt only')
    if opts.ema_stds is not None and 'ema' in given:
        raise click.ClickException('--ema (half-life) and --ema-stds (power-function EMA) are alternatives; give one')


def _add_arch_training(c: dnnlib.EasyDict, opts: dnnlib.EasyDict) -> None:
    """The training_loop kwargs the architecture sets (its record's `training`), in place; and the
    uncertainty head for a network that has none built in."""
    arch = ARCHITECTURES[opts.arch]
    for name, value in copy.deepcopy(arch.training).items():
        if isinstance(value, dict) and isinstance(c.get(name), dict):
            c[name].update(value)
        else:
            c[name] = value
    if _uses_uncertainty(opts) and not arch.uncertainty:
        c.network_kwargs.logvar_channels = presets.LOGVAR_CHANNELS


def _add_schedule_and_ema(c: dnnlib.EasyDict, opts: dnnlib.EasyDict, dataset_images: int) -> None:
    """The lr schedule and EMA policy of the EDM2 options, or of the architecture's record (its lr_kwargs with
    its options and the dataset's epoch; its EMA), added to `c`."""
    arch = ARCHITECTURES[opts.arch]
    ema_stds = opts.ema_stds
    if ema_stds is None and 'ema' not in opts._given:  # the architecture's EMA unless the paper's is asked for
        ema_stds = arch.ema_stds
    if arch.lr_kwargs is not None:
        c.lr_kwargs = dnnlib.EasyDict(copy.deepcopy(arch.lr_kwargs), **_option_kwargs(arch.lr_options, opts),
                                      **{name: dataset_images / 1000 for name in arch.lr_epoch_kwargs})
    elif opts.lr_schedule == 'isqrt':
        c.lr_kwargs = dnnlib.EasyDict(func_name=LR_SCHEDULES['isqrt'], ref_lr=opts.lr,
                                      ref_batches=70000 if opts.decay is None else opts.decay,
                                      rampup_Mimg=opts.lr_rampup / 1000)
    if ema_stds is not None:
        c.ema_kwargs = dnnlib.EasyDict(class_name='training.phema.PowerFunctionEMA', stds=list(ema_stds))
    elif arch.ema_kwargs is not None and 'ema' not in opts._given:
        c.ema_kwargs = dnnlib.EasyDict(copy.deepcopy(arch.ema_kwargs))


# ----------------------------------------------------------------------------


def _metrics_options(opts: dnnlib.EasyDict) -> dict:
    """--metrics: {'metrics_kwargs': ...} for training_loop (nothing when off), the reference checked now."""
    if not opts.get('metrics'):
        return {}
    if not opts.get('metrics_ref'):
        raise click.UsageError('--metrics needs --metrics-ref (reference statistics from `fid.py ref`)')
    import metrics
    try:
        metrics.check(opts.metrics, metrics.load_reference(opts.metrics_ref, verbose=False), opts.metrics_detector)
    except MetricsError as e:
        raise click.ClickException(f'--metrics: {e}') from None
    return dict(metrics_kwargs=dict(metrics=list(opts.metrics), ref=opts.metrics_ref, detector=opts.metrics_detector,
                                    num=opts.metrics_num))


if __name__ == '__main__':
    main()
