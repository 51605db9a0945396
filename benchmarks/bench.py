#!/usr/bin/env python
"""Training/inference throughput and peak memory of the models in benchmarks/models.py.

Every (model, length) configuration runs in a fresh worker subprocess (this script with
`--worker CONFIG_JSON`, which prints one JSON line), so peak memory is not polluted by other
configurations and an OOM, crash or hang becomes one table cell instead of ending the run.

    python benchmarks/bench.py --lengths 1024,4096 --models x-transformers,routeformer-local
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
# benchmark the checkout's routeformer, and let `module:function` model specs name repo modules
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.models import REGISTRY, BenchShape, is_known, resolve_builder  # noqa: E402
from routeformer import apply_statistics  # noqa: E402

MIB = 2 ** 20


# ---------------------------------------------------------------- worker (one configuration)

def loss_of(output, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy on the logits, plus the auxiliary loss of models that return one."""
    logits, aux = (output[0], output[1]) if isinstance(output, tuple) else (output, None)
    # float32 loss so bfloat16 runs measure the model, not a lossy softmax
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return loss if aux is None else loss + aux


def step_times(step, warmup: int, repeats: int, sync) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()  # CUDA kernels are asynchronous: time them to completion
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def start_memory_tracking(device: torch.device) -> int:
    """Returns the baseline (bytes) that `peak_memory_bytes` subtracts."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    # the process RSS includes the Python runtime, torch, the model and inputs: not the step's
    with open('/proc/self/statm') as f:  # Linux only, like the KiB unit of ru_maxrss below
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_memory_bytes(device: torch.device, baseline: int) -> int:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def package_version(model) -> str:
    """`name version` of the distribution that defines the model class, for reproducibility."""
    top = type(model).__module__.split('.')[0]
    dists = importlib.metadata.packages_distributions().get(top)
    if dists:
        return f'{dists[0]} {importlib.metadata.version(dists[0])}'
    version = getattr(sys.modules[top], '__version__', None)
    return top if version is None else f'{top} {version}'


def measure(cfg: dict) -> dict:
    device = torch.device(cfg['device'])
    torch.manual_seed(0)
    try:
        builder = resolve_builder(cfg['model'])
        model = builder(BenchShape(cfg['vocab'], cfg['dim'], cfg['depth'], cfg['heads'],
                                    cfg['window'], cfg['length']))
    except ImportError as e:
        return {'status': 'not installed', 'error': str(e)}
    model = model.to(device=device, dtype=getattr(torch, cfg['dtype']))
    tokens = torch.randint(0, cfg['vocab'], (cfg['batch'], cfg['length']), device=device)
    targets = torch.randint_like(tokens, cfg['vocab'])
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if cfg.get('memory_budget') is not None:
        torch._functorch.config.activation_memory_budget = cfg['memory_budget']
    net = torch.compile(model) if cfg.get('compile') else model

    def train_step():
        loss_of(net(tokens), targets).backward()
        apply_statistics(model)  # k-means updates, which a compiled model cannot hook to its backward
        model.zero_grad(set_to_none=True)  # each step allocates its gradients, as in training

    @torch.no_grad()
    def infer_step():
        net(tokens)

    # compiled: the first steps compile (a k-means model twice: its first training step sets the
    # centroids outside the graph), timed apart from the steps that are measured
    compile_steps = 2 if cfg.get('compile') else 0
    # the training step runs first: on CPU the peak RSS can only be read, never reset
    model.train()
    baseline = start_memory_tracking(device)
    compile_s = sum(step_times(train_step, 0, compile_steps, sync))
    train_s = step_times(train_step, cfg['warmup'], cfg['repeats'], sync)
    peak = peak_memory_bytes(device, baseline)

    model.eval()
    compile_s += sum(step_times(infer_step, 0, compile_steps // 2, sync))
    infer_s = step_times(infer_step, cfg['warmup'], cfg['repeats'], sync)

    n_tokens = tokens.numel()
    return {
        'status': 'ok',
        'compile_s': compile_s if cfg.get('compile') else None,
        'train_tok_s': n_tokens / statistics.median(train_s),
        'infer_tok_s': n_tokens / statistics.median(infer_s),
        'peak_mib': peak / MIB,
        'train_s': train_s,
        'infer_s': infer_s,
        'params': sum(p.numel() for p in model.parameters()),
        'package': package_version(model),
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model(),
        'threads': torch.get_num_threads(),
    }


def worker(cfg: dict) -> dict:
    try:
        return measure(cfg)
    except torch.OutOfMemoryError as e:
        return {'status': 'OOM', 'error': str(e)}
    except Exception as e:  # any failure becomes this configuration's cell
        oom = "can't allocate memory" in str(e)  # the CPU allocator's out-of-memory RuntimeError
        return {'status': 'OOM' if oom else 'error', 'error': f'{type(e).__name__}: {e}'}


# ---------------------------------------------------------------- driver

# glibc hands every block over 32 MiB to the kernel on free, so each large activation of a long
# sequence is a fresh mapping whose pages fault in one by one (and are zeroed) when first written:
# at 65k tokens that halves the throughput of any model. 'heap' makes glibc keep freed memory in
# its heap and reuse it, at the price of a higher peak RSS.
MALLOC = {'default': None,
          'heap': 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184'}


def run_config(cfg: dict, timeout: float, malloc: str = 'default') -> dict:
    cmd = [sys.executable, __file__, '--worker', json.dumps(cfg)]
    env = dict(os.environ)
    if MALLOC[malloc]:
        env['GLIBC_TUNABLES'] = MALLOC[malloc]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {'status': 'timeout', 'error': f'exceeded {timeout:g} s'}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode == -signal.SIGKILL:
        return {'status': 'OOM', 'error': 'worker killed by SIGKILL (most likely the kernel OOM killer)'}
    stderr_tail = proc.stderr.strip().splitlines()[-5:]
    return {'status': 'error', 'error': '\n'.join(stderr_tail) or f'exit code {proc.returncode}'}


def machine_info(args, rows: list[dict]) -> dict:
    # the device name comes from a worker: the driver never initialises CUDA itself
    device_name = next((r['device_name'] for r in rows if 'device_name' in r), None)
    return {
        'torch': torch.__version__,
        'python': platform.python_version(),
        'platform': platform.platform(),
        'device': args.device,
        'device_name': device_name,
        'dtype': args.dtype,
        'threads': torch.get_num_threads(),
        'cpu': cpu_model(),
        'cpu_count': os.cpu_count(),
    }


def memory_method(device: str) -> str:
    if device == 'cuda':
        return 'torch.cuda.max_memory_allocated over the train steps (includes weights and inputs)'
    return ('peak RSS of the worker process (ru_maxrss) minus its RSS after building the model '
            'and inputs: the working memory of the forward+backward step')


def ratio(value, base) -> str:
    return f'{value / base:.2f}x' if value is not None and base else '-'


def markdown(rows: list[dict], args, info: dict) -> str:
    base = {r['length']: r for r in rows if label(r) == args.baseline and r['status'] == 'ok'}
    lines = [
        '# routeformer benchmark',
        '',
        f"- device: {info['device']} ({info['device_name'] or info['cpu']}), {info['threads']} threads, "
        f"torch {info['torch']}, {info['dtype']}" + (f", glibc malloc {args.malloc} ({MALLOC[args.malloc]})"
                                                     if MALLOC[args.malloc] else ''),
        f'- config: batch {args.batch}, dim {args.dim}, depth {args.depth}, heads {args.heads}, '
        f'vocab {args.vocab}, window {args.window}; median of {args.repeats} steps after {args.warmup} warmup',
        f'- peak memory: {memory_method(args.device)}',
        f'- ratios: model / {args.baseline} at the same length'
        + ('; compiled rows: torch.compile (inductor), compile s = the first steps, which compile, '
           'not counted in tok/s' if args.compile != 'off' else ''),
        '',
        '| model | compiled | length | params | train tok/s | infer tok/s | peak MiB | train vs base | infer vs base '
        '| mem vs base | compile s |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        compiled = 'yes' if r.get('compiled') else 'no'
        if r['status'] != 'ok':
            cells = [r['model'], compiled, str(r['length']), '-'] + [r['status']] * 3 + ['-'] * 4
        else:
            b = base.get(r['length'], {})
            cells = [
                r['model'], compiled, str(r['length']), f"{r['params'] / 1e6:.2f}M",
                f"{r['train_tok_s']:,.0f}", f"{r['infer_tok_s']:,.0f}", f"{r['peak_mib']:,.1f}",
                ratio(r['train_tok_s'], b.get('train_tok_s')),
                ratio(r['infer_tok_s'], b.get('infer_tok_s')),
                ratio(r['peak_mib'], b.get('peak_mib')),
                '-' if r.get('compile_s') is None else f"{r['compile_s']:.1f}",
            ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    panels = [('train_tok_s', 'train tokens/s'), ('infer_tok_s', 'inference tokens/s'),
              ('peak_mib', 'peak MiB (train step)')]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for name in dict.fromkeys(label(r) for r in rows):
            ok = [r for r in rows if label(r) == name and r['status'] == 'ok']
            if ok:
                ax.plot([r['length'] for r in ok], [r[key] for r in ok], marker='o', label=name)
        ax.set_xscale('log', base=2)
        ax.set_xticks(args.lengths, labels=[str(n) for n in args.lengths])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths are labelled
        ax.set_yscale('log')
        ax.set_xlabel('sequence length')
        ax.set_title(title)
        ax.grid(True, which='both', alpha=0.3)
    if axes[0].lines:  # nothing to label when every configuration failed
        axes[0].legend()
    fig.suptitle(f'{args.device}, {args.dtype}, batch {args.batch}, dim {args.dim}, depth {args.depth}')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label(row: dict) -> str:
    """A row's name in ratios and plots: the model, `+compile` when compiled."""
    return row['model'] + ('+compile' if row.get('compiled') else '')


