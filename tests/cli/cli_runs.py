"""What the command-line tests share: tiny run flags, a CLI call that checks its exit status and
stderr, and readers of a run's metrics (the `whole` run is a fixture in conftest.py)."""

import json
from pathlib import Path

from routeformer.cli import main

TINY = ['--seq-len', '16', '--dim', '16', '--depth', '1', '--heads', '2', '--window', '8', '--batch-size', '4',
        '--eval-batches', '1', '--warmup', '2', '--quiet']
DUP = ['--task', 'duplication', '--vocab', '8', *TINY]


def cli(capsys, *argv, expect=0):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == expect, f'exit {rc}\nstdout:\n{out}\nstderr:\n{err}'
    assert 'Traceback' not in err
    return out, err


def fails(capsys, *argv, match: str):
    _, err = cli(capsys, *argv, expect=2)
    assert 'error:' in err and match in err, err
    assert len(err.strip().splitlines()) == 1, err  # one message, no trace
    return err


def rows(run: Path, split='train'):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()
            if json.loads(line)['split'] == split]


RESUMABLE = [*DUP, '--steps', '6', '--eval-every', '3', '--save-every', '3']


def without_clock(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(r).items() if k != 'train_time'}
            for r in (run / 'metrics.jsonl').read_text().splitlines()]
