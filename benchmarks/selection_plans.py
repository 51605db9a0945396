#!/usr/bin/env python
"""The plans of selections on one attention layer (`routers/selection.py`), forward and backward of
the executor, medians of 3:
- selected blocks (MoBA, NSA): a group per query against a group per key block and run of its
  queries, with MoBA's own selection from random queries and keys, and with queries of a block
  that choose alike (each a small variation of its block's mean query);
- selected tokens (DSA): a group per query against one dense group masked to the selections, for
  random causal selections of `--tokens` earlier tokens.

    python benchmarks/selection_plans.py --length 4096 --block-size 128 --top-k 3 --tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from einops import rearrange

from routeformer.attention.executor import RoutedAttention
from routeformer.attention.plan import RoutePlan
from routeformer.routers import MoBARouter
from routeformer.routers.selection import block_slots, key_block_plan, per_query_plan


def timed(q, k, v, make_plan, repeats: int = 3) -> float:
    executor, times = RoutedAttention(), []
    for _ in range(repeats):
        start = time.perf_counter()
        out, _ = executor(q, k, v, make_plan(), causal=True)
        out.sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--length', type=int, default=4096)
    parser.add_argument('--block-size', type=int, default=128)
    parser.add_argument('--top-k', type=int, default=3)
    parser.add_argument('--tokens', type=int, default=256, help='tokens a query selects (DSA)')
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--dim-head', type=int, default=64)
    args = parser.parse_args(argv)
    n, size = args.length, args.block_size
    print('| queries | group per query ms | group per key block ms | speed-up |\n| --- | ---: | ---: | ---: |')
    for alike in (False, True):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, n, args.dim_head) for _ in range(3))
        if alike:
            rows = rearrange(q, 'b h (c w) d -> b h c w d', w=size)
            q = rearrange(rows.mean(-2, keepdim=True) + 0.01 * rows, 'b h c w d -> b h (c w) d')
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        plan = MoBARouter(block_size=size, top_k=args.top_k)(q.detach(), k.detach(), causal=True)
        blocks = plan.layout.blocks  # each query's own block and its top-k
        per_query = timed(q, k, v, lambda: per_query_plan(block_slots(blocks, size, n)))
        key_blocks = timed(q, k, v, lambda: key_block_plan(blocks, size, n))
        name = 'of a block alike' if alike else 'random'
        print(f'| {name} | {per_query * 1e3:,.0f} | {key_blocks * 1e3:,.0f} | {per_query / key_blocks:.1f}x |')

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, n, args.dim_head, requires_grad=True) for _ in range(3))
    later = torch.ones(n, n, dtype=torch.bool).triu(1)
    top = torch.rand(1, 1, n, n).masked_fill(later, -1.).topk(min(args.tokens, n), dim=-1)
    index = top.indices.masked_fill(top.values < 0, -1)                      # (1, 1, n, tokens), -1: none
    picked = torch.zeros(1, 1, n, n + 1, dtype=torch.bool).scatter_(-1, index.masked_fill(index < 0, n), True)
    mask = rearrange(picked[..., :n], 'b h n m -> b h 1 n m')
    per_query = timed(q, k, v, lambda: per_query_plan(index))
    dense = timed(q, k, v, lambda: RoutePlan(q_index=None, kv_index=None, mask=mask))
    print(f'\n| {args.tokens} tokens a query | group per query ms | dense masked ms | speed-up |')
    print('| --- | ---: | ---: | ---: |')
    print(f'| random, causal | {per_query * 1e3:,.0f} | {dense * 1e3:,.0f} | {per_query / dense:.1f}x |')


if __name__ == '__main__':
    main()
