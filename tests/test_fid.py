"""Tests for fid.py: the Fréchet distance against golden values, and ref/calc/net end to end with a small
TorchScript stand-in detector (helpers.StandInDetector, never the real Inception download); the sweep, nll
and probe subcommands."""

import csv
import functools
import io
import json
import os
import pickle
import subprocess
import time
import sys

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from PIL import Image

import fid
from helpers import (FEATURE_DIM, StandInDetector, direct_features, direct_fid, direct_stats, invoke, make_dataset_zip,
                     make_images, make_tiny_net, write_dataset_zip, write_folder)
from training import likelihood, networks_edm2small, sampling
from training.dataset import dataset_fingerprint

#----------------------------------------------------------------------------
# Helpers (the stand-in detector, image folders and direct numpy statistics are in helpers.py, their
# fixtures detector_file and folders in conftest.py).


class NotADetector(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


class PickledDetector(StandInDetector):
    """A plain (non-TorchScript) module: only loadable from a pickle with --trust-pickle."""


def run_cli(args, expect_ok=True):
    return invoke(fid.main, args, expect_ok)


def last_number(result) -> float:
    return float(result.stdout.strip().splitlines()[-1])

#----------------------------------------------------------------------------
# The Fréchet distance itself.


def test_fid_math_matches_golden(golden_dir):
    cases = json.loads((golden_dir / 'fid_math.json').read_text())
    assert cases
    for case in cases:
        got = fid.calculate_fid_from_inception_stats(case['mu1'], case['sigma1'], case['mu2'], case['sigma2'])
        assert isinstance(got, float)
        assert abs(got - case['fid']) <= 1e-6 * abs(case['fid']), (got, case['fid'])
        # The independent eigenvalue route agrees too (guards against a lucky formula typo).
        args = [np.asarray(case[k], np.float64) for k in ('mu1', 'sigma1', 'mu2', 'sigma2')]
        assert direct_fid(*args) == pytest.approx(case['fid'], rel=1e-6)


def test_fid_math_properties_and_old_scipy_signature(monkeypatch):
    rnd = np.random.RandomState(1)
    a = rnd.randn(50, 6)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(fid.calculate_fid_from_inception_stats(mu, sigma, mu, sigma)) < 1e-9
    # A pure mean shift adds exactly ||d||^2.
    assert fid.calculate_fid_from_inception_stats(mu + 0.5, sigma, mu, sigma) == pytest.approx(6 * 0.25, rel=1e-9)
    b = rnd.randn(50, 6) * 1.5 + 0.2
    expected = direct_fid(mu, sigma, b.mean(0), np.cov(b, rowvar=False))
    assert fid.calculate_fid_from_inception_stats(mu, sigma, b.mean(0), np.cov(b, rowvar=False)) == \
        pytest.approx(expected, rel=1e-9)
    # Older SciPy returned (root, errest) from sqrtm(..., disp=False): the result must not change.
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, 'sqrtm', lambda x: (real_sqrtm(x) + 0j, 0.0))
    assert fid.calculate_fid_from_inception_stats(mu, sigma, b.mean(0), np.cov(b, rowvar=False)) == \
        pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match='Mismatched'):
        fid.calculate_fid_from_inception_stats(mu, sigma, mu[:3], sigma[:3, :3])

#----------------------------------------------------------------------------
# ref and calc with the stand-in detector.


def test_ref_then_calc_same_images_gives_zero(folders, detector_file, tmp_path):
    dest = tmp_path / 'out' / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', dest, '--batch', 16, '--workers', 0, '--detector', detector_file])
    ref = np.load(dest, allow_pickle=False)
    assert {'mu', 'sigma', 'num_images', 'dataset_sha256'} <= set(ref.files)
    assert ref['mu'].dtype == np.float64 and ref['mu'].shape == (FEATURE_DIM,)
    assert ref['sigma'].shape == (FEATURE_DIM, FEATURE_DIM) and int(ref['num_images']) == 40
    assert str(ref['dataset_sha256']) == dataset_fingerprint(str(folders.a))['sha256'] and len(str(ref['dataset_sha256'])) == 64
    mu, sigma = direct_stats(direct_features(folders.a_images))
    np.testing.assert_allclose(ref['mu'], mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref['sigma'], sigma, rtol=1e-6, atol=1e-9)
    assert not [p for p in dest.parent.iterdir() if p.name.startswith('.tmp')]  # Atomic write left no debris.

    res = run_cli(['calc', '--images', folders.a, '--ref', dest, '--num', 40, '--batch', 7, '--workers', 0,
                   '--detector', detector_file])
    assert abs(last_number(res)) < 1e-6
    assert 'FID of 40 images' in res.stdout


