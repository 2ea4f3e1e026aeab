"""generate.py as a library and a CLI: the paper's import names, per-rank seed shares, files written, grids,
the sampler and guidance options, error handling, torchrun equivalence and network URLs through the download
cache."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
from helpers import GaussianDenoiser, load_golden_net, make_tiny_net, read_pngs
from torch_utils import distributed as dist, persistence
from training import sampling

# ----------------------------------------------------------------------------
# Tiny real networks, saved through the persistence API.


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    """helpers.make_tiny_net snapshots: cond (4 classes), guide (another seed), gray (1 channel, no labels), uncond."""
    folder = tmp_path_factory.mktemp('guide-nets')
    paths = {}
    for name, kwargs in (('cond', dict()), ('guide', dict(seed=7)), ('gray', dict(img_channels=1, label_dim=0, seed=1)),
                         ('uncond', dict(label_dim=0, seed=3))):
        paths[name] = folder / f'{name}.pkl'
        persistence.save_network_pkl({'ema': make_tiny_net(**kwargs)}, paths[name])
    return paths


@pytest.fixture(scope='module')
def tiny_pkl(nets):
    return nets['cond']


@pytest.fixture(scope='module')
def tiny_gray_pkl(nets):
    return nets['gray']


def run_cli(args, env=None):
    """In-process CLI run (fast): returns click's Result."""
    return CliRunner().invoke(generate.main, [str(a) for a in args], env=env, catch_exceptions=False)


# ----------------------------------------------------------------------------
# The paper's import names.


def test_generate_keeps_the_papers_import_names():
    # Users and the paper's examples import these from generate.py; they are the library's objects.
    for name in ('edm_sampler', 'ablation_sampler', 'StackedRandomGenerator', 'generate_images'):
        assert getattr(generate, name) is getattr(sampling, name)
    assert generate.parse_int_list is dnnlib.util.parse_int_list
    for name in ('make_grid', 'load_net', 'sampler_kwargs_from_cli'):  # still importable from generate.py
        assert callable(getattr(generate, name, None)), name


def test_parse_int_list():
    assert generate.parse_int_list('1,2,5-10') == [1, 2, 5, 6, 7, 8, 9, 10]
    assert generate.parse_int_list('0-63') == list(range(64))
    assert generate.parse_int_list('7') == [7]
    assert generate.parse_int_list([3, 4]) == [3, 4]
    for bad in ('a', '1,,2', '5-2', '1-2-3', '1.5', ''):
        with pytest.raises(ValueError):
            generate.parse_int_list(bad)


# ----------------------------------------------------------------------------
# generate_images (library API).


def test_generate_images_batches_and_protocol():
    net = GaussianDenoiser(mu=torch.zeros([]), std=0.5, img_resolution=4)
    seeds = list(range(10, 17))
    got = list(sampling.generate_images(net, seeds, max_batch_size=3, num_steps=4))
    assert [s for batch, _ in got for s in batch] == seeds
    assert all(len(batch) <= 3 for batch, _ in got)
    for batch, images in got:
        assert images.dtype == torch.uint8 and images.shape == (len(batch), 4, 4, 3)
        rnd = sampling.StackedRandomGenerator('cpu', batch)
        latents = rnd.randn([len(batch), 3, 4, 4])
        ref = sampling.images_to_uint8(sampling.edm_sampler(net, latents, randn_like=rnd.randn_like, num_steps=4))
        assert torch.equal(images, ref)
    # Each image depends only on its seed, not on the batching.
    one_batch = torch.cat([img for _, img in sampling.generate_images(net, seeds, max_batch_size=64, num_steps=4)])
    assert torch.equal(one_batch, torch.cat([img for _, img in got]))


