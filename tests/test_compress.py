"""compress.py and training/compression.py: pruning (exact counts, L1 order, regions), low-precision snapshots
(load with the safe loader, run, stay within a tolerance derived from the rounding step, honest file sizes),
grouped convolutions (parameter count from a formula, training, train.py errors), and `compress.py report`
with the stand-in FID detector (helpers.StandInDetector). Tiny networks built here, saved with save_network_pkl."""

import csv
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import compress
from torch_utils import plot
import dnnlib
import generate
import train
from helpers import invoke, loop_kwargs, make_dataset_zip
from torch_utils import persistence
from training import compression as C
from training import networks as N
from training.loss import EDMLoss

pytestmark = pytest.mark.usefixtures('one_thread')

#----------------------------------------------------------------------------
# Helpers.


def make_net(model_type='SongUNet', seed=0, model_channels=8, channel_mult=(1, 2, 2), label_dim=2, **kwargs):
    """Tiny EDMPrecond for 8x8 RGB images (levels 8x8, 4x4, 2x2) with every parameter drawn at random, so
    no weight is zero and no two magnitudes tie (exact pruning counts)."""
    torch.manual_seed(seed)
    net = N.EDMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, model_type=model_type,
                       model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=1,
                       attn_resolutions=[4], **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval().requires_grad_(False)


def save(path, net) -> str:
    persistence.save_network_pkl(dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                                      dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset',
                                                          path='tiny.zip')), path)
    return str(path)


def run(args, expect_ok=True):
    return invoke(compress.main, args, expect_ok)


def conv_linear_weights(net) -> dict:
    """{layer name: weight} of every conv/linear layer, found independently of training.compression."""
    return {name: m.weight for name, m in net.named_modules()
            if isinstance(m, (N.Conv2d, N.Linear)) and m.weight is not None}


def zeros(t) -> int:
    return int((t == 0).sum())


FIXED_X = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(7))
FIXED_SIGMA = torch.tensor([0.3, 2.0])
FIXED_LABELS = torch.eye(2)[[0, 1]]

#----------------------------------------------------------------------------
# Regions.


def test_regions_of_both_unets():
    song = C.layer_regions(name for name, _ in C.compressible_layers(make_net('SongUNet')))
    assert song['model.enc.8x8_conv'] == 'ends' and song['model.dec.8x8_aux_conv'] == 'ends'
    assert song['model.enc.8x8_block0.conv0'] == 'ends' and song['model.dec.8x8_block1.conv1'] == 'ends'
    assert song['model.enc.4x4_down.conv0'] == 'between' and song['model.dec.4x4_block1.qkv'] == 'between'
    assert song['model.enc.2x2_down.conv0'] == 'middle' and song['model.enc.2x2_block0.conv1'] == 'middle'
    assert song['model.dec.2x2_in0.qkv'] == 'middle' and song['model.dec.2x2_in1.conv0'] == 'middle'
    assert song['model.dec.2x2_block1.skip'] == 'middle'
    assert song['model.map_layer0'] == 'embedding' and song['model.map_label'] == 'embedding'
    adm = C.layer_regions(name for name, _ in C.compressible_layers(make_net('DhariwalUNet')))
    assert adm['model.out_conv'] == 'ends' and adm['model.enc.8x8_conv'] == 'ends'
    assert adm['model.dec.2x2_in0.conv0'] == 'middle' and adm['model.enc.4x4_block0.conv0'] == 'between'
    # Exactly the conv/linear layers, nothing else (no norms, no weightless resamplers).
    assert set(song) == set(conv_linear_weights(make_net('SongUNet')))


#----------------------------------------------------------------------------
# Pruning.


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
@pytest.mark.parametrize('method', ['l1', 'random'])
@pytest.mark.parametrize('region', ['all', 'middle', 'ends'])
def test_global_pruning_reaches_exact_sparsity(model_type, method, region):
    net = make_net(model_type)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weights = conv_linear_weights(net)
    regions = C.layer_regions(weights)
    selected = [n for n in weights if region == 'all' or regions[n] == region]
    total = sum(weights[n].numel() for n in selected)
    C.prune_network(net, 0.3, method=method, scope='global', region=region, seed=1)
    weights = conv_linear_weights(net)
    assert sum(zeros(weights[n]) for n in selected) == round(0.3 * total)
    for name, value in net.state_dict().items():  # everything outside the selected weights is untouched
        if name.endswith('.weight') and name[:-len('.weight')] in selected:
            kept = value != 0
            assert torch.equal(value[kept], before[name][kept])
        else:
            assert torch.equal(value, before[name]), name
    rows = {r['region']: r for r in C.sparsity_rows(net)}
    assert rows['total']['zeros'] == round(0.3 * total)
    if region != 'all':
        assert rows[region]['zeros'] == round(0.3 * total) and rows[region]['params'] == total


@pytest.mark.parametrize('method', ['l1', 'random'])
def test_local_pruning_prunes_each_tensor_by_amount(method):
    net = make_net()
    C.prune_network(net, 0.45, method=method, scope='local', region='middle', seed=3)
    regions = C.layer_regions(conv_linear_weights(net))
    for name, w in conv_linear_weights(net).items():
        assert zeros(w) == (round(0.45 * w.numel()) if regions[name] == 'middle' else 0), name


@pytest.mark.parametrize('scope', ['global', 'local'])
def test_l1_prunes_the_smallest_magnitudes(scope):
    net = make_net()
    original = {k: v.clone() for k, v in conv_linear_weights(net).items()}
    C.prune_network(net, 0.5, method='l1', scope=scope, region='all')
    pruned = conv_linear_weights(net)
    groups = [list(original)] if scope == 'global' else [[n] for n in original]
    for names in groups:
        w = torch.cat([original[n].flatten() for n in names]).abs()
        gone = torch.cat([(pruned[n] == 0).flatten() for n in names])
        assert gone.any() and (~gone).any()
        assert w[~gone].min() >= w[gone].max()


