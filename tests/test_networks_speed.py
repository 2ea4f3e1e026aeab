"""The speed options of training/networks.py (FUSED_CONV_BIAS, INPLACE_OPS, CHANNELS_LAST) change nothing but
float rounding -- in eval, under no_grad/inference_mode and through backward -- and never touch their inputs;
the layout-independent `dropout` draws F.dropout's numbers; the opt-in `fast_dropout` is invisible when off;
bf16 training and sampling stay within measured tolerances of fp32."""

import pytest
import torch

from helpers import jitter_params, rel_err
from training import networks as N

pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture
def options():
    """Set the speed options for one call; restores the defaults afterwards."""
    saved = N.FUSED_CONV_BIAS, N.INPLACE_OPS, N.CHANNELS_LAST
    def apply(on):
        N.FUSED_CONV_BIAS = N.INPLACE_OPS = N.CHANNELS_LAST = on
    yield apply
    N.FUSED_CONV_BIAS, N.INPLACE_OPS, N.CHANNELS_LAST = saved

def make(model_type, **kw):
    torch.manual_seed(0)
    net = N.EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type=model_type, channel_mult=[1, 2],
                       model_channels=16 if model_type == 'SongUNet' else 32, num_blocks=1, attn_resolutions=[8], **kw)
    # Non-trivial weights everywhere (init_zero layers would hide the residual branches).
    return jitter_params(net, 0.05)

def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn([3, 3, 16, 16], generator=g), torch.tensor([0.1, 1.0, 20.0]), torch.eye(4)[[0, 2, 3]]

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
@pytest.mark.parametrize('grad_mode', [torch.no_grad, torch.inference_mode])
def test_eval_output_unchanged(options, model_type, grad_mode):
    net = make(model_type).eval()
    x, sigma, labels = inputs()
    x_copy = x.clone()
    outs = []
    for on in (False, True):
        options(on)
        with grad_mode():
            outs.append(net(x, sigma, labels).clone())
    assert torch.equal(x, x_copy)                      # the input is never overwritten
    assert 0 < rel_err(outs[1], outs[0]) < 1e-6 or torch.equal(outs[1], outs[0])
    assert outs[0].abs().max() > 0.1                   # a real output, not zeros

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_training_gradients_unchanged(options, model_type):
    # Train mode with dropout: the in-place skip scaling must be autograd-safe, and the random stream
    # (the reference's F.dropout) is the same with the options on or off.
    net = make(model_type, dropout=0.3).train()
    x, sigma, labels = inputs()
    results = []
    for on in (False, True):
        options(on)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        out = net(x, sigma, labels)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (out0, grads0), (out1, grads1) = results
    assert rel_err(out1, out0) < 1e-6
    for g0, g1 in zip(grads0, grads1):
        assert g0.norm() == 0 and g1.norm() == 0 or rel_err(g1, g0) < 1e-5

def test_dropout_is_active_in_training():
    # Guards the test above: dropout > 0 must actually change the train-mode output between seeds.
    net = make('SongUNet', dropout=0.3).train()
    x, sigma, labels = inputs()
    with torch.no_grad():
        torch.manual_seed(1)
        a = net(x, sigma, labels)
        torch.manual_seed(2)
        b = net(x, sigma, labels)
    assert rel_err(a, b) > 1e-3

