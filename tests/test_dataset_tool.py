"""dataset_tool.py: golden conversions, the official CIFAR-10/MNIST formats, the transforms, and errors."""

import gzip
import hashlib
import io
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset

# ----------------------------------------------------------------------------
# Helpers.


def convert(source, dest, **kwargs):
    return dataset_tool.convert_dataset(str(source), str(dest), progress=False, **kwargs)


def read_zip(path):
    """{member: decoded pixel array} plus dataset.json, in member order."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        images = {n: np.array(PIL.Image.open(io.BytesIO(z.read(n)))) for n in names if n.endswith('.png')}
        meta = json.loads(z.read('dataset.json'))
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    return names, images, meta


def save_png(path, arr, mode=None):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = PIL.Image.fromarray(arr) if mode is None else PIL.Image.fromarray(arr).convert(mode)
    img.save(path)
    return path


def rand_img(rng, h, w, c=3):
    return rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def expect_error(tmp_path, source, dest, fragments, **kwargs):
    """The conversion fails with a one-line message containing every fragment and leaves nothing behind."""
    dest = pathlib.Path(dest)
    before = sorted(os.listdir(dest.parent)) if dest.parent.exists() else None
    with pytest.raises(dataset_tool.DatasetToolError) as e:
        convert(source, dest, **kwargs)
    msg = e.value.message
    assert '\n' not in msg, msg
    for frag in fragments:
        assert str(frag) in msg, (frag, msg)
    if before is not None:  # No dest, no temp file/folder beside it.
        assert sorted(os.listdir(dest.parent)) == before
    else:
        assert not dest.exists()
    return msg

# ----------------------------------------------------------------------------
# Golden runs: same member names, identical decoded pixels, same dataset.json.


def _golden_runs():
    from conftest import GOLDEN  # parametrisation runs before fixtures: read the same folder directly
    path = GOLDEN / 'dataset_tool_golden.json'
    return sorted(json.loads(path.read_text())['runs']) if path.is_file() else ['<golden missing>']


@pytest.mark.parametrize('run', _golden_runs())
def test_golden_run(golden_dir, tmp_path, run):
    ref = json.loads((golden_dir / 'dataset_tool_golden.json').read_text())['runs'][run]
    dest = tmp_path / 'out.zip'
    res = CliRunner().invoke(dataset_tool.main, [f'--source={golden_dir / "src_images"}', f'--dest={dest}'] + ref['args'])
    assert res.exit_code == 0, res.output
    names, images, meta = read_zip(dest)
    assert names == ref['names']
    assert meta == ref['dataset_json']
    assert sorted(images) == sorted(ref['images'])
    for name, img in images.items():
        assert list(img.shape) == ref['images'][name]['shape'], name
        assert hashlib.sha256(img.tobytes()).hexdigest() == ref['images'][name]['sha256'], name


def test_golden_folder_dest_matches_zip(golden_dir, tmp_path):
    """Folder output holds the same files as zip output (and a pre-existing empty --dest folder is fine)."""
    args = dict(transform='center-crop', resolution=(16, 16))
    convert(golden_dir / 'src_images', tmp_path / 'a.zip', **args)
    (tmp_path / 'folder').mkdir()
    convert(golden_dir / 'src_images', tmp_path / 'folder', **args)
    with zipfile.ZipFile(tmp_path / 'a.zip') as z:
        for name in z.namelist():
            assert (tmp_path / 'folder' / name).read_bytes() == z.read(name), name
    files = sorted(p.relative_to(tmp_path / 'folder').as_posix() for p in (tmp_path / 'folder').rglob('*') if p.is_file())
    assert files == sorted(zipfile.ZipFile(tmp_path / 'a.zip').namelist())
    assert sorted(os.listdir(tmp_path)) == ['a.zip', 'folder']  # No temp leftovers.


def test_zip_source_roundtrip(golden_dir, tmp_path):
    """A dataset zip fed back in (with its dataset.json) reproduces itself."""
    convert(golden_dir / 'src_images', tmp_path / 'a.zip', transform='center-crop', resolution=(16, 16))
    convert(tmp_path / 'a.zip', tmp_path / 'b.zip')
    na, ia, ma = read_zip(tmp_path / 'a.zip')
    nb, ib, mb = read_zip(tmp_path / 'b.zip')
    assert na == nb and ma == mb
    assert all(np.array_equal(ia[n], ib[n]) for n in ia)

# ----------------------------------------------------------------------------
# CIFAR-10 and MNIST in their official formats, with few images.


def make_cifar10(path, counts, rng, bytes_keys=False):
    """cifar-10-python.tar.gz: pickled dicts {data: uint8 [N,3072] (CHW rows), labels: [N], ...}."""
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    images, labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add('batches.meta', {k('label_names'): ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
                                                  'horse', 'ship', 'truck'], k('num_cases_per_batch'): 10000})
        for b, n in enumerate(counts, start=1):
            x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.integers(0, 10, size=n)]
            add(f'data_batch_{b}', {k('batch_label'): f'training batch {b} of 5', k('labels'): y, k('data'): x,
                                    k('filenames'): [f'img_{b}_{i}.png' for i in range(n)]})
            images.append(x.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += y
        x = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        add('test_batch', {k('batch_label'): 'testing batch 1 of 1', k('labels'): [0, 1], k('data'): x,
                           k('filenames'): ['t0.png', 't1.png']})
    return np.concatenate(images), labels


@pytest.mark.parametrize('bytes_keys', [False, True])
def test_cifar10(tmp_path, bytes_keys):
    rng = np.random.default_rng(0)
    src = tmp_path / 'cifar-10-python.tar.gz'
    images, labels = make_cifar10(src, [3, 1, 2, 1, 4], rng, bytes_keys=bytes_keys)
    meta = convert(src, tmp_path / 'c.zip')
    names, out, meta2 = read_zip(tmp_path / 'c.zip')
    assert meta == meta2
    assert len(out) == 11  # Train batches only; test_batch excluded; no 50k assumption.
    assert meta['labels'] == [[dataset_tool.archive_fname(i), labels[i]] for i in range(11)]
    for i in range(11):
        assert np.array_equal(out[dataset_tool.archive_fname(i)], images[i])


def test_cifar10_max_images(tmp_path):
    src = tmp_path / 'cifar-10-python.tar.gz'
    images, labels = make_cifar10(src, [3, 3, 3, 3, 3], np.random.default_rng(1))
    meta = convert(src, tmp_path / 'c', max_images=4)
    assert meta['labels'] == [[dataset_tool.archive_fname(i), labels[i]] for i in range(4)]
    assert np.array_equal(np.array(PIL.Image.open(tmp_path / 'c' / '00000' / 'img00000003.png')), images[3])
    assert len(list((tmp_path / 'c').rglob('*.png'))) == 4


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_cifar10_refuses_code_in_pickle(tmp_path):
    src = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(src, 'w:gz') as tar:
        data = pickle.dumps({'data': _Evil(), 'labels': []}, protocol=2)
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    expect_error(tmp_path, src, tmp_path / 'out' / 'c.zip', [str(src), 'posix.system' if os.name != 'nt' else 'system'])


def test_cifar10_missing_batch(tmp_path):
    src = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(src, 'w:gz'):
        pass
    expect_error(tmp_path, src, tmp_path / 'out' / 'c.zip', [str(src), 'data_batch_1'])


def write_idx(path, arr, magic):
    header = magic.to_bytes(4, 'big') + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize('split', ['train', 't10k'])
def test_mnist(tmp_path, split):
    rng = np.random.default_rng(2)
    digits = rng.integers(1, 256, size=(5, 28, 28), dtype=np.uint8)  # Nonzero, so the padding is visible.
    labels = rng.integers(0, 10, size=5)
    write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz', digits, 0x803)
    write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', labels, 0x801)
    meta = convert(tmp_path / f'{split}-images-idx3-ubyte.gz', tmp_path / 'm.zip')
    names, out, _ = read_zip(tmp_path / 'm.zip')
    assert meta['labels'] == [[dataset_tool.archive_fname(i), int(labels[i])] for i in range(5)]
    for i in range(5):
        img = out[dataset_tool.archive_fname(i)]
        assert img.shape == (32, 32)  # Grayscale kept as one channel.
        assert np.array_equal(img[2:30, 2:30], digits[i])
        border = img.copy()
        border[2:30, 2:30] = 0
        assert not border.any()


def test_mnist_missing_labels(tmp_path):
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros([2, 28, 28], np.uint8), 0x803)
    expect_error(tmp_path, tmp_path / 'train-images-idx3-ubyte.gz', tmp_path / 'out' / 'm.zip',
                 [str(tmp_path / 'train-labels-idx1-ubyte.gz'), 'not found'])


def test_mnist_bad_header(tmp_path):
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros([2, 28, 28], np.uint8), 0x801)
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.zeros([2], np.uint8), 0x801)
    expect_error(tmp_path, tmp_path / 'train-images-idx3-ubyte.gz', tmp_path / 'out' / 'm.zip',
                 ['train-images-idx3-ubyte.gz', 'IDX header'])

# ----------------------------------------------------------------------------
# Image folders: labels, modes, transforms.


def test_folder_labels_from_dataset_json(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / 'src'
    for name in ['x/1.png', 'x/2.png', 'y/3.png']:
        save_png(src / name, rand_img(rng, 8, 8))
    (src / 'dataset.json').write_text(json.dumps({'labels': [['x/1.png', 7], ['x/2.png', 5], ['y/3.png', 7]]}))
    assert convert(src, tmp_path / 'o.zip')['labels'] == [
        ['00000/img00000000.png', 7], ['00000/img00000001.png', 5], ['00000/img00000002.png', 7]]


def test_folder_labels_absent(tmp_path):
    rng = np.random.default_rng(4)
    save_png(tmp_path / 'one' / 'only' / 'a.png', rand_img(rng, 8, 8))  # A single top-level folder: no labels.
    save_png(tmp_path / 'one' / 'only' / 'sub' / 'b.png', rand_img(rng, 8, 8))
    assert convert(tmp_path / 'one', tmp_path / 'o1.zip') == {'labels': None}
    save_png(tmp_path / 'two' / 'a.png', rand_img(rng, 8, 8))  # Image at the root + a class folder.
    save_png(tmp_path / 'two' / 'k' / 'b.png', rand_img(rng, 8, 8))
    assert convert(tmp_path / 'two', tmp_path / 'o2.zip')['labels'] == [
        ['00000/img00000000.png', 0], ['00000/img00000001.png', 1]]  # '' < 'k'


def test_folder_per_1000_images(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    img = np.zeros([4, 4], np.uint8)
    for i in range(1002):
        PIL.Image.fromarray(img + (i % 256)).save(src / f'{i:04d}.png', compress_level=0)
    names, out, meta = read_zip(convert(src, tmp_path / 'o.zip') and tmp_path / 'o.zip')
    assert names[999:] == ['00000/img00000999.png', '00001/img00001000.png', '00001/img00001001.png', 'dataset.json']
    assert out['00001/img00001001.png'][0, 0] == 1001 % 256
    assert meta == {'labels': None}


def test_modes(tmp_path):
    """Grayscale stays 1 channel; RGBA loses alpha; palette expands to its colours; crops make gray RGB."""
    rng = np.random.default_rng(5)
    rgba = rand_img(rng, 8, 8, 4)
    gray = rand_img(rng, 8, 8, 1)
    pal = PIL.Image.fromarray(rand_img(rng, 8, 8)).quantize(colors=16)
    save_png(tmp_path / 'rgba' / 'a.png', rgba)
    save_png(tmp_path / 'gray' / 'a.png', gray)
    (tmp_path / 'pal').mkdir()
    pal.save(tmp_path / 'pal' / 'a.png')
    for name in ['rgba', 'gray', 'pal']:
        convert(tmp_path / name, tmp_path / f'{name}.zip')
    assert np.array_equal(read_zip(tmp_path / 'rgba.zip')[1]['00000/img00000000.png'], rgba[:, :, :3])
    assert np.array_equal(read_zip(tmp_path / 'gray.zip')[1]['00000/img00000000.png'], gray)
    assert np.array_equal(read_zip(tmp_path / 'pal.zip')[1]['00000/img00000000.png'], np.array(pal.convert('RGB')))
    convert(tmp_path / 'gray', tmp_path / 'gray_cc.zip', transform='center-crop', resolution=(8, 8))
    assert np.array_equal(read_zip(tmp_path / 'gray_cc.zip')[1]['00000/img00000000.png'], np.stack([gray] * 3, axis=2))


def test_16bit_grayscale_keeps_high_byte(tmp_path):
    vals = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16) + 255  # High bytes 0..255.
    (tmp_path / 's').mkdir()
    PIL.Image.fromarray(vals).save(tmp_path / 's' / 'a.png')
    assert PIL.Image.open(tmp_path / 's' / 'a.png').mode.startswith('I')
    convert(tmp_path / 's', tmp_path / 'o.zip')
    assert np.array_equal(read_zip(tmp_path / 'o.zip')[1]['00000/img00000000.png'], (vals >> 8).astype(np.uint8))


def test_resolution_without_transform_is_lanczos(tmp_path):
    rng = np.random.default_rng(6)
    src = rand_img(rng, 20, 20)
    save_png(tmp_path / 's' / 'a.png', src)
    convert(tmp_path / 's', tmp_path / 'o.zip', resolution=(8, 8))
    out = read_zip(tmp_path / 'o.zip')[1]['00000/img00000000.png']
    assert np.array_equal(out, np.array(PIL.Image.fromarray(src).resize((8, 8), PIL.Image.LANCZOS)))


def test_center_crop_dhariwal(tmp_path):
    """ADM crop: BOX-halve while the short side >= 2x target, BICUBIC to the target short side, centre crop."""
    rng = np.random.default_rng(7)
    blocks = rand_img(rng, 16, 24)  # 2x2-constant blocks: BOX halving must give them back exactly.
    src = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)  # 32x48
    out = dataset_tool.center_crop_dhariwal(16, src)
    assert np.array_equal(out, blocks[:, 4:20])
    exact = rand_img(rng, 16, 16)  # Already at the target size: untouched.
    assert np.array_equal(dataset_tool.center_crop_dhariwal(16, exact), exact)
    gray = rand_img(rng, 20, 30, 1)
    res = dataset_tool.center_crop_dhariwal(16, gray)
    assert res.shape == (16, 16, 3) and np.array_equal(res[..., 0], res[..., 2])
    # Not a plain resize: a 40x24 (WxH) image is BICUBIC-scaled by 16/24 to 27x16 then cropped x=[5, 21).
    odd = rand_img(rng, 24, 40)
    ref = np.array(PIL.Image.fromarray(odd).resize((27, 16), resample=PIL.Image.BICUBIC))[:, 5:21]
    assert np.array_equal(dataset_tool.center_crop_dhariwal(16, odd), ref)
    save_png(tmp_path / 's' / 'a.png', src)
    convert(tmp_path / 's', tmp_path / 'o.zip', transform='center-crop-dhariwal', resolution=(16, 16))
    assert np.array_equal(read_zip(tmp_path / 'o.zip')[1]['00000/img00000000.png'], blocks[:, 4:20])


class _FakeTxn:
    def __init__(self, items):
        self.items = items

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def stat(self):
        return {'entries': len(self.items)}

    def cursor(self):
        return iter(self.items)


def test_lmdb_with_fake_module(tmp_path, monkeypatch):
    """LSUN path: lmdb imported only when used; undecodable entries skipped, as in the paper's tool."""
    rng = np.random.default_rng(8)
    pngs = [rand_img(rng, 8, 8) for _ in range(3)]
    items = [(b'k0', dataset_tool.encode_png(pngs[0])), (b'bad', b'not an image'),
             (b'k1', dataset_tool.encode_png(pngs[1])), (b'k2', dataset_tool.encode_png(pngs[2]))]
    env = types.SimpleNamespace(begin=lambda write=False: _FakeTxn(items))
    monkeypatch.setitem(sys.modules, 'lmdb', types.SimpleNamespace(open=lambda path, **kw: env))
    monkeypatch.setitem(sys.modules, 'cv2', None)  # Pillow fallback.
    (tmp_path / 'cat_lmdb').mkdir()
    assert convert(tmp_path / 'cat_lmdb', tmp_path / 'o.zip') == {'labels': None}
    names, out, _ = read_zip(tmp_path / 'o.zip')
    assert len(out) == 3 and all(np.array_equal(out[dataset_tool.archive_fname(i)], pngs[i]) for i in range(3))