def test_random_pruning_depends_on_seed_only():
    masks = []
    for seed in (5, 5, 6):
        net = make_net()
        torch.manual_seed(seed + 100)  # the global generator must not matter
        C.prune_network(net, 0.5, method='random', scope='global', seed=seed)
        masks.append(torch.cat([(w == 0).flatten() for w in conv_linear_weights(net).values()]))
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    l1 = make_net()
    C.prune_network(l1, 0.5, method='l1', scope='global')
    assert not torch.equal(masks[0], torch.cat([(w == 0).flatten() for w in conv_linear_weights(l1).values()]))


def test_pruned_snapshot_loads_safely_and_samples(tmp_path):
    src = save(tmp_path / 'net.pkl', make_net())
    result = run(['prune', '--network', src, '--dest', tmp_path / 'out' / 'p.pkl', '--amount', '0.4',
                  '--region', 'ends', '--scope', 'global'])
    assert 'ends' in result.output and '40.00%' in result.output  # the per-region report
    data = persistence.load_network_pkl(tmp_path / 'out' / 'p.pkl')
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs', 'compression'}
    step, = data['compression']
    assert step == dict(method='prune', criterion='l1', scope='global', region='ends', amount=0.4, seed=0,
                        source=src, sparsity=step['sparsity']) and step['sparsity'] == pytest.approx(0.4, abs=1e-4)
    net = data['ema']
    assert type(net) is N.EDMPrecond
    assert list(net.state_dict()) == list(make_net().state_dict())  # same names, same order
    weights = conv_linear_weights(net)
    regions = C.layer_regions(weights)
    ends = [n for n in weights if regions[n] == 'ends']
    assert sum(zeros(weights[n]) for n in ends) == round(0.4 * sum(weights[n].numel() for n in ends))
    images = generate.edm_sampler(net, torch.randn([2, 3, 8, 8]), FIXED_LABELS, num_steps=3)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_single_level_network_has_no_middle(tmp_path):
    src = save(tmp_path / 'net.pkl', make_net(channel_mult=(1,)))
    result = run(['prune', '--network', src, '--dest', tmp_path / 'p.pkl', '--region', 'middle'], expect_ok=False)
    assert result.exit_code != 0 and 'selects no conv/linear weights' in result.output
    assert 'Traceback' not in result.output and not (tmp_path / 'p.pkl').exists()


#----------------------------------------------------------------------------
# Low precision. Tolerances are first-order worst cases built from the rounding step of every weight:
# |f(w + e) - f(w)| <= sum_w |df/dw| |e_w| + O(e^2), with |e_w| at its largest and all signs adverse.


def test_quantize_per_channel_formula():
    w = torch.randn([5, 3, 3, 3], generator=torch.Generator().manual_seed(0))
    w[2] = 0  # an all-zero channel
    q, scale = C.quantize_per_channel(w)
    step = w.reshape(5, -1).abs().max(dim=1).values / 127
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert torch.equal(scale, step)
    assert q.abs().max() == 127 and torch.equal(q[2], torch.zeros_like(q[2]))
    restored = C.dequantize_per_channel(q, scale)
    err = (restored - w).abs().reshape(5, -1)
    assert (err <= step[:, None] / 2 * (1 + 1e-6)).all()
    nonzero = [0, 1, 3, 4]
    expected = torch.round(w[nonzero].reshape(4, -1) / step[nonzero, None]).to(torch.int8)
    assert torch.equal(q[nonzero].reshape(4, -1), expected)


def rounding_errors(net, dtype) -> dict:
    """Largest rounding error of each parameter element when stored as `dtype`, from the format alone."""
    errors = {}
    layer_weights = {f'{n}.weight' for n in conv_linear_weights(net)}
    for name, p in net.named_parameters():
        if dtype in ('int8', 'int4'):
            if name in layer_weights:
                step = p.reshape(p.shape[0], -1).abs().max(dim=1).values / (127 if dtype == 'int8' else 7)
                errors[name] = (step / 2).reshape([-1] + [1] * (p.ndim - 1)).expand(p.shape)
        elif dtype == 'fp16':  # unit roundoff 2^-11; below 2^-14 the subnormal spacing 2^-24 rules
            errors[name] = torch.maximum(p.abs() * 2 ** -11, torch.full_like(p, 2 ** -25))
        else:  # bf16: 8 significant bits, unit roundoff 2^-8 (same exponent range as float32)
            errors[name] = p.abs() * 2 ** -8
    return errors


CHECKED = torch.randperm(FIXED_X.numel(), generator=torch.Generator().manual_seed(0))[:32]  # output elements


def first_order_bounds(net, errors) -> torch.Tensor:
    """For output elements CHECKED of D(FIXED_X), flattened: sum over weights of |dD_k/dw| * max rounding
    error of w. (One backward pass per element, hence a fixed sample of the 384 elements.)"""
    net = net.requires_grad_(True)
    out = net(FIXED_X, FIXED_SIGMA, FIXED_LABELS).flatten()
    params = dict(net.named_parameters())
    bounds = torch.zeros([len(CHECKED)])
    for i, k in enumerate(CHECKED):
        grads = torch.autograd.grad(out[k], [params[n] for n in errors], retain_graph=True)
        bounds[i] = sum((g.abs() * errors[n]).sum() for g, n in zip(grads, errors))
    net.requires_grad_(False)
    return bounds


