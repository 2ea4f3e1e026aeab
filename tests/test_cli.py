"""torch_utils/cli.py, the CLI layer the command lines share, and a property test over every numeric option of
every CLI: nan, inf, -inf, 0 and a negative value each end in one line and a non-zero status, or in a valid
result; never a traceback, a hang or a partial file. Run in-process (click's CliRunner) on tiny inputs."""

from __future__ import annotations

import ast
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import compress
import dataset_tool
import fid
import generate
import reconstruct_phema
import train
from helpers import limited_memory
from torch_utils import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIS = ['train.py', 'generate.py', 'fid.py', 'dataset_tool.py', 'compress.py', 'reconstruct_phema.py']

# ----------------------------------------------------------------------------
# The shared layer.


def test_no_cli_imports_another_cli():
    """Issue 20: the shared options, loaders and parsers live in torch_utils/cli.py, not in a CLI."""
    names = {c[:-3] for c in CLIS}
    if not (ROOT / 'metrics').is_dir():  # until fid.py's scoring moves to the metrics package (issue 19/20)
        names.discard('fid')
    for script in CLIS:
        tree = ast.parse((ROOT / script).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split('.')[0])
        assert not imported & (names - {script[:-3]}), (script, imported & names)


@pytest.mark.parametrize('value', ['nan', 'inf', '-inf', ' NaN', '1e999'])
def test_finite_float_types_reject_non_finite(value):
    for param_type in (cli.FLOAT, cli.FiniteFloatRange(min=0), cli.FiniteFloatRange(min=0, max=1, min_open=True)):
        with pytest.raises(click.BadParameter, match='not a finite number'):
            param_type.convert(value, None, None)
    assert cli.FLOAT.convert('-2.5', None, None) == -2.5
    assert cli.FiniteFloatRange(min=0, allow_inf=True).convert('inf', None, None) == math.inf  # --S_max's default
    with pytest.raises(click.BadParameter):
        cli.FiniteFloatRange(min=0, allow_inf=True).convert('nan', None, None)


def test_seed_callback_is_bounded():
    """One callback on training.sampling.parse_seeds; reconstruct_phema's --seeds used an unbounded parser."""
    parse = cli.seeds_callback(min_count=2)
    assert parse(None, None, '0-2,7') == [0, 1, 2, 7]
    for bad in ('0-99999999999', '-1', '5', '1,1', 'x'):
        with pytest.raises(click.BadParameter):
            parse(None, None, bad)
    seeds = [p for p in reconstruct_phema.main.params if p.name == 'seeds'][0]
    res = CliRunner().invoke(reconstruct_phema.main, ['--indir', '.', '--outdir', 'o', '--outstd', '0.1',
                                                      '--seeds', '0-99999999999'])
    assert res.exit_code == 2 and 'largest allowed' in res.output, res.output
    assert seeds.callback is not None


def test_first_line():
    assert cli.first_line(ValueError('a\nb')) == 'a'
    assert cli.first_line(KeyError()) == 'KeyError'


def test_load_net_errors_are_one_line(tmp_path):
    for path, needle in ((tmp_path / 'missing.pkl', 'no such file'), (tmp_path / 'junk.pkl', 'not a network')):
        if 'junk' in path.name:
            path.write_bytes(b'\x80junk')
        with pytest.raises(click.ClickException) as e:
            cli.load_net(str(path), torch.device('cpu'), verbose=False, option='--gnet')
        assert e.value.message.startswith('--gnet ') and '\n' not in e.value.message
        assert needle in e.value.message or 'corrupt' in e.value.message, e.value.message

