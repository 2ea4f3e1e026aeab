"""Training datasets: images stored by dataset_tool.py as a zip or folder of PNGs (+ dataset.json labels).

`ds[i] -> (image, label)`: image is uint8 CHW numpy, label float32 numpy (one-hot for integer class
labels, empty when unlabelled). Datasets are picklable and re-open their zip in each process, so they
work with DataLoader worker processes (fork or spawn) and any sampler (DistributedSampler,
torch_utils.misc.InfiniteSampler).
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Optional

import numpy as np
import PIL.Image
import torch

import dnnlib

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

# ----------------------------------------------------------------------------


class Dataset(torch.utils.data.Dataset):
    """Abstract base: subclasses provide `_load_raw_image(raw_idx)` (uint8 CHW) and `_load_raw_labels()`
    (int64 [N] class indices, float32 [N, D] vectors, or None).

    `max_size` keeps a fixed random subset (same seed -> same subset, in ascending raw order);
    `xflip` appends a horizontally mirrored copy of every image (len doubles); `cache` keeps decoded
    images in memory (per process).
    """

    def __init__(self,
        name: str,                      # Name of the dataset.
        raw_shape: list,                # Shape of the raw image data (NCHW).
        max_size: Optional[int] = None, # Artificially limit the size of the dataset. None = no limit.
        use_labels: bool = False,       # Enable conditioning labels? False = label dimension is zero.
        xflip: bool = False,            # Artificially double the size of the dataset via x-flips.
        random_seed: int = 0,           # Random seed to use when applying max_size.
        cache: bool = False,            # Cache images in CPU memory?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict()  # {raw_idx: np.ndarray}
        self._raw_labels = None
        self._label_shape = None

        # max_size: a seeded shuffle then the first max_size indices, sorted for sequential reads.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if (max_size is not None) and (self._raw_idx.size > max_size):
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # xflip: the second half repeats the indices with the mirror flag set.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            self._raw_labels = self._load_raw_labels() if self._use_labels else None
            if self._raw_labels is None:
                self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(self._raw_labels, np.ndarray)
            assert self._raw_labels.shape[0] == self._raw_shape[0]
            assert self._raw_labels.dtype in [np.float32, np.int64]
            if self._raw_labels.dtype == np.int64:
                assert self._raw_labels.ndim == 1
                assert np.all(self._raw_labels >= 0)
        return self._raw_labels

    def close(self):  # To be overridden by subclass.
        pass

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:  # To be overridden by subclass.
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:  # To be overridden by subclass.
        raise NotImplementedError

    def __getstate__(self):
        # Labels are re-read lazily in each worker instead of being pickled along.
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        assert isinstance(image, np.ndarray)
        if list(image.shape) != self.image_shape or image.dtype != np.uint8:
            raise ValueError(f'{self._describe(raw_idx)}: image is {image.dtype} {list(image.shape)} (CHW), '
                             f'but the dataset is uint8 {self.image_shape}; re-create it with dataset_tool.py')
        if self._xflip[idx]:
            assert image.ndim == 3  # CHW
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def _describe(self, raw_idx: int) -> str:
        return f'{self._name}[{raw_idx}]'

    def get_label(self, idx: int) -> np.ndarray:
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        d = dnnlib.EasyDict()
        d.raw_idx = int(self._raw_idx[idx])
        d.xflip = (int(self._xflip[idx]) != 0)
        d.raw_label = self._get_raw_labels()[d.raw_idx].copy()
        return d

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list:  # [CHW]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        assert self.image_shape[1] == self.image_shape[2], f'{self._name}: images are not square'
        return self.image_shape[1]

    @property
    def label_shape(self) -> list:
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = raw_labels.shape[1:]
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64

# ----------------------------------------------------------------------------


def _image_array(img: PIL.Image.Image) -> np.ndarray:
    """PIL image -> HxW or HxWx3 uint8 (dataset_tool writes only L/RGB; others are converted sensibly)."""
    if img.mode in ('L', 'RGB'):
        return np.asarray(img)
    if img.mode in ('1', 'LA'):
        return np.asarray(img.convert('L'))
    return np.asarray(img.convert('RGB'))


class ImageFolderDataset(Dataset):
    """Dataset for a folder or zip of images (as written by dataset_tool.py), in sorted-name order."""

    def __init__(self,
        path: str,                      # Path to directory or zip.
        resolution: Optional[int] = None, # Ensure specific resolution, None = highest available.
        use_pyspng: bool = True,        # Use pyspng if available?
        **super_kwargs,                 # Additional arguments for the Dataset base class.
    ):
        self._path = str(path)
        self._use_pyspng = use_pyspng
        self._zipfile = None
        self._zipfile_pid = None

        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path).replace(os.sep, '/')
                                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif self._file_ext(self._path) == '.zip':
            if not os.path.isfile(self._path):
                raise IOError(f'{self._path}: dataset not found; create it with dataset_tool.py')
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except zipfile.BadZipFile as e:
                raise IOError(f'{self._path}: not a valid zip file ({e})') from e
        else:
            raise IOError(f'{self._path}: path must point to a directory or a .zip (made by dataset_tool.py)')

        PIL.Image.init()
        self._image_fnames = sorted(fname for fname in self._all_fnames if self._file_ext(fname) in PIL.Image.EXTENSION)
        if len(self._image_fnames) == 0:
            raise IOError(f'{self._path}: no image files found')

        name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise IOError(f'{self._path}: images are {raw_shape[3]}x{raw_shape[2]}, but resolution={resolution} '
                          f'was requested; use a dataset made with dataset_tool.py --resolution='
                          f'{resolution}x{resolution}, or leave resolution unset')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    @staticmethod
    def _file_ext(fname: str) -> str:
        return os.path.splitext(fname)[1].lower()

    def _get_zipfile(self) -> zipfile.ZipFile:
        assert self._type == 'zip'
        # A ZipFile inherited through fork shares its OS file offset with the parent and siblings, so
        # concurrent reads would interleave: each process opens its own handle on first use.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname: str):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        if self._type == 'zip':
            return self._get_zipfile().open(fname, 'r')
        return None

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
        return f'{self._path}:{self._image_fnames[raw_idx]}'

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                if self._use_pyspng and self._file_ext(fname) == '.png' and _get_pyspng() is not None:
                    image = _get_pyspng().load(f.read())
                else:
                    with PIL.Image.open(f) as img:
                        image = _image_array(img)
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as e:
            raise IOError(f'{self._path}:{fname}: cannot read image ({e})') from e
        if image.ndim == 2:
            image = image[:, :, np.newaxis]  # HW => HWC
        return image.transpose(2, 0, 1)  # HWC => CHW

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        with self._open_file(fname) as f:
            labels = json.load(f)['labels']
        if labels is None:
            return None
        labels = dict(labels)
        missing = [fname for fname in self._image_fnames if fname not in labels]
        if missing:
            raise IOError(f'{self._path}: dataset.json has no label for {missing[0]} ({len(missing)} image(s) '
                          f'unlabelled); fix dataset.json or train without labels')
        labels = np.array([labels[fname] for fname in self._image_fnames])
        labels = labels.astype({1: np.int64, 2: np.float32}[labels.ndim])
        return labels

# ----------------------------------------------------------------------------