@pytest.mark.parametrize('dtype', ['int8', 'int4', 'fp16', 'bf16'])
def test_quantized_snapshot_loads_runs_and_stays_within_rounding_bound(tmp_path, dtype):
    net = make_net()
    with torch.no_grad():
        reference = net(FIXED_X, FIXED_SIGMA, FIXED_LABELS)
    bound = first_order_bounds(net, rounding_errors(net, dtype))
    src = save(tmp_path / 'net.pkl', net)
    run(['quantize', '--network', src, '--dest', tmp_path / 'q.pkl', '--dtype', dtype])
    data = persistence.load_network_pkl(tmp_path / 'q.pkl')
    assert data['compression'][-1]['method'] == 'quantize' and data['compression'][-1]['dtype'] == dtype
    loaded = persistence.load_network(tmp_path / 'q.pkl')
    if dtype in ('int8', 'int4'):
        assert type(loaded) is C.Int8Network and loaded.bits == int(dtype[3:])
        stored = dict(loaded.state_dict())
        assert not any(t.dtype in (torch.int8, torch.uint8) for t in net.state_dict().values())
        code_dtype, per_byte = (torch.int8, 1) if dtype == 'int8' else (torch.uint8, 2)
        assert sum(t.numel() for t in stored.values() if t.dtype == code_dtype) == \
            sum(math.ceil(w.numel() / per_byte) for w in conv_linear_weights(net).values())
    else:
        assert {p.dtype for p in loaded.parameters()} == {C.LOW_PRECISION[dtype]}
        assert {b.dtype for b in loaded.buffers()} <= {torch.float32}
    with torch.no_grad():
        out = loaded(FIXED_X, FIXED_SIGMA, FIXED_LABELS)
    assert out.dtype == torch.float32
    err = (out - reference).abs()
    assert (err.flatten()[CHECKED] <= bound).all(), (err.flatten()[CHECKED] / bound).max()
    assert err.max() > 0  # the weights really changed
    images = generate.edm_sampler(loaded, torch.randn([2, 3, 8, 8]), FIXED_LABELS, num_steps=3)
    assert torch.isfinite(images).all()


def test_quantized_file_sizes_shrink_by_the_expected_ratio(tmp_path):
    net = make_net(model_channels=32)  # ~3M weights: tensor bytes dominate the pickle's fixed overhead
    n_all = sum(p.numel() for p in net.state_dict().values())
    n_layer = sum(w.numel() for w in conv_linear_weights(net).values())
    n_scales = sum(w.shape[0] for w in conv_linear_weights(net).values())
    src = save(tmp_path / 'net.pkl', net)
    fp32 = (tmp_path / 'net.pkl').stat().st_size
    overhead = fp32 - 4 * n_all  # pickle structure and the embedded module sources
    assert 0 < overhead < 0.1 * fp32
    for dtype, expected_tensor_bytes in [('int8', 4 * n_all - 3 * n_layer + 4 * n_scales),
                                         ('fp16', 4 * n_all - 2 * sum(p.numel() for p in net.parameters()))]:
        run(['quantize', '--network', src, '--dest', tmp_path / f'{dtype}.pkl', '--dtype', dtype])
        size = (tmp_path / f'{dtype}.pkl').stat().st_size
        expected = overhead + expected_tensor_bytes
        assert abs(size - expected) < 0.05 * expected, (dtype, size, expected)
    assert (tmp_path / 'int8.pkl').stat().st_size < 0.35 * fp32


def test_int8_network_behaves_like_the_network_it_wraps(tmp_path):
    q = C.quantize_int8(make_net())
    assert (q.img_resolution, q.img_channels, q.label_dim, q.sigma_data) == (8, 3, 2, 0.5)
    q.use_bf16 = True  # generate.py --bf16 sets this on the loaded network
    assert q.net.use_bf16 is True and 'use_bf16' not in q.__dict__
    q.use_bf16 = False
    with torch.no_grad():
        first = q(FIXED_X, FIXED_SIGMA, FIXED_LABELS)
    assert q._dequantized is not None
    save(tmp_path / 'q.pkl', q)  # the float32 cache is not written
    assert persistence.load_network(tmp_path / 'q.pkl')._dequantized is None
    assert all(layer.weight is None for name in q.int8_layers for layer in [q.net.get_submodule(name)])
    with pytest.raises(ValueError, match='already holds int8'):
        C.quantize_int8(q)
    # generate.py's command line runs it unchanged
    result = CliRunner().invoke(generate.main, ['--network', str(tmp_path / 'q.pkl'), '--outdir', str(tmp_path / 'img'),
                                                '--seeds', '0-1', '--steps', '2'])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / 'img').iterdir()) == ['000000.png', '000001.png']
    with torch.no_grad():
        assert torch.equal(q(FIXED_X, FIXED_SIGMA, FIXED_LABELS), first)


@pytest.mark.parametrize('dtype', ['int8', 'fp16'])
def test_fid_net_runs_compressed_snapshots_unchanged(tmp_path, detector_file, dtype):
    import fid
    src = save(tmp_path / 'net.pkl', make_net())
    run(['quantize', '--network', src, '--dest', tmp_path / 'q.pkl', '--dtype', dtype])
    detector = detector_file
    data = make_dataset_zip(tmp_path / 'ref.zip', num_images=8, resolution=8)
    ref = tmp_path / 'ref.npz'
    for args in (['ref', '--data', data, '--dest', ref, '--workers', 0, '--detector', detector],
                 ['net', '--network', tmp_path / 'q.pkl', '--ref', ref, '--seeds', '0-3', '--repeats', 1,
                  '--steps', 2, '--detector', detector]):
        result = CliRunner().invoke(fid.main, [str(a) for a in args])
        assert result.exit_code == 0, result.output + repr(result.exception)
    assert math.isfinite(float(result.stdout.strip().splitlines()[-1]))


