"""Strictly causal coordinate-descent routing (CoLT5 decoders), in windows of `window_size` tokens.

The seed decided which tokens of a window were heavy by coordinate descent over the whole window,
so a token's output depended on later tokens. Here:
- `CausalQueryRouter`: token i of window m is routed when its score reaches tau_m, the k-th best
  score of window m - 1, and fewer than k earlier tokens of window m were routed; so it depends
  on nothing after itself. Its gate is sigmoid((s_i - tau_m) / eps), the smooth form of
  coordinate descent's min(1, exp((s_i + a) / eps)) with the threshold known causally.
- `CausalKeyRouter`: the keys of window m are the k best-scoring tokens of windows < m, kept by a
  running top-k (memory linear in length), gated by coordinate descent over the best candidates
  of that prefix.

Both are CoordinateDescentRouters (the same routing vector, the seed's parameter) with `route`
for a whole sequence, `prefill` for the decoding state after a prompt and `decode_step` for one
new token; the state of each is its own cache class, and decoding reproduces `route` exactly.

Axes: b batch, r routes (routing tokens), n sequence, d model dim, g windows, w window length,
k routed tokens, c candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..helpers import any_true, check_positive, pad_to_multiple, straight_through, topk_first
from .topk import NEG_INF, CoordinateDescentRouter


def window_threshold(s: Tensor, valid: Tensor, k: int) -> Tensor:
    """The k-th best valid score of each window (..., w) -> (...); -inf when fewer than k are valid."""
    if s.shape[-1] < k:
        return s.new_full(s.shape[:-1], NEG_INF)
    return topk_first(s.masked_fill(~valid, NEG_INF), k).values[..., -1]


def pad_to_windows(s: Tensor, valid: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Scores (..., n) and validity (b, n) padded to whole windows; padding is never valid."""
    s, _ = pad_to_multiple(s, window, dim=-1)
    valid, _ = pad_to_multiple(valid, window, dim=-1, value=False)
    return s, valid


class WindowedRouter(CoordinateDescentRouter):
    """A coordinate-descent router that routes in windows of `window_size` tokens."""

    def __init__(self, dim: int, *, window_size: int, **kwargs):
        super().__init__(dim, **kwargs)
        check_positive(window_size=window_size)
        self.window_size = window_size

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, window_size={self.window_size}'


# ---------------------------------------------------------------------- queries

@dataclass
class QueryRouteCache:
    """Causal query routing after a prefix: the scores and validity (b, n) so far, the current
    window, its threshold (b,) and how many of its tokens were routed (b,)."""
    scores: Tensor
    valid: Tensor
    window: int | None = None
    tau: Tensor | None = None
    count: Tensor | None = None


