"""Sort-and-chunk: the shared plan of routers that give every token a bucket (LSH, k-means).

Tokens are sorted by (bucket, position), the sorted sequence is cut into chunks of `window`, and
each chunk attends to itself and the chunk before it (Reformer's look-one-back).

Causal mode is strictly causal by construction. A query may attend a key only if they share a
bucket, the key is not later than the query, and fewer than `window` tokens of that bucket lie
between them (counted by rank inside the bucket, which depends only on earlier tokens). Every key
this admits lies in the query's chunk or the one before it, so nothing is dropped, and the
admitted set depends on nothing after the query: a later token can change which chunk an earlier
one lands in, but not what it sees. In the sorted sequence these keys are one run ending at the
query, so the plan gives each query a span of key slots (RoutePlan.span) instead of a mask.

`sort_and_chunk_pairs` is the causal plan when queries and keys have buckets of their own (k-means
routing without shared QK): each query sees the most recent keys of its bucket.

Axes: b batch, h heads, r hash rounds, n sequence, c chunks per round, g groups (r * c),
i queries per chunk, j keys per group (2 * window).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ..attention.plan import RoutePlan, SortedBand


def rank_in_bucket(sorted_buckets: Tensor) -> Tensor:
    """For a sequence sorted by bucket: each token's index among the tokens of its bucket."""
    n = sorted_buckets.shape[-1]
    index = torch.arange(n, device=sorted_buckets.device).expand_as(sorted_buckets)
    starts = torch.ones_like(sorted_buckets, dtype=torch.bool)
    starts[..., 1:] = sorted_buckets[..., 1:] != sorted_buckets[..., :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - first


def look_one_back(t: Tensor, *, cyclic: bool, fill) -> Tensor:
    """(..., c, w) chunks -> (..., c, 2w): each chunk preceded by the one before it. Chunk 0 sees
    the last chunk when `cyclic` (non-causal Reformer), otherwise `fill`."""
    previous = t.roll(1, dims=-2)
    if not cyclic:
        previous = previous.clone()
        previous[..., 0, :] = fill
    return torch.cat((previous, t), dim=-1)


def sort_and_chunk(buckets: Tensor, window: int, *, causal: bool, same_bucket: bool | None = None) -> RoutePlan:
    """buckets (b, h, r, n) long: the bucket of every token in each of r rounds (ids may repeat
    across rounds). Returns a plan over r * n/window groups, merged by log-sum-exp when r > 1.
    `same_bucket` (default: causal) masks pairs from different buckets; causal mode requires it."""
    same_bucket = causal if same_bucket is None else same_bucket
    if causal and not same_bucket:
        raise ValueError('causal sort-and-chunk attention must mask pairs from different buckets')
    b, h, r, n = buckets.shape
    if n % window != 0:
        raise ValueError(f'sequence length {n} is not a multiple of the bucket/window size {window}: '
                         f'pad it, or wrap the model in Autopadder')
    positions = torch.arange(n, device=buckets.device)
    # stable order by (bucket, position); the key fits in int64 for any realistic n and bucket count
    order = (buckets * n + positions).argsort(dim=-1)
    sorted_buckets = buckets.gather(-1, order)

    def chunked(t):
        return rearrange(t, 'b h r (c i) -> b h r c i', i=window)

    q_index = chunked(order)
    kv_index = look_one_back(q_index, cyclic=not causal, fill=-1)

    def groups(t):
        return None if t is None else rearrange(t, 'b h r c ... -> b h (r c) ...')

    mask = span = None
    if causal:
        # the query of slot i is key slot window + i (look_one_back puts its chunk second), and its
        # keys are the bucket-mates at most window - 1 places before it in the sorted sequence:
        # inside a bucket the sorted order is the position order, so that is one run of slots
        hi = window + 1 + torch.arange(window, device=buckets.device)
        lo = hi - 1 - chunked(rank_in_bucket(sorted_buckets)).clamp(max=window - 1)
        span = torch.stack((lo, hi.expand_as(lo)), dim=-1)
    elif same_bucket:
        q_bucket = chunked(sorted_buckets)
        kv_bucket = look_one_back(q_bucket, cyclic=True, fill=-1)
        mask = rearrange(q_bucket, '... i -> ... i 1') == rearrange(kv_bucket, '... j -> ... 1 j')

    # look_one_back (causal plans): the keys of every group are the queries of the group before it in
    # its round (none for the first) and its own, which the executor gathers once per piece
    return RoutePlan(q_index=groups(q_index), kv_index=groups(kv_index), mask=groups(mask), span=groups(span),
                     merge='logsumexp' if r > 1 else 'overwrite',
                     layout=SortedBand(chunk=window, rounds=r, cyclic=not causal), router_state=dict(buckets=buckets))


def sort_and_chunk_pairs(q_buckets: Tensor, k_buckets: Tensor, window: int) -> RoutePlan:
    """Causal plan for queries and keys with buckets of their own, (b, h, n) each: a query attends
    to the `window` most recent keys of its bucket at positions up to its own (its own key
    included when it shares the bucket). That set depends on nothing after the query.

    The n keys and n queries are 2n items of one sequence, sorted by (bucket, position, key before
    query) and cut into chunks of 2 * `window` items; the keys alone, sorted the same way, are the
    key order. A query's keys end where it stands in the key order, and at most 2 * `window` keys
    of the sorted sequence lie between a query and the end of its chunk, so the 3 * `window` keys
    before the chunk's end in key order hold every key of every query of the chunk. Counting only
    keys matters: a bucket whose tokens route both their query and their key to it would otherwise
    spend half its reach on queries."""
    b, h, n = q_buckets.shape
    if n % window != 0:
        raise ValueError(f'sequence length {n} is not a multiple of the window {window}: pad the sequence, '
                         f'or wrap the model in Autopadder')
    positions = torch.arange(n, device=q_buckets.device)
    items = torch.cat((k_buckets, q_buckets), dim=-1)
    within = torch.cat((2 * positions, 2 * positions + 1))  # a key before the query of its position
    order = (items * (2 * n) + within).argsort(dim=-1)
    is_query, position = order >= n, order % n
    sorted_buckets = items.gather(-1, order)
    # where each item stands in the key order: the number of keys sorted before it, itself included
    keys_through = (~is_query).long().cumsum(dim=-1)
    key_order = (k_buckets * n + positions).argsort(dim=-1)
    sorted_k_buckets = k_buckets.gather(-1, key_order)

    def chunked(t):
        return rearrange(t, 'b h (c i) -> b h c i', i=2 * window)

    q_index = chunked(torch.where(is_query, position, -1))
    q_bucket, q_end = chunked(sorted_buckets), chunked(keys_through)
    # the chunk's keys: slots [end - 3 window, end) of the key order
    slots = q_end[..., -1:] - 3 * window + torch.arange(3 * window, device=order.device)  # (b, h, c, j)
    inside = slots >= 0
    flat = rearrange(slots.clamp(min=0), 'b h c j -> b h (c j)')
    kv_index = torch.where(inside, rearrange(key_order.gather(-1, flat), 'b h (c j) -> b h c j', j=3 * window), -1)
    kv_bucket = rearrange(sorted_k_buckets.gather(-1, flat), 'b h (c j) -> b h c j', j=3 * window)
    slot, end = rearrange(slots, '... j -> ... 1 j'), rearrange(q_end, '... i -> ... i 1')
    same = rearrange(q_bucket, '... i -> ... i 1') == rearrange(kv_bucket, '... j -> ... 1 j')
    # same bucket, and among the `window` keys of the key order that end where the query stands
    mask = same & rearrange(inside, '... j -> ... 1 j') & (slot < end) & (slot >= end - window)
    return RoutePlan(q_index=q_index, kv_index=kv_index, mask=mask,
                     router_state=dict(buckets=q_buckets, key_buckets=k_buckets))
