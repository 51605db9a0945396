"""Per-query selection: every query attends its own set of keys (MoBA's blocks, DSA's tokens).

A selection is a plan of one group per query: query t is group t, and its key slots are the
positions it selected (-1 for an empty slot). The executor masks causality and padding from the
original positions, so a router only has to select among candidates that are allowed.

Selected blocks (MoBA, NSA) also have a plan of one group per key block (`key_block_plan`).

Axes: b batch, h heads, n queries, c candidates (blocks or tokens), k selected, w block length,
j key slots, p (query, block) pairs, g groups, i queries per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..attention.plan import RoutePlan
from ..helpers import compiling, topk_first


def per_query_plan(kv_index: Tensor, **info) -> RoutePlan:
    """kv_index (b|1, h|1, n, j) -> the plan in which query t attends positions kv_index[..., t, :]."""
    n = kv_index.shape[-2]
    q_index = torch.arange(n, device=kv_index.device).view(1, 1, n, 1)
    return RoutePlan(q_index=q_index, kv_index=kv_index, router_state=info)


def selection_plan(index: Tensor, length: int, **info) -> RoutePlan:
    """index (b|1, h|1, n, k) the keys each query selected (-1: none) of a sequence of `length`:
    per-query groups, or one dense group masked to the selections where they cover so much of the
    sequence that attending everything masked costs less (short sequences)."""
    if not dense_enough(length, index.shape[-1]):
        return per_query_plan(index, **info)
    b, h, n, _ = index.shape
    picked = torch.zeros(b, h, n, length + 1, dtype=torch.bool, device=index.device)
    picked = picked.scatter_(-1, index.masked_fill(index < 0, length), True)[..., :length]
    return RoutePlan(q_index=None, kv_index=None, mask=rearrange(picked, 'b h n m -> b h 1 n m'), router_state=info)


# a dense masked group computes every key of the sequence for each query, a per-query group only
# the selected ones, but through a gather and one matrix-vector product per query. Forward and
# backward of one layer (4 heads of 32, 256 tokens a query, 2-core CPU, one thread): dense 7.5x
# faster at 1,024 tokens, 2.2x at 4,096, 1.35x at 8,192. Dense wins while the sequence is at most
# DENSE_RATIO times the selection, up to DENSE_MAX_LENGTH, past which its (n, n) masks and logits
# (a GiB a sample at 8,192 tokens and 4 heads) cost more memory than they save time.
DENSE_RATIO = 32
DENSE_MAX_LENGTH = 8192


def dense_enough(length: int, selected: int) -> bool:
    """Whether computing all `length` keys of a query beats gathering its `selected` ones."""
    return length <= min(DENSE_RATIO * selected, DENSE_MAX_LENGTH)


def select_top(scores: Tensor, allowed: Tensor, k: int) -> Tensor:
    """scores (..., c), allowed (..., c) bool -> (..., k) the best allowed candidates, best first,
    ties to the lower index; -1 where fewer than k are allowed. A NaN score never wins."""
    k = min(k, scores.shape[-1])
    allowed = allowed & ~scores.isnan()
    top = topk_first(scores.masked_fill(~allowed, float('-inf')), k)
    return top.indices.masked_fill(~allowed.gather(-1, top.indices), -1)


def block_slots(blocks: Tensor, block_size: int, length: int) -> Tensor:
    """(..., k) block ids (-1: none) -> (..., k * block_size) their positions, -1 for no block
    and for positions at or past `length`."""
    blocks = rearrange(blocks, '... k -> ... k 1')
    pos = blocks * block_size + torch.arange(block_size, device=blocks.device)
    pos = pos.masked_fill((blocks < 0) | (pos >= length), -1)
    return rearrange(pos, '... k w -> ... (k w)')


def key_block_plan(blocks: Tensor, block_size: int, length: int) -> RoutePlan:
    """blocks (b, h, n, k) the key blocks each query attends (-1: none; distinct per query) -> the
    plan with one group per key block and run of `block_size` queries that attend it, merged by
    log-sum-exp: each query's groups together are attention over the union of its blocks.

    The transpose of a group per query, as the reference computes MoBA: a group gathers its one
    block of keys for up to `block_size` queries and scores them in one product, where a group per
    query gathers k blocks of keys for that query alone (k * block_size copied rows per query, and
    one matrix-vector product each). The groups of a block are as many as its queries need: their
    number is data (one sync), so a compiled graph takes the per-query plan."""
    b, h, n, k = blocks.shape
    c, device = math.ceil(length / block_size), blocks.device
    picks = rearrange(blocks, 'b h n k -> b h (n k)').masked_fill(blocks.flatten(2) < 0, c)  # slot c: no block
    counts = torch.zeros(b, h, c + 1, dtype=torch.long, device=device).scatter_add_(-1, picks, torch.ones_like(picks))
    groups = F.pad(-(-counts[..., :c] // block_size), (0, 1))          # groups per block; none for slot c
    first_group = groups.cumsum(-1) - groups
    first_pair = counts.cumsum(-1) - counts
    order = picks.argsort(dim=-1, stable=True)                        # pairs by block, queries in order within
    block = picks.gather(-1, order)
    rank = torch.arange(block.shape[-1], device=device) - first_pair.gather(-1, block)
    group = first_group.gather(-1, block) + rank // block_size
    g = max(int(groups.sum(-1).max()), 1)
    real = block < c
    # the pairs of slot c land in one spare group past the last, cut off below
    slot = torch.where(real, group * block_size + rank % block_size, g * block_size)
    q_index = torch.full((b, h, g * block_size + 1), -1, dtype=torch.long, device=device)
    q_index = q_index.scatter_(-1, slot, order // k)[..., :-1]       # pair p is query p // k's
    group_block = torch.full((b, h, g + 1), -1, dtype=torch.long, device=device)
    group_block = group_block.scatter_(-1, torch.where(real, group, g), block.masked_fill(~real, -1))[..., :-1]
    q_index = rearrange(q_index, 'b h (g i) -> b h g i', i=block_size)
    # memory key/values are in each of a query's groups: a share of 1 / (its groups) in each
    shares = (blocks >= 0).sum(-1).clamp(min=1).gather(-1, q_index.clamp(min=0).flatten(2)).view_as(q_index)
    kv_index = block_slots(rearrange(group_block, 'b h g -> b h g 1'), block_size, length)
    return RoutePlan(q_index=q_index, kv_index=kv_index, merge='logsumexp',
                     mem_bias=-shares.double().log())  # the executor casts it to the logits' dtype


def blocks_plan(blocks: Tensor, block_size: int, length: int) -> RoutePlan:
    """The plan of the blocks (b, h, n, k) each query attends: a group per key block and run of
    its queries (`key_block_plan`), or inside a compiled graph, whose shapes are static, a group
    per query."""
    if compiling():
        return per_query_plan(block_slots(blocks, block_size, length))
    return key_block_plan(blocks, block_size, length)
