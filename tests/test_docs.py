"""docs/cli holds the current --help of every command-line tool."""

import importlib.util


def _load_generator(repo_root):
    spec = importlib.util.spec_from_file_location('gen_cli_help', repo_root / 'docs' / 'gen_cli_help.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_matches_docs(repo_root):
    gen = _load_generator(repo_root)
    texts = gen.help_texts()
    assert {f'{name}.txt' for name in gen.SCRIPTS} <= set(texts)
    stale = [f for f, text in texts.items() if not (gen.OUT / f).is_file() or (gen.OUT / f).read_text() != text]
    assert not stale, f'docs/cli out of date for {stale}; run: python docs/gen_cli_help.py'
    documented = {p.name for p in gen.OUT.glob('*.txt')}
    assert documented == set(texts), f'stale files in docs/cli: {sorted(documented - set(texts))}'
