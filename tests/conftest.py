"""Shared pytest fixtures (plain helper functions are in helpers.py): the golden-vector folder, the slow-test
switch, threads, tiny datasets and networks, the Gaussian problem, the stand-in FID detector with its image
folders, a finished tiny train.py run and a local HTTP server."""

import functools
import http.server
import os
import pathlib
import sys
import threading
import types

import numpy as np
import pytest
import torch

from helpers import TINY_RUN, StandInDetector, gaussian_problem, make_dataset_zip, make_images, write_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every golden test reads this folder: $EDM_GOLDEN_DIR when set (any golden set in the same format then runs
# through the same tests), else ../shared/golden beside the project.
GOLDEN = pathlib.Path(os.environ.get('EDM_GOLDEN_DIR') or ROOT.parent / 'shared' / 'golden').resolve()

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False,
                     help='also run the tests marked slow (over ~3 s; CI does)')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'):
        return
    skip = pytest.mark.skip(reason='slow test (over ~3 s); run with --runslow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def golden_dir() -> pathlib.Path:
    """The reference outputs ($EDM_GOLDEN_DIR, default ../shared/golden); tests skip when it is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f'golden vectors not found at {GOLDEN} (set EDM_GOLDEN_DIR or put ../shared/golden beside the project)')
    return GOLDEN


@pytest.fixture(scope='module')
def golden(golden_dir):
    """golden(name): <golden dir>/<name>.pt (tensors only), loaded once per test module."""
    cache = {}
    def get(name):
        if name not in cache:
            cache[name] = torch.load(golden_dir / f'{name}.pt', weights_only=True)
        return cache[name]
    return get


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
    return ROOT


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for CLI subprocesses: project importable, one thread each (2-core CI)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


@pytest.fixture
def one_thread():
    """One intra-op thread for in-process training tests: on a busy 2-core machine two threads made
    each tiny step ~50x slower (oversubscription)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope='module')
def tiny_zip(tmp_path_factory) -> str:
    """A tiny labelled 8x8 dataset zip (helpers.make_dataset_zip's defaults), one per test module."""
    return make_dataset_zip(tmp_path_factory.mktemp('data') / 'tiny.zip')


@pytest.fixture(scope='module')
def tiny_net_pkl(tmp_path_factory) -> str:
    """A snapshot of an untrained unconditional 8x8 EDMPrecond (SongUNet, 8 channels, one level)."""
    from torch_utils import persistence
    from training import networks
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=8,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    path = tmp_path_factory.mktemp('net') / 'tiny-uncond.pkl'
    persistence.save_network_pkl({'ema': net.eval().requires_grad_(False)}, path)
    return str(path)


@pytest.fixture
def problem():
    """helpers.gaussian_problem(): (mu, std, z) of the exactly solvable Gaussian problem."""
    return gaussian_problem()


@pytest.fixture(scope='module')
def detector_file(tmp_path_factory) -> pathlib.Path:
    """helpers.StandInDetector saved as TorchScript: what fid.py --detector loads."""
    path = tmp_path_factory.mktemp('det') / 'standin.pt'
    torch.jit.save(torch.jit.script(StandInDetector()), str(path))
    return path


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Two image folders of 40 16x16 images: a, and b = a brightness-shifted (with the arrays as a_images,
    b_images)."""
    root = tmp_path_factory.mktemp('imgs')
    a = make_images(0, 40)
    b = np.clip(a.astype(np.int64) + 40, 0, 255).astype(np.uint8)  # Brightness-shifted copy.
    return types.SimpleNamespace(a_images=a, b_images=b, a=write_folder(root / 'a', a), b=write_folder(root / 'b', b))


@pytest.fixture(scope='session')
def unlabelled_zip(tmp_path_factory) -> str:
    """A tiny unlabelled 8x8 dataset zip of 64 images."""
    return make_dataset_zip(tmp_path_factory.mktemp('data') / 'tiny.zip', num_images=64, labels=False)


@pytest.fixture(scope='session')
def finished_run(unlabelled_zip, tmp_path_factory):
    """A run folder of train.py's tiny configuration (helpers.TINY_RUN) with training-state-000000.pt and its
    snapshot; read-only for the tests."""
    import dnnlib
    import train
    from training import training_loop as tl
    outdir = tmp_path_factory.mktemp('runs')
    opts = train.main.make_context('train', ['--outdir', str(outdir), '--data', unlabelled_zip, '--batch', '16']
                                   + TINY_RUN).params
    c, _ = train.build_training_options(dnnlib.EasyDict(opts), world=1)
    c.update(run_dir=str(outdir / 'run'), total_kimg=0.016, seed=1, print_summary=False)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tl.training_loop(**c, device=torch.device('cpu'))
    finally:
        torch.set_num_threads(prev)
    return outdir / 'run'


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server of the folder .root (a fresh tmp_path/www) at .url; .server to stop it early."""
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
