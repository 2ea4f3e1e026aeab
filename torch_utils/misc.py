"""Small PyTorch helpers of the training loop: the endless data order, parameter copying, DDP helpers, module
summaries, allocator tuning."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Endless, reshuffling data order for training.
#
# All ranks walk one global stream of dataset indices; rank r keeps the items at global positions
# r, r + num_replicas, r + 2 * num_replicas, ... The stream starts from a seeded permutation. Each time an
# item has been visited it trades places with a random slot up to `window - 1` places behind it (cyclically),
# so later passes keep getting re-mixed without epoch boundaries or reseeding. The stream is a pure function
# of (seed, global position), which is what lets a resumed run continue it bit-exactly.

def _rng_to_state(rng: Optional[np.random.RandomState]) -> Optional[dict]:
    """numpy RandomState as tensors and plain values (readable by torch.load(weights_only=True))."""
    if rng is None:
        return None
    name, key, pos, has_gauss, cached_gaussian = rng.get_state(legacy=True)
    return dict(name=str(name), key=torch.from_numpy(key.astype(np.int64)), pos=int(pos),
                has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian))


def _rng_from_state(state: Optional[dict]) -> Optional[np.random.RandomState]:
    """Inverse of _rng_to_state()."""
    if state is None:
        return None
    rng = np.random.RandomState()
    key = state['key'].cpu().numpy().astype(np.uint32)
    rng.set_state((state['name'], key, int(state['pos']), int(state['has_gauss']), float(state['cached_gaussian'])))
    return rng


class SamplerCursor:
    """A position in InfiniteSampler's global stream together with everything needed to continue it:
    the current permutation, the RNG driving the swaps and the swap window. InfiniteSampler generates its
    items with one of these; the training loop keeps another one in step with the batches it has actually
    consumed (the DataLoader prefetches ahead) and saves its state_dict() for exact resume."""

    def __init__(self, permutation: np.ndarray, rng: Optional[np.random.RandomState], window: int, position: int):
        self.permutation = permutation
        self.rng = rng
        self.window = window
        self.position = position

    @property
    def reshuffles(self) -> bool:
        return self.window >= 2  # a window of one slot could only swap an item with itself

    def current(self) -> int:
        """Dataset index at the current global position."""
        return int(self.permutation[self.position % self.permutation.size])

    def step(self) -> None:
        """Move past the current position, first swapping its item into a random slot of the window."""
        if self.reshuffles:
            size = self.permutation.size
            slot = self.position % size
            partner = (slot - self.rng.randint(self.window)) % size
            self.permutation[[slot, partner]] = self.permutation[[partner, slot]]
        self.position += 1

    def advance(self, num_global: int) -> None:
        """Skip `num_global` global positions (the items consumed by all ranks together)."""
        if not self.reshuffles:  # the permutation never changes: only the position moves
            self.position += int(num_global)
            return
        for _ in range(int(num_global)):
            self.step()

    def copy(self) -> 'SamplerCursor':
        return SamplerCursor(self.permutation.copy(), _rng_from_state(_rng_to_state(self.rng)), self.window,
                             self.position)

    def state_dict(self) -> dict:
        """Tensors and plain values only, so torch.load(weights_only=True) can read it back.
        The key names are part of the training-state format: keep them."""
        return dict(idx=int(self.position), window=int(self.window),
                    order=torch.from_numpy(self.permutation.copy()), rnd=_rng_to_state(self.rng))

    @classmethod
    def from_state_dict(cls, state: dict) -> 'SamplerCursor':
        return cls(state['order'].cpu().numpy().astype(np.int64), _rng_from_state(state.get('rnd')),
                   int(state['window']), int(state['idx']))


class InfiniteSampler(torch.utils.data.Sampler):
    """Yields this rank's share of an endless, seeded, sliding-window-reshuffled stream of dataset indices.

    `window_size` is the swap window as a fraction of the dataset size; `shuffle=False` walks
    0, 1, 2, ... forever. `cursor()`, `load_state_dict()` support exact checkpoint/resume.
    """

    Cursor = SamplerCursor  # older name of the cursor type

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float = 0.5):
        if len(dataset) <= 0:
            raise ValueError('InfiniteSampler: the dataset is empty')
        if num_replicas <= 0:
            raise ValueError(f'InfiniteSampler: num_replicas must be positive, got {num_replicas}')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: rank must be in [0, {num_replicas}), got {rank}')
        if not 0 <= window_size <= 1:
            raise ValueError(f'InfiniteSampler: window_size must be in [0, 1], got {window_size}')
        try:
            super().__init__()
        except TypeError:  # torch < 2.2 requires a data_source argument
            super().__init__(dataset)
        self.dataset = dataset
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size
        self._resume_point: Optional[SamplerCursor] = None  # set by load_state_dict()

    def _stream_start(self) -> SamplerCursor:
        """Global position 0: the seeded permutation (or the identity when not shuffling)."""
        permutation = np.arange(self.dataset_size)
        if not self.shuffle:
            return SamplerCursor(permutation, None, 0, 0)
        rng = np.random.RandomState(self.seed)
        rng.shuffle(permutation)
        window = int(np.rint(self.window_size * permutation.size))
        return SamplerCursor(permutation, rng, window, 0)

    def cursor(self) -> SamplerCursor:
        """A new, independent cursor at the position where the next __iter__() starts."""
        if self._resume_point is not None:
            return self._resume_point.copy()
        return self._stream_start()

    def __iter__(self) -> Iterator[int]:
        walker = self.cursor()
        while True:
            if walker.position % self.num_replicas == self.rank:
                yield walker.current()
            walker.step()

    def load_state_dict(self, state: dict) -> None:
        """Make every later __iter__()/cursor() continue from a SamplerCursor.state_dict()."""
        resume_point = SamplerCursor.from_state_dict(state)
        if resume_point.permutation.size != self.dataset_size:
            raise ValueError(f'InfiniteSampler: the saved state is for a dataset of {resume_point.permutation.size} '
                             f'items, but this dataset has {self.dataset_size}')
        self._resume_point = resume_point


# ----------------------------------------------------------------------------
# Parameters and buffers.

def _require_module(obj: Any, caller: str) -> None:
    if not isinstance(obj, torch.nn.Module):
        raise AssertionError(f'{caller}: expected a torch.nn.Module, got {type(obj).__name__}')


def named_params_and_buffers(module: torch.nn.Module) -> list:
    """(dotted name, tensor) pairs: all parameters, then all buffers, as in state_dict naming."""
    _require_module(module, 'named_params_and_buffers')
    return [*module.named_parameters(), *module.named_buffers()]


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module,
                            require_all: bool = False) -> int:
    """Overwrite dst's tensors in place with the same-named tensors of src; returns how many were copied.

    Writing in place (rather than load_state_dict's replacement semantics) keeps dst's device, dtype,
    requires_grad flags and storage, so optimizers and DDP wrappers that hold dst's tensors stay valid.
    Names missing from src are left alone unless `require_all`; a size disagreement is always an error.
    """
    _require_module(src_module, 'copy_params_and_buffers')
    _require_module(dst_module, 'copy_params_and_buffers')
    available = dict(named_params_and_buffers(src_module))
    copied = 0
    for name, target in named_params_and_buffers(dst_module):
        source = available.get(name)
        if source is None:
            if require_all:
                raise ValueError(f'copy_params_and_buffers: "{name}" is missing from the source module')
            continue
        if source.shape != target.shape:
            raise ValueError(f'copy_params_and_buffers: shape mismatch for "{name}": '
                             f'source {tuple(source.shape)}, destination {tuple(target.shape)}')
        target.copy_(source)  # no_grad: requires_grad of target is untouched
        copied += 1
    return copied


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's per-parameter state (moments, step counts, 8-bit block scales)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


# ----------------------------------------------------------------------------
# Distributed helpers.

@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Context for one gradient-accumulation round. With sync=False a DDP module skips its gradient
    all-reduce (gradients just accumulate locally); the final round uses sync=True so the summed
    gradients are averaged across ranks once. Plain modules are unaffected."""
    _require_module(module, 'ddp_sync')
    skip_allreduce = not sync and isinstance(module, torch.nn.parallel.DistributedDataParallel)
    with (module.no_sync() if skip_allreduce else contextlib.nullcontext()):
        yield


def _distributed_peers() -> int:
    """Number of ranks in the default process group (1 when not running distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _value_on_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's version of `tensor` (a collective: every rank must call it in the same order)."""
    received = tensor.clone()
    torch.distributed.broadcast(received, src=0)
    return received


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Verify that every parameter and buffer equals rank 0's copy; raise RuntimeError naming the first
    one that does not. Tensors are identified as '<ModuleClass>.<dotted name>' for `ignore_regex`
    (full match). NaN and infinities are mapped to finite values first, so NaN on all ranks agrees."""
    _require_module(module, 'check_ddp_consistency')
    if _distributed_peers() == 1:
        return
    for name, tensor in named_params_and_buffers(module):
        label = f'{type(module).__name__}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, label):
            continue
        local = tensor.detach()
        if local.is_floating_point():
            local = torch.nan_to_num(local)
        if not torch.equal(local, _value_on_rank0(local)):
            raise RuntimeError(f'check_ddp_consistency: {label} on rank {torch.distributed.get_rank()} differs '
                               f'from rank 0 (were the ranks initialised or updated differently?)')


# ----------------------------------------------------------------------------
# Module summary: one forward pass with hooks on every submodule, then a table listing, per recorded call,
# the parameters and buffers it owns and the shape/dtype of what it returned. Printed at the start of
# training so a misconfigured network is obvious before any compute is spent.

def _output_tensors(outputs: Any) -> list:
    """The tensors among a forward()'s return value (one tensor, or the tensors of a tuple/list)."""
    candidates = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    return [value for value in candidates if isinstance(value, torch.Tensor)]


class _ForwardRecorder:
    """Records the forward calls of `root` and its submodules that happen at most `max_depth` levels
    below the outermost call, in completion order (a module is recorded after the modules it calls)."""

    def __init__(self, root: torch.nn.Module, max_depth: int):
        self.root = root
        self.max_depth = max_depth
        self.depth = 0          # number of forward calls currently in progress
        self.calls = []         # (module, output tensors)

    def _entering(self, _module, _inputs):
        self.depth += 1

    def _leaving(self, module, _inputs, outputs):
        self.depth -= 1
        if self.depth <= self.max_depth:
            self.calls.append((module, _output_tensors(outputs)))

    @contextlib.contextmanager
    def hooked(self):
        handles = []
        try:
            for submodule in self.root.modules():
                handles.append(submodule.register_forward_pre_hook(self._entering))
                handles.append(submodule.register_forward_hook(self._leaving))
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _assign_tensors_once(calls: list) -> list:
    """Give each parameter, buffer and output tensor to the first recorded call that has it, so that a
    parent module does not count its children's tensors again. Returns (module, params, buffers, outputs)."""
    claimed: set = set()
    result = []
    for module, outputs in calls:
        params = [t for t in module.parameters() if id(t) not in claimed]
        buffers = [t for t in module.buffers() if id(t) not in claimed]
        outputs = [t for t in outputs if id(t) not in claimed]
        claimed.update(id(t) for t in params + buffers + outputs)
        result.append((module, params, buffers, outputs))
    return result


def _count_or_dash(count: int) -> str:
    return str(count) if count else '-'


def _format_columns(rows: list) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Call `module(*inputs)` once, print a table of its submodules (parameter and buffer counts, output
    shapes and dtypes) down to `max_nesting` levels, and return the call's outputs. With `skip_redundant`,
    rows without any tensor of their own are left out."""
    _require_module(module, 'print_module_summary')
    if isinstance(module, torch.jit.ScriptModule):
        raise AssertionError('print_module_summary: scripted modules cannot be hooked')
    if not isinstance(inputs, (tuple, list)):
        raise AssertionError('print_module_summary: inputs must be a tuple or list of positional arguments')

    recorder = _ForwardRecorder(module, max_nesting)
    with recorder.hooked():
        outputs = module(*inputs)
    records = _assign_tensors_once(recorder.calls)
    if skip_redundant:
        records = [r for r in records if r[1] or r[2] or r[3]]

    module_names = {submodule: name for name, submodule in module.named_modules()}
    separator = ['---'] * 5
    table = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], separator]
    total_params = total_buffers = 0
    for submodule, params, buffers, outs in records:
        name = '<top-level>' if submodule is module else module_names[submodule]
        num_params = sum(t.numel() for t in params)
        num_buffers = sum(t.numel() for t in buffers)
        total_params += num_params
        total_buffers += num_buffers
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).rsplit('.', 1)[-1] for t in outs] or ['-']
        # One line per output tensor; counts go on the first, and names get ':k' suffixes when there are several.
        for k in range(max(len(outs), 1)):
            label = f'{name}:{k}' if len(outs) > 1 else name
            counts = [_count_or_dash(num_params), _count_or_dash(num_buffers)] if k == 0 else ['-', '-']
            table.append([label, *counts, shapes[k], dtypes[k]])
    table += [separator, ['Total', str(total_params), str(total_buffers), '-', '-']]

    print()
    print(_format_columns(table))
    print()
    return outputs

#----------------------------------------------------------------------------
# bfloat16: fast only where the hardware has it.

def bf16_is_native(device: torch.device | str = 'cpu') -> bool:
    """Whether bfloat16 convolutions and matmuls run on native hardware here: CUDA, or a CPU that oneDNN
    runs bf16 on (AVX-512 / AMX). Elsewhere (e.g. AVX2-only CPUs) torch falls back to slow generic kernels
    and bf16 is many times slower than fp32 (benchmarks/bench_training.py --paired measures it)."""
    device = torch.device(device)
    if device.type != 'cpu':
        return device.type == 'cuda'
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False

def bf16_warning(device: torch.device | str = 'cpu') -> Optional[str]:
    """One-line warning for --bf16 on hardware without native bfloat16 (see bf16_is_native), else None."""
    if bf16_is_native(device):
        return None
    return (f'Warning: --bf16 on a CPU without native bfloat16 (torch reports {torch.backends.cpu.get_cpu_capability()}, '
            f'no AVX-512/AMX bf16): it runs many times slower than fp32 here; fp32 is the fast choice on this machine')


#----------------------------------------------------------------------------
# Allocator tuning. glibc hands freed blocks above M_MMAP_THRESHOLD back to the OS (munmap) and
# trims the top of the heap above M_TRIM_THRESHOLD. A diffusion network allocates and frees the same
# 1-30 MB activation buffers on every evaluation, so by default each one is page-faulted in again;
# raising both thresholds keeps them in the heap for reuse (measured: benchmarks/bench_sampling.py).

def set_malloc_thresholds(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed blocks up to `mmap_threshold` bytes (glibc caps it at 32 MiB on 64-bit) in the heap and
    trim it only when more than `trim_threshold` bytes are free at its top. Call once, early, in a CLI's
    main. Returns True if applied; a no-op returning False off Linux/glibc. Never raises."""
    import ctypes
    import sys
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        if not hasattr(libc, 'gnu_get_libc_version'):  # e.g. musl: different mallopt constants
            return False
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
        ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(min(int(mmap_threshold), 32 << 20))) == 1
        ok_trim = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(int(trim_threshold), 2**31 - 1))) == 1
        return ok_mmap and ok_trim
    except Exception:  # optional tuning must never break a run
        return False

#----------------------------------------------------------------------------
