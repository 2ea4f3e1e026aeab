"""Model compression (our addition): unstructured pruning and low-precision weights for the networks this
project loads, so that a model's size, speed and FID can be traded off after training.

- Which weights: every module's own 2-D or 4-D `weight` parameter, i.e. the convolution and fully-connected
  layers (`compressible_layers`). Biases, normalisation gains and buffers (FIR filters, Fourier
  frequencies, the iDDPM sigma table) are never pruned or quantised: they are small and sensitive.
- Regions of a U-Net (`layer_regions`), from the layer's name: `enc.<R>x<R>_...` / `dec.<R>x<R>_...`
  belong to resolution R.
    ends      -- encoder and decoder layers at the highest resolution, incl. the input conv and the output
                 conv/head (DhariwalUNet's out_conv).
    middle    -- encoder and decoder layers at the lowest resolution, incl. the bottleneck (dec.<R>x<R>_in0/in1)
                 and the strided block that leads into it (it is named after its output resolution).
    between   -- the resolutions in between.
    embedding -- the noise/class/augment mapping network (map_* layers).
    other     -- anything else (layers of an unknown architecture).
  The CLI selects `all` (every compressible weight), `middle` or `ends`.
- Pruning (`prune_network`): torch.nn.utils.prune's l1_unstructured / random_unstructured per tensor
  (local scope) or global_unstructured over all selected tensors (global scope), made permanent.
- Low precision: `to_low_precision` stores parameters in float16/bfloat16 in the original classes (every
  layer here casts its weights to the activation dtype on use, so the network computes in float32);
  `quantize_per_channel` / `dequantize_per_channel` are the int8/int4 formulas (`pack_int4` / `unpack_int4`
  store two 4-bit values per byte), and `Int8Network` is the persistent wrapper that stores int8 or packed
  int4 weights + float32 scales and dequantises them once, in memory.
- Quantisation-aware training: `fake_quantize` (the same per-channel rounding in the forward pass, a
  straight-through gradient), and `QATNetwork`, the persistent wrapper that trains a network through it
  (training_loop trains it like any network; `quantize_weights` then exports exactly the trained weights).
- Counting: `named_weights`, `sparsity_rows`.

Like training/networks.py, this module's source is embedded in snapshots that hold an `Int8Network`; it
imports only the standard library, torch, torch_utils.persistence and training.networks.
"""

from __future__ import annotations

import copy
import importlib
import re
import warnings
from typing import Iterator

import torch
from torch.nn.utils import prune

from torch_utils import persistence
from training.networks import no_weight_init  # the safe loader builds our classes without random init

#----------------------------------------------------------------------------
# Which layers, which regions.

REGIONS = ('embedding', 'ends', 'between', 'middle', 'other')   # the order of the sparsity report
SELECTABLE_REGIONS = ('all', 'middle', 'ends')

_RESOLUTION_RE = re.compile(r'(?:^|\.)(?:enc|dec)\.(\d+)x\d+_')

