"""Training datasets: images stored by dataset_tool.py as a zip or folder of PNGs (+ dataset.json labels).

`ds[i] -> (image, label)`: image is uint8 CHW numpy, label float32 numpy (one-hot for integer class
labels, empty when unlabelled). Datasets are picklable and re-open their zip in each process, so they
work with DataLoader worker processes (fork or spawn) and any sampler (DistributedSampler,
torch_utils.misc.InfiniteSampler).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Optional, Sequence

import numpy as np
import PIL.Image
import torch

import dnnlib

def dataset_fingerprint(path: str) -> dict:
    """The identity of a dataset's content, recorded by train.py (provenance) and fid.py (reference npz).

    A zip: sha256 over every member's name, size and CRC-32 from the central directory (the CRCs cover
    every byte, and nothing is decompressed, so even a many-GB archive hashes in a moment). A folder:
    sha256 over the sorted relative file names and their bytes. Returns dict(sha256, method)."""
    h = hashlib.sha256()
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                h.update(f'{info.filename}\0{info.file_size}\0{info.CRC:08x}\n'.encode())
        return dict(sha256=h.hexdigest(), method='sha256(zip member names, sizes, crc32)')
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path}: no such dataset zip or folder')
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for fname in sorted(files):
            full = os.path.join(root, fname)
            h.update(os.path.relpath(full, path).replace(os.sep, '/').encode('utf-8') + b'\0')
            with open(full, 'rb') as f:
                for chunk in iter(lambda: f.read(1 << 20), b''):
                    h.update(chunk)
    return dict(sha256=h.hexdigest(), method='sha256(file names and bytes)')


class DatasetError(OSError, ValueError):
    """A dataset that is missing, damaged or inconsistent; str() is one line naming the archive (and
    member) and what to do. A DataLoader worker's exception reaches the main process re-raised with
    the worker's whole traceback as its message: the constructor keeps only the original line, so the
    training loop can report it as it is."""

    def __init__(self, message, *args):
        text = str(message)
        if '\nOriginal Traceback' in text:  # torch.utils.data re-raising a worker's exception
            last = text.strip().splitlines()[-1]   # "training.dataset.DatasetError: <our message>"
            text = last.split(': ', 1)[1] if ': ' in last else last
        super().__init__(text, *args)


_pyspng = None  # Optional faster PNG decoder, imported on first use; False = not installed.


def _get_pyspng():
    global _pyspng
    if _pyspng is None:
        try:
            import pyspng
            _pyspng = pyspng
        except ImportError:
            _pyspng = False
    return _pyspng or None


def _subset_indices(num_images: int, max_size: Optional[int], seed: int) -> np.ndarray:
    """Raw indices kept when the dataset is capped at `max_size` images.

    A seeded shuffle picks which images survive (the same seed always gives the same subset, which is
    what makes `fid.py calc --num/--seed` reproducible); they are then read in ascending order,
    which keeps zip access sequential.
    """
    indices = np.arange(num_images, dtype=np.int64)
    if max_size is None or num_images <= max_size:
        return indices
    np.random.RandomState(seed % (1 << 31)).shuffle(indices)
    return np.sort(indices[:max_size])


def _check_raw_labels(labels, num_images: int) -> None:
    """What `_load_raw_labels()` may return: [N] non-negative int64 classes or [N, ...] float32 vectors."""
    assert isinstance(labels, np.ndarray)
    assert labels.shape[0] == num_images
    assert labels.dtype in [np.float32, np.int64]
    if labels.dtype == np.int64:
        assert labels.ndim == 1
        assert np.all(labels >= 0)

# ----------------------------------------------------------------------------


class Dataset(torch.utils.data.Dataset):
    """Base class of the training datasets.

    Args:
        name: human-readable name (used in messages and snapshots).
        raw_shape: [N, C, H, W] of the stored images.
        max_size: keep only this many images, a fixed random subset chosen by `random_seed`
            (None = all of them).
        use_labels: return the stored labels; False gives empty (0-dimensional) labels.
        xflip: append a horizontally mirrored copy of every image, doubling the length.
        random_seed: seed of the `max_size` subset.
        cache: keep decoded images in memory (per process).

    Subclasses implement `_load_raw_image(raw_idx)` -> uint8 CHW array and `_load_raw_labels()` ->
    int64 [N] class indices, float32 [N, D] vectors, or None; `close()` releases file handles.
    """

    def __init__(self, name: str, raw_shape: list, max_size: Optional[int] = None, use_labels: bool = False,
                 xflip: bool = False, random_seed: int = 0, cache: bool = False):
        self._name = name
        self._stored_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict()  # raw index -> decoded image
        self._labels_cache = None     # loaded on first use (and again in each worker process)
        self._label_shape_cache = None

        # Item i shows raw image self._item_source[i], mirrored when self._item_mirrored[i] is set.
        kept = _subset_indices(self._stored_shape[0], max_size, random_seed)
        mirrored = np.zeros(kept.size, dtype=np.uint8)
        if xflip:
            kept = np.concatenate([kept, kept])
            mirrored = np.concatenate([mirrored, np.ones_like(mirrored)])
        self._item_source = kept
        self._item_mirrored = mirrored

    # -- Hooks for subclasses. ------------------------------------------------------------------

    def close(self):
        pass

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        raise NotImplementedError

    def _describe(self, raw_idx: int) -> str:
        """Where raw image `raw_idx` comes from, for error messages."""
        return f'{self._name}[{raw_idx}]'

    # -- Labels. --------------------------------------------------------------------------------

    def _all_labels(self) -> np.ndarray:
        if self._labels_cache is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._stored_shape[0], 0], dtype=np.float32)
            _check_raw_labels(labels, self._stored_shape[0])
            self._labels_cache = labels
        return self._labels_cache

    def get_label(self, idx: int) -> np.ndarray:
        label = self._all_labels()[self._item_source[idx]]
        if label.dtype != np.int64:
            return label.copy()
        onehot = np.zeros(self.label_shape, dtype=np.float32)
        onehot[label] = 1
        return onehot

    # -- Pickling / lifetime. -------------------------------------------------------------------

    def __getstate__(self):
        # Labels are re-read lazily in each worker instead of being pickled along.
        return dict(self.__dict__, _labels_cache=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- Items. ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._item_source.size

    def _decoded_image(self, raw_idx: int) -> np.ndarray:
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        assert isinstance(image, np.ndarray)
        if list(image.shape) != self.image_shape or image.dtype != np.uint8:
            raise DatasetError(f'{self._describe(raw_idx)}: image is {image.dtype} {list(image.shape)} (CHW), '
                             f'but the dataset is uint8 {self.image_shape}; re-create it with dataset_tool.py')
        return image

    def __getitem__(self, idx: int):
        image = self._decoded_image(int(self._item_source[idx]))
        if self._item_mirrored[idx]:
            image = image[:, :, ::-1]  # CHW: mirror the width axis
        # Always hand out a copy: callers may modify it, and the cache must stay intact.
        return image.copy(), self.get_label(idx)

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        raw_idx = int(self._item_source[idx])
        return dnnlib.EasyDict(raw_idx=raw_idx, xflip=(int(self._item_mirrored[idx]) != 0),
                               raw_label=self._all_labels()[raw_idx].copy())

    # -- Shape information. ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list:
        """[C, H, W]."""
        return list(self._stored_shape[1:])

    @property
    def num_channels(self) -> int:
        assert len(self.image_shape) == 3
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        assert len(self.image_shape) == 3
        _channels, height, width = self.image_shape
        assert height == width, f'{self._name}: images are not square'
        return height

    @property
    def label_shape(self) -> list:
        if self._label_shape_cache is None:
            labels = self._all_labels()
            # Integer classes become one-hot vectors as long as the largest class index + 1.
            self._label_shape_cache = [int(np.max(labels)) + 1] if labels.dtype == np.int64 else labels.shape[1:]
        return list(self._label_shape_cache)

    @property
    def label_dim(self) -> int:
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(dim != 0 for dim in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._all_labels().dtype == np.int64

# ----------------------------------------------------------------------------


def _image_array(img: PIL.Image.Image) -> np.ndarray:
    """PIL image -> HxW or HxWx3 uint8 (dataset_tool writes only L/RGB; others are converted sensibly)."""
    if img.mode in ('L', 'RGB'):
        return np.asarray(img)
    if img.mode in ('1', 'LA'):
        return np.asarray(img.convert('L'))
    return np.asarray(img.convert('RGB'))


def _extension(fname: str) -> str:
    return os.path.splitext(fname)[1].lower()


class ImageFolderDataset(Dataset):
    """Images in a folder (searched recursively) or a zip, as written by dataset_tool.py, in sorted-name
    order, with optional labels from its `dataset.json`.

    Args:
        path: the folder or `.zip` file.
        resolution: expected image size; a mismatch is an error (None = accept what is stored).
        use_pyspng: decode PNGs with pyspng when it is installed (faster than Pillow).
        exclude: member names (with '/' separators) that are not part of the dataset.
        **super_kwargs: passed to `Dataset` (max_size, use_labels, xflip, random_seed, cache).
    """

    def __init__(self, path: str, resolution: Optional[int] = None, use_pyspng: bool = True,
                 exclude: Sequence[str] = (), **super_kwargs):
        self._path = str(path)
        self._use_pyspng = use_pyspng
        self._zipfile = None
        self._zipfile_pid = None  # process that opened self._zipfile

        self._kind, self._members = self._scan()
        PIL.Image.init()
        self._image_names = sorted(f for f in self._members if _extension(f) in PIL.Image.EXTENSION
                                   and f not in exclude)
        if not self._image_names:
            raise DatasetError(f'{self._path}: no image files found')

        # The first image fixes the shape every other image is checked against.
        raw_shape = [len(self._image_names)] + list(self._load_raw_image(0).shape)
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise DatasetError(f'{self._path}: images are {raw_shape[3]}x{raw_shape[2]}, but resolution={resolution} '
                          f'was requested; use a dataset made with dataset_tool.py --resolution='
                          f'{resolution}x{resolution}, or leave resolution unset')
        name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _scan(self) -> tuple[str, set]:
        """('dir' | 'zip', set of member names with '/' separators)."""
        if os.path.isdir(self._path):
            return 'dir', {os.path.relpath(os.path.join(root, fname), start=self._path).replace(os.sep, '/')
                           for root, _dirs, files in os.walk(self._path) for fname in files}
        if _extension(self._path) != '.zip':
            raise DatasetError(f'{self._path}: path must point to a directory or a .zip (made by dataset_tool.py)')
        if not os.path.isfile(self._path):
            raise DatasetError(f'{self._path}: dataset not found; create it with dataset_tool.py')
        self._kind = 'zip'
        try:
            return 'zip', set(self._zip().namelist())
        except zipfile.BadZipFile as e:
            raise DatasetError(f'{self._path}: not a valid zip file ({e}); re-create it with dataset_tool.py') from e

    def _zip(self) -> zipfile.ZipFile:
        assert self._kind == 'zip'
        # A ZipFile inherited through fork shares its OS file offset with the parent and siblings, so
        # concurrent reads would interleave: each process opens its own handle on first use.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_member(self, fname: str):
        if self._kind == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._zip().open(fname, 'r')

    def close(self):
        try:
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None
            self._zipfile_pid = None

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _describe(self, raw_idx: int) -> str:
        return f'{self._path}:{self._image_names[raw_idx]}'

    def _decode(self, fname: str) -> np.ndarray:
        with self._open_member(fname) as f:
            if self._use_pyspng and _extension(fname) == '.png' and _get_pyspng() is not None:
                return _get_pyspng().load(f.read())
            with PIL.Image.open(f) as img:
                return _image_array(img)

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_names[raw_idx]
        try:
            pixels = self._decode(fname)
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as e:
            reason = ('not a readable image' if isinstance(e, PIL.UnidentifiedImageError)
                      else ' '.join(str(e).split()) or type(e).__name__)
            raise DatasetError(f'{self._path}:{fname}: cannot read image ({reason}); the dataset is damaged: '
                               f're-create it with dataset_tool.py') from e
        if pixels.ndim == 2:
            pixels = pixels[:, :, np.newaxis]  # grayscale: add the channel axis
        return pixels.transpose(2, 0, 1)  # HWC -> CHW

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        if 'dataset.json' not in self._members:
            return None
        try:
            with self._open_member('dataset.json') as f:
                pairs = json.load(f)['labels']
            by_name = None if pairs is None else dict(pairs)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            raise DatasetError(f'{self._path}: dataset.json is not a valid label file ({type(e).__name__}: '
                               f'{" ".join(str(e).split())}); re-create the dataset with dataset_tool.py') from e
        if by_name is None:
            return None
        missing = [fname for fname in self._image_names if fname not in by_name]
        if missing:
            raise DatasetError(f'{self._path}: dataset.json has no label for {missing[0]} ({len(missing)} image(s) '
                          f'unlabelled); fix dataset.json or train without labels')
        labels = np.array([by_name[fname] for fname in self._image_names])
        # Scalars are class indices (one-hot later); lists are label vectors used as they are.
        return labels.astype({1: np.int64, 2: np.float32}[labels.ndim])

# ----------------------------------------------------------------------------