@pytest.mark.parametrize('cli,seeds,says', [
    ('generate.py', '0-4000000000', 'more than the 10,000,000 allowed'),
    ('generate.py', '5,-3--1', "'-3--1' is below 0"),
    ('fid.py', '0-99999999999', "'0-99999999999' is above 4294967295"),
])
def test_absurd_and_negative_seeds_are_one_line_errors(cli, seeds, says, repo_root, subprocess_env, tmp_path):
    cmd = [sys.executable, str(repo_root / cli)] + (['net', '--ref', 'x.npz'] if cli == 'fid.py' else ['--outdir', str(tmp_path)])
    t0 = time.time()
    proc = subprocess.run(cmd + ['--network', 'net.pkl', f'--seeds={seeds}'], env=subprocess_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, preexec_fn=limited_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and 'Traceback' not in proc.stderr and 'MemoryError' not in proc.stderr, proc.stderr
    assert time.time() - t0 < 60
    assert not list(tmp_path.glob('*.png'))

# ----------------------------------------------------------------------------
# Tiny inputs for the property test.


class _Detector(torch.nn.Module):
    """A stand-in FID detector: per-channel means and standard deviations (6 features)."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = x.to(torch.float32)
        return torch.cat([x.mean([2, 3]), x.std([2, 3])], dim=1)


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, tiny_zip, tiny_net_pkl):
    root = tmp_path_factory.mktemp('cli-inputs')
    net = tiny_net_pkl
    det = root / 'det.pt'
    torch.jit.save(torch.jit.script(_Detector()), str(det))
    ref = root / 'ref.npz'
    np.savez(ref, mu=np.zeros(6), sigma=np.eye(6))
    images = root / 'images'
    images.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(4):
        PIL.Image.fromarray(rnd.randint(0, 256, [8, 8, 3], dtype=np.uint8)).save(images / f'{i}.png')
    return dict(net=str(net), det=str(det), ref=str(ref), images=str(images), zip=tiny_zip)


def _real_images(folder) -> bool:
    """generate.py wrote images, none of them blank (NaN latents become black images)."""
    images = [np.asarray(PIL.Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))]
    return bool(images) and all(image.std() > 0 for image in images)


def _base_args(inputs, work):
    """(command, options, files that must not exist after a failure, check of a successful result) per CLI
    command. The options are the smallest run; the option under test overrides its entry."""
    i, w = inputs, str(work)
    det = {'--detector': i['det']}

    def exists(*names):
        return lambda: all(os.path.exists(os.path.join(w, n)) for n in names)

    def last_number():
        return lambda output: math.isfinite(float(output.strip().splitlines()[-1]))
    return {
        'train': (train.main, {'--outdir': f'{w}/run', '--data': i['zip'], '--cbase': '8', '--cres': '1',
                               '--blocks': '1', '--batch': '4', '--workers': '0', '-n': None},
                  ['run'], lambda output: output.strip().endswith('Dry run; exiting.')),
        'generate': (generate.main, {'--network': i['net'], '--outdir': f'{w}/out', '--seeds': '0-1',
                                     '--steps': '2', '--batch': '2'},
                     [], lambda output: _real_images(f'{w}/out')),
        'fid calc': (fid.main, {'calc': None, '--images': i['images'], '--ref': i['ref'], '--num': '2',
                                '--workers': '0', **det}, [], last_number()),
        'fid ref': (fid.main, {'ref': None, '--data': i['images'], '--dest': f'{w}/r.npz', '--workers': '0', **det},
                    ['r.npz'], lambda output: exists('r.npz')()),
        'fid net': (fid.main, {'net': None, '--network': i['net'], '--ref': i['ref'], '--seeds': '0-1',
                               '--repeats': '1', '--steps': '2', **det}, [], last_number()),
        'fid sweep': (fid.main, {'sweep': None, '--network': i['net'], '--ref': i['ref'], '--samplers': 'euler',
                                 '--nfe': '2', '--seeds': '0-1', '--outdir': f'{w}/sw', **det},
                      ['sw/sweep.json'], lambda output: exists('sw/sweep.json')()),
        'fid nll': (fid.main, {'nll': None, '--network': i['net'], '--data': i['images'], '--num': '2',
                               '--sigma_min': '0.5', '--sigma_max': '1', '--rtol': '0.5', '--atol': '0.5'},
                    [], last_number()),
        'dataset_tool': (dataset_tool.main, {'--source': i['images'], '--dest': f'{w}/d.zip'},
                         ['d.zip'], lambda output: exists('d.zip')()),
        'compress prune': (compress.main, {'prune': None, '--network': i['net'], '--dest': f'{w}/p.pkl'},
                           ['p.pkl'], lambda output: exists('p.pkl')()),
        'compress report': (compress.main, {'report': None, '--network': i['net'], '--num': '0',
                                            '--latency-runs': '0', '--out': f'{w}/rep'},
                            ['rep.json'], lambda output: exists('rep.json')()),
        'reconstruct_phema': (reconstruct_phema.main, {'--indir': w, '--outdir': f'{w}/ph', '--outstd': '0.1'},
                              [], lambda output: True),
    }


def _command(group_or_command, name):
    parts = name.split()
    return group_or_command.commands[parts[1]] if len(parts) > 1 else group_or_command


NUMERIC_LISTS = {'LIST', 'LO,HI', 'WxH', 'KIMG'}  # string options holding numbers


def _numeric_options(command):
    for p in command.params:
        if not isinstance(p, click.Option) or p.is_flag or p.name in ('help',):
            continue
        if p.type.name in ('float', 'integer', 'float range', 'integer range') or p.metavar in NUMERIC_LISTS:
            yield max(p.opts, key=len)


CASES = ['train', 'generate', 'fid calc', 'fid ref', 'fid net', 'fid sweep', 'fid nll', 'dataset_tool',
         'compress prune', 'compress report', 'reconstruct_phema']
VALUES = ['nan', 'inf', '-inf', '0', '-1']


def _alarm(signum, frame):
    raise TimeoutError('the command ran for more than 120 s')


@pytest.mark.parametrize('case', CASES)
def test_every_numeric_option_fails_in_one_line_or_works(case, inputs, tmp_path, one_thread):
    """nan, inf, -inf, 0 and -1 for every numeric option: one 'Error' line as the last line and a non-zero
    status, or status 0 and a valid result; no traceback, hang, temporary or partial file."""
    group = _base_args(inputs, tmp_path)[case][0]
    command = _command(group, case)
    options = list(_numeric_options(command))
    assert options, case
    threads = torch.get_num_threads()
    for k, option in enumerate(options):
        for value in VALUES:
            work = tmp_path / f'{k}-{value}'
            work.mkdir()
            _group, args, outputs, valid = _base_args(inputs, work)[case]
            args = dict(args, **{option: value})
            argv = [str(x) for key, v in args.items() for x in ([key] if v is None else [f'{key}={v}'])]
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(120)
            try:
                res = CliRunner().invoke(group, argv)
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
                torch.set_num_threads(threads)  # compress report --threads
            label = f'{case} {option}={value}: {res.output[-600:]}'
            assert res.exception is None or isinstance(res.exception, SystemExit), \
                (label, repr(res.exception))
            assert 'Traceback' not in res.output, label
            temporary = [f for _r, _d, files in os.walk(work) for f in files if f.endswith('.tmp')]
            assert not temporary, label
            if res.exit_code == 0:
                assert valid(res.output), label
                continue
            lines = [line for line in res.stderr.splitlines() if line.strip()]  # (stdout is captured apart)
            assert sum(line.startswith('Error') for line in lines) == 1 and lines[-1].startswith('Error'), label
            assert not any((work / name).exists() for name in outputs), label
