#!/usr/bin/env python
"""How close a training step comes to the machine's matrix-product throughput.

For each model: the floating-point operations of one forward+backward step as counted by torch's
FLOP formulas (`torch.utils.flop_counter`: matrix products and the attention kernels it knows;
elementwise work is not counted, so the figure is a lower bound), reversible recomputation
included, the step's median time, and
the resulting GFLOP/s against a plain float32 matrix product of the feed-forward's shape on the
same threads. A model near that rate can only get faster by doing less arithmetic.

    python benchmarks/flops.py --models routeformer-routing,routing-transformer --length 16384
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench import add_model_arguments, loss_of, step_times  # noqa: E402
from benchmarks.models import BenchShape, resolve_builder  # noqa: E402


class CountFlops(TorchDispatchMode):
    """Sums the FLOPs of every operator torch has a formula for. FlopCounterMode does the same but
    also tracks modules with backward hooks, which break reversible layers' autograd.grad calls."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def matmul_gflops(rows: int, dim: int, hidden: int, repeats: int) -> float:
    """GFLOP/s of (rows x dim) @ (dim x hidden), the feed-forward's first product."""
    a, b = torch.randn(rows, dim), torch.randn(dim, hidden)
    times = step_times(lambda: a @ b, 1, repeats, lambda: None)
    return 2 * rows * dim * hidden / statistics.median(times) / 1e9


def measure(name: str, cfg: BenchShape, repeats: int) -> dict:
    torch.manual_seed(0)
    model = resolve_builder(name)(cfg).train()
    tokens = torch.randint(0, cfg.vocab, (1, cfg.seq_len))
    targets = torch.randint_like(tokens, cfg.vocab)

    def step():
        loss_of(model(tokens), targets).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up, and k-means initialisation outside the counted step
    with CountFlops() as counter:
        step()
    times = step_times(step, 0, repeats, lambda: None)
    seconds = statistics.median(times)
    flops = counter.total
    return dict(model=name, gflop=flops / 1e9, seconds=seconds, gflops=flops / seconds / 1e9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='routeformer-local,routeformer-routing,routing-transformer')
    p.add_argument('--length', type=int, default=16384)
    add_model_arguments(p)
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args(argv)

    cfg = BenchShape(args.vocab, args.dim, args.depth, args.heads, args.window, args.length)
    peak = matmul_gflops(args.length, args.dim, 4 * args.dim, repeats=10)
    print(f'{torch.get_num_threads()} threads, torch {torch.__version__}, float32; '
          f'({args.length} x {args.dim}) @ ({args.dim} x {4 * args.dim}): {peak:.1f} GFLOP/s\n')
    print('| model | counted GFLOP per step | step s | GFLOP/s | of the matmul rate |')
    print('|---|---:|---:|---:|---:|')
    for name in [m for m in args.models.split(',') if m]:
        try:
            r = measure(name, cfg, args.repeats)
        except ImportError as e:
            print(f'| {name} | not installed: {e} | | | |')
            continue
        print(f'| {name} | {r["gflop"]:.1f} | {r["seconds"]:.2f} | {r["gflops"]:.1f} | {r["gflops"] / peak:.0%} |',
              flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
