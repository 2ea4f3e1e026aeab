"""Convert image datasets into the layout EDM trains from: an uncompressed zip (or folder) of PNGs.

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
    python dataset_tool.py --source=downloads/imagenet/train --dest=datasets/imagenet-64x64.zip \\
        --resolution=64x64 --transform=center-crop-dhariwal

Output: `00000/img00000000.png`, `00000/img00000001.png`, ... (a folder per 1000 images; an image that
a transform rejects leaves a gap in the numbering) and `dataset.json` = `{"labels": [[name, int], ...]}`, or
`{"labels": null}` when any image has no label. The published FID reference statistics assume exactly
these pixels, so the crop/resize arithmetic below reproduces the paper's tool bit for bit.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Iterator, Optional

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

# ----------------------------------------------------------------------------
# Errors.


class DatasetToolError(click.ClickException):
    """A one-line user-facing error (click prints 'Error: <message>' without a traceback)."""


def error(msg: str):
    raise DatasetToolError(msg)


# ----------------------------------------------------------------------------
# Small helpers.


def parse_tuple(s: str) -> tuple[int, int]:
    """'512x512' or '512,512' -> (512, 512)."""
    m = re.match(r'^(\d+)[x,](\d+)$', s)
    if not m:
        raise ValueError(f'cannot parse tuple {s!r}')
    return int(m.group(1)), int(m.group(2))


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def is_image_ext(fname: str) -> bool:
    """Any extension Pillow can read (the same rule the training loader uses)."""
    PIL.Image.init()
    return ('.' + str(fname).split('.')[-1].lower()) in PIL.Image.EXTENSION


def archive_fname(idx: int) -> str:
    """Member name of the idx-th source image: '00000/img00000000.png' (a folder per 1000 images)."""
    idx_str = f'{idx:08d}'
    return f'{idx_str[:5]}/img{idx_str}.png'


def image_to_array(img: PIL.Image.Image) -> np.ndarray:
    """PIL image -> uint8 array, HxW (grayscale) or HxWx3 (color).

    Grayscale stays 1 channel (as in the paper's tool; the crop transforms make it RGB). Alpha is dropped
    (RGBA -> RGB, LA -> L), palette images are expanded to their RGB colours, 16-bit grayscale keeps its
    8 most significant bits, and other colour spaces (CMYK, YCbCr, ...) are converted to RGB.
    """
    mode = img.mode
    if mode in ('L', 'RGB'):
        return np.asarray(img, dtype=np.uint8)
    if mode in ('1', 'LA', 'La'):
        return np.asarray(img.convert('L'), dtype=np.uint8)
    if mode.startswith('I'):  # 'I;16*', or 'I' holding 16-bit PNG samples (older Pillow).
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f'unsupported pixel format {mode} with values outside 0..65535; convert to 8-bit')
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    if mode == 'F':
        raise ValueError('unsupported pixel format F (floating point); convert the image to 8-bit RGB or grayscale')
    return np.asarray(img.convert('RGB'), dtype=np.uint8)


def load_image(file, name: str) -> np.ndarray:
    """Decode one image file (path or file object); a corrupt or unreadable file is a one-line error."""
    try:
        with PIL.Image.open(file) as img:
            img.load()  # Decode now, so truncated files fail here and not later.
            return image_to_array(img)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        error(f'{name}: cannot read image ({type(e).__name__}: {e})')


# ----------------------------------------------------------------------------
# Sources. Each opener returns (number of images, iterator of dict(img=HxW[xC] uint8, label=int|None,
# source=name for messages)). Nothing is decoded until the iterator runs.

Source = tuple[int, Iterator[dict]]


def _clamp(n: int, max_images: Optional[int]) -> int:
    return n if max_images is None else min(n, max_images)


def _labels_from_json(data: dict, name: str) -> dict:
    try:
        labels = data['labels']
    except (TypeError, KeyError):
        error(f'{name}: expected {{"labels": [[name, label], ...]}} or {{"labels": null}}')
    if labels is None:
        return {}
    try:
        return {str(x[0]): x[1] for x in labels}
    except (TypeError, IndexError):
        error(f'{name}: "labels" must be a list of [name, label] pairs')


def open_image_folder(source_dir: str, *, max_images: Optional[int] = None) -> Source:
    """A folder of images, searched recursively.

    Labels come from `dataset.json` at the root; without it, images in several top-level folders are
    labelled by the index of their folder name in sorted order (e.g. ImageNet/AFHQ class folders).
    """
    root = pathlib.Path(source_dir)
    # Sort by path components, as the paper's tool does (differs from plain string order for e.g. 'a-b/x'
    # vs 'a/x'); this fixes which image gets which index.
    files = sorted((p for p in root.rglob('*') if is_image_ext(p.name) and p.is_file()),
                   key=lambda p: p.relative_to(root).parts)
    arch_fnames = {f: f.relative_to(root).as_posix() for f in files}

    labels = {}
    meta_fname = root / 'dataset.json'
    if meta_fname.is_file():
        try:
            data = json.loads(meta_fname.read_text())
        except (OSError, ValueError) as e:
            error(f'{meta_fname}: cannot read labels ({e})')
        labels = _labels_from_json(data, str(meta_fname))
    if len(labels) == 0:
        toplevel = {a: (a.split('/')[0] if '/' in a else '') for a in arch_fnames.values()}
        class_idx = {name: i for i, name in enumerate(sorted(set(toplevel.values())))}
        if len(class_idx) > 1:
            labels = {a: class_idx[t] for a, t in toplevel.items()}

    max_idx = _clamp(len(files), max_images)

    def iterate_images():
        for f in files[:max_idx]:
            yield dict(img=load_image(f, str(f)), label=labels.get(arch_fnames[f]), source=str(f))
    return max_idx, iterate_images()


def open_image_zip(source: str, *, max_images: Optional[int] = None) -> Source:
    """A zip of images (members in sorted order); labels from its `dataset.json`, if any."""
    try:
        with zipfile.ZipFile(source, mode='r') as z:
            names = z.namelist()
            input_images = sorted(n for n in names if is_image_ext(n) and not n.endswith('/'))
            labels = {}
            if 'dataset.json' in names:
                try:
                    data = json.loads(z.read('dataset.json'))
                except ValueError as e:
                    error(f'{source}: cannot read dataset.json ({e})')
                labels = _labels_from_json(data, f'{source}:dataset.json')
    except (zipfile.BadZipFile, OSError) as e:
        error(f'{source}: cannot read zip archive ({e})')
    max_idx = _clamp(len(input_images), max_images)

    def iterate_images():
        with zipfile.ZipFile(source, mode='r') as z:
            for fname in input_images[:max_idx]:
                name = f'{source}:{fname}'
                try:
                    data = z.read(fname)
                except Exception as e:  # CRC errors, truncated members
                    error(f'{name}: cannot read image ({type(e).__name__}: {e})')
                yield dict(img=load_image(io.BytesIO(data), name), label=labels.get(fname), source=name)
    return max_idx, iterate_images()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of lists, bytes and numpy arrays) and nothing else, so a
    tampered tarball cannot run code."""
    _allowed = {
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
        ('_codecs', 'encode'),
    }

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'unexpected object {module}.{name} in CIFAR-10 batch')


