"""Feature detectors behind one interface: `Detector(images uint8 [N,3,H,W]) -> float features [N, D]`.

- Inception-v3 (FID, KID, precision/recall): the paper's pickle (a URL through the dnnlib download cache, or
  a local copy) or a TorchScript file (e.g. the offline build of ../shared/tools/make_inception_torchscript.py).
  Pickles can execute code when loaded, so they are first read with a restricted unpickler that only
  extracts an embedded TorchScript module (the official file wraps one); running a pickle's own code needs
  trust: the official default URL is trusted (as in the paper's code), anything else needs trust_pickle.
- DINOv2 ViT-L/14 (FD_DINOv2, EDM2's second metric): only from weights the user supplies, never downloaded:
  `dinov2:PATH` (a TorchScript file of the model) or `dinov2` (facebookresearch/dinov2 and its checkpoint
  already in the torch hub cache).

`load_detector(spec)` picks by the spec; a new detector is a `Detector` subclass and a branch there.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import types
from typing import Optional

import numpy as np
import torch

import dnnlib
from dnnlib.util import first_line
from metrics.errors import MetricsError

DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                'inception-2015-12-05.pkl')
TRUSTED_DETECTOR_URLS = frozenset([DETECTOR_URL])  # Pickles from here may run their embedded code.

#----------------------------------------------------------------------------
# Inception: TorchScript files, or pickles (restricted unpickler first, full pickle only if trusted).


class UntrustedPickleError(pickle.UnpicklingError):
    """The pickle needs to run code to load and nobody said it may."""


_ZIP_MAGIC = b'PK\x03\x04'

# Globals a data-only pickle may reference: none of them can run caller-chosen code.
_SAFE_GLOBALS = dnnlib.util.allow_exactly([
    ('collections', 'OrderedDict'), ('builtins', 'bytearray'), ('builtins', 'set'), ('builtins', 'frozenset'),
    ('_codecs', 'encode'),  # how protocol-2 pickles store bytes
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
])


def _find_torchscript(obj, depth: int = 0) -> Optional[torch.jit.ScriptModule]:
    """Search a plain-data object tree for serialised TorchScript bytes and load the first one found."""
    if depth > 8:
        return None
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        obj = obj.tobytes()
    if isinstance(obj, (bytes, bytearray)):
        if bytes(obj[:4]) != _ZIP_MAGIC:
            return None
        try:
            module = torch.jit.load(io.BytesIO(bytes(obj)), map_location='cpu')
        except Exception:  # A zip that is not TorchScript: keep looking.
            return None
        # Only a module with the detector's own interface can stand for the wrapper object.
        args = [a.name for a in module.forward.schema.arguments]
        return module if 'return_features' in args else None
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for child in children:
        found = _find_torchscript(child, depth + 1)
        if found is not None:
            return found
    return None


def _reconstruct_detector_safely(meta):
    """Stand-in for torch_utils.persistence._reconstruct_persistent_obj that never runs module_src.

    Persistent objects carry their class source code plus `state`; a detector wrapping a TorchScript
    module must keep that module serialised in its state (ScriptModules cannot be pickled directly).
    """
    state = meta.get('state') if isinstance(meta, dict) else None
    found = _find_torchscript(state)
    if found is None:
        raise UntrustedPickleError('persistent object without an embedded TorchScript module '
                                   '(loading it would run its embedded source code)')
    return found


def _safe_detector_global(module: str, name: str):
    """Allowlist for reading a detector pickle without running its code (dnnlib.util.RestrictedUnpickler)."""
    if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
        return _reconstruct_detector_safely
    return _SAFE_GLOBALS(module, name)


def _reconstruct_with_source(meta):
    """The paper's persistent-object protocol: run the embedded module source, rebuild the class, set state.

    Used only for trusted pickles (it executes code from the file)."""
    if not isinstance(meta, dict) or meta.get('type') != 'class':
        raise pickle.UnpicklingError('unsupported persistent object record')
    src = meta['module_src']
    module = types.ModuleType('_fid_detector_' + hashlib.sha256(src.encode('utf-8')).hexdigest()[:16])
    sys.modules[module.__name__] = module
    exec(compile(src, module.__name__, 'exec'), module.__dict__)  # noqa: S102 -- trusted input only
    cls = getattr(module, meta['class_name'])
    obj = cls.__new__(cls)
    state = meta.get('state') or {}
    if callable(getattr(obj, '__setstate__', None)):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj


def _trusted_detector_global(module: str, name: str):
    """Everything, as plain pickle would, with persistent objects rebuilt from their embedded source."""
    if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
        return _reconstruct_with_source  # our persistence module never runs embedded source
    return True


def _load_detector_bytes(data: bytes, source: str, trusted: bool) -> torch.nn.Module:
    if data[:4] == _ZIP_MAGIC:  # TorchScript archive: code-free as far as Python is concerned.
        try:
            return torch.jit.load(io.BytesIO(data), map_location='cpu')
        except Exception as e:
            raise MetricsError(f'Detector {source} is a zip archive but not a TorchScript module '
                                       f'(save one with torch.jit.save): {e}') from e
    try:
        obj = dnnlib.util.RestrictedUnpickler(io.BytesIO(data), _safe_detector_global, what='detector pickle').load()
    except (UntrustedPickleError, dnnlib.util.DisallowedPickleError) as e:
        if not trusted:
            raise MetricsError(
                f'Detector {source} is a pickle that runs code when loaded ({e}). Pass --trust-pickle if you '
                f'trust this file, or convert it once with torch.jit.save and pass the TorchScript file') from e
        try:  # Trusted: what the paper's pickle.load does, including the embedded source code.
            obj = dnnlib.util.RestrictedUnpickler(io.BytesIO(data), _trusted_detector_global, what='trusted detector pickle').load()
        except Exception as e2:
            raise MetricsError(f'Could not unpickle the detector {source}: {e2}') from e2
    except Exception as e:
        raise MetricsError(f'Detector {source} is neither a TorchScript module nor a readable '
                                   f'pickle: {e}') from e
    if not isinstance(obj, torch.nn.Module):
        raise MetricsError(f'Detector {source} holds a {type(obj).__name__}, not a torch module')
    return obj


def load_inception(detector: Optional[str] = None, device=torch.device('cpu'), trust_pickle: bool = False,
                   verbose: bool = True, num_attempts: int = 10) -> torch.nn.Module:
    """The Inception-v3 module (or a stand-in): called as module(uint8 [N,3,H,W], return_features=True) -> [N, D]."""
    source = detector or DETECTOR_URL
    try:
        with dnnlib.util.open_url(source, verbose=verbose, num_attempts=num_attempts) as f:
            data = f.read()
    except (OSError, ValueError) as e:
        cache = ''
        if dnnlib.util.is_url(source):
            cache = f' (cache folder: {dnnlib.util.make_cache_dir_path("downloads")}, set by $EDM_CACHE_DIR)'
        raise MetricsError(f'Could not load the FID detector: {e}{cache} A local copy can also be given '
                                   f'as --detector=PATH (a TorchScript file or the official pickle).') from e
    net = _load_detector_bytes(data, source, trusted=trust_pickle or source in TRUSTED_DETECTOR_URLS)
    for param in net.parameters():  # (ScriptModules lack requires_grad_.)
        param.requires_grad_(False)
    return net.eval().to(device)


#----------------------------------------------------------------------------
# The interface.


class Detector:
    """uint8 images [N, 3, H, W] -> float features [N, D]. `name` says which reference statistics fit."""
    name = 'detector'

    def __init__(self, module: torch.nn.Module, source: str):
        self.module, self.source = module, source

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        with torch.no_grad():
            return self.features(images)

    def to(self, device):
        self.module = self.module.to(device)
        return self

    def eval(self):
        self.module.eval()
        return self

    def parameters(self):
        return self.module.parameters()


class InceptionDetector(Detector):
    """The FID network's 2048-d pool features (its own resizing to 299x299 happens inside the module)."""
    name = 'inception'

    def features(self, images):
        return self.module(images, return_features=True)


