"""The README is the front door: its commands and code must work as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def code_blocks(language):
    return re.findall(rf'```{language}\n(.*?)```', README, flags=re.S)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    commands = code_blocks('bash')[0].strip().splitlines()
    assert len(commands) == 2
    setup_and_run, setup_and_test = commands
    assert setup_and_run.startswith('python3 -m venv .venv && ')
    assert setup_and_test.startswith('python3 -m venv .venv && ') and setup_and_test.endswith('-m pytest')
    assert setup_and_test in (ROOT / '.ci' / 'run').read_text()


def test_readme_python_examples_run():
    for block in code_blocks('python'):
        exec(compile(block, 'README.md', 'exec'), {})


@pytest.mark.parametrize('page', sorted(p.name for p in (ROOT / 'docs').glob('*.md')))
def test_docs_python_examples_run(page):
    text = (ROOT / 'docs' / page).read_text()
    for block in re.findall(r'```python\n(.*?)```', text, flags=re.S):
        exec(compile(block, f'docs/{page}', 'exec'), {})


def test_readme_is_a_front_door_and_its_links_resolve():
    assert len(README.splitlines()) < 200, 'measurement history belongs in benchmarks/README.md'
    for target in re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', README):
        if not target.startswith('http'):
            assert (ROOT / target).exists(), target