def test_lmdb_missing_dependency(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'lmdb', None)
    (tmp_path / 'cat_lmdb').mkdir()
    expect_error(tmp_path, tmp_path / 'cat_lmdb', tmp_path / 'out' / 'o.zip', ['cat_lmdb', 'pip install lmdb'])

# ----------------------------------------------------------------------------
# Errors: one line naming the file, nothing left at --dest.


@pytest.fixture
def rng():
    return np.random.default_rng(9)


@pytest.mark.parametrize('dest_name', ['o.zip', 'o'])
def test_error_non_square(tmp_path, rng, dest_name):
    f = save_png(tmp_path / 's' / 'a.png', rand_img(rng, 8, 16))
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / dest_name, [f, 'square'])


def test_error_non_power_of_two(tmp_path, rng):
    f = save_png(tmp_path / 's' / 'a.png', rand_img(rng, 24, 24))
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / 'o.zip', [f, 'power of two'])
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / 'o.zip', ['--resolution=24x24', 'power of two'],
                 transform='center-crop', resolution=(24, 24))


def test_error_inconsistent_size(tmp_path, rng):
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 16, 16))
    f = save_png(tmp_path / 's' / 'b.png', rand_img(rng, 32, 32))
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / 'o.zip', [f, '32x32', 'earlier images are 16x16'])


