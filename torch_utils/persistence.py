"""Pickles in the paper's layout, the persistent-class registry, and safe loading.

Writing: classes decorated with `@persistent_class` remember their constructor arguments and pickle as
    torch_utils.persistence._reconstruct_persistent_obj(meta)
    meta = dict(type='class', version=6, module_src=<source of the defining module>,
                class_name=<class name>, state=obj.__dict__)
so snapshots written here load in the paper's code (which executes module_src) and vice versa.

Reading: `load_network_pkl` never executes module_src. A restricted unpickler admits only tensor
rebuilders and plain containers, and each persistent object is rebuilt from class name + constructor kwargs
+ tensors. The class comes from the registry, `{class_name: cls}` of this library's packages
(LIBRARY_PACKAGES), filled by the decorator; class names are unique there (a duplicate is refused at import).
The code-free 'edm-plain-v1' format lives in torch_utils/plain_format.py; `load_network_pkl` reads both.
Every failure is a `CheckpointError` (a `ValueError`) with a one-line message naming the file.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib
import inspect
import io
import os
import pickle
import pkgutil
import sys
from typing import Any

import torch

import dnnlib

_version = 6                 # Record version of the paper's layout; its loader rejects any other value.
PLAIN_FORMAT = 'edm-plain-v1'

# Packages of this library. The safe loader rebuilds only persistent classes defined in them; classes defined
# anywhere else (user scripts, tests) still pickle and unpickle with plain pickle, but are refused by it.
LIBRARY_PACKAGES = ('training', 'torch_utils')

_library_classes: dict[str, type] = {}  # The registry: class name -> persistent class, for LIBRARY_PACKAGES.
_other_classes: dict[str, type] = {}    # Persistent classes defined elsewhere (plain pickle only); newest wins.

class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message is one line and names the file."""

#----------------------------------------------------------------------------
# Writing side: the @persistent_class decorator.
#
# A decorated class is replaced by a thin subclass with the same name, module and docstring. Its instances
# keep deep copies of their constructor arguments (`_init_args`, `_init_kwargs`: these attribute names are
# part of the pickled state, and the paper's code reads them) and pickle as a call to
# `_reconstruct_persistent_obj(record)`. The record also embeds the defining module's source text, because
# the paper's loader rebuilds classes from it; our loaders never read it.

