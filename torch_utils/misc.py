"""Small PyTorch helpers shared by the networks, the augmentation pipe and the training loop."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Cached constant tensors: avoids re-creating small tensors on every forward pass.

_constant_cache: dict = dict()


def constant(value: Any, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
             device: Optional[torch.device] = None, memory_format: Optional[torch.memory_format] = None
             ) -> torch.Tensor:
    """A (cached, read-only by convention) tensor holding `value`, broadcast to `shape` if given."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def nan_to_num(input: torch.Tensor, nan: float = 0.0, posinf: Optional[float] = None,
               neginf: Optional[float] = None, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kept for compatibility with older call sites; torch.nan_to_num does the work."""
    return torch.nan_to_num(input, nan=nan, posinf=posinf, neginf=neginf, out=out)


# ----------------------------------------------------------------------------
# Shape checks that also work while tracing.

@contextlib.contextmanager
def suppress_tracer_warnings():
    """Silence torch.jit.TracerWarning inside the block (shape asserts are intentional)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        yield


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Optional[int]]) -> None:
    """Raise AssertionError unless `tensor.shape` matches `ref_shape` (None entries match anything;
    tensor entries are compared symbolically so the check survives tracing)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)),
                              f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')


def profiled_function(fn):
    """Decorator: label the function in torch.autograd.profiler traces."""
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    decorator.__doc__ = fn.__doc__
    return decorator


# ----------------------------------------------------------------------------
# Sampler that loops over the dataset forever, with a sliding-window reshuffle so the order keeps
# changing between passes without epoch boundaries. All ranks walk the same global sequence; rank r
# keeps every num_replicas-th element. The walk is a pure function of (seed, global position), and
# state_dict()/advance() let the training loop checkpoint it exactly.

class InfiniteSampler(torch.utils.data.Sampler):
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
        except TypeError:  # older torch wanted a data_source argument
            super().__init__(dataset)
        self.dataset = dataset
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size
        self._resume_state = None  # set by load_state_dict(): where the next __iter__ starts

    def _initial_state(self):
        order = np.arange(self.dataset_size)
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        return order, rnd, window, 0

    def _start(self):
        if self._resume_state is None:
            return self._initial_state()
        order, rnd, window, idx = self._resume_state
        return order.copy(), _copy_random_state(rnd), window, idx

    def __iter__(self) -> Iterator[int]:
        order, rnd, window, idx = self._start()
        while True:
            i = idx % order.size
            if idx % self.num_replicas == self.rank:
                yield int(order[i])
            if window >= 2:  # swap the current element with a random one from the window behind it
                j = (i - rnd.randint(window)) % order.size
                order[i], order[j] = order[j], order[i]
            idx += 1

    # --- exact checkpointing -------------------------------------------------------------------

    class Cursor:
        """The sampler's walk at a given global position, advanced without yielding anything."""

        def __init__(self, order, rnd, window, idx):
            self.order, self.rnd, self.window, self.idx = order, rnd, window, idx

        def advance(self, num_global: int) -> None:
            """Move `num_global` global positions forward (= elements consumed by all ranks together)."""
            order, rnd, window, n = self.order, self.rnd, self.window, self.order.size
            if window < 2:  # no reshuffling: the position is all there is
                self.idx += int(num_global)
                return
            for _ in range(int(num_global)):  # replay the swaps __iter__ performs
                i = self.idx % n
                j = (i - rnd.randint(window)) % n
                order[i], order[j] = order[j], order[i]
                self.idx += 1

        def state_dict(self) -> dict:
            """Tensors and plain data only, so torch.load(weights_only=True) can read it back."""
            state = dict(idx=int(self.idx), window=int(self.window), order=torch.from_numpy(self.order.copy()),
                         rnd=None)
            if self.rnd is not None:
                name, key, pos, has_gauss, cached_gaussian = self.rnd.get_state()
                state['rnd'] = dict(name=str(name), key=torch.from_numpy(key.astype(np.int64)), pos=int(pos),
                                    has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian))
            return state

    def cursor(self):
        """A Cursor at the position where the next __iter__() would start."""
        return InfiniteSampler.Cursor(*self._start())

    def load_state_dict(self, state: dict) -> None:
        """Make the next __iter__() continue from a Cursor.state_dict()."""
        order = state['order'].cpu().numpy().astype(np.int64)
        if order.size != self.dataset_size:
            raise ValueError(f'InfiniteSampler: saved state is for a dataset of {order.size} items, '
                             f'this one has {self.dataset_size}')
        rnd = None
        if state.get('rnd') is not None:
            s = state['rnd']
            rnd = np.random.RandomState()
            rnd.set_state((s['name'], s['key'].cpu().numpy().astype(np.uint32), int(s['pos']),
                           int(s['has_gauss']), float(s['cached_gaussian'])))
        self._resume_state = (order, rnd, int(state['window']), int(state['idx']))