class CausalQueryRouter(WindowedRouter):
    """Routes up to `num_tokens` tokens of every window of `window_size`, each by its own score
    against the previous window's k-th best (the first window routes its first tokens)."""

    def route(self, x: Tensor, valid: Tensor, num_tokens: int, *,
              random_route: bool = False) -> tuple[Tensor, Tensor]:
        """x (b, n, d), valid (b, n) -> index (b, g, k) positions in order (-1 = empty slot) and
        gates (b, g, k), over n padded up to whole windows."""
        w = self.window_size
        s, valid = pad_to_windows(self.scores(x)[:, 0], valid, w)
        b, n = s.shape
        g, k = n // w, min(num_tokens, w)
        sw = rearrange(s, 'b (g w) -> b g w', w=w)
        valid = rearrange(valid, 'b (g w) -> b g w', w=w)
        ranking = torch.randn_like(sw) if random_route else sw

        if num_tokens >= w:
            chosen = valid
            tau = sw.new_full((b, g), NEG_INF)
        else:
            tau = F.pad(window_threshold(ranking, valid, k)[:, :-1], (1, 0), value=NEG_INF)
            passes = (ranking >= rearrange(tau, 'b g -> b g 1')) & valid
            chosen = passes & (passes.long().cumsum(dim=-1) <= k)

        # the chosen positions of each window, in order, into k slots (slot k collects the rest and is cut)
        slot = torch.where(chosen, chosen.long().cumsum(dim=-1) - 1, k)
        positions = torch.arange(n, device=s.device).view(1, g, w).expand(b, g, w)
        index = torch.full((b, g, k + 1), -1, dtype=torch.long, device=s.device)
        index = index.scatter(-1, slot, torch.where(chosen, positions, -1))[..., :k]

        filled = index >= 0
        if self.needs_soft(s) and not random_route:
            soft = self.gate(sw, rearrange(tau, 'b g -> b g 1'))
            offsets = rearrange(torch.arange(g, device=s.device) * w, 'g -> g 1')
            gates = soft.gather(-1, (index - offsets).clamp(min=0)) * filled
        else:
            gates = filled.float()
        return index, gates

    def gate(self, s: Tensor, tau: Tensor) -> Tensor:
        soft = torch.sigmoid((s - tau) / self.eps)
        return straight_through(soft) if self.straight_through else soft

    # ------------------------------------------------------------------ cached decoding

    def empty_cache(self, x: Tensor) -> QueryRouteCache:
        s = x.new_zeros(x.shape[0], 0, dtype=torch.float32)
        return QueryRouteCache(scores=s, valid=s.bool())

    def prefill(self, x: Tensor, valid: Tensor, num_tokens: int) -> QueryRouteCache:
        """The cache after the tokens x (b, n, d) with validity (b, n), as if decoded one by one."""
        s = self.scores(x)[:, 0]
        n, w = s.shape[1], self.window_size
        start = (n - 1) // w * w if n else 0
        cache = QueryRouteCache(scores=s[:, :start], valid=valid[:, :start])
        # replay the current window token by token: at most `window_size` cheap steps
        for i in range(start, n):
            self.step(cache, s[:, i], valid[:, i], num_tokens)
        return cache

    def decode_step(self, x: Tensor, valid: Tensor, cache: QueryRouteCache,
                    num_tokens: int) -> tuple[Tensor, Tensor]:
        """The token x (b, 1, d) with validity (b,) at position len(cache.scores): whether it is
        routed (b,) bool, and its gate (b,) (not yet zeroed where unrouted)."""
        s = self.scores(x)[:, 0, 0]
        routed = self.step(cache, s, valid, num_tokens)
        return routed, self.gate(s, cache.tau)

    def step(self, cache: QueryRouteCache, s: Tensor, valid: Tensor, num_tokens: int) -> Tensor:
        w = self.window_size
        m = cache.scores.shape[1] // w
        if cache.window != m:
            cache.window, cache.count = m, torch.zeros_like(valid, dtype=torch.long)
            if num_tokens >= w or m == 0:
                cache.tau = s.new_full(s.shape, NEG_INF)
            else:
                prev = slice((m - 1) * w, m * w)
                cache.tau = window_threshold(cache.scores[:, prev], cache.valid[:, prev], num_tokens)
        cache.scores = torch.cat((cache.scores, s[:, None]), dim=1)
        cache.valid = torch.cat((cache.valid, valid[:, None]), dim=1)
        routed = valid & (s >= cache.tau) & (cache.count < min(num_tokens, w))
        cache.count = cache.count + routed.long()
        return routed


# ---------------------------------------------------------------------- keys

@dataclass
class KeyRouteCache:
    """Causal key routing after a prefix: the scores (b, r, n) and validity (b, n) so far; the
    windows folded into the running candidates, which are the best c scores (b, r, c) of those
    windows and their positions (-1 = none yet); the current window's keys and gates (b, r, 1, k)."""
    scores: Tensor
    valid: Tensor
    window: int | None = None
    best: Tensor | None = None
    where: Tensor | None = None
    index: Tensor | None = None
    gates: Tensor | None = None


