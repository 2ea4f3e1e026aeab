"""The programs run by hand, benchmarks/*.py and scripts/*.py: every one imports and answers --help, and runs end
to end at a tiny size (a refactoring that breaks one would otherwise go unnoticed until someone measures). Only
that they run and print their numbers is checked: timings are not tested."""

import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob('benchmarks/*.py'), *ROOT.glob('scripts/*.py')])


def test_every_script_is_listed():
    assert 'scripts/quickstart.py' in SCRIPTS and len([s for s in SCRIPTS if s.startswith('benchmarks/')]) >= 4


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_help(script, subprocess_env):
    proc = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, env=subprocess_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'usage' in proc.stdout.lower(), proc.stdout[:500]


TINY_RUNS = {
    'training --paired/--before-after/--autocast/--profile': (
        ['benchmarks/bench_training.py', '--paired', '--before-after', '--autocast', '--fast-dropout', '--config',
         'tiny', '--steps', '1', '--warmup', '0', '--threads', '1', '--profile', '1', '--op-times', '1'], 'op times'),
    'training, one process per config': (
        ['benchmarks/bench_training.py', '--config', 'tiny', '--steps', '1', '--warmup', '0', '--threads', '1'],
        'sec/kimg'),
    'networks': (['benchmarks/bench_networks.py', '--config', 'tiny', '--batch', '2', '--reps', '1', '--warmup', '0',
                  '--threads', '1', '--no-attn-compare', '--before-after'], 'bf16 (use_bf16=True)'),
    'networks --attn-only': (['benchmarks/bench_networks.py', '--attn-only', '--attn-shape', '4,8,16', '--threads', '1'],
                             'faster than unchunked'),
    'sampling --paired-bf16': (['benchmarks/bench_sampling.py', '--config', 'tiny-8', '--batch', '2', '--steps', '2',
                                '--repeats', '1', '--threads', '1', '--paired-bf16'], 'vs plain'),
    'bf16 accuracy': (['benchmarks/bench_bf16_accuracy.py', '--preset', 'tiny-8', '--batch', '4', '--samples', '2',
                       '--threads', '1'], 'sampled batch'),
    'dataset': (['benchmarks/bench_dataset.py', '--num-images', '32', '--resolution', '8', '--repeats', '1',
                 '--batch-size', '8'], 'images/s'),
    'denoiser error': (['benchmarks/bench_denoiser_error.py', '--preset', 'tiny-8', '--num', '2', '--sigmas', '1,80'],
                       'mse'),
    'optimizer state': (['benchmarks/bench_optimizer_state.py', '--preset', 'tiny-8'], 'bytes/parameter'),
    'fid features': (['benchmarks/bench_fid.py', '--batch', '1', '--batches', '1', '--resolution', '32', '--threads',
                      '1'], 'images/s'),
}


def _run(args, env, timeout=120):
    env = dict(env, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_benchmark_has_a_tiny_run():
    benchmarks = {str(p.relative_to(ROOT)) for p in ROOT.glob('benchmarks/*.py')}
    assert benchmarks <= {args[0] for args, _ in TINY_RUNS.values()}


@pytest.mark.slow
@pytest.mark.parametrize('name', [n for n in TINY_RUNS if n.startswith('training --paired')])
def test_benchmark_paired_variants(name, subprocess_env):
    args, expected = TINY_RUNS[name]
    proc = _run(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout[-2000:]
    for variant in ('fp32', 'bf16', 'autocast bf16', 'fast_dropout', 'before fp32', 'before autocast bf16'):
        assert variant in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize('name', [n for n in TINY_RUNS if not n.startswith('training --paired')])
def test_benchmark_tiny(name, subprocess_env):
    args, expected = TINY_RUNS[name]
    proc = _run(args, subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_quickstart_tiny(tmp_path, subprocess_env):
    pytest.importorskip('sklearn')
    outdir = tmp_path / 'qs'
    proc = _run(['scripts/quickstart.py', f'--outdir={outdir}', '--kimg=0.1', '--steps=2'], subprocess_env,
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (outdir / 'grid-heun-vs-euler.png').is_file() and len(list((outdir / 'samples').glob('*.png'))) >= 64