@functools.lru_cache(maxsize=None)
def _source_of_module(module_name: str) -> str | None:
    """Source text of an imported module, read once; None when Python cannot find it (e.g. a class
    defined in an interactive session or in generated code)."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None

def _origin(cls: type) -> tuple[str, str]:
    """(module name, class name) of the class a persistent class was made from."""
    return cls._persistent_origin

def _pickled_state(obj: Any) -> dict:
    """What pickle would store for `obj` by default (nn.Module's __getstate__ returns a copy of __dict__)."""
    getstate = getattr(obj, '__getstate__', None)
    return getstate() if getstate is not None else obj.__dict__

def _persistent_reduce(self):
    module_name, class_name = _origin(type(self))
    record = dict(type='class', version=_version, module_src=_source_of_module(module_name) or '',
                  class_name=class_name, state=_pickled_state(self))
    return _reconstruct_persistent_obj, (record,)

def _init_args_copy(self) -> tuple:
    """Positional constructor arguments (a copy, safe to modify)."""
    return copy.deepcopy(self._init_args)

def _init_kwargs_copy(self) -> dict:
    """Keyword constructor arguments as an EasyDict (a copy, safe to modify)."""
    return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

def persistent_class(orig_class: type) -> type:
    """Class decorator: instances remember `init_args`/`init_kwargs` and pickle in the paper's layout."""
    if not isinstance(orig_class, type):
        raise AssertionError(f'persistent_class decorates classes, got {type(orig_class).__name__}')
    if is_persistent(orig_class):
        return orig_class

    def __init__(self, *args, **kwargs):
        super(persistent, self).__init__(*args, **kwargs)
        # Copied after construction so neither the constructor nor the caller can alter the record later.
        self._init_args = copy.deepcopy(args)
        self._init_kwargs = copy.deepcopy(kwargs)

    namespace = {
        '__init__': __init__,
        '__reduce__': _persistent_reduce,
        'init_args': property(_init_args_copy),
        'init_kwargs': property(_init_kwargs_copy),
        '_persistent_origin': (orig_class.__module__, orig_class.__name__),
        '__module__': orig_class.__module__,
        '__qualname__': orig_class.__qualname__,
        '__doc__': orig_class.__doc__,
    }
    namespace['__deepcopy__'] = _persistent_deepcopy
    persistent = type(orig_class)(orig_class.__name__, (orig_class,), namespace)
    _register(persistent)
    return persistent

def _register(cls: type) -> None:
    """Add a persistent class to the registry; a second library class of the same name is an error (a
    checkpoint names classes by name alone). Re-running the same module replaces its class."""
    module_name, class_name = _origin(cls)
    if module_name.split('.')[0] not in LIBRARY_PACKAGES:
        _other_classes[class_name] = cls
        return
    known = _library_classes.get(class_name)
    if known is not None and _origin(known)[0] != module_name:
        raise TypeError(f'persistent class {class_name!r} is defined in both {_origin(known)[0]} and {module_name}; '
                        f'checkpoints name classes by name alone, so library class names must be unique: rename one')
    _library_classes[class_name] = cls

def _persistent_deepcopy(self, memo: dict):
    """copy.deepcopy: the same class, a deep copy of the pickled state (what pickling round-trips)."""
    cls = type(self)
    obj = cls.__new__(cls)
    memo[id(self)] = obj
    _restore_state(obj, copy.deepcopy(_pickled_state(self), memo))
    return obj

def is_persistent(obj: Any) -> bool:
    """True for decorated classes and their instances."""
    cls = obj if isinstance(obj, type) else type(obj)
    return '_persistent_origin' in cls.__dict__  # set on the decorated class itself, not inherited

#----------------------------------------------------------------------------
# Reading side, shared by pickle.load, copy.deepcopy and the safe loader. Classes are only ever taken from
# modules that are already imported or importable by name; module_src is never executed.

def is_library_class(cls: type) -> bool:
    """A persistent class defined in one of this library's packages (what the safe loader may build)."""
    return is_persistent(cls) and _library_classes.get(_origin(cls)[1]) is cls

@functools.lru_cache(maxsize=None)
def _import_library_modules() -> None:
    """Import every module of the library packages, so the registry holds all their classes (a checkpoint
    names classes, not modules). A module that cannot be imported here (a missing optional dependency)
    contributes no classes."""
    for package_name in LIBRARY_PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ImportError:
            continue
        for info in pkgutil.walk_packages(package.__path__, prefix=package_name + '.'):
            if info.name != __name__:
                try:
                    importlib.import_module(info.name)
                except ImportError:
                    continue

def library_class(class_name: str) -> type | None:
    """The library's persistent class of that name (importing the library's modules on first need)."""
    if class_name not in _library_classes:
        _import_library_modules()
    return _library_classes.get(class_name)

def _class_for_meta(class_name: str, library_only: bool) -> type | None:
    """The registered class a persistent-object record names: the library's, else (plain pickle only) one
    defined elsewhere; None if there is none."""
    cls = library_class(class_name)
    if cls is None and not library_only:
        cls = _other_classes.get(class_name)
    return cls

def _restore_state(obj: Any, state: dict) -> None:
    """Put pickled attributes back, through the class's __setstate__ when it has one (nn.Module's fills
    in attributes that newer torch versions added)."""
    if hasattr(type(obj), '__setstate__'):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)

