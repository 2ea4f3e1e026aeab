"""Post-hoc EMA (training/phema.py) against ../shared/golden/edm2_phema.pt, the closed forms behind it,
and the EMA policies' training-loop interface."""

import io
import os

import numpy as np
import pytest
import torch

from helpers import jitter_params, rel_err
from training import phema as P

pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def g(golden_dir):
    return torch.load(golden_dir / 'edm2_phema.pt', weights_only=True)

#----------------------------------------------------------------------------
# Goldens.

def test_golden_exp_std(g):
    assert rel_err(P.std_to_exp(g['stds'].numpy()), g['exps']) <= 1e-9
    assert rel_err(P.exp_to_std(g['exps'].numpy()), g['exp_to_std_of_exps']) <= 1e-9
    np.testing.assert_allclose(P.std_to_exp([0.05, 0.1]), [16.97219860, 6.93720394], rtol=1e-9)

def test_golden_beta(g):
    args = g['betas_args']
    betas = [[P.power_function_beta(std=s, t_next=tn, t_delta=td) for s in args['stds']]
             for tn, td in args['t_next_t_delta']]
    assert np.asarray(betas).shape == tuple(g['betas'].shape)
    assert rel_err(betas, g['betas']) <= 1e-9
    assert np.all(np.asarray(betas)[0] == 0)  # first step: the EMA becomes the network

def test_golden_correlation(g):
    a = g['corr_args']
    corr = P.power_function_correlation(np.array(a['a_ofs']), np.array(a['a_std']), np.array(a['b_ofs']), np.array(a['b_std']))
    assert rel_err(corr, g['corr']) <= 1e-9

def test_golden_posthoc_coefficients(g):
    in_nimg, in_std = g['in_nimg'].numpy(), g['in_std'].numpy()
    coefs = P.solve_posthoc_coefficients(in_nimg, in_std, in_nimg.max(), g['out_std'].numpy())
    assert coefs.shape == tuple(g['coefs'].shape) == (16, 4)
    assert rel_err(coefs, g['coefs']) <= 1e-9
    m = g['coefs_mid_args']
    n = m['in_first']
    coefs_mid = P.solve_posthoc_coefficients(in_nimg[:n], in_std[:n], in_nimg[n - 1], m['out_std'].numpy())
    assert rel_err(coefs_mid, g['coefs_mid']) <= 1e-9

def test_golden_reconstruction(g):
    outs = P.combine_snapshots(iter(g['recon_inputs']), g['coefs'].numpy())  # one input at a time
    assert len(outs) == len(g['recon_outputs'])
    for out, ref in zip(outs, g['recon_outputs'].values()):
        assert out.dtype == torch.float32
        assert rel_err(out, ref) <= 1e-6  # float32 accumulation of 16 terms (measured <= 1e-7)

def test_golden_trajectory(g):
    lin = torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p, v in zip(lin.parameters(), g['traj_init']):
            p.copy_(v)
    ema = P.PowerFunctionEMA(lin, stds=g['traj_stds'])
    batch = g['traj_batch']
    for k, params in enumerate(g['traj_params'], start=1):
        with torch.no_grad():
            for p, v in zip(lin.parameters(), params):
                p.copy_(v)
        ema.update(cur_nimg=k * batch, batch_size=batch)
    pairs = ema.get()
    assert [suffix for _, suffix in pairs] == ['-0.050', '-0.100']
    for (module, _), ref in zip(pairs, g['traj_ema']):
        for p, r in zip(module.parameters(), ref):
            assert rel_err(p.detach(), r) <= 1e-5

#----------------------------------------------------------------------------
# Closed forms.

def test_std_exp_round_trip():
    stds = np.linspace(0.005, 0.28, 56)
    np.testing.assert_allclose(P.exp_to_std(P.std_to_exp(stds)), stds, rtol=1e-10)
    exps = np.array([0.2, 1.0, 6.94, 16.97, 100.0, 1000.0])
    np.testing.assert_allclose(P.std_to_exp(P.exp_to_std(exps)), exps, rtol=1e-8)
    assert P.std_to_exp(np.array([[0.05, 0.1]])).shape == (1, 2)