@pytest.mark.slow  # two DataLoader worker processes: 1-4 s (test_metrics.py checks calc's FID to the bit)
def test_calc_shifted_images_matches_numpy(folders, detector_file, tmp_path):
    dest = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', dest, '--workers', 0, '--detector', detector_file])
    res = run_cli(['calc', '--images', folders.b, '--ref', dest, '--num', 40, '--workers', 2, '--batch', 16,
                   '--detector', detector_file])
    expected = direct_fid(*direct_stats(direct_features(folders.b_images)),
                          *direct_stats(direct_features(folders.a_images)))
    assert expected > 0.1  # The shift is visible to the detector, so the test can fail.
    assert last_number(res) == pytest.approx(expected, rel=1e-4)  # Printed with %g: 6 significant digits.
    # The importable function gives the full-precision value.
    mu, sigma = fid.calculate_inception_stats(str(folders.b), num_expected=40, max_batch_size=9, num_workers=0,
                                              device='cpu', detector=str(detector_file))
    ref = np.load(dest)
    assert fid.calculate_fid_from_inception_stats(mu, sigma, ref['mu'], ref['sigma']) == \
        pytest.approx(expected, rel=1e-6)


def test_calc_num_and_seed_pick_the_papers_subset(folders, detector_file, tmp_path):
    dest = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', dest, '--workers', 0, '--detector', detector_file])
    res = run_cli(['calc', '--images', folders.b, '--ref', dest, '--num', 25, '--seed', 3, '--workers', 0,
                   '--detector', detector_file])
    assert 'FID of 25 images' in res.stdout
    # The paper's selection: shuffle all indices with RandomState(seed), keep the first num, in sorted order.
    idx = np.arange(40)
    np.random.RandomState(3).shuffle(idx)
    subset = folders.b_images[np.sort(idx[:25])]
    expected = direct_fid(*direct_stats(direct_features(subset)), *direct_stats(direct_features(folders.a_images)))
    assert last_number(res) == pytest.approx(expected, rel=1e-4)
    other = run_cli(['calc', '--images', folders.b, '--ref', dest, '--num', 25, '--seed', 4, '--workers', 0,
                     '--detector', detector_file])
    assert last_number(other) != last_number(res)


def test_grayscale_is_repeated_to_rgb(detector_file, tmp_path):
    gray = make_images(5, 12, mode='L')
    write_folder(tmp_path / 'gray', gray)
    write_folder(tmp_path / 'rgb', gray.repeat(3, axis=-1))
    stats = [fid.calculate_inception_stats(str(tmp_path / name), num_workers=0, device='cpu',
                                           detector=str(detector_file)) for name in ('gray', 'rgb')]
    np.testing.assert_array_equal(stats[0][0], stats[1][0])
    np.testing.assert_array_equal(stats[0][1], stats[1][1])


def test_calc_errors(folders, detector_file, tmp_path):
    dest = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', dest, '--workers', 0, '--detector', detector_file])
    common = ['--workers', 0, '--detector', detector_file]

    res = run_cli(['calc', '--images', folders.a, '--ref', dest, '--num', 41, *common], expect_ok=False)
    assert res.exit_code == 1 and 'Found 40 images' in res.output and '--num' in res.output
    assert 'Traceback' not in res.output

    res = run_cli(['calc', '--images', tmp_path / 'nope', '--ref', dest, *common], expect_ok=False)
    assert res.exit_code == 1 and 'No such image folder' in res.output

    bad_ref = tmp_path / 'bad.npz'
    np.savez(bad_ref, mu=np.zeros(FEATURE_DIM))
    res = run_cli(['calc', '--images', folders.a, '--ref', bad_ref, '--num', 40, *common], expect_ok=False)
    assert res.exit_code == 1 and '"sigma"' in res.output

    wrong_dim = tmp_path / 'wrongdim.npz'
    np.savez(wrong_dim, mu=np.zeros(2048), sigma=np.eye(2048))
    res = run_cli(['calc', '--images', folders.a, '--ref', wrong_dim, '--num', 40, *common], expect_ok=False)
    assert res.exit_code == 1 and 'another detector' in res.output

    res = run_cli(['calc', '--images', folders.a, '--ref', tmp_path / 'missing.npz', *common], expect_ok=False)
    assert res.exit_code == 1 and 'reference statistics' in res.output

    res = run_cli(['calc', '--images', folders.a, '--ref', dest, '--num', 40, '--workers', 0,
                   '--detector', tmp_path / 'no-detector.pt'], expect_ok=False)
    assert res.exit_code == 1 and '--detector=PATH' in res.output

    mixed = write_folder(tmp_path / 'mixed', make_images(2, 3))
    Image.fromarray(make_images(3, 1, size=8)[0]).save(mixed / 'small.png')
    res = run_cli(['calc', '--images', mixed, '--ref', dest, '--num', 4, *common], expect_ok=False)
    assert res.exit_code == 1 and 'Could not read images' in res.output and '[3, 8, 8]' in res.output

    one = write_folder(tmp_path / 'one', make_images(1, 1))
    res = run_cli(['ref', '--data', one, '--dest', tmp_path / 'x.npz', *common], expect_ok=False)
    assert res.exit_code == 1 and 'at least 2' in res.output


