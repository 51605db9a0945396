"""Coordinate-descent top-k routing (CoLT5): a learned routing vector scores every token, the
best-scoring tokens go to a heavy branch, and their soft top-k scores become gates that multiply
the heavy branch's values and outputs, which is how the router gets its gradient.

The discrete choice (which tokens) is made by ranking the scores; coordinate descent only
provides the gates. With straight-through gates (the default) every gate is exactly 1 in the
forward pass and carries the soft score's gradient, so when no gradient is needed the coordinate
descent is skipped altogether.

Three ways to route, all here:
- `CoordinateDescentRouter.select`: top-k over a whole sequence (or equal shares of consecutive
  blocks, `route_block_size`), for encoders and cross-attention.
- `causal_query_route`: strictly causal per-window routing of queries (decoders): a token is
  routed when its score reaches the k-th best score of the previous window and fewer than k
  earlier tokens of its own window were routed; so it depends on nothing after itself.
- `causal_kv_candidates` + `CoordinateDescentRouter.causal_kv_gates`: for each window, the top-k
  keys of all strictly earlier windows, found by a running top-k (memory linear in length),
  and their coordinate-descent gates over the best candidates of that prefix.

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
from ..helpers import any_true, default, exists, l2norm, topk_first
from ..kernels.coor_descent import coor_descent
from .base import Router

RouterReturn = namedtuple('RouterReturn', ['indices', 'scores', 'routed_tokens', 'routed_mask'])

NEG_INF = float('-inf')
SCORE_CHUNK = 65536  # tokens scored at a time


def batched_gather(t: Tensor, index: Tensor) -> Tensor:
    """t (b, n, ...) at index (b, ...) -> (b, ..., ...); -1 reads position 0 (mask it)."""
    batch = torch.arange(t.shape[0], device=t.device).view(-1, *((1,) * (index.ndim - 1)))
    return t[batch, index.clamp(min=0)]


def straight_through(soft: Tensor) -> Tensor:
    """Exactly 1 in the forward pass, the gradient of `soft` in the backward pass."""
    return soft + (1. - soft).detach()


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

    # ------------------------------------------------------------------ causal (decoder) routing

    def causal_kv_gates(self, s: Tensor, candidates: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        """Gates of each window's routed keys: s (b, r, n) scores, candidates (b, r, g, c) from
        `causal_kv_candidates` (best first, -1 empty). Returns kv indices (b, r, g, k) and gates
        (b, r, g, k): the soft top-(k * fetch_k_ratio) of the candidates, which stand for the
        whole prefix (the tokens they leave out score far below the cut, where soft scores vanish)."""
        b, r, g, c = candidates.shape
        index = candidates[..., :num_tokens]
        valid = candidates >= 0
        if not self.needs_soft(s) or not any_true(valid):
            return index, (index >= 0).float()
        cand_s = s.gather(-1, rearrange(candidates.clamp(min=0), 'b r g c -> b r (g c)'))
        cand_s = rearrange(cand_s, 'b r (g c) -> b r g c', g=g)
        k = (valid.sum(dim=-1).float()).clamp(max=num_tokens * self.fetch_k_ratio)
        soft = self.soft_scores(cand_s, k, valid)[..., :num_tokens]
        return index, self.gates_from(soft) * (index >= 0)

    def num_candidates(self, s: Tensor, num_tokens: int) -> int:
        """How many of the best prefix keys the causal kv gates are computed over."""
        return 2 * math.ceil(num_tokens * self.fetch_k_ratio) if self.needs_soft(s) else num_tokens

    def extra_repr(self) -> str:
        return (f'routes={self.num_routing_tokens}, n_iters={self.n_iters}, eps={self.eps}, '
                f'straight_through={self.straight_through}, route_block_size={self.route_block_size}')


def route_back(src: Tensor, routed_tokens: Tensor, indices: Tensor) -> Tensor:
    """src (b, n, d) with rows `indices` (b, k) replaced by routed_tokens (b, k, d); -1 slots dropped."""
    b, n, _ = src.shape
    # -1 slots write to one extra row that is cut off afterwards
    index = indices.masked_fill(indices < 0, n)
    out = F.pad(src, (0, 0, 0, 1))
    batch = torch.arange(b, device=src.device).view(-1, 1)
    out = out.index_put((batch, index), routed_tokens.to(out.dtype))
    return out[:, :n]


# ---------------------------------------------------------------------- causal routing

def window_threshold(s: Tensor, valid: Tensor, k: int) -> Tensor:
    """The k-th best valid score of each window (..., w) -> (...); -inf when fewer than k are valid."""
    if s.shape[-1] < k:
        return s.new_full(s.shape[:-1], NEG_INF)
    return topk_first(s.masked_fill(~valid, NEG_INF), k).values[..., -1]


def causal_query_route(s: Tensor, *, window: int, num_tokens: int, mask: Tensor | None = None,
                       temperature: float, straight: bool = True, random_route: bool = False,
                       need_soft: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Strictly causal per-window routing. s (b, n) float32 scores, n a multiple of `window`.

    Token i of window m is routed when its score reaches tau_m, the k-th best score of window
    m - 1 (-inf for the first window, or when window m - 1 has fewer than k valid tokens), and
    fewer than k earlier tokens of window m were routed (k >= window routes every token). Its soft
    score is sigmoid((s_i - tau_m) / temperature), the smooth form of coordinate descent's
    min(1, exp((s_i + a) / eps)) with the threshold known causally.

    Returns index (b, g, k) positions in order (-1 = empty slot), gates (b, g, k) and tau (b, g)."""
    b, n = s.shape
    g = n // window
    k = min(num_tokens, window)
    sw = rearrange(s, 'b (g w) -> b g w', w=window)
    valid = rearrange(mask, 'b (g w) -> b g w', w=window) if exists(mask) else torch.ones_like(sw, dtype=torch.bool)
    ranking = torch.randn_like(sw) if random_route else sw

    if num_tokens >= window:
        chosen = valid
        tau = sw.new_full((b, g), NEG_INF)
    else:
        tau = F.pad(window_threshold(ranking, valid, k)[:, :-1], (1, 0), value=NEG_INF)
        passes = (ranking >= rearrange(tau, 'b g -> b g 1')) & valid
        chosen = passes & (passes.long().cumsum(dim=-1) <= k)

    # the chosen positions of each window, in order, into k slots (slot k collects the rest and is cut)
    slot = torch.where(chosen, chosen.long().cumsum(dim=-1) - 1, k)
    positions = torch.arange(n, device=s.device).view(1, g, window).expand(b, g, window)
    index = torch.full((b, g, k + 1), -1, dtype=torch.long, device=s.device)
    index = index.scatter(-1, slot, torch.where(chosen, positions, -1))[..., :k]

    filled = index >= 0
    if need_soft and not random_route:
        soft = torch.sigmoid((sw - rearrange(tau, 'b g -> b g 1')) / temperature)
        soft = soft.gather(-1, (index - rearrange(torch.arange(g, device=s.device) * window, 'g -> g 1')).clamp(min=0))
        gates = (straight_through(soft) if straight else soft) * filled
    else:
        gates = filled.float()
    return index, gates, tau.detach()