def test_correlation_matches_numerical_integral():
    # <p_a, p_b> with p(tau) = (gamma + 1) tau^gamma / T^(gamma + 1) on [0, T], by adaptive quadrature.
    from scipy.integrate import quad
    for (ta, sa), (tb, sb) in [((1.0, 0.05), (2.5, 0.1)), ((3.0, 0.1), (1.2, 0.05)), ((2.0, 0.2), (2.0, 0.07))]:
        ga, gb = float(P.std_to_exp(sa)), float(P.std_to_exp(sb))
        p = lambda tau, T, g: (g + 1) * tau ** g / T ** (g + 1)
        numeric, _ = quad(lambda tau: p(tau, ta, ga) * p(tau, tb, gb), 0, min(ta, tb), epsabs=0, epsrel=1e-12)
        np.testing.assert_allclose(P.power_function_correlation(ta, sa, tb, sb), numeric, rtol=1e-9)

def test_solve_reproduces_an_input_profile_exactly():
    in_ofs = np.repeat([1e6, 2e6, 3e6, 4e6], 2)
    in_std = np.tile([0.05, 0.10], 4)
    for k in [1, 4, 7]:
        coefs = P.solve_posthoc_coefficients(in_ofs, in_std, in_ofs[k], in_std[k])
        np.testing.assert_allclose(coefs[:, 0], np.eye(8)[k], atol=1e-9)
    coefs = P.solve_posthoc_coefficients(in_ofs, in_std, 4e6, [0.03, 0.07, 0.15])
    np.testing.assert_allclose(coefs.sum(axis=0), 1, rtol=1e-12)

def test_power_function_response_has_the_requested_width():
    # The discrete profile over t = 0..ofs has relative standard deviation sigma_rel (up to 1/ofs terms).
    for std in [0.05, 0.1, 0.2]:
        resp = P.power_function_response(ofs=20000, std=std, len=25000)
        t = np.arange(25000)
        assert resp.shape == (25000,) and abs(resp.sum() - 1) < 1e-12 and np.all(resp[20001:] == 0)
        mean = (resp * t).sum()
        width = np.sqrt((resp * (t - mean) ** 2).sum()) / 20000
        assert abs(width - std) < 1e-3 * std
    both = P.power_function_response(ofs=[100, 200], std=[0.05, 0.1], len=300, axis=1)
    assert both.shape == (2, 300)
    np.testing.assert_allclose(both[1], P.power_function_response(200, 0.1, 300))

def test_ema_weights_are_the_discretised_power_profile():
    # With beta_k = (1 - 1/k)^(gamma+1) (steps of one batch), the product of later betas telescopes, and
    # step k's parameter ends up with weight (k/T)^(gamma+1) - ((k-1)/T)^(gamma+1): the integral of the
    # continuous profile over step k.
    T, batch, std = 50, 8, 0.1
    values = torch.randn(T, dtype=torch.float64)
    net = torch.nn.Linear(1, 1, bias=False).double()
    ema = P.PowerFunctionEMA(net, stds=[std])
    for k in range(1, T + 1):
        with torch.no_grad():
            net.weight.fill_(values[k - 1])
        ema.update(cur_nimg=k * batch, batch_size=batch)
    gamma = P.std_to_exp(std)
    k = np.arange(1, T + 1)
    weights = (k / T) ** (gamma + 1) - ((k - 1) / T) ** (gamma + 1)
    expected = float((torch.as_tensor(weights) * values).sum())
    assert abs(ema.get()[0][0].weight.item() - expected) < 1e-12

