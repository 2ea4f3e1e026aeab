"""Our snapshots load in the paper's code.

A network pickle embeds the source of every persistent class's module, and the paper's loader rebuilds each
object by executing that source as a fresh module, with the paper's own modules on sys.path, then
`cls.__new__(cls)` + `__setstate__(state)`. So every embedded source may import, from this project's
packages, only names the paper's modules also define (../shared/golden/paper_module_names.json).

Here the paper's environment is played by stand-in modules that hold exactly those names, and the paper's
protocol by a small loader written for this test. A full snapshot written by the training loop
(ema, loss_fn, augment_pipe, dataset_kwargs) must load that way and give the same outputs as our loader.
"""

import ast
import contextlib
import json
import pickle
import sys
import types

import pytest
import torch

from helpers import make_dataset_zip
from torch_utils import persistence
from training import training_loop as tl

pytestmark = pytest.mark.usefixtures('one_thread')

# Our modules whose classes can appear in a snapshot (their sources get embedded).
EMBEDDED_MODULES = ('training.networks', 'training.loss', 'training.augment', 'training.iddpm', 'training.networks_iddpm',
                    'training.networks_edm2', 'training.networks_edm2small')
PROJECT_PACKAGES = ('training', 'torch_utils', 'dnnlib')


@pytest.fixture(scope='module')
def paper_names(golden_dir):
    return json.loads((golden_dir / 'paper_module_names.json').read_text())['modules']


class _Placeholder:
    """A name the paper's module has; its value does not matter for importing."""

    def __init__(self, qualname):
        self.qualname = qualname

    def __repr__(self):
        return f'<paper {self.qualname}>'


_paper_modules = {}  # module source -> module executed from it (the paper's loader caches them likewise)


def _paper_reconstruct(meta):
    """The paper's persistent-object protocol: execute the embedded module source, take the class by
    name, create the object without calling __init__ and restore its pickled state."""
    assert meta['type'] == 'class' and meta['version'] == 6
    src = meta['module_src']
    if src not in _paper_modules:
        module = types.ModuleType(f'_paper_imported_module_{len(_paper_modules)}')
        exec(compile(src, module.__name__, 'exec'), module.__dict__)  # noqa: S102 -- our own source
        _paper_modules[src] = module
    cls = getattr(_paper_modules[src], meta['class_name'])
    obj = cls.__new__(cls)
    obj.__setstate__(meta['state']) if hasattr(obj, '__setstate__') else obj.__dict__.update(meta['state'])
    return obj


def _stand_in_modules(paper_names) -> dict:
    """sys.modules entries for the paper's project packages: exactly the listed names, with a working
    `persistence.persistent_class` decorator, `_reconstruct_persistent_obj` and `dnnlib.EasyDict`."""
    import dnnlib
    modules = {}
    for name, attrs in paper_names.items():
        module = types.ModuleType(name)
        module.__path__ = []  # every entry may act as a package
        for attr in attrs:
            setattr(module, attr, _Placeholder(f'{name}.{attr}'))
        modules[name] = module
    modules['torch_utils.persistence'].persistent_class = lambda cls: cls
    modules['torch_utils.persistence']._reconstruct_persistent_obj = _paper_reconstruct
    for name in ('dnnlib', 'dnnlib.util'):
        modules[name].EasyDict = dnnlib.EasyDict
    for name, module in modules.items():  # submodules are attributes of their packages
        parent, _, child = name.rpartition('.')
        if parent in modules:
            setattr(modules[parent], child, module)
    return modules


@contextlib.contextmanager
def paper_environment(paper_names):
    """Replace this project's packages in sys.modules by the paper's stand-ins for the duration."""
    _paper_modules.clear()
    saved = {name: mod for name, mod in sys.modules.items() if name.split('.')[0] in PROJECT_PACKAGES}
    for name in saved:
        del sys.modules[name]
    sys.modules.update(_stand_in_modules(paper_names))
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n.split('.')[0] in PROJECT_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)


def _import_time_nodes(tree):
    """Every node that runs when the module is executed: all but the bodies of functions (an import inside a
    function runs only when called, e.g. an opt-in feature the paper's code cannot construct anyway)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _project_imports(source: str):
    """(module, [names]) for every import-time import of a project package in `source`."""
    for node in _import_time_nodes(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in PROJECT_PACKAGES:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split('.')[0] in PROJECT_PACKAGES:
                    yield a.name, []


@pytest.mark.parametrize('module_name', EMBEDDED_MODULES)
def test_embedded_source_imports_only_names_the_paper_has(module_name, paper_names):
    source = persistence._source_of_module(__import__(module_name, fromlist=['_']).__name__)
    assert source, f'no source for {module_name}'
    for imported, names in _project_imports(source):
        assert imported in paper_names, f'{module_name} imports {imported}, which the paper does not have'
        missing = [n for n in names if n not in paper_names[imported] and f'{imported}.{n}' not in paper_names]
        assert not missing, f'{module_name} imports {missing} from {imported}; the paper\'s {imported} lacks them'
    # And executing it the way the paper's loader does succeeds.
    with paper_environment(paper_names):
        module = types.ModuleType('_paper_exec_' + module_name.replace('.', '_'))
        exec(compile(source, module.__name__, 'exec'), module.__dict__)  # noqa: S102


def test_stand_ins_catch_a_missing_name(paper_names):
    # The check above can fail: the import this project once had in training/loss.py is refused.
    with paper_environment(paper_names), pytest.raises(ImportError, match='vp_sigma'):
        exec('from training.networks import vp_sigma', {})  # noqa: S102


def test_full_training_snapshot_loads_with_the_papers_protocol(tmp_path, paper_names):
    data = make_dataset_zip(tmp_path / 'tiny.zip', num_images=32)
    run = tmp_path / 'run'
    tl.training_loop(
        run_dir=str(run),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16,
                            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.1),
        loss_kwargs=dict(class_name='training.loss.EDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1,
                            rotate_frac=1, aniso=1, translate_frac=1),
        seed=0, batch_size=8, total_kimg=0.016, lr_rampup_kimg=0, kimg_per_tick=0.008, snapshot_ticks=1,
        state_dump_ticks=None, device=torch.device('cpu'), print_summary=False)
    path = run / 'network-snapshot-000000.pkl'

    ours = persistence.load_network_pkl(str(path))
    with paper_environment(paper_names), open(path, 'rb') as f:
        theirs = pickle.load(f)  # plain pickle: the paper's loader

    assert set(theirs) == set(ours) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    assert theirs['dataset_kwargs'] == ours['dataset_kwargs']
    assert type(theirs['ema']).__name__ == 'EDMPrecond' and type(theirs['ema']) is not type(ours['ema'])
    assert theirs['ema']._init_kwargs == ours['ema'].init_kwargs
    x = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 1.0, 20.0])
    labels = torch.eye(4)[[0, 3, 1]]
    augment_labels = torch.randn([3, 9], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours['ema'].eval()(x, sigma, labels, augment_labels=augment_labels)
        got = theirs['ema'].eval()(x, sigma, labels, augment_labels=augment_labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    # The loss and the augmentation pipe rebuilt from their embedded sources compute what ours do.
    images = torch.rand([2, 3, 8, 8]) * 2 - 1
    results = []
    for snap in (ours, theirs):
        torch.manual_seed(5)
        results.append(snap['loss_fn'](net=snap['ema'], images=images, labels=labels[:2],
                                       augment_pipe=snap['augment_pipe']))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
