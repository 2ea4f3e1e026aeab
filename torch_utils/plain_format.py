"""The code-free checkpoint format 'edm-plain-v1', for sites whose policy forbids pickles.

A `torch.save` archive (loads with `torch.load(weights_only=True)`):
    dict(format='edm-plain-v1', objects={key: entry})
    entry = dict(kind='object', cls='<module>.<Class>', init_args=<JSON>, init_kwargs=<JSON>,
                 state_dict={name: tensor}, training=bool)      # a persistent object of this library
          | dict(kind='json', value=<JSON>)                       # anything else (e.g. dataset_kwargs)
Objects are rebuilt like the safe pickle loader rebuilds them (torch_utils.persistence: the registry's class,
the constructor kwargs, size-checked, then the tensors). `persistence.load_network_pkl` detects this format;
`persistence.save_network_plain` / `load_network_plain` are the public names.
"""

from __future__ import annotations

import json
import os

import torch

import dnnlib
from torch_utils import persistence
from torch_utils.persistence import PLAIN_FORMAT, CheckpointError


def _resolve_class(dotted: str) -> type:
    """The library's persistent class named '<module>.<Class>' (its registered module must match)."""
    module_name, _, class_name = str(dotted).rpartition('.')
    if module_name.split('.')[0] not in persistence.LIBRARY_PACKAGES:
        raise CheckpointError(f'class {dotted!r} is not in this library ({", ".join(persistence.LIBRARY_PACKAGES)}); '
                              f'refusing to load it')
    cls = persistence.library_class(class_name)
    if cls is None or persistence._origin(cls)[0] != module_name:
        raise CheckpointError(f'unknown class {dotted!r}')
    return cls


def _json_default(o):
    if hasattr(o, 'item'):     # numpy / torch scalars
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f'{type(o).__name__} is not JSON serialisable')


def _to_entry(value) -> dict:
    if persistence.is_persistent(value):
        entry = dict(kind='object', cls='.'.join(persistence._origin(type(value))),
                     init_args=json.dumps(list(value._init_args), default=_json_default),
                     init_kwargs=json.dumps(dict(value._init_kwargs), default=_json_default))
        if isinstance(value, torch.nn.Module):
            entry['state_dict'] = {k: v.detach().cpu().clone() for k, v in value.state_dict().items()}
            entry['training'] = bool(value.training)
        return entry
    return dict(kind='json', value=json.dumps(value, default=_json_default))


def save_plain(data, path: str | os.PathLike) -> None:
    """Write `data` (a snapshot dict like {'ema': net, 'loss_fn': ..., 'dataset_kwargs': ...}, or a single
    network, stored as 'ema') atomically."""
    if not isinstance(data, dict):
        data = {'ema': data}
    payload = dict(format=PLAIN_FORMAT, objects={str(k): _to_entry(v) for k, v in data.items()})
    with dnnlib.util.atomic_write(path) as f:
        torch.save(payload, f)


def load_plain(f, name: str, max_params: int = persistence.DEFAULT_MAX_PARAMS) -> dict:
    """Read an archive from the binary file `f` (`name` is used in messages)."""
    one_line = persistence._one_line
    try:
        payload = torch.load(f, weights_only=True, map_location='cpu')
    except Exception as e:
        raise CheckpointError(f'{name}: corrupt or truncated checkpoint archive ({one_line(e)}); '
                              f're-download or re-save it') from None
    if not isinstance(payload, dict) or payload.get('format') != PLAIN_FORMAT \
            or not isinstance(payload.get('objects'), dict):
        raise CheckpointError(f'{name}: not an {PLAIN_FORMAT} checkpoint (a torch.save archive of something else)')
    result = {}
    for key, entry in payload['objects'].items():
        try:
            if entry['kind'] == 'json':
                result[key] = json.loads(entry['value'])
            elif entry['kind'] == 'object':
                cls = _resolve_class(entry['cls'])
                args, kwargs = json.loads(entry['init_args']), json.loads(entry['init_kwargs'])
                obj = persistence._build(cls, tuple(args), kwargs, entry.get('state_dict'),
                                         f'{entry["cls"]}(**{persistence._short_kwargs(kwargs)})', max_params)
                if isinstance(obj, torch.nn.Module):
                    obj.train(bool(entry.get('training', False)))
                result[key] = obj
            else:
                raise CheckpointError(f'unknown entry kind {entry["kind"]!r}')
        except CheckpointError as e:
            raise CheckpointError(f'{name}: {key}: {e}') from None
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f'{name}: {key}: malformed entry ({one_line(e)})') from None
    return result
