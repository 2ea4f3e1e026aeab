"""training/dataset.py: the loader's semantics (labels, max_size, xflip, resolution, cache) and its use
from DataLoader worker processes and distributed samplers."""

import io
import json
import pickle
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import Dataset, DatasetError, ImageFolderDataset

# ----------------------------------------------------------------------------


def png_bytes(arr):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format='png', compress_level=0)
    return buf.getvalue()


def make_dataset(tmp_path, n=12, res=8, channels=3, labels='int', kind='zip', seed=0, name='ds'):
    """A dataset_tool-style zip or folder; returns (path, images NHWC/NHW, raw labels or None)."""
    rng = np.random.default_rng(seed)
    shape = (n, res, res, channels) if channels > 1 else (n, res, res)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(n)]
    if labels == 'int':
        raw = [int(x) for x in rng.integers(0, 5, size=n)]
        raw[0] = 4  # label_dim = max + 1 = 5
    elif labels == 'float':
        raw = rng.standard_normal([n, 3]).astype(np.float32).tolist()
    else:
        raw = None
    meta = json.dumps({'labels': [[nm, l] for nm, l in zip(names, raw)] if raw is not None else None})
    if kind == 'zip':
        path = tmp_path / f'{name}.zip'
        with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
            for nm, img in zip(names, images):
                z.writestr(nm, png_bytes(img))
            z.writestr('dataset.json', meta)
    else:
        path = tmp_path / name
        for nm, img in zip(names, images):
            (path / nm).parent.mkdir(parents=True, exist_ok=True)
            (path / nm).write_bytes(png_bytes(img))
        (path / 'dataset.json').write_text(meta)
    return path, images, raw


def chw(img):
    return img[np.newaxis] if img.ndim == 2 else img.transpose(2, 0, 1)

# ----------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['zip', 'dir'])
def test_images_and_onehot_labels(tmp_path, kind):
    path, images, raw = make_dataset(tmp_path, kind=kind)
    ds = ImageFolderDataset(str(path), use_labels=True)
    assert len(ds) == 12 and ds.name == 'ds'
    assert ds.image_shape == [3, 8, 8] and ds.num_channels == 3 and ds.resolution == 8
    assert ds.label_shape == [5] and ds.label_dim == 5 and ds.has_labels and ds.has_onehot_labels
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dtype == np.uint8 and np.array_equal(img, chw(images[i]))
        assert label.dtype == np.float32 and np.array_equal(label, np.eye(5, dtype=np.float32)[raw[i]])
        assert np.array_equal(ds.get_label(i), label)
    d = ds.get_details(3)
    assert d.raw_idx == 3 and d.xflip is False and int(d.raw_label) == raw[3]


def test_without_labels(tmp_path):
    path, _, _ = make_dataset(tmp_path)
    ds = ImageFolderDataset(str(path))  # use_labels=False: the dataset.json is ignored.
    assert ds.label_shape == [0] and ds.label_dim == 0 and not ds.has_labels
    assert ds[0][1].shape == (0,) and ds[0][1].dtype == np.float32
    path2, _, _ = make_dataset(tmp_path, labels=None, name='nolabels')
    ds2 = ImageFolderDataset(str(path2), use_labels=True)  # {"labels": null}
    assert not ds2.has_labels and ds2[0][1].shape == (0,)


def test_float_labels(tmp_path):
    path, _, raw = make_dataset(tmp_path, labels='float')
    ds = ImageFolderDataset(str(path), use_labels=True)
    assert ds.label_shape == [3] and not ds.has_onehot_labels and ds.has_labels
    assert np.allclose(ds[5][1], raw[5])


def test_grayscale(tmp_path):
    path, images, _ = make_dataset(tmp_path, channels=1)
    ds = ImageFolderDataset(str(path))
    assert ds.num_channels == 1 and ds[2][0].shape == (1, 8, 8)
    assert np.array_equal(ds[2][0][0], images[2])