def test_error_inconsistent_channels(tmp_path, rng):
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 16, 16))
    f = save_png(tmp_path / 's' / 'b.png', rand_img(rng, 16, 16, 1))
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / 'o', [f, '1 channel', 'with 3'])


@pytest.mark.parametrize('kind', ['garbage', 'truncated'])
def test_error_corrupt_image(tmp_path, rng, kind):
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 16, 16))
    good = save_png(tmp_path / 'tmp.png', rand_img(rng, 16, 16)).read_bytes()
    bad = tmp_path / 's' / 'b.png'
    bad.write_bytes(b'definitely not a png' if kind == 'garbage' else good[:len(good) // 2])
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'o.zip').write_bytes(b'previous dataset')  # A failed run must not clobber it.
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / 'o.zip', [bad, 'cannot read image'])
    assert (tmp_path / 'out' / 'o.zip').read_bytes() == b'previous dataset'


def test_error_corrupt_image_in_zip(tmp_path, rng):
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as z:
        z.writestr('a.png', dataset_tool.encode_png(rand_img(rng, 8, 8)))
        z.writestr('b.png', b'junk')
    expect_error(tmp_path, tmp_path / 'src.zip', tmp_path / 'out' / 'o.zip', [f'{tmp_path / "src.zip"}:b.png'])