def test_dynamic_int8_linear_uses_the_stored_int8_weights():
    q = C.quantize_int8(make_net())
    dyn = C.dynamic_int8_linear(q)
    linear = [n for n in q.int8_layers if q.net.get_submodule(n).weight_int8.ndim == 2]
    assert linear and set(dyn.int8_layers) == set(q.int8_layers) - set(linear)
    for name in linear:
        module = dyn.net.get_submodule(name)
        assert isinstance(module, torch.ao.nn.quantized.dynamic.Linear)
        assert torch.equal(module.weight().int_repr(), q.net.get_submodule(name).weight_int8)
    # One layer: activations are quantised per call to 7 bits over [min(x, 0), max(x, 0)] (fbgemm's
    # reduce_range), an error of at most one step per input once the zero point is rounded too.
    name = 'net.model.map_layer0'[len('net.'):]
    x = torch.randn([4, q.net.get_submodule(name).weight_int8.shape[1]], generator=torch.Generator().manual_seed(1))
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
    w = q.dequantized_weights()[f'{name}.weight']
    exact = x @ w.t() + q.net.get_submodule(name).bias
    bound = step * w.abs().sum(dim=1)
    assert ((dyn.net.get_submodule(name)(x) - exact).abs() <= bound + 1e-6).all()
    with torch.no_grad():
        assert torch.isfinite(dyn(FIXED_X, FIXED_SIGMA, FIXED_LABELS)).all()


def test_chained_steps_are_recorded_and_refused_where_meaningless(tmp_path):
    src = save(tmp_path / 'net.pkl', make_net())
    run(['prune', '--network', src, '--dest', tmp_path / 'p.pkl', '--method', 'random', '--amount', '0.2'])
    run(['quantize', '--network', tmp_path / 'p.pkl', '--dest', tmp_path / 'pq.pkl', '--dtype', 'int8'])
    steps = persistence.load_network_pkl(tmp_path / 'pq.pkl')['compression']
    assert [s['method'] for s in steps] == ['prune', 'quantize']
    assert compress.describe(steps) == 'prune random global all 20% + int8'
    for args, message in [(['prune', '--network', tmp_path / 'pq.pkl', '--dest', tmp_path / 'x.pkl'], 'int8 weights'),
                          (['quantize', '--network', tmp_path / 'pq.pkl', '--dest', tmp_path / 'x.pkl', '--dtype', 'fp16'],
                           'already holds int8')]:
        result = run(args, expect_ok=False)
        assert result.exit_code == 1 and message in result.output and not (tmp_path / 'x.pkl').exists()


def test_transfer_from_int8_snapshot_is_refused_and_from_fp16_works(tmp_path):
    # An int8 snapshot's tensors are named net.<layer>.weight_int8 etc.: --transfer must not silently copy nothing.
    from training import training_loop as tl
    data = make_dataset_zip(tmp_path / 'tiny.zip')
    tl.training_loop(**loop_kwargs(data, tmp_path / 'a', 0.016, snapshot_ticks=1))
    src = str(tmp_path / 'a' / 'network-snapshot-000000.pkl')
    run(['quantize', '--network', src, '--dest', tmp_path / 'int8.pkl', '--dtype', 'int8'])
    with pytest.raises(persistence.CheckpointError, match='none of its tensors matches the network'):
        tl.training_loop(**loop_kwargs(data, tmp_path / 'b', 0.016, resume_pkl=str(tmp_path / 'int8.pkl'),
                                       ema_rampup_ratio=None))
    # fp16 weights keep their names: the run starts from them (first step has lr 0, so weights are unchanged).
    run(['quantize', '--network', src, '--dest', tmp_path / 'fp16.pkl', '--dtype', 'fp16'])
    fp16 = persistence.load_network_pkl(tmp_path / 'fp16.pkl')['ema'].state_dict()
    tl.training_loop(**loop_kwargs(data, tmp_path / 'c', 0.016, resume_pkl=str(tmp_path / 'fp16.pkl'),
                                   ema_rampup_ratio=None))
    state = torch.load(next((tmp_path / 'c').glob('training-state-*.pt')), weights_only=True)
    assert state['net'].keys() == fp16.keys()
    assert all(torch.equal(state['net'][k], v.float()) for k, v in fp16.items())