def test_generate_images_selects_sampler_and_ignores_none():
    net = GaussianDenoiser(mu=torch.zeros([]), std=0.5, img_resolution=2)
    list(sampling.generate_images(net, [0], num_steps=5, solver=None, sigma_min=None))
    assert net.nfe == 2 * 5 - 1  # edm_sampler (Heun)
    net = GaussianDenoiser(mu=torch.zeros([]), std=0.5, img_resolution=2)
    list(sampling.generate_images(net, [0], num_steps=5, solver='euler'))
    assert net.nfe == 5  # ablation_sampler (Euler)
    with pytest.raises(TypeError, match='num_step'):
        list(sampling.generate_images(net, [0], num_step=5))
    net = GaussianDenoiser(mu=torch.zeros([]), std=0.5, img_resolution=2)
    list(sampling.generate_images(net, [0], sampler='ablation', num_steps=5))
    assert net.nfe == 2 * 5 - 1  # ablation_sampler by name, with its default solver (Heun)
    with pytest.raises(TypeError, match="'edm' does not take solver"):
        list(sampling.generate_images(net, [0], sampler='edm', solver='euler'))
    with pytest.raises(ValueError, match='unknown sampler'):
        list(sampling.generate_images(net, [0], sampler='nope'))


def test_generate_images_class_labels():
    seen = []

    class Recorder(GaussianDenoiser):
        def forward(self, x, sigma, class_labels=None, **kwargs):
            seen.append(class_labels)
            return super().forward(x, sigma)

    net = Recorder(mu=torch.zeros([]), std=0.5, img_resolution=2, label_dim=5)
    list(sampling.generate_images(net, [0, 1, 2], num_steps=1, class_idx=3))
    assert torch.equal(seen[-1], torch.eye(5)[[3, 3, 3]])
    list(sampling.generate_images(net, [0, 1, 2], num_steps=1))  # random labels follow the seeds
    rnd = sampling.StackedRandomGenerator('cpu', [0, 1, 2])
    rnd.randn([3, 3, 2, 2])
    assert torch.equal(seen[-1], torch.eye(5)[rnd.randint(5, size=[3])])
    for bad in (5, -1):
        with pytest.raises(ValueError, match='out of range'):
            list(sampling.generate_images(net, [0], class_idx=bad))


@pytest.mark.parametrize('world_size,max_batch', [(2, 2), (3, 4), (4, 64)])
def test_generate_images_rank_shares(monkeypatch, world_size, max_batch):
    """Simulated ranks: shares are disjoint, cover every seed, and give the same images as one process."""
    net = GaussianDenoiser(mu=torch.zeros([]), std=0.5, img_resolution=2)
    seeds = list(range(11))
    single = {s: img for batch, imgs in sampling.generate_images(net, seeds, max_batch, num_steps=3)
              for s, img in zip(batch, imgs)}
    monkeypatch.setattr(dist, 'get_world_size', lambda: world_size)
    union = {}
    for rank in range(world_size):
        monkeypatch.setattr(dist, 'get_rank', lambda rank=rank: rank)
        for batch, imgs in sampling.generate_images(net, seeds, max_batch, num_steps=3):
            for s, img in zip(batch, imgs):
                assert s not in union
                union[s] = img
    assert sorted(union) == seeds
    assert all(torch.equal(union[s], single[s]) for s in seeds)