def compressible_layers(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every layer whose own `weight` parameter has >= 2 dims (conv and linear layers)."""
    layers = []
    for name, module in net.named_modules():
        w = module._parameters.get('weight') if hasattr(module, '_parameters') else None
        if isinstance(w, torch.Tensor) and w.ndim >= 2:
            layers.append((name, module))
    return layers

def layer_resolution(name: str) -> int | None:
    """Resolution R of a layer named like '...enc.<R>x<R>_block0.conv0', else None."""
    m = _RESOLUTION_RE.search(name)
    return int(m.group(1)) if m else None

def layer_regions(names) -> dict[str, str]:
    """Region of each layer name ('ends', 'middle', 'between', 'embedding' or 'other'); see the module doc.
    With a single resolution level, its layers are 'ends' and 'middle' is empty."""
    names = list(names)
    resolutions = [r for r in map(layer_resolution, names) if r is not None]
    highest, lowest = (max(resolutions), min(resolutions)) if resolutions else (None, None)
    regions = {}
    for name in names:
        r = layer_resolution(name)
        leaf = name.rsplit('.', 1)[-1]
        if r is None:
            if leaf.startswith(('map_', 'emb_')):
                regions[name] = 'embedding'
            elif leaf in ('out_conv', 'out_norm'):
                regions[name] = 'ends'
            else:
                regions[name] = 'other'
        elif r == highest:
            regions[name] = 'ends'
        elif r == lowest:
            regions[name] = 'middle'
        else:
            regions[name] = 'between'
    return regions

def select_layers(net: torch.nn.Module, region: str = 'all') -> list[tuple[str, torch.nn.Module]]:
    """The compressible layers in `region` ('all', 'middle' or 'ends')."""
    if region not in SELECTABLE_REGIONS:
        raise ValueError(f'unknown region {region!r}; expected one of {", ".join(SELECTABLE_REGIONS)}')
    layers = compressible_layers(net)
    if region == 'all':
        return layers
    regions = layer_regions(name for name, _ in layers)
    return [(name, m) for name, m in layers if regions[name] == region]

#----------------------------------------------------------------------------
# Unstructured pruning.

PRUNE_METHODS = {'l1': (prune.l1_unstructured, prune.L1Unstructured),
                 'random': (prune.random_unstructured, prune.RandomUnstructured)}

def prune_network(net: torch.nn.Module, amount: float, method: str = 'l1', scope: str = 'global',
                  region: str = 'all', seed: int = 0, progress=None) -> list[str]:
    """Zero a fraction `amount` of the weights of the selected layers, in place, and make it permanent.

    method -- 'l1': the smallest magnitudes; 'random': uniformly at random (drawn from torch's generator
      seeded with `seed`, without disturbing the global random state).
    scope -- 'global': round(amount * N) weights of all N selected weights together, ranked against each
      other; 'local': round(amount * n) of each tensor of n weights.
    Returns the names of the pruned layers. Parameter order is kept (positional tools such as EMA rely on it).
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f'unknown pruning method {method!r}; expected l1 or random')
    if scope not in ('global', 'local'):
        raise ValueError(f'unknown pruning scope {scope!r}; expected global or local')
    if not 0 <= amount <= 1:
        raise ValueError(f'pruning amount must be in [0, 1], got {amount}')
    layers = select_layers(net, region)
    if not layers:
        raise ValueError(f'region {region!r} selects no conv/linear weights in this network')
    per_tensor, cls = PRUNE_METHODS[method]
    orders = [list(m._parameters) for _, m in layers]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if scope == 'global':
            prune.global_unstructured([(m, 'weight') for _, m in layers], pruning_method=cls, amount=amount)
        else:
            for _, m in (progress(layers) if progress else layers):
                per_tensor(m, 'weight', amount=amount)
        for (_, m), order in zip(layers, orders):
            prune.remove(m, 'weight')
            for key in order:  # prune.remove re-registers `weight` last; restore the original order
                m._parameters[key] = m._parameters.pop(key)
    return [name for name, _ in layers]

#----------------------------------------------------------------------------
# Low precision: float16 / bfloat16 storage, int8 per-output-channel quantisation.

LOW_PRECISION = {'fp16': torch.float16, 'bf16': torch.bfloat16}

