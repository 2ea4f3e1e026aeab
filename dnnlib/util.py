"""EasyDict, construction of objects by name, and a download cache for network / detector URLs."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import os
import pickle
import re
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Optional

# ----------------------------------------------------------------------------


class EasyDict(dict):
    """A dict whose items can also be read and written as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class Logger:
    """Replaces sys.stdout and sys.stderr with a tee into `file_name` until close() puts them back."""

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'a', should_flush: bool = True):
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.file = None if file_name is None else open(file_name, file_mode)
        self.should_flush = should_flush
        sys.stdout = sys.stderr = self

    def _targets(self) -> list:
        return [self.stdout] if self.file is None else [self.file, self.stdout]

    def write(self, text: str) -> None:
        if not text:
            return
        for target in self._targets():
            target.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        for target in self._targets():
            target.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


def format_time(seconds: float) -> str:
    """'12s', '3m 05s', '2h 01m 05s', '1d 02h 03m': the progress lines' format."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): how the CLIs
    report an error from a library in one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

_INT_RANGE = re.compile(r'^\s*(-?\d+)\s*-\s*(-?\d+)\s*$')


def parse_int_list(s, min_value: Optional[int] = None, max_value: Optional[int] = None,
                   max_count: Optional[int] = None) -> list[int]:
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10] (seed lists, --cres). Lists/ints pass through; raises
    ValueError when malformed, when a range is empty, when a value lies outside [min_value, max_value],
    or when the list would hold more than max_count numbers (checked before a range is expanded, so
    '0-99999999999' is an error, not a memory blow-up)."""
    if isinstance(s, int):
        parts = [(s, s, str(s))]
    elif isinstance(s, (list, tuple)):
        parts = [(int(x), int(x), str(x)) for x in s]
    else:
        parts = []
        for part in str(s).split(','):
            m = _INT_RANGE.match(part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError(f'range {part.strip()!r} is empty (end < start)')
                parts.append((lo, hi, part.strip()))
            elif re.fullmatch(r'\s*-?\d+\s*', part):
                parts.append((int(part), int(part), part.strip()))
            else:
                raise ValueError(f'{part.strip()!r} in {s!r} is not an integer or a range like 5-10')
    count = 0
    for lo, hi, text in parts:
        if min_value is not None and lo < min_value:
            raise ValueError(f'{text!r} is below {min_value} (the smallest allowed value)')
        if max_value is not None and hi > max_value:
            raise ValueError(f'{text!r} is above {max_value} (the largest allowed value)')
        count += hi - lo + 1
        if max_count is not None and count > max_count:
            raise ValueError(f'{s!r} has {sum(h - l + 1 for l, h, _ in parts):,} numbers, more than the '
                             f'{max_count:,} allowed; split it into several runs')
    return [v for lo, hi, _ in parts for v in range(lo, hi + 1)]


def parse_float_list(s) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1]; 'a,b,...,c' fills in the evenly spaced values b + k (b - a) up to c
    (EDM2's list syntax, e.g. '0.010,0.015,...,0.250' -> 49 values). Returns the sorted distinct values;
    lists/numbers pass through. Raises ValueError when malformed or when '...' does not fit evenly."""
    if isinstance(s, (int, float)):
        return [float(s)]
    if isinstance(s, (list, tuple)):
        return sorted(set(float(x) for x in s))
    parts = [part.strip() for part in str(s).split(',')]
    values = []
    for i, part in enumerate(parts):
        if part != '...':
            try:
                values.append(float(part))
            except ValueError:
                raise ValueError(f'{part!r} in {s!r} is not a number') from None
            if not math.isfinite(values[-1]):
                raise ValueError(f'{part!r} in {s!r} is not a finite number')
            continue
        if i < 2 or i + 1 >= len(parts) or '...' in (parts[i - 2], parts[i - 1], parts[i + 1]):
            raise ValueError(f"'...' in {s!r} needs two numbers before it and one after (e.g. 0.01,0.02,...,0.05)")
        a, b, end = float(parts[i - 2]), float(parts[i - 1]), float(parts[i + 1])
        if a == b:
            raise ValueError(f"the two numbers before '...' in {s!r} must differ (they set the step)")
        steps = (end - b) / (b - a)
        if round(steps) < 1 or abs(steps - round(steps)) > 1e-4:
            raise ValueError(f"'...' in {s!r}: {end} is not reached from {b} in whole steps of {b - a:g}")
        values.extend(b + (b - a) * k for k in range(1, round(steps)))  # the end value follows as the next part
    return sorted(set(round(v, 12) for v in values))  # 0.015 + 0.005 is 0.02, not 0.019999999999999997

# ----------------------------------------------------------------------------
# Atomic files: a reader never sees a half-written checkpoint, dataset, image or download.


def _default_file_mode() -> int:
    """0o666 minus the umask: what open() would create (mkstemp's own files are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class AtomicFile:
    """A temporary file beside `path` (hidden, same folder, so the final rename stays on one file system).
    `commit()` flushes, fsyncs and renames it over `path` with the usual permissions; `discard()` deletes it."""

    def __init__(self, path: str | os.PathLike, mode: str = 'wb'):
        if mode not in ('wb', 'w'):
            raise ValueError(f'AtomicFile writes new files only (mode "wb" or "w"), got {mode!r}')
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(self.path)}.', suffix='.tmp')
        try:
            self.file = os.fdopen(fd, mode)
        except BaseException:  # e.g. KeyboardInterrupt from a signal: leave no temporary file behind
            os.close(fd)
            os.remove(self.tmp)
            raise

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, _default_file_mode())
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails on a full disk: remove the file anyway
            self.file.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb'):
    """`with atomic_write(path) as f: torch.save(obj, f)`: `path` either keeps its old content or gets the
    complete new one, also when the writer raises or the process is interrupted."""
    af = AtomicFile(path, mode)
    try:
        yield af.file
    except BaseException:
        af.discard()
        raise
    af.commit()

