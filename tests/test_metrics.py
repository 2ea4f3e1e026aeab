"""The metrics package end to end with the stand-in TorchScript detector (helpers.StandInDetector): the FID of fid.py
calc is the float64 sum path to the bit, reference features and their one-line error, fid.py compare, the
DINOv2 detector's error without weights, and train.py --metrics on a tiny run."""

import json

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import fid
import metrics
from training import sampling
from helpers import StandInDetector, invoke, make_images, write_folder


def run(args, ok=True):
    return invoke(fid.main, args, ok)


def old_path_stats(images: np.ndarray, batch: int):
    """The statistics as fid.py computed them before the metrics package, written out: float64 sums of f and
    f f^T per batch of the stand-in's features, then (sum ff^T - n mu mu^T) / (n - 1)."""
    det = StandInDetector()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    s1, s2 = torch.zeros([8], dtype=torch.float64), torch.zeros([8, 8], dtype=torch.float64)
    for i in range(0, len(x), batch):
        with torch.no_grad():
            f = det(x[i:i + batch], return_features=True).to(torch.float64)
        s1 += f.sum(0)
        s2 += f.T @ f
    n = len(x)
    mu = s1 / n
    return mu.numpy(), ((s2 - torch.outer(mu, mu) * n) / (n - 1)).numpy()


def test_calc_fid_is_the_old_computation_to_the_bit(folders, detector_file, tmp_path):
    ref = tmp_path / 'ref.npz'
    run(['ref', '--data', folders.a, '--dest', ref, '--workers', 0, '--batch', 64, '--detector', detector_file])
    saved = np.load(ref)
    mu_a, sigma_a = old_path_stats(folders.a_images, 40)
    assert np.array_equal(saved['mu'], mu_a) and np.array_equal(saved['sigma'], sigma_a)
    for batch in (7, 64):  # the batch sizes change the summation, and with it the last bits; both must match
        mu_b, sigma_b = old_path_stats(folders.b_images, batch)
        root = scipy.linalg.sqrtm(sigma_b @ sigma_a)
        root = np.real(root[0] if isinstance(root, tuple) else root)
        expected = float(np.square(mu_b - mu_a).sum() + np.trace(sigma_b + sigma_a - root * 2))
        source = metrics.ImageSource(str(folders.b), 40, 0, batch, 0)
        got = metrics.score('fid', source, str(ref), metrics.load_detector(str(detector_file)))
        assert got['fid'] == expected  # bit for bit
        res = run(['calc', '--images', folders.b, '--ref', ref, '--num', 40, '--batch', batch, '--workers', 0,
                   '--detector', detector_file])
        assert res.stdout.strip().splitlines()[-1] == f'{expected:g}'


def test_reference_features_kid_pr_and_the_missing_features_error(folders, detector_file, tmp_path):
    plain, full = tmp_path / 'plain.npz', tmp_path / 'full.npz'
    run(['ref', '--data', folders.a, '--dest', plain, '--workers', 0, '--detector', detector_file])
    res = run(['calc', '--images', folders.b, '--ref', plain, '--num', 40, '--workers', 0, '--metrics', 'fid,kid',
               '--detector', detector_file], ok=False)
    errors = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert res.exit_code == 1 and len(errors) == 1 and 'kid needs the reference features' in errors[0]
    assert '--features' in errors[0]
    run(['ref', '--data', folders.a, '--dest', full, '--workers', 0, '--features', '--detector', detector_file])
    stored = np.load(full)
    assert stored['features'].shape == (40, 8) and stored['features'].dtype == np.float32
    np.testing.assert_array_equal(stored['mu'], np.load(plain)['mu'])  # the paper's keys are unchanged
    res = run(['calc', '--images', folders.b, '--ref', full, '--num', 40, '--workers', 0, '--metrics', 'fid_ci,kid,pr',
               '--bootstrap', 20, '--detector', detector_file])
    assert 'KID' in res.stdout and 'precision' in res.stdout and '[' in res.stdout
    # The same images against themselves: precision and recall 1.
    same = metrics.score('pr', metrics.ImageSource(str(folders.a), num_workers=0), str(full),
                         metrics.load_detector(str(detector_file)))
    assert same['precision'] == same['recall'] == 1.0


def test_dinov2_without_weights_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    for spec in ('dinov2', f'dinov2:{tmp_path / "missing.pt"}'):
        with pytest.raises(metrics.MetricsError, match='FD_DINOv2 needs DINOv2 ViT-L/14 weights') as e:
            metrics.load_detector(spec)
        assert '\n' not in str(e.value)
    with pytest.raises(metrics.MetricsError, match='--detector=dinov2'):
        metrics.check('fd_dinov2', None, None)


def test_dinov2_detector_from_a_user_file(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))
    path = tmp_path / 'dinov2.pt'
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    det = metrics.load_detector(f'dinov2:{path}')
    feats = det(torch.from_numpy(make_images(0, 3)).permute(0, 3, 1, 2))
    assert det.name == 'dinov2' and feats.shape == (3, 3)


def _tiny_net():
    from training import networks
    torch.manual_seed(0)
    return networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8,
                               channel_mult=[1], num_blocks=1, attn_resolutions=[])


