"""Distributed training of an EDM denoiser (the recipe of Section 5 and Appendix F of the paper).

`training_loop(...)` is the entry point that train.py calls with the options it assembled. The work is split
into small steps, each a function below:

    _batch_layout      how the global batch is divided over ranks and accumulation rounds
    _make_data         dataset, infinite per-rank sampler, DataLoader
    _make_networks     denoiser, its EMA copy, DDP wrapper, loss, optimizer, augmentation
    _restore           weights / optimizer / data position / RNG streams from a snapshot or training state
    _train_step        one optimizer step (gradient accumulation, learning-rate schedule, gradient sanitising)
    _report_tick       the status line and the matching training_stats entries
    _save_state        training-state-*.pt (everything needed to continue bit-exactly)
    _save_snapshot     network-snapshot-*.pkl (what generate.py and fid.py read)

What this loop adds to the paper's (resumable tensor-only training states, atomic checkpoints, preemption,
non-finite losses and gradients) is described in docs/design.md ("Training").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
import zipfile
from typing import Any, NamedTuple, Optional

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from torch_utils.persistence import CheckpointError  # one error type for every unreadable checkpoint
from torch_utils import training_stats
from training.ema import ema_beta, ema_halflife_nimg  # noqa: F401 -- the paper's EMA formulas, importable from here too
from training.loss import EDM2Loss  # noqa: F401 -- EDM2 pickles name it training.training_loop.EDM2Loss

STATE_FORMAT = 'edm-training-state'
STATE_VERSION = 2  # 2: 'ema' holds the EMA policy's state_dict (for the default policy, as in 1: the module's)

# ----------------------------------------------------------------------------
# Schedules (pure functions; the loop and the tests call these).


def linear_rampup_schedule(cur_nimg: int, batch_size: int, ref_lr: float, rampup_kimg: float) -> float:
    """The paper's learning-rate schedule: linear warm-up, ref_lr * min(nimg / (rampup_kimg * 1000), 1) (zero at
    the very first step), then constant. The loop calls the schedule named in lr_kwargs['func_name'] as
    f(cur_nimg=, batch_size=, **lr_kwargs), with cur_nimg = images seen before the step."""
    del batch_size
    return ref_lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)


def learning_rate_schedule(cur_nimg: float, batch_size: int, ref_lr: float = 100e-4, ref_batches: float = 70e3,
                           rampup_Mimg: float = 10) -> float:
    """EDM2's schedule (Karras et al. 2024, config E of Table 1): inverse square-root decay
    ref_lr / sqrt(max(t / t_ref, 1)) with t_ref = ref_batches * batch_size images, times a linear ramp-up
    over rampup_Mimg million images. ref_batches=0 or rampup_Mimg=0 turns that part off. Same call
    convention as linear_rampup_schedule (lr_kwargs func_name 'training.training_loop.learning_rate_schedule')."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return float(lr)


# What becomes of +-Inf gradients (NaN always becomes 0): the paper's loop clamps them, EDM2's zeroes them.
NONFINITE_GRAD_VALUES = {'clamp': 1e5, 'zero': 0.0}


def sanitize_gradients(params, posinf: float = 1e5) -> None:
    """Zero NaN gradients and replace +-Inf by +-posinf in place (the paper: 1e5; EDM2: 0), so one bad batch
    cannot poison the weights."""
    for param in params:
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=posinf, neginf=-posinf, out=param.grad)


def _pixels_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float32 [-1, 1], the data range the denoiser is trained on."""
    return images.to(torch.float32) / 127.5 - 1


# ----------------------------------------------------------------------------
# Checkpoint files.


def _to_cpu(obj: Any) -> Any:
    """Recursively move tensors to the CPU (dicts / lists / tuples of plain data)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _first_sentence(e: BaseException) -> str:
    """The first sentence of an exception's message on one line (torch's load errors go on for a paragraph)."""
    text = ' '.join(str(e).split())
    text = text.split('. ')[0].rstrip('.')
    return text if text else type(e).__name__


