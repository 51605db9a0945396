"""The router interface: look at queries/keys, return a RoutePlan.

Axes: b batch, h heads, n sequence, d head dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..attention.plan import RoutePlan


class Router(nn.Module):
    """A router decides which queries and keys share a group. It owns only its own state
    (centroids, sort-net weights); projections, norms and the attention itself live elsewhere.

    `multiple_of`: the sequence lengths it accepts must be multiples of this.
    """

    multiple_of: int = 1

    def forward(self, q: Tensor, k: Tensor, *, causal: bool, mask: Tensor | None = None,
                cached: RoutePlan | None = None) -> RoutePlan:
        """q (b, h, n, d), k (b, h, n_kv, d), mask (b, n_kv). `cached` is the plan this router
        returned for the same call in the forward pass; a reversible recompute hands it back so the
        discrete decision is replayed and only differentiable parts are recomputed."""
        raise NotImplementedError

    # cached decoding hands `decode` the pre-rotary keys of every position so far when this is True
    needs_routing_keys: bool = False
    # ... and the key mask of every position so far, as `mask=` (b, pos + 1), when this is True
    needs_decode_mask: bool = False
    # cross-attention hands `forward` and `decode_context` the queries' mask as `q_mask=` when True
    needs_query_mask: bool = False

    def decode(self, pos: int, *, q: Tensor, k: Tensor | None, state: dict) -> RoutePlan:
        """Cached decoding of the token at absolute position `pos`: a plan whose kv_index
        (b|1, h|1, 1, j) selects the cached keys it attends to (q_index None, q_offset=pos).
        q (b, h, 1, d) is the new query; k (b, h, pos + 1, d) the routing keys of every position
        (only when `needs_routing_keys`); `state` persists across the steps of one generation,
        for routers that cache bucket or cluster ids."""
        raise NotImplementedError(f'{type(self).__name__} does not support cached decoding')

    def decode_context(self, pos: int, *, q: Tensor, k: Tensor, mask: Tensor | None, state: dict,
                       q_mask: Tensor | None = None) -> RoutePlan:
        """Cross-attention during cached decoding: the plan of the new query at absolute position
        `pos`, q (b, h, 1, d), over the context keys k (b, h, m, d) with mask (b, m); q_mask (b, 1)
        when `needs_query_mask`. `state` persists across the steps of one generation and starts
        with the prefill's plan. By default the query is routed as the forward pass routes one
        query; routers whose choice for a query depends on earlier queries override it."""
        extra = dict(q_mask=q_mask) if self.needs_query_mask else {}
        return self(q, k, causal=False, mask=mask, **extra)

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