def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Target of every persistent-object record (the paper's layout fixes this import path). Rebuilds the
    object from one of our classes, chosen by name (see _class_for_meta), and its pickled state."""
    record = dict(meta)
    if record.get('type') != 'class':
        raise pickle.UnpicklingError(f'unsupported persistent object type {record.get("type")!r}')
    class_name = record.get('class_name')
    cls = _class_for_meta(class_name, library_only=False) if isinstance(class_name, str) else None
    if cls is None:
        raise pickle.UnpicklingError(f'no known persistent class named {class_name!r}')
    obj = cls.__new__(cls)
    _restore_state(obj, record.get('state') or {})
    return obj

#----------------------------------------------------------------------------
# Restricted unpickler for the paper's network pickles.

class _PersistentStub:
    """Stand-in for a persistent object while unpickling: holds class name and state only."""
    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class':
            raise CheckpointError('malformed persistent object record')
        if meta.get('version') != _version:
            raise CheckpointError(f'unsupported persistent object version {meta.get("version")!r} (expected {_version})')
        self.class_name = meta.get('class_name')
        self.state = meta.get('state') or {}
        if not isinstance(self.class_name, str) or not isinstance(self.state, dict):
            raise CheckpointError('malformed persistent object record')

class _ContainerStub:
    """Stand-in for torch.nn containers (ModuleDict, Sequential, ...): keeps only their state."""
    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}

def _safe_load_from_bytes(b: bytes):
    # torch's own storage rebuilder calls torch.load(weights_only=False); ours stays weights-only.
    return torch.load(io.BytesIO(b), weights_only=True, map_location='cpu')

def _safe_reconstructor(cls, base, state=None):
    if base is not object or state is not None:
        raise CheckpointError('disallowed copyreg reconstruction')
    return cls.__new__(cls)

def _safe_latin1_encode(text, encoding='utf-8'):
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise CheckpointError(f'disallowed text encoding {encoding!r}')
    return text.encode('latin-1')

_CONTAINER_CLASSES = ('ModuleDict', 'ModuleList', 'Sequential', 'ParameterDict', 'ParameterList', 'Identity')

def _network_global(module: str, name: str):
    """The allowlist of network pickles (see dnnlib.util.RestrictedUnpickler): tensor and storage rebuilders,
    dtypes, plain containers, numpy scalars/arrays; persistent objects and torch containers become stubs."""
    if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
        return _PersistentStub
    if module == 'torch._utils' and name in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3',
                                             '_rebuild_parameter', '_rebuild_parameter_with_state'):
        return getattr(torch._utils, name)
    if (module, name) == ('torch.storage', '_load_from_bytes'):
        return _safe_load_from_bytes
    if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) in (('torch', 'Size'), ('torch', 'device')):
        return getattr(torch, name)
    if module.startswith('torch.nn.modules.') and name in _CONTAINER_CLASSES:
        return _ContainerStub
    if (module, name) == ('collections', 'OrderedDict'):
        return collections.OrderedDict
    if (module, name) == ('dnnlib.util', 'EasyDict'):
        return dnnlib.EasyDict
    if module in ('builtins', '__builtin__') and name in ('set', 'frozenset', 'object', 'complex', 'slice'):
        return getattr(__import__('builtins'), name)
    if (module, name) == ('_codecs', 'encode'):     # protocol <= 2 stores bytes as latin-1 text
        return _safe_latin1_encode
    if (module, name) == ('copyreg', '_reconstructor'):
        return _safe_reconstructor
    if module in ('numpy', 'numpy.core.multiarray', 'numpy._core.multiarray') and name in ('scalar', 'dtype', '_reconstruct', 'ndarray'):
        return True
    if module == 'numpy.dtypes' and name.endswith('DType'):
        return True
    return None

#----------------------------------------------------------------------------
# Rebuilding objects from class name + kwargs + tensors.

def _collect_tensors(state: dict, prefix: str, out: dict) -> dict:
    """Flatten an nn.Module state (as pickled) into a state_dict with dotted names."""
    params = state.get('_parameters') or {}
    buffers = state.get('_buffers') or {}
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    modules = state.get('_modules') or {}
    for name, t in list(params.items()) + [(n, b) for n, b in buffers.items() if n not in non_persistent]:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f'{prefix}{name} is a {type(t).__name__}, expected a tensor')
        out[prefix + name] = t.detach()
    for name, m in modules.items():
        if m is None:
            continue
        if not isinstance(m, (_PersistentStub, _ContainerStub)):
            raise CheckpointError(f'{prefix}{name} is an unsupported submodule type {type(m).__name__}')
        _collect_tensors(m.state, f'{prefix}{name}.', out)
    return out

def _construct(cls: type, args, kwargs: dict):
    """Construct `cls`. Our networks skip random weight init (every tensor is then loaded);
    returns (obj, whether tensors must be assigned rather than copied)."""
    module = sys.modules.get(cls.__module__)
    no_init = getattr(module, 'no_weight_init', None) if issubclass(cls, torch.nn.Module) else None
    with (no_init() if no_init is not None else contextlib.nullcontext()):
        obj = cls(*args, **kwargs)
    return obj, no_init is not None

# The safe loader refuses constructor arguments that would build more than this many numbers (parameters
# plus buffers): 10 G, i.e. 40 GB in float32, ~7x EDM2-XXL (1.5 G). load_network_pkl(max_params=) changes it.
DEFAULT_MAX_PARAMS = 10_000_000_000
_MAX_SUBMODULES = 1_000_000  # the largest networks here have a few thousand

class _TooLarge(Exception):
    pass

def count_params_on_meta(cls: type, args, kwargs) -> int:
    """Build `cls(*args, **kwargs)` on the meta device (no memory, no random numbers) and count the numbers
    in its parameters and buffers. Tensor sizes cost nothing there; absurd depth is cut short by raising
    _TooLarge once more than _MAX_SUBMODULES modules were created."""
    total, modules = 0, 0
    def on_tensor(_module, _name, tensor):
        nonlocal total
        if tensor is not None:
            total += tensor.numel()
    def on_module(_module, _name, _submodule):
        nonlocal modules
        modules += 1
        if modules > _MAX_SUBMODULES:
            raise _TooLarge(f'more than {_MAX_SUBMODULES:,} submodules')
    from torch.nn.modules import module as nn_module
    handles = [nn_module.register_module_parameter_registration_hook(on_tensor),
               nn_module.register_module_buffer_registration_hook(on_tensor),
               nn_module.register_module_module_registration_hook(on_module)]
    try:
        with torch.device('meta'):
            _construct(cls, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return total

def _build(cls: type, args, kwargs, tensors: dict | None, describe: str, max_params: int = DEFAULT_MAX_PARAMS):
    if issubclass(cls, torch.nn.Module):  # bound the size from the arguments before allocating anything
        try:
            count = count_params_on_meta(cls, args, kwargs)
        except _TooLarge as e:
            raise CheckpointError(f'refusing to build {describe}: its constructor arguments ask for {e} '
                                  f'(a crafted or damaged file?)') from None
        except Exception as e:
            raise CheckpointError(f'cannot construct {describe}: {type(e).__name__}: {e}') from None
        if count > max_params:
            raise CheckpointError(f'refusing to build {describe}: its constructor arguments ask for {count:,} '
                                  f'parameters, more than the limit of {max_params:,} (a crafted or damaged '
                                  f'file?; a real network this large loads with load_network_pkl(max_params=...))')
    try:
        obj, skipped_init = _construct(cls, args, kwargs)
    except ImportError as e:  # a class that needs an optional package (e.g. the VAE encoder of latent models)
        raise CheckpointError(' '.join(str(e).split())) from None
    except Exception as e:
        raise CheckpointError(f'cannot construct {describe}: {type(e).__name__}: {e}') from None
    if isinstance(obj, torch.nn.Module):
        try:
            obj.load_state_dict(tensors or {}, strict=True, assign=skipped_init)
        except RuntimeError as e:
            msg = ' '.join(str(e).split())
            raise CheckpointError(f'tensors do not match {describe}: {msg[:400]}') from None
        leftover = [n for n, t in list(obj.named_parameters()) + list(obj.named_buffers()) if t.is_meta]
        if leftover:
            raise CheckpointError(f'{describe} has tensors missing from the checkpoint: {leftover[:5]}')
    return obj

def _materialize_stub(stub: _PersistentStub, max_params: int):
    cls = _class_for_meta(stub.class_name, library_only=True)
    if cls is None:
        raise CheckpointError(f'class {stub.class_name!r} is not a persistent class of this library '
                              f'({", ".join(LIBRARY_PACKAGES)}); refusing to load it')
    args = stub.state.get('_init_args', ())
    kwargs = stub.state.get('_init_kwargs', {})
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise CheckpointError(f'{stub.class_name} has malformed constructor arguments')
    tensors = _collect_tensors(stub.state, '', {}) if issubclass(cls, torch.nn.Module) else None
    obj = _build(cls, tuple(args), dict(kwargs), tensors, f'{stub.class_name}(**{_short_kwargs(kwargs)})',
                 max_params)
    if isinstance(obj, torch.nn.Module):
        obj.train(bool(stub.state.get('training', False)))
    return obj

def _short_kwargs(kwargs: dict) -> str:
    s = repr(dict(kwargs))
    return s if len(s) <= 200 else s[:197] + '...'

def _materialize(obj, max_params: int = DEFAULT_MAX_PARAMS):
    """Replace persistent stubs inside plain containers with real objects."""
    if isinstance(obj, _PersistentStub):
        return _materialize_stub(obj, max_params)
    if isinstance(obj, _ContainerStub):
        raise CheckpointError('bare torch container at top level is not supported')
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _materialize(obj[k], max_params)
        return obj
    if isinstance(obj, list):
        return [_materialize(v, max_params) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, max_params) for v in obj)
    return obj

#----------------------------------------------------------------------------
# Public loading/saving API.

def _one_line(e: BaseException) -> str:
    return ' '.join(f'{type(e).__name__}: {e}'.split())[:300]

@contextlib.contextmanager
def _open_source(path_or_url_or_file):
    """Yield (seekable binary file, display name)."""
    if hasattr(path_or_url_or_file, 'read'):
        f = path_or_url_or_file
        name = str(getattr(f, 'name', '<file object>'))
        if not (hasattr(f, 'seekable') and f.seekable()):
            f = io.BytesIO(f.read())
        yield f, name
        return
    name = os.fspath(path_or_url_or_file)
    if '://' in name:
        if dnnlib.util.is_url(name, allow_file_urls=True):
            try:
                with dnnlib.util.open_url(name) as f:
                    if not (hasattr(f, 'seekable') and f.seekable()):
                        f = io.BytesIO(f.read())
                    yield f, name
            except OSError as e:
                raise CheckpointError(f'{name}: cannot open ({_one_line(e)})') from None
            return
    try:
        f = open(name, 'rb')
    except OSError as e:
        raise CheckpointError(f'{name}: cannot open ({e.strerror or _one_line(e)})') from None
    with f:
        yield f, name

def load_network_pkl(path_or_url_or_file, max_params: int = DEFAULT_MAX_PARAMS) -> dict:
    """Safely load a network snapshot: the paper's pickle layout or our 'edm-plain-v1' format.

    Returns a dict (e.g. {'ema': EDMPrecond, 'loss_fn': EDMLoss, 'augment_pipe': ..., 'dataset_kwargs': ...}).
    Embedded source code is never executed; only our own classes can be instantiated, and only with
    constructor arguments that give at most `max_params` parameters + buffers (checked before allocating).
    """
    with _open_source(path_or_url_or_file) as (f, name):
        head = f.read(4)
        f.seek(0)
        if not head:
            raise CheckpointError(f'{name}: empty file, not a network checkpoint')
        if head.startswith(b'PK'):
            from torch_utils import plain_format
            return plain_format.load_plain(f, name, max_params)
        if head[:1] != b'\x80':
            raise CheckpointError(f'{name}: not a network pickle or {PLAIN_FORMAT} checkpoint (unrecognised header {head!r})')
        try:
            data = dnnlib.util.RestrictedUnpickler(f, _network_global, what='network pickle').load()
        except (CheckpointError, dnnlib.util.DisallowedPickleError) as e:
            raise CheckpointError(f'{name}: {e}') from None
        except Exception as e:  # EOFError, UnpicklingError, struct errors, ... from damaged files
            raise CheckpointError(f'{name}: corrupt or truncated network pickle ({_one_line(e)}); re-download or re-save it') from None
        try:
            data = _materialize(data, max_params)
        except CheckpointError as e:
            raise CheckpointError(f'{name}: {e}') from None
        except Exception as e:  # malformed records that got past the unpickler
            raise CheckpointError(f'{name}: malformed network pickle ({_one_line(e)})') from None
    if not isinstance(data, dict):
        data = {'ema': data}
    return data

def load_network_plain(path_or_file, max_params: int = DEFAULT_MAX_PARAMS) -> dict:
    """Load our code-free 'edm-plain-v1' format only (refuses pickles); see torch_utils/plain_format.py."""
    with _open_source(path_or_file) as (f, name):
        if f.read(2) != b'PK':
            raise CheckpointError(f'{name}: not an {PLAIN_FORMAT} checkpoint (expected a torch.save zip archive)')
        f.seek(0)
        from torch_utils import plain_format
        return plain_format.load_plain(f, name, max_params)

def save_network_plain(data, path: str | os.PathLike) -> None:
    """Write `data` in the code-free 'edm-plain-v1' format, atomically; see torch_utils/plain_format.py."""
    from torch_utils import plain_format
    plain_format.save_plain(data, path)

def load_snapshot(path_or_url, key: str = 'ema', verbose: bool = False,
                  max_params: int = DEFAULT_MAX_PARAMS) -> tuple[dict, str]:
    """(snapshot dict, local file) of a network snapshot path or URL (URLs through the dnnlib download cache,
    fetched once; `verbose` shows the download), checked to hold a network under `key`. Every failure is a
    CheckpointError with a one-line message naming the file and what to do."""
    source = path_or_url
    name = getattr(path_or_url, 'name', '<file object>')
    if isinstance(path_or_url, (str, os.PathLike)):
        name = os.fspath(path_or_url)
        if dnnlib.util.is_url(name, allow_file_urls=True):
            try:
                source = dnnlib.util.open_url(name, verbose=verbose, return_filename=True)
            except (OSError, ValueError) as e:
                raise CheckpointError(f'{name}: cannot fetch it ({dnnlib.util.first_line(e)})') from None
        elif not os.path.isfile(name):
            raise CheckpointError(f'{name}: no such file; pass a network pickle path or URL')
    data = load_network_pkl(source, max_params=max_params)
    if not isinstance(data.get(key), torch.nn.Module):
        raise CheckpointError(f'{name}: no network under key {key!r} (keys: {sorted(map(str, data))})')
    return data, source


def load_network(path_or_url, key: str = 'ema', device='cpu', verbose: bool = False,
                 max_params: int = DEFAULT_MAX_PARAMS) -> torch.nn.Module:
    """Load one network (default: the EMA weights) of a snapshot (load_snapshot) in eval mode with
    requires_grad disabled."""
    data, _source = load_snapshot(path_or_url, key=key, verbose=verbose, max_params=max_params)
    return data[key].eval().requires_grad_(False).to(device)


def save_network_pkl(data: dict, path: str | os.PathLike) -> None:
    """Atomically write `data` with plain pickle, i.e. in the paper's snapshot layout."""
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(data, f)

#----------------------------------------------------------------------------
