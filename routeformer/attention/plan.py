"""RoutePlan: which queries and keys share a group, and how to gather and scatter by it.

Axes: b batch, h heads, n sequence, d head dim, g groups, i queries per group, j keys per group.
Index tensors may have size 1 on the batch and head axes when the plan is the same for every
sample or head (local and full attention); they broadcast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor

from ..helpers import compiling

Merge = Literal['overwrite', 'logsumexp']


# ---------------------------------------------------------------- layouts
# What shape a plan's groups have, as the kernels see it: the executor and the backends read the
# layout, never a router's parameters. The index tensors of the plan hold the same groups in the
# generic gathered form, so a backend that knows no layout can still run any plan.

@dataclass(frozen=True)
class Dense:
    """The whole sequence as one group (q_index and kv_index None), optionally masked by `mask`."""


@dataclass(frozen=True)
class SlidingWindow:
    """Contiguous query windows of `window` tokens, each attending the keys from `back` tokens
    before its first query to `forward` tokens after its last (local attention)."""
    window: int
    back: int
    forward: int


@dataclass(frozen=True)
class SortedBand:
    """Tokens sorted by (bucket, position) in each of `rounds` rounds, cut into chunks of `chunk`:
    group g is chunk g of the sorted order (q_index), and attends its own chunk and the one before
    it (kv_index), the previous chunk of its round cyclically when `cyclic` (non-causal), none for
    a round's first chunk otherwise. In the causal form every query's keys are one run of that
    window (RoutePlan.span), so the whole plan is a banded attention over the sorted sequence;
    otherwise `mask` holds the same-bucket pairs (the bucket ids are the router's, in
    router_state)."""
    chunk: int
    rounds: int
    cyclic: bool


@dataclass(frozen=True)
class SelectedBlocks:
    """Query t attends the key blocks blocks[..., t, :] (block ids of `block_size` tokens, -1 for
    none; its own block included), causal inside them (MoBA); kv_index holds their positions."""
    block_size: int
    blocks: Tensor = field(compare=False, repr=False)


@dataclass(frozen=True)
class Gathered:
    """Any groups of queries and keys gathered by index (clusters, Sinkhorn buckets, selected
    tokens, a decoding step's cached keys): the generic form."""


Layout = Dense | SlidingWindow | SortedBand | SelectedBlocks | Gathered


def map_layout_tensors(layout: Layout, fn) -> Layout:
    """The layout with `fn` applied to its tensor fields (SelectedBlocks' block ids)."""
    tensors = {f.name: fn(getattr(layout, f.name)) for f in dataclasses.fields(layout)
               if isinstance(getattr(layout, f.name), Tensor)}
    return dataclasses.replace(layout, **tensors) if tensors else layout


@dataclass
class RoutePlan:
    q_index: Tensor | None          # (b|1, h|1, g, i) positions gathered as queries; None = the whole sequence in order
    kv_index: Tensor | None         # (b|1, h|1, g, j) positions gathered as keys/values; -1 = empty slot; None = whole sequence
    mask: Tensor | None = None      # (b|1, h|1, g, i, j) bool, router-specific admissibility (True = may attend)
    # (b|1, h|1, g, i, 2) long, in place of `mask`: a query may attend key slots lo <= j < hi, all of
    # them valid and (in causal mode) not later than the query, which itself holds slot hi - 1
    span: Tensor | None = None
    bias: Tensor | None = None      # (b|1, h|1, g, i, j) added to the logits (LSH duplicate counts)
    k_gate: Tensor | None = None    # (b|1, h|1, g, j) scales gathered keys (CoLT5 multiply_keys_by_score)
    kv_gate: Tensor | None = None   # (b|1, h|1, g, j) scales gathered values: how routers with scores get gradients
    q_gate: Tensor | None = None    # (b|1, h|1, g, i) scales each group's output before it is scattered back
    # (b|1, h|1, g, i) added to the logits of the memory key/values, which every group holds: in a
    # 'logsumexp' merge of a query's r groups, -log r counts them once (MoBA's groups per key block)
    mem_bias: Tensor | None = None
    merge: Merge = 'overwrite'      # how a position that is the query of several groups is combined
    q_offset: int = 0               # absolute position of query 0 (one new token against a cache)
    aux_loss: Tensor | None = None  # router's auxiliary loss (k-means commitment), 0-dim
    layout: Layout | None = None    # None: Dense without indices, Gathered with them
    # the router's own: what a reversible recompute replays, what cached decoding continues from,
    # what the Recorder shows (bucket ids, clusters). The executor never reads it.
    router_state: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.layout is None:
            self.layout = Dense() if self.q_index is None and self.kv_index is None else Gathered()

    @property
    def contiguous_queries(self) -> bool:
        """Queries in sequence order, group after group: scattering back is a reshape."""
        return self.q_index is None or isinstance(self.layout, SlidingWindow)

    def validate(self, q_len: int, kv_len: int) -> None:
        for name, index, length in (('q_index', self.q_index, q_len), ('kv_index', self.kv_index, kv_len)):
            if index is None:
                continue
            assert index.ndim == 4 and index.dtype == torch.long, f'{name} must be a (b, h, g, i) long tensor'
            assert int(index.max()) < length and int(index.min()) >= -1, f'{name} out of range for length {length}'

    def to(self, device) -> 'RoutePlan':
        def move(t):
            return t.detach().to(device) if isinstance(t, Tensor) else t
        skip = ('router_state', 'layout')
        fields = {name: move(getattr(self, name)) for name in self.__dataclass_fields__ if name not in skip}
        return RoutePlan(**fields, layout=map_layout_tensors(self.layout, move),
                         router_state={k: move(v) for k, v in self.router_state.items()})


class _GatherRows(torch.autograd.Function):
    """Rows of a (rows, d) matrix picked by several index vectors, as one autograd node: its
    backward adds every piece's gradient into a single buffer, where one index_select per piece
    would each zero a buffer of the full size."""

    @staticmethod
    def forward(fctx, flat: Tensor, *rows: Tensor):
        fctx.set_materialize_grads(False)
        fctx.save_for_backward(*rows)
        fctx.shape = flat.shape
        return tuple(flat.index_select(0, r) for r in rows)

    @staticmethod
    def backward(fctx, *grads):
        rows = fctx.saved_tensors
        grad = None
        for r, g in zip(rows, grads):
            if g is not None:
                grad = g.new_zeros(fctx.shape) if grad is None else grad
                grad.index_add_(0, r, g)
        return (grad, *(None for _ in rows))


def flat_rows(index: Tensor, b: int, h: int, length: int) -> Tensor:
    """(b, h, g, j): the rows of a (b n h)-flattened sequence of `length` that positions (b|1, h|1,
    g, j) name; -1 names the row of position 0 (masked later). Heads innermost is the layout the
    projections produce ((b, n, (h d)) seen as (b, h, n, d)), so flattening q, k and v and
    the attention output is a view, not a copy."""
    batch = rearrange(torch.arange(b, device=index.device), 'b -> b 1 1 1')
    heads = rearrange(torch.arange(h, device=index.device), 'h -> 1 h 1 1')
    return (batch * length + index.clamp(min=0)) * h + heads


def gather(t: Tensor, index: Tensor, bounds: list[tuple[int, int]]) -> list[Tensor]:
    """(b, h, n, d) gathered by (b|1, h|1, g, j) positions: for each (start, stop) in `bounds`,
    the groups start:stop as (b, h, stop - start, j, d). -1 reads position 0 (masked later)."""
    index = index.clamp(min=0)
    b, h = t.shape[:2]
    if index.shape[0] == 1 and index.shape[1] == 1:
        # one plan for every sample and head: plain indexing, no expanded index tensor
        return [t[:, :, index[0, 0, start:stop]] for start, stop in bounds]
    # whole rows by index_select on the flattened sequence: much faster than an element-wise
    # gather over d, forward and backward
    rows = flat_rows(index, b, h, t.shape[-2])
    flat, pieces = rearrange(t, 'b h n d -> (b n h) d'), (rows[:, :, start:stop].flatten() for start, stop in bounds)
    picked = [flat.index_select(0, r) for r in pieces] if compiling() else _GatherRows.apply(flat, *pieces)
    return [rearrange(p, '(b h g j) d -> b h g j d', b=b, h=h, j=index.shape[-1]) for p in picked]


def positions_of(index: Tensor | None, length: int, device) -> Tensor:
    """Original positions of the gathered slots; an index of None is the whole sequence as one group."""
    if index is None:
        return torch.arange(length, device=device).view(1, 1, 1, length)
    return index


def merge_shares(plan: RoutePlan, lse: Tensor, seq_len: int) -> Tensor:
    """(b, h, g, i): the share of each group in its query's 'logsumexp' merge, the softmax of the
    group normalisers `lse` (b, h, g, i) over all groups a position belongs to."""
    assert lse is not None, 'a logsumexp merge needs the per-query log-sum-exp'
    b, h, g, i = lse.shape
    index = rearrange(plan.q_index.expand(b, h, g, i), 'b h g i -> b h (g i)')
    valid = index >= 0
    index = index.clamp(min=0)
    lse = rearrange(lse, 'b h g i -> b h (g i)').masked_fill(~valid, float('-inf'))
    lse_max = lse.new_full((b, h, seq_len), float('-inf')).scatter_reduce(2, index, lse, 'amax')
    lse_max = lse_max.masked_fill(torch.isinf(lse_max), 0.)
    weights = (lse - lse_max.gather(2, index)).exp()
    total = weights.new_zeros(b, h, seq_len).scatter_add(2, index, weights)
    weights = weights / total.gather(2, index).clamp(min=1e-30)
    return rearrange(weights, 'b h (g i) -> b h g i', g=g)


# rows per step of the weighted scatter: its temporary is one workspace of a few MiB that every step
# writes into, instead of several (b, h, g * i, d) tensors, or one fresh buffer per step, which at
# long lengths is new memory page-faulted in each time
SCATTER_ROWS = 16384


def _scratch(srcs: tuple[Tensor, ...], count: int) -> Tensor:
    """`count` (rows, d) buffers, rows enough for one step over the largest source."""
    return srcs[0].new_empty(count, min(SCATTER_ROWS, max(src.shape[0] for src in srcs)), srcs[0].shape[-1])


class _WeightedRowSum(torch.autograd.Function):
    """result[rows[r]] += weights[r] * src[r] over the rows of several (R_p, d) sources, each with
    its own rows and weights, into (n_rows, d), in steps of SCATTER_ROWS rows forward and backward.
    The sources are the executor's pieces as they are, so nothing is concatenated or copied."""

    @staticmethod
    def forward(fctx, n_rows: int, rows: list[Tensor], *weights_and_srcs: Tensor):
        weights, srcs = weights_and_srcs[:len(rows)], weights_and_srcs[len(rows):]
        fctx.set_materialize_grads(False)
        fctx.save_for_backward(*rows, *weights, *srcs)
        result = srcs[0].new_zeros(n_rows, srcs[0].shape[-1])
        workspace = _scratch(srcs, 1)[0]
        for r, w, src in zip(rows, weights, srcs):
            for start in range(0, src.shape[0], SCATTER_ROWS):
                part = slice(start, start + SCATTER_ROWS)
                weighted = torch.mul(src[part], w[part, None], out=workspace[:len(r[part])])
                result.index_add_(0, r[part], weighted)
        return result

    @staticmethod
    def backward(fctx, grad: Tensor | None):
        saved = fctx.saved_tensors
        k = len(saved) // 3
        rows, weights, srcs = saved[:k], saved[k:2 * k], saved[2 * k:]
        grad_weights = [None] * k
        grad_srcs = [None] * k
        if grad is not None:
            # the picked rows of grad, and their products with the source (vecdot's own temporary)
            workspace = _scratch(srcs, 2)
            for p, (r, w, src) in enumerate(zip(rows, weights, srcs)):
                if fctx.needs_input_grad[2 + p]:
                    grad_weights[p] = torch.empty_like(w)
                if fctx.needs_input_grad[2 + k + p]:
                    grad_srcs[p] = torch.empty_like(src)
                for start in range(0, src.shape[0], SCATTER_ROWS):
                    part = slice(start, start + SCATTER_ROWS)
                    picked, product = workspace[:, :len(r[part])]
                    torch.index_select(grad, 0, r[part], out=picked)
                    if grad_weights[p] is not None:
                        torch.sum(torch.mul(picked, src[part], out=product), dim=-1, out=grad_weights[p][part])
                    if grad_srcs[p] is not None:
                        torch.mul(picked, w[part, None], out=grad_srcs[p][part])
        return None, None, *grad_weights, *grad_srcs


def scatter(pieces: list[Tensor], plan: RoutePlan, seq_len: int, lse: Tensor | None = None,
            shares: Tensor | None = None) -> Tensor:
    """Group outputs (b, h, g, i, d), given as consecutive pieces along g (one piece: all of them),
    back to (b, h, n, d) (for queries gathered by index, a view of (b, n, h, d) memory).

    'overwrite': every position is the query of at most one group. 'logsumexp': a position that
    is the query of several groups (LSH rounds, overlapping clusters) gets the average of its
    group outputs weighted by each group's softmax normaliser, which is exactly attention over
    the union of the keys it saw (the shares of `merge_shares`, given as `shares` or computed from
    `lse`). Positions no group chose get zeros.
    """
    if plan.contiguous_queries:
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
        return rearrange(out, 'b h g i d -> b h (g i) d')[:, :, :seq_len]

    b, h, _, i, _ = pieces[0].shape
    index = plan.q_index.expand(b, h, -1, i)
    valid = index >= 0
    if plan.merge == 'overwrite':
        weights = valid.to(pieces[0].dtype)
    else:
        shares = merge_shares(plan, lse, seq_len) if shares is None else shares
        weights = shares.to(pieces[0].dtype).masked_fill(~valid, 0.)
    # the output in (b n h) rows: the attention layer's (b, n, (h d)) is a view of it, not a copy
    rows = flat_rows(index, b, h, seq_len)
    bounds = [0, *accumulate(p.shape[2] for p in pieces)]
    cuts = list(zip(bounds[:-1], bounds[1:]))
    piece_rows = [rows[:, :, s:e].flatten() for s, e in cuts]
    piece_weights = [weights[:, :, s:e].flatten() for s, e in cuts]
    srcs = [rearrange(p, 'b h g i d -> (b h g i) d') for p in pieces]
    if compiling():
        result = srcs[0].new_zeros(b * h * seq_len, srcs[0].shape[-1])
        for r, w, src in zip(piece_rows, piece_weights, srcs):
            result = result.index_add(0, r, src * w[:, None])
    else:
        result = _WeightedRowSum.apply(b * h * seq_len, piece_rows, *piece_weights, *srcs)
    return rearrange(result, '(b n h) d -> b h n d', b=b, h=h)
