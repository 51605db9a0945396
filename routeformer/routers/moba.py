"""MoBA: mixture of block attention (Lu et al. 2025, Moonshot AI, `MoonshotAI/MoBA`).

The keys are cut into blocks of `block_size`; a query scores every block by the dot product of
its query with the mean of the block's keys and attends to its `top_k` best blocks plus its own
block (causal inside it). The gate has no parameters. As in the reference, every key block is
attended by the queries that chose it, and a query's per-block attentions are merged by their
log-sum-exp, which is one softmax over the union of its blocks (selection.key_block_plan).

What we changed: in causal mode only blocks that end before the query's block compete, so a
block's mean never includes a later token (the reference does the same); padding keys count in no
block mean and a block of padding is never chosen; routing sees the keys' content (rotary
positions are applied after routing, as for every router here). Without `causal` (encoders) every
block but the query's own competes and the own block is attended in full.

Axes: b batch, h heads, n queries, m keys, c blocks, d head dim, k selected blocks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..attention.plan import RoutePlan, SelectedBlocks
from ..helpers import check_positive, exists, precise
from .base import KeyHistory, Router
from .selection import block_slots, blocks_plan, select_top

# query rows scored against the block means at once: bounds the (b, h, rows, c) scores
SCORE_ROWS = 4096


def block_means(k: Tensor, mask: Tensor | None, block_size: int) -> tuple[Tensor, Tensor]:
    """k (b, h, m, d), mask (b, m) or None -> the mean key of every block (b, h, c, d) and whether
    the block holds any real key (b|1, 1, c); the last block may be short."""
    m = k.shape[-2]
    c = math.ceil(m / block_size)
    pad = c * block_size - m
    valid = torch.ones(1, m, dtype=k.dtype, device=k.device) if mask is None else mask.to(k.dtype)
    valid = rearrange(F.pad(valid, (0, pad)), 'b (c w) -> b 1 c w 1', w=block_size)
    # where, not a product: a padding key may hold anything
    keys = rearrange(F.pad(k, (0, 0, 0, pad)), 'b h (c w) d -> b h c w d', w=block_size)
    sums = torch.where(valid > 0, keys, 0.).sum(dim=-2)
    counts = valid.sum(dim=-2)
    return sums / counts.clamp(min=1.), rearrange(counts > 0, 'b 1 c 1 -> b 1 c')


class MoBARouter(Router):
    """`block_size`: keys per block (the reference's `moba_chunk_size`); `top_k`: blocks a query
    selects besides its own (`moba_topk`). Any sequence length works (the last block may be short)."""

    def __init__(self, *, block_size: int = 512, top_k: int = 3):
        super().__init__()
        check_positive(block_size=block_size, top_k=top_k)
        self.block_size, self.top_k = block_size, top_k

    def select(self, q: Tensor, means: Tensor, filled: Tensor, own: Tensor, causal: bool) -> Tensor:
        """q (b, h, n, d), block means (b, h, c, d), filled (b|1, 1, c), own (n,) each query's
        block -> (b, h, n, top_k) selected blocks (-1: none)."""
        blocks = torch.arange(means.shape[-2], device=q.device)
        eligible = blocks < own[:, None] if causal else blocks != own[:, None]      # (n, c)
        allowed = rearrange(filled, 'b 1 c -> b 1 1 c') & eligible
        with torch.autocast(q.device.type, enabled=False):
            picks = [select_top(torch.einsum('b h n d, b h c d -> b h n c', precise(rows), precise(means)),
                                allowed[:, :, start:start + rows.shape[-2]], self.top_k)
                     for start, rows in zip(range(0, q.shape[-2], SCORE_ROWS), q.split(SCORE_ROWS, dim=-2))]
        return torch.cat(picks, dim=-2)

    def route(self, inp):
        if exists(inp.cached):  # a reversible recompute replays the selection
            return inp.cached
        q, k, mask, causal = inp.q, inp.k, inp.mask, inp.causal
        n, m = q.shape[-2], k.shape[-2]
        if n != m:
            raise ValueError(f'MoBA routes self-attention: got {n} queries and {m} keys')
        with torch.no_grad():
            means, filled = block_means(k, mask, self.block_size)
            own = torch.arange(n, device=q.device) // self.block_size
            chosen = self.select(q, means, filled, own, causal)
            own_block = own.view(1, 1, n, 1).expand(*chosen.shape[:-1], 1)
            blocks = torch.cat((own_block, chosen), dim=-1)
            plan = blocks_plan(blocks, self.block_size, m)
        plan.router_state['blocks'] = chosen
        return replace(plan, layout=SelectedBlocks(self.block_size, blocks))

    def prefill(self, inp, plan):
        return KeyHistory.of(inp)  # decoding scores the complete blocks of the keys so far, padding excluded

    def decode_step(self, step, cache):
        """The token at `pos` selects among the blocks complete before its own, as in the forward
        pass, and attends them and its own block up to itself."""
        cache.extend(step)
        pos, q = step.offset, step.q
        own = pos // self.block_size
        done = own * self.block_size
        means, filled = block_means(cache.keys[..., :done, :], cache.mask[:, :done], self.block_size)
        chosen = self.select(q, means, filled, torch.tensor([own], device=q.device), causal=True)
        own_block = torch.full((*chosen.shape[:-1], 1), own, dtype=torch.long, device=q.device)
        kv_index = block_slots(torch.cat((own_block, chosen), dim=-1), self.block_size, pos + 1)
        return RoutePlan(q_index=None, kv_index=kv_index, q_offset=pos, router_state=dict(blocks=chosen))

    def extra_repr(self):
        return f'block_size={self.block_size}, top_k={self.top_k}'