def test_compare_two_sampler_settings(folders, detector_file, tmp_path):
    from torch_utils import persistence
    pkl = tmp_path / 'net.pkl'
    persistence.save_network_pkl(dict(ema=_tiny_net()), pkl)
    ref = tmp_path / 'ref.npz'
    run(['ref', '--data', folders.a, '--dest', ref, '--workers', 0, '--features', '--detector', detector_file])
    out = tmp_path / 'cmp.json'
    res = run(['compare', '--network', pkl, '--steps', 2, '--b', 'num_steps=6', '--ref', ref, '--seeds', '0-23',
               '--batch', 12, '--metrics', 'fid,kid', '--bootstrap', 30, '--out', out, '--detector', detector_file])
    table = json.loads(out.read_text())['table']
    assert table['num_images'] == 24 and set(table) == {'fid', 'kid', 'num_images'}
    for key in ('fid', 'kid'):
        row = table[key]
        assert row['diff'] == pytest.approx(row['a'] - row['b']) and row['lo'] < row['hi']
        assert row['significant'] == (not row['lo'] <= 0 <= row['hi'])
    # A's FID is the number fid.py net gives on the same seeds.
    net = run(['net', '--network', pkl, '--ref', ref, '--seeds', '0-23', '--repeats', 1, '--steps', 2, '--batch', 12,
               '--detector', detector_file])
    assert table['fid']['a'] == pytest.approx(float(net.stdout.strip().splitlines()[-1]), rel=1e-5)
    assert 'significant' in res.stdout
    same = run(['compare', '--network', pkl, '--ref', ref, '--detector', detector_file], ok=False)
    assert same.exit_code == 2 and 'both sides are the same' in same.output


def test_override_sampler_kwargs():
    a = dict(sampler='edm', num_steps=18, S_churn=0.0, gnet='g.pkl', guidance=2.0)
    assert sampling.override_sampler_kwargs(a, 'guidance=1') == dict(sampler='edm', num_steps=18, S_churn=0.0, gnet='g.pkl', guidance=1.0)
    b = sampling.override_sampler_kwargs(dict(sampler='edm', num_steps=18), 'sampler=dpmpp_2m:num_steps=9')
    assert b == dict(sampler='dpmpp_2m', num_steps=9)
    with pytest.raises(TypeError):
        sampling.override_sampler_kwargs(dict(sampler='edm', num_steps=18), 'eta=3')


@pytest.mark.slow
def test_train_metrics_writes_jsonl_and_curve(tiny_zip, tmp_path, one_thread, detector_file):
    import train
    ref = tmp_path / 'ref.npz'
    run(['ref', '--data', tiny_zip, '--dest', ref, '--workers', 0, '--features', '--detector', detector_file])
    out = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, [
        '--outdir', str(out), '--data', tiny_zip, '--cbase', '8', '--cres', '1', '--batch', '16', '--duration',
        '0.000032', '--tick', '1', '--snap', '1', '--workers', '0', '--seed', '1', '--nosubdir',
        '--metrics', 'fid_ci,kid', '--metrics-ref', str(ref), '--metrics-num', '12',
        '--metrics-detector', str(detector_file)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(records) == 2 and records[-1]['num_images'] == 12  # tick 0 and the final tick
    assert {'fid', 'fid_lo', 'fid_hi', 'kid', 'kid_std'} <= set(records[-1]['results'])
    stats = [json.loads(line) for line in (out / 'stats.jsonl').read_text().splitlines()]
    assert stats[-1]['Metrics/fid']['mean'] == records[-1]['results']['fid']
    assert 'Metrics/kid' in stats[-1] and stats[-1]['Timing/metrics_sec']['mean'] > 0
    assert PIL.Image.open(out / 'metric-fid.png').size == (900, 600) and (out / 'metric-kid.png').is_file()
    log = (out / 'log.txt').read_text()
    assert 'Metrics at' in log and ' metrics ' in log  # the values, and the scoring time on the tick line
    # Without a reference: a one-line usage error before anything runs.
    bad = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'x'), '--data', tiny_zip, '--metrics', 'fid'])
    assert bad.exit_code == 2 and '--metrics-ref' in bad.output


@pytest.mark.slow
def test_features_from_two_ranks_match_one(detector_file, tmp_path, subprocess_env, repo_root):
    import subprocess
    import sys
    data = write_folder(tmp_path / 'd', make_images(7, 37))  # odd count: ranks get unequal shares
    args = ['ref', f'--data={data}', '--batch=4', '--workers=0', '--features', f'--detector={detector_file}']
    one, two = tmp_path / 'one.npz', tmp_path / 'two.npz'
    subprocess.run([sys.executable, 'fid.py', *args, f'--dest={one}'], cwd=repo_root, env=subprocess_env,
                   check=True, timeout=120, capture_output=True)
    subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', 'fid.py', *args, f'--dest={two}'],
                   cwd=repo_root, env=subprocess_env, check=True, timeout=120, capture_output=True)
    a, b = np.load(one), np.load(two)
    np.testing.assert_array_equal(a['features'], b['features'])  # gathered in dataset order
    assert a['features'].shape == (37, 8)