@pytest.mark.parametrize('args,message', [
    (['prune', '--network', 'MISSING', '--dest', 'OUT'], 'no such file'),
    (['prune', '--network', 'NET', '--dest', 'OUT', '--amount', '1.5'], "Invalid value for '--amount'"),
    (['prune', '--network', 'NET', '--dest', 'OUT', '--amount', '0'], "Invalid value for '--amount'"),
    (['prune', '--network', 'NET', '--dest', 'OUT', '--amount', 'nan'], "'--amount': 'nan' is not a finite number"),
    (['prune', '--network', 'JUNK', '--dest', 'OUT'], 'corrupt or truncated network pickle'),
    (['quantize', '--network', 'NET', '--dest', 'OUT', '--dtype', 'int2'], "Invalid value for '--dtype'"),
    (['qat', '--network', 'NET', '--data', 'MISSING', '--dest', 'OUT', '--bits', '4'], 'no such dataset'),
    (['qat', '--network', 'NET', '--data', 'NET', '--dest', 'OUT', '--bits', '3'], "Invalid value for '--bits'"),
    (['report', '--network', 'NET'], 'exactly one of --data or --ref'),
    (['report', '--network', 'MISSING', '--num', '0'], 'no such file'),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    paths = dict(MISSING=tmp_path / 'missing.pkl', OUT=tmp_path / 'out.pkl', JUNK=tmp_path / 'junk.pkl',
                 NET=tmp_path / 'net.pkl')
    (tmp_path / 'junk.pkl').write_bytes(b'\x80\x04not a pickle')
    save(tmp_path / 'net.pkl', make_net())
    result = run([paths.get(a, a) for a in args], expect_ok=False)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and message in errors[0], result.output
    assert 'Traceback' not in result.output and not (tmp_path / 'out.pkl').exists()

#----------------------------------------------------------------------------
# Grouped convolutions.


def test_conv_groups_default_changes_nothing():
    kw = dict(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[4])
    torch.manual_seed(3)
    default = N.EDMPrecond(**kw)
    torch.manual_seed(3)
    explicit = N.EDMPrecond(**kw, conv_groups=1)
    assert 'conv_groups' not in default.init_kwargs
    ref = default.state_dict()
    assert list(explicit.state_dict()) == list(ref)
    assert all(torch.equal(explicit.state_dict()[k], v) for k, v in ref.items())  # same init draw order
    for m in list(explicit.model.modules())[1:]:  # nothing recorded in any layer's kwargs or pickled state
        assert 'conv_groups' not in getattr(m, '_init_kwargs', {}) and 'groups' not in getattr(m, '_init_kwargs', {})
        assert 'groups' not in m.__dict__


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
@pytest.mark.parametrize('groups', [2, 4, 16])
def test_conv_groups_parameter_count_matches_formula(model_type, groups):
    kw = dict(img_resolution=8, img_channels=3, model_type=model_type, model_channels=16, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[4])
    dense = N.EDMPrecond(**kw)
    grouped = N.EDMPrecond(**kw, conv_groups=groups)
    # Formula: each UNetBlock's 3x3 convs conv0 (in -> out) and conv1 (out -> out) keep 1/G of their
    # 9 * in * out weights; every other tensor keeps its size.
    blocks = [m for m in dense.modules() if type(m).__name__ == 'UNetBlock']
    saved = sum(9 * (b.in_channels * b.out_channels + b.out_channels ** 2) * (1 - 1 / groups) for b in blocks)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(grouped) == count(dense) - saved
    for b in (m for m in grouped.modules() if type(m).__name__ == 'UNetBlock'):
        assert b.conv0.weight.shape == (b.out_channels, b.in_channels // groups, 3, 3)
        assert b.conv1.weight.shape == (b.out_channels, b.out_channels // groups, 3, 3)
    y = grouped(FIXED_X, FIXED_SIGMA)
    assert y.shape == FIXED_X.shape and torch.isfinite(y).all()


def test_conv_groups_must_divide_every_width():
    with pytest.raises(ValueError, match=r'^conv_groups=3 does not divide the 16 channels of level 0'):
        N.SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 3],
                   conv_groups=3)
    with pytest.raises(ValueError, match='conv_groups=16 does not divide the 24 channels of level 1'):
        N.DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[2, 3],
                       conv_groups=16)
    with pytest.raises(ValueError, match='groups=2 must divide in_channels=3'):
        N.Conv2d(3, 4, kernel=3, groups=2)


def test_train_conv_groups_option_builds_and_trains(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip', num_images=16)
    ctx = train.main.make_context('train', ['--outdir', str(tmp_path), '--data', data, '--cbase', '16', '--cres', '1,2',
                                            '--blocks', '1', '--conv-groups', '4', '--augment', '0'])
    c, _ = train.build_training_options(dnnlib.EasyDict(ctx.params), world=1)
    assert c.network_kwargs.conv_groups == 4
    ctx = train.main.make_context('train', ['--outdir', str(tmp_path), '--data', data])
    assert 'conv_groups' not in train.build_training_options(dnnlib.EasyDict(ctx.params), world=1)[0].network_kwargs
    torch.manual_seed(0)
    kwargs = dict(c.network_kwargs)
    net = dnnlib.util.construct_class_by_name(**kwargs, img_resolution=8, img_channels=3, label_dim=0).train()
    assert net.model.enc['8x8_block0'].conv0.groups == 4
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = EDMLoss()
    images = torch.rand([8, 3, 8, 8], generator=torch.Generator().manual_seed(1)) * 2 - 1
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(net, images).mean()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, net.parameters())]
    assert sum(changed) > 0.9 * len(changed)


def test_train_rejects_conv_groups_that_do_not_divide(tmp_path):
    data = make_dataset_zip(tmp_path / 'tiny.zip', num_images=8)
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'out'), '--data', data, '--cbase', '12',
                                             '--cres', '1,2', '--conv-groups', '8', '--dry-run'])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert errors == ["Error: Invalid value for --conv-groups: 8 does not divide the 12 channels of level 0 "
                      "(--cbase=12 x --cres[0]=1); choose a divisor of every level width"], result.output
    assert 'Training options' not in result.output and not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------
# compress.py report.


@pytest.fixture
def report_inputs(tmp_path, detector_file):
    base = save(tmp_path / 'base.pkl', make_net())
    run(['prune', '--network', base, '--dest', tmp_path / 'pruned.pkl', '--amount', '0.6'])
    data = make_dataset_zip(tmp_path / 'ref.zip', num_images=12, resolution=8)
    return base, str(tmp_path / 'pruned.pkl'), str(detector_file), data


def test_report_writes_table_files_and_plot(tmp_path, report_inputs):
    base, pruned, detector, data = report_inputs
    prefix = tmp_path / 'out' / 'report'
    result = run(['report', '--network', base, '--network', pruned, '--data', data, '--num', '6', '--steps', '2',
                  '--batch', '4', '--threads', '1', '--latency-runs', '2', '--detector', detector, '--out', prefix])
    rows = list(csv.DictReader(open(f'{prefix}.csv')))
    assert [r['network'] for r in rows] == ['base', 'pruned']
    n_params = sum(p.numel() for p in make_net().parameters())
    n_layer = sum(w.numel() for w in conv_linear_weights(make_net()).values())
    for r, path in zip(rows, [base, pruned]):
        assert int(r['params']) == n_params and int(r['threads']) == 1 and int(r['fid_images']) == 6
        raw = open(path, 'rb').read()
        assert int(r['bytes']) == len(raw) and 0 < int(r['zip_bytes']) < len(raw)
        assert 0 < float(r['latency_min_s']) <= float(r['latency_s'])
        assert math.isfinite(float(r['fid'])) and float(r['fid']) >= 0
    assert int(rows[0]['nonzero']) == n_params
    assert int(rows[1]['nonzero']) == n_params - round(0.6 * n_layer)
    assert rows[1]['compression'] == 'prune l1 global all 60%' and rows[0]['compression'] == 'none'

    report = json.loads(open(f'{prefix}.json').read())
    assert report['settings']['samplers'] == {'base': 'edm, 2 steps (3 network evaluations)'}
    assert report['settings']['reference_images'] == 12
    assert [r['network'] for r in report['networks']] == ['base', 'pruned']
    md = open(f'{prefix}.md').read().splitlines()
    assert md[0].startswith('| baseline | network | compression |')
    assert md[2].startswith('| base | base |') and md[3].startswith('| base | pruned |')
    assert [r['baseline'] for r in rows] == ['base', 'base'] and rows[0]['train_s'] == rows[1]['train_s'] == ''
    assert any('1 CPU thread' in line for line in md) and any('6 images' in line for line in md)
    png = PIL.Image.open(f'{prefix}.png')
    assert png.size == (900, 600)
    pixels = np.asarray(png.convert('RGB'))
    assert (pixels == np.array(plot.HIGHLIGHT, dtype=np.uint8)).all(axis=2).sum() > 2 * 30  # two filled markers
    assert 'Wrote' in result.output


