"""Tests for fid.py: the Fréchet distance against golden values, and ref/calc/net end to end with a small
TorchScript stand-in detector built here (never the real Inception download)."""

import functools
import http.server
import io
import json
import os
import pathlib
import pickle
import subprocess
import time
import sys
import threading
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from PIL import Image

import fid
from training.dataset import dataset_fingerprint

FEATURE_DIM = 8

#----------------------------------------------------------------------------
# Helpers: stand-in detector, image folders, direct numpy statistics.


class StandInDetector(torch.nn.Module):
    """Deterministic uint8 images -> FEATURE_DIM features, with the official detector's call signature."""

    def __init__(self, dim: int = FEATURE_DIM):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.register_buffer('proj', torch.randn([3 * 4 * 4, dim], generator=g) * 2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, [4, 4]).flatten(1)
        return torch.tanh((x - 0.5) @ self.proj)


class NotADetector(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


class PickledDetector(StandInDetector):
    """A plain (non-TorchScript) module: only loadable from a pickle with --trust-pickle."""


@pytest.fixture(scope='module')
def detector_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp('det') / 'standin.pt'
    torch.jit.save(torch.jit.script(StandInDetector()), str(path))
    return path


def make_images(seed: int, n: int, size: int = 16, mode: str = 'RGB') -> np.ndarray:
    """n random-ish images [n,H,W,C] uint8 with smooth structure so pooled features vary."""
    rnd = np.random.RandomState(seed)
    base = rnd.randint(0, 256, size=[n, 4, 4, 3]).astype(np.float64)
    img = base.repeat(size // 4, axis=1).repeat(size // 4, axis=2) + rnd.randint(-20, 21, size=[n, size, size, 3])
    img = np.clip(img, 0, 255).astype(np.uint8)
    if mode == 'L':
        img = img[..., :1]
    return img


def write_folder(path: pathlib.Path, images: np.ndarray) -> pathlib.Path:
    path.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path / f'img{i:04d}.png')
    return path


def direct_features(images: np.ndarray) -> np.ndarray:
    """Features of [N,H,W,C] uint8 images from the stand-in, gray repeated to RGB, as float64."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat([1, 3, 1, 1])
    with torch.no_grad():
        return StandInDetector()(x, return_features=True).double().numpy()


def direct_stats(features: np.ndarray):
    return features.mean(0), np.cov(features, rowvar=False, ddof=1)


def direct_fid(mu1, s1, mu2, s2) -> float:
    """Independent route: Tr sqrt(S1 S2) = sum of square roots of the (real, >= 0) eigenvalues of S1 S2."""
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())


def run_cli(args, expect_ok=True):
    result = CliRunner().invoke(fid.main, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def last_number(result) -> float:
    return float(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('imgs')
    a = make_images(0, 40)
    b = np.clip(a.astype(np.int64) + 40, 0, 255).astype(np.uint8)  # Brightness-shifted copy.
    return types.SimpleNamespace(a_images=a, b_images=b, a=write_folder(root / 'a', a), b=write_folder(root / 'b', b))

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


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / 'www'
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield types.SimpleNamespace(root=root, url=f'http://127.0.0.1:{server.server_address[1]}', server=server)
    server.shutdown()
    server.server_close()


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