class DINOv2Detector(Detector):
    """DINOv2's class-token features, with EDM2's preprocessing: bicubic resize to 224x224, ImageNet
    mean/std normalisation."""
    name = 'dinov2'
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def features(self, images):
        x = images.to(torch.float32) / 255
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode='bicubic', antialias=True)
        mean = torch.tensor(self.MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.STD, device=x.device).view(1, 3, 1, 1)
        return self.module((x - mean) / std)


DINOV2_HELP = ('FD_DINOv2 needs DINOv2 ViT-L/14 weights, which are never downloaded: pass --detector=dinov2:PATH '
               '(the model saved with torch.jit.save) or put the facebookresearch/dinov2 repository and '
               'dinov2_vitl14_pretrain.pth into the torch hub cache ($TORCH_HOME/hub) and pass --detector=dinov2')


def _load_dinov2(path: Optional[str], device) -> torch.nn.Module:
    if path:
        if not os.path.isfile(path):
            raise MetricsError(f'{DINOV2_HELP} ({path}: no such file)')
        try:
            return torch.jit.load(path, map_location=device)
        except Exception as e:
            raise MetricsError(f'{path} is not a TorchScript file ({first_line(e)}); '
                               f'{DINOV2_HELP}') from None
    hub = torch.hub.get_dir()
    repo = os.path.join(hub, 'facebookresearch_dinov2_main')
    weights = os.path.join(hub, 'checkpoints', 'dinov2_vitl14_pretrain.pth')
    if not (os.path.isdir(repo) and os.path.isfile(weights)):
        raise MetricsError(f'{DINOV2_HELP} (looked for {repo} and {weights})')
    try:  # the cached checkpoint is found by torch.hub; nothing is fetched
        return torch.hub.load(repo, 'dinov2_vitl14', source='local', trust_repo=True, pretrained=True).to(device)
    except Exception as e:
        raise MetricsError(f'could not load DINOv2 from {repo}: {first_line(e)}') from None


def detector_name(spec: Optional[str]) -> str:
    """'dinov2' for a DINOv2 spec, else 'inception' (what `load_detector(spec)` will return)."""
    return 'dinov2' if spec is not None and (spec == 'dinov2' or spec.startswith('dinov2:')) else 'inception'


def load_detector(spec=None, device=torch.device('cpu'), trust_pickle: bool = False, verbose: bool = True,
                  num_attempts: int = 10) -> Detector:
    """A Detector from a spec: None (the paper's Inception URL), a path/URL of an Inception TorchScript
    file or pickle, 'dinov2' or 'dinov2:PATH'; a loaded Detector or module is wrapped and passed through."""
    if isinstance(spec, Detector):
        return spec
    if isinstance(spec, torch.nn.Module):
        return InceptionDetector(spec, type(spec).__name__)
    if detector_name(spec) == 'dinov2':
        module = _load_dinov2(spec.partition(':')[2] or None, device)
        det = DINOv2Detector(module, spec)
    else:
        det = InceptionDetector(load_inception(spec, device=device, trust_pickle=trust_pickle, verbose=verbose,
                                               num_attempts=num_attempts), spec or DETECTOR_URL)
    for param in det.parameters():  # (ScriptModules lack requires_grad_.)
        param.requires_grad_(False)
    return det.eval().to(device)
