"""fid.py sweep (FID against NFE for several samplers), the NFE <-> steps mapping, and the PIL plot helper,
with a real tiny network and the stand-in detector of test_fid.py (never the Inception download)."""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from training import sampling
from torch_utils import plot

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_fid import detector_file, direct_features, direct_fid, direct_stats, folders  # noqa: E402,F401
from test_generate import make_tiny_net  # noqa: E402
from test_samplers import GaussianDenoiser  # noqa: E402


@pytest.mark.parametrize('name,kwargs,nfe', [
    ('edm', {}, lambda n: 2 * n - 1), ('ablation', dict(solver='heun'), lambda n: 2 * n - 1),
    ('ablation', dict(solver='euler'), lambda n: n), ('dpm_2', {}, lambda n: 2 * n - 1),
    ('dpmpp_2s_ancestral', {}, lambda n: 2 * n - 1), ('euler_ancestral', {}, lambda n: n), ('lms', {}, lambda n: n),
    ('dpmpp_2m', {}, lambda n: n), ('dpmpp_2m_sde', {}, lambda n: n), ('dpmpp_3m_sde', {}, lambda n: n),
    ('unipc', dict(order=3), lambda n: n)])
def test_count_nfe_and_steps_for_nfe(name, kwargs, nfe):
    mu = torch.zeros([1, 3, 4, 4], dtype=torch.float64)
    for n in (1, 2, 7):
        net = GaussianDenoiser(mu, 0.5)  # the real count, on a real denoiser
        sampling.SAMPLERS[name](net, torch.randn([1, 3, 4, 4], dtype=torch.float64), num_steps=n, **kwargs)
        assert sampling.count_nfe(name, n, **kwargs) == net.nfe == nfe(n)
    for budget in (5, 6, 35):
        n = sampling.steps_for_nfe(name, budget, **kwargs)
        assert nfe(n) <= budget < nfe(n + 1)
    with pytest.raises(ValueError):
        sampling.steps_for_nfe(name, 0, **kwargs)


def test_parse_sampler_spec():
    assert fid.parse_sampler_spec('euler') == ('euler', 'ablation', {'solver': 'euler'})
    assert fid.parse_sampler_spec('heun') == ('heun', 'edm', {})
    assert fid.parse_sampler_spec('dpmpp_2m_sde:eta=0.5:solver_type=heun') == \
        ('dpmpp_2m_sde:eta=0.5:solver_type=heun', 'dpmpp_2m_sde', dict(eta=0.5, solver_type='heun'))
    assert fid.parse_sampler_spec('lms:order=3')[2] == dict(order=3)
    for bad in ('nope', 'lms:order', 'dpmpp_2m:eta=1', 'lms:order=x', 'edm:S_churn=a'):
        with pytest.raises(ValueError):
            fid.parse_sampler_spec(bad)


def _tiny_pkl(tmp_path):
    from torch_utils import persistence
    path = tmp_path / 'net.pkl'
    persistence.save_network_pkl({'ema': make_tiny_net()}, path)
    return path


