"""The `routeformer` command: every subcommand on tiny sizes, exact --resume, checkpoints that
survive a crash mid-save, the data sources, and one clear message for each bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from routeformer.cli import main
from routeformer.cli import checkpoint
from routeformer.cli.config import Config, DataConfig
from routeformer.cli.data import DuplicationTask, RecallTask, TextSource, load_corpus, make_source, split_by_file, stdlib_root, text_files

from cli_runs import DUP, RESUMABLE, TINY, cli, fails, rows, without_clock

@pytest.fixture(scope='module')
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('text')
    for i in range(6):
        lines = [f'def function_{i}_{j}(x):\n    return x * {j} + {i}\n' for j in range(40)]
        (root / f'file{i}.py').write_text(''.join(lines))
    (root / 'image.bin').write_bytes(b'\x00\x01binary')  # skipped: not text
    return root


@pytest.fixture(scope='module')
def text_run(tmp_path_factory, text_dir):
    out = tmp_path_factory.mktemp('runs') / 'text'
    assert main(['train', '--data', str(text_dir), *TINY, '--steps', '6', '--eval-every', '3',
                 '--sample-length', '20', '--out', str(out)]) == 0
    return out


# ---------------------------------------------------------------- smoke: every subcommand

def test_train_text_writes_everything(text_run, capsys):
    summary = json.loads((text_run / 'summary.json').read_text())
    assert summary['complete'] and summary['step'] == 6 and summary['params'] > 0
    assert 0 < summary['val']['bpb'] < 9  # bits per byte of a model that has learned something of 256 symbols
    assert summary['tok_per_s'] > 0
    train = rows(text_run)
    assert [r['step'] for r in train] == list(range(1, 7))
    assert all(r['loss'] > 0 for r in train) and train[-1]['loss'] < train[0]['loss']
    assert [r['step'] for r in rows(text_run, 'val')] == [3, 6]
    assert (text_run / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    assert checkpoint.find_checkpoint(text_run).name == 'step-00000006'


def test_train_prints_metric_sample_and_paths(tmp_path, text_dir, capsys):
    out, _ = cli(capsys, 'train', '--data', text_dir, *TINY, '--steps', '2', '--sample-length', '12', '--out', tmp_path / 'r')
    assert 'validation bits per byte' in out
    assert 'sample:\n' in out
    assert 'vs local attention' in out  # the default family is k-means routing
    assert f'checkpoint: {tmp_path / "r" / "checkpoints" / "step-00000002"}' in out
    assert f'plot:       {tmp_path / "r" / "curves.png"}' in out


def test_eval_reports_the_training_metric(text_run, capsys):
    out, _ = cli(capsys, 'eval', text_run, '--json')
    result = json.loads(out.strip().splitlines()[-1])
    summary = json.loads((text_run / 'summary.json').read_text())
    assert result['step'] == 6
    assert result['bpb'] == pytest.approx(summary['val']['bpb'], rel=1e-9)


def test_eval_on_other_text(text_run, tmp_path, capsys):
    (tmp_path / 'other.txt').write_text('x = 1\n' * 40)
    out, _ = cli(capsys, 'eval', text_run, '--data', tmp_path / 'other.txt', '--json')
    result = json.loads(out.strip().splitlines()[-1])
    assert 'all of it' in out and result['tokens'] > 0 and result['bpb'] > 0


def test_sample_cached_equals_uncached(text_run, capsys):
    greedy = ['sample', text_run, '--prompt', 'def ', '--length', '24', '--temperature', '0']
    cached, _ = cli(capsys, *greedy)
    uncached, _ = cli(capsys, *greedy, '--no-cache')
    assert cached == uncached
    assert cached.startswith('def ') and len(cached.encode()) >= 4 + 1


def test_families_lists_registry(capsys):
    out, _ = cli(capsys, 'families')
    assert '[x] full' in out and '[x] local' in out  # x: available


@pytest.mark.parametrize('family', ['full', 'local', 'routing', 'reformer', 'sinkhorn', 'colt5', 'nsa'])
def test_registry_builds_each_family_from_the_size_flags(family):
    from routeformer.cli.config import ModelConfig
    from routeformer.cli.families import available_families, build_model
    if family not in available_families():
        pytest.skip(f'{family} is not in this routeformer yet')
    cfg = ModelConfig(family=family, dim=16, depth=1, heads=2, window=8, seq_len=32, num_tokens=8)
    model = build_model(cfg)
    assert model.max_seq_len >= 32 and model.num_tokens == 8
    out = model(torch.randint(0, 8, (2, 32)))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 32, 8) and torch.isfinite(logits).all()


def test_local_heads_flag_mixes_local_and_full_heads():
    from routeformer import LocalRouter
    from routeformer.cli.config import ModelConfig
    from routeformer.cli.families import build_model
    model = build_model(ModelConfig(family='full', dim=16, depth=1, heads=4, window=8, seq_len=32, num_tokens=8,
                                    local_heads=1))
    attn = model.transformer.blocks[0].mixers[0].fn
    assert attn.head_slices == [(0, 1), (1, 4)] and isinstance(attn.routers[0], LocalRouter)


@pytest.mark.parametrize('family, router', [('routing', 'KMeansRouter'), ('mosa', 'MoSARouter'),
                                            ('reformer', 'LSHRouter')])
def test_routed_families_give_text_half_the_heads_local_by_default(family, router):
    from routeformer.cli.config import ModelConfig
    from routeformer.cli.families import build_model
    for flag, local in ((None, 2), (0, 0)):
        model = build_model(ModelConfig(family=family, dim=16, depth=1, heads=4, window=8, seq_len=32, num_tokens=8,
                                        local_heads=flag))
        attn = model.transformer.blocks[0].mixers[0].fn
        assert attn.head_slices[-1] == (local, 4) and type(attn.routers[-1]).__name__ == router


def test_compare_two_families(tmp_path, capsys):
    # one family trains, the other fails to build: the failure is one row, not the end of the comparison
    out, _ = cli(capsys, 'compare', '--families', 'full,local', *DUP, '--steps', '3', '--out', tmp_path / 'cmp',
                 '--family-arg', 'local:no_such_kwarg=1', expect=1)
    table = (tmp_path / 'cmp' / 'compare.md').read_text()
    assert '| full |' in table and '| ok |' in table
    assert '| local |' in table and 'error' in table and 'no_such_kwarg' in table
    results = {r['family']: r for r in json.loads((tmp_path / 'cmp' / 'compare.json').read_text())}
    assert 0 <= results['full']['summary']['val']['accuracy'] <= 1 and results['local']['summary'] == {}
    assert (tmp_path / 'cmp' / 'compare.png').read_bytes()[:4] == b'\x89PNG'
    # the same settings for every family: same data, same step budget
    requests = [json.loads((tmp_path / 'cmp' / f / 'request.json').read_text()) for f in ('full', 'local')]
    assert requests[0]['data'] == requests[1]['data'] and requests[0]['train'] == requests[1]['train']
    assert [r['model']['family'] for r in requests] == ['full', 'local']


def test_compare_resume_reuses_finished_runs_and_replaces_changed_ones(tmp_path, capsys):
    args = ('compare', '--families', 'full', *DUP, '--steps', '3', '--out', tmp_path / 'cmp', '--resume')
    cli(capsys, *args)

    def result():
        return json.loads((tmp_path / 'cmp' / 'compare.json').read_text())[0]
    cli(capsys, *args)
    assert result()['status'] == 'ok' and result()['message'] == 'reused'
    # other family arguments: a new run replaces the finished one instead of failing to continue it
    cli(capsys, *args, '--family-arg', 'full:shift_tokens=True')
    assert result()['status'] == 'ok' and result()['message'] != 'reused'
    assert result()['summary']['config']['model']['kwargs'] == {'shift_tokens': True}


def test_bf16_option(tmp_path, capsys):
    cli(capsys, 'train', *DUP, '--steps', '2', '--bf16', '--out', tmp_path / 'r')
    summary = json.loads((tmp_path / 'r' / 'summary.json').read_text())
    assert summary['complete'] and summary['config']['train']['bf16'] and torch.isfinite(torch.tensor(summary['val']['loss']))


def test_compile_option_wraps_the_model():
    from routeformer.cli.distributed import Dist
    from routeformer.cli.train import Run, Trainer
    cfg = Config()
    cfg.train.compile, cfg.train.compile_backend = True, 'eager'
    net = Trainer(Run(cfg, Path('unused')), Dist()).wrap(torch.nn.Linear(2, 2))
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule)


def test_compile_option_trains_routing_and_reports_compile_time(tmp_path, capsys):
    # routing: the compiled model's k-means updates are applied by the trainer, not by backward hooks
    out, _ = cli(capsys, 'train', *DUP, '--family', 'routing', '--steps', '4', '--compile', '--compile-backend',
                 'aot_eager', '--out', tmp_path / 'r')
    summary = json.loads((tmp_path / 'r' / 'summary.json').read_text())
    assert summary['complete'] and summary['compile_time'] > 0 and summary['train_time'] > 0
    assert 's compiling' in out
    from routeformer.cli.commands import load
    _, model, _, _ = load(str(tmp_path / 'r'), 'cpu')
    routers = [m for m in model.modules() if type(m).__name__ == 'KMeansRouter']
    assert routers and all(bool(r.initted) for r in routers)
    out, _ = cli(capsys, 'eval', tmp_path / 'r', '--compile')
    assert 'compiled in' in out and 'validation accuracy' in out


def test_config_file_then_flags(tmp_path, capsys):
    cfg = tmp_path / 'run.toml'
    cfg.write_text('[model]\nsize = "tiny"\ndim = 16\nheads = 2\n[train]\nsteps = 2\nlr = 0.01\n')
    cli(capsys, 'train', '--config', cfg, *DUP, '--depth', '1', '--lr', '0.005', '--out', tmp_path / 'r')
    saved = json.loads((tmp_path / 'r' / 'config.json').read_text())
    assert saved['model']['dim'] == 16 and saved['model']['depth'] == 1  # file, then flag
    assert saved['train']['steps'] == 2 and saved['train']['lr'] == 0.005


# ---------------------------------------------------------------- resume and crashes

def test_resume_reproduces_the_uninterrupted_losses(tmp_path, capsys, whole):
    out, _ = cli(capsys, 'train', *RESUMABLE, '--out', tmp_path / 'parts', '--stop-at', '4')
    assert 'continue with `routeformer train --resume' in out
    cli(capsys, 'train', '--resume', '--out', tmp_path / 'parts', '--quiet')
    assert without_clock(tmp_path / 'parts') == without_clock(whole)  # every loss, to the last bit


def test_crash_during_save_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, whole):
    run = tmp_path / 'run'
    cli(capsys, 'train', *RESUMABLE, '--out', run, '--stop-at', '3')
    before = {p.name: p.read_bytes() for p in (run / 'checkpoints' / 'step-00000003').iterdir()}

    def crash(*a, **k):
        raise OSError('disk pulled out mid-save')
    monkeypatch.setattr(checkpoint, 'save_file', crash)  # the weights are written, the rest is not
    with pytest.raises(OSError):
        main(['train', '--resume', '--out', str(run), '--quiet'])
    monkeypatch.undo()
    capsys.readouterr()

    latest = checkpoint.find_checkpoint(run)
    assert latest.name == 'step-00000003'
    assert {p.name: p.read_bytes() for p in latest.iterdir()} == before
    assert not (run / 'checkpoints' / 'step-00000006').exists()
    cli(capsys, 'train', '--resume', '--out', run, '--quiet')
    assert without_clock(run) == without_clock(whole)
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['latest', 'step-00000003', 'step-00000006']


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tmp_path, capsys, monkeypatch, whole):
    import os
    import signal
    from routeformer.cli.train import Trainer
    step_once = Trainer.train_step

    def step_then_ctrl_c(self, step):
        out = step_once(self, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler asks the loop to stop after this step
        return out
    monkeypatch.setattr(Trainer, 'train_step', step_then_ctrl_c)
    out, _ = cli(capsys, 'train', *RESUMABLE, '--out', tmp_path / 'run', expect=130)
    assert 'interrupted at step 2 of 6' in out
    assert checkpoint.find_checkpoint(tmp_path / 'run').name == 'step-00000002'
    monkeypatch.undo()
    cli(capsys, 'train', '--resume', '--out', tmp_path / 'run', '--quiet')
    assert without_clock(tmp_path / 'run') == without_clock(whole)


@pytest.mark.parametrize('family', ['routing', 'reformer', 'sinkhorn', 'colt5', 'nsa'])
def test_routed_family_trains_resumes_and_samples(family, tmp_path, capsys):
    from routeformer.cli.families import available_families
    if family not in available_families():
        pytest.skip(f'{family} is not in this routeformer yet')
    args = ['--family', family, *DUP, '--seq-len', '32', '--steps', '3', '--eval-every', '3', '--save-every', '3']
    cli(capsys, 'train', *args, '--out', tmp_path / 'whole')
    cli(capsys, 'train', *args, '--out', tmp_path / 'parts', '--stop-at', '2')
    cli(capsys, 'train', '--resume', '--out', tmp_path / 'parts', '--quiet')
    assert without_clock(tmp_path / 'parts') == without_clock(tmp_path / 'whole')  # centroids, sort nets, routers too
    out, _ = cli(capsys, 'sample', tmp_path / 'whole', '--prompt-ids', '0,1,2', '--length', '5', '--temperature', '0')
    assert len(out.split()) == 5 and all(0 <= int(t) < 8 for t in out.split())


def test_weights_round_trip_with_tied_weights_and_extra_state(tmp_path):
    from routeformer import TransformerLM

    class Seeded(torch.nn.Module):  # extra state, as an LSH router keeps its rotation seed
        seed = 0

        def get_extra_state(self):
            return dict(seed=self.seed)

        def set_extra_state(self, state):
            self.seed = state['seed']

    def build():
        torch.manual_seed(0)
        m = TransformerLM(num_tokens=8, dim=16, depth=2, max_seq_len=8, heads=2, weight_tie=True, tie_embedding=True)
        m.seeded = Seeded()
        return m
    a, b = build(), build()
    torch.nn.init.normal_(a.token_emb.weight)
    a.seeded.seed = 2 ** 62 + 1
    checkpoint.save_weights(a, tmp_path / 'w.safetensors')
    b.load_state_dict(checkpoint.read_weights(tmp_path / 'w.safetensors'))
    assert b.seeded.seed == 2 ** 62 + 1
    assert b.transformer.blocks[0].mixers[0].fn is b.transformer.blocks[1].mixers[0].fn  # still tied
    x = torch.randint(0, 8, (2, 8))
    assert torch.equal(a(x)[0], b(x)[0])


# ---------------------------------------------------------------- data

def test_default_data_is_the_stdlib_split_by_file():
    root = stdlib_root()
    files = text_files(root, only_python=True)
    train, val = split_by_file(files, root, 0.05)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(files)
    assert 0.01 < len(val) / len(files) < 0.1
    assert set(split_by_file(list(reversed(files)), root, 0.05)[1]) == set(val)  # deterministic, order-free
    assert all('site-packages' not in p.parts for p in files)


def test_text_folder_split_and_batches(text_dir):
    corpus = load_corpus(str(text_dir), val_fraction=0.2)
    assert corpus.train.numel() > 0 and corpus.val.numel() > 0
    assert b'\x00' not in bytes(corpus.train.tolist())  # the binary file is skipped
    source = TextSource(corpus, seq_len=16, seed=3)
    a, b = source.train_batch(7, 4), source.train_batch(7, 4)
    assert torch.equal(a.x, b.x) and a.x.shape == (4, 17)
    assert not torch.equal(a.x, source.train_batch(8, 4).x)
    # two processes split one global batch between them
    halves = torch.cat([source.train_batch(7, 4, rank, 2).x for rank in range(2)])
    assert torch.equal(halves, a.x)


def test_duplication_task_layout():
    task = DuplicationTask(16, 8, seed=0)
    batch = task.train_batch(1, 5)
    x, scored = batch.x, batch.scored
    assert x.shape == (5, 17) and scored.shape == (5, 16)
    assert torch.equal(x[:, 1:8], x[:, 9:16]) and (x[:, [0, 8, 16]] == 0).all()
    targets = x[:, 1:]
    assert torch.equal(targets[scored].view(5, 7), x[:, 9:16])  # the second copy, and only it
    assert ((x[:, 1:8] >= 1) & (x[:, 1:8] < 8)).all()


def test_recall_task_answers_are_the_paired_values():
    task = RecallTask(32, 16, pairs=5, queries=3, seed=0)
    batch = task.train_batch(2, 6)
    x, scored = batch.x, batch.scored
    assert scored.sum(dim=1).tolist() == [3] * 6
    for row, mask in zip(x, scored):
        pairs = {int(k): int(v) for k, v in zip(row[0:10:2], row[1:10:2])}
        assert len(pairs) == 5 and all(1 <= k <= 7 and 8 <= v < 16 for k, v in pairs.items())
        answers = mask.nonzero().flatten() + 1  # target t is token t + 1
        for pos in answers.tolist():
            assert pairs[int(row[pos - 1])] == int(row[pos])
        asked = row[answers - 1].tolist()
        assert len(set(asked)) == 3  # distinct: no answer to copy from an earlier query close by
        assert (row[10:answers[0] - 1] == 0).all()


def test_validation_set_is_fixed_across_seeds():
    a = next(make_source(DataConfig(task='recall', vocab=16, recall_pairs=4), seq_len=16, seed=0).val_batches(2, 1))
    b = next(make_source(DataConfig(task='recall', vocab=16, recall_pairs=4), seq_len=16, seed=9).val_batches(2, 1))
    assert torch.equal(a.x, b.x)


# ---------------------------------------------------------------- bad input: one message each

def test_missing_data_path(tmp_path, capsys):
    fails(capsys, 'train', '--data', tmp_path / 'nope', *TINY, '--out', tmp_path / 'r', match='does not exist')


def test_empty_data(tmp_path, capsys):
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'folder').mkdir()
    fails(capsys, 'train', '--data', tmp_path / 'empty.txt', *TINY, '--out', tmp_path / 'r', match='is empty')
    fails(capsys, 'train', '--data', tmp_path / 'folder', *TINY, '--out', tmp_path / 'r', match='no text files')


def test_data_shorter_than_a_sequence(tmp_path, capsys):
    (tmp_path / 'short.txt').write_text('tiny text\n' * 3)
    fails(capsys, 'train', '--data', tmp_path / 'short.txt', *TINY, '--out', tmp_path / 'r', match='lower --seq-len')


def test_sequence_length_the_model_cannot_take(tmp_path, capsys):
    err = fails(capsys, 'train', '--family', 'local', *DUP, '--seq-len', '20', '--out', tmp_path / 'r',
                match='not a multiple of 8')
    assert '--seq-len 24' in err
    fails(capsys, 'train', *DUP, '--seq-len', '15', '--window', '5', '--out', tmp_path / 'r', match='even --seq-len')


def test_checkpoint_of_a_different_model(tmp_path, capsys, text_run):
    run = tmp_path / 'dup'
    cli(capsys, 'train', *DUP, '--steps', '2', '--out', run)
    fails(capsys, 'train', '--resume', '--out', run, '--dim', '32', match='model.dim: 16 -> 32')
    # weights of another model in this checkpoint's folder
    ckpt = checkpoint.find_checkpoint(run)
    shutil.copy(checkpoint.find_checkpoint(text_run) / 'model.safetensors', ckpt / 'model.safetensors')
    fails(capsys, 'eval', run, match='does not fit this model')


def test_checkpoint_of_another_version(tmp_path, capsys):
    run = tmp_path / 'dup'
    cli(capsys, 'train', *DUP, '--steps', '1', '--out', run)
    state_file = checkpoint.find_checkpoint(run) / 'state.json'
    state = json.loads(state_file.read_text())
    state.update(format=99, routeformer='9.9.9')
    state_file.write_text(json.dumps(state))
    err = fails(capsys, 'sample', run, '--prompt-ids', '0', match='checkpoint format 99')
    assert '9.9.9' in err


def test_prompt_the_model_cannot_encode(tmp_path, capsys):
    run = tmp_path / 'dup'
    cli(capsys, 'train', *DUP, '--steps', '1', '--out', run)
    fails(capsys, 'sample', run, '--prompt', 'é', match='cannot encode')
    fails(capsys, 'sample', run, '--prompt-ids', '0,9', match='outside this model')
    out, _ = cli(capsys, 'sample', run, '--prompt-ids', '0,3,5', '--length', '4')
    assert all(0 <= int(t) < 8 for t in out.split())


def test_run_folder_mistakes(tmp_path, capsys):
    run = tmp_path / 'dup'
    fails(capsys, 'train', '--resume', *DUP, '--out', run, match='nothing to resume')
    cli(capsys, 'train', *DUP, '--steps', '1', '--out', run)
    fails(capsys, 'train', *DUP, '--steps', '1', '--out', run, match='add --resume')
    fails(capsys, 'train', '--resume', '--out', run, match='run in')  # complete: raise --steps
    fails(capsys, 'eval', tmp_path / 'missing', match='does not exist')


def test_bad_settings(tmp_path, capsys):
    fails(capsys, 'train', '--family', 'nonesuch', *DUP, '--out', tmp_path / 'r', match='unknown family')
    (tmp_path / 'bad.json').write_text(json.dumps(dict(model=dict(dimension=3))))
    fails(capsys, 'train', '--config', tmp_path / 'bad.json', '--out', tmp_path / 'r', match="unknown key(s) ['dimension']")
    (tmp_path / 'bad.toml').write_text('[train]\nlr = "fast"\n')
    fails(capsys, 'train', '--config', tmp_path / 'bad.toml', '--out', tmp_path / 'r', match='lr must be a float')
    fails(capsys, 'train', *DUP, '--heads', '3', '--out', tmp_path / 'r', match='not divisible by --heads')
    fails(capsys, 'train', *DUP, '--model-arg', 'no_such=1', '--out', tmp_path / 'r', match='no_such')
    fails(capsys, 'train', '--family', 'local', *DUP, '--local-heads', '1', '--out', tmp_path / 'r',
          match='--local-heads does not apply')
    fails(capsys, 'train', '--task', 'recall', '--vocab', '8', '--recall-pairs', '5', *TINY, '--out', tmp_path / 'r',
          match='raise --vocab')
    fails(capsys, 'train', *DUP, '--data', 'x.txt', '--out', tmp_path / 'r', match='--data is for text')
    fails(capsys, 'train', *DUP, '--device', 'gpu0', '--out', tmp_path / 'r', match='is not a device')
    if not torch.cuda.is_available():
        fails(capsys, 'train', *DUP, '--device', 'cuda', '--out', tmp_path / 'r', match='use --device cpu')
    fails(capsys, 'compare', '--family', 'full', *DUP, '--out', tmp_path / 'c', match='drop --family')
    fails(capsys, 'compare', '--families', 'full,nonesuch', *DUP, '--out', tmp_path / 'c', match="unknown ['nonesuch']")


def test_config_round_trip():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- as written (slow)

@pytest.mark.slow
def test_readme_main_command(tmp_path, capsys, monkeypatch):
    """`routeformer train` (k-means routing on the Python standard library), as the README runs it."""
    monkeypatch.chdir(tmp_path)
    out, _ = cli(capsys, 'train', '--quiet')
    assert 'validation bits per byte' in out and 'sample:' in out and 'vs local attention' in out
    summary = json.loads((tmp_path / 'runs' / 'routing-stdlib' / 'summary.json').read_text())
    assert summary['complete'] and summary['val']['bpb'] < 3.5  # a unigram model of Python source is about 4.5
    assert (tmp_path / 'runs' / 'routing-stdlib' / 'curves.png').is_file()


BENCHMARKS = Path(__file__).resolve().parents[2] / 'benchmarks'


def run_benchmark_tiny(script: str, families: str, out: Path) -> None:
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), '--families', families, '--tiny', '--quiet',
                           '--out', str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_long_range_script_tiny(tmp_path):
    run_benchmark_tiny('long_range.py', 'full,local', tmp_path)
    rows = json.loads((tmp_path / 'long_range.json').read_text())
    assert {(r['task'], r['family']) for r in rows} == {(t, f) for t in ('duplication', 'recall') for f in ('full', 'local')}
    assert all(0 <= r['accuracy'] <= 1 for r in rows)


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (the folder is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_long_range_seed_table_counts_the_seeds_that_learn():
    rows = ([dict(task='recall', family='full', accuracy=a) for a in (1.0, 0.07, 0.99)]
            + [dict(task='recall', family='moba', accuracy=a) for a in (0.5, None, 0.96)])
    table = benchmark_module('long_range').seed_table(rows)
    assert '| recall | full | 2 of 3 | 99.0% | 100% |' in table
    assert '| recall | moba | 1 of 3 | 73.0% | 74% |' in table  # the unfinished seed counts as not learned


def test_long_range_batch_size_keeps_the_validation_set():
    cfg = benchmark_module('long_range').task_config('recall', tiny=False, steps=None, seed=2, batch_size=64)
    assert cfg['train']['batch_size'] * cfg['train']['eval_batches'] == 16 * 16
    assert cfg['train']['seed'] == 2 and cfg['train']['steps'] == 3000


@pytest.mark.slow
def test_long_range_script_several_seeds_tiny(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(BENCHMARKS / 'long_range.py'), '--families', 'full,local', '--tasks',
                           'recall', '--seeds', '0,1', '--tiny', '--quiet', '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / 'long_range.json').read_text())
    assert {(r['family'], r['seed']) for r in rows} == {(f, s) for f in ('full', 'local') for s in (0, 1)}
    assert (tmp_path / 'recall' / 'seed1' / 'full' / 'metrics.jsonl').exists()
    assert '| recall | local |' in (tmp_path / 'long_range.md').read_text().split('seeds at 95%')[1]


def real_text_module():
    return benchmark_module('real_text')


def test_real_text_reads_a_curve_at_a_time():
    bpb_at = real_text_module().bpb_at
    curve = [dict(train_time=10., bpb=4.), dict(train_time=20., bpb=3.), dict(train_time=40., bpb=2.5)]
    assert bpb_at(curve, 15.) == pytest.approx(3.5)
    assert bpb_at(curve, 30.) == pytest.approx(2.75)
    assert bpb_at(curve, 40.) == pytest.approx(2.5)
    assert bpb_at(curve, 5.) is None and bpb_at(curve, 41.) is None  # outside the curve: unknown


def test_real_text_tabulates_stored_runs_without_training(tmp_path):
    def store(variant, family, bpb, complete=True):
        run = tmp_path / '64' / variant / 'seed0' / family
        run.mkdir(parents=True)
        summary = dict(complete=complete, val=dict(bpb=bpb), train_time=20., tok_per_s=100.)
        (run / 'summary.json').write_text(json.dumps(summary))
        (run / 'metrics.jsonl').write_text(''.join(json.dumps(dict(split='val', train_time=t, bpb=b)) + '\n'
                                                   for t, b in ((10., bpb + 1), (20., bpb))))
    store('recommended', 'full', 3.)
    store('recommended', 'local', 2.5)
    store('seed', 'sinkhorn', 4., complete=False)  # a run that did not finish
    store('recommended', 'sinkhorn', 2.)
    code = real_text_module().main(['--families', 'full,local,sinkhorn', '--lengths', '64', '--table-only',
                                    '--out', str(tmp_path)])
    rows = json.loads((tmp_path / 'real_text.json').read_text())['rows']
    assert code == 1 and [r['status'] for r in rows] == ['ok', 'ok', 'missing', 'ok']
    assert rows[3]['bpb'] == 2. and rows[3]['vs_full'] == pytest.approx(-1 / 3) and rows[3]['vs_local'] == -0.5
    assert rows[3]['bpb_at_budget'] == 2.  # every curve read at the shortest run's time


@pytest.mark.slow
def test_real_text_script_tiny(tmp_path):
    run_benchmark_tiny('real_text.py', 'full,local,sinkhorn', tmp_path)
    rows = json.loads((tmp_path / 'real_text.json').read_text())['rows']
    assert [(r['family'], r['variant']) for r in rows] == [('full', '-'), ('local', '-'), ('sinkhorn', 'seed defaults'),
                                                          ('sinkhorn', 'recommended')]
    assert all(r['bpb'] > 0 for r in rows) and rows[0]['vs_full'] == 0


def test_recall_probe_reads_a_trained_recall_run(tmp_path):
    import subprocess
    import sys
    out = tmp_path / 'recall'
    assert main(['train', '--family', 'moba', '--task', 'recall', '--vocab', '16', '--recall-pairs', '4', *TINY,
                 '--steps', '2', '--out', str(out)]) == 0
    proc = subprocess.run([sys.executable, str(BENCHMARKS / 'recall_probe.py'), str(out), '--batch', '4',
                           '--block-size', '8'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('accuracy ') and 'layer 0, per head: value token attendable' in proc.stdout