def test_error_missing_source(tmp_path):
    expect_error(tmp_path, tmp_path / 'nope', tmp_path / 'out' / 'o.zip', [tmp_path / 'nope', 'missing'])


def test_error_unknown_archive(tmp_path):
    (tmp_path / 'data.tar').write_bytes(b'x' * 10)
    expect_error(tmp_path, tmp_path / 'data.tar', tmp_path / 'out' / 'o.zip', [tmp_path / 'data.tar', 'unknown archive type'])
    (tmp_path / 'bad.zip').write_bytes(b'x' * 10)
    expect_error(tmp_path, tmp_path / 'bad.zip', tmp_path / 'out' / 'o.zip', [tmp_path / 'bad.zip', 'zip'])


def test_error_non_empty_dest_folder(tmp_path, rng):
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 16, 16))
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('mine')
    with pytest.raises(dataset_tool.DatasetToolError, match='must be empty') as e:
        convert(tmp_path / 's', tmp_path / 'out')
    assert str(tmp_path / 'out') in e.value.message
    assert os.listdir(tmp_path / 'out') == ['keep.txt']
    assert sorted(os.listdir(tmp_path)) == ['out', 's']


def test_error_no_images(tmp_path):
    (tmp_path / 's').mkdir()
    (tmp_path / 's' / 'notes.txt').write_text('hi')
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / 'o.zip', [tmp_path / 's', 'no images'])