def test_report_without_fid_or_latency_writes_no_plot(tmp_path, report_inputs):
    base, pruned, _detector, _data = report_inputs
    prefix = tmp_path / 'r'
    run(['report', '--network', base, '--network', base, '--num', '0', '--latency-runs', '0', '--out', prefix])
    rows = list(csv.DictReader(open(f'{prefix}.csv')))
    assert [r['network'] for r in rows] == ['base', "base'"] and rows[0]['fid'] == '' and rows[0]['latency_s'] == ''
    assert not (tmp_path / 'r.png').exists()


def test_row_names_tell_same_named_snapshots_apart():
    assert compress.row_names(['a/vp.pkl', 'b/ve.pkl']) == ['vp', 've']
    assert compress.row_names(['vp/network-snapshot-000140.pkl', 'vp-g2/network-snapshot-000140.pkl', 'x/int8.pkl']) \
        == ['vp/network-snapshot-000140', 'vp-g2/network-snapshot-000140', 'int8']
    assert compress.row_names(['r/base.pkl', 'r/base.pkl']) == ['base', "base'"]


def test_latency_runs_take_turns_across_networks():
    # Round robin: a burst of background load lands on every network, not on one network's whole series.
    calls = []

    class Recorder(torch.nn.Module):  # the denoiser interface edm_sampler uses; logs who ran when
        img_channels, img_resolution, label_dim, sigma_min, sigma_max = 1, 2, 0, 0.002, 80.0

        def __init__(self, name):
            super().__init__()
            self.name = name

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)

        def forward(self, x, sigma, class_labels=None):
            calls.append(self.name)
            return torch.zeros_like(x)

    times = compress.sampler_latencies({'a': Recorder('a'), 'b': Recorder('b')},
                                       {'a': dict(sampler='edm', num_steps=1), 'b': dict(sampler='ablation', solver='euler', num_steps=2)},
                                       batch=2, runs=3)
    # One warm-up round, then 3 timed rounds; Heun with 1 step = 1 evaluation, Euler with 2 steps = 2.
    assert calls == ['a', 'b', 'b'] * 4
    assert list(times) == ['a', 'b'] and all(len(t) == 3 and min(t) > 0 for t in times.values())

#----------------------------------------------------------------------------
# 4-bit weights and quantisation-aware training.


def test_int4_codes_pack_two_per_byte_and_round_trip():
    g = torch.Generator().manual_seed(0)
    for shape in ([6, 3, 3, 3], [5, 7], [1, 1]):  # even and odd element counts
        q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
        packed = C.pack_int4(q)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(q.numel() / 2)
        assert torch.equal(C.unpack_int4(packed, shape), q)
    assert C.pack_int4(torch.tensor([1, -1], dtype=torch.int8)).tolist() == [0xF1]  # low nibble first
    with pytest.raises(ValueError):
        C.pack_int4(torch.tensor([9]))


def test_quantize_per_channel_4bit_formula():
    w = torch.randn([5, 3, 3, 3], generator=torch.Generator().manual_seed(1))
    q, scale = C.quantize_per_channel(w, bits=4)
    step = w.reshape(5, -1).abs().max(dim=1).values / 7
    assert torch.equal(scale, step) and q.abs().max() == 7 and q.dtype == torch.int8
    assert torch.equal(q.reshape(5, -1), torch.round(w.reshape(5, -1) / step[:, None]).to(torch.int8))
    with pytest.raises(ValueError, match='weight width'):
        C.quantize_per_channel(w, bits=3)


@pytest.mark.parametrize('bits', [8, 4])
def test_fake_quantize_forward_and_straight_through_gradient(bits):
    w = torch.randn([4, 3, 3, 3], generator=torch.Generator().manual_seed(2), requires_grad=True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    out = C.fake_quantize(w, bits)
    assert torch.equal(out.detach(), C.dequantize_per_channel(*C.quantize_per_channel(w, bits)))
    (grad,) = torch.autograd.grad((out * upstream).sum(), w)
    assert torch.equal(grad, upstream)  # max-abs scale: nothing is clipped, the gradient passes straight through
    # A smaller scale clips the largest weights: their gradient is 0, the others' is still the float gradient,
    # the same mask (and values) as PyTorch's own fake-quantisation op.
    Q = C.quant_max(bits)
    scale = C.channel_scale(w, bits) * 0.6
    out = C.fake_quantize(w, bits, scale)
    (grad,) = torch.autograd.grad((out * upstream).sum(), w)
    w_ref = w.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(w_ref, scale, torch.zeros(4, dtype=torch.int32), 0, -Q, Q)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), w_ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    clipped = (w.detach() / scale.reshape(-1, 1, 1, 1)).round().abs() > Q
    assert clipped.any() and (~clipped).any()
    assert torch.equal(grad, torch.where(clipped, 0.0, upstream)) and torch.equal(grad, ref_grad)


