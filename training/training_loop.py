"""The main training loop of EDM: DDP over ranks, gradient accumulation, learning-rate ramp-up,
EMA of the weights, periodic snapshots / state dumps, and exact resume.

Beyond the paper's loop:
- training-state files hold only tensors and plain data (torch.load(weights_only=True) reads them),
  including the data sampler's position and every rank's RNG state, so a resumed run reproduces the
  uninterrupted run bit for bit on CPU;
- checkpoints are written atomically (temporary file in the same folder, then os.replace);
- SIGTERM / SIGINT (cluster preemption, Ctrl-C) make every rank stop at the next step boundary,
  write a training state and return normally.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import sys
import time
import warnings
from typing import Any, Optional

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats

STATE_FORMAT = 'edm-training-state'
STATE_VERSION = 1

# ----------------------------------------------------------------------------
# Schedules (pure functions; the loop and the tests call these).


def learning_rate(base_lr: float, cur_nimg: int, lr_rampup_kimg: float) -> float:
    """Linear warm-up: lr * min(nimg / (lr_rampup_kimg * 1000), 1). Zero at the very first step."""
    return base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)


def ema_halflife_nimg(cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio: Optional[float]) -> float:
    """EMA half-life in images; during ramp-up it is at most `ema_rampup_ratio` of the images seen."""
    halflife = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife = min(halflife, cur_nimg * ema_rampup_ratio)
    return halflife


def ema_beta(batch_size: int, cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio: Optional[float]) -> float:
    """Per-step EMA decay: beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))."""
    halflife = ema_halflife_nimg(cur_nimg, ema_halflife_kimg, ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


def sanitize_gradients(params) -> None:
    """Zero NaN gradients and clamp +-Inf to +-1e5 in place, so one bad batch cannot poison the weights."""
    for param in params:
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)


# ----------------------------------------------------------------------------
# Log file: rank 0 mirrors stdout/stderr into run_dir/log.txt.


class Logger:
    """Tee stdout and stderr to a file (append mode) until close()."""

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'a', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def write(self, text: str) -> None:
        if len(text) == 0:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


# ----------------------------------------------------------------------------
# Checkpoint files.


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _to_cpu(obj: Any) -> Any:
    """Recursively move tensors to the CPU (dicts / lists / tuples of plain data)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class CheckpointError(ValueError):
    """A checkpoint to resume from is unreadable or does not fit the current run (one-line message)."""