def to_low_precision(net: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Store every parameter of `net` in float16 or bfloat16 (in place; buffers stay float32). The layers
    cast weights to the activation dtype on use, so the network still computes in float32."""
    target = LOW_PRECISION[dtype]
    for p in net.parameters():
        p.data = p.data.to(target)
    return net

INT8_MAX = 127  # symmetric range [-127, 127]; -128 is never used, so q and -q are both representable
WEIGHT_BITS = (8, 4)

def quant_max(bits: int) -> int:
    """Q = 2^(bits-1) - 1, the largest magnitude of a symmetric signed code: 127 (int8), 7 (int4)."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f'unsupported weight width {bits} bits; expected one of {", ".join(map(str, WEIGHT_BITS))}')
    return (1 << (bits - 1)) - 1

def channel_scale(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric scale max|w_c| / Q, float32 [out]."""
    return w.detach().to(torch.float32).reshape(w.shape[0], -1).abs().amax(dim=1) / quant_max(bits)

def quantize_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantisation: scale_c = max|w_c| / Q, q = round(w / scale_c), Q = 127 (8 bits)
    or 7 (4 bits).

    Returns (q int8 with w's shape, scale float32 [out]). |w - q scale_c| <= scale_c / 2 for every weight;
    an all-zero channel gets scale 0 and q = 0."""
    Q = quant_max(bits)
    w32 = w.detach().to(torch.float32).reshape(w.shape[0], -1)
    scale = channel_scale(w, bits)
    q = torch.round(w32 / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-Q, Q)
    return q.to(torch.int8).reshape(w.shape), scale

def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weights q * scale_c (the inverse of quantize_per_channel, up to its rounding)."""
    return q.to(torch.float32) * scale.to(torch.float32).reshape([-1] + [1] * (q.ndim - 1))

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes in [-8, 7] (any shape) -> uint8 [ceil(n/2)]: element 2j in the low nibble of byte j, element
    2j+1 in the high nibble (two's complement nibbles; an odd count is padded with 0)."""
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError('int4 codes must lie in [-8, 7]')
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = flat & 0xF
    return (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8)

def unpack_int4(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of pack_int4: int8 codes of the given shape."""
    b = packed.to(torch.int16)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)
    n = 1
    for d in shape:
        n *= int(d)
    return (nibbles[:n] - ((nibbles[:n] & 0x8) << 1)).to(torch.int8).reshape(shape)

def fake_quantize(w: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantisation-aware training's weight: the forward value is quantize -> dequantize (the same rounding as
    quantize_per_channel, so training sees exactly the exported weights); the gradient is the straight-through
    estimator: identity where round(w / scale_c) lies in [-Q, Q], 0 where it is clipped (as
    torch.fake_quantize_per_channel_affine). With the default scale max|w_c| / Q nothing is clipped."""
    Q = quant_max(bits)
    s = (channel_scale(w, bits) if scale is None else scale.detach().to(torch.float32))
    s = s.clamp(min=torch.finfo(torch.float32).tiny).reshape([-1] + [1] * (w.ndim - 1))
    code = torch.round(w.detach().to(torch.float32) / s)
    forward = (code.clamp(-Q, Q) * s).to(w.dtype)
    inside = ((code >= -Q) & (code <= Q)).to(w.dtype)
    return forward + (w - w.detach()) * inside

def _network_class(dotted: str) -> type:
    """A persistent torch module class of ours, by dotted name (never an arbitrary callable)."""
    module_name, _, class_name = str(dotted).rpartition('.')
    if not module_name.startswith('training.') or module_name == __name__:
        raise ValueError(f'{dotted!r} is not a network class of training.*')
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and persistence.is_persistent(cls) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f'{dotted!r} is not a persistent network class')
    return cls

class _WrapsNet(torch.nn.Module):
    """A module around `self.net` that reads and writes the wrapped network's attributes (img_resolution,
    label_dim, sigma_min, ...) as its own, so the wrapper stands in for the network everywhere."""

    def __getattr__(self, name):
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            net = self.__dict__.get('_modules', {}).get('net')
            if net is None or name.startswith('__'):
                raise
            return getattr(net, name)

    def __setattr__(self, name, value):
        net = self.__dict__.get('_modules', {}).get('net')
        if net is not None and not name.startswith('_') and name not in self.__dict__ and name in net.__dict__:
            setattr(net, name, value)
        else:
            torch.nn.Module.__setattr__(self, name, value)


@persistence.persistent_class
class Int8Network(_WrapsNet):
    """A network whose conv/linear weights are stored as int8 (or packed int4) + per-output-channel float32 scales.

    net_class, net_args, net_kwargs -- the wrapped network ('training.networks.EDMPrecond' and its
      constructor arguments); it is built inside, so the safe loader rebuilds it like any of our classes.
    int8_layers -- names of the layers (in the wrapped network) whose `weight` is held as the buffers
      `weight_int8` (bits=8) or `weight_int4` (bits=4: uint8, two codes per byte, see pack_int4) and
      `weight_scale`; their `weight` parameter is None.
    bits -- 8 or 4 (symmetric codes in [-127, 127] or [-7, 7]).

    state_dict (and the pickle) hold exactly the codes, the scales and the other parameters in their
    own dtype, so a file holding one is ~4x (8x for int4) smaller than float32. On first use the weights are dequantised
    once to float32 and kept in memory (never pickled); `forward` runs the wrapped network with them through
    torch.func.functional_call. Attribute reads and writes that the wrapper does not have itself pass
    through to the wrapped network (img_resolution, sigma_min, round_sigma, use_bf16, ...), so samplers,
    generate.py and fid.py use it like the original.
    """
    def __init__(self, net_class: str, net_args=(), net_kwargs={}, int8_layers=(), bits=8):
        super().__init__()
        quant_max(bits)  # validates
        with no_weight_init():
            net = _network_class(net_class)(*net_args, **net_kwargs)
        self.weight_shapes = {}
        for name in int8_layers:
            layer = net.get_submodule(name)
            shape = layer.weight.shape
            layer.register_parameter('weight', None)
            if bits == 8:
                layer.register_buffer('weight_int8', torch.empty(shape, dtype=torch.int8))
            else:
                layer.register_buffer('weight_int4', torch.empty([(shape.numel() + 1) // 2], dtype=torch.uint8))
            layer.register_buffer('weight_scale', torch.empty([shape[0]], dtype=torch.float32))
            self.weight_shapes[name] = tuple(shape)
        self.net = net
        self.int8_layers = list(int8_layers)
        self.bits = bits
        self._dequantized = None


    # The float32 cache: dropped when pickled, moved, or reloaded.
    def __getstate__(self):
        state = dict(super().__getstate__())
        state['_dequantized'] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        self._dequantized = None
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._dequantized = None
        return super().load_state_dict(*args, **kwargs)

    def dequantized_weights(self) -> dict[str, torch.Tensor]:
        """{'<layer>.weight': float32 tensor} for every int8 layer of the wrapped network (cached)."""
        if self._dequantized is None:
            self._dequantized = {f'{name}.weight': dequantize_per_channel(self.weight_codes(name), layer.weight_scale)
                                 for name in self.int8_layers for layer in [self.net.get_submodule(name)]}
        return self._dequantized

    def weight_codes(self, name: str) -> torch.Tensor:
        """The int8 codes of layer `name`'s weight, in the weight's shape (int4 unpacked)."""
        layer = self.net.get_submodule(name)
        if self.bits == 8:
            return layer.weight_int8
        return unpack_int4(layer.weight_int4, self.weight_shapes[name])

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.net, self.dequantized_weights(), args, kwargs)

@persistence.persistent_class
class QATNetwork(_WrapsNet):
    """Quantisation-aware training of a network: every compressible layer's weight passes through
    `fake_quantize(weight, bits)` in the forward pass (per-output-channel symmetric, straight-through gradient),
    so the float weights are trained for the network that `quantize_weights(bits)` will export.

    net_class, net_args, net_kwargs -- the float network, built inside (as in Int8Network); its parameters keep
      their names under `net.`. bits -- 8 or 4.
    img_resolution, img_channels, label_dim -- what training_loop passes every network it builds; they must
      agree with net_kwargs.
    Attributes the wrapper does not have pass through to the wrapped network, like Int8Network.
    """
    def __init__(self, net_class: str, net_args=(), net_kwargs={}, bits=8, **interface):
        super().__init__()
        quant_max(bits)
        for key, value in interface.items():
            if key not in ('img_resolution', 'img_channels', 'label_dim'):
                raise TypeError(f'QATNetwork got an unexpected keyword argument {key!r}')
            if key in net_kwargs and net_kwargs[key] != value:
                raise ValueError(f'the dataset gives {key}={value} but the network was built with {net_kwargs[key]}')
        with no_weight_init():
            self.net = _network_class(net_class)(*net_args, **dict(net_kwargs, **interface))
        self.bits = bits
        self.qat_layers = [name for name, _ in compressible_layers(self.net)]


    def quantized_weights(self) -> dict[str, torch.Tensor]:
        """{'<layer>.weight': fake-quantised weight} (differentiable, straight-through)."""
        return {f'{name}.weight': fake_quantize(self.net.get_submodule(name).weight, self.bits)
                for name in self.qat_layers}

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.net, self.quantized_weights(), args, kwargs)

def qat_network(net: torch.nn.Module, bits: int) -> QATNetwork:
    """A QATNetwork that starts from the float network `net`'s weights (which it copies)."""
    if isinstance(net, (Int8Network, QATNetwork)):
        raise ValueError('quantisation-aware training starts from a float network (the snapshot holds '
                         f'{type(net).__name__}); use the float snapshot it was made from')
    if not persistence.is_persistent(net):
        raise ValueError(f'{type(net).__name__} is not a persistent network class; cannot record how to rebuild it')
    cls = type(net)
    with torch.device('meta'):
        wrapper = QATNetwork(net_class=f'{cls.__module__}.{cls.__name__}', net_args=list(net.init_args),
                             net_kwargs=dict(net.init_kwargs), bits=bits)
    wrapper.load_state_dict({f'net.{k}': v.detach().clone() for k, v in net.state_dict().items()}, strict=True,
                            assign=True)
    wrapper.train(net.training)
    return wrapper

def quantize_weights(net: torch.nn.Module, bits: int = 8, progress=None) -> Int8Network:
    """An Int8Network holding `net` with every compressible layer's weight quantised per output channel to
    `bits` (8 or 4). A QATNetwork is exported as the network it trains: its fake-quantised weights are exactly
    these codes times these scales."""
    quant_max(bits)
    if isinstance(net, Int8Network):
        raise ValueError(f'the network already holds int{net.bits} weights')
    if isinstance(net, QATNetwork):
        if net.bits != bits:
            raise ValueError(f'the network was trained for {net.bits}-bit weights; export it with bits={net.bits}')
        net = net.net
    if not persistence.is_persistent(net):
        raise ValueError(f'{type(net).__name__} is not a persistent network class; cannot record how to rebuild it')
    layers = compressible_layers(net)
    cls = type(net)
    with torch.device('meta'):  # shapes only; the tensors come from `net` below
        wrapper = Int8Network(net_class=f'{cls.__module__}.{cls.__name__}', net_args=list(net.init_args),
                              net_kwargs=dict(net.init_kwargs), int8_layers=[name for name, _ in layers],
                              **({} if bits == 8 else dict(bits=bits)))  # int8 pickles keep their kwargs
    state = {f'net.{k}': v for k, v in net.state_dict().items()}
    for name, layer in (progress(layers) if progress else layers):
        q, scale = quantize_per_channel(layer.weight, bits)
        del state[f'net.{name}.weight']
        state[f'net.{name}.weight_int8' if bits == 8 else f'net.{name}.weight_int4'] = q if bits == 8 else pack_int4(q)
        state[f'net.{name}.weight_scale'] = scale
    wrapper.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    wrapper.train(net.training)
    return wrapper

def quantize_int8(net: torch.nn.Module, progress=None) -> Int8Network:
    """An Int8Network holding `net` with every compressible layer's weight quantised to int8 per output channel."""
    return quantize_weights(net, 8, progress)

def dynamic_int8_linear(net: Int8Network) -> Int8Network:
    """A copy of `net` whose int8 Linear layers run as torch.ao dynamic int8 layers on the CPU (int8 weights,
    activations quantised per batch), built with torch.ao.quantization.quantize_dynamic from exactly the
    stored int8 values and scales. For float32 inference in memory only: the copy cannot be saved."""
    from torch.ao import quantization as tq  # deprecated in recent torch; only this optional path uses it
    if not isinstance(net, Int8Network) or net.bits != 8:
        raise ValueError('dynamic int8 inference needs a network with int8 weights (compress.py quantize --dtype int8)')
    out = copy.deepcopy(net)
    # Per-channel symmetric over [-127, 127] gives back scale_c = max|w_c| / 127, i.e. the stored q exactly.
    qconfig = tq.QConfig(activation=tq.PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255,
                                                                     is_dynamic=True),
                         weight=tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, quant_min=-INT8_MAX,
                                                                      quant_max=INT8_MAX,
                                                                      qscheme=torch.per_channel_symmetric))
    weights = out.dequantized_weights()
    kept = []
    for name in out.int8_layers:
        layer = out.net.get_submodule(name)
        if layer.weight_int8.ndim != 2:
            kept.append(name)
            continue
        dense = torch.nn.Linear(layer.weight_int8.shape[1], layer.weight_int8.shape[0], bias=layer.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(weights[f'{name}.weight'])
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.to(torch.float32))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch.ao's deprecation notices
            quantized = tq.quantize_dynamic(torch.nn.Sequential(dense), {torch.nn.Linear: qconfig}, dtype=torch.qint8)[0]
        parent_name, _, leaf = name.rpartition('.')
        setattr(out.net.get_submodule(parent_name), leaf, quantized)
    out.int8_layers = kept
    out._dequantized = None
    return out

#----------------------------------------------------------------------------
# Counting.

def named_weights(net: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter as the network uses it: int8 layers' weights dequantised,
    named '<layer>.weight' like the original parameter."""
    if isinstance(net, Int8Network):
        yield from ((f'net.{k}', v) for k, v in net.dequantized_weights().items())
    yield from ((k, v) for k, v in net.named_parameters() if v is not None)

def sparsity_rows(net: torch.nn.Module, selected=()) -> list[dict]:
    """Per-region counts of the compressible weights: region, selected, tensors, params, zeros, sparsity;
    a final 'total' row. Only regions the network has are listed."""
    weights = {name: t for name, t in named_weights(net) if t.ndim >= 2 and name.endswith('.weight')}
    layer_names = [name[:-len('.weight')] for name in weights]
    regions = layer_regions(layer_names)
    rows = []
    for region in REGIONS + ('total',):
        names = [n for n in layer_names if region == 'total' or regions[n] == region]
        if not names:
            continue
        params = sum(weights[f'{n}.weight'].numel() for n in names)
        zeros = sum(params_zero(weights[f'{n}.weight']) for n in names)
        rows.append(dict(region=region, selected=(region in selected) if region != 'total' else None,
                         tensors=len(names), params=params, zeros=zeros, sparsity=zeros / max(params, 1)))
    return rows

def params_zero(t: torch.Tensor) -> int:
    return int(t.numel() - torch.count_nonzero(t))

#----------------------------------------------------------------------------