def test_qat_network_gradient_is_the_float_gradient_at_the_quantised_weights():
    """STE through a whole network: d loss/d w of the QAT network equals the float network's gradient taken at
    the quantised weights (nothing clips with the max-abs scale)."""
    qat = C.qat_network(make_net(), 4).requires_grad_(True)
    assert (qat.img_resolution, qat.label_dim, qat.bits) == (8, 2, 4) and len(qat.qat_layers) == len(conv_linear_weights(qat.net))
    qat(FIXED_X, FIXED_SIGMA, FIXED_LABELS).square().sum().backward()
    float_net = make_net().requires_grad_(True)
    with torch.no_grad():
        for name in qat.qat_layers:
            float_net.get_submodule(name).weight.copy_(C.fake_quantize(qat.net.get_submodule(name).weight, 4))
    float_net(FIXED_X, FIXED_SIGMA, FIXED_LABELS).square().sum().backward()
    for (name, p), q in zip(float_net.named_parameters(), qat.net.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_int4_snapshot_weights_take_a_quarter_of_fp16_bytes_plus_scales(tmp_path):
    net = make_net(model_channels=32)  # tensor bytes dominate the pickle's fixed overhead
    layers = conv_linear_weights(net)
    n_all = sum(p.numel() for p in net.state_dict().values())
    n_layer = sum(w.numel() for w in layers.values())
    n_scales = sum(w.shape[0] for w in layers.values())
    q = C.quantize_weights(net, 4)
    stored = q.state_dict()
    for name, w in layers.items():  # per layer: ceil(n/2) bytes = a quarter of float16's 2n, plus 4 bytes a channel
        codes, scales = stored[f'net.{name}.weight_int4'], stored[f'net.{name}.weight_scale']
        assert codes.element_size() * codes.numel() == math.ceil(w.numel() / 2)
        assert scales.dtype == torch.float32 and scales.numel() == w.shape[0]
    assert sum(stored[f'net.{n}.weight_int4'].numel() for n in layers) * 4 <= 2 * n_layer + 2 * len(layers)
    # On disk: the int4 file holds the same tensors as the int8 one (same pickle overhead), n_layer/2 bytes fewer.
    src = save(tmp_path / 'net.pkl', net)
    for dtype in ('int8', 'int4'):
        run(['quantize', '--network', src, '--dest', tmp_path / f'{dtype}.pkl', '--dtype', dtype])
    saved = (tmp_path / 'int8.pkl').stat().st_size - (tmp_path / 'int4.pkl').stat().st_size
    assert abs(saved - n_layer / 2) < 0.01 * n_layer / 2, (saved, n_layer / 2)
    assert (tmp_path / 'int4.pkl').stat().st_size < 4 * (n_all - n_layer) + n_layer / 2 + 4 * n_scales + 0.15 * 4 * n_all


def test_qat_network_exports_exactly_what_it_trained_and_loads_safely(tmp_path):
    qat = C.qat_network(make_net(), 4)
    with torch.no_grad():
        trained = qat(FIXED_X, FIXED_SIGMA, FIXED_LABELS)
    save(tmp_path / 'qat.pkl', qat)  # a training snapshot of the QAT run
    assert torch.equal(persistence.load_network(tmp_path / 'qat.pkl')(FIXED_X, FIXED_SIGMA, FIXED_LABELS), trained)
    run(['quantize', '--network', tmp_path / 'qat.pkl', '--dest', tmp_path / 'int4.pkl', '--dtype', 'int4'])
    loaded = persistence.load_network(tmp_path / 'int4.pkl')
    assert type(loaded) is C.Int8Network and loaded.bits == 4
    with torch.no_grad():
        assert torch.equal(loaded(FIXED_X, FIXED_SIGMA, FIXED_LABELS), trained)
    with pytest.raises(ValueError, match='trained for 4-bit'):
        C.quantize_weights(qat, 8)
    with pytest.raises(ValueError, match='float network'):
        C.qat_network(loaded, 4)


def test_compress_qat_fine_tunes_exports_and_samples(tmp_path):
    """compress.py qat: a few steps of training_loop on the QAT wrapper, then an int4 snapshot generate.py uses."""
    data = make_dataset_zip(tmp_path / 'tiny.zip', num_images=16, resolution=8)
    net = make_net(model_channels=8, channel_mult=(1, 1), label_dim=0)
    src = save(tmp_path / 'net.pkl', net)
    result = run(['qat', '--network', src, '--data', data, '--dest', tmp_path / 'qat4.pkl', '--bits', '4',
                  '--kimg', '0.016', '--batch', '8', '--tick', '1', '--lr-rampup', '0.008'])
    assert 'QAT int4' in result.output
    snapshot = persistence.load_network_pkl(tmp_path / 'qat4.pkl')
    step = snapshot['compression'][-1]
    assert step['method'] == 'qat' and step['bits'] == 4 and step['kimg'] == 0.016 and step['train_seconds'] > 0
    assert compress.describe(snapshot['compression']) == 'QAT int4 0.016 kimg'
    loaded = snapshot['ema']
    assert type(loaded) is C.Int8Network and loaded.bits == 4
    before = C.quantize_weights(net, 4).dequantized_weights()
    after = loaded.dequantized_weights()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the weights were trained
    res = CliRunner().invoke(generate.main, ['--network', str(tmp_path / 'qat4.pkl'), '--outdir', str(tmp_path / 'img'),
                                             '--seeds', '0-1', '--steps', '3'])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / 'img').glob('*.png'))) == 2