@pytest.mark.parametrize('name', ['sampler_edm_stoch', 'sampler_abl_edm_heun_stoch'])  # mostly unclipped pixels
def test_generate_images_reproduces_golden(golden_dir, name):
    """The library path draws latents, labels and churn noise in the golden protocol's order."""
    ref = torch.load(golden_dir / f'{name}.pt', weights_only=True)
    net = load_golden_net(golden_dir, ref['net'])
    (batch, images), = sampling.generate_images(net, ref['seeds'], max_batch_size=64, **ref['kwargs'])
    assert batch == ref['seeds']
    expected = sampling.images_to_uint8(ref['output'])
    diff = (images.int() - expected.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # only float noise at truncation boundaries


# ----------------------------------------------------------------------------
# CLI: outputs.


def test_cli_writes_pngs_and_grid(tmp_path, tiny_pkl):
    out = tmp_path / 'out'
    res = run_cli(['--network', tiny_pkl, '--outdir', out, '--seeds', '0-4', '--batch', 2, '--steps', 3, '--grid'])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == [f'{s:06d}.png' for s in range(5)] + ['grid.png']  # no temp files left
    imgs = [np.array(PIL.Image.open(out / f'{s:06d}.png')) for s in range(5)]
    assert all(i.shape == (8, 8, 3) and i.dtype == np.uint8 for i in imgs)
    assert np.std(np.stack(imgs).astype(float)) > 5  # real content, not a flat image
    assert not np.array_equal(imgs[0], imgs[1])
    # The files hold exactly what the library API yields.
    from torch_utils import persistence
    net = persistence.load_network(str(tiny_pkl))
    lib = {s: img.numpy() for b, im in sampling.generate_images(net, range(5), 2, num_steps=3) for s, img in zip(b, im)}
    assert all(np.array_equal(imgs[s], lib[s]) for s in range(5))
    grid = np.array(PIL.Image.open(out / 'grid.png'))
    assert grid.shape == (2 * 8, 3 * 8, 3)  # 5 images -> 3 columns x 2 rows, row-major
    assert np.array_equal(grid[8:16, 0:8], imgs[3]) and not grid[8:16, 16:24].any()


def test_cli_grayscale_subdirs_class_and_ablation(tmp_path, tiny_gray_pkl, tiny_pkl):
    out = tmp_path / 'gray'
    res = run_cli(['--network', tiny_gray_pkl, '--outdir', out, '--seeds', '998-1001', '--subdirs', '--steps', 2,
                   '--grid', tmp_path / 'g.png'])
    assert res.exit_code == 0, res.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*.png')) == [
        '000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png']
    assert PIL.Image.open(out / '001000' / '001001.png').mode == 'L'
    assert np.array(PIL.Image.open(tmp_path / 'g.png')).shape == (16, 16)
    out = tmp_path / 'abl'
    res = run_cli(['--network', tiny_pkl, '--outdir', out, '--seeds', '3', '--class', 2, '--steps', 4,
                   '--solver', 'euler', '--disc', 'vp', '--schedule', 'vp', '--scaling', 'vp', '--S_churn', 5])
    assert res.exit_code == 0, res.output
    assert (out / '000003.png').is_file()


def test_cli_pc_sampler(tmp_path, tiny_gray_pkl):
    """--sampler=pc and its options reach training.sde.pc_sampler; values it rejects are one-line usage errors."""
    out = tmp_path / 'pc'
    res = run_cli(['--network', tiny_gray_pkl, '--outdir', out, '--seeds', '0-1', '--steps', 3, '--sampler', 'pc',
                   '--snr', 0.1, '--corrector-steps', 2, '--epsilon_s', 1e-4])
    assert res.exit_code == 0, res.output
    from torch_utils import persistence
    net = persistence.load_network(str(tiny_gray_pkl))
    lib = [im.numpy() for _b, im in sampling.generate_images(net, [1], sampler='pc', num_steps=3, snr=0.1,
                                                               corrector_steps=2, epsilon_s=1e-4)][0][0]
    assert np.array_equal(np.array(PIL.Image.open(out / '000001.png')), lib[:, :, 0])
    for args, needle in ((['--sde', 'vp'], 'beta_max/N'), (['--snr', 0.1], "does not take snr")):
        res = run_cli(['--network', tiny_gray_pkl, '--outdir', tmp_path / 'x', '--steps', 3]
                      + (['--sampler', 'pc'] if needle != 'does not take snr' else []) + args)
        assert res.exit_code == 2 and needle in res.output, res.output


def _lib_image(pkl, seed, **kwargs):
    from torch_utils import persistence
    net = persistence.load_network(str(pkl))
    return [im.numpy() for _b, im in sampling.generate_images(net, [seed], **kwargs)][0][0]


def test_cli_eta_default_is_the_samplers(tmp_path, tiny_gray_pkl):
    """--eta has no CLI default: iddpm_ddim runs with its own eta = 0 (deterministic DDIM), the ancestral
    samplers with theirs (1); --eta given reaches the sampler."""
    for sampler, default in (('iddpm_ddim', 0.0), ('euler_ancestral', 1.0)):
        out = tmp_path / sampler
        res = run_cli(['--network', tiny_gray_pkl, '--outdir', out, '--seeds', '3', '--steps', 4, '--sampler', sampler])
        assert res.exit_code == 0, res.output
        png = np.array(PIL.Image.open(out / '000003.png'))
        assert np.array_equal(png, _lib_image(tiny_gray_pkl, 3, sampler=sampler, num_steps=4, eta=default)[:, :, 0])
        assert not np.array_equal(png, _lib_image(tiny_gray_pkl, 3, sampler=sampler, num_steps=4, eta=0.5)[:, :, 0])
        res = run_cli(['--network', tiny_gray_pkl, '--outdir', tmp_path / 'eta', '--seeds', '3', '--steps', 4,
                       '--sampler', sampler, '--eta', 0.5])
        assert res.exit_code == 0, res.output
        assert np.array_equal(np.array(PIL.Image.open(tmp_path / 'eta' / '000003.png')),
                              _lib_image(tiny_gray_pkl, 3, sampler=sampler, num_steps=4, eta=0.5)[:, :, 0])