# ----------------------------------------------------------------------------
# Restricted unpickling: the one unpickler for files we did not write (network and detector pickles,
# the CIFAR-10 archive). Each caller passes its own allowlist.


class DisallowedPickleError(pickle.UnpicklingError):
    """The pickle references a global (class or function) that its allowlist does not admit."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves every global through `allow(module, name)`, which returns None to refuse,
    True to import the named object as usual, or an object to use in its place (a safe stand-in).
    Nothing outside the allowlist can be called while loading, so a crafted file cannot run code."""

    def __init__(self, file, allow: Callable[[str, str], Any], what: str = 'pickle', **kwargs):
        super().__init__(file, **kwargs)
        self._allow, self._what = allow, what

    def find_class(self, module: str, name: str):
        found = self._allow(module, name)
        if found is None or found is False:
            raise DisallowedPickleError(f'refusing to load {module}.{name}, which is not allowed in a {self._what}')
        return super().find_class(module, name) if found is True else found

    def persistent_load(self, pid):
        raise DisallowedPickleError(f'unexpected persistent id in a {self._what} (a torch.save archive inside a pickle?)')


def allow_exactly(pairs) -> Callable[[str, str], Any]:
    """An allowlist of exact (module, name) pairs, imported as usual."""
    pairs = frozenset(pairs)
    return lambda module, name: True if (module, name) in pairs else None

# ----------------------------------------------------------------------------
# Objects by name: the configuration names classes ('training.networks.EDMPrecond').


def get_obj_by_name(name: str) -> Any:
    """Resolve 'pkg.module.attr.sub' by importing the longest importable module prefix."""
    parts = name.split('.')
    for i in range(len(parts), 0, -1):
        module_name = '.'.join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only swallow "this prefix is not a module", not errors inside a module that exists.
            if e.name is not None and module_name.startswith(e.name):
                continue
            raise
        for attr in parts[i:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise AttributeError(f'Cannot find "{attr}" in "{module_name}" while resolving "{name}"') from None
        return obj
    raise ImportError(f'Cannot import anything named "{name}"')


def call_func_by_name(*args, func_name: str, **kwargs) -> Any:
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f'"{func_name}" is not callable')
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    return call_func_by_name(*args, func_name=class_name, **kwargs)

