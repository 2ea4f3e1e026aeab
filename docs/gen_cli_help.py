"""Regenerate docs/cli/*.txt, the --help text of every command-line tool.

    python docs/gen_cli_help.py          # rewrite the files
    python docs/gen_cli_help.py --check  # exit 1 if any file is out of date (tests/test_docs.py does this)
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

import click
from click.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / 'docs' / 'cli'
SCRIPTS = ['dataset_tool', 'train', 'generate', 'fid', 'compress', 'reconstruct_phema']
WIDTH = 100


def _find_command(module) -> click.Command:
    """The script's click entry point: the command its __main__ block runs (a group wins over its subcommands)."""
    commands = [obj for obj in vars(module).values() if isinstance(obj, click.Command)]
    groups = [c for c in commands if isinstance(c, click.Group)]
    candidates = groups or commands
    if len(candidates) != 1:
        raise RuntimeError(f'{module.__name__}.py: expected one click entry point, found {[c.name for c in candidates]}')
    return candidates[0]


def help_texts() -> dict[str, str]:
    """{file name: help text} for each script and each subcommand of a group."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    runner = CliRunner()
    texts = {}
    for name in SCRIPTS:
        cmd = _find_command(importlib.import_module(name))
        invocations = [([], f'{name}.txt')]
        if isinstance(cmd, click.Group):
            invocations += [([sub], f'{name}-{sub}.txt') for sub in sorted(cmd.commands)]
        for args, fname in invocations:
            res = runner.invoke(cmd, args + ['--help'], prog_name=f'{name}.py', terminal_width=WIDTH,
                                max_content_width=WIDTH)
            if res.exit_code != 0:
                raise RuntimeError(f'{name}.py {" ".join(args)} --help failed: {res.output}')
            texts[fname] = res.output
    return texts


def main() -> int:
    check = '--check' in sys.argv[1:]
    texts = help_texts()
    stale = []
    for fname, text in texts.items():
        path = OUT / fname
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(fname)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    extra = sorted(p.name for p in OUT.glob('*.txt') if p.name not in texts) if OUT.is_dir() else []
    if check and (stale or extra):
        print(f'docs/cli is out of date ({", ".join(stale + extra)}); run: python docs/gen_cli_help.py')
        return 1
    if not check:
        for name in extra:
            os.remove(OUT / name)
        print(f'wrote {len(texts)} files to {OUT}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