# --- channels_last and dropout ------------------------------------------------------------------------

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_channels_last_reaches_every_convolution(options, model_type):
    # Guards the equivalence tests above: with the option on, the convolutions really run channels_last
    # (the 3-channel input is converted once; one-head attention hands its output over without a copy).
    options(True)
    net = make(model_type, dropout=0.3).train()
    layouts = []
    for m in net.modules():
        if isinstance(m, N.Conv2d):
            m.register_forward_hook(lambda mod, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    out = net(*inputs())
    assert len(layouts) > 10 and all(layouts)
    assert out.is_contiguous()  # the backbone hands back NCHW

def test_one_channel_input_is_converted(monkeypatch):
    # A 1-channel NCHW tensor counts as channels_last, but oneDNN reads its strides: _conv_layout fixes them.
    monkeypatch.setattr(N, 'CHANNELS_LAST', True)
    x = torch.randn(2, 1, 8, 8)
    y = N._conv_layout(x)
    assert torch.equal(x, y) and y.stride(1) == 1
    out = torch.nn.functional.conv2d(y, torch.randn(4, 1, 3, 3), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()

def test_channels_last_auto_means_bf16_only(monkeypatch):
    monkeypatch.setattr(N, 'CHANNELS_LAST', 'auto')
    x = torch.randn(2, 4, 8, 8)
    assert N._conv_layout(x) is x                                                      # fp32: NCHW
    assert N._conv_layout(x.bfloat16()).is_contiguous(memory_format=torch.channels_last)  # bf16: NHWC
    monkeypatch.setattr(N, 'CHANNELS_LAST', False)
    assert N._conv_layout(x.bfloat16()).is_contiguous()

def test_bf16_runs_nchw_by_default():
    # NCHW in bf16 too (autocast's kernels): torch's channels_last bf16 GroupNorm backward is many times slower.
    assert N.CHANNELS_LAST is False
    x = torch.randn(2, 4, 8, 8).bfloat16()
    assert N._conv_layout(x) is x

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_dropout_draws_the_same_numbers_as_F_dropout(memory_format, dtype):
    # On CPUs where bernoulli_ is torch's default kernel (N.bernoulli_draws_uniform64()), N.dropout draws the
    # mask through torch.rand(float64); on others, through bernoulli_ as F.dropout does. Same numbers either way,
    # and the generator continues from the same state.
    x0 = torch.randn(3, 8, 5, 5, dtype=dtype)
    x = x0.clone().contiguous(memory_format=memory_format).requires_grad_(True)
    ref_x = x0.clone().requires_grad_(True)
    torch.manual_seed(7)
    out = N.dropout(x, 0.13, training=True)
    after = torch.rand(4)
    torch.manual_seed(7)
    ref = torch.nn.functional.dropout(ref_x, 0.13, training=True)
    assert torch.equal(out, ref) and (ref == 0).any() and out.dtype == dtype
    assert torch.equal(after, torch.rand(4))
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    assert torch.equal(x.grad, ref_x.grad)
    assert N.dropout(x, 0.3, training=False) is x and N.dropout(x, 0, training=True) is x
    assert torch.equal(N.dropout(x0, 1.0, training=True), torch.nn.functional.dropout(x0, 1.0, training=True))

def test_fast_dropout_mask_statistics():
    torch.manual_seed(0)
    p = 0.13
    mask = N.fast_dropout_mask([256, 64, 8, 8], p)
    drop = round(p * 65536)
    assert mask.unique().tolist() == [0.0, torch.tensor(65536 / (65536 - drop), dtype=torch.float32).item()]
    n = mask.numel()
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - drop / 65536) < 5 * (p * (1 - p) / n) ** 0.5   # Bernoulli(p'), within 5 sigma
    assert abs(mask.mean().item() - 1) < 5e-3                           # unbiased: E[mask] = 1
    # Neighbouring elements (the two halves of one int32 draw) are independent.
    keep = (mask.flatten() > 0).float()
    pairs = keep[0::2] * keep[1::2]
    assert abs(pairs.mean().item() - (1 - drop / 65536) ** 2) < 5 * (0.25 / (n / 2)) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(N.fast_dropout_mask([256, 64, 8, 8], p), mask)   # reproducible from the seed
    assert N.fast_dropout_mask([3, 5], 0.5).shape == (3, 5)              # odd element counts

def _train_output(net, seed=3):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = net(*inputs())
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_fast_dropout_off_changes_nothing(model_type):
    default = make(model_type, dropout=0.3).train()
    off = make(model_type, dropout=0.3, fast_dropout=False).train()
    sd0, sd1 = default.state_dict(), off.state_dict()
    assert list(sd0) == list(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    for block in off.modules():
        if isinstance(block, N.UNetBlock):
            assert 'fast_dropout' not in block.init_kwargs and 'fast_dropout' not in block.__dict__
    (out0, grads0), (out1, grads1) = _train_output(default), _train_output(off)
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_fast_dropout_on(model_type):
    default = make(model_type, dropout=0.3)
    fast = make(model_type, dropout=0.3, fast_dropout=True)
    assert fast.init_kwargs['fast_dropout'] is True
    assert all(m.fast_dropout for m in fast.modules() if isinstance(m, N.UNetBlock))
    sd0, sd1 = default.state_dict(), fast.state_dict()
    assert list(sd0) == list(sd1) and all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # same init draws
    with torch.no_grad():  # no dropout in eval: the same network
        assert torch.equal(default.eval()(*inputs()), fast.eval()(*inputs()))
    out_default, _ = _train_output(default.train())
    out_fast, grads = _train_output(fast.train())
    assert rel_err(out_fast, out_default) > 1e-3          # another mask...
    assert torch.equal(_train_output(fast)[0], out_fast)  # ...reproducible from the seed
    assert all(torch.isfinite(g).all() for g in grads)

# --- bf16 against fp32 ---------------------------------------------------------------------------------

def test_bf16_training_step_and_samples_stay_close_to_fp32():
    # Tolerances ~3-4x the values measured on this tiny network (loss 5.0e-3, gradient 2.3e-2, weights after
    # the Adam step 2.0e-3, samples 5.0e-3); benchmarks/bench_bf16_accuracy.py gives the README's numbers.
    from training import sampling
    from training.loss import EDMLoss
    net = make('SongUNet', dropout=0)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    labels = torch.eye(4)[[0, 1, 2, 3]]
    results = {}
    for bf16 in (False, True):
        model = __import__('copy').deepcopy(net).train()
        model.use_bf16 = bf16
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(0)
        loss = EDMLoss()(net=model, images=images, labels=labels)
        loss.sum().div(4).backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        optimizer.step()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            samples = sampling.edm_sampler(model.eval(), latents, labels[:2], num_steps=6)
        results[bf16] = dict(grad=grad, weights=weights, samples=samples, loss=loss.detach())
    diff = {k: rel_err(results[True][k], results[False][k]) for k in results[False]}
    assert 0 < diff['loss'] < 2e-2, diff
    assert diff['grad'] < 0.1, diff
    assert diff['weights'] < 6e-3, diff
    assert 0 < diff['samples'] < 1.5e-2, diff

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_attention_gradients_match_torch_sdpa(monkeypatch, model_type):
    # Our explicit attention (fp32 softmax, fused softmax backward) against torch's own fused kernel, in situ:
    # the same outputs and parameter gradients through a whole training step's backward.
    net = make(model_type, dropout=0).train()
    results = []
    for impl in ('explicit', 'sdpa'):
        monkeypatch.setattr(N, 'ATTENTION_IMPL', impl)
        results.append(_train_output(net))
    (out0, grads0), (out1, grads1) = results
    assert rel_err(out0, out1) < 1e-6
    attn = [i for i, (name, _) in enumerate(net.named_parameters()) if '.qkv.' in name]
    assert attn and all(grads0[i].norm() > 0 for i in attn)  # the attention layers do get gradients
    for g0, g1 in zip(grads0, grads1):
        assert g0.norm() == 0 and g1.norm() == 0 or rel_err(g0, g1) < 1e-5
