"""The README is the front door: its commands and code must work as written."""

import re
from pathlib import Path

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