def load_training_state(path: str, mmap: bool = False) -> dict:
    """Read a training-state-*.pt written by this loop; raise CheckpointError with a one-line reason otherwise.
    mmap=True maps the tensors instead of reading them: a cheap check that the file is complete and readable
    (train.py does it before creating the run folder)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: training state not found') from None
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read training state ({e.strerror or e})') from None
    if not head:
        raise CheckpointError(f'{path}: empty file, not a training state; resume from an earlier training-state-*.pt')
    if not head.startswith(b'PK') and head[:1] != b'\x80':  # torch.save's zip archive or its legacy pickle
        raise CheckpointError(f'{path}: not a training state (not a file written by torch.save); pass a '
                              f'training-state-*.pt written by train.py')
    if head.startswith(b'PK') and not zipfile.is_zipfile(path):
        raise CheckpointError(f'{path}: truncated training state (its zip directory is missing: the write was cut '
                              f'short or the copy is incomplete); resume from an earlier training-state-*.pt')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and head.startswith(b'PK'))
    except Exception as e:
        if 'Unsupported global' in str(e):
            raise CheckpointError(f'{path}: this training state pickles live modules (the original EDM code\'s '
                                  f'format) and cannot be loaded safely; resume from its network-snapshot-*.pkl '
                                  f'with --transfer instead') from None
        raise CheckpointError(f'{path}: truncated or corrupt training state ({_first_sentence(e)}); resume '
                              f'from an earlier training-state-*.pt') from None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise CheckpointError(f'{path}: not a training state written by this training loop')
    version = state.get('version', 1)
    if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        raise CheckpointError(f'{path}: training state version {version!r} is not one this code reads '
                              f'(1..{STATE_VERSION}); resume it with the version of this project that wrote it')
    for key in ('net', 'ema', 'optimizer_state', 'cur_nimg'):
        if key not in state:
            raise CheckpointError(f'{path}: training state is missing "{key}"')
    return state


def _rng_state(device: torch.device) -> dict:
    state = dict(torch=torch.get_rng_state(), cuda=None)
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state['numpy'] = dict(name=str(name), key=torch.from_numpy(key.astype(np.int64)), pos=int(pos),
                          has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian))
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and state.get('cuda') is not None:
        torch.cuda.set_rng_state(state['cuda'], device)
    s = state['numpy']
    np.random.set_state((s['name'], s['key'].numpy().astype(np.uint32), s['pos'], s['has_gauss'],
                         s['cached_gaussian']))


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of all parameters and buffers (names and bytes): equal digests = identical weights."""
    h = hashlib.sha256()
    for name, tensor in misc.named_params_and_buffers(module):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather_objects(obj: Any, group) -> list:
    """all_gather_object on the CPU side group (works under NCCL too)."""
    world = dist.get_world_size()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


# ----------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT request a clean stop at the next step boundary.

_stop_signal: Optional[int] = None


def _request_stop(signum, _frame) -> None:
    global _stop_signal
    if _stop_signal is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # second Ctrl-C: give up on the clean stop
    _stop_signal = signum


def _install_signal_handlers() -> dict:
    previous = dict()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, _request_stop)
        except ValueError:  # not in the main thread: leave the defaults alone
            pass
    return previous


def _worker_ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process (which stops cleanly); they exit
    by themselves when the main process closes the loader or dies."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _signal_name(stopped) -> str:
    try:
        return signal.Signals(stopped).name
    except (ValueError, TypeError):
        return str(stopped)


