"""Networks and preconditioning (training/networks.py) against the paper's reference behaviour.

Golden files (../shared/golden): net_*.pt (forward outputs), fullsize_keys.json (state_dict layout of
the published configurations), init_stats.json (weight initialisation). Plus the Table 1 identities,
resampling, attention, label dropout and precision options.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from training import networks as N

NET_CASES = ['net_edm_adm_cond', 'net_edm_ddpmpp_cond_aug', 'net_edm_ddpmpp_mnist_skip', 'net_edm_ncsnpp_uncond',
             'net_iddpm_adm_cond', 'net_ve_ncsnpp_cond', 'net_vp_ddpmpp_uncond']
FULLSIZE = ['cifar10-32x32-cond-vp', 'cifar10-32x32-uncond-ve', 'cifar10-32x32-cond-edm-ddpmpp', 'ffhq-64x64-uncond-vp',
            'afhqv2-64x64-uncond-ve', 'imagenet-64x64-cond-adm', 'baseline-imagenet-64x64-cond-adm-iddpm']

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny convolutions: extra threads only add contention

def small_song(**kw):
    kw = dict(dict(img_resolution=16, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[8], dropout=0.0), **kw)
    return N.EDMPrecond(**kw)

def small_adm(**kw):
    kw = dict(dict(img_resolution=16, img_channels=3, model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[8], dropout=0.0), **kw)
    return N.EDMPrecond(**kw)

#----------------------------------------------------------------------------
# Golden forward passes.

@pytest.mark.parametrize('case', NET_CASES)
def test_golden_forward(golden, case):
    g = golden(case)
    net = getattr(N, g['precond'])(**g['kwargs'])
    net.load_state_dict(g['state_dict'], strict=True)
    net.eval()
    with torch.no_grad():
        out = net(g['x'], g['sigma'], g['class_labels'], augment_labels=g['augment_labels'])
    assert out.dtype == torch.float32 and out.shape == g['output'].shape
    assert rel_err(out, g['output']) <= 1e-5

@pytest.mark.parametrize('case', ['net_edm_adm_cond', 'net_vp_ddpmpp_uncond'])
def test_golden_forward_with_sdpa_attention(golden, case, monkeypatch):
    # The fused kernel (default on CUDA fp32) also meets the golden tolerance.
    monkeypatch.setattr(N, 'ATTENTION_IMPL', 'sdpa')
    g = golden(case)
    net = getattr(N, g['precond'])(**g['kwargs'])
    net.load_state_dict(g['state_dict'], strict=True)
    with torch.no_grad():
        out = net.eval()(g['x'], g['sigma'], g['class_labels'], augment_labels=g['augment_labels'])
    assert rel_err(out, g['output']) <= 1e-5

@pytest.mark.parametrize('case', NET_CASES)
def test_golden_round_sigma_and_range(golden, case):
    g = golden(case)
    net = getattr(N, g['precond'])(**g['kwargs'])
    net.load_state_dict(g['state_dict'], strict=True)
    out = net.round_sigma(g['round_sigma_in'])
    assert out.shape == g['round_sigma_out'].shape
    torch.testing.assert_close(out, g['round_sigma_out'], rtol=1e-6, atol=0)
    # sigma_min/max are computed at construction (iDDPM: from our own u table, before loading).
    for name in ['sigma_min', 'sigma_max']:
        ours, ref = float(getattr(net, name)), float(g[name])
        assert ours == ref or math.isclose(ours, ref, rel_tol=1e-6), (name, ours, ref)

def test_golden_state_dict_is_exact_layout(golden):
    # Strict loading would also accept a permuted order; the reference order matters for
    # tools that walk parameters positionally (e.g. copy_params_and_buffers, EMA).
    for case in NET_CASES:
        g = golden(case)
        net = getattr(N, g['precond'])(**g['kwargs'])
        assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == \
               [(k, tuple(v.shape)) for k, v in g['state_dict'].items()], case

#----------------------------------------------------------------------------
# Full-size published configurations: keys, shapes, order, parameter counts (built on 'meta').

@pytest.fixture(scope='module')
def fullsize(golden_dir):
    return json.loads((golden_dir / 'fullsize_keys.json').read_text())

@pytest.mark.parametrize('config', FULLSIZE)
def test_fullsize_state_dict(fullsize, config):
    c = fullsize[config]
    with torch.device('meta'), N.no_weight_init():
        net = getattr(N, c['precond'])(**c['kwargs'])
    keys = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert keys == c['keys']
    assert sum(p.numel() for p in net.parameters()) == c['num_params']

def test_fullsize_param_counts_from_paper(fullsize):
    # The numbers quoted in the issue, independently of the JSON.
    assert fullsize['cifar10-32x32-cond-edm-ddpmpp']['num_params'] == 55_735_299
    assert fullsize['imagenet-64x64-cond-adm']['num_params'] == 295_899_267

#----------------------------------------------------------------------------
# Weight initialisation statistics.

INIT_FAST = ['edm_adm_small']
INIT_FULLSIZE = ['edm_ddpmpp_cifar', 'edm_ncsnpp_cifar']   # 55M parameters: 0.4-0.8 s each

def check_init_stats(golden_dir, name):
    c = json.loads((golden_dir / 'init_stats.json').read_text())[name]
    torch.manual_seed(0)
    net = getattr(N, c['precond'])(**c['kwargs'])
    params = dict(net.named_parameters())
    assert list(params) == list(c['params'])
    for key, ref in c['params'].items():
        p = params[key].detach().double()
        assert list(p.shape) == ref['shape'], key
        if ref['std'] == 0:   # zero / constant initialisation must be exact
            assert p.std().item() == 0 and p.mean().item() == ref['mean'], key
        else:
            # "Within a few percent", widened by the sampling error of a std/mean estimated from n
            # values, so a different (valid) random draw order would still pass.
            n = p.numel()
            assert abs(p.std().item() - ref['std']) <= (0.03 + 3 / math.sqrt(2 * n)) * ref['std'], (key, p.std().item(), ref['std'])
            assert abs(p.mean().item() - ref['mean']) <= 5 * ref['std'] / math.sqrt(n), key
            if n >= 1000:   # tells uniform (|w| <= sqrt(3) std) from normal init at equal std
                assert abs(p.abs().max().item() - ref['absmax']) <= 0.2 * ref['absmax'], key

@pytest.mark.parametrize('name', INIT_FAST)
def test_init_stats(golden_dir, name):
    check_init_stats(golden_dir, name)

@pytest.mark.parametrize('name', INIT_FULLSIZE)
def test_init_stats_fullsize(golden_dir, name):
    check_init_stats(golden_dir, name)

def test_song_init_scales_last_layers():
    net = small_song(label_dim=0)
    blk = net.model.enc['16x16_block0']
    # conv1 / proj / aux_conv use init_weight=1e-5; conv0 is plain xavier_uniform.
    assert blk.conv1.weight.abs().max() < 1e-5 * math.sqrt(6 / (16 * 9 + 16 * 9)) * 1.0001
    assert blk.conv0.weight.abs().max() > 1e-2
    assert net.model.dec['16x16_aux_conv'].weight.abs().max() < 1e-4
    assert all(torch.count_nonzero(b) == 0 for n, b in net.named_parameters() if n.endswith('bias') and 'norm' not in n)

def test_adm_init_zero_output_layers():
    net = small_adm(label_dim=10)
    assert torch.count_nonzero(net.model.out_conv.weight) == 0 and torch.count_nonzero(net.model.out_conv.bias) == 0
    assert torch.count_nonzero(net.model.enc['16x16_block0'].conv1.weight) == 0
    assert torch.count_nonzero(net.model.enc['8x8_block0'].proj.weight) == 0

@pytest.mark.parametrize('mode,expected_std', [
    ('xavier_uniform', math.sqrt(2 / (200 + 300))), ('xavier_normal', math.sqrt(2 / (200 + 300))),
    ('kaiming_uniform', math.sqrt(1 / 200)), ('kaiming_normal', math.sqrt(1 / 200))])
def test_weight_init_modes(mode, expected_std):
    torch.manual_seed(1)
    w = N.weight_init([300, 200], mode, fan_in=200, fan_out=300)
    assert abs(w.std().item() - expected_std) < 0.02 * expected_std
    if 'uniform' in mode:
        assert w.abs().max().item() <= math.sqrt(3) * expected_std * (1 + 1e-6)
    with pytest.raises(ValueError, match='init mode'):
        N.weight_init([3], 'orthogonal', 1, 1)

def test_no_weight_init_draws_no_random_numbers():
    torch.manual_seed(5)
    with N.no_weight_init():
        small_song(label_dim=10, embedding_type='fourier', channel_mult_noise=2)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))

#----------------------------------------------------------------------------
# Table 1 of the paper.

SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 80.0], dtype=torch.float64)

@pytest.mark.parametrize('sigma_data', [0.5, 1.0])
def test_edm_coefficient_identities(sigma_data):
    c_skip, c_out, c_in, c_noise = N.edm_coefficients(SIGMAS, sigma_data)
    torch.testing.assert_close(c_skip + c_out ** 2 / sigma_data ** 2, torch.ones_like(SIGMAS))  # unit-variance target
    torch.testing.assert_close(c_in ** 2 * (SIGMAS ** 2 + sigma_data ** 2), torch.ones_like(SIGMAS))  # unit-variance input
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)
    # Effective training target (y - c_skip (y+n)) / c_out has unit variance for y ~ sigma_data, n ~ sigma.
    var = ((1 - c_skip) ** 2 * sigma_data ** 2 + c_skip ** 2 * SIGMAS ** 2) / c_out ** 2
    torch.testing.assert_close(var, torch.ones_like(SIGMAS))

def test_vp_sigma_inverse_and_derivative():
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(N.vp_sigma_inv(N.vp_sigma(t)), t, rtol=1e-9, atol=1e-12)
    h = 1e-6
    fd = (N.vp_sigma(t[1:-1] + h) - N.vp_sigma(t[1:-1] - h)) / (2 * h)
    torch.testing.assert_close(N.vp_sigma_deriv(t[1:-1]), fd, rtol=1e-5, atol=0)
    net = N.VPPrecond(16, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    assert math.isclose(net.sigma_max, math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel_tol=1e-6)
    assert math.isclose(net.sigma_min, math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel_tol=3e-2)  # fp32 like the paper
    torch.testing.assert_close(net.sigma_inv(net.sigma(torch.tensor([0.3, 0.7]))), torch.tensor([0.3, 0.7]))

def test_vp_ve_iddpm_coefficients():
    # Table 1's coefficients through what they mean rather than restated. With x = y + sigma n, D(x) = y needs
    # the raw network to output F = (y - c_skip x) / c_out: the noise n for VP and iDDPM, -n for VE.
    g = torch.Generator().manual_seed(0)
    s = SIGMAS.reshape(-1, 1)
    y, n = torch.randn([2, len(SIGMAS), 32], generator=g, dtype=torch.float64)
    x = y + s * n
    target = lambda c_skip, c_out: (y - c_skip * x) / c_out
    c_skip, c_out, c_in, c_noise = N.vp_coefficients(s)
    torch.testing.assert_close(target(c_skip, c_out), n)
    torch.testing.assert_close(c_in ** 2 * (s ** 2 + 1), torch.ones_like(s))  # unit-variance input (data std 1)
    torch.testing.assert_close(N.vp_sigma(c_noise / 999), s)  # c_noise = (M - 1) t, t the VP time of sigma
    c_skip, c_out, c_in, c_noise = N.ve_coefficients(s)
    torch.testing.assert_close(target(c_skip, c_out), -n)
    assert c_in == 1
    # c_noise = ln(sigma / 2): 0 at sigma = 2, +1 per factor e.
    torch.testing.assert_close(N.ve_coefficients(torch.tensor([2.0, 2 * math.e], dtype=torch.float64))[3],
                               torch.tensor([0.0, 1.0], dtype=torch.float64))
    # iDDPM predicts the noise like VP; c_noise counts the M timesteps backwards from u_0 (noisiest) = 999.
    idx = torch.tensor([0, 1, 500, 999])
    u = N.iddpm_u(dtype=torch.float64)[idx]
    for a, b in zip(N.iddpm_coefficients(u, idx)[:3], N.vp_coefficients(u)[:3]):
        torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    assert N.iddpm_coefficients(u, idx)[3].tolist() == [999, 998, 499, 0]

def test_iddpm_u_table_and_rounding():
    u = N.iddpm_u()
    assert u.shape == (1001,) and u[1000] == 0
    assert bool((u[:-1] > u[1:]).all())           # strictly decreasing
    # Recurrence: u_{j-1}^2 + 1 = (u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1)
    j = torch.arange(1, 1001, dtype=torch.float64)
    ratio = (N.iddpm_alpha_bar(j - 1) / N.iddpm_alpha_bar(j)).clip(min=0.001)
    torch.testing.assert_close((u[:-1].double() ** 2 + 1) * ratio, u[1:].double() ** 2 + 1, rtol=2e-5, atol=0)
    net = N.iDDPMPrecond(16, 3, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    assert net.sigma_min == float(u[999]) and net.sigma_max == float(u[0])
    # round_sigma snaps to the nearest table entry; the index maps back to it.
    idx = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(net.round_sigma(u[idx] * (1 + 1e-4)), u[idx])
    assert torch.equal(net.round_sigma(u[idx], return_index=True), idx)
    s = torch.tensor([[1.0, 2.0], [0.1, 50.0]], dtype=torch.float64)
    out = net.round_sigma(s)
    assert out.shape == s.shape and out.dtype == s.dtype
    assert torch.equal(out.float(), u[(s.reshape(-1, 1).float() - u).abs().argmin(1)].reshape(2, 2))

def test_precond_uses_table1_formula():
    # D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): check against the raw backbone.
    torch.manual_seed(0)
    net = small_song(label_dim=0, sigma_data=0.7).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
        x = torch.randn(3, 3, 16, 16)
        sigma = torch.tensor([0.05, 1.0, 20.0])
        c_skip, c_out, c_in, c_noise = N.edm_coefficients(sigma.reshape(-1, 1, 1, 1), 0.7)
        F_x = net.model(c_in * x, c_noise.flatten(), class_labels=None)
        torch.testing.assert_close(net(x, sigma), c_skip * x + c_out * F_x)
        # Scalar sigma (python float) is accepted and broadcast.
        torch.testing.assert_close(net(x[:1], 1.0), net(x[:1], torch.tensor([1.0])))

#----------------------------------------------------------------------------
# Layers.

def test_group_norm_group_count():
    assert N.GroupNorm(16).num_groups == 4
    assert N.GroupNorm(128).num_groups == 32
    assert N.GroupNorm(96, min_channels_per_group=4).num_groups == 24
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(N.GroupNorm(16)(x), F.group_norm(x, 4, eps=1e-5))

def test_resample_filters_are_box_and_nearest():
    x = torch.randn(2, 3, 8, 8)
    down = N.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    up = N.Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode='nearest'))
    # The [1,3,3,1] filter preserves the DC component (normalised), in both directions.
    ones = torch.ones(1, 3, 8, 8)
    for layer in [N.Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 3, 3, 1]),
                  N.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1])]:
        y = layer(ones)
        torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.ones_like(y[..., 2:-2, 2:-2]))

@pytest.mark.parametrize('filt', [[1, 1], [1, 3, 3, 1]])
@pytest.mark.parametrize('direction', ['up', 'down'])
def test_fused_resample_matches_unfused(filt, direction):
    torch.manual_seed(0)
    kw = dict(in_channels=4, out_channels=6, kernel=3, resample_filter=filt, **{direction: True})
    fused = N.Conv2d(fused_resample=True, init_bias=1, **kw)
    plain = N.Conv2d(fused_resample=False, **kw)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 16, 16)
    a, b = fused(x), plain(x)
    assert a.shape == b.shape == (2, 6, 32 if direction == 'up' else 8, 32 if direction == 'up' else 8)
    if direction == 'up':
        # Upsample-then-convolve: identical away from the border (everywhere for the box filter).
        m = 0 if filt == [1, 1] else 2
        torch.testing.assert_close(a[..., m:a.shape[-2] - m, m:a.shape[-1] - m], b[..., m:b.shape[-2] - m, m:b.shape[-1] - m])
    else:
        # Fused down = convolve at full resolution, then filter + decimate (one padded pass).
        w, f = fused.weight, fused.resample_filter
        p = (f.shape[-1] - 1) // 2
        ref = F.conv2d(F.conv2d(x, w, padding=1 + p), f.tile([6, 1, 1, 1]), groups=6, stride=2) + fused.bias.reshape(1, -1, 1, 1)
        torch.testing.assert_close(a, ref)
        if filt == [1, 1]:
            full = F.conv2d(x, w, fused.bias, padding=1)
            torch.testing.assert_close(a, F.avg_pool2d(full, 2))

def test_attention_sdpa_matches_explicit_fp32_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 16, 64).unbind(0)
    ref = torch.einsum('nqk,nck->ncq', (torch.einsum('ncq,nck->nqk', q.double(), k.double()) / math.sqrt(16)).softmax(2), v.double())
    for impl in ['auto', 'sdpa', 'explicit']:
        assert rel_err(N.attention(q, k, v, impl=impl), ref) < 1e-6, impl
    with pytest.raises(ValueError, match='attention'):
        N.attention(q, k, v, impl='flash')
    # Low precision: softmax still in fp32, output in the input dtype.
    out16 = N.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out16.dtype == torch.bfloat16 and rel_err(out16.float(), ref) < 2e-2

def test_attention_op_backward():
    torch.manual_seed(0)
    q = torch.randn(4, 8, 10, requires_grad=True)
    k = torch.randn(4, 8, 12, requires_grad=True)
    g = torch.randn(4, 10, 12)
    (N.AttentionOp.apply(q, k) * g).sum().backward()
    dq, dk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    (torch.einsum('ncq,nck->nqk', q, k / math.sqrt(8)).softmax(2) * g).sum().backward()
    torch.testing.assert_close(dq, q.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dk, k.grad, rtol=1e-5, atol=1e-6)

def test_chunked_attention_matches_unchunked(monkeypatch):
    # The explicit attention runs in chunks of the N*heads axis (3, 3, 2 here); forward, backward and the
    # no-grad path must give the unchunked AttentionOp + bmm numbers, in fp32 and in bf16.
    monkeypatch.setattr(N, 'ATTENTION_CHUNK_BYTES', 3 * 12 * 12 * 4)
    torch.manual_seed(0)
    for dtype, tol in [(torch.float32, dict(rtol=1e-6, atol=1e-7)), (torch.bfloat16, dict(rtol=1e-2, atol=1e-2))]:
        qkv = torch.randn(8, 6, 3, 12).to(dtype)  # the UNetBlock's layout: q, k, v strided views of one tensor
        g = torch.randn(8, 12, 6).to(dtype).transpose(1, 2)
        results = []
        for chunked in (False, True):
            t = qkv.clone().requires_grad_(True)
            q, k, v = t.unbind(2)
            if chunked:
                out = N.attention(q, k, v, impl='explicit')
            else:
                out = torch.bmm(N.AttentionOp.apply(q, k), v.transpose(1, 2)).transpose(1, 2)
            out.backward(g)
            results.append((out.detach(), t.grad))
        assert len(N._attention_chunks(*qkv.unbind(2)[:2])) == 3
        assert N._attention_chunks(*qkv.to('meta').unbind(2)[:2]) == [slice(None)]  # off the CPU: one chunk
        assert results[1][0].dtype == dtype and results[1][1].dtype == dtype
        torch.testing.assert_close(results[1][0], results[0][0], **tol)
        torch.testing.assert_close(results[1][1], results[0][1], **tol)
        with torch.no_grad():
            torch.testing.assert_close(N.attention(*qkv.unbind(2), impl='explicit'), results[0][0], **tol)

def test_positional_embedding_frequencies():
    # [cos(x f_i), sin(x f_i)] with frequencies falling geometrically from f_0 = 1 to 1/max_positions, reached
    # at the last channel with endpoint=True (SongUNet) and one step past it without (DhariwalUNet). The
    # frequencies are read back from the embedding of x = 1 (all f_i <= 1 < pi: the angle is unambiguous).
    for endpoint in (True, False):
        emb = N.PositionalEmbedding(16, endpoint=endpoint)(torch.tensor([0.0, 1.0])).double()
        assert emb.shape == (2, 16)
        torch.testing.assert_close(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]).double())  # x = 0
        f = torch.atan2(emb[1, 8:], emb[1, :8])
        ratio = f[1:] / f[:-1]
        torch.testing.assert_close(ratio, ratio[:1].expand(7), rtol=1e-5, atol=0)
        assert f[0].item() == pytest.approx(1, rel=1e-6)
        last = f[-1] if endpoint else f[-1] * ratio[0]
        assert last.item() == pytest.approx(1e-4, rel=1e-5), endpoint
    emb = N.PositionalEmbedding(8, max_positions=100, endpoint=True)(torch.tensor([1.0]))
    assert math.atan2(emb[0, 7], emb[0, 3]) == pytest.approx(1e-2, rel=1e-5)

#----------------------------------------------------------------------------
# Conditioning, label dropout, precision, persistence hooks.

@pytest.mark.parametrize('make', [small_song, small_adm])
def test_label_dropout(make):
    torch.manual_seed(0)
    net = make(label_dim=10, label_dropout=1.0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, sigma = torch.randn(4, 3, 16, 16), torch.full([4], 1.5)
    labels = torch.eye(10)[[1, 2, 3, 4]]
    with torch.no_grad():
        net.train()
        dropped = net(x, sigma, labels)
        torch.testing.assert_close(dropped, net(x, sigma, torch.zeros(4, 10)))   # every label dropped
        net.eval()
        kept = net(x, sigma, labels)
        assert rel_err(kept, dropped) > 1e-4                                     # eval mode ignores dropout
        torch.testing.assert_close(net(x, sigma, None), net(x, sigma, torch.zeros(4, 10)))  # None -> zeros
    net.model.label_dropout = 0
    net.train()
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, labels), kept)

def test_drop_labels_rate():
    torch.manual_seed(0)
    labels = torch.ones(20000, 3)
    kept = N.drop_labels(labels, 0.1, training=True)[:, 0].mean().item()
    assert abs(kept - 0.9) < 0.01
    assert torch.equal(N.drop_labels(labels, 0.1, training=False), labels)

def test_use_fp16_is_ignored_on_cpu_and_bf16_runs():
    torch.manual_seed(0)
    net = small_song(label_dim=10).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 4.0]), torch.eye(10)[:2]
    with torch.no_grad():
        ref = net(x, sigma, labels)
        net.use_fp16 = True                      # CUDA-only, like the paper: no effect on CPU
        assert torch.equal(net(x, sigma, labels), ref)
        net.use_fp16, net.use_bf16 = False, True
        seen = []
        hook = net.model.enc['16x16_conv'].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        out = net(x, sigma, labels)
        assert seen == [torch.bfloat16] and out.dtype == torch.float32
        assert rel_err(out, ref) < 3e-2
        seen.clear()
        torch.testing.assert_close(net(x, sigma, labels, force_fp32=True), ref)
        assert seen == [torch.float32]
        hook.remove()
    bf = small_song(label_dim=10, use_bf16=True)
    assert bf.init_kwargs['use_bf16'] is True

def test_backward_through_network():
    net = small_adm(label_dim=10)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    net(x, torch.tensor([0.5, 2.0]), torch.eye(10)[:2]).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert net.model.out_conv.weight.grad.abs().sum() > 0

def test_persistent_kwargs_and_deepcopy():
    from torch_utils import persistence
    net = small_song(label_dim=10, augment_dim=9)
    assert persistence.is_persistent(net) and persistence.is_persistent(N.EDMPrecond)
    assert net.init_kwargs['augment_dim'] == 9 and net.init_kwargs['model_type'] == 'SongUNet'
    assert type(net).__name__ == 'EDMPrecond' and type(net).__module__ == 'training.networks'
    dup = copy.deepcopy(net).eval()
    net.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(dup(x, torch.tensor([1.0]), torch.eye(10)[:1]), net(x, torch.tensor([1.0]), torch.eye(10)[:1]))
    assert dup.init_kwargs == net.init_kwargs

def test_invalid_model_type():
    with pytest.raises(ValueError, match='model_type'):
        N.EDMPrecond(16, 3, model_type='Transformer')

def test_channels_last_gives_same_output():
    # benchmarks/bench_networks.py times channels_last; it must not change the numbers.
    torch.manual_seed(0)
    net = small_song(label_dim=0, encoder_type='residual', resample_filter=[1, 3, 3, 1]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
        x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 7.0])
        ref = net(x, sigma)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), sigma)
    assert rel_err(out, ref) < 1e-5

def test_adm_augment_mapping_starts_at_zero():
    net = small_adm(label_dim=0, augment_dim=9).eval()
    assert net.model.map_augment.weight.shape == (32, 9) and net.model.map_augment.bias is None
    assert torch.count_nonzero(net.model.map_augment.weight) == 0
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
        x, sigma, aug = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 7.0]), torch.randn(2, 9)
        assert rel_err(net(x, sigma, augment_labels=aug), net(x, sigma)) > 1e-4   # conditioning is wired in

def test_multihead_attention_channel_layout():
    # qkv output channels are grouped [head][channel][q|k|v] (the paper's layout); each head attends alone.
    torch.manual_seed(0)
    blk = N.UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=2, init_zero=dict(init_weight=1)).eval()
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        # Residual branch as the block computes it (adaptive scale/shift), then attention by hand.
        params = blk.affine(torch.zeros(2, 4)).unsqueeze(2).unsqueeze(3)
        scale, shift = params.chunk(2, dim=1)
        h = blk.conv0(F.silu(blk.norm0(x)))
        h = blk.conv1(F.silu(shift + blk.norm1(h) * (scale + 1)))
        y = h + x
        qkv = blk.qkv(blk.norm2(y)).reshape(2, 2, 4, 3, 16)            # [N, head, C/head, qkv, L]
        outs = []
        for head in range(2):
            q, k, v = qkv[:, head, :, 0], qkv[:, head, :, 1], qkv[:, head, :, 2]
            w = torch.einsum('ncq,nck->nqk', q, k / 2).softmax(2)
            outs.append(torch.einsum('nqk,nck->ncq', w, v))
        ref = blk.proj(torch.stack(outs, 1).reshape(2, 8, 4, 4)) + y
        torch.testing.assert_close(blk(x, torch.zeros(2, 4)), ref)