def test_cli_spacing_reaches_the_iddpm_samplers_only(tmp_path, tiny_gray_pkl):
    out = tmp_path / 'sp'
    res = run_cli(['--network', tiny_gray_pkl, '--outdir', out, '--seeds', '1', '--sampler', 'iddpm', '--spacing', '3,2'])
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.array(PIL.Image.open(out / '000001.png')),
                          _lib_image(tiny_gray_pkl, 1, sampler='iddpm', spacing='3,2')[:, :, 0])
    for args, needle in ((['--spacing', 'ddim10'], "sampler 'edm' does not take spacing"),
                         (['--sampler', 'iddpm', '--spacing', 'ddim1x'], 'neither ddimN nor comma-separated'),
                         (['--sampler', 'iddpm_ddim', '--steps', '2000'], 'cannot take 2000 steps')):
        res = run_cli(['--network', tiny_gray_pkl, '--outdir', tmp_path / 'x'] + args)
        errors = [line for line in res.output.splitlines() if line.startswith('Error')]
        assert res.exit_code == 2 and len(errors) == 1 and needle in errors[0], res.output
    # Steps that do not fit an iDDPM network's own process (M = 40): checked once the network is loaded.
    from torch_utils import persistence
    from training.networks_iddpm import iDDPMDiscretePrecond
    torch.manual_seed(0)
    net = iDDPMDiscretePrecond(img_resolution=8, img_channels=1, M=40, model_type='DhariwalUNet', model_channels=16,
                               channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    iddpm_pkl = tmp_path / 'iddpm.pkl'
    persistence.save_network_pkl({'ema': net.eval().requires_grad_(False)}, iddpm_pkl)
    for args, needle in ((['--sampler', 'iddpm', '--steps', '50'], "--steps: cannot take 50 steps from a section of 40"),
                         (['--sampler', 'iddpm_ddim', '--spacing', 'ddim50'], "--spacing: cannot take exactly 50")):
        res = run_cli(['--network', iddpm_pkl, '--outdir', tmp_path / 'x'] + args)
        errors = [line for line in res.output.splitlines() if line.startswith('Error')]
        assert res.exit_code == 2 and len(errors) == 1 and needle in errors[0], res.output
    assert not (tmp_path / 'x').exists()


def test_cli_guidance_and_samplers(tmp_path, nets):
    common = ['--network', nets['cond'], '--seeds', '0-3', '--steps', '3']
    outputs = {}
    for tag, extra in (('plain', []), ('w1', ['--gnet', nets['guide'], '--guidance', '1']),
                       ('auto', ['--gnet', nets['guide'], '--guidance', '2']),
                       ('uncond', ['--gnet', nets['uncond'], '--guidance', '2']),  # issue 24, defect 2
                       ('cfg', ['--cfg', '--guidance', '2']),
                       ('interval', ['--cfg', '--guidance', '2', '--guidance-interval', '1,10']),
                       ('sde', ['--sampler', 'dpmpp_2m_sde', '--eta', '0.5', '--solver_type', 'heun']),
                       ('lms', ['--sampler', 'lms', '--order', '2']),
                       ('unipc', ['--sampler', 'unipc', '--order', '3'])):
        res = run_cli(common + ['--outdir', tmp_path / tag] + extra)
        assert res.exit_code == 0, (tag, res.output)
        outputs[tag] = read_pngs(tmp_path / tag)
        assert len(outputs[tag]) == 4
    assert outputs['w1'] == outputs['plain']
    for tag in ('auto', 'uncond', 'cfg', 'interval', 'sde', 'lms', 'unipc'):
        assert outputs[tag] != outputs['plain'], tag
    assert outputs['interval'] != outputs['cfg']
    # The library with the same settings writes the same images.
    net = generate.load_net(str(nets['cond']), torch.device('cpu'), verbose=False)
    images = [im for _, im in sampling.generate_images(net, range(4), num_steps=3, cfg=True, guidance=2)]
    generate.save_png_atomic(images[0][0].numpy(), str(tmp_path / 'lib.png'))
    assert (tmp_path / 'lib.png').read_bytes() == outputs['cfg']['000000.png']


# ----------------------------------------------------------------------------
# CLI: bad input -> one-line error, nothing written.


@pytest.mark.parametrize('args,needle', [
    (['--solver', 'rk4'], "'rk4' is not one of"),
    (['--disc', 'cosine'], "'cosine' is not one of"),
    (['--schedule', 'exp'], "'exp' is not one of"),
    (['--scaling', 've'], "'ve' is not one of"),
    (['--steps', '0'], '--steps'),
    (['--seeds', '1,x'], "'x'"),
    (['--seeds', '9-3'], 'empty'),
    (['--sigma_min', '5', '--sigma_max', '1'], 'smaller'),
    # Non-finite values passed the range checks and gave blank images with status 0 (issue 24).
    (['--sigma_max', 'nan'], "'nan' is not a finite number"),
    (['--sigma_min', 'inf'], "'inf' is not a finite number"),
    (['--rho', 'nan'], "'nan' is not a finite number"),
    (['--S_noise', 'nan'], "'nan' is not a finite number"),
    (['--S_churn', 'inf'], "'inf' is not a finite number"),
    (['--S_max', 'nan'], "'nan' is not a finite number"),
    (['--eta', 'inf'], "'inf' is not a finite number"),
    (['--guidance', 'nan', '--cfg'], "'nan' is not a finite number"),
    (['--guidance-interval', 'nan,1', '--cfg'], 'need 0 <= LO <= HI'),
])
def test_cli_rejects_bad_options(tmp_path, args, needle):
    out = tmp_path / 'out'
    res = run_cli(['--network', tmp_path / 'missing.pkl', '--outdir', out] + args)
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not out.exists()


def _not_networks(tmp_path):
    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    empty = tmp_path / 'empty.pkl'
    empty.write_bytes(b'')
    junk = tmp_path / 'junk.pkl'
    junk.write_bytes(b'\x80\x04' + os.urandom(64))
    import pickle
    no_ema = tmp_path / 'no-ema.pkl'
    no_ema.write_bytes(pickle.dumps({'dataset_kwargs': {}}))
    return [text, empty, junk, no_ema, tmp_path / 'missing.pkl', tmp_path]


def test_cli_rejects_non_networks(tmp_path):
    for bad in _not_networks(tmp_path):
        out = tmp_path / 'out'
        res = run_cli(['--network', bad, '--outdir', out])
        assert res.exit_code == 1, (bad, res.output)
        errors = [line for line in res.output.splitlines() if line.startswith('Error')]
        assert len(errors) == 1 and '--network' in errors[0], (bad, res.output)
        assert not out.exists()


def test_cli_rejects_class_out_of_range(tmp_path, tiny_pkl, tiny_gray_pkl):
    for pkl, cls, needle in ((tiny_pkl, 4, '4 classes'), (tiny_gray_pkl, 0, 'no class labels')):
        out = tmp_path / 'out'
        res = run_cli(['--network', pkl, '--outdir', out, '--class', cls])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert not out.exists()


def test_cli_error_is_one_line_without_traceback(tmp_path, subprocess_env, repo_root):
    """As a real process: exit code 1, a single 'Error:' line on stderr, no traceback, no outdir."""
    bad = tmp_path / 'junk.pkl'
    bad.write_bytes(b'\x80\x04' + os.urandom(64))
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, str(repo_root / 'generate.py'), '--network', str(bad), '--outdir', str(out)],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]
    assert proc.stderr.startswith('Error: --network') and not out.exists()


