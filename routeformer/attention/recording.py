"""What a routed attention call computed, kept at the size of its groups: each group's softmax
weights and, where a query is merged from several groups, each group's share of the merge. The
dense (b, h, n, m) attention is built from them only on request, for some heads and queries.

Axes: b batch, h heads, g groups, i queries per group, j keys per group, n queries, m keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from ..helpers import exists
from .plan import RoutePlan, positions_of


class GroupWeights(NamedTuple):
    """The weights of one executor call: `probs` (b, h, g, i, [mem +] j), the softmax inside each
    group (memory key/values first); `shares` (b, h, g, i), the share of each group in its query's
    log-sum-exp merge (LSH rounds, overlapping clusters), None where every query has one group.
    A query's attention to a key is the sum, over the groups and slots that hold both, of
    share * prob."""
    probs: Tensor
    shares: Tensor | None

    def detach_to(self, device) -> 'GroupWeights':
        return GroupWeights(*(t.detach().to(device) if exists(t) else None for t in self))


def cat_weights(parts: list[GroupWeights], dim: int) -> GroupWeights:
    """Weights of calls on slices of the batch (dim 0) or heads (dim 1), joined."""
    probs = torch.cat([p.probs for p in parts], dim=dim)
    shares = None if parts[0].shares is None else torch.cat([p.shares for p in parts], dim=dim)
    return GroupWeights(probs, shares)


def as_slice(index, size: int, name: str) -> slice:
    """An int or a slice of range(size) as a slice (an int keeps its axis); None is everything."""
    if index is None:
        return slice(0, size)
    if isinstance(index, bool) or not isinstance(index, (int, slice)):
        raise TypeError(f'{name} must be an int, a slice or None, got {type(index).__name__}')
    if isinstance(index, int):
        if not -size <= index < size:
            raise ValueError(f'{name}={index} is out of range for {size} {name}')
        index %= size
        return slice(index, index + 1)
    return index


def dense_weights(weights: GroupWeights, plan: RoutePlan, q_len: int, kv_len: int, *, heads=None,
                  queries=None) -> Tensor:
    """The dense attention (b, h', n', m) of `weights` computed under `plan` over q_len queries and
    kv_len keys (memory key/values left out), for the heads `heads` and the query positions `queries`
    (int, slice or None = all). Only the groups' slots of the chosen queries are read: the work and
    memory are those of the result. In at least float32."""
    probs, shares = weights
    b, h_all, g, i, j_all = probs.shape
    heads = as_slice(heads, h_all, 'heads')
    rows = torch.arange(q_len)[as_slice(queries, q_len, 'queries')]
    device = probs.device
    # the row of every query position in the result, -1 for positions not asked for
    row_of = torch.full((q_len + 1,), -1, dtype=torch.long, device=device)
    row_of[rows.to(device)] = torch.arange(len(rows), device=device)

    q_pos = positions_of(plan.q_index, q_len, device).expand(b, h_all, g, i)[:, heads]
    kv_pos = positions_of(plan.kv_index, kv_len, device)
    j = kv_pos.shape[-1]
    kv_pos = kv_pos.expand(b, h_all, g, j)[:, heads]
    # padded query slots hold -1 or (contiguous layouts) positions past the end: row -1
    slot_rows = row_of[torch.where((q_pos >= 0) & (q_pos < q_len), q_pos, q_len)]
    bi, hi, gi, ii = torch.nonzero(slot_rows >= 0, as_tuple=True)

    precise = torch.promote_types(probs.dtype, torch.float32)
    picked = probs[:, heads][bi, hi, gi, ii, j_all - j:].to(precise)  # (slots, j)
    if exists(shares):
        picked = picked * rearrange(shares[:, heads][bi, hi, gi, ii].to(precise), 's -> s 1')
    keys = kv_pos[bi, hi, gi]
    picked = picked.masked_fill(keys < 0, 0.)
    h = q_pos.shape[1]
    target = ((bi * h + hi) * len(rows) + slot_rows[bi, hi, gi, ii])[:, None] * kv_len + keys.clamp(min=0)
    dense = picked.new_zeros(b * h * len(rows) * kv_len).index_add_(0, target.flatten(), picked.flatten())
    return rearrange(dense, '(b h n m) -> b h n m', b=b, h=h, m=kv_len)


@dataclass(eq=False)
class AttentionRecord(Mapping):
    """One attention call of a recorded forward pass: the layer, its heads (first, last + 1),
    whether it is cross-attention, the routing `plan` and the group `weights` (GroupWeights), all on
    the CPU, at the size of the groups rather than n x m. `dense(heads, queries)` builds the dense
    weights; as a mapping, `record['attn']` is `dense()` built anew on each access (never kept).
    Records compare by identity, without building dense weights."""
    _KEYS = ('layer', 'heads', 'cross', 'plan', 'weights')
    __eq__, __hash__ = object.__eq__, object.__hash__

    layer: int
    heads: tuple[int, int]
    cross: bool
    plan: RoutePlan
    weights: GroupWeights
    q_len: int
    kv_len: int

    def dense(self, heads=None, queries=None) -> Tensor:
        """(b, h', n', m) attention of heads `heads` (indices into this call's heads) for the query
        positions `queries` (int, slice or None = all; an int keeps its axis) over every key, memory
        key/values left out. A row sums to 1 over the keys its query saw (0 for a query that saw none)."""
        return dense_weights(self.weights, self.plan, self.q_len, self.kv_len, heads=heads, queries=queries)

    def __getitem__(self, key: str):
        if key == 'attn':
            return self.dense()
        if key not in self._KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._KEYS + ('attn',))

    def __len__(self) -> int:
        return len(self._KEYS) + 1

    def __repr__(self) -> str:
        return (f'AttentionRecord(layer={self.layer}, heads={self.heads}, cross={self.cross}, '
                f'weights={tuple(self.weights.probs.shape)}, q_len={self.q_len}, kv_len={self.kv_len})')