def merge_window(best: Tensor, where: Tensor, values: Tensor, positions: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """The best c of (best, where) (b, r, c) and a window's (values, positions) (b, r, w')."""
    top = topk_first(torch.cat((best, values), dim=-1), c)
    return top.values, torch.cat((where, positions), dim=-1).gather(-1, top.indices)


class CausalKeyRouter(WindowedRouter):
    """For every window of `window_size`, the `num_tokens` best-scoring keys of all strictly
    earlier windows (per route), with coordinate-descent gates."""

    def route(self, x: Tensor, valid: Tensor, num_tokens: int, *,
              random_route: bool = False) -> tuple[Tensor, Tensor]:
        """x (b, n, d), valid (b, n) -> the keys of each window, kv index (b, r, g, k) (-1 = empty)
        and gates (b, r, g, k), over n padded up to whole windows."""
        s, valid = pad_to_windows(self.scores(x), valid, self.window_size)
        c = self.num_candidates(s, num_tokens)
        ranking = torch.randn_like(s) if random_route else s
        candidates, _ = self.candidates(ranking, valid, c)
        if random_route:
            index = candidates[..., :num_tokens]
            return index, (index >= 0).float()
        return self.gates_of(s, candidates, num_tokens)

    def num_candidates(self, s: Tensor, num_tokens: int) -> int:
        """How many of the best prefix keys the gates are computed over."""
        return 2 * math.ceil(num_tokens * self.fetch_k_ratio) if self.needs_soft(s) else num_tokens

    @torch.no_grad()
    def candidates(self, s: Tensor, valid: Tensor, c: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """For every window m, the c best-scoring positions of windows < m, best first.

        s (b, r, n) scores (n a multiple of the window), valid (b, n). A running top-c over the
        windows: a token that is not among the best c of a prefix is never among the best c of a
        longer one, so each step merges the previous best c with the new window's own best c.
        Returns candidates (b, r, g, c) (-1 = empty) and the running (best, where) (b, r, c)."""
        b, r, n = s.shape
        w = self.window_size
        g = n // w
        ranked = s.masked_fill(~rearrange(valid, 'b n -> b 1 n'), NEG_INF)
        values, offsets = topk_first(rearrange(ranked, 'b r (g w) -> b r g w', w=w), min(c, w))
        positions = offsets + rearrange(torch.arange(g, device=s.device) * w, 'g -> g 1')

        best = s.new_full((b, r, c), NEG_INF)
        where = torch.full((b, r, c), -1, dtype=torch.long, device=s.device)
        if g == 0:
            return where[:, :, :0, None].expand(b, r, 0, c), (best, where)
        out = []
        for m in range(g):
            out.append(where.masked_fill(torch.isinf(best), -1))
            best, where = merge_window(best, where, values[:, :, m], positions[:, :, m], c)
        return torch.stack(out, dim=2), (best, where)

    def gates_of(self, s: Tensor, candidates: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        """Gates of each window's keys: s (b, r, n) scores, candidates (b, r, g, c) best first. The
        soft top-(k * fetch_k_ratio) of the candidates, which stand for the whole prefix (the tokens
        they leave out score far below the cut, where soft scores vanish)."""
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

    # ------------------------------------------------------------------ cached decoding

    def empty_cache(self, x: Tensor) -> KeyRouteCache:
        s = x.new_zeros(x.shape[0], self.num_routing_tokens, 0, dtype=torch.float32)
        return KeyRouteCache(scores=s, valid=s[:, 0].bool())

    def prefill(self, x: Tensor, valid: Tensor, num_tokens: int) -> KeyRouteCache:
        """The cache after the tokens x (b, n, d) with validity (b, n), as if decoded one by one."""
        s = self.scores(x)
        w, n = self.window_size, s.shape[-1]
        m = (n - 1) // w
        _, (best, where) = self.candidates(s[..., :m * w], valid[:, :m * w], self.num_candidates(s, num_tokens))
        cache = KeyRouteCache(scores=s, valid=valid, window=m, best=best, where=where)
        self.window_keys(cache, num_tokens)
        return cache

    def decode_step(self, x: Tensor, valid: Tensor, cache: KeyRouteCache,
                    num_tokens: int) -> tuple[Tensor, Tensor]:
        """The token x (b, 1, d) with validity (b,) at position len(cache.scores): the keys of its
        window, kv index (b, r, 1, k) and gates (b, r, 1, k)."""
        s = self.scores(x)[..., 0]
        m = cache.scores.shape[-1] // self.window_size
        if cache.window != m or cache.index is None:
            self.advance(cache, m, num_tokens, s)
        cache.scores = torch.cat((cache.scores, s[..., None]), dim=-1)
        cache.valid = torch.cat((cache.valid, valid[:, None]), dim=-1)
        return cache.index, cache.gates

    @torch.no_grad()
    def advance(self, cache: KeyRouteCache, m: int, num_tokens: int, like: Tensor):
        """Fold the windows finished since the last step into the running candidates."""
        w = self.window_size
        if cache.window is None:
            b, r = cache.scores.shape[:2]
            c = self.num_candidates(like, num_tokens)
            cache.window, cache.best = 0, like.new_full((b, r, c), NEG_INF)
            cache.where = torch.full((b, r, c), -1, dtype=torch.long, device=like.device)
        c = cache.best.shape[-1]
        for done in range(cache.window, m):
            # exactly the steps of `candidates`, so that ties resolve the same way
            span = slice(done * w, (done + 1) * w)
            values = cache.scores[..., span].masked_fill(~cache.valid[:, None, span], NEG_INF)
            values, offsets = topk_first(values, min(c, w))
            cache.best, cache.where = merge_window(cache.best, cache.where, values, offsets + done * w, c)
        cache.window = m
        self.window_keys(cache, num_tokens)

    def window_keys(self, cache: KeyRouteCache, num_tokens: int):
        """The current window's keys and gates from the running candidates."""
        candidates = cache.where.masked_fill(torch.isinf(cache.best), -1)
        cache.index, cache.gates = self.gates_of(cache.scores, candidates[:, :, None], num_tokens)