def test_posthoc_reconstruction_of_a_tracked_length():
    # A noisy SGD trajectory tracked with sigma_rel 0.05 and 0.10 (snapshots every 64 steps) and, directly,
    # 0.07. Reconstructing 0.07 from the snapshots must land far closer to the directly tracked EMA than
    # either input: the residual is the least-squares misfit of the profile, not the gap between lengths.
    torch.manual_seed(0)
    dim, batch, steps, every = 32, 16, 2048, 64
    target = torch.randn(dim, dtype=torch.float64)
    net = torch.nn.Linear(dim, 1, bias=False).double()
    tracked = P.PowerFunctionEMA(net, stds=[0.05, 0.10])
    direct = P.PowerFunctionEMA(net, stds=[0.07])
    snaps, snap_nimg, snap_std = [], [], []
    for step in range(1, steps + 1):
        x = torch.randn(batch, dim, dtype=torch.float64)
        y = x @ target + torch.randn(batch, dtype=torch.float64)
        with torch.no_grad():
            grad = 2 * x.t() @ (x @ net.weight[0] - y) / batch
            net.weight[0] -= 0.01 * grad
        tracked.update(cur_nimg=step * batch, batch_size=batch)
        direct.update(cur_nimg=step * batch, batch_size=batch)
        if step % every == 0:
            for module, suffix in tracked.get():
                snaps.append(module.weight.detach().clone().reshape(-1))
                snap_nimg.append(step * batch)
                snap_std.append(float(suffix[1:]))
    coefs = P.solve_posthoc_coefficients(snap_nimg, snap_std, steps * batch, 0.07)
    recon = P.combine_snapshots(snaps, coefs)[0].double()
    truth = direct.get()[0][0].weight.detach().reshape(-1)
    inputs = [m.weight.detach().reshape(-1) for m, _ in tracked.get()]
    gap = min((inp - truth).norm().item() for inp in inputs)
    err = (recon - truth).norm().item()
    assert err < 0.01 * gap, (err, gap)  # measured: err = 8e-4 * gap

#----------------------------------------------------------------------------
# EMA policies: the training loop's interface.

def small_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    return net.train()

@pytest.mark.parametrize('cls,kwargs,suffixes', [
    (P.PowerFunctionEMA, dict(stds=[0.05, 0.1]), ['-0.050', '-0.100']),
    (P.PowerFunctionEMA, dict(), ['-0.050', '-0.100']),
    (P.TraditionalEMA, dict(halflife_Mimg=0.001), ['']),
])
def test_policy_interface(cls, kwargs, suffixes):
    net = small_net()
    policy = cls(net=net, **kwargs)
    pairs = policy.get()
    assert [s for _, s in pairs] == suffixes
    assert all(m is not net and not m.training and not any(p.requires_grad for p in m.parameters()) for m, _ in pairs)
    for step in range(1, 6):
        jitter_params(net, 1.0)
        policy.update(cur_nimg=step * 64, batch_size=64)
    with torch.no_grad():
        net(torch.randn(8, 4))  # moves the BatchNorm running stats (buffers)
    pairs = policy.get()
    for module, _ in pairs:  # get() hands out the network's current buffers
        assert torch.equal(module[1].running_mean, net[1].running_mean)

    # state_dict: tensors and plain data only; a fresh policy loaded from it holds the same EMAs.
    buf = io.BytesIO()
    torch.save(policy.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = cls(net=small_net(), **kwargs)
    other.load_state_dict(state)
    for (a, _), (b, _) in zip(policy.get(), other.get()):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))

    # reset() copies the network into every EMA.
    policy.reset()
    for module, _ in policy.get():
        assert all(torch.equal(x, y) for x, y in zip(module.state_dict().values(), net.state_dict().values()))

def test_power_function_state_refuses_other_stds():
    state = P.PowerFunctionEMA(small_net(), stds=[0.05, 0.1]).state_dict()
    with pytest.raises(ValueError, match='stds'):
        P.PowerFunctionEMA(small_net(), stds=[0.05, 0.2]).load_state_dict(state)

