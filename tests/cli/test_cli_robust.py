"""The command line loses nothing: damaged checkpoints are skipped on resume and refused by every
loader, a diverging run stops with its good checkpoints kept, two runs cannot share a folder, and
nonsensical numbers get one line each."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import routeformer
from routeformer.cli import checkpoint, main

from cli_runs import DUP, RESUMABLE, cli, fails, rows, without_clock


def strict_json(text: str):
    """json.loads that refuses the bare NaN and Infinity Python's json module writes by default."""
    def refuse(name):
        raise ValueError(f'{name} is not JSON')
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope='module')
def stopped_at_5(tmp_path_factory):
    run = tmp_path_factory.mktemp('runs') / 'stopped'
    assert main(['train', *RESUMABLE, '--out', str(run), '--stop-at', '3']) == 0
    assert main(['train', '--resume', '--out', str(run), '--stop-at', '5', '--quiet']) == 0
    assert [c.name for c in checkpoint.candidates(run)] == ['step-00000005', 'step-00000003']
    return run


@pytest.fixture
def two_checkpoints(tmp_path, stopped_at_5, capsys):
    """A copy of a run stopped at step 5 with checkpoints at steps 3 and 5."""
    capsys.readouterr()
    return Path(shutil.copytree(stopped_at_5, tmp_path / 'run'))


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