def test_sweep_scores_every_point_and_writes_table_and_plot(tmp_path, detector_file, folders, monkeypatch):  # noqa: F811
    ref = tmp_path / 'ref.npz'
    CliRunner().invoke(fid.main, ['ref', '--data', str(folders.a), '--dest', str(ref), '--workers', '0',
                                  '--detector', str(detector_file)], catch_exceptions=False)
    pkl, out = _tiny_pkl(tmp_path), tmp_path / 'sweep'
    args = ['sweep', '--network', str(pkl), '--ref', str(ref), '--samplers', 'edm,euler,dpmpp_2m_sde:eta=0.5',
            '--nfe', '3,4,5', '--seeds', '0-9', '--batch', '4', '--outdir', str(out), '--detector', str(detector_file)]
    res = CliRunner().invoke(fid.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    table = json.loads((out / 'sweep.json').read_text())
    rows = table['rows']
    # Heun fits NFE 3 and 4 with 2 steps (3 NFE; listed once) and NFE 5 with 3; the others take N = NFE.
    assert [(r['sampler'], r['nfe'], r['num_steps']) for r in rows] == [
        ('edm', 3, 2), ('edm', 5, 3), ('euler', 3, 3), ('euler', 4, 4), ('euler', 5, 5),
        ('dpmpp_2m_sde:eta=0.5', 3, 3), ('dpmpp_2m_sde:eta=0.5', 4, 4), ('dpmpp_2m_sde:eta=0.5', 5, 5)]
    assert table['config']['num_images'] == 10 and all(r['num_images'] == 10 for r in rows)
    with open(out / 'sweep.csv') as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r['sampler'], int(r['nfe'])) for r in csv_rows] == [(r['sampler'], r['nfe']) for r in rows]
    assert [float(r['fid']) for r in csv_rows] == pytest.approx([r['fid'] for r in rows], rel=1e-4)
    assert PIL.Image.open(out / 'sweep.png').size == (900, 600)

    # Each FID is the FID of exactly those images: recompute one point by hand.
    net = make_tiny_net()
    images = np.concatenate([im.numpy() for _, im in sampling.generate_images(
        net, range(10), max_batch_size=4, sampler='dpmpp_2m_sde', num_steps=4, eta=0.5)])
    expected = direct_fid(*direct_stats(direct_features(images)), *direct_stats(direct_features(folders.a_images)))
    assert rows[6]['fid'] == pytest.approx(expected, rel=1e-4)
    assert len({round(r['fid'], 6) for r in rows}) == len(rows)  # samplers and NFEs differ: the table means something

    # Run again: the finished points are reused (nothing generated); a new NFE adds only its points.
    calls = []
    import metrics.features
    real = metrics.features.generate_images
    monkeypatch.setattr(metrics.features, 'generate_images', lambda *a, **k: calls.append(k) or real(*a, **k))
    res = CliRunner().invoke(fid.main, args, catch_exceptions=False)
    assert res.exit_code == 0 and calls == [] and 'from the previous run' in res.output
    res = CliRunner().invoke(fid.main, [a if a != '3,4,5' else '3,4,5,6' for a in args], catch_exceptions=False)
    assert res.exit_code == 0 and len(calls) == 2  # euler and dpmpp_2m_sde at 6; Heun 6 -> 3 steps, done
    assert len(json.loads((out / 'sweep.json').read_text())['rows']) == len(rows) + 2
    # A run over fewer points keeps the table's other points (ordered by sampler, then NFE).
    res = CliRunner().invoke(fid.main, [a if a != '3,4,5' else '5' for a in args], catch_exceptions=False)
    assert res.exit_code == 0 and len(calls) == 2
    kept = json.loads((out / 'sweep.json').read_text())['rows']
    assert len(kept) == len(rows) + 2 and [r['sampler'] for r in kept][:3] == ['edm'] * 2 + ['euler']
    assert [r['nfe'] for r in kept if r['sampler'] == 'euler'] == [3, 4, 5, 6]


@pytest.mark.parametrize('extra,needle', [
    (['--samplers', 'edm,nope'], "unknown sampler 'nope'"),
    (['--samplers', 'dpmpp_2m:eta=1'], "is not option=value for an option of sampler 'dpmpp_2m'"),
    (['--nfe', 'x'], '--nfe'),
    (['--nfe', '0'], '--nfe'),
    (['--guidance', '2'], 'need a guide'),
])
def test_sweep_errors_are_one_line(tmp_path, extra, needle):
    res = CliRunner().invoke(fid.main, ['sweep', '--network', 'x.pkl', '--ref', 'x.npz', '--outdir',
                                        str(tmp_path / 'o')] + extra)
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not (tmp_path / 'o').exists()


def test_line_plot_draws_every_series(tmp_path):
    path = tmp_path / 'p.png'
    image = plot.line_plot({'a': ([5, 9, 17], [100.0, 30.0, 12.0]), 'b': ([5, 9], [60.0, float('nan')])},
                           str(path), title='t', xlabel='NFE', ylabel='FID', log_y=True)
    assert PIL.Image.open(path).size == image.size == (900, 600)
    pixels = np.asarray(image)
    for color in plot.COLORS[:2]:  # both series' colours appear
        rgb = np.array(color)
        assert (np.abs(pixels.astype(int) - rgb).sum(-1) == 0).sum() > 20, color
    assert plot.nice_ticks(0, 35) == [0, 10, 20, 30, 40]
    assert plot.log_ticks(10, 200) == [10, 20, 50, 100, 200]