def _get_key(d: dict, key: str):
    return d[key] if key in d else d[key.encode()]  # Python 2 pickles may have bytes keys.


def open_cifar10(tarball: str, *, max_images: Optional[int] = None) -> Source:
    """The official `cifar-10-python.tar.gz`: the five training batches, with class labels 0..9."""
    images, labels = [], []
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for batch in range(1, 6):
                member = f'cifar-10-batches-py/data_batch_{batch}'
                try:
                    f = tar.extractfile(tar.getmember(member))
                except KeyError:
                    error(f'{tarball}: member {member} not found; is this the official CIFAR-10 python tarball?')
                data = _NumpyOnlyUnpickler(f, encoding='latin1').load()
                x = np.asarray(_get_key(data, 'data'), dtype=np.uint8)
                y = np.asarray(_get_key(data, 'labels'), dtype=np.int64)
                if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],):
                    error(f'{tarball}: {member} has data {list(x.shape)} and labels {list(y.shape)}; '
                          f'expected [N, 3072] and [N]')
                images.append(x.reshape(-1, 3, 32, 32))
                labels.append(y)
    except DatasetToolError:
        raise
    except Exception as e:  # tarfile.ReadError, EOFError, zlib errors, UnpicklingError, KeyError
        error(f'{tarball}: cannot read CIFAR-10 archive ({type(e).__name__}: {e})')
    images = np.concatenate(images).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    labels = np.concatenate(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        error(f'{tarball}: labels must be in 0..9, got {labels.min()}..{labels.max()}')
    max_idx = _clamp(len(images), max_images)

    def iterate_images():
        for idx in range(max_idx):
            yield dict(img=images[idx], label=int(labels[idx]), source=f'{tarball}[{idx}]')
    return max_idx, iterate_images()


def _read_idx(fname: str, magic: int, what: str) -> np.ndarray:
    """An IDX file (MNIST's format: big-endian magic, dims, then uint8 data), gzipped or not."""
    opener = gzip.open if fname.endswith('.gz') else open
    try:
        with opener(fname, 'rb') as f:
            raw = f.read()
    except FileNotFoundError:
        error(f'{fname}: {what} file not found (MNIST needs the images and the labels file side by side)')
    except Exception as e:
        error(f'{fname}: cannot read {what} ({type(e).__name__}: {e})')
    ndim = magic & 0xff
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], 'big') != magic:
        error(f'{fname}: not an MNIST {what} file (bad IDX header)')
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        error(f'{fname}: header says {shape} but file holds {data.size} bytes of data')
    return data.reshape(shape)


MNIST_IMAGES_SUFFIXES = ('-images-idx3-ubyte.gz', '-images-idx3-ubyte')


def open_mnist(images_file: str, *, max_images: Optional[int] = None) -> Source:
    """MNIST `train-` or `t10k-images-idx3-ubyte.gz` plus its `-labels-idx1-ubyte.gz`; 28x28 digits are
    zero-padded to 32x32 (a power of two)."""
    suffix = next(s for s in MNIST_IMAGES_SUFFIXES if images_file.endswith(s))
    labels_file = images_file[:-len(suffix)] + suffix.replace('-images-idx3-', '-labels-idx1-')
    images = _read_idx(images_file, 0x803, 'images')
    labels = _read_idx(labels_file, 0x801, 'labels').astype(np.int64)
    if images.shape[1:] != (28, 28):
        error(f'{images_file}: images are {images.shape[1]}x{images.shape[2]}; expected 28x28')
    if labels.shape[0] != images.shape[0]:
        error(f'{labels_file}: {labels.shape[0]} labels for {images.shape[0]} images in {images_file}')
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)], 'constant', constant_values=0)
    max_idx = _clamp(len(images), max_images)

    def iterate_images():
        for idx in range(max_idx):
            yield dict(img=images[idx], label=int(labels[idx]), source=f'{images_file}[{idx}]')
    return max_idx, iterate_images()


def open_lmdb(lmdb_dir: str, *, max_images: Optional[int] = None) -> Source:
    """An LSUN `*_lmdb` folder (needs the optional `lmdb` package; uses OpenCV to decode when installed).

    As in the paper's tool, LSUN entries that fail to decode (the official dumps contain a few) are
    skipped with a warning rather than aborting a multi-hour conversion.
    """
    try:
        import lmdb  # Optional dependency: pip install lmdb
    except ImportError:
        error(f'{lmdb_dir}: reading LSUN lmdb folders needs the optional "lmdb" package (pip install lmdb)')
    try:
        import cv2  # Optional: the paper's tool decodes with OpenCV; Pillow is the fallback.
    except ImportError:
        cv2 = None

    def decode(value: bytes) -> Optional[np.ndarray]:
        if cv2 is not None:
            img = cv2.imdecode(np.frombuffer(value, dtype=np.uint8), 1)
            if img is not None:
                return img[:, :, ::-1]  # BGR -> RGB
        with PIL.Image.open(io.BytesIO(value)) as img:
            img.load()
            return image_to_array(img)

    try:
        with lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False) as txn:
            max_idx = _clamp(txn.stat()['entries'], max_images)
    except Exception as e:
        error(f'{lmdb_dir}: cannot open lmdb ({type(e).__name__}: {e})')

    def iterate_images():
        if max_idx == 0:
            return
        with lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False) as txn:
            for idx, (key, value) in enumerate(txn.cursor()):
                try:
                    img = decode(value)
                except Exception as e:
                    tqdm.write(f'warning: {lmdb_dir}: skipping undecodable entry {key!r} ({e})', file=sys.stderr)
                else:
                    yield dict(img=img, label=None, source=f'{lmdb_dir}[{key!r}]')
                if idx >= max_idx - 1:
                    break
    return max_idx, iterate_images()


def open_dataset(source: str, *, max_images: Optional[int] = None) -> Source:
    """Pick the reader from --source: a folder (`*_lmdb` = LSUN), CIFAR-10 tarball, MNIST idx, or zip."""
    source = str(source)
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb'):
            return open_lmdb(source, max_images=max_images)
        return open_image_folder(source, max_images=max_images)
    if os.path.isfile(source):
        base = os.path.basename(source)
        if base == 'cifar-10-python.tar.gz':
            return open_cifar10(source, max_images=max_images)
        if base.endswith(MNIST_IMAGES_SUFFIXES):
            return open_mnist(source, max_images=max_images)
        if base.lower().endswith('.zip'):
            return open_image_zip(source, max_images=max_images)
        error(f'{source}: unknown archive type; expected a folder, a .zip of images, cifar-10-python.tar.gz, '
              f'*-images-idx3-ubyte.gz (MNIST) or an LSUN *_lmdb folder')
    error(f'{source}: missing input file or directory (--source)')


# ----------------------------------------------------------------------------
# Transforms: HxW[xC] uint8 -> HxWxC uint8, or None to skip the image. The slicing and the single PIL
# LANCZOS resize (no box, no reducing_gap) are what pin the output pixels to the paper's.


def _gray_to_rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[:, :, np.newaxis], 3, axis=2) if img.ndim == 2 else img


def scale(width: Optional[int], height: Optional[int], img: np.ndarray) -> np.ndarray:
    """No --transform: resize to --resolution (if given and different), keeping the channel count."""
    h, w = img.shape[:2]
    ww = w if width is None else width
    hh = h if height is None else height
    if (ww, hh) == (w, h):
        return img
    return np.array(PIL.Image.fromarray(img).resize((ww, hh), PIL.Image.LANCZOS))


def center_crop(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """Largest centred square, then LANCZOS to width x height. Output is always RGB."""
    crop = min(img.shape[:2])
    y0, y1 = (img.shape[0] - crop) // 2, (img.shape[0] + crop) // 2
    x0, x1 = (img.shape[1] - crop) // 2, (img.shape[1] + crop) // 2
    img = _gray_to_rgb(img[y0:y1, x0:x1])
    return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.LANCZOS))


def center_crop_wide(width: int, height: int, img: np.ndarray) -> Optional[np.ndarray]:
    """Keep the full width, crop the height to the width x height aspect, resize, and letterbox into a
    width x width black canvas. Images too small for the output are skipped (None)."""
    ch = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or ch < height:
        return None
    img = _gray_to_rgb(img[(img.shape[0] - ch) // 2: (img.shape[0] + ch) // 2])
    img = np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2: (width + height) // 2, :] = img
    return canvas


def center_crop_dhariwal(image_size: int, img: np.ndarray) -> np.ndarray:
    """The ADM (Dhariwal & Nichol) ImageNet crop: halve with BOX filtering while the short side is at
    least twice the target, BICUBIC-resize the short side to image_size, then centre-crop. Output RGB."""
    pil = PIL.Image.fromarray(_gray_to_rgb(img))
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.BOX)
    s = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(x * s) for x in pil.size), resample=PIL.Image.BICUBIC)
    arr = np.array(pil)
    y0 = (arr.shape[0] - image_size) // 2
    x0 = (arr.shape[1] - image_size) // 2
    return arr[y0: y0 + image_size, x0: x0 + image_size]


TRANSFORMS = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')


def make_transform(transform: Optional[str], output_width: Optional[int],
                   output_height: Optional[int]) -> Callable[[np.ndarray], Optional[np.ndarray]]:
    """Validate --transform/--resolution up front and return the per-image function."""
    if output_width is not None and output_height is not None:
        if output_width < 1 or output_height < 1:
            error(f'--resolution={output_width}x{output_height}: width and height must be positive')
        # The dataset must be square and power-of-two; catch an impossible --resolution before any work.
        if not is_power_of_two(output_width):
            error(f'--resolution={output_width}x{output_height}: width must be a power of two (e.g. 32, 64, 256)')
        if transform != 'center-crop-wide' and output_width != output_height:
            error(f'--resolution={output_width}x{output_height}: output must be square '
                  f'(use --transform=center-crop-wide for letterboxed wide images)')
        if transform == 'center-crop-wide' and output_height > output_width:
            error(f'--resolution={output_width}x{output_height}: center-crop-wide needs height <= width')
    if transform is None:
        return functools.partial(scale, output_width, output_height)
    if output_width is None or output_height is None:
        error(f'--transform={transform} needs --resolution=WxH')
    if transform == 'center-crop':
        return functools.partial(center_crop, output_width, output_height)
    if transform == 'center-crop-wide':
        return functools.partial(center_crop_wide, output_width, output_height)
    if transform == 'center-crop-dhariwal':
        return functools.partial(center_crop_dhariwal, output_width)
    error(f'--transform={transform}: unknown transform; expected one of {", ".join(TRANSFORMS)}')


# ----------------------------------------------------------------------------
# Destinations: written under a temporary name next to --dest and renamed into place by commit(), so a
# failed or interrupted conversion never leaves a half-written dataset at --dest.


class ZipDest:
    """Uncompressed zip (ZIP_STORED: the loader reads members without inflating)."""

    def __init__(self, dest: str):
        self.dest = dest
        parent = os.path.dirname(os.path.abspath(dest))
        if os.path.isdir(dest):
            error(f'{dest}: --dest ends in .zip but is an existing folder')
        os.makedirs(parent, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=parent, prefix=f'.{os.path.basename(dest)}.', suffix='.tmp')
        os.close(fd)
        self.zf = zipfile.ZipFile(self.tmp, mode='w', compression=zipfile.ZIP_STORED)

    def write(self, fname: str, data: bytes):
        info = zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0))  # Fixed time: reproducible zips.
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        self.zf.writestr(info, data)

    def commit(self):
        self.zf.close()
        os.chmod(self.tmp, 0o644 & ~_umask())
        os.replace(self.tmp, self.dest)

    def abort(self):
        try:
            self.zf.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


class FolderDest:
    """A folder of PNGs + dataset.json. --dest must be missing or empty."""

    def __init__(self, dest: str):
        self.dest = dest
        if os.path.exists(dest) and not os.path.isdir(dest):
            error(f'{dest}: --dest exists and is not a folder; use a new folder or a .zip name')
        if os.path.isdir(dest) and len(os.listdir(dest)) != 0:
            error(f'{dest}: --dest folder must be empty')
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(os.path.abspath(dest))}.', suffix='.tmp')

    def write(self, fname: str, data: bytes):
        path = os.path.join(self.tmp, fname)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)

    def commit(self):
        if os.path.isdir(self.dest):
            os.rmdir(self.dest)  # Empty (checked above); rmdir fails loudly if someone wrote into it meanwhile.
        os.chmod(self.tmp, 0o777 & ~_umask())
        os.replace(self.tmp, self.dest)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_dest(dest: str):
    return ZipDest(dest) if str(dest).lower().endswith('.zip') else FolderDest(dest)


# ----------------------------------------------------------------------------


def encode_png(img: np.ndarray) -> bytes:
    """Uncompressed PNG (compress_level=0): fast to write and to decode during training."""
    bits = io.BytesIO()
    PIL.Image.fromarray(img).save(bits, format='png', compress_level=0, optimize=False)
    return bits.getvalue()


def _check_image(img: np.ndarray, name: str, ref: Optional[dict]) -> dict:
    """Every output image must share one square power-of-two size and 1 or 3 channels."""
    channels = img.shape[2] if img.ndim == 3 else 1
    attrs = dict(width=img.shape[1], height=img.shape[0], channels=channels)
    if ref is None:
        w, h = attrs['width'], attrs['height']
        if w != h:
            error(f'{name}: image is {w}x{h} after scale and crop, but dataset images must be square '
                  f'(use --transform=center-crop --resolution=NxN)')
        if not is_power_of_two(w):
            error(f'{name}: image is {w}x{h} after scale and crop, but width/height must be a power of two '
                  f'(use --resolution=NxN, e.g. 32x32)')
        if channels not in (1, 3):
            error(f'{name}: image has {channels} channels; dataset images must be RGB or grayscale')
    elif attrs != ref:
        error(f'{name}: image is {attrs["width"]}x{attrs["height"]} with {attrs["channels"]} channel(s) after '
              f'scale and crop, but earlier images are {ref["width"]}x{ref["height"]} with {ref["channels"]}; '
              f'all images must match (use --resolution and/or --transform)')
    return attrs


