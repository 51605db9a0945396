"""Multi-head attention whose heads are split between routers.

Axes: b batch, n sequence (queries), m key/value sequence, h heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from math import lcm

import torch
from einops import rearrange
from torch import Tensor, nn

from ..attention.executor import RoutedAttention
from ..attention.plan import RoutePlan
from ..attention.recording import AttentionRecord
from ..context import LayerContext
from ..helpers import default, exists, l2norm
from ..routers import FullRouter, Router
from ..routers.base import RouteInput, RouterCache
from .embeddings import RotaryEmbedding, apply_rotary


@dataclass
class KVCache:
    """One self-attention layer's decoding cache: the keys and values (b, h, n, d) of every
    position so far (rotated), their key mask (b, n), and the cache of each head group's router
    (what its `decode_step` keeps between steps)."""
    k: Tensor
    v: Tensor
    mask: Tensor
    routers: list[RouterCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.k.shape[-2]

    def append(self, k: Tensor, v: Tensor, mask: Tensor) -> None:
        self.k, self.v = torch.cat((self.k, k), dim=-2), torch.cat((self.v, v), dim=-2)
        self.mask = torch.cat((self.mask, mask), dim=-1)


@dataclass
class ContextCache:
    """A cross-attention layer's decoding cache: the context's keys and values (b, h, m, d),
    which never change, and each head group's router cache."""
    k: Tensor
    v: Tensor
    routers: list[RouterCache] = field(default_factory=list)