def test_max_size_fixed_random_subset(tmp_path):
    path, images, raw = make_dataset(tmp_path, n=40)
    a = ImageFolderDataset(str(path), use_labels=True, max_size=10, random_seed=7)
    b = ImageFolderDataset(str(path), use_labels=True, max_size=10, random_seed=7)
    c = ImageFolderDataset(str(path), use_labels=True, max_size=10, random_seed=8)
    idx = lambda ds: [ds.get_details(i).raw_idx for i in range(len(ds))]
    assert len(a) == 10 and idx(a) == idx(b) and idx(a) != idx(c)
    assert idx(a) == sorted(set(idx(a))) and all(0 <= i < 40 for i in idx(a))
    # The paper's protocol: shuffle all indices with RandomState(seed), keep the first max_size, sort.
    perm = np.arange(40)
    np.random.RandomState(7).shuffle(perm)
    assert idx(a) == sorted(perm[:10].tolist())
    for i, r in enumerate(idx(a)):  # Images and labels follow the chosen raw indices.
        assert np.array_equal(a[i][0], chw(images[r])) and a[i][1].argmax() == raw[r]
    assert len(ImageFolderDataset(str(path), max_size=100)) == 40  # Larger than the data: no-op.


def test_xflip_doubles_with_mirrors(tmp_path):
    path, images, raw = make_dataset(tmp_path, n=5)
    ds = ImageFolderDataset(str(path), use_labels=True, xflip=True)
    assert len(ds) == 10
    for i in range(5):
        assert np.array_equal(ds[i][0], chw(images[i]))
        assert np.array_equal(ds[i + 5][0], chw(images[i])[:, :, ::-1])
        assert np.array_equal(ds[i + 5][1], ds[i][1])
        assert ds.get_details(i + 5).xflip and ds.get_details(i + 5).raw_idx == i
    assert ds[7][0].flags['C_CONTIGUOUS']  # A contiguous copy: torch.from_numpy / default_collate accept it.


def test_resolution_check(tmp_path):
    path, _, _ = make_dataset(tmp_path, res=16)
    assert ImageFolderDataset(str(path), resolution=16).resolution == 16
    with pytest.raises(IOError) as e:
        ImageFolderDataset(str(path), resolution=32)
    msg = str(e.value)
    assert str(path) in msg and '16x16' in msg and 'resolution=32' in msg


def test_cache_returns_copies(tmp_path):
    path, images, _ = make_dataset(tmp_path)
    ds = ImageFolderDataset(str(path), cache=True)
    img = ds[1][0]
    assert 1 in ds._cached_images
    img[:] = 0  # Mutating what we were given must not corrupt the cache.
    assert np.array_equal(ds[1][0], chw(images[1]))


def test_errors(tmp_path):
    with pytest.raises(IOError, match='directory or a .zip'):
        ImageFolderDataset(str(tmp_path / 'x.tar'))
    with pytest.raises(IOError, match='not found'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(IOError, match='no image files'):
        ImageFolderDataset(str(tmp_path / 'empty'))
    path, _, _ = make_dataset(tmp_path, kind='dir')
    (path / '00000' / 'img00000003.png').write_bytes(b'junk')
    ds = ImageFolderDataset(str(path))
    with pytest.raises(IOError, match='img00000003.png'):
        ds[3]
    meta = json.loads((path / 'dataset.json').read_text())
    (path / 'dataset.json').write_text(json.dumps({'labels': meta['labels'][1:]}))
    with pytest.raises(IOError, match='no label for 00000/img00000000.png'):
        ImageFolderDataset(str(path), use_labels=True).label_dim


def test_mismatched_image_size_is_reported(tmp_path):
    path, _, _ = make_dataset(tmp_path, kind='dir')
    (path / '00000' / 'img00000002.png').write_bytes(png_bytes(np.zeros([4, 4, 3], np.uint8)))
    ds = ImageFolderDataset(str(path))
    with pytest.raises(ValueError, match=r'img00000002.png.*\[3, 4, 4\]'):
        ds[2]


def test_base_class_contract():
    class Ramp(Dataset):
        def _load_raw_image(self, raw_idx):
            return np.full([1, 2, 2], raw_idx, dtype=np.uint8)

        def _load_raw_labels(self):
            return np.array([1, 0, 2], dtype=np.int64)

    ds = Ramp(name='ramp', raw_shape=[3, 1, 2, 2], use_labels=True)
    assert len(ds) == 3 and ds.label_dim == 3 and ds[2][0][0, 0, 0] == 2
    assert np.array_equal(ds[0][1], [0, 1, 0])

# ----------------------------------------------------------------------------
# Multiple processes.


def test_pickle_after_use(tmp_path):
    path, images, _ = make_dataset(tmp_path)
    ds = ImageFolderDataset(str(path), use_labels=True)
    ds[0]
    assert ds._zipfile is not None  # An open handle must not travel (or break pickling).
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2._zipfile is None
    assert np.array_equal(ds2[4][0], chw(images[4])) and np.array_equal(ds2[4][1], ds[4][1])


def _collect(loader):
    imgs, labels = [], []
    for x, y in loader:
        imgs.append(x)
        labels.append(y)
    return torch.cat(imgs), torch.cat(labels)


def test_dataloader_two_workers(tmp_path):
    """Workers forked after the parent opened the zip must read their own handle (shared file offsets
    would interleave reads); every image arrives intact and in order."""
    n = 300  # Many small interleaved reads, so that a shared handle would corrupt some.
    path, images, raw = make_dataset(tmp_path, n=n, res=16)
    ds = ImageFolderDataset(str(path), use_labels=True, xflip=True)
    ds[0]  # The parent has an open zip handle at fork time.
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    x, y = _collect(loader)
    assert x.dtype == torch.uint8 and x.shape == (2 * n, 3, 16, 16) and y.shape == (2 * n, 5)
    ref = np.stack([chw(img) for img in images])
    assert np.array_equal(x[:n].numpy(), ref) and np.array_equal(x[n:].numpy(), ref[:, :, :, ::-1])
    assert y[:n].argmax(1).tolist() == raw and torch.equal(y[:n], y[n:])


def test_distributed_sampler_ranks_partition(tmp_path):
    path, images, _ = make_dataset(tmp_path, n=10)
    ds = ImageFolderDataset(str(path))
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler)
        x, _ = _collect(loader)
        idx = list(sampler)
        assert np.array_equal(x.numpy(), np.stack([chw(images[i]) for i in idx]))
        seen += idx
    assert sorted(seen) == list(range(10))