def describe(row: dict) -> str:
    head = f"{label(row):>28} n={row['length']:<6}"
    if row['status'] != 'ok':
        return f"{head} {row['status']}: {row.get('error', '')}"
    return (f"{head} train {row['train_tok_s']:>10,.0f} tok/s  infer {row['infer_tok_s']:>10,.0f} tok/s  "
            f"peak {row['peak_mib']:>9,.1f} MiB")


def comma_list(cast):
    return lambda text: [cast(item) for item in text.split(',') if item]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model shape every benchmark script takes (the README's benchmark settings by default)."""
    p.add_argument('--dim', type=int, default=256)
    p.add_argument('--depth', type=int, default=2)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--vocab', type=int, default=256)
    p.add_argument('--window', type=int, default=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', type=comma_list(str), default=list(REGISTRY),
                   help='registry names or package.module:builder (default: all registered)')
    p.add_argument('--lengths', type=comma_list(int), default=[1024, 4096, 16384])
    p.add_argument('--batch', type=int, default=1)
    add_model_arguments(p)
    p.add_argument('--repeats', type=int, default=5, help='timed steps; the median is reported')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
    p.add_argument('--timeout', type=float, default=600, help='seconds per configuration')
    p.add_argument('--malloc', choices=list(MALLOC), default='default',
                   help="CPU workers' glibc allocator: default, or heap (freed memory is kept and reused: "
                        "faster for long sequences, higher peak RSS)")
    p.add_argument('--compile', choices=['off', 'on', 'both'], default='off',
                   help='torch.compile the models: off, on, or both (an eager and a compiled row per model)')
    p.add_argument('--memory-budget', type=float, metavar='FRACTION',
                   help="compiled models: torch's activation memory budget (1 keeps every activation the "
                        "partitioner would, lower recomputes more in the backward pass)")
    p.add_argument('--baseline', help='model the ratios are taken against, `NAME+compile` for its compiled row '
                   '(default: the first model, eager unless --compile on)')
    p.add_argument('--out', type=Path, default=REPO_ROOT / 'benchmarks' / 'results')
    p.add_argument('--worker', metavar='CONFIG_JSON', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [m for m in args.models if not is_known(m)]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(REGISTRY)}")
    args.baseline = args.baseline or args.models[0] + ('+compile' if args.compile == 'on' else '')
    if args.baseline.removesuffix('+compile') not in args.models:
        p.error(f'--baseline {args.baseline} is not among --models')
    if args.repeats < 1:
        p.error('--repeats must be at least 1')
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    rows = []
    modes = {'off': [False], 'on': [True], 'both': [False, True]}[args.compile]
    for model in args.models:
        for compiled in modes:
            for length in args.lengths:
                cfg = {'model': model, 'length': length, 'batch': args.batch, 'dim': args.dim,
                       'depth': args.depth, 'heads': args.heads, 'vocab': args.vocab, 'window': args.window,
                       'repeats': args.repeats, 'warmup': args.warmup, 'device': args.device, 'dtype': args.dtype,
                       'compile': compiled, 'memory_budget': args.memory_budget if compiled else None}
                row = {'model': model, 'compiled': compiled, 'length': length,
                       **run_config(cfg, args.timeout, args.malloc)}
                print(describe(row), flush=True)
                rows.append(row)

    info = machine_info(args, rows)
    table = markdown(rows, args, info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'results.md').write_text(table)
    settings = {k: v for k, v in vars(args).items() if k not in ('worker', 'out')}
    (args.out / 'results.json').write_text(json.dumps(
        {'machine': info, 'settings': settings, 'memory': memory_method(args.device), 'rows': rows}, indent=2))
    plot(rows, args, args.out / 'results.png')
    print('\n' + table)
    print(f'wrote {args.out}/results.md, results.json, results.png')


if __name__ == '__main__':
    main()
