"""Coordinate-descent top-k routing (CoLT5): a learned routing vector scores every token, the
best-scoring tokens go to a heavy branch, and their soft top-k scores become gates that multiply
the heavy branch's values and outputs, which is how the router gets its gradient.

The discrete choice (which tokens) is made by ranking the scores; coordinate descent only
provides the gates. With straight-through gates (the default) every gate is exactly 1 in the
forward pass and carries the soft score's gradient, so when no gradient is needed the coordinate
descent is skipped altogether.

Two ways to route:
- `CoordinateDescentRouter.select`: top-k over a whole sequence (or equal shares of consecutive
  blocks, `route_block_size`), for encoders and cross-attention.
- `routers/causal_topk.py`: the strictly causal per-window forms of the same router, for decoders.

`TopKRouter` wraps the same selection in the Router interface (per-head queries and keys in,
RoutePlan out) so any Attention layer can use it.

Axes: b batch, r routes (routing tokens), n sequence, d model dim, g windows (or blocks),
w window length, k routed tokens, c candidates, h heads, e head dim.
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..attention.plan import RoutePlan
from ..helpers import any_true, batched_gather, default, exists, l2norm, route_back, straight_through, topk_first
from ..kernels.coor_descent import coor_descent
from .base import Router

RouterReturn = namedtuple('RouterReturn', ['indices', 'scores', 'routed_tokens', 'routed_mask'])

NEG_INF = float('-inf')
SCORE_CHUNK = 65536  # tokens scored at a time


class CoordinateDescentRouter(nn.Module):
    """Scores tokens against `num_routing_tokens` learned vectors and picks the top `num_tokens` of
    each route (Wright et al. 2015 coordinate descent for the soft top-k; Lei et al. 2023 ε-scaling).

    `fetch_k_ratio`: coordinate descent runs with k * ratio (CoLT5 fetches a few more than it keeps).
    `learned_routing_tokens=True` (seed naming) means the routing vectors are not parameters here:
    pass them to forward as `routing_tokens`. `route_block_size`: route an equal share inside each
    block of that many tokens (the fused kernel handles rows of at most 131072).
    `use_triton`: the fused coordinate-descent kernel on CUDA (PyTorch elsewhere)."""

    def __init__(self, dim: int, straight_through: bool = True, n_iters: int = 20, fetch_k_ratio: float = 9 / 8,
                 eps: float = 0.03, eps_decay: float = 0.7, eps_init: float = 4., num_routing_tokens: int = 1,
                 learned_routing_tokens: bool = False, use_triton: bool = False, cosine_sim_routing: bool = False,
                 cosine_sim_scale: float = 8, route_block_size: int | None = None,
                 triton_checkpoint_segments: int | None = None):
        super().__init__()
        if fetch_k_ratio < 1:
            raise ValueError(f'fetch_k_ratio must be >= 1, got {fetch_k_ratio}')
        if n_iters < 1:
            raise ValueError(f'n_iters must be >= 1, got {n_iters}')
        if num_routing_tokens < 1:
            raise ValueError(f'num_routing_tokens must be >= 1, got {num_routing_tokens}')
        if exists(route_block_size) and route_block_size < 1:
            raise ValueError(f'route_block_size must be a positive number of tokens, got {route_block_size}')
        self.straight_through, self.n_iters, self.fetch_k_ratio = straight_through, n_iters, fetch_k_ratio
        self.eps, self.eps_decay, self.eps_init = eps, eps_decay, eps_init
        self.num_routing_tokens = num_routing_tokens
        self.use_triton = use_triton
        self.triton_checkpoint_segments = default(triton_checkpoint_segments, max(1, n_iters // 5))
        self.cosine_sim_routing, self.cosine_sim_scale = cosine_sim_routing, cosine_sim_scale
        self.route_block_size = route_block_size
        self.routing_token = None if learned_routing_tokens else nn.Parameter(torch.randn(num_routing_tokens, dim))

    # ------------------------------------------------------------------ scores

    def scores(self, x: Tensor, routing_tokens: Tensor | None = None) -> Tensor:
        """x (b, n, d) -> routing scores (b, r, n) in float32, whatever the dtype of x."""
        tokens = self.routing_token
        if tokens is None:
            if routing_tokens is None:
                raise ValueError('this router was built with learned_routing_tokens=True: pass routing_tokens '
                                 '(b, d) or (b, r, d) to forward')
            tokens = routing_tokens if routing_tokens.ndim == 3 else rearrange(routing_tokens, 'b d -> b 1 d')
        # float64 products rounded to float32: equal tokens get equal scores however the matmul is
        # blocked (a batch of n or one token while decoding), so ties break the same way in both
        pattern = 'b n d, r d -> b r n' if tokens.ndim == 2 else 'b n d, b r d -> b r n'
        with torch.autocast(x.device.type, enabled=False):
            tokens = tokens.double()
            if self.cosine_sim_routing:
                tokens = l2norm(tokens)
            chunks = []
            # in chunks, so a long memory is never copied whole in float64
            for chunk in x.split(SCORE_CHUNK, dim=1):
                chunk = chunk.double()
                s = torch.einsum(pattern, chunk, tokens)
                if self.cosine_sim_routing:
                    norms = torch.linalg.vector_norm(chunk, dim=-1).clamp(min=1e-12)
                    s = s / rearrange(norms, 'b n -> b 1 n') * self.cosine_sim_scale
                chunks.append(s.float())
        return torch.cat(chunks, dim=-1)

    # ------------------------------------------------------------------ soft scores

    def soft_scores(self, s: Tensor, k, mask: Tensor | None) -> Tensor:
        """Coordinate-descent soft top-k of s (..., n) with about k per row, float32."""
        kwargs = dict(n_iters=self.n_iters, k=k, eps=self.eps, eps_init=self.eps_init, eps_decay=self.eps_decay,
                      mask=mask)
        if self.use_triton and s.is_cuda:
            try:
                from ..kernels.coor_descent_triton import triton_coor_descent
            except ImportError:
                pass
            else:
                return triton_coor_descent(s, checkpoint_segments=self.triton_checkpoint_segments, **kwargs)
        return coor_descent(s, **kwargs)

    def needs_soft(self, s: Tensor) -> bool:
        """Soft scores change the result only without straight-through, or for a gradient."""
        return not self.straight_through or (torch.is_grad_enabled() and s.requires_grad)

    def gates_from(self, soft: Tensor) -> Tensor:
        return straight_through(soft) if self.straight_through else soft

    # ------------------------------------------------------------------ selection

    def select(self, s: Tensor, num_tokens: int, *, mask: Tensor | None = None,
               random_route: bool = False) -> tuple[Tensor, Tensor]:
        """s (b, r, n), mask (b, n) -> indices (b, r, k) and gates (b, r, k) float32. Masked tokens are
        chosen only when a route has fewer than k valid ones, and then get gate 0. With
        `route_block_size`, each block routes ceil(k / blocks); slots past the end are -1."""
        b, r, n = s.shape
        mask = repeat(mask, 'b n -> b r n', r=r) if exists(mask) else None
        block = self.route_block_size
        if not exists(block) or block >= n:
            return self._select_rows(s, num_tokens, mask, random_route)

        blocks = math.ceil(n / block)
        pad = blocks * block - n
        valid = default(mask, torch.ones_like(s, dtype=torch.bool))
        s, valid = F.pad(s, (0, pad)), F.pad(valid, (0, pad), value=False)
        per_block = min(math.ceil(num_tokens / blocks), block)
        indices, gates = self._select_rows(rearrange(s, 'b r (g w) -> b r g w', w=block), per_block,
                                           rearrange(valid, 'b r (g w) -> b r g w', w=block), random_route)
        indices = indices + rearrange(torch.arange(blocks, device=s.device) * block, 'g -> g 1')
        indices = indices.masked_fill(indices >= n, -1)
        return rearrange(indices, 'b r g k -> b r (g k)'), rearrange(gates, 'b r g k -> b r (g k)')

    def _select_rows(self, s, k, mask, random_route):
        ranking = torch.randn_like(s) if random_route else s
        if exists(mask):
            ranking = ranking.masked_fill(~mask, NEG_INF)
        indices = topk_first(ranking, k).indices
        if self.needs_soft(s) and not random_route:
            soft = self.soft_scores(s, min(k * self.fetch_k_ratio, s.shape[-1]), mask)
            gates = self.gates_from(soft.gather(-1, indices))
        else:
            gates = torch.ones(indices.shape, device=s.device)
        if exists(mask):
            gates = gates * mask.gather(-1, indices)
        return indices, gates

    # ------------------------------------------------------------------ seed API

    def forward(self, x: Tensor, *, num_tokens: int, mask: Tensor | None = None, random_route: bool = False,
                routing_tokens: Tensor | None = None, keep_one_route_dim: bool = False) -> RouterReturn:
        """x (b, n, d) -> RouterReturn(indices (b, [r,] k), scores (b, [r,] k), routed_tokens
        (b, [r,] k, d), routed_mask (b, [r,] k) or None). The route axis is there when there are
        several routes or `keep_one_route_dim`. When n <= num_tokens nothing is routed: indices None,
        scores all 1 and routed_tokens x itself (seed behaviour)."""
        b, n = x.shape[:2]
        r = self.num_routing_tokens if self.routing_token is not None else (
            routing_tokens.shape[1] if exists(routing_tokens) and routing_tokens.ndim == 3 else 1)
        keep = keep_one_route_dim or r > 1
        if n <= num_tokens:
            scores = torch.ones(b, r, n, device=x.device, dtype=x.dtype)
            routed = x[:, None].expand(b, r, n, x.shape[-1])
            routed_mask = mask[:, None].expand(b, r, n) if exists(mask) else None
            return self._squeeze(RouterReturn(None, scores, routed, routed_mask), keep)

        s = self.scores(x, routing_tokens)
        indices, gates = self.select(s, num_tokens, mask=mask, random_route=random_route)
        routed = batched_gather(x, indices)
        routed_mask = batched_gather(mask, indices) if exists(mask) else None
        if any_true(indices < 0):
            routed_mask = default(routed_mask, torch.ones_like(indices, dtype=torch.bool)) & (indices >= 0)
        return self._squeeze(RouterReturn(indices, gates.to(x.dtype), routed, routed_mask), keep)

    @staticmethod
    def _squeeze(ret: RouterReturn, keep: bool) -> RouterReturn:
        if keep:
            return ret
        return RouterReturn(*(t.squeeze(1) if exists(t) else None for t in ret))

    def route_back(self, src: Tensor, routed_tokens: Tensor, indices: Tensor) -> Tensor:
        """Writes routed_tokens (b, k, d) into src (b, n, d) at indices (b, k); -1 slots are dropped."""
        return route_back(src, routed_tokens, indices)

    def extra_repr(self) -> str:
        return (f'routes={self.num_routing_tokens}, n_iters={self.n_iters}, eps={self.eps}, '
                f'straight_through={self.straight_through}, route_block_size={self.route_block_size}')


# ---------------------------------------------------------------------- the Router interface

class TopKRouter(Router):
    """Coordinate-descent top-k as a Router: each head scores its queries and keys against a
    learned routing vector; the best `num_tokens_q` queries attend to the best `num_tokens_kv`
    keys, with the gates in the plan (q_gate on outputs, kv_gate on values), and unrouted queries
    get zeros. Non-causal only: a decoder needs the window construction of
    ConditionalRoutedAutoregressiveAttention."""

    def __init__(self, *, heads: int, dim_head: int, num_tokens_q: int, num_tokens_kv: int, **router_kwargs):
        super().__init__()
        self.num_tokens_q, self.num_tokens_kv = num_tokens_q, num_tokens_kv
        self.q_router = CoordinateDescentRouter(dim_head, num_routing_tokens=heads, **router_kwargs)
        self.kv_router = CoordinateDescentRouter(dim_head, num_routing_tokens=heads, **router_kwargs)

    def head_scores(self, router: CoordinateDescentRouter, t: Tensor) -> Tensor:
        # head h of t against routing vector h: (b, h, n)
        with torch.autocast(t.device.type, enabled=False):
            return torch.einsum('b h n e, h e -> b h n', t.float(), router.routing_token.float())

    def route(self, inp):
        q, k, mask, causal, cached = inp.q, inp.k, inp.mask, inp.causal, inp.cached
        if causal:
            raise ValueError('TopKRouter routes over the whole sequence, which is not causal; for a decoder use '
                             'ConditionalRoutedAutoregressiveAttention')
        if exists(cached):
            return cached
        plans = []
        for router, t, num in ((self.q_router, q, self.num_tokens_q), (self.kv_router, k, self.num_tokens_kv)):
            if t.shape[-2] <= num:
                plans.append((None, None))
                continue
            indices, gates = router.select(self.head_scores(router, t), num, mask=mask)
            plans.append((rearrange(indices, 'b h k -> b h 1 k'), rearrange(gates, 'b h k -> b h 1 k')))
        (q_index, q_gate), (kv_index, kv_gate) = plans
        # padded keys that a route had to take carry gate 0 and are masked by the executor's key mask
        return RoutePlan(q_index=q_index, kv_index=kv_index, q_gate=q_gate, kv_gate=kv_gate)

    def extra_repr(self):
        return f'num_tokens_q={self.num_tokens_q}, num_tokens_kv={self.num_tokens_kv}'
