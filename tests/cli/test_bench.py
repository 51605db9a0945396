"""End-to-end check of the benchmark harness on a tiny configuration (a few seconds per worker)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / 'benchmarks' / 'bench.py'
REGISTERED = ['routeformer-full', 'routeformer-local', 'x-transformers']


class TinyLM(nn.Module):
    """Stand-in model that always imports; returns (logits, aux_loss) like routeformer's LMs."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        logits = self.head(torch.tanh(self.emb(tokens)))
        return logits, logits.new_zeros(())


def tiny_lm(cfg):
    return TinyLM(cfg.vocab, cfg.dim)


def broken_lm(cfg):
    raise RuntimeError('broken on purpose')


def load_bench():
    spec = importlib.util.spec_from_file_location('bench', BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_writes_results_and_isolates_failures(tmp_path):
    models = ['tests.cli.test_bench:tiny_lm', 'tests.cli.test_bench:broken_lm', *REGISTERED]
    cmd = [sys.executable, str(BENCH), '--models', ','.join(models), '--lengths', '64',
           '--dim', '32', '--depth', '1', '--heads', '4', '--window', '16',
           '--repeats', '1', '--warmup', '1', '--timeout', '25', '--out', str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    for name in ('results.md', 'results.png', 'results.json'):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / 'results.json').read_text())
    rows = {row['model']: row for row in results['rows']}
    tiny = rows['tests.cli.test_bench:tiny_lm']
    assert tiny['status'] == 'ok'
    assert tiny['train_tok_s'] > 0 and tiny['infer_tok_s'] > 0 and tiny['peak_mib'] >= 0
    assert rows['tests.cli.test_bench:broken_lm']['status'] == 'error'
    assert 'broken on purpose' in rows['tests.cli.test_bench:broken_lm']['error']
    # registered models either run or, when their package is missing, only their own rows say so
    for name in REGISTERED:
        assert rows[name]['status'] in ('ok', 'not installed'), rows[name]
    assert results['machine']['torch'] == torch.__version__
    table = (tmp_path / 'results.md').read_text()
    assert '| tests.cli.test_bench:tiny_lm | no | 64 |' in table and '1.00x' in table


def test_compiled_rows_report_compile_time_apart(tmp_path):
    cmd = [sys.executable, str(BENCH), '--models', 'tests.cli.test_bench:tiny_lm', '--lengths', '64',
           '--dim', '32', '--depth', '1', '--heads', '4', '--window', '16', '--repeats', '1', '--warmup', '1',
           '--timeout', '300', '--compile', 'both', '--out', str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / 'results.json').read_text())['rows']
    assert [(r['model'], r['compiled']) for r in rows] == [('tests.cli.test_bench:tiny_lm', False),
                                                           ('tests.cli.test_bench:tiny_lm', True)]
    assert all(r['status'] == 'ok' for r in rows), rows
    eager, compiled = rows
    assert eager['compile_s'] is None and compiled['compile_s'] > 0 and compiled['train_tok_s'] > 0
    table = (tmp_path / 'results.md').read_text()
    assert '| tests.cli.test_bench:tiny_lm | yes | 64 |' in table and 'compile s' in table


def test_hung_configuration_becomes_timeout_cell():
    # the worker cannot even import torch in 0.1 s, so this exercises the real kill path
    cfg = {'model': 'x-transformers', 'length': 64, 'batch': 1, 'dim': 32, 'depth': 1, 'heads': 4,
           'vocab': 256, 'window': 16, 'repeats': 1, 'warmup': 0, 'device': 'cpu', 'dtype': 'float32'}
    assert load_bench().run_config(cfg, timeout=0.1)['status'] == 'timeout'


def test_heap_allocator_option_reaches_the_worker(monkeypatch):
    bench = load_bench()
    seen = []

    def fake_run(cmd, env, **kwargs):
        seen.append(env.get('GLIBC_TUNABLES'))
        return subprocess.CompletedProcess(cmd, 0, stdout='{"status": "ok"}\n', stderr='')
    monkeypatch.setattr(bench.subprocess, 'run', fake_run)
    monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
    cfg = {'model': 'x-transformers', 'length': 64}
    assert bench.run_config(cfg, timeout=5)['status'] == 'ok'
    assert bench.run_config(cfg, timeout=5, malloc='heap')['status'] == 'ok'
    assert seen[0] is None and 'glibc.malloc.mmap_max=0' in seen[1]


def test_flex_cpu_benchmark_writes_its_table(tmp_path):
    script = Path(__file__).resolve().parents[2] / 'benchmarks' / 'flex_cpu.py'
    out = tmp_path / 'flex'
    proc = subprocess.run([sys.executable, str(script), '--models', 'routeformer-local,routeformer-reformer',
                           '--lengths', '256', '--dim', '32', '--heads', '2', '--window', '64', '--repeats', '1',
                           '--generate-at', '256', '--new-tokens', '2', '--out', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / 'results.json').read_text())['rows']
    assert [r['model'] for r in rows] == ['routeformer-local', 'routeformer-reformer']
    assert all(r['max_abs_diff'] < 1e-4 and r['flex_tok_s'] > 0 for r in rows)
    assert '| routeformer-local | 256 |' in (out / 'results.md').read_text()


def test_selection_plans_benchmark_prints_its_tables():
    script = Path(__file__).resolve().parents[2] / 'benchmarks' / 'selection_plans.py'
    proc = subprocess.run([sys.executable, str(script), '--length', '64', '--block-size', '8', '--top-k', '2',
                           '--tokens', '8', '--heads', '2', '--dim-head', '8'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(('| random', '| of a block'))]
    assert len(rows) == 3 and all(line.rstrip().endswith('x |') for line in rows)