def load_training_state(path: str) -> dict:
    """Read a training-state-*.pt written by this loop; raise CheckpointError with a one-line reason otherwise."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: training state not found')
    except Exception as e:
        if 'Unsupported global' in str(e):
            raise CheckpointError(f'{path}: this training state pickles live modules (the original EDM code\'s '
                             f'format) and cannot be loaded safely; resume from its network-snapshot-*.pkl '
                             f'with --transfer instead') from None
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'{path}: not a readable training state ({reason[:200]})') from None
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise CheckpointError(f'{path}: not a training state written by this training loop')
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


# ----------------------------------------------------------------------------


def training_loop(
    run_dir             = '.',      # Output directory.
    dataset_kwargs      = {},       # Options for training set.
    data_loader_kwargs  = {},       # Options for torch.utils.data.DataLoader.
    network_kwargs      = {},       # Options for model and preconditioning.
    loss_kwargs         = {},       # Options for loss function.
    optimizer_kwargs    = {},       # Options for optimizer.
    augment_kwargs      = None,     # Options for augmentation pipeline, None = disable.
    seed                = 0,        # Global random seed.
    batch_size          = 512,      # Total batch size for one training iteration.
    batch_gpu           = None,     # Limit batch size per GPU, None = no limit.
    total_kimg          = 200000,   # Training duration, measured in thousands of training images.
    ema_halflife_kimg   = 500,      # Half-life of the exponential moving average (EMA) of model weights.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient, None = no rampup.
    lr_rampup_kimg      = 10000,    # Learning rate ramp-up duration.
    loss_scaling        = 1,        # Loss scaling factor for reducing FP16 under/overflows.
    kimg_per_tick       = 50,       # Interval of progress prints.
    snapshot_ticks      = 50,       # How often to save network snapshots, None = disable.
    state_dump_ticks    = 500,      # How often to dump training state, None = disable.
    resume_pkl          = None,     # Start from the given network snapshot, None = random initialization.
    resume_state_dump   = None,     # Start from the given training state, None = reset training state.
    resume_kimg         = 0,        # Start from the given training progress.
    cudnn_benchmark     = True,     # Enable torch.backends.cudnn.benchmark?
    device              = torch.device('cuda'),
    print_summary       = True,     # Print the network summary table on rank 0.
    provenance          = None,     # Recorded in training_options.json by train.py; unused here.
) -> dnnlib.EasyDict:
    """Train; returns EasyDict(cur_nimg, stopped) where stopped names the signal that ended it early."""
    global _stop_signal
    _stop_signal = None
    dist.init()
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('training_loop: device is CUDA but no GPU is available; pass device=torch.device("cpu")')

    logger = None
    if rank == 0 and run_dir is not None and not isinstance(sys.stdout, Logger):
        os.makedirs(run_dir, exist_ok=True)
        logger = Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
    previous_handlers = _install_signal_handlers()
    args = dict(locals())
    try:
        with warnings.catch_warnings():
            # Harmless DDP notice for 1x1 convolutions whose grads come back in another memory layout.
            warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
            return _training_loop(**{k: args[k] for k in _LOOP_ARGS})
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if logger is not None:
            logger.close()


_LOOP_ARGS = ('run_dir dataset_kwargs data_loader_kwargs network_kwargs loss_kwargs optimizer_kwargs augment_kwargs '
              'seed batch_size batch_gpu total_kimg ema_halflife_kimg ema_rampup_ratio lr_rampup_kimg loss_scaling '
              'kimg_per_tick snapshot_ticks state_dump_ticks resume_pkl resume_state_dump resume_kimg cudnn_benchmark '
              'device print_summary rank world').split()


def _training_loop(*, run_dir, dataset_kwargs, data_loader_kwargs, network_kwargs, loss_kwargs, optimizer_kwargs,
                   augment_kwargs, seed, batch_size, batch_gpu, total_kimg, ema_halflife_kimg, ema_rampup_ratio,
                   lr_rampup_kimg, loss_scaling, kimg_per_tick, snapshot_ticks, state_dump_ticks, resume_pkl,
                   resume_state_dump, resume_kimg, cudnn_benchmark, device, print_summary, rank, world):
    # Initialize.
    start_time = time.time()
    np.random.seed((seed * world + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    training_stats.init_multiprocessing(rank=rank, sync_device=device if device.type == 'cuda' else None)
    # Stop flags and RNG states travel over a CPU gloo group so they never sync the GPU stream.
    cpu_group = None
    if world > 1 and torch.distributed.get_backend() != 'gloo':
        cpu_group = torch.distributed.new_group(backend='gloo')

    # Select batch size per GPU.
    if batch_size % world != 0:
        raise ValueError(f'batch_size={batch_size} is not divisible by the number of ranks ({world})')
    batch_gpu_total = batch_size // world
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'per-rank batch {batch_gpu_total} (batch_size {batch_size} / {world} ranks) is not '
                         f'divisible by batch_gpu={batch_gpu}')
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    assert batch_size == batch_gpu * num_accumulation_rounds * world

    # Training state to resume from (read first: it positions the data sampler).
    state = None
    if resume_state_dump is not None:
        dist.print0(f'Loading training state from "{resume_state_dump}"...')
        state = load_training_state(resume_state_dump)

    # Load dataset.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    dataset_sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world, seed=seed)
    if state is not None and state.get('sampler') is not None:
        try:
            dataset_sampler.load_state_dict(state['sampler'])
        except ValueError as e:
            raise CheckpointError(f'{resume_state_dump}: {e} (same --data as the original run?)') from None
    sampler_cursor = dataset_sampler.cursor()  # mirrors what the loop has consumed (the loader prefetches)
    loader_kwargs = dict(data_loader_kwargs)
    if loader_kwargs.get('num_workers', 0) == 0:
        loader_kwargs.pop('prefetch_factor', None)
        loader_kwargs.pop('persistent_workers', None)
    elif 'worker_init_fn' not in loader_kwargs:
        loader_kwargs['worker_init_fn'] = _worker_ignore_signals
    if device.type != 'cuda':
        loader_kwargs.pop('pin_memory', None)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=dataset_sampler,
                                                        batch_size=batch_gpu, **loader_kwargs))

    # Construct network.
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                            label_dim=dataset_obj.label_dim)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)  # subclass of torch.nn.Module
    net.train().requires_grad_(True).to(device)
    if rank == 0 and print_summary:
        with torch.no_grad():
            images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
            sigma = torch.ones([batch_gpu], device=device)
            labels = torch.zeros([batch_gpu, net.label_dim], device=device)
            misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)

    # Setup optimizer.
    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)  # training.loss.(VP|VE|EDM)Loss
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)  # torch.optim.Adam
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    with warnings.catch_warnings():  # newer torch deprecates broadcast_buffers; its meaning is what we want
        warnings.filterwarnings('ignore', message='.*broadcast_buffers.*')
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)
    ema = copy.deepcopy(net).eval().requires_grad_(False)

    # Resume training from previous snapshot.
    cur_nimg = int(resume_kimg * 1000)
    if resume_pkl is not None and not (state is not None and 'ema' in state):
        from torch_utils import persistence  # networks owner's safe loader
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        if rank != 0:
            dist.barrier()  # rank 0 goes first (downloads into the cache)
        try:
            data = persistence.load_network_pkl(resume_pkl)
        except (OSError, ValueError) as e:
            raise CheckpointError(f'{resume_pkl}: cannot load network snapshot ({e})') from None
        if rank == 0:
            dist.barrier()  # other ranks follow
        src = data['ema']
        if getattr(src, 'label_dim', net.label_dim) != net.label_dim:
            raise CheckpointError(f'{resume_pkl}: network has label_dim={src.label_dim} but the dataset gives '
                             f'{net.label_dim} (check --cond and the dataset labels)')
        try:
            misc.copy_params_and_buffers(src_module=src, dst_module=net, require_all=False)
            misc.copy_params_and_buffers(src_module=src, dst_module=ema, require_all=False)
        except ValueError as e:
            raise CheckpointError(f'{resume_pkl}: {e} (same --arch/--cbase/--cres as that network?)') from None
        del data, src
    if state is not None:
        _load_state_into(state, resume_state_dump, net, ema, optimizer)
        cur_nimg = int(state['cur_nimg'])
        rngs = state.get('rng')
        if rngs is not None and len(rngs) == world:
            _set_rng_state(rngs[rank], device)  # continue every rank's random streams exactly
        else:
            dist.print0(f'Warning: training state was written by {0 if rngs is None else len(rngs)} ranks, '
                        f'now {world}; random streams are re-seeded (training continues, not bit-exact)')
            np.random.seed((seed * world + rank + cur_nimg) % (1 << 31))
            torch.manual_seed(np.random.randint(1 << 31))
        del state

    if cur_nimg >= total_kimg * 1000:
        dist.print0(f'Already trained for {cur_nimg / 1000:g} kimg >= total_kimg={total_kimg}; nothing to do.')
        return dnnlib.EasyDict(cur_nimg=cur_nimg, stopped=None)

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    start_nimg = cur_nimg
    cur_tick = 0
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    dist.update_progress(cur_nimg // 1000, total_kimg)
    stats_jsonl = None
    stopped = None
    stop_flag = torch.zeros([1], dtype=torch.int32)
    while True:

        # Accumulate gradients.
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(num_accumulation_rounds):
            with misc.ddp_sync(ddp, (round_idx == num_accumulation_rounds - 1)):
                images, labels = next(dataset_iterator)
                images = images.to(device).to(torch.float32) / 127.5 - 1
                labels = labels.to(device)
                loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
                training_stats.report('Loss/loss', loss)
                loss.sum().mul(loss_scaling / batch_gpu_total).backward()

        # Update weights.
        lr = learning_rate(optimizer_kwargs['lr'], cur_nimg, lr_rampup_kimg)
        for g in optimizer.param_groups:
            g['lr'] = lr
        sanitize_gradients(net.parameters())
        optimizer.step()

        # Update EMA.
        beta = ema_beta(batch_size, cur_nimg, ema_halflife_kimg, ema_rampup_ratio)
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))

        # Perform maintenance tasks once per tick.
        cur_nimg += batch_size
        sampler_cursor.advance(batch_size)
        done = (cur_nimg >= total_kimg * 1000)

        # Preemption: every rank agrees on stopping at this step boundary.
        stop_flag.fill_(int(_stop_signal is not None or dist.should_stop()))
        if world > 1:
            torch.distributed.all_reduce(stop_flag, op=torch.distributed.ReduceOp.MAX, group=cpu_group)
        stop_requested = bool(stop_flag.item())

        if (not done) and (not stop_requested) and (cur_tick != 0) and \
                (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        # Print status line, accumulating the same information in training_stats.
        tick_end_time = time.time()
        fields = []
        fields += [f"tick {training_stats.report0('Progress/tick', cur_tick):<5d}"]
        fields += [f"kimg {training_stats.report0('Progress/kimg', cur_nimg / 1e3):<9.1f}"]
        fields += [f"time {dnnlib.util.format_time(training_stats.report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]
        fields += [f"sec/tick {training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time):<7.1f}"]
        fields += [f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / (cur_nimg - tick_start_nimg) * 1e3):<7.2f}"]
        fields += [f"maintenance {training_stats.report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
        fields += [f"cpumem {training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
        gpumem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
        reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == 'cuda' else 0.0
        fields += [f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', gpumem):<6.2f}"]
        fields += [f"reserved {training_stats.report0('Resources/peak_gpu_mem_reserved_gb', reserved):<6.2f}"]
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        dist.print0(' '.join(fields))

        # Check for abort.
        if (not done) and stop_requested:
            done = True
            stopped = _stop_signal if _stop_signal is not None else 'should_stop'
            dist.print0()
            dist.print0(f'Stop requested ({_signal_name(stopped)}); saving training state and exiting...')

        # Save full dump of the training state (first: it is what a preempted job needs).
        dump_due = (state_dump_ticks is not None) and (done or cur_tick % state_dump_ticks == 0)
        if (dump_due or stopped is not None) and (cur_tick != 0 or done) and cur_nimg > start_nimg:
            rngs = _gather_objects(_rng_state(device), cpu_group)
            digests = _gather_objects(module_digest(net), cpu_group)
            if rank == 0:
                if len(set(digests)) != 1:
                    print(f'Warning: ranks hold different weights at {cur_nimg / 1000:.1f} kimg: {digests}')
                state = dict(
                    format=STATE_FORMAT, version=STATE_VERSION,
                    cur_nimg=int(cur_nimg), batch_size=int(batch_size), world_size=int(world), seed=int(seed),
                    net=_to_cpu(net.state_dict()), ema=_to_cpu(ema.state_dict()),
                    optimizer_state=_to_cpu(optimizer.state_dict()),
                    sampler=sampler_cursor.state_dict(), rng=rngs, rank_digests=digests,
                )
                atomic_torch_save(state, os.path.join(run_dir, f'training-state-{cur_nimg//1000:06d}.pt'))
                del state

        # Save network snapshot.
        if (snapshot_ticks is not None) and (done or cur_tick % snapshot_ticks == 0):
            data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
            for key, value in data.items():
                if isinstance(value, torch.nn.Module):
                    value = copy.deepcopy(value).eval().requires_grad_(False)
                    misc.check_ddp_consistency(value)
                    data[key] = value.cpu()
                del value  # conserve memory
            if rank == 0:
                from torch_utils import persistence
                persistence.save_network_pkl(data, os.path.join(run_dir, f'network-snapshot-{cur_nimg//1000:06d}.pkl'))
            del data  # conserve memory

        # Update logs.
        training_stats.default_collector.update()
        if rank == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
            stats_jsonl.write(json.dumps(dict(training_stats.default_collector.as_dict(), timestamp=time.time())) + '\n')
            stats_jsonl.flush()
        dist.update_progress(cur_nimg // 1000, total_kimg)

        # Update state.
        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    # Done.
    if stats_jsonl is not None:
        stats_jsonl.close()
    del dataset_iterator  # shuts the loader's workers down
    dist.print0()
    dist.print0('Exiting...')
    return dnnlib.EasyDict(cur_nimg=cur_nimg, stopped=stopped)


def _signal_name(stopped) -> str:
    try:
        return signal.Signals(stopped).name
    except (ValueError, TypeError):
        return str(stopped)


def _load_state_into(state: dict, path: str, net: torch.nn.Module, ema: torch.nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
    """Copy weights, EMA and optimizer moments from a training state, with one-line errors on mismatch."""
    for name, module in (('net', net), ('ema', ema)):
        try:
            module.load_state_dict(state[name], strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(f'{path}: "{name}" does not match the network built from the current options '
                             f'(same --arch/--precond/--cbase/--cres/--cond/--augment as the original run?): '
                             f'{" ".join(first[:2])}') from None
    try:
        optimizer.load_state_dict(state['optimizer_state'])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f'{path}: optimizer state does not match the network ({e})') from None