def test_fid_ref_that_is_not_an_npz(tmp_path):
    ref = tmp_path / 'ref.txt'
    ref.write_text('mu 1 2 3\n')
    result = CliRunner().invoke(fid.main, ['calc', '--images', str(tmp_path), '--ref', str(ref)])
    assert result.exit_code == 1
    assert f'Error: {ref} is not a .npz file of reference statistics' in result.output
    assert 'pickled' not in result.output


def test_unusable_image_shapes_are_rejected():
    det = StandInDetector()
    for shape in ([4, 2, 3, 16, 16], [4, 4, 16, 16], [4, 3, 1, 16]):
        batch = torch.zeros(shape, dtype=torch.uint8)
        with pytest.raises(fid.click.ClickException, match='channels'):
            fid.compute_feature_stats(det, [batch], 4)
    fid.check_image_shape([1, 8, 8], 'x')  # Grayscale is fine.

#----------------------------------------------------------------------------
# Detector loading: TorchScript, pickles (safe extraction / trust), URLs through the download cache.


def _features(det) -> torch.Tensor:
    x = torch.from_numpy(make_images(9, 3)).permute(0, 3, 1, 2)
    return det(x, return_features=True)


def test_detector_torchscript_and_pickles(detector_file, tmp_path):
    expected = _features(StandInDetector())
    assert torch.equal(_features(fid.load_detector(str(detector_file), verbose=False)), expected)

    # A pickle that would run code (here: create a folder) is refused, and its code never runs.
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pkl'

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(fid.click.ClickException, match='--trust-pickle'):
        fid.load_detector(str(evil), verbose=False)
    assert not marker.exists()

    # A plain pickled module needs --trust-pickle; then it loads like the paper's pickle.load.
    plain = tmp_path / 'plain.pkl'
    plain.write_bytes(pickle.dumps(PickledDetector()))
    with pytest.raises(fid.click.ClickException, match='--trust-pickle'):
        fid.load_detector(str(plain), verbose=False)
    assert torch.equal(_features(fid.load_detector(str(plain), trust_pickle=True, verbose=False)), expected)

    # A zip that is not TorchScript, and garbage, give one-line errors.
    notts = tmp_path / 'state.pt'
    torch.save({'w': torch.zeros(3)}, notts)
    with pytest.raises(fid.click.ClickException, match='not a TorchScript'):
        fid.load_detector(str(notts), verbose=False)
    junk = tmp_path / 'junk.bin'
    junk.write_bytes(b'not a detector')
    with pytest.raises(fid.click.ClickException, match='neither'):
        fid.load_detector(str(junk), verbose=False)


def _persistent_pickle(meta: dict) -> bytes:
    """Bytes in the layout of a persistence-wrapped object: _reconstruct_persistent_obj(meta)."""
    body = pickle.dumps(meta, protocol=2)[2:-1]  # Strip PROTO header and STOP.
    return b'\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n' + body + b'\x85R.'


def test_persistent_pickle_with_embedded_torchscript_loads_without_running_its_code(detector_file, tmp_path):
    marker = tmp_path / 'ran'
    src = f'import os\nos.mkdir({str(marker)!r})\nclass Wrapper: pass\n'
    meta = dict(type='class', version=6, module_src=src, class_name='Wrapper',
                state=dict(training=False, _script_bytes=detector_file.read_bytes()))
    path = tmp_path / 'official-like.pkl'
    path.write_bytes(_persistent_pickle(meta))
    det = fid.load_detector(str(path), verbose=False)
    assert torch.equal(_features(det), _features(StandInDetector()))
    assert not marker.exists()

    # Embedded TorchScript without the detector's interface cannot stand for the wrapper: refused.
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(NotADetector()), buf)
    meta['state'] = dict(_script_bytes=buf.getvalue())
    path.write_bytes(_persistent_pickle(meta))
    with pytest.raises(fid.click.ClickException, match='--trust-pickle'):
        fid.load_detector(str(path), verbose=False)

    # Without embedded TorchScript the object can only be rebuilt by running its source: refused ...
    meta['state'] = dict(weights=b'123')
    path.write_bytes(_persistent_pickle(meta))
    with pytest.raises(fid.click.ClickException, match='--trust-pickle'):
        fid.load_detector(str(path), verbose=False)
    assert not marker.exists()

    # ... unless trusted: then the embedded source runs, as the paper's pickle.load would do.
    meta.update(module_src=src + _WRAPPER_SRC, class_name='MeanWrapper', state=dict(scale=2.0))
    path.write_bytes(_persistent_pickle(meta))
    det = fid.load_detector(str(path), trust_pickle=True, verbose=False)
    assert marker.exists()
    x = torch.from_numpy(make_images(9, 3)).permute(0, 3, 1, 2)
    assert torch.allclose(det(x, return_features=True), x.double().mean(dim=(2, 3)).float() * 2)


_WRAPPER_SRC = '''
import torch
class MeanWrapper(torch.nn.Module):
    def __setstate__(self, state):
        torch.nn.Module.__init__(self)
        self.scale = state['scale']
    def forward(self, x, return_features=False):
        return x.float().mean(dim=(2, 3)) * self.scale
'''