def _copy_random_state(rnd: Optional[np.random.RandomState]) -> Optional[np.random.RandomState]:
    if rnd is None:
        return None
    out = np.random.RandomState()
    out.set_state(rnd.get_state())
    return out


# ----------------------------------------------------------------------------
# Parameters and buffers.

def params_and_buffers(module: torch.nn.Module) -> list:
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module) -> list:
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module,
                            require_all: bool = False) -> None:
    """Copy same-named tensors from src to dst (in place, keeping dst's device, dtype and requires_grad)."""
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name in src_tensors:
            src = src_tensors[name]
            if src.shape != tensor.shape:
                raise ValueError(f'copy_params_and_buffers: shape mismatch for "{name}": '
                                 f'{tuple(src.shape)} vs {tuple(tensor.shape)}')
            tensor.copy_(src.detach()).requires_grad_(tensor.requires_grad)
        elif require_all:
            raise ValueError(f'copy_params_and_buffers: "{name}" is missing from the source module')


# ----------------------------------------------------------------------------
# Distributed helpers.

@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Gradient accumulation: inside `ddp_sync(ddp, False)` DDP skips its all-reduce; the last
    accumulation round runs with sync=True and reduces the summed gradients once."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Raise RuntimeError if any parameter or buffer differs from rank 0's copy (NaNs compare equal)."""
    assert isinstance(module, torch.nn.Module)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not torch.equal(tensor, other):
            raise RuntimeError(f'check_ddp_consistency: {fullname} differs between ranks '
                               f'(rank {torch.distributed.get_rank()} vs rank 0)')


# ----------------------------------------------------------------------------
# Human-readable summary of a module: one row per submodule with its parameters, buffers and output.

def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run `module(*inputs)` once, print a table of submodules, and return the outputs."""
    assert isinstance(module, torch.nn.Module)
    assert not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))

    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dict(mod=mod, outputs=outputs))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in module.modules()]
    hooks += [m.register_forward_hook(post_hook) for m in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Tensors that belong to each entry, counted once (the first, innermost, owner keeps them).
    tensors_seen = set()
    for e in entries:
        e['params'] = [t for t in e['mod'].parameters() if id(t) not in tensors_seen]
        e['buffers'] = [t for t in e['mod'].buffers() if id(t) not in tensors_seen]
        e['outputs'] = [t for t in e['outputs'] if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e['params'] + e['buffers'] + e['outputs']}
    if skip_redundant:
        entries = [e for e in entries if len(e['params']) or len(e['buffers']) or len(e['outputs'])]

    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    rows += [['---'] * len(rows[0])]
    param_total = 0
    buffer_total = 0
    submodule_names = {mod: name for name, mod in module.named_modules()}
    for e in entries:
        name = '<top-level>' if e['mod'] is module else submodule_names[e['mod']]
        param_size = sum(t.numel() for t in e['params'])
        buffer_size = sum(t.numel() for t in e['buffers'])
        output_shapes = [str(list(t.shape)) for t in e['outputs']]
        output_dtypes = [str(t.dtype).split('.')[-1] for t in e['outputs']]
        rows += [[
            name + (':0' if len(e['outputs']) >= 2 else ''),
            str(param_size) if param_size else '-',
            str(buffer_size) if buffer_size else '-',
            (output_shapes + ['-'])[0],
            (output_dtypes + ['-'])[0],
        ]]
        for idx in range(1, len(e['outputs'])):
            rows += [[name + f':{idx}', '-', '-', output_shapes[idx], output_dtypes[idx]]]
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * len(rows[0])]
    rows += [['Total', str(param_total), str(buffer_total), '-', '-']]

    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs
