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
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Iterator, NamedTuple, Optional

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib

# ----------------------------------------------------------------------------
# Errors.


class DatasetToolError(click.ClickException):
    """A one-line user-facing error (click prints 'Error: <message>' without a traceback)."""


def _fail(msg: str):
    """Abort the conversion with a one-line message."""
    raise DatasetToolError(msg)


# ----------------------------------------------------------------------------
# Small helpers.


def _parse_size(text: str) -> tuple[int, int]:
    """'512x512' or '512,512' -> (width, height) = (512, 512)."""
    match = re.fullmatch(r'(\d+)[x,](\d+)', text)
    if match is None:
        raise ValueError(f'cannot parse tuple {text!r}')
    return int(match[1]), int(match[2])


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _has_image_extension(fname: str) -> bool:
    """Any extension Pillow can read (the same rule the training loader uses)."""
    PIL.Image.init()
    return ('.' + str(fname).split('.')[-1].lower()) in PIL.Image.EXTENSION


def archive_fname(idx: int) -> str:
    """Member name of the idx-th source image: '00000/img00000000.png' (a folder per 1000 images)."""
    digits = f'{idx:08d}'
    return f'{digits[:5]}/img{digits}.png'


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
        _fail(f'{name}: cannot read image ({type(e).__name__}: {e})')


# ----------------------------------------------------------------------------
# Readers, one per kind of --source. Each returns a _Source: the number of images it will produce (for
# the progress bar) and a lazy iterator of dict(img=HxW[xC] uint8, label=int|None, source=name for
# messages). Nothing is decoded until the iterator is consumed.


class _Source(NamedTuple):
    count: int
    items: Iterator[dict]


def _limit(total: int, max_images: Optional[int]) -> int:
    return total if max_images is None else min(total, max_images)


def _parse_label_list(data: dict, name: str) -> dict:
    """{"labels": [[name, label], ...]} -> {name: label}; {"labels": null} -> {}."""
    try:
        pairs = data['labels']
    except (TypeError, KeyError):
        _fail(f'{name}: expected {{"labels": [[name, label], ...]}} or {{"labels": null}}')
    if pairs is None:
        return {}
    try:
        return {str(pair[0]): pair[1] for pair in pairs}
    except (TypeError, IndexError):
        _fail(f'{name}: "labels" must be a list of [name, label] pairs')


def _folder_labels(root: pathlib.Path, rel_names: list) -> dict:
    """Labels of a folder source: its dataset.json if present and non-empty; otherwise, when the images sit
    in several top-level folders (ImageNet/AFHQ style class folders), the folder's rank in sorted order."""
    json_path = root / 'dataset.json'
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            _fail(f'{json_path}: cannot read labels ({e})')
        labels = _parse_label_list(data, str(json_path))
        if labels:
            return labels
    folder_of = {rel: (rel.split('/')[0] if '/' in rel else '') for rel in rel_names}
    class_names = sorted(set(folder_of.values()))
    if len(class_names) < 2:
        return {}
    class_index = {folder: idx for idx, folder in enumerate(class_names)}
    return {rel: class_index[folder] for rel, folder in folder_of.items()}


def _read_folder(source_dir: str, *, max_images: Optional[int] = None) -> _Source:
    """Every image below a folder, recursively."""
    root = pathlib.Path(source_dir)
    # Ordered by path components, not by the path string ('a-b/x' vs 'a/x' differ), as the paper's tool
    # orders them: this decides which image gets which output index.
    paths = sorted((p for p in root.rglob('*') if _has_image_extension(p.name) and p.is_file()),
                   key=lambda p: p.relative_to(root).parts)
    rel_name = {p: p.relative_to(root).as_posix() for p in paths}
    labels = _folder_labels(root, list(rel_name.values()))
    count = _limit(len(paths), max_images)
    items = (dict(img=load_image(p, str(p)), label=labels.get(rel_name[p]), source=str(p)) for p in paths[:count])
    return _Source(count, items)


def _read_zip(source: str, *, max_images: Optional[int] = None) -> _Source:
    """Every image in a zip, by sorted member name; labels from the archive's dataset.json, if any."""
    try:
        with zipfile.ZipFile(source, mode='r') as archive:
            members = archive.namelist()
            image_members = sorted(m for m in members if _has_image_extension(m) and not m.endswith('/'))
            labels = {}
            if 'dataset.json' in members:
                try:
                    data = json.loads(archive.read('dataset.json'))
                except ValueError as e:
                    _fail(f'{source}: cannot read dataset.json ({e})')
                labels = _parse_label_list(data, f'{source}:dataset.json')
    except (zipfile.BadZipFile, OSError) as e:
        _fail(f'{source}: cannot read zip archive ({e})')
    count = _limit(len(image_members), max_images)

    def items():
        with zipfile.ZipFile(source, mode='r') as archive:
            for member in image_members[:count]:
                name = f'{source}:{member}'
                try:
                    data = archive.read(member)
                except Exception as e:  # CRC errors, truncated members
                    _fail(f'{name}: cannot read image ({type(e).__name__}: {e})')
                yield dict(img=load_image(io.BytesIO(data), name), label=labels.get(member), source=name)
    return _Source(count, items())


def _labelled_arrays(images: np.ndarray, labels: np.ndarray, name: str) -> Iterator[dict]:
    for idx in range(len(images)):
        yield dict(img=images[idx], label=int(labels[idx]), source=f'{name}[{idx}]')


# The CIFAR-10 batches are dicts of lists, bytes and numpy arrays; nothing else may be unpickled, so a
# tampered tarball cannot run code.
_CIFAR10_GLOBALS = dnnlib.util.allow_exactly([
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
    ('_codecs', 'encode'),
])


def _batch_field(batch: dict, key: str):
    return batch[key] if key in batch else batch[key.encode()]  # Python 2 pickles may have bytes keys.


def _cifar10_batch(tar: tarfile.TarFile, tarball: str, number: int) -> tuple[np.ndarray, np.ndarray]:
    """Training batch `number` (1..5) as (uint8 [N, 3, 32, 32], int64 [N])."""
    member = f'cifar-10-batches-py/data_batch_{number}'
    try:
        f = tar.extractfile(tar.getmember(member))
    except KeyError:
        _fail(f'{tarball}: member {member} not found; is this the official CIFAR-10 python tarball?')
    batch = dnnlib.util.RestrictedUnpickler(f, _CIFAR10_GLOBALS, what='CIFAR-10 batch', encoding='latin1').load()
    pixels = np.asarray(_batch_field(batch, 'data'), dtype=np.uint8)
    classes = np.asarray(_batch_field(batch, 'labels'), dtype=np.int64)
    if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or classes.shape != (pixels.shape[0],):
        _fail(f'{tarball}: {member} has data {list(pixels.shape)} and labels {list(classes.shape)}; '
              f'expected [N, 3072] and [N]')
    return pixels.reshape(-1, 3, 32, 32), classes


def _read_cifar10(tarball: str, *, max_images: Optional[int] = None) -> _Source:
    """The official `cifar-10-python.tar.gz`: the five training batches, with class labels 0..9."""
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            batches = [_cifar10_batch(tar, tarball, number) for number in range(1, 6)]
    except DatasetToolError:
        raise
    except Exception as e:  # tarfile.ReadError, EOFError, zlib errors, UnpicklingError, KeyError
        _fail(f'{tarball}: cannot read CIFAR-10 archive ({type(e).__name__}: {e})')
    images = np.concatenate([pixels for pixels, _ in batches]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    labels = np.concatenate([classes for _, classes in batches])
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        _fail(f'{tarball}: labels must be in 0..9, got {labels.min()}..{labels.max()}')
    count = _limit(len(images), max_images)
    return _Source(count, _labelled_arrays(images[:count], labels[:count], tarball))


def _read_idx(fname: str, magic: int, what: str) -> np.ndarray:
    """An IDX file (MNIST's format: big-endian magic, dims, then uint8 data), gzipped or not."""
    opener = gzip.open if fname.endswith('.gz') else open
    try:
        with opener(fname, 'rb') as f:
            raw = f.read()
    except FileNotFoundError:
        _fail(f'{fname}: {what} file not found (MNIST needs the images and the labels file side by side)')
    except Exception as e:
        _fail(f'{fname}: cannot read {what} ({type(e).__name__}: {e})')
    ndim = magic & 0xff
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], 'big') != magic:
        _fail(f'{fname}: not an MNIST {what} file (bad IDX header)')
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        _fail(f'{fname}: header says {shape} but file holds {data.size} bytes of data')
    return data.reshape(shape)


MNIST_IMAGES_SUFFIXES = ('-images-idx3-ubyte.gz', '-images-idx3-ubyte')


def _read_mnist(images_file: str, *, max_images: Optional[int] = None) -> _Source:
    """MNIST `train-` or `t10k-images-idx3-ubyte.gz` plus its `-labels-idx1-ubyte.gz`; 28x28 digits are
    zero-padded to 32x32 (a power of two)."""
    suffix = next(s for s in MNIST_IMAGES_SUFFIXES if images_file.endswith(s))
    labels_file = images_file[:-len(suffix)] + suffix.replace('-images-idx3-', '-labels-idx1-')
    images = _read_idx(images_file, 0x803, 'images')
    labels = _read_idx(labels_file, 0x801, 'labels').astype(np.int64)
    if images.shape[1:] != (28, 28):
        _fail(f'{images_file}: images are {images.shape[1]}x{images.shape[2]}; expected 28x28')
    if labels.shape[0] != images.shape[0]:
        _fail(f'{labels_file}: {labels.shape[0]} labels for {images.shape[0]} images in {images_file}')
    images = np.pad(images, [(0, 0), (2, 2), (2, 2)], 'constant', constant_values=0)
    count = _limit(len(images), max_images)
    return _Source(count, _labelled_arrays(images[:count], labels[:count], images_file))


def _decode_lsun(value: bytes, cv2) -> np.ndarray:
    """One LSUN record (a JPEG/WebP blob). OpenCV when available, as the paper's tool used it, else Pillow."""
    if cv2 is not None:
        bgr = cv2.imdecode(np.frombuffer(value, dtype=np.uint8), 1)
        if bgr is not None:
            return bgr[:, :, ::-1]
    with PIL.Image.open(io.BytesIO(value)) as img:
        img.load()
        return image_to_array(img)


def _read_lsun_lmdb(lmdb_dir: str, *, max_images: Optional[int] = None) -> _Source:
    """An LSUN `*_lmdb` folder (needs the optional `lmdb` package; uses OpenCV to decode when installed).

    As in the paper's tool, LSUN entries that fail to decode (the official dumps contain a few) are
    skipped with a warning rather than aborting a multi-hour conversion.
    """
    try:
        import lmdb  # Optional dependency: pip install lmdb
    except ImportError:
        _fail(f'{lmdb_dir}: reading LSUN lmdb folders needs the optional "lmdb" package (pip install lmdb)')
    try:
        import cv2  # Optional: the paper's tool decodes with OpenCV; Pillow is the fallback.
    except ImportError:
        cv2 = None

    def open_txn():
        return lmdb.open(lmdb_dir, readonly=True, lock=False).begin(write=False)

    try:
        with open_txn() as txn:
            count = _limit(txn.stat()['entries'], max_images)
    except Exception as e:
        _fail(f'{lmdb_dir}: cannot open lmdb ({type(e).__name__}: {e})')

    def items():
        if count == 0:
            return
        with open_txn() as txn:
            # The first `count` records; an undecodable one is skipped (not replaced by a later record).
            for key, value in itertools.islice(txn.cursor(), count):
                try:
                    img = _decode_lsun(value, cv2)
                except Exception as e:
                    tqdm.write(f'warning: {lmdb_dir}: skipping undecodable entry {key!r} ({e})', file=sys.stderr)
                    continue
                yield dict(img=img, label=None, source=f'{lmdb_dir}[{key!r}]')
    return _Source(count, items())


def open_source(source: str, *, max_images: Optional[int] = None) -> _Source:
    """Pick the reader from --source: a folder (`*_lmdb` = LSUN), CIFAR-10 tarball, MNIST idx, or zip."""
    source = str(source)
    if os.path.isdir(source):
        reader = _read_lsun_lmdb if source.rstrip('/\\').endswith('_lmdb') else _read_folder
        return reader(source, max_images=max_images)
    if not os.path.isfile(source):
        _fail(f'{source}: missing input file or directory (--source)')
    base = os.path.basename(source)
    if base == 'cifar-10-python.tar.gz':
        return _read_cifar10(source, max_images=max_images)
    if base.endswith(MNIST_IMAGES_SUFFIXES):
        return _read_mnist(source, max_images=max_images)
    if base.lower().endswith('.zip'):
        return _read_zip(source, max_images=max_images)
    _fail(f'{source}: unknown archive type; expected a folder, a .zip of images, cifar-10-python.tar.gz, '
          f'*-images-idx3-ubyte.gz (MNIST) or an LSUN *_lmdb folder')


# ----------------------------------------------------------------------------
# Transforms: HxW[xC] uint8 -> HxWxC uint8, or None to skip the image. The slicing and the single PIL
# LANCZOS resize (no box, no reducing_gap) are what pin the output pixels to the paper's.


def _gray_to_rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[:, :, np.newaxis], 3, axis=2) if img.ndim == 2 else img


def _lanczos(img: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.LANCZOS))


def _resize_only(width: Optional[int], height: Optional[int], img: np.ndarray) -> np.ndarray:
    """No --transform: resize to --resolution (if given and different), keeping the channel count."""
    src_h, src_w = img.shape[:2]
    out_w = src_w if width is None else width
    out_h = src_h if height is None else height
    return img if (out_w, out_h) == (src_w, src_h) else _lanczos(img, out_w, out_h)


def _centered_span(length: int, keep: int) -> slice:
    """The middle `keep` of `length` samples (rounded towards the start when the difference is odd)."""
    return slice((length - keep) // 2, (length + keep) // 2)


def _crop_square(width: int, height: int, img: np.ndarray) -> np.ndarray:
    """center-crop: the largest centred square, then LANCZOS to width x height. Output is always RGB."""
    side = min(img.shape[:2])
    square = img[_centered_span(img.shape[0], side), _centered_span(img.shape[1], side)]
    return _lanczos(_gray_to_rgb(square), width, height)


def _crop_wide(width: int, height: int, img: np.ndarray) -> Optional[np.ndarray]:
    """center-crop-wide: keep the full width, crop the height to the width:height aspect, resize, and
    letterbox into a width x width black canvas. Images too small for the output are skipped (None)."""
    band_height = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or band_height < height:
        return None
    band = _gray_to_rgb(img[_centered_span(img.shape[0], band_height)])
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[_centered_span(width, height), :] = _lanczos(band, width, height)
    return canvas


def center_crop_dhariwal(image_size: int, img: np.ndarray) -> np.ndarray:
    """The ADM (Dhariwal & Nichol) ImageNet crop: halve with BOX filtering while the short side is at
    least twice the target, BICUBIC-resize the short side to image_size, then centre-crop. Output RGB."""
    pil = PIL.Image.fromarray(_gray_to_rgb(img))
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.BOX)
    factor = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(x * factor) for x in pil.size), resample=PIL.Image.BICUBIC)
    arr = np.array(pil)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


TRANSFORMS = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')


def _check_resolution(transform: Optional[str], width: Optional[int], height: Optional[int]) -> None:
    """Reject an impossible --resolution before any work: datasets must be square and power-of-two
    (letterboxed center-crop-wide output is square too, with height <= width)."""
    if width is None or height is None:
        return
    if width < 1 or height < 1:
        _fail(f'--resolution={width}x{height}: width and height must be positive')
    if not is_power_of_two(width):
        _fail(f'--resolution={width}x{height}: width must be a power of two (e.g. 32, 64, 256)')
    if transform != 'center-crop-wide' and width != height:
        _fail(f'--resolution={width}x{height}: output must be square '
              f'(use --transform=center-crop-wide for letterboxed wide images)')
    if transform == 'center-crop-wide' and height > width:
        _fail(f'--resolution={width}x{height}: center-crop-wide needs height <= width')


def build_transform(transform: Optional[str], output_width: Optional[int],
                    output_height: Optional[int]) -> Callable[[np.ndarray], Optional[np.ndarray]]:
    """Validate --transform/--resolution up front and return the per-image function."""
    _check_resolution(transform, output_width, output_height)
    if transform is None:
        return functools.partial(_resize_only, output_width, output_height)
    if output_width is None or output_height is None:
        _fail(f'--transform={transform} needs --resolution=WxH')
    by_name = {
        'center-crop': functools.partial(_crop_square, output_width, output_height),
        'center-crop-wide': functools.partial(_crop_wide, output_width, output_height),
        'center-crop-dhariwal': functools.partial(center_crop_dhariwal, output_width),
    }
    if transform not in by_name:
        _fail(f'--transform={transform}: unknown transform; expected one of {", ".join(TRANSFORMS)}')
    return by_name[transform]


# ----------------------------------------------------------------------------
# Destinations: written under a temporary name next to --dest and renamed into place by commit(), so a
# failed or interrupted conversion never leaves a half-written dataset at --dest.


class ZipDest:
    """Uncompressed zip (ZIP_STORED: the loader reads members without inflating)."""

    def __init__(self, dest: str):
        self.dest = dest
        parent = os.path.dirname(os.path.abspath(dest))
        if os.path.isdir(dest):
            _fail(f'{dest}: --dest ends in .zip but is an existing folder')
        os.makedirs(parent, exist_ok=True)
        self.file = dnnlib.util.AtomicFile(dest)
        self.tmp = self.file.tmp
        try:
            self.zf = zipfile.ZipFile(self.file.file, mode='w', compression=zipfile.ZIP_STORED)
        except BaseException:  # e.g. Ctrl-C / SIGTERM right now: convert_dataset cannot abort us yet
            self.file.discard()
            raise

    def write(self, fname: str, data: bytes):
        info = zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0))  # Fixed time: reproducible zips.
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        self.zf.writestr(info, data)

    def commit(self):
        self.zf.close()
        self.file.commit()

    def abort(self):
        try:
            self.zf.close()
        finally:
            self.file.discard()