def test_report_one_table_for_several_baselines(tmp_path):
    """Two baselines (as a VP and a VE model) in one table: rows follow their source, BASELINE= names explicitly;
    the training time of a train.py snapshot comes from its run's stats.jsonl, QAT's from its compression entry."""
    run_dir = tmp_path / 'vp-run'
    run_dir.mkdir()
    vp = save(run_dir / 'network-snapshot-000002.pkl', make_net(seed=0))
    with open(run_dir / 'stats.jsonl', 'w') as f:
        for kimg, sec in ((1.0, 10.0), (2.0, 20.0), (3.0, 30.0)):
            f.write(json.dumps({'Progress/kimg': {'mean': kimg}, 'Timing/total_sec': {'mean': sec}}) + '\n')
    ve = save(tmp_path / 've.pkl', make_net(seed=1))
    run(['prune', '--network', vp, '--dest', tmp_path / 'vp-l1.pkl', '--amount', '0.3'])
    run(['quantize', '--network', tmp_path / 'vp-l1.pkl', '--dest', tmp_path / 'vp-l1-int4.pkl', '--dtype', 'int4'])
    run(['quantize', '--network', ve, '--dest', tmp_path / 've-int8.pkl', '--dtype', 'int8'])
    data = persistence.load_network_pkl(tmp_path / 've-int8.pkl')
    data['compression'][-1].update(method='qat', bits=8, kimg=1, train_seconds=12.5)  # as compress.py qat records it
    persistence.save_network_pkl(data, tmp_path / 've-qat.pkl')
    g2 = save(tmp_path / 'g2.pkl', make_net(seed=2))
    prefix = tmp_path / 'both'
    run(['report', '--network', f'vp={vp}', '--network', tmp_path / 'vp-l1.pkl', '--network', tmp_path / 'vp-l1-int4.pkl',
         '--network', ve, '--network', tmp_path / 've-qat.pkl', '--network', f've={g2}', '--num', '0',
         '--latency-runs', '0', '--out', prefix])
    rows = list(csv.DictReader(open(f'{prefix}.csv')))
    assert [(r['baseline'], r['network']) for r in rows] == [
        ('vp', 'network-snapshot-000002'), ('vp', 'vp-l1'), ('vp', 'vp-l1-int4'), ('ve', 've'), ('ve', 've-qat'),
        ('ve', 'g2')]
    assert [r['train_s'] for r in rows] == ['20.0', '', '', '', '12.5', '']
    assert rows[2]['compression'] == 'prune l1 global all 30% + int4' and rows[4]['compression'] == 'QAT int8 1 kimg'


def test_training_seconds_spans_resumes_and_leaves_out_metrics(tmp_path):
    """A run resumed at 2 kimg restarts the loop's clocks (as the paper's): the segments add up, and the time spent
    scoring metrics during training is not training time."""
    def record(kimg, total, metrics):
        return json.dumps({'Progress/kimg': {'mean': kimg}, 'Timing/total_sec': {'mean': total},
                           'Timing/metrics_total_sec': {'mean': metrics}}) + '\n'
    (tmp_path / 'stats.jsonl').write_text(
        record(1.0, 30.0, 20.0) + record(2.0, 40.0, 20.0)            # 20 s of training, 20 s of metrics
        + record(2.1, 1.0, 0.0) + record(3.0, 25.0, 15.0)             # resumed: 10 s more
        + record(4.0, 35.0, 15.0) + 'not json\n')
    assert compress.training_seconds(str(tmp_path / 'network-snapshot-000002.pkl'), None) == 20.0
    assert compress.training_seconds(str(tmp_path / 'network-snapshot-000003.pkl'), None) == 30.0
    assert compress.training_seconds(str(tmp_path / 'network-snapshot-000004.pkl'), None) == 40.0
    assert compress.training_seconds(str(tmp_path / 'network-snapshot-000004.pkl'), [dict(method='prune')]) is None
    assert compress.training_seconds(str(tmp_path / 'other.pkl'), None) is None


def test_report_samples_each_baseline_with_its_sampler(tmp_path, detector_file):
    """--sampler BASELINE=SPEC: that baseline's rows are generated and timed with it (as the study's NCSN with
    predictor-corrector), the others with Heun and --steps; a spec for an unknown baseline is one error line."""
    from metrics import features, scoring
    vp, ve = save(tmp_path / 'vp.pkl', make_net(seed=0)), save(tmp_path / 've.pkl', make_net(seed=1))
    run(['prune', '--network', ve, '--dest', tmp_path / 've-l1.pkl', '--amount', '0.3'])
    data = make_dataset_zip(tmp_path / 'ref.zip', num_images=12, resolution=8)
    prefix = tmp_path / 'r'
    run(['report', '--network', f'vp={vp}', '--network', f've={ve}', '--network', tmp_path / 've-l1.pkl',
         '--sampler', 've=euler:num_steps=3', '--steps', '2', '--data', data, '--num', '6', '--batch', '3',
         '--latency-runs', '1', '--detector', detector_file, '--out', prefix])
    report = json.loads(open(f'{prefix}.json').read())
    assert report['settings']['samplers'] == {'vp': 'edm, 2 steps (3 network evaluations)',
                                              've': 'ablation solver=euler, 3 steps (3 network evaluations)'}
    assert [r['sampler'] for r in report['networks']] == [dict(sampler='edm', num_steps=2)] + \
        [dict(sampler='ablation', solver='euler', num_steps=3)] * 2
    detector = compress.metrics.load_detector(str(detector_file))
    ref = features.extract(features.ImageSource(data, num_workers=0), detector, progress=False)
    ref = dict(mu=ref.mu, sigma=ref.sigma)
    for row, sampler in zip(report['networks'], (dict(sampler='edm', num_steps=2), dict(sampler='ablation', solver='euler', num_steps=3))):
        net = persistence.load_network(row['path'])
        direct = scoring.score(['fid'], features.NetworkSource(net, range(6), 3, **sampler), ref, detector, progress=False)
        assert row['fid'] == pytest.approx(direct['fid'], rel=1e-6)
    assert 'Sampler (FID and latency): vp: edm, 2 steps' in open(f'{prefix}.md').read()
    for spec, needle in (('vx=euler', 'no baseline named vx'), ('ve=nosuch', "unknown sampler 'nosuch'"),
                         ('euler:bogus=1', "'bogus=1' is not option=value")):
        result = CliRunner().invoke(compress.main, ['report', '--network', f'vp={vp}', '--network', f've={ve}',
                                                    '--sampler', spec, '--num', '0', '--latency-runs', '0',
                                                    '--out', str(tmp_path / 'x')])
        errors = [line for line in result.output.splitlines() if line.startswith('Error')]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.output