@pytest.mark.parametrize('extra,needle', [
    (['--guidance', '2'], 'need a guide'),
    (['--guidance-interval', '1,2', '--cfg'] + ['--guidance-interval', '2,1'], 'LO <= HI'),
    (['--guidance-interval', 'x', '--cfg'], 'LO,HI'),
    (['--cfg', '--gnet', 'GUIDE'], 'do not also give --gnet'),
    (['--sampler', 'edm', '--eta', '0.5'], "sampler 'edm' does not take eta"),
    (['--sampler', 'dpmpp_2m', '--S_churn', '1'], "does not take S_churn"),
    (['--solver_type', 'rk4'], "'rk4' is not one of"),
    (['--order', '0'], '--order'),
    (['--sampler', 'unipc', '--order', '4'], 'UniPC order must be 1, 2 or 3'),
    (['--cfg', '--guidance', '2', '--network', 'GRAY'], 'class-conditional'),
    (['--gnet', 'GRAY', '--guidance', '2'], 'img_channels=1 but the network has 3'),
    (['--gnet', 'MISSING', '--guidance', '2'], '--gnet'),
])
def test_cli_guidance_errors_are_one_line(tmp_path, nets, extra, needle):
    paths = {'GUIDE': nets['guide'], 'GRAY': nets['gray'], 'MISSING': tmp_path / 'missing.pkl'}
    extra = [paths.get(a, a) for a in extra]
    args = ['--network', nets['cond'], '--outdir', tmp_path / 'out', '--seeds', '0-1', '--steps', '2'] + extra
    res = run_cli(args)
    assert res.exit_code in (1, 2)
    errors = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert 'Traceback' not in res.output