def causal_query_step(state: dict, s: Tensor, valid: Tensor, *, window: int, num_tokens: int) -> tuple[Tensor, Tensor]:
    """One token of `causal_query_route` for cached decoding: s and valid (b,) of the token at
    position len(state['s']). `state` holds the scores and validity so far, the current window, its
    threshold and how many of its tokens were routed. Returns (routed (b,) bool, tau (b,))."""
    pos = state['s'].shape[1]
    m = pos // window
    if state.get('window') != m:
        state['window'], state['count'] = m, torch.zeros_like(valid, dtype=torch.long)
        if num_tokens >= window or m == 0:
            state['tau'] = s.new_full(s.shape, NEG_INF)
        else:
            prev = slice((m - 1) * window, m * window)
            state['tau'] = window_threshold(state['s'][:, prev], state['valid'][:, prev], num_tokens)
    state['s'] = torch.cat((state['s'], s[:, None]), dim=1)
    state['valid'] = torch.cat((state['valid'], valid[:, None]), dim=1)
    routed = valid & (s >= state['tau']) & (state['count'] < min(num_tokens, window))
    state['count'] = state['count'] + routed.long()
    return routed, state['tau']


def causal_query_state(s: Tensor, valid: Tensor, *, window: int, num_tokens: int) -> dict:
    """The `causal_query_step` state after the tokens s, valid (b, n) (a prefill)."""
    state = dict(s=s[:, :0], valid=valid[:, :0])
    n = s.shape[1]
    if n == 0:
        return state
    m = (n - 1) // window
    start = m * window
    state.update(s=s[:, :start], valid=valid[:, :start])
    # replay the current window token by token: at most `window` cheap steps
    for i in range(start, n):
        causal_query_step(state, s[:, i], valid[:, i], window=window, num_tokens=num_tokens)
    return state


def merge_window(best: Tensor, where: Tensor, values: Tensor, positions: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """The best c of (best, where) (b, r, c) and a window's (values, positions) (b, r, w')."""
    top = topk_first(torch.cat((best, values), dim=-1), c)
    return top.values, torch.cat((where, positions), dim=-1).gather(-1, top.indices)


@torch.no_grad()
def causal_kv_candidates(s: Tensor, *, window: int, num_candidates: int,
                         mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """For every window m, the `num_candidates` best-scoring positions of windows < m, best first.

    s (b, r, n) scores (n a multiple of window), mask (b, n). A running top-c over the windows:
    a token that is not among the best c of a prefix is never among the best c of a longer one,
    so each step merges the previous best c with the new window's own best c, and memory is
    linear in n. Returns candidates (b, r, g, c) (-1 = empty) and the running state
    (values, positions) (b, r, c) after the last window."""
    b, r, n = s.shape
    g, c = n // window, num_candidates
    ranked = s.masked_fill(~rearrange(mask, 'b n -> b 1 n'), NEG_INF) if exists(mask) else s
    values, offsets = topk_first(rearrange(ranked, 'b r (g w) -> b r g w', w=window), min(c, window))
    positions = offsets + rearrange(torch.arange(g, device=s.device) * window, 'g -> g 1')

    best = s.new_full((b, r, c), NEG_INF)
    where = torch.full((b, r, c), -1, dtype=torch.long, device=s.device)
    if g == 0:
        return where[:, :, :0, None].expand(b, r, 0, c), (best, where)
    out = []
    for m in range(g):
        out.append(where.masked_fill(torch.isinf(best), -1))
        best, where = merge_window(best, where, values[:, :, m], positions[:, :, m], c)
    return torch.stack(out, dim=2), (best, where)


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

    def forward(self, q, k, *, causal, mask=None, cached=None):
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