@pytest.mark.slow  # two DataLoader worker processes: 1-5 s (the sampler itself: tests/test_misc.py)
def test_infinite_sampler(tmp_path):
    from torch_utils import misc
    path, images, _ = make_dataset(tmp_path, n=6)
    ds = ImageFolderDataset(str(path))
    sampler = misc.InfiniteSampler(dataset=ds, rank=0, num_replicas=1, seed=0)
    it = iter(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4, num_workers=2))
    x = torch.cat([next(it)[0] for _ in range(3)])  # 12 draws from 6 images: wraps around.
    assert x.shape == (12, 3, 8, 8)
    assert all(any(np.array_equal(img.numpy(), chw(ref)) for ref in images) for img in x)


def test_dataset_errors_survive_dataloader_workers():
    """torch re-raises a worker's exception with the worker's traceback as its message; DatasetError
    keeps its own one line."""
    try:
        raise DatasetError('data.zip:00000/img00000003.png: cannot read image (not a readable image); re-create it')
    except DatasetError:
        wrapper = torch._utils.ExceptionWrapper(sys.exc_info(), where='in DataLoader worker process 0')
    with pytest.raises(DatasetError) as info:
        wrapper.reraise()
    assert str(info.value) == 'data.zip:00000/img00000003.png: cannot read image (not a readable image); re-create it'


@pytest.mark.slow
def test_dataloader_spawn_workers(tmp_path):
    """Spawned workers (macOS/Windows default) unpickle the dataset and open the zip themselves."""
    path, images, _ = make_dataset(tmp_path, n=16)
    ds = ImageFolderDataset(str(path))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context='spawn')
    x, _ = _collect(loader)
    assert np.array_equal(x.numpy(), np.stack([chw(img) for img in images]))

# ----------------------------------------------------------------------------


def test_reads_dataset_tool_output(golden_dir, tmp_path):
    """What dataset_tool writes, the loader reads: labels from top-level folders, RGB, 16x16."""
    import dataset_tool
    dataset_tool.convert_dataset(str(golden_dir / 'src_images'), str(tmp_path / 'g.zip'), transform='center-crop',
                                 resolution=(16, 16), progress=False)
    ds = ImageFolderDataset(str(tmp_path / 'g.zip'), use_labels=True, resolution=16)
    assert len(ds) == 8 and ds.label_dim == 3 and ds.num_channels == 3
    assert [int(ds[i][1].argmax()) for i in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