# ----------------------------------------------------------------------------
# Network URLs: through dnnlib.util.open_url and its cache, served by a local HTTP server.


def test_cli_network_url_uses_download_cache(tmp_path, tiny_pkl, http_server):
    served = http_server.root
    (served / 'net.pkl').write_bytes(pathlib.Path(tiny_pkl).read_bytes())
    url = f'{http_server.url}/net.pkl'
    env = {'EDM_CACHE_DIR': str(tmp_path / 'cache')}
    res = run_cli(['--network', url, '--outdir', tmp_path / 'a', '--seeds', '0-1', '--steps', 2], env=env)
    assert res.exit_code == 0, res.output
    # A URL the server does not have (HTTP 404) fails at once with one line and writes nothing.
    res = run_cli(['--network', url.replace('net.pkl', 'other.pkl'), '--outdir', tmp_path / 'c'], env=env)
    assert res.exit_code == 1 and 'cannot fetch' in res.output and not (tmp_path / 'c').exists(), res.output
    http_server.server.shutdown()
    cached = list((tmp_path / 'cache').rglob('*net.pkl'))
    assert len(cached) == 1 and cached[0].read_bytes() == (served / 'net.pkl').read_bytes()
    # Server gone: the second run is served from the cache and gives the same images.
    res = run_cli(['--network', url, '--outdir', tmp_path / 'b', '--seeds', '0-1', '--steps', 2], env=env)
    assert res.exit_code == 0, res.output
    assert read_pngs(tmp_path / 'a') == read_pngs(tmp_path / 'b')


# ----------------------------------------------------------------------------
# torchrun: two processes produce byte-identical files to one.


@pytest.mark.slow
@pytest.mark.parametrize('extra', [['--sampler', 'dpmpp_2m_sde', '--eta', '0.8'],
                                   ['--sampler', 'euler_ancestral', '--gnet', 'GUIDE', '--guidance', '1.8'],
                                   ['--cfg', '--guidance', '2.5', '--guidance-interval', '0.5,20', '--S_churn', '5']])
def test_torchrun_two_processes_match_single_process(tmp_path, nets, subprocess_env, repo_root, extra):
    """Stochastic and guided sampling: 2 processes write byte-identical PNGs to 1 (same batch composition)."""
    extra = [str(nets['guide']) if a == 'GUIDE' else a for a in extra]
    common = ['--network', str(nets['cond']), '--seeds', '0-7', '--batch', '2', '--steps', '4'] + extra
    script = str(repo_root / 'generate.py')
    single = subprocess.run([sys.executable, script, '--outdir', str(tmp_path / 'one')] + common,
                            env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    multi = subprocess.run(torchrun + [script, '--outdir', str(tmp_path / 'two')] + common,
                           env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr
    one, two = read_pngs(tmp_path / 'one'), read_pngs(tmp_path / 'two')
    assert sorted(one) == [f'{s:06d}.png' for s in range(8)] and one == two
    assert 'with 2 process(es)' in multi.stdout
