"""Per-query selection: every query attends its own set of keys (MoBA's blocks, DSA's tokens).

A selection is a plan of one group per query: query t is group t, and its key slots are the
positions it selected (-1 for an empty slot). The executor masks causality and padding from the
original positions, so a router only has to select among candidates that are allowed.

Axes: b batch, h heads, n queries, c candidates (blocks or tokens), k selected, w block length,
j key slots.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ..attention.plan import RoutePlan
from ..helpers import topk_first


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
# the selected ones but through a gather and one small product per query: dense wins while the
# sequence is at most this many times the selection (a heuristic bound, not a measured optimum)
DENSE_RATIO = 8


def dense_enough(length: int, selected: int) -> bool:
    """Whether computing all `length` keys of a query beats gathering its `selected` ones."""
    return length <= DENSE_RATIO * selected


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