def test_detector_url_goes_through_the_download_cache(http_server, detector_file, folders, tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    monkeypatch.setenv('EDM_CACHE_DIR', str(cache))
    (http_server.root / 'standin.pt').write_bytes(detector_file.read_bytes())
    url = f'{http_server.url}/standin.pt'
    dest = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', dest, '--workers', 0, '--detector', url])
    cached = list((cache / 'downloads').iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == detector_file.read_bytes()

    # Server gone: the cached copy is used, and the result is unchanged.
    http_server.server.shutdown()
    http_server.server.server_close()
    res = run_cli(['calc', '--images', folders.a, '--ref', dest, '--num', 40, '--workers', 0, '--detector', url])
    assert abs(last_number(res)) < 1e-6

    # An uncached URL with no server: the error says where to put the file.
    with pytest.raises(fid.click.ClickException) as e:
        fid.load_detector(f'{http_server.url}/other.pt', verbose=False, num_attempts=1)
    assert str(cache / 'downloads') in str(e.value) and '--detector=PATH' in str(e.value)


def test_default_detector_is_the_papers_url():
    assert fid.DETECTOR_URL == ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/'
                                'files/metrics/inception-2015-12-05.pkl')
    assert fid.DETECTOR_URL in fid.TRUSTED_DETECTOR_URLS

#----------------------------------------------------------------------------
# fid.py net: the paper's three-seed protocol, with generation faked (the sampler is tested elsewhere).


def _fake_images(seed: int) -> np.ndarray:
    return make_images(1000 + seed, 1)[0]


def test_net_repeats_on_disjoint_seed_ranges(folders, detector_file, tmp_path, monkeypatch):
    calls = []

    def generate_images(net, seeds, max_batch_size=64, class_idx=None, device=torch.device('cpu'), **kwargs):
        calls.append(dict(seeds=list(seeds), max_batch_size=max_batch_size, class_idx=class_idx, kwargs=kwargs))
        for i in range(0, len(seeds), max_batch_size):
            batch = list(seeds[i:i + max_batch_size])
            yield batch, torch.from_numpy(np.stack([_fake_images(s) for s in batch]))  # [N,H,W,C] uint8

    import metrics.features
    from torch_utils import cli
    monkeypatch.setattr(metrics.features, 'generate_images', generate_images)
    monkeypatch.setattr(cli, 'load_net', lambda path, device, verbose=True: torch.nn.Identity())

    dest = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', dest, '--workers', 0, '--detector', detector_file])
    res = run_cli(['net', '--network', 'net.pkl', '--ref', dest, '--seeds', '0-19', '--repeats', 3, '--batch', 8,
                   '--steps', 5, '--S_churn', 10, '--detector', detector_file])
    assert [c['seeds'] for c in calls] == [list(range(0, 20)), list(range(20, 40)), list(range(40, 60))]
    # generate.py's sampler options and defaults; no ablation option set, so the EDM sampler is used.
    expected_kwargs = dict(sampler='edm', num_steps=5, rho=7, S_churn=10.0, S_min=0, S_max=float('inf'), S_noise=1,
                           compile=False)
    assert all(c['kwargs'] == expected_kwargs and c['max_batch_size'] == 8 for c in calls)

    ref_stats = direct_stats(direct_features(folders.a_images))
    expected = [direct_fid(*direct_stats(direct_features(np.stack([_fake_images(s) for s in c['seeds']]))),
                           *ref_stats) for c in calls]
    lines = res.stdout.strip().splitlines()
    reported = [float(line.split('FID ')[1].split()[0]) for line in lines if line.startswith('repeat ')]
    assert reported == pytest.approx(expected, rel=1e-4)
    assert last_number(res) == pytest.approx(min(expected), rel=1e-4)
    assert len(set(np.round(expected, 6))) == 3  # Different seeds, different FIDs: the minimum means something.


def test_repeat_seeds_never_overlap():
    assert fid.repeat_seeds([0, 2], 3) == [[0, 2], [3, 5], [6, 8]]
    reps = fid.repeat_seeds(list(range(5, 10)) + [20], 4)
    flat = [s for r in reps for s in r]
    assert len(flat) == len(set(flat))
    from torch_utils import cli
    parse = cli.seeds_callback(min_count=2, example='0-49999')
    assert parse(None, None, '0-3,7') == [0, 1, 2, 3, 7]
    for bad in ('5-1', '3', '1,1'):
        with pytest.raises(fid.click.BadParameter):
            parse(None, None, bad)

#----------------------------------------------------------------------------
# Multi-process: torchrun with 2 ranks gives the statistics of 1 process.


@pytest.mark.slow
def test_torchrun_two_processes_match_one(detector_file, tmp_path, subprocess_env, repo_root):
    data = write_folder(tmp_path / 'd', make_images(7, 37))  # Odd count: ranks get unequal shares.
    args = ['ref', f'--data={data}', '--batch=4', '--workers=1', f'--detector={detector_file}']
    one, two = tmp_path / 'one.npz', tmp_path / 'two.npz'
    subprocess.run([sys.executable, 'fid.py', *args, f'--dest={one}'], cwd=repo_root, env=subprocess_env,
                   check=True, timeout=120)
    subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', 'fid.py', *args, f'--dest={two}'],
                   cwd=repo_root, env=subprocess_env, check=True, timeout=120)
    a, b = np.load(one), np.load(two)
    assert int(a['num_images']) == int(b['num_images']) == 37
    np.testing.assert_allclose(b['mu'], a['mu'], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b['sigma'], a['sigma'], rtol=1e-10, atol=1e-12)
    mu, sigma = direct_stats(direct_features(make_images(7, 37)))
    np.testing.assert_allclose(b['sigma'], sigma, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_net_in_memory_matches_generate_pngs_then_calc(detector_file, folders, tmp_path, subprocess_env, repo_root):
    """`fid.py net` (2 ranks, images never written) == generate.py PNGs + `fid.py calc` (1 rank)."""
    sys.path.insert(0, str(repo_root))
    from torch_utils import persistence
    from training import networks
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    pkl = tmp_path / 'net.pkl'
    persistence.save_network_pkl(dict(ema=net), pkl)
    ref = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', ref, '--workers', 0, '--detector', detector_file])

    run = functools.partial(subprocess.run, cwd=repo_root, env=subprocess_env, check=True, timeout=120,
                            capture_output=True, text=True)
    run([sys.executable, 'generate.py', f'--network={pkl}', f'--outdir={tmp_path / "png"}', '--seeds=30-69',
         '--steps=4', '--batch=16'])
    calc = run([sys.executable, 'fid.py', 'calc', f'--images={tmp_path / "png"}', f'--ref={ref}', '--num=40',
                '--workers=0', f'--detector={detector_file}'])
    net_out = run(['torchrun', '--standalone', '--nproc_per_node=2', 'fid.py', 'net', f'--network={pkl}',
                   f'--ref={ref}', '--seeds=30-69', '--repeats=2', '--steps=4', '--batch=16',
                   f'--detector={detector_file}'])
    lines = net_out.stdout.strip().splitlines()
    reps = [line for line in lines if line.startswith('repeat ')]
    assert len(reps) == 2 and 'seeds 30-69' in reps[0] and 'seeds 70-109' in reps[1]  # Disjoint ranges.
    fids = [float(line.split('FID ')[1].split()[0]) for line in reps]
    assert fids[0] == pytest.approx(float(calc.stdout.strip().splitlines()[-1]), rel=1e-4)
    assert fids[0] != fids[1] and float(lines[-1]) == min(fids)


@pytest.mark.parametrize('num_items,batch,world', [(37, 4, 2), (5, 64, 4), (128, 64, 1), (1000, 7, 3)])
def test_rank_batches_cover_every_image_once(monkeypatch, num_items, batch, world):
    shares = []
    for rank in range(world):
        monkeypatch.setattr(fid.dist, 'get_rank', lambda rank=rank: rank)
        monkeypatch.setattr(fid.dist, 'get_world_size', lambda: world)
        shares.append(fid._rank_batches(num_items, batch))
    flat = sorted(i for share in shares for b in share for i in b)
    assert flat == list(range(num_items))
    assert all(len(b) <= batch for share in shares for b in share)
    sizes = [sum(len(b) for b in share) for share in shares]
    assert max(sizes) - min(sizes) <= max(1, batch)  # Balanced: ranks differ by at most one batch's worth.
    if world > 1 and num_items > batch * world:
        assert shares[1][0][0] != 0 and shares[0][1][0] > shares[1][0][0]  # Striding: rank 1 takes slot 1.


@pytest.mark.slow
@pytest.mark.parametrize('command', ['calc', 'net'])
def test_failure_on_rank0_stops_every_rank(command, folders, tmp_path, subprocess_env, repo_root):
    """Rank 0 fails to load the detector: every rank must stop with an error, at once, instead of the other
    ranks waiting in the next collective until its timeout (30 minutes)."""
    bad = tmp_path / 'detector.pt'
    bad.write_text('not a detector\n')
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    args = (['calc', f'--images={folders.a}', '--num=4', '--workers=0'] if command == 'calc'
            else ['net', f'--network={tmp_path / "unused.pkl"}', '--seeds=0-3'])
    t0 = time.time()
    # '--': torchrun's own parser would otherwise take --num for its --numa-binding (ambiguous prefix).
    proc = subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', '--', 'fid.py'] + args
                          + [f'--ref={ref}', f'--detector={bad}'], cwd=repo_root, env=subprocess_env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert 'Detector' in proc.stderr and str(bad) in proc.stderr, proc.stderr[-2000:]
    # The other rank learned of the failure through the agreement, not by a dead peer (which gloo only
    # notices when the process is gone, and NCCL not at all until the timeout).
    assert 'failed on another process' in proc.stderr and 'Connection closed by peer' not in proc.stderr
    assert time.time() - t0 < 200  # far below the collective timeout

#----------------------------------------------------------------------------
# fid.py sweep (FID against NFE for several samplers) with a real tiny network.


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


def test_sweep_scores_every_point_and_writes_table_and_plot(tmp_path, detector_file, folders, monkeypatch):
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


#----------------------------------------------------------------------------
# fid.py nll (training/likelihood.py's bits/dim of a dataset).


@pytest.fixture(scope='module')
def nll_files(tmp_path_factory):
    from torch_utils import persistence
    root = tmp_path_factory.mktemp('nll')
    pkl = root / 'net.pkl'
    persistence.save_network_pkl({'ema': make_tiny_net()}, pkl)
    return pkl, make_dataset_zip(root / 'data.zip', num_images=8, resolution=8, num_classes=4)


def test_cli_nll_matches_the_library(nll_files):
    pkl, data = nll_files
    args = ['nll', '--network', str(pkl), '--data', data, '--num', '4', '--batch', '2', '--rtol', '1e-2', '--atol', '1e-2']
    res = CliRunner().invoke(fid.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    reported = float(res.output.strip().splitlines()[-1])
    assert 'bits/dim' in res.output and '+-' in res.output
    # The same computation by hand: the images --num/--seed pick, their labels, per-image generators.
    from training.dataset import ImageFolderDataset
    import generate
    net = generate.load_net(str(pkl), torch.device('cpu'), verbose=False)
    ds = ImageFolderDataset(path=data, max_size=4, random_seed=0, use_labels=True)
    values = []
    for indices in ([0, 1], [2, 3]):  # _rank_batches(4, 2): two slots of 2
        images = torch.stack([torch.as_tensor(ds[i][0]) for i in indices])
        labels = torch.stack([torch.as_tensor(ds[i][1]) for i in indices])
        rnd = sampling.StackedRandomGenerator('cpu', indices)
        bpd, _ = likelihood.nll_bits_per_dim(net, images, labels, rand_like=rnd.rand_like, randn_like=rnd.randn_like,
                                             rtol=1e-2, atol=1e-2)
        values += bpd.tolist()
    assert reported == pytest.approx(sum(values) / len(values), rel=1e-5)


@pytest.mark.parametrize('extra,needle', [
    (['--probe', 'normal'], "'normal' is not one of"),
    (['--sigma_min', '5', '--sigma_max', '1'], 'smaller'),
    (['--data', 'GRAY'], 'the network models [3, 8, 8]'),
    (['--data', 'NOLABELS'], 'conditional on 4 classes'),
    (['--num', '50'], '--num asks for 50'),
])
def test_cli_nll_errors_are_one_line(nll_files, tmp_path, extra, needle):
    pkl, data = nll_files
    gray = tmp_path / 'gray.zip'
    make_dataset_zip(gray, num_images=4, resolution=16)
    nolabels = make_dataset_zip(tmp_path / 'nolabels.zip', num_images=4, resolution=8, labels=False)
    extra = [str(gray) if a == 'GRAY' else nolabels if a == 'NOLABELS' else a for a in extra]
    res = CliRunner().invoke(fid.main, ['nll', '--network', str(pkl), '--data', data] + extra)
    assert res.exit_code in (1, 2)
    errors = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and needle in errors[0], res.output


@pytest.mark.slow
def test_cli_nll_torchrun_matches_one_process(nll_files, subprocess_env, repo_root):
    """2 ranks, each a share of the images, sums reduced: the same mean as 1 process (same batches)."""
    pkl, data = nll_files
    args = ['fid.py', 'nll', f'--network={pkl}', f'--data={data}', '--batch=2', '--rtol=1e-3', '--atol=1e-3']
    one = subprocess.run([sys.executable] + args, cwd=repo_root, env=subprocess_env, capture_output=True, text=True,
                         timeout=300)
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] + args,
                         cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = float(one.stdout.strip().splitlines()[-1]), float(two.stdout.strip().splitlines()[-1])
    assert a == pytest.approx(b, rel=1e-9) and 'over 8 images' in two.stdout


def test_cli_nll_vlb_matches_the_library(nll_files, tmp_path):
    """--method=vlb: training.iddpm.vlb_bits_per_dim of an iDDPM network on the images --num/--seed pick, one
    generator per image (seeded by its index), averaged; the default --method=ode is the ODE NLL above."""
    from torch_utils import persistence
    from training import iddpm
    from training.dataset import ImageFolderDataset
    from training.networks_iddpm import iDDPMDiscretePrecond
    _pkl, data = nll_files
    torch.manual_seed(0)
    net = iDDPMDiscretePrecond(img_resolution=8, img_channels=3, label_dim=4, M=20, model_type='DhariwalUNet',
                               model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    pkl = tmp_path / 'iddpm.pkl'
    persistence.save_network_pkl({'ema': net.eval().requires_grad_(False)}, pkl)
    res = CliRunner().invoke(fid.main, ['nll', '--network', str(pkl), '--data', data, '--num', '4', '--batch', '2',
                                        '--method', 'vlb'], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert 'at most 20 network evaluations per image' in res.output
    reported = float(res.output.strip().splitlines()[-1])
    ds = ImageFolderDataset(path=data, max_size=4, random_seed=0, use_labels=True)
    values = []
    for indices in ([0, 1], [2, 3]):
        images = torch.stack([torch.as_tensor(ds[i][0]) for i in indices])
        labels = torch.stack([torch.as_tensor(ds[i][1]) for i in indices])
        rnd = sampling.StackedRandomGenerator('cpu', indices)
        bpd, nfe = iddpm.vlb_bits_per_dim(net, images, labels, randn_like=rnd.randn_like)
        values += bpd.tolist()
    assert nfe == 20 and reported == pytest.approx(sum(values) / len(values), rel=1e-5)


@pytest.mark.parametrize('extra,needle,code', [
    (['--method', 'vlb'], '--method=vlb: ', 1),                  # an EDM network has no discrete process
    (['--method', 'vlb', '--rtol', '1e-3'], '--rtol is an option of --method=ode', 2),
    (['--method', 'vlb', '--no-dequantize'], 'is an option of --method=ode', 2),
    (['--method', 'kl'], "'kl' is not one of", 2),
])
def test_cli_nll_method_errors_are_one_line(nll_files, extra, needle, code):
    pkl, data = nll_files
    res = CliRunner().invoke(fid.main, ['nll', '--network', str(pkl), '--data', data] + extra)
    assert res.exit_code == code, res.output
    errors = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and needle in errors[0], res.output
    if code == 1:
        assert 'needs an iDDPM network' in errors[0] and 'use --method=ode' in errors[0]


#----------------------------------------------------------------------------
# fid.py probe (training/probe.py's linear probe on a network's features).


def _brightness_zip(path, num=48, resolution=8):
    """Labelled RGB images whose class (0/1) is their brightness: a task a probe can solve."""
    rnd = np.random.RandomState(0)
    images = [(rnd.randint(0, 80, size=[resolution, resolution, 3]) + 170 * (i % 2)).astype(np.uint8)
              for i in range(num)]
    return write_dataset_zip(path, images, [i % 2 for i in range(num)])


@pytest.fixture
def probe_files(tmp_path):
    from torch_utils import persistence
    torch.manual_seed(0)
    net = networks_edm2small.EDM(img_resolution=8, img_channels=3, net_type='UNetE', n_channels=32, ch_mults=[1],
                                 is_attn=[False], n_blocks=2, dropout=0)
    pkl = tmp_path / 'net.pkl'
    persistence.save_network_pkl(dict(ema=net), pkl)
    return pkl, _brightness_zip(tmp_path / 'data.zip')


def test_cli_probe_writes_csv_and_png(probe_files, tmp_path):
    import csv
    from click.testing import CliRunner
    import fid
    pkl, data = probe_files
    out = tmp_path / 'probe'
    result = CliRunner().invoke(fid.main, ['probe', f'--network={pkl}', f'--data={data}', '--timesteps=2,10',
                                           '--blocks=out_1,out_2', '--epochs=3', '--batch=16', '--lr=0.01',
                                           f'--outdir={out}'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = list(csv.DictReader(open(out / 'probe.csv')))
    assert [(r['timestep'], r['block']) for r in rows] == [('2', 'out_1'), ('2', 'out_2'), ('10', 'out_1'),
                                                           ('10', 'out_2')]
    assert all(0 <= float(r['accuracy']) <= 1 for r in rows)
    assert max(float(r['accuracy']) for r in rows if r['timestep'] == '2') >= 0.8  # brightness is easy at low noise
    assert (out / 'probe.png').stat().st_size > 0 and (out / 'probe.json').is_file()
    bad = CliRunner().invoke(fid.main, ['probe', f'--network={pkl}', f'--data={data}', '--blocks=out_9'])
    assert bad.exit_code != 0 and 'unknown blocks' in bad.output
    bad = CliRunner().invoke(fid.main, ['probe', f'--network={pkl}', f'--data={data}', '--timesteps=19'])
    assert bad.exit_code != 0 and '--timesteps' in bad.output


@pytest.mark.slow
def test_cli_probe_two_ranks(probe_files, tmp_path, subprocess_env, repo_root):
    """Under torchrun every rank extracts a share of the features; the gathered result trains the probe."""
    import csv
    import subprocess
    pkl, data = probe_files
    out = tmp_path / 'probe2'
    subprocess.run(['torchrun', '--standalone', '--nproc_per_node=2', 'fid.py', 'probe', f'--network={pkl}',
                    f'--data={data}', '--timesteps=2', '--blocks=out_1', '--epochs=3', '--batch=8', '--lr=0.01',
                    f'--outdir={out}'], cwd=repo_root, env=subprocess_env, check=True, timeout=120,
                   capture_output=True, text=True)
    rows = list(csv.DictReader(open(out / 'probe.csv')))
    assert len(rows) == 1 and float(rows[0]['accuracy']) >= 0.8
    assert '"world_size": 2' in (out / 'probe.json').read_text()


#----------------------------------------------------------------------------
# Reliability (issue 24): non-finite options, damaged references, the grid beside the samples, sweep folders.


def _one_error_line(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(errors) == 1 and 'Traceback' not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize('option', ['--rtol=nan', '--atol=nan', '--sigma_max=inf', '--sigma_min=nan'])
def test_nll_refuses_non_finite_options(option):
    """NaN tolerances passed the range check and the solver never finished (it hung for > 200 s)."""
    res = run_cli(['nll', '--network', 'net.pkl', '--data', 'd.zip', option], expect_ok=False)
    assert res.exit_code == 2 and 'not a finite number' in _one_error_line(res)


def test_calc_refuses_a_reference_holding_nan(folders, detector_file, tmp_path):
    ref = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', ref, '--workers', 0, '--detector', detector_file])
    stats = dict(np.load(ref))
    stats['mu'][3] = np.nan
    np.savez(tmp_path / 'nan.npz', **stats)
    res = run_cli(['calc', '--images', folders.b, '--ref', tmp_path / 'nan.npz', '--num', 40, '--workers', 0,
                   '--detector', detector_file], expect_ok=False)
    line = _one_error_line(res)
    assert 'nan.npz' in line and '"mu" holds NaN/Inf' in line


def test_calc_skips_the_grid_generate_writes_beside_the_samples(folders, detector_file, tmp_path):
    """A bare `generate.py --grid` writes OUTDIR/grid.png; fid.py does not count it as a sample."""
    import shutil
    samples = tmp_path / 'out'
    shutil.copytree(folders.b, samples)
    Image.fromarray(np.zeros([64, 64, 3], np.uint8)).save(samples / 'grid.png')
    ref = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', ref, '--workers', 0, '--detector', detector_file])
    with_grid = run_cli(['calc', '--images', samples, '--ref', ref, '--num', 40, '--workers', 0,
                         '--detector', detector_file])
    plain = run_cli(['calc', '--images', folders.b, '--ref', ref, '--num', 40, '--workers', 0,
                     '--detector', detector_file])
    assert last_number(with_grid) == last_number(plain)


@pytest.fixture
def sweep_setup(folders, detector_file, tmp_path, tiny_net_pkl):
    ref = tmp_path / 'ref.npz'
    run_cli(['ref', '--data', folders.a, '--dest', ref, '--workers', 0, '--detector', detector_file])

    def args(outdir, samplers):
        return ['sweep', '--network', tiny_net_pkl, '--ref', ref, '--samplers', samplers, '--nfe', 2,
                '--seeds', '0-3', '--outdir', outdir, '--detector', detector_file]
    return args


def test_two_sweeps_into_one_folder_keep_both_points(sweep_setup, tmp_path, monkeypatch):
    """Two sweeps writing one --outdir at once: the table gets both runs' points (merged under a lock)."""
    other, out = tmp_path / 'other', tmp_path / 'out'
    run_cli(sweep_setup(other, 'euler'))  # what the concurrent run writes, made ahead
    import metrics.features
    real, calls = metrics.features.generate_images, []

    def generate_meanwhile(*args, **kwargs):  # the other run finishes while this one generates
        if not calls:
            import shutil
            shutil.copy(other / 'sweep.json', out / 'sweep.json')
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(metrics.features, 'generate_images', generate_meanwhile)
    run_cli(sweep_setup(out, 'dpmpp_2m'))
    rows = json.loads((out / 'sweep.json').read_text())['rows']
    assert sorted(r['sampler'] for r in rows) == ['dpmpp_2m', 'euler']
    assert 'euler' in (out / 'sweep.csv').read_text()


@pytest.mark.parametrize('content,needle', [('{"rows": [', 'is damaged'),
                                            ('{"config": {"network": "x"}, "rows": []}', 'another')])
def test_sweep_refuses_a_damaged_or_foreign_table_and_keeps_it(sweep_setup, tmp_path, content, needle):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'sweep.json').write_text(content)
    line = _one_error_line(run_cli(sweep_setup(out, 'euler'), expect_ok=False))
    assert str(out / 'sweep.json') in line and needle in line
    assert (out / 'sweep.json').read_text() == content


def test_sweep_outdir_that_is_a_file_is_one_line(sweep_setup, tmp_path):
    (tmp_path / 'f').write_text('x')
    line = _one_error_line(run_cli(sweep_setup(tmp_path / 'f', 'euler'), expect_ok=False))
    assert 'is a file' in line and (tmp_path / 'f').read_text() == 'x'


def test_net_and_sweep_refuse_a_class_the_network_lacks(sweep_setup, tmp_path, tiny_net_pkl, detector_file):
    line = _one_error_line(run_cli(sweep_setup(tmp_path / 'o', 'euler') + ['--class', 0], expect_ok=False))
    assert 'no class labels' in line
