"""`torchrun -m routeformer train` on two CPU processes (gloo): the same losses as one process at
the same global batch, and one clear message when the processes disagree."""

import json
import os
import socket
import subprocess
import sys

import pytest

from routeformer.cli import main

ARGS = ['train', '--task', 'duplication', '--vocab', '8', '--seq-len', '16', '--dim', '16', '--depth', '1',
        '--heads', '2', '--window', '8', '--batch-size', '4', '--eval-batches', '1', '--steps', '4',
        '--eval-every', '2', '--save-every', '2', '--warmup', '1', '--quiet']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')}
    return dict(e, OMP_NUM_THREADS='1', **{k: str(v) for k, v in extra.items()})


def metrics(run):
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


# routing: k-means centroids initialised from, and updated with, the data of both processes
@pytest.mark.parametrize('family', ['full', 'routing'])
def test_two_processes_equal_one(tmp_path, family):
    args = [*ARGS, '--family', family]
    assert main([*args, '--out', str(tmp_path / 'one')]) == 0
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                           f'--master_port={free_port()}', '-m', 'routeformer', *args, '--out', str(tmp_path / 'two')],
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(tmp_path / 'one'), metrics(tmp_path / 'two')
    assert [(r['step'], r['split']) for r in one] == [(r['step'], r['split']) for r in two]
    for a, b in zip(one, two):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-5, abs=1e-6)
        if a['split'] == 'val':
            assert b['accuracy'] == a['accuracy']
    summary = json.loads((tmp_path / 'two' / 'summary.json').read_text())
    assert summary['processes'] == 2


def test_processes_that_disagree_stop_with_one_message(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, '-m', 'routeformer', *ARGS, '--seq-len', str(seq_len),
                               '--out', str(tmp_path / f'r{rank}')],
                              env=env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR='127.0.0.1', MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, seq_len in ((0, 16), (1, 32))]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 2, err
        assert 'Traceback' not in err
        assert 'disagree' in err and 'config.model.seq_len=32 where process 0 has 16' in err
        assert 'start every process with the same command' in err
