"""`routeformer train`: the training loop, with validation, metrics, plots, checkpoints and
exact resumption.

What makes `--resume` exact: batches are a function of (seed, step) (see data.py), and a
checkpoint holds the weights and buffers, the optimizer moments, the RNG state and the step; the
learning rate is a function of the step. Metrics written after the checkpoint's step are dropped
on resume, since those steps run again.

A step whose loss or gradient is not finite is skipped, leaving the weights, the optimizer and
every buffer as they were; more than --max-bad-steps of them in a row stop the run with the last
good checkpoint kept (no checkpoint is written during such a streak).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..routers import apply_statistics, discard_statistics
from . import checkpoint
from .config import Config, TrainConfig, config_from_args, validate
from .data import make_source
from .distributed import Dist, all_sum, barrier, check_agreement, launched_rank, setup, teardown
from .errors import CLIError
from .evaluate import batch_loss, evaluate, metric_line
from .families import FAMILIES, build_model, count_parameters
from .plot import plot_run, read_metrics
from .sample import decode_text, generate

MIB = 2 ** 20
COMPILE_STEPS = 2  # see Trainer.loop
PLOT_EVERY_S = 60  # redraw curves.png at a checkpoint at most this often (and always at the end)


def default_out(cfg: Config) -> Path:
    data = cfg.data.task if cfg.data.task != 'text' else (Path(cfg.data.data).stem if cfg.data.data else 'stdlib')
    return Path('runs') / f'{cfg.model.family}-{data}'


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step <= t.warmup:
        return t.lr * step / max(t.warmup, 1)
    progress = (step - t.warmup) / max(t.steps - t.warmup, 1)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.))))


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on biases, norms and gates (the usual GPT recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=t.weight_decay), dict(params=rest, weight_decay=0.)],
                             lr=t.lr, betas=(0.9, 0.95))


def config_diff(a, b, section: str) -> list[str]:
    return [f'{section}.{k}: {getattr(a, k)!r} -> {getattr(b, k)!r}' for k in vars(a) if getattr(a, k) != getattr(b, k)]


@dataclass
class Run:
    cfg: Config
    out: Path
    ckpt: Path | None = None          # resume from here
    state: dict = field(default_factory=dict)
    stop_at: int | None = None
    quiet: bool = False
    overwrite: bool = False


def prepare(args, cfg: Config, out: Path) -> Run:
    """Resolves the configuration against the run folder: a fresh run, or the continuation of the
    newest intact checkpoint there (whose model and data settings must not change)."""
    run = Run(cfg, out, stop_at=args.stop_at, quiet=args.quiet, overwrite=args.overwrite)
    resume = args.resume or args.resume_from is not None
    if resume and args.overwrite:
        raise CLIError('--overwrite starts the run over, --resume continues it: give one of them')
    if resume:
        note = checkpoint.skip_note if launched_rank() == 0 else (lambda message: None)
        found = checkpoint.find_resumable(out, args.resume_from, note) if out.is_dir() else None
        if found is None:
            if out.is_dir() and checkpoint.holds_run(out):
                raise CLIError(f'nothing to resume in {out}: none of its checkpoints is intact; --overwrite starts '
                               f'the run over there')
            raise CLIError(f'nothing to resume in {out}: it holds no checkpoint; train without --resume to start a run there')
        ckpt, state = found
        saved = Config.from_dict(state['config'], source=str(ckpt / checkpoint.STATE_FILE))
        cfg, _ = config_from_args(args, base=saved)
        cfg.model.num_tokens = saved.model.num_tokens
        changed = config_diff(saved.model, cfg.model, 'model') + config_diff(saved.data, cfg.data, 'data')
        if changed:
            raise CLIError(f'the checkpoint in {out} was trained with other model or data settings ({"; ".join(changed)}): '
                           f'drop those flags to continue it, or start a new run with another --out')
        run.cfg, run.ckpt, run.state = cfg, ckpt, state
    elif out.is_dir() and checkpoint.holds_run(out) and not args.overwrite:
        ckpt = checkpoint.find_checkpoint(out)
        what = f'a checkpoint ({ckpt.name})' if ckpt is not None else 'a run'
        raise CLIError(f'{out} already holds {what}: add --resume to continue it, --overwrite to start over, or '
                       f'choose another --out')
    validate(run.cfg)
    return run


def main(args) -> int:
    cfg, _ = config_from_args(args)
    out = Path(args.out) if args.out else default_out(cfg)
    # one writer per run folder: process 0 writes, the others of a torchrun run only read
    with checkpoint.run_lock(out) if launched_rank() == 0 else contextlib.nullcontext():
        run = prepare(args, cfg, out)
        d = setup(run.cfg.train.device)
        try:
            code = Trainer(run, d).fit()
            # the trainer's DistributedDataParallel holds the process group and gloo threads: free it
            # while the group lives, and leave together, since gloo aborts a process whose peer is
            # still tearing down its side of a connection
            gc.collect()
            barrier(d)
        finally:
            teardown(d)
        return code


# ---------------------------------------------------------------- memory

def memory_baseline(device: torch.device) -> int:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:  # Linux; elsewhere the CPU figure is left out
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


def peak_memory_mib(device: torch.device, baseline: int) -> float | None:
    """CUDA: peak allocated; CPU: growth of the peak resident set over the baseline taken before
    training (the training step's working memory, not the weights or the data)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / MIB
    if baseline == 0:
        return None
    import resource  # POSIX only; the baseline above is Linux only anyway
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / MIB


# ---------------------------------------------------------------- the loop

class MetricsLog:
    """metrics.jsonl, one JSON object per line; rows past `keep_through` (steps to be rerun on
    resume) are dropped first."""

    def __init__(self, path: Path, keep_through: int):
        self.path = path
        rows = [r for r in read_metrics(path) if r['step'] <= keep_through]
        checkpoint.write_atomic(path, ''.join(checkpoint.to_json(r) + '\n' for r in rows))
        self.file = open(path, 'a')

    def write(self, row: dict) -> None:
        self.file.write(checkpoint.to_json(row) + '\n')
        self.file.flush()

    def close(self):
        self.file.close()


class Interrupt:
    """The first Ctrl-C ends training after the current step with a checkpoint; the second one
    stops at once (single process only: under torchrun every process must stop at the same step)."""

    def __init__(self, enabled: bool):
        self.requested = False
        self.enabled = enabled and hasattr(signal, 'SIGINT')
        self.previous = None

    def __enter__(self):
        if self.enabled:
            try:
                self.previous = signal.signal(signal.SIGINT, self.handle)
            except ValueError:  # not the main thread
                self.enabled = False
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


class Trainer:
    def __init__(self, run: Run, d: Dist):
        self.run, self.d = run, d
        self.cfg, self.t = run.cfg, run.cfg.train
        self.device = d.device
        self.main = d.is_main
        self.plotted = time.monotonic()

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def fit(self) -> int:
        cfg, t, d, run = self.cfg, self.t, self.d, self.run
        if t.batch_size % d.world:
            raise CLIError(f'--batch-size {t.batch_size} is not divisible by the {d.world} processes: use a multiple '
                           f'of {d.world} (the batch size counts the sequences of all processes together)')
        source = make_source(cfg.data, seq_len=cfg.model.seq_len, seed=t.seed)
        cfg.model.num_tokens = source.num_tokens
        if run.state and run.state.get('data') != source.fingerprint:
            raise CLIError(f'the data changed since the checkpoint in {run.out} was written (fingerprint '
                           f'{run.state.get("data")} -> {source.fingerprint}): resume with the same data, or start a new '
                           f'run with another --out')
        check_agreement(d, dict(config=cfg.to_dict(), data=source.fingerprint, routeformer=checkpoint.package_version(),
                                torch=torch.__version__, resume_step=run.state.get('step', 0)))

        torch.manual_seed(t.seed)
        model = build_model(cfg.model).to(self.device)
        check_accepts(model, cfg.model.seq_len, self.device)
        optimizer = make_optimizer(model, t)
        start, clock = 0, dict(train_time=0., tokens=0)
        if run.ckpt is not None:
            checkpoint.load_weights(model, run.ckpt, run.state)
            checkpoint.load_train_state(optimizer, run.ckpt, run.state)
            start, clock = run.state['step'], run.state['clock']
            if start >= t.steps:
                raise CLIError(f'the run in {run.out} is complete ({start} of --steps {t.steps}): raise --steps to train '
                               f'further (the learning-rate schedule then spans the new total)')
            if run.stop_at is not None and run.stop_at <= start:
                raise CLIError(f'--stop-at {run.stop_at} is not after the checkpoint\'s step {start}: give a later step')
        if self.main:
            if run.ckpt is None and run.overwrite:
                shutil.rmtree(run.out / 'checkpoints', ignore_errors=True)
            run.out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(run.out / 'config.json', checkpoint.to_json(cfg.to_dict(), indent=1))
        barrier(d)

        self.model, self.optimizer, self.source = model, optimizer, source
        self.net = self.wrap(model)
        self.clock = clock
        self.skipped = run.state.get('skipped', 0)  # steps skipped for a non-finite loss, over the whole run
        self.metrics = MetricsLog(run.out / 'metrics.jsonl', keep_through=start) if self.main else None
        params = count_parameters(model)
        self.say(f'{cfg.model.family} model, {params:,} parameters ({cfg.model.dim} dim, {cfg.model.depth} layers, '
                 f'{cfg.model.heads} heads, seq_len {cfg.model.seq_len}) on {self.device}'
                 f'{f" x {d.world} processes" if d.enabled else ""}')
        self.say(f'data: {source.description}')
        if start:
            self.say(f'resuming from {run.ckpt} at step {start}')
        try:
            return self.loop(start, params)
        finally:
            if self.metrics:
                self.metrics.close()

    def wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                                          find_unused_parameters=FAMILIES[self.cfg.model.family].ddp_find_unused)
        if self.t.compile:
            net = torch.compile(net, backend=self.t.compile_backend)
        return net

    def loop(self, start: int, params: int) -> int:
        t, d, run = self.t, self.d, self.run
        stop = min(t.steps, run.stop_at or t.steps)
        tokens_per_step = t.batch_size * self.cfg.model.seq_len
        baseline = memory_baseline(self.device)
        last_val, last_saved, step = None, start, start
        rate, bad_streak, save_due = None, 0, False
        progress = tqdm(total=t.steps, initial=start, desc='train', unit='step', dynamic_ncols=True,
                        disable=not self.main or run.quiet, file=sys.stderr)
        # compiled, the first steps of a process compile (a k-means model twice: its first step sets
        # the centroids outside the graph); their time is compile time, not training time
        compiling = range(start + 1, start + 1 + COMPILE_STEPS) if t.compile else range(0)
        with Interrupt(enabled=not d.enabled) as interrupt, contextlib.closing(progress):
            for step in range(start + 1, stop + 1):
                began = time.perf_counter()
                stepped, loss, ce = self.train_step(step)
                elapsed = time.perf_counter() - began
                self.clock['tokens'] += tokens_per_step
                if step in compiling:
                    self.clock['compile_time'] = self.clock.get('compile_time', 0.) + elapsed
                else:
                    self.clock['train_time'] += elapsed
                    self.clock['timed_tokens'] = self.clock.get('timed_tokens', 0) + tokens_per_step
                    rate = tokens_per_step / elapsed if rate is None else 0.9 * rate + 0.1 * tokens_per_step / elapsed
                loss, ce = (v / d.world for v in all_sum([loss, ce], d))
                bad_streak = 0 if stepped else bad_streak + 1
                self.skipped += not stepped
                self.log(dict(step=step, split='train', loss=ce, total_loss=loss, lr=lr_at(step, t),
                              tokens=self.clock['tokens'], train_time=self.clock['train_time'],
                              **({} if stepped else dict(skipped=True))))
                progress.update(1)
                progress.set_postfix(loss=f'{ce:.3f}', tok_s='compiling' if rate is None else f'{rate:,.0f}',
                                     refresh=False)
                if not stepped:
                    self.check_streak(step, bad_streak, progress)

                if step % t.eval_every == 0 or step == t.steps:
                    last_val = self.validate(step)
                    if self.main and not run.quiet:
                        progress.write(f'step {step}: {metric_line(last_val)}', file=sys.stderr)
                # weights that a streak of skipped steps may be heading away from are not saved
                # over the good checkpoints: the save waits for a step that trains again
                save_due |= step % t.save_every == 0 or step == stop or interrupt.requested
                if save_due and (bad_streak == 0 or step == stop or interrupt.requested):
                    self.save(step)
                    last_saved, save_due = step, False
                if interrupt.requested:
                    break

        if last_val is None or last_val['step'] != step:
            # off the validation schedule (a stopped run): reported, but kept out of metrics.jsonl,
            # which must read as if the run had never stopped
            last_val = self.validate(step, log=False)
        if last_saved != step:
            self.save(step)
        summary = dict(family=self.cfg.model.family, params=params, step=step, steps=t.steps,
                       complete=step == t.steps, metric=self.source.metric, val=last_val, skipped_steps=self.skipped,
                       train_time=self.clock['train_time'], tokens=self.clock['tokens'],
                       tok_per_s=self.clock.get('timed_tokens', self.clock['tokens']) / max(self.clock['train_time'], 1e-9),
                       compile_time=self.clock.get('compile_time'),
                       peak_memory_mib=peak_memory_mib(self.device, baseline), device=str(self.device),
                       processes=d.world, threads=torch.get_num_threads(), config=self.cfg.to_dict())
        if self.main:
            checkpoint.write_atomic(run.out / 'summary.json', checkpoint.to_json(summary, indent=1))
            self.report(summary, step, self.plot(), interrupted=interrupt.requested)
        return 130 if interrupt.requested else 0

    def train_step(self, step: int) -> tuple[bool, float, float]:
        """(whether the optimizer stepped, loss, cross entropy). With a non-finite loss or gradient
        on any process the step is skipped everywhere: no optimizer step, and the buffers the
        forward and backward passes changed (k-means centroids) are put back."""
        batch = self.source.train_batch(step, self.t.batch_size, self.d.rank, self.d.world)
        self.net.train()
        buffers = snapshot_buffers(self.model)
        loss, ce = batch_loss(self.net, batch, self.device, self.t.bf16)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.t.compile:
            apply_statistics(self.model)  # what an eager model's backward hooks do (k-means updates)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip if self.t.grad_clip > 0 else math.inf)
        bad = float(not (torch.isfinite(loss.detach()) & torch.isfinite(norm)).item())
        if all_sum([bad], self.d)[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            restore_buffers(buffers)
            discard_statistics(self.model)  # what a router gathered and has not applied yet
            return False, loss.item(), ce.item()
        lr = lr_at(step, self.t)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        self.optimizer.step()
        return True, loss.item(), ce.item()

    def check_streak(self, step: int, streak: int, progress) -> None:
        limit = self.t.max_bad_steps
        if streak > limit:
            ckpt = checkpoint.find_checkpoint(self.run.out)
            kept = f'the last checkpoint, {ckpt}, is from before it' if ckpt else 'no checkpoint was written'
            raise CLIError(f'training diverged: {streak} steps in a row up to step {step} had a non-finite loss or '
                           f'gradient (more than --max-bad-steps {limit}); {kept}: lower --lr (now {self.t.lr:g}) '
                           f'or raise --warmup, then continue with `routeformer train --resume --out {self.run.out} --lr ...`')
        if self.main:
            progress.write(f'step {step}: non-finite loss or gradient, step skipped (weights, optimizer and buffers '
                           f'unchanged; {streak} in a row of at most --max-bad-steps {limit})', file=sys.stderr)

    def validate(self, step: int, log: bool = True) -> dict:
        result = evaluate(self.model, self.source, batch_size=self.t.batch_size, batches=self.t.eval_batches,
                          device=self.device, bf16=self.t.bf16, d=self.d)
        result = dict(step=step, split='val', train_time=self.clock['train_time'], **result)
        if log:
            self.log(result)
        return result

    def log(self, row: dict) -> None:
        if self.metrics:
            self.metrics.write(row)

    def save(self, step: int) -> None:
        broken = next((name for name, v in self.model.state_dict().items()
                       if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)
        if broken is not None:
            ckpt = checkpoint.find_checkpoint(self.run.out)
            raise CLIError(f'training diverged: at step {step} the weights are not finite ({broken}); nothing was '
                           f'saved{f", the last checkpoint is {ckpt}" if ckpt else ""}: lower --lr (now {self.t.lr:g}) '
                           f'or raise --warmup')
        if self.main:
            state = dict(config=self.cfg.to_dict(), data=self.source.fingerprint, clock=self.clock,
                         processes=self.d.world, skipped=self.skipped)
            checkpoint.save(self.run.out, step=step, model=self.model, optimizer=self.optimizer, state=state,
                            keep=self.t.keep)
            if time.monotonic() - self.plotted > PLOT_EVERY_S:
                self.plot()  # a run killed later still has its curves up to here
        barrier(self.d)

    def plot(self) -> Path:
        self.plotted = time.monotonic()
        return plot_run(read_metrics(self.run.out / 'metrics.jsonl'), self.run.out / 'curves.png',
                        f'{self.cfg.model.family} on {self.source.description}')

    def report(self, summary: dict, step: int, plot: Path, interrupted: bool) -> None:
        out = self.run.out
        compiled = f', {summary["compile_time"]:.0f} s compiling' if summary.get('compile_time') else ''
        print(metric_line(summary['val']) + f' after {step} steps ({summary["train_time"]:.0f} s of training, '
              f'{summary["tok_per_s"]:,.0f} tokens/s{compiled})')
        if summary['complete'] and self.source.metric == 'bpb' and self.t.sample_length > 0:
            prompt = first_line(self.source.corpus.val, limit=min(64, max(1, self.cfg.model.seq_len // 2)))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.t.seed)
                ids = generate(self.model, prompt, self.t.sample_length)
            print('sample:\n' + decode_text(prompt) + decode_text(ids))
        print(f'checkpoint: {checkpoint.find_checkpoint(out)}')
        print(f'plot:       {plot}')
        print(f'metrics:    {out / "metrics.jsonl"}')
        if not summary['complete']:
            why = 'interrupted' if interrupted else 'stopped'
            print(f'{why} at step {step} of {self.t.steps}: continue with `routeformer train --resume --out {out}`')
        elif self.cfg.model.family == 'routing':
            print(VERSUS_LOCAL)


# measured by benchmarks/long_range.py (the README's "Routing learns what local attention cannot")
VERSUS_LOCAL = ('vs local attention: copying tokens from 128 back (the duplication task), k-means routing reached 99.2%\n'
                'accuracy, local attention 6.5% (chance 6.7%; benchmarks/long_range.py). On this data: '
                'routeformer compare --families routing,local')


def snapshot_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    return [(m, name, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None]


def restore_buffers(saved: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for module, name, value in saved:
            current = module._buffers.get(name)
            if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)  # in place: DDP and tied modules hold the same tensor
            else:
                module._buffers[name] = value


def first_line(stream: torch.Tensor, limit: int = 64) -> torch.Tensor:
    """A prompt from the start of the validation text: up to `limit` bytes, cut after a newline."""
    head = stream[:limit].long()
    newlines = (head == ord('\n')).nonzero().flatten()
    return head[:int(newlines[-1]) + 1] if len(newlines) and newlines[-1] > 0 else head


def check_accepts(model: nn.Module, seq_len: int, device: torch.device) -> None:
    """One forward pass at the training length, so a length the model cannot take is reported now,
    in words, rather than as a trace from inside the first step."""
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
        except ValueError as e:
            raise CLIError(f'the {type(model).__name__} cannot take --seq-len {seq_len}: {e}') from None
        finally:
            model.train(was_training)