def convert_dataset(source: str, dest: str, max_images: Optional[int] = None, transform: Optional[str] = None,
                    resolution: Optional[tuple[int, int]] = None, progress: bool = True) -> dict:
    """Convert --source into --dest; returns the written dataset.json dict. Raises DatasetToolError."""
    if max_images is not None and max_images < 1:
        error(f'--max-images={max_images}: must be at least 1')
    width, height = resolution if resolution is not None else (None, None)
    transform_image = make_transform(transform, width, height)
    num_files, input_iter = open_dataset(source, max_images=max_images)
    if num_files == 0:
        error(f'{source}: no images found')

    writer = open_dest(dest)
    try:
        ref_attrs = None
        labels = []
        for idx, image in tqdm(enumerate(input_iter), total=num_files, disable=not progress, unit='img',
                               dynamic_ncols=True):
            fname = archive_fname(idx)
            img = transform_image(image['img'])
            if img is None:  # Rejected by center-crop-wide (too small); its index stays unused.
                continue
            ref_attrs = _check_image(img, image['source'], ref_attrs)
            writer.write(fname, encode_png(img))
            labels.append([fname, image['label']] if image['label'] is not None else None)
        if ref_attrs is None:
            error(f'{source}: no image survived --transform={transform} (all were too small for '
                  f'{width}x{height})')
        metadata = {'labels': labels if all(x is not None for x in labels) else None}
        writer.write('dataset.json', json.dumps(metadata).encode('utf-8'))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return metadata


# ----------------------------------------------------------------------------


def _parse_resolution(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_tuple(value)
    except ValueError:
        raise click.BadParameter(f'{value!r}: expected WxH, e.g. 64x64')


@click.command()
@click.option('--source', help='Input directory or archive name', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output directory or archive name', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT', type=int)
@click.option('--transform', help='Input crop/resize mode', metavar='MODE', type=click.Choice(TRANSFORMS))
@click.option('--resolution', help='Output resolution (e.g., 512x512)', metavar='WxH', callback=_parse_resolution)
def main(source: str, dest: str, max_images: Optional[int], transform: Optional[str],
         resolution: Optional[tuple[int, int]]):
    """Convert an image dataset into a zip or folder of PNGs that train.py reads.

    \b
    --source is recognised by its name:
      cifar-10-python.tar.gz          CIFAR-10 training set (50k images, class labels)
      *-images-idx3-ubyte.gz          MNIST train/t10k with its *-labels-idx1-ubyte.gz (padded to 32x32)
      *_lmdb/                         LSUN (optional dependency: pip install lmdb)
      a folder                        every image below it, recursively
      *.zip                           every image in the archive

    \b
    --dest is a folder (must be new or empty) or a *.zip (written uncompressed). Images are stored
    as 00000/img00000000.png, ... (one folder per 1000) with labels in dataset.json:
      {"labels": [["00000/img00000000.png", 6], ...]}   or   {"labels": null}
    A folder source takes its labels from its own dataset.json, else from its top-level folder
    names when there are several (class folders).

    \b
    All output images must be square with the same power-of-two size and 1 or 3 channels.
    --resolution=WxH alone resizes every image (LANCZOS). --transform=center-crop crops the largest
    centred square first; center-crop-wide keeps the full width, crops to W:H and letterboxes into a
    WxW canvas (e.g. --resolution=512x384 for LSUN cars); center-crop-dhariwal is the ADM ImageNet
    crop (e.g. --resolution=64x64). Crop transforms output RGB.

    \b
    Example:
      python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz \\
          --dest=datasets/cifar10-32x32.zip
    """
    try:
        convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)
    except OSError as e:  # e.g. disk full or permission denied while writing --dest
        raise DatasetToolError(f'{e.filename or dest}: {e.strerror or e}')


if __name__ == '__main__':
    main()