def _agree_to_stop(vote: torch.Tensor, world: int, group, nonfinite: Optional[torch.Tensor] = None):
    """True on every rank as soon as any rank was asked to stop: ranks must leave the loop after the same
    step, or the next DDP all-reduce would hang. With `nonfinite` (this rank's [loss, gradients] flags of
    the step) the same all_reduce also tells every rank whether any rank saw a non-finite loss or gradient,
    and (stop, loss_nonfinite, grad_nonfinite) is returned."""
    vote.zero_()
    vote[0] = int(_stop_signal is not None or dist.should_stop())
    if nonfinite is not None:
        vote[1:3] = nonfinite.to(device='cpu', dtype=vote.dtype)
    if world > 1:
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, group=group)
    if nonfinite is None:
        return bool(vote[0].item())
    stop, loss_bad, grad_bad = (bool(v) for v in vote.tolist()[:3])
    return stop, loss_bad, grad_bad


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/Inf for nan_patience consecutive steps; raised on every rank at the same step,
    after the last good checkpoint and without writing the broken weights."""


# ----------------------------------------------------------------------------
# Public entry point.


def training_loop(run_dir='.', dataset_kwargs={}, data_loader_kwargs={}, network_kwargs={}, loss_kwargs={},
                  optimizer_kwargs={}, augment_kwargs=None, seed=0, batch_size=512, batch_gpu=None,
                  total_kimg=200000, ema_halflife_kimg=500, ema_rampup_ratio=0.05, lr_rampup_kimg=10000,
                  loss_scaling=1, kimg_per_tick=50, snapshot_ticks=50, state_dump_ticks=500, resume_pkl=None,
                  resume_state_dump=None, resume_kimg=0, cudnn_benchmark=True, device=torch.device('cuda'),
                  print_summary=True, provenance=None, ema_kwargs=None, lr_kwargs=None,
                  nan_patience=100, nonfinite_grads='clamp', metrics_kwargs=None) -> dnnlib.EasyDict:
    """Train a preconditioned denoiser on every rank of the current process group (none: a single process).

    The keyword names and defaults are those of the paper's training loop, so a training_options.json
    written by train.py is a valid call: `training_loop(**json.load(f), device=...)`. The dict arguments
    are only read, never modified.

    Args:
        run_dir: folder for log.txt, stats.jsonl, network-snapshot-*.pkl and training-state-*.pt. Only
            rank 0 writes there (other ranks may pass None).
        dataset_kwargs: `class_name` + constructor kwargs of the training set (training.dataset).
        data_loader_kwargs: extra kwargs for torch.utils.data.DataLoader (pin_memory, num_workers, ...).
        network_kwargs: `class_name` + kwargs of the preconditioned network (training.networks.*Precond);
            img_resolution, img_channels and label_dim are taken from the dataset.
        loss_kwargs: `class_name` + kwargs of the loss (training.loss.VPLoss / VELoss / EDMLoss).
        optimizer_kwargs: `class_name` + kwargs of the optimizer; its `lr` is the peak learning rate.
        augment_kwargs: `class_name` + kwargs of the augmentation pipeline (Appendix F), None = no augmentation.
        seed: global seed; rank r of W seeds numpy with seed * W + r and torch from that.
        batch_size: images per optimizer step, summed over all ranks.
        batch_gpu: most images one rank pushes through the network at once (None = batch_size / ranks);
            smaller values trade speed for memory via gradient accumulation.
        total_kimg: training length in thousands of images.
        ema_halflife_kimg: half-life of the weight EMA in thousands of images.
        ema_rampup_ratio: during ramp-up the EMA half-life is at most this fraction of the images seen so
            far; None = the full half-life from the first step (used for transfer learning).
        lr_rampup_kimg: length of the linear learning-rate warm-up in thousands of images.
        loss_scaling: constant the loss is multiplied with before backward (guards fp16 gradients).
        kimg_per_tick: thousands of images between status lines / stats.jsonl records.
        snapshot_ticks: ticks between network snapshots, None = never.
        state_dump_ticks: ticks between training states, None = only when stopped by a signal.
        resume_pkl: network pickle whose EMA weights initialise both the network and its EMA.
        resume_state_dump: training-state-*.pt to continue from (weights, optimizer, data order, RNG).
        resume_kimg: training progress to start counting from when resuming from a pickle only.
        cudnn_benchmark: value for torch.backends.cudnn.benchmark.
        device: device of this rank.
        print_summary: print the network's layer table on rank 0 before training.
        provenance: run metadata that train.py records in training_options.json; unused here.
        ema_kwargs: the weight-averaging policy, `class_name` + kwargs (see training/ema.py); None = the
            paper's EMA, training.ema.HalfLifeEMA(halflife_kimg=ema_halflife_kimg, rampup_ratio=ema_rampup_ratio).
        lr_kwargs: the learning-rate schedule, `func_name` + kwargs, called with cur_nimg and batch_size;
            None = the paper's warm-up, linear_rampup_schedule(ref_lr=optimizer_kwargs['lr'],
            rampup_kimg=lr_rampup_kimg).
        nan_patience: stop with TrainingDiverged once the loss has been NaN/Inf (on any rank) for this many
            consecutive steps; None = never. Checkpoints due while the latest loss is non-finite are skipped.
        nonfinite_grads: 'clamp' (the paper: NaN gradients -> 0, +-Inf -> +-1e5) or 'zero' (EDM2: all -> 0).
        metrics_kwargs: None (default), or kwargs of metrics.training_hook.TrainingMetrics (metrics, ref, detector,
            num, ...): the EMA network is scored at every snapshot on every rank; values go to stats.jsonl
            (Metrics/*), metrics.jsonl and metric-*.png in run_dir.

    Returns:
        EasyDict(cur_nimg, stopped): images trained on when the loop ended, and the signal number that
        ended it early (the string 'should_stop' for the distributed module's stop hook), else None.
    """
    global _stop_signal
    cfg = dnnlib.EasyDict(run_dir=run_dir, dataset_kwargs=dataset_kwargs, data_loader_kwargs=data_loader_kwargs,
                          network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, optimizer_kwargs=optimizer_kwargs,
                          augment_kwargs=augment_kwargs, seed=seed, batch_size=batch_size, total_kimg=total_kimg,
                          ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=ema_rampup_ratio,
                          lr_rampup_kimg=lr_rampup_kimg, loss_scaling=loss_scaling, kimg_per_tick=kimg_per_tick,
                          snapshot_ticks=snapshot_ticks, state_dump_ticks=state_dump_ticks, resume_pkl=resume_pkl,
                          resume_state_dump=resume_state_dump, resume_kimg=resume_kimg,
                          cudnn_benchmark=cudnn_benchmark, print_summary=print_summary, nan_patience=nan_patience,
                          metrics_kwargs=metrics_kwargs)
    cfg.ema_kwargs = dnnlib.EasyDict(ema_kwargs if ema_kwargs is not None else dict(
        class_name='training.ema.HalfLifeEMA', halflife_kimg=ema_halflife_kimg, rampup_ratio=ema_rampup_ratio))
    cfg.lr_kwargs = dnnlib.EasyDict(lr_kwargs if lr_kwargs is not None else dict(
        func_name='training.training_loop.linear_rampup_schedule', ref_lr=optimizer_kwargs['lr'],
        rampup_kimg=lr_rampup_kimg))
    if nonfinite_grads not in NONFINITE_GRAD_VALUES:
        raise ValueError(f'nonfinite_grads={nonfinite_grads!r}; expected one of {", ".join(NONFINITE_GRAD_VALUES)}')
    cfg.grad_posinf = NONFINITE_GRAD_VALUES[nonfinite_grads]
    del provenance
    _stop_signal = None
    dist.init()
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('training_loop: device is CUDA but no GPU is available; pass device=torch.device("cpu")')

    # train.py already tees the output into log.txt; direct callers get the same file.
    logger = None
    if rank == 0 and run_dir is not None and not isinstance(sys.stdout, dnnlib.util.Logger):
        os.makedirs(run_dir, exist_ok=True)
        logger = dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
    previous_handlers = _install_signal_handlers()
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as cfg.cleanup:
            # DDP complains when a 1x1 convolution's gradient arrives in another memory layout than its
            # bucket; the copy it makes is correct, the message is noise.
            warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
            return _train(cfg, batch_gpu, device, rank, world)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if logger is not None:
            logger.close()


# ----------------------------------------------------------------------------
# Set-up.


def _seed_rank(seed: int, rank: int, world: int, offset: int = 0) -> None:
    """Give every rank its own numpy and torch streams, derived from the global seed.

    `offset` (the images already seen) is only used when a training state cannot restore the exact streams."""
    np.random.seed((seed * world + rank + offset) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))


def _configure_numerics(cudnn_benchmark: bool) -> None:
    """Full fp32 matmuls and convolutions (no TF32, no reduced-precision fp16 reductions): training then
    matches the paper's numerics and stays reproducible across GPU generations."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def _cpu_side_group(world: int):
    """A gloo group for the small control messages (stop vote, RNG states, digests), so that under NCCL
    they never wait on the GPU stream. None = the default group, which already is gloo."""
    if world > 1 and torch.distributed.get_backend() != 'gloo':
        return torch.distributed.new_group(backend='gloo')
    return None


class _BatchLayout(NamedTuple):
    per_rank: int  # images one rank contributes to an optimizer step
    batch_gpu: int  # images per forward/backward pass
    rounds: int  # forward/backward passes per optimizer step


def _batch_layout(batch_size: int, batch_gpu: Optional[int], world: int) -> _BatchLayout:
    """Split the global batch: batch_size = world x rounds x batch_gpu, with batch_gpu capped at the
    per-rank share. Gradients of the rounds add up, so the step equals one pass over the whole batch."""
    if batch_size % world != 0:
        raise ValueError(f'batch_size={batch_size} is not divisible by the number of ranks ({world})')
    per_rank = batch_size // world
    chunk = per_rank if batch_gpu is None else min(batch_gpu, per_rank)
    if per_rank % chunk != 0:
        raise ValueError(f'per-rank batch {per_rank} (batch_size {batch_size} / {world} ranks) is not '
                         f'divisible by batch_gpu={chunk}')
    return _BatchLayout(per_rank=per_rank, batch_gpu=chunk, rounds=per_rank // chunk)


def _loader_options(data_loader_kwargs: dict, device: torch.device) -> dict:
    """DataLoader kwargs adjusted to what this process can use: worker-only options dropped without
    workers, workers that ignore Ctrl-C / SIGTERM, no pinned memory without CUDA."""
    options = dict(data_loader_kwargs)
    if options.get('num_workers', 0) == 0:
        options.pop('prefetch_factor', None)
        options.pop('persistent_workers', None)
    else:
        options.setdefault('worker_init_fn', _worker_ignore_signals)
    if device.type != 'cuda':
        options.pop('pin_memory', None)
    return options


def _make_data(cfg: dnnlib.EasyDict, layout: _BatchLayout, rank: int, world: int, device: torch.device,
               state: Optional[dict]) -> dnnlib.EasyDict:
    """Dataset, the endless shuffled stream of this rank's batches, and a cursor that tracks how far the
    loop (not the prefetching loader) has read, so a training state records the exact data position."""
    dist.print0('Loading dataset...')
    dataset = dnnlib.util.construct_class_by_name(**cfg.dataset_kwargs)
    sampler = misc.InfiniteSampler(dataset=dataset, rank=rank, num_replicas=world, seed=cfg.seed)
    if state is not None and state.get('sampler') is not None:
        try:
            sampler.load_state_dict(state['sampler'])
        except ValueError as e:
            raise CheckpointError(f'{cfg.resume_state_dump}: {e} (same --data as the original run?)') from None
    cursor = sampler.cursor()
    loader = torch.utils.data.DataLoader(dataset=dataset, sampler=sampler, batch_size=layout.batch_gpu,
                                         **_loader_options(cfg.data_loader_kwargs, device))
    batches = iter(loader)
    if cfg.get('cleanup') is not None:
        cfg.cleanup.callback(_stop_workers, batches)
    return dnnlib.EasyDict(dataset=dataset, cursor=cursor, batches=batches)


def _stop_workers(batches) -> None:
    """Stop the loader's worker processes as soon as training_loop ends, also on an error. They ignore
    SIGTERM (see _worker_ignore_signals), so multiprocessing's exit handler, which terminates and then
    joins them, would wait for them forever if they were left to it."""
    shutdown = getattr(batches, '_shutdown_workers', None)  # torch's multi-process loader iterator
    if shutdown is not None:
        shutdown()


def _make_networks(cfg: dnnlib.EasyDict, dataset, batch_gpu: int, rank: int,
                   device: torch.device) -> dnnlib.EasyDict:
    """The trainable denoiser D (shape from the dataset), its DDP wrapper, the EMA copy used for sampling,
    the loss that draws sigma and weights the error, the optimizer and the optional augmentation pipe."""
    dist.print0('Constructing network...')
    net = dnnlib.util.construct_class_by_name(**cfg.network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net.train().requires_grad_(True).to(device)
    if rank == 0 and cfg.print_summary:
        shape = [batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]
        probe = [torch.zeros(shape, device=device), torch.ones([batch_gpu], device=device),
                 torch.zeros([batch_gpu, net.label_dim], device=device)]
        with torch.no_grad():
            misc.print_module_summary(net, probe, max_nesting=2)

    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**cfg.loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **cfg.optimizer_kwargs)
    augment_pipe = None
    if cfg.augment_kwargs is not None:
        augment_pipe = dnnlib.util.construct_class_by_name(**cfg.augment_kwargs)
    if dist.get_world_size() > 1:
        # Ranks build their networks from different seeds, and DDP below (broadcast_buffers=False) no longer
        # syncs buffers at construction in recent torch: random buffers (the Fourier features of NCSN++ and
        # EDM2) would differ between ranks. Rank 0's are the network's.
        for buffer in net.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    with warnings.catch_warnings():  # recent torch deprecates broadcast_buffers=False; it is what we mean
        warnings.filterwarnings('ignore', message='.*broadcast_buffers.*')
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)
    ema = dnnlib.util.construct_class_by_name(net=net, **cfg.ema_kwargs)
    return dnnlib.EasyDict(net=net, ddp=ddp, ema=ema, loss_fn=loss_fn, optimizer=optimizer,
                           augment_pipe=augment_pipe)


# ----------------------------------------------------------------------------
# Resume.


def _load_network_pickle(path: str, model: dnnlib.EasyDict, rank: int) -> None:
    """Transfer learning: start both the network and its EMA from a snapshot's EMA weights."""
    dist.print0(f'Loading network weights from "{path}"...')
    if rank != 0:
        dist.barrier()  # let rank 0 fill the download cache first
    try:
        source = persistence.load_network(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{path}: cannot load network snapshot ({e})') from None
    if rank == 0:
        dist.barrier()
    if getattr(source, 'label_dim', model.net.label_dim) != model.net.label_dim:
        raise CheckpointError(f'{path}: network has label_dim={source.label_dim} but the dataset gives '
                              f'{model.net.label_dim} (check --cond and the dataset labels)')
    try:
        copied = misc.copy_params_and_buffers(src_module=source, dst_module=model.net, require_all=False)
        for ema_module, _suffix in model.ema.get():
            misc.copy_params_and_buffers(src_module=source, dst_module=ema_module, require_all=False)
    except ValueError as e:
        raise CheckpointError(f'{path}: {e} (same --arch/--cbase/--cres as that network?)') from None
    if copied == 0:  # e.g. compress.py's int8 snapshots: their tensors have other names
        raise CheckpointError(f'{path}: none of its tensors matches the network built from the current options '
                              f'(an int8 snapshot? transfer from the float snapshot it was made from)')


def _load_state_into(state: dict, path: str, net: torch.nn.Module, ema, optimizer: torch.optim.Optimizer) -> None:
    """Copy weights, EMA and optimizer moments from a training state, with one-line errors on mismatch."""
    for name, target in (('net', net), ('ema', ema)):
        try:
            target.load_state_dict(state[name])  # strict for modules and EMA policies alike
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(f'{path}: "{name}" does not match the network built from the current options '
                                  f'(same --arch/--precond/--cbase/--cres/--cond/--augment as the original run?): '
                                  f'{" ".join(first[:2])}') from None
    try:
        optimizer.load_state_dict(state['optimizer_state'])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f'{path}: optimizer state does not match the network ({e})') from None


def _restore(cfg: dnnlib.EasyDict, model: dnnlib.EasyDict, state: Optional[dict], rank: int, world: int,
             device: torch.device) -> int:
    """Bring the freshly built run to where it should start and return that position in images.

    A training state carries its own EMA weights, so a network pickle is only read without one
    (transfer learning, or the paper's --resume of a pickle plus resume_kimg)."""
    cur_nimg = int(cfg.resume_kimg * 1000)
    if cfg.resume_pkl is not None and state is None:
        _load_network_pickle(cfg.resume_pkl, model, rank)
    if state is None:
        return cur_nimg
    _load_state_into(state, cfg.resume_state_dump, model.net, model.ema, model.optimizer)
    cur_nimg = int(state['cur_nimg'])
    streams = state.get('rng')
    if streams is not None and len(streams) == world:
        _set_rng_state(streams[rank], device)  # each rank continues its own random streams exactly
    else:
        dist.print0(f'Warning: training state was written by {0 if streams is None else len(streams)} ranks, '
                    f'now {world}; random streams are re-seeded (training continues, not bit-exact)')
        _seed_rank(cfg.seed, rank, world, offset=cur_nimg)
    return cur_nimg


# ----------------------------------------------------------------------------
# One training step.


def _train_step(cfg: dnnlib.EasyDict, model: dnnlib.EasyDict, batches, layout: _BatchLayout, cur_nimg: int,
                device: torch.device) -> torch.Tensor:
    """One optimizer step over batch_size images.

    Each rank runs `layout.rounds` forward/backward passes and DDP averages the gradients across ranks only
    on the last one. The per-pixel loss is summed and divided by the per-rank batch (times loss_scaling),
    matching the paper's objective; the learning rate follows the warm-up schedule of the images seen so far.
    Returns this rank's flags [loss not finite, gradients not finite] (a tensor on `device`, not synced)."""
    model.optimizer.zero_grad(set_to_none=True)
    loss_finite = torch.ones([], dtype=torch.bool, device=device)
    for round_idx in range(layout.rounds):
        with misc.ddp_sync(model.ddp, round_idx == layout.rounds - 1):
            images, labels = next(batches)
            images = _pixels_to_model_range(images.to(device))
            loss = model.loss_fn(net=model.ddp, images=images, labels=labels.to(device),
                                 augment_pipe=model.augment_pipe)
            training_stats.report('Loss/loss', loss)
            loss_finite &= torch.isfinite(loss).all()
            loss.sum().mul(cfg.loss_scaling / layout.per_rank).backward()

    lr = dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=cfg.batch_size, **cfg.lr_kwargs)
    for group in model.optimizer.param_groups:
        group['lr'] = lr
    grads = [p.grad for p in model.net.parameters() if p.grad is not None]
    grads_finite = torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)).to(device)
    sanitize_gradients(model.net.parameters(), posinf=cfg.grad_posinf)
    model.optimizer.step()
    return torch.stack([~loss_finite, ~grads_finite])


# ----------------------------------------------------------------------------
# Ticks: progress is reported every kimg_per_tick thousand images; checkpoints are counted in ticks.


@dataclasses.dataclass
class _TickClock:
    index: int
    start_nimg: int
    start_time: float
    maintenance_sec: float  # time between the end of the previous tick's steps and the start of this tick

    def due(self, cur_nimg: int, kimg_per_tick: float) -> bool:
        """Tick 0 ends after the very first step (an early sign of life); later ticks span kimg_per_tick."""
        return self.index == 0 or cur_nimg >= self.start_nimg + kimg_per_tick * 1000

    def next_tick(self, cur_nimg: int, steps_end_time: float) -> None:
        self.index += 1
        self.start_nimg = cur_nimg
        self.start_time = time.time()
        self.maintenance_sec = self.start_time - steps_end_time


def _every(ticks: Optional[int], tick: int, done: bool) -> bool:
    """Whether a periodic save falls on this tick (None = never); the final tick always saves."""
    return ticks is not None and (done or tick % ticks == 0)


def _report_tick(clock: _TickClock, cur_nimg: int, now: float, run_start: float, device: torch.device,
                 losses: Optional[training_stats.Collector] = None, metrics_sec: Optional[float] = None) -> str:
    """Record this tick's progress, timing and memory in training_stats (-> stats.jsonl) and return the
    same numbers as the status line. With `losses` (a Collector of Loss/*, updated here: a collective) the
    line also shows the tick's mean loss and, if there were any, its steps with a non-finite loss."""
    tick_sec = now - clock.start_time
    peak_gb = reserved_gb = 0.0
    if device.type == 'cuda':
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
        reserved_gb = torch.cuda.max_memory_reserved(device) / 2**30
    columns = [  # (label, stats name, value, format spec)
        ('tick', 'Progress/tick', clock.index, '<5d'),
        ('kimg', 'Progress/kimg', cur_nimg / 1e3, '<9.1f'),
        ('time', 'Timing/total_sec', now - run_start, None),
        ('sec/tick', 'Timing/sec_per_tick', tick_sec, '<7.1f'),
        ('sec/kimg', 'Timing/sec_per_kimg', tick_sec / (cur_nimg - clock.start_nimg) * 1e3, '<7.2f'),
        ('maintenance', 'Timing/maintenance_sec', clock.maintenance_sec, '<6.1f'),
        ('cpumem', 'Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30, '<6.2f'),
        ('gpumem', 'Resources/peak_gpu_mem_gb', peak_gb, '<6.2f'),
        ('reserved', 'Resources/peak_gpu_mem_reserved_gb', reserved_gb, '<6.2f'),
    ] + ([('metrics', 'Timing/metrics_total_sec', metrics_sec, None)] if metrics_sec is not None else [])
    parts = []
    for label, stat_name, value, spec in columns:
        value = training_stats.report0(stat_name, value)
        text = f'{dnnlib.util.format_time(value):<12s}' if spec is None else format(value, spec)
        parts.append(f'{label} {text}')
    if losses is not None:
        losses.update()
        loss_columns = [f'loss {losses.mean("Loss/loss"):<8.4f}']
        bad_steps = round(losses.mean('Loss/nonfinite') * losses.num('Loss/nonfinite')) if losses.num('Loss/nonfinite') else 0
        if bad_steps:
            loss_columns.append(f'nonfinite {bad_steps}')
        parts[2:2] = loss_columns  # after tick and kimg
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)  # the next tick reports its own peak
    return ' '.join(parts)


# ----------------------------------------------------------------------------
# Saving.


def _save_state(cfg: dnnlib.EasyDict, model: dnnlib.EasyDict, cursor, cur_nimg: int, rank: int, world: int,
                device: torch.device, group) -> None:
    """training-state-<kimg>.pt: weights, EMA, Adam moments, data position and every rank's RNG state.

    All ranks take part (they send rank 0 their RNG state and a digest of their weights); rank 0 writes."""
    streams = _gather_objects(_rng_state(device), group)
    digests = _gather_objects(module_digest(model.net), group)
    if rank != 0:
        return
    if len(set(digests)) != 1:
        print(f'Warning: ranks hold different weights at {cur_nimg / 1000:.1f} kimg: {digests}')
    state = dict(
        format=STATE_FORMAT, version=STATE_VERSION,
        cur_nimg=int(cur_nimg), batch_size=int(cfg.batch_size), world_size=int(world), seed=int(cfg.seed),
        net=_to_cpu(model.net.state_dict()), ema=_to_cpu(model.ema.state_dict()),
        ema_class=cfg.ema_kwargs.class_name,
        optimizer_state=_to_cpu(model.optimizer.state_dict()),
        sampler=cursor.state_dict(), rng=streams, rank_digests=digests,
    )
    with dnnlib.util.atomic_write(os.path.join(cfg.run_dir, f'training-state-{cur_nimg//1000:06d}.pt')) as f:
        torch.save(state, f)


def _frozen_cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of `module` on the CPU, after checking every rank holds the same weights."""
    module = copy.deepcopy(module).eval().requires_grad_(False)
    misc.check_ddp_consistency(module)
    return module.cpu()


def snapshot_name(cur_nimg: int, suffix: str = '') -> str:
    """network-snapshot-<kimg:06d>.pkl (the paper's name) for the default EMA, and EDM2's
    network-snapshot-<kimg:07d><suffix>.pkl (e.g. '-0.050') for each profile of a multi-profile EMA."""
    kimg = cur_nimg // 1000
    return f'network-snapshot-{kimg:06d}.pkl' if not suffix else f'network-snapshot-{kimg:07d}{suffix}.pkl'


def _save_snapshot(cfg: dnnlib.EasyDict, model: dnnlib.EasyDict, cur_nimg: int, rank: int) -> None:
    """network-snapshot-*.pkl in the paper's layout: {ema, loss_fn, augment_pipe, dataset_kwargs}, one per
    averaged network the EMA policy returns. All ranks take part in the consistency check; rank 0 writes."""
    for ema, suffix in model.ema.get():
        contents = dict(ema=ema, loss_fn=model.loss_fn, augment_pipe=model.augment_pipe,
                        dataset_kwargs=dict(cfg.dataset_kwargs))
        if suffix:
            # EDM2's layout names files by kimg only; post-hoc EMA (reconstruct_phema.py) needs the exact
            # images seen, stored as the first key so it can be read without loading the network.
            contents = dict(cur_nimg=int(cur_nimg), **contents)
        contents = {key: _frozen_cpu_copy(value) if isinstance(value, torch.nn.Module) else value
                    for key, value in contents.items()}
        if rank == 0:
            persistence.save_network_pkl(contents, os.path.join(cfg.run_dir, snapshot_name(cur_nimg, suffix)))


def _append_stats(stats_file, run_dir: Optional[str], rank: int, extra: Optional[dict] = None):
    """Close this tick's training_stats window (collective) and append it as one line of stats.jsonl, with
    `extra` entries (this tick's metrics). Returns the open file (rank 0 opens it on first use)."""
    training_stats.default_collector.update()
    if rank != 0:
        return stats_file
    if stats_file is None:
        stats_file = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
    record = dict(training_stats.default_collector.as_dict(), **(extra or {}), timestamp=time.time())
    stats_file.write(json.dumps(record) + '\n')
    stats_file.flush()
    return stats_file


def _score_snapshot(scorer, model: dnnlib.EasyDict, cur_nimg: int) -> dict:
    """Score the (first) EMA network with --metrics on every rank; returns the stats.jsonl entries."""
    from metrics.scoring import format_results
    ema, suffix = model.ema.get()[0]
    result = scorer(ema, cur_nimg, snapshot_name(cur_nimg, suffix))
    dist.print0(f'Metrics at {cur_nimg / 1000:.1f} kimg: {format_results(result["values"])} '
                f'({result["seconds"]:.1f} s)')
    return result['stats']


# ----------------------------------------------------------------------------
# The loop.


def _train(cfg: dnnlib.EasyDict, batch_gpu: Optional[int], device: torch.device, rank: int,
           world: int) -> dnnlib.EasyDict:
    run_start = time.time()
    _seed_rank(cfg.seed, rank, world)
    _configure_numerics(cfg.cudnn_benchmark)
    training_stats.init_multiprocessing(rank=rank, sync_device=device if device.type == 'cuda' else None)
    side_group = _cpu_side_group(world)
    layout = _batch_layout(cfg.batch_size, batch_gpu, world)

    # The training state is read before the data: it says where the sampler stood.
    state = None
    if cfg.resume_state_dump is not None:
        dist.print0(f'Loading training state from "{cfg.resume_state_dump}"...')
        state = load_training_state(cfg.resume_state_dump)
    data = _make_data(cfg, layout, rank, world, device, state)
    model = _make_networks(cfg, data.dataset, layout.batch_gpu, rank, device)
    cur_nimg = _restore(cfg, model, state, rank, world, device)
    state = None  # free the checkpoint tensors before training
    scorer = None
    if cfg.metrics_kwargs:  # reference and detector loaded (and checked) before the first step
        from metrics.training_hook import TrainingMetrics
        scorer = TrainingMetrics(cfg.run_dir if rank == 0 else None, device=device, **cfg.metrics_kwargs)

    if cur_nimg >= cfg.total_kimg * 1000:
        dist.print0(f'Already trained for {cur_nimg / 1000:g} kimg >= total_kimg={cfg.total_kimg}; nothing to do.')
        return dnnlib.EasyDict(cur_nimg=cur_nimg, stopped=None)

    dist.print0(f'Training for {cfg.total_kimg} kimg...')
    dist.print0()
    now = time.time()
    clock = _TickClock(index=0, start_nimg=cur_nimg, start_time=now, maintenance_sec=now - run_start)
    dist.update_progress(cur_nimg // 1000, cfg.total_kimg)
    stop_vote = torch.zeros([3], dtype=torch.int32)
    tick_losses = training_stats.Collector(regex='Loss/.*', keep_previous=False)
    nonfinite_steps = 0  # consecutive steps whose loss was NaN/Inf on some rank (the same count on every rank)
    stats_file = None
    stopped = None
    try:
        while True:
            nonfinite = _train_step(cfg, model, data.batches, layout, cur_nimg, device)
            cur_nimg += cfg.batch_size
            model.ema.update(cur_nimg=cur_nimg, batch_size=cfg.batch_size)
            data.cursor.advance(cfg.batch_size)
            done = cur_nimg >= cfg.total_kimg * 1000
            stop_requested, loss_bad, grad_bad = _agree_to_stop(stop_vote, world, side_group, nonfinite)
            training_stats.report0('Loss/nonfinite', int(loss_bad))
            training_stats.report0('Loss/nonfinite_grad', int(grad_bad))
            nonfinite_steps = nonfinite_steps + 1 if loss_bad else 0
            diverged = cfg.nan_patience is not None and nonfinite_steps >= cfg.nan_patience
            if not (done or stop_requested or diverged or clock.due(cur_nimg, cfg.kimg_per_tick)):
                continue

            # End of a tick: report, then checkpoints, then the stats record.
            steps_end = time.time()
            dist.print0(_report_tick(clock, cur_nimg, steps_end, run_start, device, losses=tick_losses,
                                     metrics_sec=None if scorer is None else scorer.total_sec))
            if diverged:  # every rank raises here, after the same step
                stats_file = _append_stats(stats_file, cfg.run_dir, rank)
                raise TrainingDiverged(f'the loss has been NaN/Inf for {nonfinite_steps} consecutive steps (at '
                                       f'{cur_nimg / 1000:.1f} kimg); stopped without saving these weights. Lower '
                                       f'--lr, lengthen --lr-rampup (or raise --ls with --fp16) and start again, '
                                       f'or resume from the last training-state-*.pt')
            if stop_requested and not done:
                done = True
                stopped = _stop_signal if _stop_signal is not None else 'should_stop'
                dist.print0()
                dist.print0(f'Stop requested ({_signal_name(stopped)}); saving training state and exiting...')
            # The state goes first: it is what a preempted job needs. Tick 0 (one step) gets none unless last.
            save_state = (stopped is not None or _every(cfg.state_dump_ticks, clock.index, done)) and (clock.index or done)
            save_snapshot = _every(cfg.snapshot_ticks, clock.index, done)
            if nonfinite_steps and (save_state or save_snapshot):  # never write broken weights over good ones
                dist.print0(f'Warning: the loss of the latest step is NaN/Inf; skipping the checkpoints due at '
                            f'{cur_nimg / 1000:.1f} kimg')
                save_state = save_snapshot = False
            if save_state:
                _save_state(cfg, model, data.cursor, cur_nimg, rank, world, device, side_group)
            if save_snapshot:
                _save_snapshot(cfg, model, cur_nimg, rank)
            scored = _score_snapshot(scorer, model, cur_nimg) if save_snapshot and scorer is not None else None
            stats_file = _append_stats(stats_file, cfg.run_dir, rank, extra=scored)
            dist.update_progress(cur_nimg // 1000, cfg.total_kimg)
            clock.next_tick(cur_nimg, steps_end)
            if done:
                break
    finally:
        if stats_file is not None:
            stats_file.close()

    del data  # closes the loader and its worker processes
    dist.print0()
    dist.print0('Exiting...')
    return dnnlib.EasyDict(cur_nimg=cur_nimg, stopped=stopped)