# ----------------------------------------------------------------------------
# Download cache.


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        res = urllib.parse.urlparse(obj)
    except ValueError:
        return False
    return res.scheme in ('http', 'https') and bool(res.netloc)


def make_cache_dir_path(*paths: str) -> str:
    """Cache root: $EDM_CACHE_DIR, else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    for var in ('EDM_CACHE_DIR', 'DNNLIB_CACHE_DIR'):
        if os.environ.get(var):
            return os.path.join(os.environ[var], *paths)
    return os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib', *paths)


def _url_cache_name(url: str) -> str:
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    safe_name = re.sub(r'[^0-9a-zA-Z-._]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    return f'{url_md5}_{safe_name}'


def _check_sha256(data: bytes, sha256: Optional[str], source: str) -> None:
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256.lower():
            raise OSError(f'Checksum mismatch for {source}: expected sha256 {sha256}, got {digest} '
                          f'(corrupt or wrong file; delete it and try again)')


def open_url(url: str, cache_dir: Optional[str] = None, num_attempts: int = 10, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, sha256: Optional[str] = None,
             timeout: float = 60, retry_delay: float = 1.0):
    """Open a local path, file:// URL or http(s):// URL as a binary file object.

    Downloads are cached under the cache dir (see make_cache_dir_path) by the URL's md5, written
    atomically, and verified against `sha256` when given. Returns the local filename instead of a
    file object with return_filename=True (which requires caching for http URLs).
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f'Expected a path or URL, got {url!r}')
    if num_attempts < 1:
        raise ValueError('num_attempts must be at least 1')
    if return_filename and not cache and is_url(url):
        raise ValueError('open_url(return_filename=True) needs cache=True for remote URLs')

    # Local files.
    if not re.match(r'^[a-z][a-z0-9+.-]*://', url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'No such file: {url}')
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        filename = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        if re.match(r'^/[a-zA-Z]:', filename):  # file:///C:/... on Windows
            filename = filename[1:]
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'No such file: {filename} (from {url})')
        return filename if return_filename else open(filename, 'rb')
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ('http', 'https'):
        raise ValueError(f'Unsupported URL scheme "{scheme}" in {url}')

    # Cache hit?
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    cache_file = os.path.join(cache_dir, _url_cache_name(url))
    if cache and os.path.isfile(cache_file):
        if sha256 is not None:
            with open(cache_file, 'rb') as f:
                _check_sha256(f.read(), sha256, cache_file)
        return cache_file if return_filename else open(cache_file, 'rb')

    # Download with retries; HTTP errors that will not change (4xx) fail at once.
    import requests  # imported here so that local-only use needs no network stack
    data = None
    last_error: Optional[BaseException] = None
    if verbose:
        print(f'Downloading {url} ...', end='', flush=True)
    for attempt in range(num_attempts):
        try:
            with requests.get(url, timeout=timeout) as res:
                res.raise_for_status()
                data = res.content
                expected = res.headers.get('Content-Length')
                if expected is not None and int(expected) != len(data):
                    raise OSError(f'truncated download: got {len(data)} of {expected} bytes')
            _check_sha256(data, sha256, url)
            break
        except requests.HTTPError as e:
            last_error = e
            if e.response is not None and 400 <= e.response.status_code < 500:
                break
        except (requests.RequestException, OSError) as e:
            last_error = e
        data = None
        if attempt + 1 < num_attempts:
            time.sleep(retry_delay)
    if data is None:
        if verbose:
            print(' failed')
        hint = (f' If this machine is offline, download it elsewhere and place it at {cache_file} '
                f'(or pass a local path instead of the URL).' if cache else '')
        raise OSError(f'Could not download {url} after {attempt + 1} attempt(s): {last_error}.{hint}')
    if verbose:
        print(' done')

    # Atomic write into the cache: a killed download never leaves a half file behind.
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(cache_file) as f:
            f.write(data)
        if return_filename:
            return cache_file
    return io.BytesIO(data)