def cat_heads(outs: list[Tensor]) -> Tensor:
    """The outputs (b, h_i, n, d) of consecutive head groups as one (b, h, n, d)."""
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class Attention(nn.Module):
    """Projections, shared-QK, learned memory key/values and rotary positions around a router.

    The first `n_local_heads` heads use `local_router`, the rest `router` (full attention when
    None), or, when `router` is a list of (router, heads) pairs, one group of heads each (a None
    router: full attention). With `cross_attend=True` keys and values come from `ctx.context`,
    masked by `ctx.context_mask`. `forward(x, ctx)` returns `(out, aux_loss)`.

    `local_qkv=True` gives the local heads their own query/key/value projection (`local_to_qkv`,
    with bias, never shared-QK) and leaves `to_q`/`to_k`/`to_v` to the routed heads, the Routing
    Transformer's parameterisation; by default one projection serves all heads. `out_bias` is the
    output projection's bias. `mem_kv_from_inputs=True` learns the `num_mem_kv` memory slots as
    inputs (`mem_inputs`, (1, num_mem_kv, dim)) that go through the layer's own key and value
    projections (Reformer's parameterisation) instead of as key/value vectors per head.

    Components may be passed in instead of built: `to_q`, `to_v`, `to_out` (modules mapping to and
    from heads * dim_head features; shared with another layer, or Reformer's one value head) and
    `executor` (anything called like RoutedAttention, e.g. one that runs it in chunks).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, causal: bool = False,
                 router: Router | list[tuple[Router | None, int]] | None = None, local_router: Router | None = None,
                 n_local_heads: int = 0,
                 shared_qk: bool = False, num_mem_kv: int = 0, dropout: float = 0., post_attn_dropout: float = 0.,
                 cross_attend: bool = False, dim_context: int | None = None,
                 rotary: RotaryEmbedding | None = None, backend: str = 'auto', rel_pos: nn.Module | None = None,
                 local_qkv: bool = False, out_bias: bool = True, mem_kv_from_inputs: bool = False,
                 to_q: nn.Module | None = None, to_v: nn.Module | None = None, to_out: nn.Module | None = None,
                 executor: nn.Module | None = None):
        super().__init__()
        if not 0 <= n_local_heads <= heads:
            raise ValueError(f'n_local_heads ({n_local_heads}) must be between 0 and heads ({heads})')
        if n_local_heads > 0 and local_router is None:
            raise ValueError('n_local_heads > 0 needs a local_router')
        self.heads, self.causal, self.cross_attend, self.shared_qk = heads, causal and not cross_attend, cross_attend, shared_qk
        self.dim_head = dim_head
        inner, dim_kv = heads * dim_head, default(dim_context, dim)
        # heads [0, n_own) have their own projection, the rest share to_q/to_k/to_v
        self.n_own = n_local_heads if local_qkv and not cross_attend else 0
        self.local_to_qkv = nn.Linear(dim, 3 * self.n_own * dim_head) if self.n_own else None
        shared = (heads - self.n_own) * dim_head

        self.to_q = (to_q if exists(to_q) else nn.Linear(dim, shared, bias=False)) if shared else None
        self.to_k = None if shared_qk or not shared else nn.Linear(dim_kv, shared, bias=False)
        self.to_v = (to_v if exists(to_v) else nn.Linear(dim_kv, shared, bias=False)) if shared else None
        self.to_out = to_out if exists(to_out) else nn.Linear(inner, dim, bias=out_bias)
        self.post_attn_dropout = nn.Dropout(post_attn_dropout)

        # learned key/values every query can see (All-Attention); also guarantees no empty row
        has_mem, from_inputs = num_mem_kv > 0, mem_kv_from_inputs and not cross_attend
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head) * dim_head ** -0.5) \
            if has_mem and not from_inputs else None
        self.mem_inputs = nn.Parameter(torch.randn(1, num_mem_kv, dim)) if has_mem and from_inputs else None
        self.rotary = rotary if not cross_attend else None
        # logits from (query, original positions): relative position attention, self-attention only
        self.rel_pos = rel_pos if not cross_attend else None

        # (router, heads) for every group of heads, in head order
        groups = [(local_router, n_local_heads)] if n_local_heads > 0 else []
        if n_local_heads < heads:
            if isinstance(router, (list, tuple)):
                if sum(n for _, n in router) != heads - n_local_heads:
                    raise ValueError(f'the router groups take {sum(n for _, n in router)} heads, but '
                                     f'{heads - n_local_heads} heads follow the {n_local_heads} local ones')
                groups += [(default(r, FullRouter()), n) for r, n in router]
            else:
                groups.append((default(router, FullRouter()), heads - n_local_heads))
        self.routers = nn.ModuleList([r for r, _ in groups])
        ends = list(accumulate(n for _, n in groups))
        self.head_slices = [(end - n, end) for (_, n), end in zip(groups, ends)]
        self.executor = executor if exists(executor) else RoutedAttention(dropout=dropout, backend=backend)

    @property
    def multiple_of(self) -> int:
        return lcm(*(r.multiple_of for r in self.routers)) if not self.cross_attend else 1

    def project(self, x, kv_input):
        if not exists(self.to_q):  # every head has its own projection
            return tuple(rearrange(self.local_to_qkv(x), 'b n (t h d) -> t b h n d', t=3, d=self.dim_head))
        q = self.to_q(x)
        if exists(self.to_k):
            k = self.to_k(kv_input)
        else:  # shared-QK: keys come from the query projection
            k = q if kv_input is x else self.to_q(kv_input)
        v = self.to_v(kv_input)
        q, k, v = (rearrange(t, 'b n (h d) -> b h n d', d=self.dim_head) for t in (q, k, v))
        if self.shared_qk:
            # shared-QK: keys are the normalised queries (Reformer)
            k = l2norm(k)
        if self.n_own:
            own = rearrange(self.local_to_qkv(x), 'b n (t h d) -> t b h n d', t=3, d=self.dim_head)
            q, k, v = (torch.cat((o, t), dim=1) for o, t in zip(own, (q, k, v)))
        return q, k, v

    def excludes_self(self, start: int) -> bool:
        """Shared-QK heads must not attend to their own key, except where it is the only one; heads
        with their own projection have separate keys."""
        return self.shared_qk and not self.cross_attend and start >= self.n_own

    def mem_slice(self, start, end):
        if exists(self.mem_inputs):
            _, k, v = self.project(self.mem_inputs, self.mem_inputs)
            return k[0, start:end], v[0, start:end]
        return None if self.mem_kv is None else (self.mem_kv[0, start:end], self.mem_kv[1, start:end])

    def forward(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        """x (b, n, dim) -> (out (b, n, dim), aux loss): the whole sequence, or, with a filled
        cache in `ctx`, one decoding step."""
        if self.cross_attend and ctx.context is None:
            raise ValueError('this model has cross-attention layers: pass context=<encoder output> (b, m, dim)')
        entry = ctx.cache.get(ctx.key(self)) if exists(ctx.cache) else None
        if exists(ctx.cache) and entry is None and not self.cross_attend and x.shape[1] == 1:
            # decoding from an empty cache (a prompt shorter than the router's multiple)
            entry = ctx.cache[ctx.key(self)] = self.empty_cache_entry(x)
        if entry is None:
            return self.attend_sequence(x, ctx)
        out = self.decode_context_step(x, ctx, entry) if self.cross_attend else self.decode_step(x, ctx, entry)
        return self.merge_heads(out), x.new_zeros(())

    def merge_heads(self, out: Tensor) -> Tensor:
        """(b, h, n, d) per head -> (b, n, dim)."""
        return self.post_attn_dropout(self.to_out(rearrange(out, 'b h n d -> b n (h d)')))

    def rotate(self, q: Tensor, k: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """Rotary positions on q, k (b, h, n, d) from absolute position `offset`."""
        if not exists(self.rotary):
            return q, k
        freqs = self.rotary(offset + torch.arange(q.shape[-2], device=q.device))
        return apply_rotary(q, freqs), apply_rotary(k, freqs)

    def route(self, inp: RouteInput, ctx: LayerContext) -> list[RoutePlan]:
        """Each head group's plan; a reversible recompute replays the plans of the forward pass."""
        plans = []
        for gi, (router, (start, end)) in enumerate(zip(self.routers, self.head_slices)):
            key = (*ctx.key(self), gi)
            cached = ctx.plans.get(key) if ctx.recompute and exists(ctx.plans) else None
            plan = router.route(inp.heads(start, end, cached=cached))
            if exists(ctx.plans) and not ctx.recompute:
                ctx.plans[key] = plan
            plans.append(plan)
        return plans

    def attend_sequence(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        """The whole sequence: route, attend every head group by its plan, and fill the cache when
        decoding follows."""
        kv_input, key_mask = (ctx.context, ctx.context_mask) if self.cross_attend else (x, ctx.mask)
        q, k, v = self.project(x, kv_input)
        # routers see content, not positions: rotary comes after routing
        inp = RouteInput(q=q, k=k, causal=self.causal, mask=key_mask, q_mask=ctx.mask)
        plans = self.route(inp, ctx)
        q, k = self.rotate(q, k, ctx.offset)
        if exists(ctx.cache):
            ctx.cache[ctx.key(self)] = self.prefill(inp, plans, k, v)

        record = exists(ctx.recordings) and not ctx.recompute
        outs = []
        for plan, (start, end) in zip(plans, self.head_slices):
            out, weights = self.attend_heads(plan, q, k, v, start, end, key_mask=key_mask, need_weights=record)
            outs.append(out)
            if record:
                self.record(ctx, weights, plan, start, end, q_len=q.shape[-2], kv_len=k.shape[-2])
        aux = sum((p.aux_loss for p in plans if exists(p.aux_loss)), x.new_zeros(()))
        return self.merge_heads(cat_heads(outs)), aux

    def prefill(self, inp: RouteInput, plans: list[RoutePlan], k: Tensor, v: Tensor) -> KVCache | ContextCache:
        """The cache after a forward pass over `inp` (rotated keys k, values v)."""
        routers = [router.prefill(inp.heads(start, end), plan)
                   for router, plan, (start, end) in zip(self.routers, plans, self.head_slices)]
        if self.cross_attend:
            return ContextCache(k=k, v=v, routers=routers)
        return KVCache(k=k, v=v, mask=inp.key_mask(), routers=routers)

    def empty_cache_entry(self, x) -> KVCache:
        b, d = x.shape[0], self.dim_head
        empty = x.new_zeros(b, self.heads, 0, d)
        return self.prefill(RouteInput(q=empty, k=empty, causal=self.causal), [None] * len(self.routers), empty, empty)

    def attend_heads(self, plan: RoutePlan, q: Tensor, k: Tensor, v: Tensor, start: int, end: int, *,
                     key_mask: Tensor | None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """The executor on heads start:end of q, k, v (b, h, n|m, d) by `plan`: (out, weights or None)."""
        return self.executor(q[:, start:end], k[:, start:end], v[:, start:end], plan, causal=self.causal,
                             key_mask=key_mask, mem_kv=self.mem_slice(start, end),
                             exclude_self=self.excludes_self(start), need_weights=need_weights,
                             rel_pos=self.rel_pos)

    def record(self, ctx: LayerContext, weights: Tensor, plan: RoutePlan, start: int, end: int, *, q_len: int,
               kv_len: int) -> None:
        """One Recorder entry: the group weights and the plan of heads start:end."""
        ctx.recordings.append(AttentionRecord(layer=ctx.layer, heads=(start, end), cross=self.cross_attend,
                                              plan=plan.to('cpu'), weights=weights.detach_to('cpu'),
                                              q_len=q_len, kv_len=kv_len))

    def decode_step(self, x: Tensor, ctx: LayerContext, entry: KVCache) -> Tensor:
        """One new token x (b, 1, dim) against the cache: the work is the router's window, not the
        prefix. Returns its output per head (b, h, 1, d)."""
        step, q = self.extend_cache(x, ctx, entry)
        return self.decode_heads(step, q, entry)

    def extend_cache(self, x: Tensor, ctx: LayerContext, entry: KVCache) -> tuple[RouteInput, Tensor]:
        """Projects the new token and appends its rotated key and value to the cache: (what the
        routers route it by, its rotated query)."""
        if x.shape[1] != 1:
            raise ValueError(f'cached decoding takes one new token per call, got {x.shape[1]}')
        q, k, v = self.project(x, x)
        mask = ctx.mask[:, -1:] if exists(ctx.mask) else torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        step = RouteInput(q=q, k=k, causal=self.causal, mask=mask, offset=entry.length)
        q, k = self.rotate(q, k, step.offset)
        entry.append(k, v, mask)
        return step, q

    def decode_heads(self, step: RouteInput, q: Tensor, entry: KVCache) -> Tensor:
        """The new token's output (b, h, 1, d) in every group of heads, each by its router's decode plan."""
        outs = []
        for router, cache, (start, end) in zip(self.routers, entry.routers, self.head_slices):
            plan = router.decode_step(step.heads(start, end), cache)
            outs.append(self.attend_heads(plan, q, entry.k, entry.v, start, end, key_mask=entry.mask)[0])
        return cat_heads(outs)

    def decode_context_step(self, x: Tensor, ctx: LayerContext, entry: ContextCache) -> Tensor:
        """Cross-attention of the new token x (b, 1, dim) to the cached context (b, h, 1, d)."""
        q = rearrange(self.to_q(x), 'b n (h d) -> b h n d', h=self.heads)
        step = RouteInput(q=q, k=entry.k, mask=ctx.context_mask, q_mask=ctx.mask, offset=ctx.offset)
        outs = []
        for router, cache, (start, end) in zip(self.routers, entry.routers, self.head_slices):
            plan = router.decode_context_step(step.heads(start, end), cache)
            outs.append(self.attend_heads(plan, q, entry.k, entry.v, start, end, key_mask=ctx.context_mask)[0])
        return cat_heads(outs)
