"""Shared pytest fixtures: the golden-vector folder, the slow-test switch, a tiny dataset zip."""

import os
import pathlib
import sys

import pytest
import torch

from tinydata import make_dataset_zip

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every golden test reads this folder: $EDM_GOLDEN_DIR when set (any golden set in the same format then runs
# through the same tests), else ../shared/golden beside the project.
GOLDEN = pathlib.Path(os.environ.get('EDM_GOLDEN_DIR') or ROOT.parent / 'shared' / 'golden').resolve()

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False,
                     help='also run the slow end-to-end tests (CI does)')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'):
        return
    skip = pytest.mark.skip(reason='slow end-to-end test; run with --runslow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope='session')
def golden_dir() -> pathlib.Path:
    """The reference outputs ($EDM_GOLDEN_DIR, default ../shared/golden); tests skip when it is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f'golden vectors not found at {GOLDEN} (set EDM_GOLDEN_DIR or put ../shared/golden beside the project)')
    return GOLDEN


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
    """A tiny labelled 8x8 dataset zip (tinydata.make_dataset_zip's defaults), one per test module."""
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
