"""dnnlib.util: object construction by name and the download cache, against a local HTTP server."""

import hashlib
import http.server
import os
import threading

import pytest

import dnnlib
from dnnlib import util


class _Server:
    """A localhost HTTP server whose responses the test scripts: payloads, failures, truncation."""

    def __init__(self):
        self.files = {}          # path -> bytes
        self.fail_first = {}     # path -> number of 503 answers before success
        self.truncate = set()    # paths answered with a Content-Length larger than the body
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                if outer.fail_first.get(self.path, 0) > 0:
                    outer.fail_first[self.path] -= 1
                    self.send_error(503)
                    return
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                length = len(data) + 100 if self.path in outer.truncate else len(data)
                self.send_header('Content-Length', str(length))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f'http://127.0.0.1:{self.httpd.server_address[1]}'

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        d.missing


def test_construct_class_by_name():
    obj = util.construct_class_by_name(class_name='collections.OrderedDict', a=1)
    assert type(obj).__name__ == 'OrderedDict' and obj['a'] == 1
    assert util.call_func_by_name(3, func_name='math.sqrt', ) == pytest.approx(3 ** 0.5)
    with pytest.raises((ImportError, AttributeError)):
        util.get_obj_by_name('collections.NoSuchThing')


def test_download_cache_hit(server, tmp_path):
    payload = os.urandom(1000)
    server.files['/net.pkl'] = payload
    url = server.base + '/net.pkl'
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == payload
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == payload
    assert server.requests == ['/net.pkl']  # second open served from the cache
    fname = util.open_url(url, cache_dir=str(tmp_path), verbose=False, return_filename=True)
    assert os.path.dirname(fname) == str(tmp_path) and open(fname, 'rb').read() == payload
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp-')]


def test_download_cache_dir_from_environment(server, tmp_path, monkeypatch):
    server.files['/a.bin'] = b'abc'
    monkeypatch.setenv('EDM_CACHE_DIR', str(tmp_path / 'cache'))
    fname = util.open_url(server.base + '/a.bin', verbose=False, return_filename=True)
    assert fname.startswith(str(tmp_path / 'cache'))


def test_download_retries_transient_errors(server, tmp_path):
    server.files['/flaky'] = b'payload'
    server.fail_first['/flaky'] = 2
    with util.open_url(server.base + '/flaky', cache_dir=str(tmp_path), verbose=False, retry_delay=0) as f:
        assert f.read() == b'payload'
    assert server.requests == ['/flaky'] * 3


def test_download_gives_up_after_num_attempts(server, tmp_path):
    server.files['/down'] = b'x'
    server.fail_first['/down'] = 5
    with pytest.raises(OSError, match='after 2 attempt'):
        util.open_url(server.base + '/down', cache_dir=str(tmp_path), verbose=False, num_attempts=2, retry_delay=0)
    assert not os.listdir(tmp_path)


def test_download_404_fails_at_once_and_says_where_to_place_file(server, tmp_path):
    with pytest.raises(OSError) as info:
        util.open_url(server.base + '/missing.pkl', cache_dir=str(tmp_path), verbose=False, retry_delay=0)
    assert server.requests == ['/missing.pkl']
    assert str(tmp_path) in str(info.value) and 'missing.pkl' in str(info.value)


def test_download_checksum(server, tmp_path):
    server.files['/w'] = b'weights'
    good = hashlib.sha256(b'weights').hexdigest()
    with util.open_url(server.base + '/w', cache_dir=str(tmp_path), verbose=False, sha256=good) as f:
        assert f.read() == b'weights'
    # A cached file that no longer matches (corrupted on disk) is reported, not silently used.
    cached = util.open_url(server.base + '/w', cache_dir=str(tmp_path), verbose=False, return_filename=True)
    with open(cached, 'wb') as f:
        f.write(b'corrupt')
    with pytest.raises(OSError, match='Checksum mismatch'):
        util.open_url(server.base + '/w', cache_dir=str(tmp_path), verbose=False, sha256=good)
    with pytest.raises(OSError, match='Checksum mismatch'):
        util.open_url(server.base + '/w', cache_dir=str(tmp_path / 'other'), verbose=False, sha256='0' * 64,
                      num_attempts=1)


def test_truncated_download_is_an_error(server, tmp_path):
    server.files['/t'] = b'short'
    server.truncate.add('/t')
    with pytest.raises(OSError):
        util.open_url(server.base + '/t', cache_dir=str(tmp_path), verbose=False, num_attempts=1)
    assert not os.listdir(tmp_path)


def test_local_paths_and_file_urls(tmp_path):
    p = tmp_path / 'x.bin'
    p.write_bytes(b'local')
    with util.open_url(str(p)) as f:
        assert f.read() == b'local'
    with util.open_url(p.as_uri()) as f:
        assert f.read() == b'local'
    with pytest.raises(FileNotFoundError, match='No such file'):
        util.open_url(str(tmp_path / 'nope.pkl'))
    assert util.is_url('https://example.org/a.pkl') and not util.is_url(str(p))
    assert util.is_url(p.as_uri(), allow_file_urls=True)


def test_format_time():
    assert util.format_time(5) == '5s'
    assert util.format_time(65) == '1m 05s'
    assert util.format_time(3725) == '1h 02m 05s'
    assert util.format_time(90000) == '1d 01h 00m'


def test_atomic_file_discard_removes_the_file_when_close_fails(tmp_path):
    """On a full disk closing flushes and fails; discard() must still remove the hidden temporary file
    (dataset_tool left a .old.zip.*.tmp that kept the disk full, issue 24)."""
    af = util.AtomicFile(tmp_path / 'old.zip')
    real = af.file

    class FullDisk:
        def close(self):
            real.close()
            raise OSError(28, 'No space left on device')
    af.file = FullDisk()
    af.discard()
    assert os.listdir(tmp_path) == []


def test_first_line():
    assert util.first_line(ValueError('one\ntwo')) == 'one' and util.first_line(OSError()) == 'OSError'


def test_parse_float_list_rejects_non_finite():
    for s in ('nan', '0.1,inf', '-inf'):
        with pytest.raises(ValueError, match='finite'):
            util.parse_float_list(s)