def test_error_transform_needs_resolution(tmp_path, rng):
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 16, 16))
    expect_error(tmp_path, tmp_path / 's', tmp_path / 'out' / 'o.zip', ['--transform=center-crop', '--resolution'],
                 transform='center-crop')


def test_cli_errors_are_one_line_without_traceback(tmp_path, repo_root, subprocess_env, rng):
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 8, 16))
    res = subprocess.run([sys.executable, str(repo_root / 'dataset_tool.py'), f'--source={tmp_path / "s"}',
                          f'--dest={tmp_path / "o.zip"}'], capture_output=True, text=True, env=subprocess_env,
                         timeout=60)
    assert res.returncode == 1
    assert 'Traceback' not in res.stderr
    err_lines = [l for l in res.stderr.splitlines() if l.startswith('Error:')]
    assert len(err_lines) == 1 and 'a.png' in err_lines[0] and 'square' in err_lines[0], res.stderr
    assert not (tmp_path / 'o.zip').exists()
    # Bad --resolution syntax is a usage error (exit 2).
    res = CliRunner().invoke(dataset_tool.main, [f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}',
                                                 '--resolution=64'])
    assert res.exit_code == 2 and 'WxH' in res.output


@pytest.mark.parametrize('args,needle', [
    (['--resolution=0x0'], 'must be positive'),
    (['--resolution=24x24'], 'power of two'),
    (['--resolution=32x16'], 'must be square'),
    (['--max-images=0'], 'at least 1'),
    (['--max-images=-3'], 'at least 1'),
    (['--resolution=abc'], 'WxH'),
])
def test_bad_values_are_usage_errors_with_status_2(tmp_path, rng, args, needle):
    """One exit status for every bad value, as click gives for the ones it finds (they exited 1 or 2)."""
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 16, 16))
    res = CliRunner().invoke(dataset_tool.main, [f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}'] + args)
    errors = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert res.exit_code == 2 and len(errors) == 1 and needle in errors[0], res.output
    assert not (tmp_path / 'o.zip').exists()


def test_existing_non_zip_dest_file_is_refused_in_one_message(tmp_path, rng):
    """It said "will be replaced", then refused and kept the file: now it only refuses."""
    save_png(tmp_path / 's' / 'a.png', rand_img(rng, 16, 16))
    (tmp_path / 'out').write_text('keep')
    res = CliRunner().invoke(dataset_tool.main, [f'--source={tmp_path / "s"}', f'--dest={tmp_path / "out"}'])
    assert res.exit_code == 1 and 'will be replaced' not in res.output and 'is not a folder' in res.output, res.output
    assert (tmp_path / 'out').read_text() == 'keep'
    # A .zip --dest is replaced (and says so).
    (tmp_path / 'o.zip').write_text('old')
    res = CliRunner().invoke(dataset_tool.main, [f'--source={tmp_path / "s"}', f'--dest={tmp_path / "o.zip"}'])
    assert res.exit_code == 0 and 'will be replaced' in res.output


def test_dataset_tool_says_when_it_replaces_dest(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    import PIL.Image
    for i in range(3):
        PIL.Image.fromarray(np.full([8, 8, 3], i * 40, np.uint8)).save(src / f'{i}.png')
    dest = tmp_path / 'out.zip'
    dest.write_bytes(b'an older dataset')
    result = CliRunner().invoke(dataset_tool.main, ['--source', str(src), '--dest', str(dest)])
    assert result.exit_code == 0, result.output
    assert f'--dest {dest} exists and will be replaced' in result.output
    assert len(ImageFolderDataset(str(dest))) == 3
    result = CliRunner().invoke(dataset_tool.main, ['--source', str(src), '--dest', str(tmp_path / 'new.zip')])
    assert 'replaced' not in result.output


def test_dataset_tool_sigterm_removes_its_temporary_output(tmp_path, repo_root, subprocess_env):
    n = 30000  # MNIST-style source, big enough that the conversion is still running when the signal comes
    images = np.random.RandomState(0).randint(0, 256, size=[n, 28, 28], dtype=np.uint8)
    header = lambda magic, *dims: b''.join(int(v).to_bytes(4, 'big') for v in (magic,) + dims)  # noqa: E731
    (tmp_path / 'train-images-idx3-ubyte').write_bytes(header(0x803, n, 28, 28) + images.tobytes())
    (tmp_path / 'train-labels-idx1-ubyte').write_bytes(header(0x801, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
    dest = tmp_path / 'mnist.zip'
    dest.write_bytes(b'previous')
    proc = subprocess.Popen([sys.executable, str(repo_root / 'dataset_tool.py'), '--source',
                             str(tmp_path / 'train-images-idx3-ubyte'), '--dest', str(dest)], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob('.mnist.zip.*')):
        time.sleep(0.02)
    assert list(tmp_path.glob('.mnist.zip.*')), 'no temporary output appeared'
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and 'Aborted!' in out, out[-2000:]
    assert not list(tmp_path.glob('.mnist.zip.*'))  # the partial zip is gone
    assert dest.read_bytes() == b'previous'  # and --dest untouched