def test_traditional_ema_follows_the_halflife_formula():
    net = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(0)
    ema = P.TraditionalEMA(net, halflife_Mimg=0.0005, rampup_ratio=0.09)
    value, batch = 0.0, 100
    for step in range(1, 201):
        with torch.no_grad():
            net.weight.fill_(float(step))
        ema.update(cur_nimg=step * batch, batch_size=batch)
        halflife = min(500.0, step * batch * 0.09)
        beta = 0.5 ** (batch / halflife)
        value = beta * value + (1 - beta) * step
    assert abs(ema.get()[0][0].weight.item() - value) < 1e-9 * value
    # Without ramp-up and an infinite half-life the EMA never moves.
    frozen = P.TraditionalEMA(net, rampup_ratio=None)
    start = frozen.get()[0][0].weight.item()
    with torch.no_grad():
        net.weight.fill_(-5)
    frozen.update(cur_nimg=1000, batch_size=100)
    assert frozen.get()[0][0].weight.item() == start

#----------------------------------------------------------------------------
# The EDM2 pieces in the training loop's policy slots (ema_kwargs / lr_kwargs; train.py wiring comes later).

def test_training_loop_with_edm2_policies_writes_profiles_and_resumes_exactly(tmp_path):
    from helpers import edm2_loop_kwargs, make_dataset_zip
    from torch_utils import persistence
    from training import training_loop as tl
    data = make_dataset_zip(tmp_path / 'tiny.zip')

    def run(run_dir, total_kimg, **extra):
        return tl.training_loop(**edm2_loop_kwargs(
            data, run_dir, ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA', stds=[0.05, 0.1]),
            lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=1e-2, ref_batches=2,
                           rampup_Mimg=0.00003),
            augment_kwargs=None, seed=1, batch_size=16, total_kimg=total_kimg, kimg_per_tick=0.032,
            snapshot_ticks=1, state_dump_ticks=1, **extra))

    run(tmp_path / 'a', 0.064)
    snaps = sorted(f for f in os.listdir(tmp_path / 'a') if f.startswith('network-snapshot-'))
    assert snaps[-2:] == ['network-snapshot-0000000-0.050.pkl', 'network-snapshot-0000000-0.100.pkl']
    ema05 = persistence.load_network_pkl(str(tmp_path / 'a' / snaps[-2]))['ema']
    ema10 = persistence.load_network_pkl(str(tmp_path / 'a' / snaps[-1]))['ema']
    assert type(ema05).__name__ == 'Precond'
    assert not all(torch.equal(a, b) for a, b in zip(ema05.state_dict().values(), ema10.state_dict().values()))
    straight = torch.load(next(str(tmp_path / 'a' / f) for f in os.listdir(tmp_path / 'a') if f.startswith('training-state')),
                          weights_only=True)
    assert straight['ema']['stds'] == [0.05, 0.1] and len(straight['ema']['emas']) == 2
    # The last step (48 images seen before it) ran at EDM2's lr: past the ramp-up, decayed by sqrt(48 / 32).
    lr = straight['optimizer_state']['param_groups'][0]['lr']
    assert lr == pytest.approx(tl.learning_rate_schedule(48, 16, ref_lr=1e-2, ref_batches=2, rampup_Mimg=0.00003), rel=1e-12)
    assert lr == pytest.approx(1e-2 / np.sqrt(1.5), rel=1e-12)

    # Interrupted after 2 of 4 steps and resumed: identical weights and EMA profiles.
    run(tmp_path / 'b1', 0.032)
    state1 = next(str(tmp_path / 'b1' / f) for f in os.listdir(tmp_path / 'b1') if f.startswith('training-state'))
    run(tmp_path / 'b2', 0.064, resume_state_dump=state1)
    resumed = torch.load(next(str(tmp_path / 'b2' / f) for f in os.listdir(tmp_path / 'b2') if f.startswith('training-state')),
                         weights_only=True)
    assert resumed['cur_nimg'] == straight['cur_nimg'] == 64
    assert all(torch.equal(resumed['net'][k], v) for k, v in straight['net'].items())
    for a, b in zip(resumed['ema']['emas'], straight['ema']['emas']):
        assert all(torch.equal(a[k], v) for k, v in b.items())
