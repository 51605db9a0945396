"""Fixtures of the command-line tests."""

import pytest

from cli_runs import RESUMABLE
from routeformer.cli import main


@pytest.fixture(scope='module')
def whole(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp('runs') / 'whole'
    assert main(['train', *RESUMABLE, '--out', str(out)]) == 0
    return out
