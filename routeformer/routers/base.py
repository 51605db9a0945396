"""The router interface: look at queries/keys, return a RoutePlan.

Axes: b batch, h heads, n sequence, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..attention.plan import RoutePlan
from ..helpers import exists


@dataclass(frozen=True)
class RouteInput:
    """What a router routes one group of heads by.

    q (b, h, n, d) queries and k (b, h, m, d) keys, before rotary positions: routers see content,
    not positions. `mask` (b, m) marks real keys and `q_mask` (b, n) real queries (cross-attention;
    in self-attention the key mask serves both). `offset` is the absolute position of q's first
    row: 0 for a whole sequence, the new token's position in a decoding step. `cached` is the plan
    the router returned for the same call in the forward pass: a reversible recompute hands it back
    so the discrete decision is replayed and only differentiable parts are recomputed.

    In a self-attention decoding step q and k hold the new token alone and `mask` its own key mask
    (b, 1); the router's cache holds what it needs of the tokens before. In cross-attention k and
    `mask` are the whole context.
    """
    q: Tensor
    k: Tensor | None
    causal: bool = False
    mask: Tensor | None = None
    q_mask: Tensor | None = None
    offset: int = 0
    cached: RoutePlan | None = None

    def heads(self, start: int, end: int, cached: RoutePlan | None = None) -> 'RouteInput':
        """The input of heads start:end (with that group's replayed plan)."""
        return replace(self, q=self.q[:, start:end], k=None if self.k is None else self.k[:, start:end],
                       cached=cached)

    def key_mask(self) -> Tensor:
        """`mask` (b, m), all True where it is None."""
        if exists(self.mask):
            return self.mask.bool()
        return torch.ones(self.q.shape[0], self.k.shape[-2], dtype=torch.bool, device=self.q.device)


@dataclass
class RouterCache:
    """What a router keeps between the decoding steps of one generation. Routers whose decoding
    plan depends only on the position (full, local) keep nothing; the others subclass it."""


@dataclass
class KeyHistory(RouterCache):
    """The routing keys (b, h, n, d) and key mask (b, n) of every position so far, for routers
    that score the prefix's keys again at each step (MoBA's block means, Sinkhorn's summaries)."""
    keys: Tensor
    mask: Tensor

    @classmethod
    def of(cls, inp: RouteInput, **extra) -> 'KeyHistory':
        return cls(keys=inp.k, mask=inp.key_mask(), **extra)

    def extend(self, step: RouteInput) -> None:
        self.keys = torch.cat((self.keys, step.k), dim=-2)
        self.mask = torch.cat((self.mask, step.key_mask()), dim=-1)


class Router(nn.Module):
    """A router decides which queries and keys share a group. It owns only its own state
    (centroids, sort-net weights); projections, norms and the attention itself live elsewhere.

    A router implements `route` (the plan of a whole sequence) and, to decode token by token,
    `prefill` (its cache after a forward pass) and `decode_step` (the plan of one new token);
    cross-attention decoding calls `decode_context_step`. Calling a router, `router(q, k, causal=...)`,
    routes a whole sequence.

    `multiple_of`: the sequence lengths it accepts must be multiples of this.
    """

    multiple_of: int = 1

    def route(self, inp: RouteInput) -> RoutePlan:
        """The plan of the whole sequence in `inp`."""
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor | None, *, causal: bool, mask: Tensor | None = None,
                q_mask: Tensor | None = None, cached: RoutePlan | None = None) -> RoutePlan:
        """`route` of RouteInput(q, k, ...): q (b, h, n, d), k (b, h, m, d), mask (b, m), q_mask (b, n)."""
        return self.route(RouteInput(q=q, k=k, causal=causal, mask=mask, q_mask=q_mask, cached=cached))

    def prefill(self, inp: RouteInput, plan: RoutePlan | None) -> RouterCache:
        """The cache to decode from after `route(inp)` gave `plan`; plan None and inp of length 0
        when decoding starts from nothing."""
        return RouterCache()

    def decode_step(self, step: RouteInput, cache: RouterCache) -> RoutePlan:
        """Self-attention decoding of the token at absolute position `step.offset`: a plan whose
        kv_index (b|1, h|1, 1, j) selects the cached keys it attends to (q_index None,
        q_offset=step.offset). `step` holds the new token's query, key and key mask; `cache`
        (extended in place) what the router keeps of the tokens before."""
        raise NotImplementedError(f'{type(self).__name__} does not support cached decoding')

    def decode_context_step(self, step: RouteInput, cache: RouterCache) -> RoutePlan:
        """Cross-attention decoding: the plan of the new query at `step.offset` over the context
        keys `step.k`. By default the query is routed as the forward pass routes one query; routers
        whose choice for a query depends on earlier queries override it."""
        return self.route(step)

    def apply_statistics(self) -> None:
        """Applies the running statistics gathered by the training forwards since they were last
        applied (k-means: the EMA update of the centroids). Eager models do this after each backward
        pass by themselves; a compiled model needs it called after each backward. Routers that keep
        none have nothing to do."""

    def discard_statistics(self) -> None:
        """Forgets the running statistics gathered by the training forwards since they were last
        applied (k-means EMA sums, cluster loads), e.g. of a training step that is skipped because
        its loss or gradients were not finite. Routers that keep none have nothing to do."""

    def check_length(self, n: int) -> None:
        if n % self.multiple_of != 0:
            raise ValueError(f'sequence length {n} is not a multiple of {self.multiple_of}, which '
                             f'{type(self).__name__} needs: pad it, or wrap the model in Autopadder')

    def extra_repr(self) -> str:
        return f'multiple_of={self.multiple_of}'


def apply_statistics(module: nn.Module) -> None:
    """`Router.apply_statistics` for every router inside `module`."""
    for m in module.modules():
        if isinstance(m, Router):
            m.apply_statistics()


def discard_statistics(module: nn.Module) -> None:
    """`Router.discard_statistics` for every router inside `module`."""
    for m in module.modules():
        if isinstance(m, Router):
            m.discard_statistics()
