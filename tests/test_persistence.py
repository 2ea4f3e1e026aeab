"""Checkpoint persistence (torch_utils/persistence.py): the paper's pickle layout, the safe loader that
never executes embedded source, our code-free format, and one-line errors for bad files."""

import copy
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import jitter_params, limited_memory
from torch_utils import misc, persistence
from training import networks

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny convolutions: extra threads only add contention

def make_net(cls=networks.EDMPrecond, **kw):
    torch.manual_seed(0)
    kw = dict(dict(img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, model_type='SongUNet',
                   model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]), **kw)
    net = jitter_params(cls(**kw), 0.02)  # non-trivial weights so outputs really depend on them
    return net.eval().requires_grad_(False)

def run(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    labels = torch.eye(net.label_dim)[[3, 7]] if net.label_dim else None
    aug = torch.randn(2, 9, generator=g) * 0.1
    with torch.no_grad():
        return net(x, torch.tensor([0.3, 5.0]), labels, augment_labels=aug)

def snapshot(net):
    """The paper's network-snapshot layout."""
    import dnnlib
    from training.augment import AugmentPipe
    from training.loss import EDMLoss
    loss = EDMLoss(P_mean=-1.0)
    aug = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1)
    return dict(ema=net, loss_fn=loss, augment_pipe=aug,
                dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='d.zip',
                                               use_labels=True, resolution=16, max_size=100))

def assert_one_line(exc_info, path):
    msg = str(exc_info.value)
    assert '\n' not in msg and os.fspath(path) in msg, msg
    assert isinstance(exc_info.value, ValueError)

#----------------------------------------------------------------------------
# The paper's layout, and the safe loader not executing embedded code.

class _MetaRecorder(pickle.Unpickler):
    """Inspects a pickle without building anything: captures the persistent-object records."""
    def __init__(self, f):
        super().__init__(f)
        self.records = []

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return lambda meta: self.records.append(meta) or meta
        return super().find_class(module, name)

def test_pickle_layout_matches_paper(tmp_path):
    path = tmp_path / 'network-snapshot-000000.pkl'
    persistence.save_network_pkl(snapshot(make_net()), path)
    with open(path, 'rb') as f:
        rec = _MetaRecorder(f)
        data = rec.load()
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    top = data['ema']
    assert set(top) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert top['type'] == 'class' and top['version'] == 6 and top['class_name'] == 'EDMPrecond'
    assert 'class EDMPrecond' in top['module_src']                    # full module source, as in the paper
    assert top['state']['_init_args'] == (16, 3) or top['state']['_init_kwargs']['img_resolution'] == 16
    assert top['state']['_init_kwargs']['model_type'] == 'SongUNet'
    assert {r['class_name'] for r in rec.records} >= {'EDMPrecond', 'SongUNet', 'UNetBlock', 'Conv2d', 'Linear', 'GroupNorm'}

EVIL_SRC = '''
import pathlib
pathlib.Path({sentinel!r}).write_text('executed')
raise SystemExit('embedded module_src was executed!')
'''

class _EvilSourcePickler(pickle.Pickler):
    """Writes the paper's layout but with every object's module_src replaced by hostile code."""
    def __init__(self, f, src):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.src = src

    def reducer_override(self, obj):
        if persistence.is_persistent(obj) and not isinstance(obj, type):
            fn, (meta,) = obj.__reduce__()
            return fn, (dict(meta, module_src=self.src),)
        return NotImplemented

class _EvilSourcePickler2(_EvilSourcePickler):
    def __init__(self, f, src, protocol):
        pickle.Pickler.__init__(self, f, protocol=protocol)
        self.src = src

def write_evil(path, data, sentinel, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, 'wb') as f:
        _EvilSourcePickler2(f, EVIL_SRC.format(sentinel=str(sentinel)), protocol).dump(data)

