"""Every benchmark and script imports and answers --help (they are run by hand, so nothing else would notice
when a refactoring breaks one)."""

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