DAMAGE = {
    'latest emptied': lambda ckpt: (ckpt.parent / 'latest').write_text(''),
    'newest removed': shutil.rmtree,
    'weights truncated': lambda ckpt: truncate(ckpt / 'model.safetensors'),
    'train state truncated': lambda ckpt: truncate(ckpt / 'train_state.safetensors'),
    'weights bit-flipped': lambda ckpt: flip_last_byte(ckpt / 'model.safetensors'),
    'state.json emptied': lambda ckpt: (ckpt / 'state.json').write_text(''),
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_resume_falls_back_to_the_newest_intact_checkpoint(damage, two_checkpoints, capsys, whole):
    run = two_checkpoints
    DAMAGE[damage](run / 'checkpoints' / 'step-00000005')
    with open(run / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 6, "split": "tr')  # a line torn by a crash mid-write
    out, err = cli(capsys, 'train', '--resume', '--out', run, '--quiet')
    # with `latest` unreadable the newest step-* folder is the newest checkpoint, and it is intact
    step = 5 if damage == 'latest emptied' else 3
    assert f'resuming from {run / "checkpoints" / f"step-0000000{step}"} at step {step}' in out
    skipped = [line for line in err.splitlines() if 'skipping' in line]
    if damage in ('latest emptied', 'newest removed'):
        assert not skipped  # the newest folder is intact or gone: nothing to skip
    else:
        assert len(skipped) == 1 and 'step-00000005' in skipped[0], err
    assert without_clock(run) == without_clock(whole)  # as if nothing had happened


def test_a_run_is_never_restarted_over_its_checkpoints_without_overwrite(two_checkpoints, capsys):
    run = two_checkpoints
    (run / 'checkpoints' / 'latest').write_text('')
    before = {p: p.read_bytes() for p in run.rglob('*') if p.is_file() and p.name != '.lock'}
    fails(capsys, 'train', *RESUMABLE, '--out', run, match='already holds a checkpoint (step-00000005)')
    assert {p: p.read_bytes() for p in run.rglob('*') if p.is_file() and p.name != '.lock'} == before
    for ckpt in checkpoint.candidates(run):
        truncate(ckpt / 'model.safetensors')
    _, err = cli(capsys, 'train', '--resume', '--out', run, expect=2)
    assert len(err.splitlines()) == 3 and 'none of its checkpoints is intact; --overwrite' in err.splitlines()[-1]
    cli(capsys, 'train', *RESUMABLE, '--out', run, '--overwrite')
    assert [c.name for c in checkpoint.candidates(run)] == ['step-00000006', 'step-00000003']


def test_resume_from_a_chosen_step(two_checkpoints, capsys, whole):
    run = two_checkpoints
    fails(capsys, 'train', '--resume-from', '4', '--out', run, match='no checkpoint at step 4 (it has steps: 3, 5)')
    out, _ = cli(capsys, 'train', '--resume-from', '3', '--out', run, '--quiet')
    assert 'step-00000003 at step 3' in out
    assert without_clock(run) == without_clock(whole)
    fails(capsys, 'train', '--resume-from', '3', '--overwrite', '--out', run, match='give one of them')


def test_damaged_weights_are_refused_by_every_loader(two_checkpoints, capsys):
    run = two_checkpoints
    weights = run / 'checkpoints' / 'step-00000005' / 'model.safetensors'
    cli(capsys, 'eval', run)
    flip_last_byte(weights)
    for argv in (('eval', run), ('sample', run, '--prompt-ids', '0', '--length', '2')):
        err = fails(capsys, *argv, match='does not match its checksum')
        assert str(weights) in err
    with pytest.raises(ValueError, match='does not match its checksum'):
        routeformer.load(run)
    cli(capsys, 'eval', run / 'checkpoints' / 'step-00000003')  # the older one is intact


def test_checkpoints_without_a_checksum_still_load(two_checkpoints, capsys):
    weights = two_checkpoints / 'checkpoints' / 'step-00000005' / 'model.safetensors'
    with safe_open(str(weights), framework='pt') as f:  # the metadata as written before checksums
        meta = {k: v for k, v in f.metadata().items() if k != checkpoint.CHECKSUM}
    save_file(load_file(str(weights)), str(weights), metadata=meta)
    cli(capsys, 'eval', two_checkpoints)


# ---------------------------------------------------------------- divergence

def test_a_skipped_step_leaves_weights_optimizer_and_buffers_untouched(tmp_path, capsys, monkeypatch):
    from routeformer.cli import train
    args = ['train', *RESUMABLE, '--family', 'routing', '--seq-len', '32']  # k-means centroids are buffers
    cli(capsys, *args, '--out', tmp_path / 'two', '--stop-at', '2')
    calls = []
    batch_loss = train.batch_loss

    def poisoned(*a, **k):
        calls.append(1)
        loss, ce = batch_loss(*a, **k)
        return (loss * float('nan'), ce * float('nan')) if len(calls) == 3 else (loss, ce)
    monkeypatch.setattr(train, 'batch_loss', poisoned)
    _, err = cli(capsys, *args, '--out', tmp_path / 'three', '--stop-at', '3')
    assert 'step 3: non-finite loss or gradient, step skipped' in err

    two, three = (checkpoint.find_checkpoint(tmp_path / r) for r in ('two', 'three'))
    assert three.name == 'step-00000003'
    a, b = (checkpoint.read_weights(c / 'model.safetensors') for c in (two, three))
    assert a.keys() == b.keys() and any('means' in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    sa, sb = (load_file(str(c / 'train_state.safetensors')) for c in (two, three))
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith('optimizer.'))
    ja, jb = (strict_json((c / 'state.json').read_text())['optimizer'] for c in (two, three))
    assert ja['scalars'] == jb['scalars']  # AdamW's step count did not move
    assert rows(tmp_path / 'three')[-1] == {**rows(tmp_path / 'three')[-1], 'loss': None, 'skipped': True}


def test_divergence_stops_and_keeps_the_good_checkpoints(tmp_path, capsys):
    run = tmp_path / 'run'
    args = [*DUP, '--steps', '20', '--eval-every', '2', '--save-every', '1', '--keep', '2']
    cli(capsys, 'train', *args, '--out', run, '--stop-at', '2')
    good = checkpoint.read_weights(run / 'checkpoints' / 'step-00000002' / 'model.safetensors')
    _, err = cli(capsys, 'train', '--resume', '--out', run, '--lr', '1e30', '--max-bad-steps', '2', '--quiet', expect=2)
    assert err.strip().splitlines()[-1].startswith('routeformer train: error: training diverged')
    assert 'Traceback' not in err
    kept = checkpoint.candidates(run)
    assert run / 'checkpoints' / 'step-00000002' in kept
    for ckpt in kept:  # nothing non-finite was saved
        weights = checkpoint.read_weights(ckpt / 'model.safetensors')
        assert all(torch.isfinite(v).all() for v in weights.values() if torch.is_tensor(v) and v.is_floating_point())
    after = checkpoint.read_weights(run / 'checkpoints' / 'step-00000002' / 'model.safetensors')
    assert all(torch.equal(good[k], after[k]) for k in good if torch.is_tensor(good[k]))
    lines = (run / 'metrics.jsonl').read_text().splitlines()
    parsed = [strict_json(line) for line in lines]
    assert any(r.get('skipped') for r in parsed)
    for f in run.rglob('*.json'):
        strict_json(f.read_text())


def test_summary_and_metrics_are_strict_json(tmp_path, capsys, monkeypatch):
    from routeformer.cli import train
    evaluate = train.evaluate
    monkeypatch.setattr(train, 'evaluate', lambda *a, **k: {**evaluate(*a, **k), 'loss': float('nan')})
    cli(capsys, 'train', *DUP, '--steps', '2', '--eval-every', '1', '--out', tmp_path / 'r')
    summary = strict_json((tmp_path / 'r' / 'summary.json').read_text())
    assert summary['val']['loss'] is None
    assert [strict_json(line)['loss'] for line in (tmp_path / 'r' / 'metrics.jsonl').read_text().splitlines()
            if '"val"' in line] == [None, None]


# ---------------------------------------------------------------- flags and run folders

@pytest.mark.parametrize('argv, match', [
    (['eval', 'RUN', '--batch-size', '-3'], 'argument --batch-size: must be a positive integer, got -3'),
    (['eval', 'RUN', '--eval-batches', '0'], 'argument --eval-batches: must be a positive integer'),
    (['sample', 'RUN', '--temperature', '-1'], 'argument --temperature: must be a finite number, 0 or more'),
    (['sample', 'RUN', '--length', '0'], 'argument --length: must be a positive integer'),
    (['sample', 'RUN', '--filter-thres', '2'], 'argument --filter-thres: must be between 0 and 1'),
    (['train', *DUP, '--steps', '0', '--out', 'RUN'], '--steps must be a positive integer, got 0'),
    (['train', *DUP, '--batch-size', '-1', '--out', 'RUN'], '--batch-size must be a positive integer'),
    (['train', *DUP, '--seq-len', '-16', '--out', 'RUN'], '--seq-len must be a positive integer'),
    (['train', *DUP, '--lr', '-1', '--out', 'RUN'], '--lr must be a positive number'),
    (['train', *DUP, '--lr', 'nan', '--out', 'RUN'], '--lr must be a positive number'),
    (['train', *DUP, '--grad-clip', '-1', '--out', 'RUN'], '--grad-clip must be a finite number'),
    (['train', *DUP, '--sample-length', '-1', '--out', 'RUN'], '--sample-length must be 0 or more'),
    (['train', *DUP, '--max-bad-steps', '-1', '--out', 'RUN'], '--max-bad-steps must be 0 or more'),
    (['train', *DUP, '--stop-at', '0', '--out', 'RUN'], 'argument --stop-at: must be a positive integer'),
    (['train', *DUP, '--steps', 'many', '--out', 'RUN'], "argument --steps: invalid int value: 'many'"),
    (['compare', *DUP, '--timeout', '0', '--out', 'RUN'], 'argument --timeout: must be more than 0'),
])
def test_nonsensical_numbers_get_one_line(argv, match, tmp_path, capsys):
    fails(capsys, *[str(tmp_path / 'r') if a == 'RUN' else a for a in argv], match=match)


def test_a_second_writer_of_a_run_folder_refuses(tmp_path, capsys):
    run = tmp_path / 'run'
    with checkpoint.run_lock(run):
        fails(capsys, 'train', *DUP, '--steps', '1', '--out', run, match='is in use by another routeformer process')
    assert not checkpoint.holds_run(run)
    # a holder killed with SIGKILL leaves no stale lock
    holder = subprocess.Popen([sys.executable, '-c', 'import fcntl, sys, time; f = open(sys.argv[1], "a"); '
                               'fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(60)',
                               str(run / '.lock')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        fails(capsys, 'train', *DUP, '--steps', '1', '--out', run, match='is in use by another')
    finally:
        holder.kill()
        holder.wait()
    cli(capsys, 'train', *DUP, '--steps', '1', '--out', run)


# ---------------------------------------------------------------- version, load, help

def test_version(capsys):
    import importlib.metadata
    assert routeformer.__version__ == importlib.metadata.version('routeformer')
    out, _ = cli(capsys, '--version')
    assert out.strip() == f'routeformer {routeformer.__version__}'


def test_load_a_run_trained_by_the_command_line(tmp_path, capsys):
    run = tmp_path / 'run'
    cli(capsys, 'train', *DUP, '--steps', '2', '--out', run)
    model, config = routeformer.load(run)
    assert not model.training and config.model.family == 'routing' and config.train.steps == 2
    x = torch.randint(0, 8, (1, 16))
    expected = routeformer.load(run / 'checkpoints' / 'step-00000002')[0](x)[0]
    assert torch.equal(model(x)[0], expected)
    with pytest.raises(ValueError, match='does not exist'):
        routeformer.load(tmp_path / 'missing')


def test_families_marks_the_available_ones(capsys, monkeypatch):
    from routeformer.cli import families
    monkeypatch.setitem(families.FAMILIES, 'ghost', families.Family('ghost', 'NoSuchLM', 'not installed', dict))
    out, _ = cli(capsys, 'families')
    assert '[x] full' in out and '[x] routing' in out and '[ ] ghost' in out
    assert out.strip().splitlines()[-1] == '[ ]: not in this installation (ghost)'


def test_help_shows_defaults_and_only_accepted_flags(capsys):
    out, _ = cli(capsys, 'compare', '--help')
    assert '--families' in out and '--family ' not in out and '--family\n' not in out
    out, _ = cli(capsys, 'eval', '--help')
    assert '(default: the training batch size)' in out and '(default auto)' in out
    out, _ = cli(capsys, 'sample', '--help')
    assert '(default 200)' in out and '(default 0.8)' in out and 'default top_k' in out


def test_the_routing_claim_printed_after_training_is_the_readmes_measurement():
    import re
    from routeformer.cli.train import VERSUS_LOCAL
    readme = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    # the long-range table: | model | duplication | recall |, local with its chance level
    routing = re.search(r'^\| routing \| ([\d.]+%) \|', readme, flags=re.M).group(1)
    local, chance = re.search(r'^\| local \| ([\d.]+%) \(chance ([\d.]+%)\) \|', readme, flags=re.M).groups()
    assert f'routing reached {routing}' in VERSUS_LOCAL.replace('\n', ' ')
    assert f'local attention {local} (chance {chance}' in VERSUS_LOCAL