def test_safe_loader_never_executes_embedded_source(tmp_path):
    net = make_net()
    ref = run(net)
    sentinel = tmp_path / 'SENTINEL'
    path = tmp_path / 'evil.pkl'
    write_evil(path, snapshot(net), sentinel)
    assert b'embedded module_src was executed!' in path.read_bytes()   # the hostile code is really in there

    data = persistence.load_network_pkl(path)
    assert not sentinel.exists()
    ema = data['ema']
    assert type(ema) is networks.EDMPrecond and not ema.training
    assert torch.equal(run(ema), ref)
    assert ema.init_kwargs == net.init_kwargs
    assert data['dataset_kwargs']['path'] == 'd.zip' and data['dataset_kwargs'].resolution == 16
    if data['loss_fn'] is not None:
        assert type(data['loss_fn']).__name__ == 'EDMLoss' and data['loss_fn'].P_mean == -1.0
    if data['augment_pipe'] is not None:
        assert type(data['augment_pipe']).__name__ == 'AugmentPipe'
        assert data['augment_pipe'].init_kwargs['xflip'] == 1e8

    net2 = persistence.load_network(path, device='cpu')
    assert not net2.training and not any(p.requires_grad for p in net2.parameters())
    assert torch.equal(run(net2), ref)
    # Even plain pickle.load resolves our classes by name and ignores the embedded source.
    with open(path, 'rb') as f:
        assert torch.equal(run(pickle.load(f)['ema']), ref)
    assert not sentinel.exists()

@pytest.mark.parametrize('precond,kw', [
    ('VPPrecond', dict(model_type='SongUNet', label_dim=0, augment_dim=0)),
    ('VEPrecond', dict(model_type='SongUNet', embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1])),
    ('iDDPMPrecond', dict(model_type='DhariwalUNet', model_channels=32, augment_dim=0)),
    ('EDMPrecond', dict(model_type='SongUNet', encoder_type='skip', decoder_type='skip')),
])
def test_safe_loader_all_preconds(tmp_path, precond, kw):
    net = make_net(getattr(networks, precond), **kw)
    path = tmp_path / 'n.pkl'
    write_evil(path, dict(ema=net), tmp_path / 'SENTINEL')
    loaded = persistence.load_network(path)
    assert type(loaded) is type(net) and torch.equal(run(loaded), run(net))
    assert loaded.sigma_min == net.sigma_min and loaded.sigma_max == net.sigma_max
    assert not (tmp_path / 'SENTINEL').exists()

@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_safe_loader_pickle_protocols(tmp_path, protocol):
    net = make_net()
    path = tmp_path / 'p.pkl'
    write_evil(path, snapshot(net), tmp_path / 'SENTINEL', protocol=protocol)
    assert torch.equal(run(persistence.load_network(path)), run(net))
    assert not (tmp_path / 'SENTINEL').exists()

def test_deepcopy_and_pickle_roundtrip_keep_class():
    net = make_net()
    for dup in [copy.deepcopy(net), pickle.loads(pickle.dumps(net))]:
        assert type(dup) is networks.EDMPrecond and dup.init_kwargs == net.init_kwargs
        assert torch.equal(run(dup), run(net))

#----------------------------------------------------------------------------
# Hostile, corrupt, truncated and foreign files.

class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f'touch {self.sentinel}',))

def test_forbidden_global_is_refused(tmp_path):
    sentinel = tmp_path / 'PWNED'
    path = tmp_path / 'hostile.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=_Payload(sentinel)), f)
    with pytest.raises(persistence.CheckpointError, match='not allowed') as e:
        persistence.load_network_pkl(path)
    assert_one_line(e, path)
    assert not sentinel.exists()

@pytest.mark.parametrize('meta,match', [
    (dict(type='class', version=6, module_src='raise SystemExit', class_name='Evil', state={}), "'Evil'"),
    (dict(type='class', version=5, module_src='', class_name='EDMPrecond', state={}), 'version 5'),
    (dict(type='class', version=6, module_src='', class_name=['EDMPrecond'], state={}), 'malformed'),
    (dict(type='class', version=6, module_src='', class_name='EDMPrecond', state={'_init_kwargs': 3}), 'malformed'),
    (dict(type='class', version=6, module_src='', class_name='EDMPrecond',
          state={'_init_args': (16, 3), '_init_kwargs': {}, '_parameters': {}, '_buffers': {}, '_modules': {}}), 'do not match'),
])
def test_bad_persistent_records_are_refused(tmp_path, meta, match):
    path = tmp_path / 'record.pkl'
    class Fake:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, (meta,))
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=Fake()), f)
    with pytest.raises(persistence.CheckpointError, match=match) as e:
        persistence.load_network_pkl(path)
    assert_one_line(e, path)

def test_mismatched_tensors_are_reported(tmp_path):
    net = make_net()
    net.model.map_layer0.weight = torch.nn.Parameter(torch.zeros(3, 3))
    path = tmp_path / 'mismatch.pkl'
    persistence.save_network_pkl(dict(ema=net), path)
    with pytest.raises(persistence.CheckpointError, match='do not match') as e:
        persistence.load_network_pkl(path)
    assert_one_line(e, path)

