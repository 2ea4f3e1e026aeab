"""training/iddpm.py against ../shared/golden/iddpm_*.pt (openai/improved-diffusion, float64 policy of the
golden README: our float64 implementation vs the primary keys within 1e-10 relative, whole tensors)."""

import math

import numpy as np
import pytest
import torch

from training import iddpm

TOL = 1e-10


def rel(out, ref) -> float:
    out, ref = torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((out - ref).norm() / ref.norm())


def load(golden_dir, name):
    return torch.load(golden_dir / f'iddpm_{name}.pt', weights_only=False)


def formula_model(T0):
    """The golden README's closed-form 'network' (eps and v channels) of the original timestep t."""
    def model(x, t):
        t = t.to(torch.float64).reshape(-1, 1, 1, 1)
        return torch.cat([0.7 * torch.tanh(x) + 0.1 * torch.cos(math.pi * t / T0), 0.5 * torch.sin(x) - 0.2 + 0.2 * t / T0], dim=1)
    return model


def replay(noises):
    """randn_like serving the recorded draws in call order."""
    it = iter(noises)
    return lambda like: next(it).to(like)

#----------------------------------------------------------------------------

def test_beta_schedules(golden_dir):
    g = load(golden_dir, 'schedule')
    for name, T in (('cosine', 1000), ('linear', 1000), ('linear', 4000)):
        assert rel(iddpm.named_beta_schedule(name, T), g[f'betas_{name}_{T}']) <= TOL
    assert rel(iddpm.make_diffusion('cosine', 1000).alphas_cumprod, g['alphas_cumprod_cosine_1000']) <= TOL
    assert iddpm.named_beta_schedule('cosine', 1000).max() == 0.999  # the clip is active at t = T-1


@pytest.mark.parametrize('key', ['ddim50', '10_15', '25', 'str_10_15', 'ddim25', '3_7_2'])
def test_respacing(golden_dir, key):
    g = load(golden_dir, 'schedule')
    steps = iddpm.space_timesteps(1000, g[f'space_{key}_arg'])
    assert steps == list(g[f'space_{key}'])
    for name in ('cosine', 'linear'):
        betas, timestep_map = iddpm.respaced_betas(iddpm.named_beta_schedule(name, 1000), steps)
        assert rel(betas, g[f'respaced_betas_{name}_{key}']) <= TOL
        assert list(timestep_map) == steps


def test_respacing_rejects_impossible_requests():
    with pytest.raises(ValueError, match='strided'):
        iddpm.space_timesteps(1000, 'ddim37')
    with pytest.raises(ValueError, match='section'):
        iddpm.space_timesteps(10, [6, 6])


@pytest.mark.parametrize('name', ['hybrid_loss_cosine', 'hybrid_loss_linear4000'])
def test_hybrid_loss_and_its_gradient(golden_dir, name):
    g = load(golden_dir, name)
    d = iddpm.make_diffusion(g['schedule'], g['T'])
    model_output = g['model_output'].detach().clone().requires_grad_(True)
    terms = iddpm.hybrid_loss_terms(d, model_output, g['x_start'], g['t'], g['noise'])
    terms['loss'].sum().backward()
    for key in ('x_t', 'mse', 'vb', 'loss'):
        assert rel(terms[key].detach(), g[key]) <= TOL, key
    assert rel(model_output.grad, g['grad']) <= TOL
    # The stop-gradient: the eps channels get exactly 2 (eps - noise) / (C H W), nothing from vb.
    C = g['x_start'].shape[1]
    expected = 2 * (g['model_output'][:, :C] - g['noise']) / g['noise'][0].numel()
    assert rel(model_output.grad[:, :C], expected) <= 1e-14


def test_p_mean_variance(golden_dir):
    g = load(golden_dir, 'p_mean_variance')
    d = iddpm.make_diffusion('cosine', g['T'])
    model_output = formula_model(g['T0'])(g['x'], g['t'])
    assert rel(model_output, g['model_output']) <= 1e-15
    out = iddpm.p_mean_variance(d, model_output, g['x'], g['t'], clip_denoised=g['clip_denoised'])
    for key in ('mean', 'variance', 'log_variance', 'pred_xstart'):
        assert rel(out[key], g[key]) <= TOL, key


@pytest.mark.parametrize('case', ['p_ddim50', 'p_25', 'ddim50_eta0', 'ddim50_eta1'])
def test_respaced_sampling(golden_dir, case):
    g = load(golden_dir, 'sample_respaced')
    c = g['cases'][case]
    d = iddpm.make_diffusion('cosine', g['T'], spacing=c['spacing'])
    assert list(d.timestep_map) == list(c['use_timesteps'])
    assert rel(d.betas, c['respaced_betas']) <= TOL
    seen = []
    model = formula_model(g['T0'])
    def model_fn(x, t):
        seen.append(int(t[0]))
        return model(x, t)
    eta = None if c['loop'] == 'p_sample_loop' else c['eta']
    sample = iddpm.sample_loop(model_fn, d, c['x_T'], replay(c['noises']), eta=eta, clip_denoised=g['clip_denoised'])
    assert seen == [int(t) for t in c['model_timesteps']]
    assert rel(sample, c['sample']) <= TOL


def test_calc_bpd_loop(golden_dir):
    g = load(golden_dir, 'bpd')
    d = iddpm.Diffusion(g['betas'].numpy())
    assert rel(d.betas, iddpm.named_beta_schedule('cosine', g['T'])) <= TOL
    out = iddpm.calc_bpd_loop(formula_model(g['T0']), d, g['x_start'], replay(g['noises']), clip_denoised=g['clip_denoised'])
    for key in ('total_bpd', 'prior_bpd', 'vb', 'xstart_mse', 'mse'):
        assert rel(out[key], g[key]) <= TOL, key

#----------------------------------------------------------------------------
# Properties the goldens do not cover.

def test_importance_sampler_weights_are_unbiased():
    sampler = iddpm.LossSecondMomentSampler(T=5, history=2)
    assert np.allclose(sampler.probabilities(), 0.2)  # uniform until warmed up
    for _ in range(2):
        sampler.update(torch.arange(5), torch.tensor([1.0, 2, 3, 4, 5]))
    p = sampler.probabilities()
    assert p[4] > p[0] and abs(p.sum() - 1) < 1e-12
    # E_p[w L_t] = mean_t L_t for the weights 1/(T p_t).
    L = np.arange(1.0, 6.0)
    assert abs((p * L / (5 * p)).sum() - L.mean()) < 1e-12
    t, w = sampler.sample(3, 'cpu')
    assert torch.allclose(w, 1 / (5 * torch.from_numpy(p)[t]))