class FolderDest:
    """A folder of PNGs + dataset.json. --dest must be missing or empty."""

    def __init__(self, dest: str):
        self.dest = dest
        if os.path.exists(dest) and not os.path.isdir(dest):
            _fail(f'{dest}: --dest exists and is not a folder; use a new folder or a .zip name')
        if os.path.isdir(dest) and len(os.listdir(dest)) != 0:
            _fail(f'{dest}: --dest folder must be empty')
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


def _open_writer(dest: str):
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
    if ref is None:  # The first image: check the dataset-wide rules once.
        w, h = attrs['width'], attrs['height']
        if w != h:
            _fail(f'{name}: image is {w}x{h} after scale and crop, but dataset images must be square '
                  f'(use --transform=center-crop --resolution=NxN)')
        if not is_power_of_two(w):
            _fail(f'{name}: image is {w}x{h} after scale and crop, but width/height must be a power of two '
                  f'(use --resolution=NxN, e.g. 32x32)')
        if channels not in (1, 3):
            _fail(f'{name}: image has {channels} channels; dataset images must be RGB or grayscale')
    elif attrs != ref:
        _fail(f'{name}: image is {attrs["width"]}x{attrs["height"]} with {attrs["channels"]} channel(s) after '
              f'scale and crop, but earlier images are {ref["width"]}x{ref["height"]} with {ref["channels"]}; '
              f'all images must match (use --resolution and/or --transform)')
    return attrs


def _write_images(source: _Source, transform_image, writer, progress: bool) -> tuple[list, Optional[dict]]:
    """Transform and store every source image. Returns the dataset.json label pairs (None where an
    image has no label) and the common image attributes (None if the transform rejected everything).
    Output names follow the source index, so a rejected image leaves a gap rather than shifting the rest."""
    label_pairs = []
    shape = None
    numbered = enumerate(source.items)
    for idx, item in tqdm(numbered, total=source.count, disable=not progress, unit='img', dynamic_ncols=True):
        out = transform_image(item['img'])
        if out is None:  # center-crop-wide: too small
            continue
        shape = _check_image(out, item['source'], shape)
        name = archive_fname(idx)
        writer.write(name, encode_png(out))
        label_pairs.append(None if item['label'] is None else [name, item['label']])
    return label_pairs, shape


def convert_dataset(source: str, dest: str, max_images: Optional[int] = None, transform: Optional[str] = None,
                    resolution: Optional[tuple[int, int]] = None, progress: bool = True) -> dict:
    """Convert --source into --dest; returns the written dataset.json dict. Raises DatasetToolError."""
    if max_images is not None and max_images < 1:
        _fail(f'--max-images={max_images}: must be at least 1')
    width, height = resolution if resolution is not None else (None, None)
    transform_image = build_transform(transform, width, height)
    images = open_source(source, max_images=max_images)
    if images.count == 0:
        _fail(f'{source}: no images found')

    writer = _open_writer(dest)
    try:
        label_pairs, shape = _write_images(images, transform_image, writer, progress)
        if shape is None:
            _fail(f'{source}: no image survived --transform={transform} (all were too small for '
                  f'{width}x{height})')
        # Labels are all-or-nothing: one unlabelled image makes the whole dataset unconditional.
        labelled = all(pair is not None for pair in label_pairs)
        metadata = {'labels': label_pairs if labelled else None}
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
        return _parse_size(value)
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
    try:  # bad values are usage errors (status 2, like those click finds itself)
        if max_images is not None and max_images < 1:
            _fail(f'--max-images={max_images}: must be at least 1')
        build_transform(transform, *(resolution if resolution is not None else (None, None)))
    except DatasetToolError as e:
        raise click.UsageError(e.message) from None
    if os.path.isfile(dest) and str(dest).lower().endswith('.zip'):  # (a folder --dest must be new or empty)
        click.echo(f'Note: --dest {dest} exists and will be replaced once the conversion is complete '
                   f'(it stays as it is if the conversion fails or is interrupted)')
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)
    except OSError as e:  # e.g. disk full or permission denied while writing --dest
        raise DatasetToolError(f'{e.filename or dest}: {e.strerror or e}')
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    """SIGTERM handler: stop like Ctrl-C (KeyboardInterrupt), so the temporary output is removed and click
    reports "Aborted!" with exit status 1."""
    raise KeyboardInterrupt


if __name__ == '__main__':
    main()