def _bad_files(tmp_path):
    good = tmp_path / 'good.pkl'
    persistence.save_network_pkl(dict(ema=make_net()), good)
    blob = good.read_bytes()
    plain = tmp_path / 'good.pt'
    persistence.save_network_plain(make_net(), plain)
    files = {
        'truncated.pkl': blob[:len(blob) // 2],
        'truncated_tail.pkl': blob[:-5],
        'garbage.pkl': os.urandom(4096),
        'empty.pkl': b'',
        'image.png': b'\x89PNG\r\n\x1a\n' + os.urandom(100),
        'text.pkl': b'hello, I am not a network\n',
        'truncated.pt': plain.read_bytes()[:len(plain.read_bytes()) // 2],
        'corrupt_byte.pkl': blob[:100] + bytes([blob[100] ^ 0xFF]) + blob[101:],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    other = tmp_path / 'other_torch_save.pt'
    torch.save({'state_dict': {'w': torch.zeros(3)}}, other)        # a foreign (weights-only) archive
    zf = tmp_path / 'random.zip'
    with zipfile.ZipFile(zf, 'w') as z:
        z.writestr('a.txt', 'x')
    return [tmp_path / n for n in files] + [other, zf, tmp_path / 'does_not_exist.pkl']

def test_bad_files_give_one_line_error(tmp_path):
    for path in _bad_files(tmp_path):
        with pytest.raises(persistence.CheckpointError) as e:
            persistence.load_network_pkl(path)
        assert_one_line(e, path)
        with pytest.raises(persistence.CheckpointError):
            persistence.load_network(path)

def test_missing_key(tmp_path):
    path = tmp_path / 'noema.pkl'
    persistence.save_network_pkl(dict(net=make_net()), path)
    with pytest.raises(persistence.CheckpointError, match="'ema'") as e:
        persistence.load_network(path)
    assert_one_line(e, path)
    assert type(persistence.load_network(path, key='net')) is networks.EDMPrecond

def test_local_stand_in_class_is_not_loadable(tmp_path):
    stand_in = _StandIn(3)
    assert pickle.loads(pickle.dumps(stand_in)).k == 3          # plain pickle/deepcopy work for any class
    path = tmp_path / 'standin.pkl'
    persistence.save_network_pkl(dict(ema=stand_in), path)
    with pytest.raises(persistence.CheckpointError, match='_StandIn') as e:
        persistence.load_network_pkl(path)                      # ...but the safe loader only builds ours
    assert_one_line(e, path)

@persistence.persistent_class
class _StandIn:
    def __init__(self, k):
        self.k = k

CRAFTED_LOAD = r'''
import io, pickle, sys, time
from torch_utils import persistence

class Crafted:  # 373 bytes asking for EDMPrecond(model_channels=8192): 2.5e11 parameters, no tensors
    def __reduce__(self):
        kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=8192)
        meta = dict(type='class', version=6, module_src='', class_name='EDMPrecond',
                    state=dict(_init_args=(), _init_kwargs=kwargs, training=False))
        return persistence._reconstruct_persistent_obj, (meta,)

t0 = time.time()
try:
    persistence.load_network_pkl(io.BytesIO(pickle.dumps({'ema': Crafted()}, protocol=2)))
    print('loaded')
except persistence.CheckpointError as e:
    print(f'refused in {time.time() - t0:.1f}s: {e}')
'''


def test_safe_loader_refuses_implausibly_large_networks(repo_root, subprocess_env, tmp_path):
    (tmp_path / 'crafted.py').write_text(CRAFTED_LOAD)
    proc = subprocess.run([sys.executable, str(tmp_path / 'crafted.py')], env=subprocess_env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limited_memory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'refused in ([\d.]+)s: .*ask for ([\d,]+) parameters, more than the limit of 10,000,000,000',
                  proc.stdout)
    assert m, proc.stdout + proc.stderr[-2000:]
    assert int(m.group(2).replace(',', '')) > 10**11 and float(m.group(1)) < 30


def test_parameter_limit_is_configurable(finished_run):
    pkl = str(finished_run / 'network-snapshot-000000.pkl')
    net = persistence.load_network_pkl(pkl)['ema']
    count = sum(t.numel() for _, t in misc.named_params_and_buffers(net))
    assert persistence.count_params_on_meta(type(net), (), net.init_kwargs) == count
    with pytest.raises(persistence.CheckpointError, match=f'ask for {count:,} parameters, more than the limit of 1,000'):
        persistence.load_network_pkl(pkl, max_params=1000)
    persistence.load_network_pkl(pkl, max_params=count)

#----------------------------------------------------------------------------
# Our code-free format and atomic writes.

def test_plain_format_roundtrip(tmp_path):
    net = make_net(label_dropout=0.1, sigma_data=0.6)
    data = snapshot(net)
    path = tmp_path / 'net.pt'
    persistence.save_network_plain(data, path)
    raw = torch.load(path, weights_only=True)                  # no code, just tensors + strings
    assert raw['format'] == persistence.PLAIN_FORMAT
    assert raw['objects']['ema']['cls'] == 'training.networks.EDMPrecond'
    assert json.loads(raw['objects']['ema']['init_kwargs'])['sigma_data'] == 0.6

    loaded = persistence.load_network_pkl(path)
    assert set(loaded) == set(data)
    assert type(loaded['ema']) is networks.EDMPrecond and torch.equal(run(loaded['ema']), run(net))
    assert loaded['ema'].init_kwargs == net.init_kwargs
    assert loaded['dataset_kwargs'] == dict(data['dataset_kwargs'])
    if data['loss_fn'] is not None:
        assert loaded['loss_fn'].init_kwargs == data['loss_fn'].init_kwargs
    net2 = persistence.load_network(path)
    assert not net2.training and torch.equal(run(net2), run(net))
    with open(path, 'rb') as f:                                # file objects work too
        assert torch.equal(run(persistence.load_network_pkl(f)['ema']), run(net))
    assert torch.equal(run(persistence.load_network_plain(path)['ema']), run(net))
    pkl = tmp_path / 'net.pkl'
    persistence.save_network_pkl(dict(ema=net), pkl)
    with pytest.raises(persistence.CheckpointError, match='not an edm-plain-v1') as e:
        persistence.load_network_plain(pkl)
    assert_one_line(e, pkl)

def test_plain_format_refuses_foreign_class(tmp_path):
    path = tmp_path / 'foreign.pt'
    persistence.save_network_plain(make_net(), path)
    raw = torch.load(path, weights_only=True)
    raw['objects']['ema']['cls'] = 'os.system'
    torch.save(raw, path)
    with pytest.raises(persistence.CheckpointError, match='os.system') as e:
        persistence.load_network_pkl(path)
    assert_one_line(e, path)

def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / 'snap.pkl'
    persistence.save_network_pkl(dict(ema=make_net()), path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        persistence.save_network_pkl(dict(ema=make_net(), bad=lambda: None), path)   # unpicklable
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['snap.pkl']

def test_file_url_and_string_paths(tmp_path, monkeypatch):
    monkeypatch.setenv('EDM_CACHE_DIR', str(tmp_path / 'cache'))
    net = make_net()
    path = tmp_path / 'url.pkl'
    persistence.save_network_pkl(dict(ema=net), str(path))
    assert torch.equal(run(persistence.load_network(str(path))), run(net))
    assert torch.equal(run(persistence.load_network(path.as_uri())), run(net))
    with pytest.raises(persistence.CheckpointError) as e:
        persistence.load_network(path.as_uri() + '.missing')
    assert '\n' not in str(e.value) and 'url.pkl.missing' in str(e.value)

#----------------------------------------------------------------------------
# The registry: {class name: class} of the library, filled by the decorator.

def test_registry_holds_every_library_class_by_its_name():
    persistence._import_library_modules()
    registry = persistence._library_classes
    for name in ('EDMPrecond', 'SongUNet', 'EDMLoss', 'EDM2Loss', 'AugmentPipe', 'Precond', 'UNet'):
        assert registry[name].__name__ == name and persistence.is_library_class(registry[name])
    assert all(persistence._origin(cls)[0].split('.')[0] in persistence.LIBRARY_PACKAGES for cls in registry.values())
    assert persistence.library_class('_StandIn') is None and not persistence.is_library_class(_StandIn)


def test_a_duplicate_library_class_name_is_refused():
    twin = type('EDMPrecond', (), {'__module__': 'training.some_new_family'})
    with pytest.raises(TypeError, match="'EDMPrecond' is defined in both training.networks and "
                                        "training.some_new_family"):
        persistence.persistent_class(twin)
    assert persistence.library_class('EDMPrecond') is networks.EDMPrecond
    # Outside the library, a same-named class is allowed (plain pickle only); the safe loader keeps ours.
    outside = persistence.persistent_class(type('EDMPrecond', (), {'__module__': 'my_script'}))
    assert persistence.library_class('EDMPrecond') is networks.EDMPrecond
    assert type(copy.deepcopy(outside())) is outside  # deepcopy keeps the class itself, whatever its name
