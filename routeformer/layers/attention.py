"""Multi-head attention whose heads are split between routers.

Axes: b batch, n sequence (queries), m key/value sequence, h heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from .embeddings import RotaryEmbedding, apply_rotary


@dataclass
class KVCache:
    """One self-attention layer's decoding cache: the keys and values (b, h, n, d) of every
    position so far (rotated), their key mask (b, n), the pre-rotary keys when a router reads them
    (`k_route`), and each head group's router state by group index (what `Router.decode` keeps
    between steps; it starts with the prefill's plan)."""
    k: Tensor
    v: Tensor
    mask: Tensor
    k_route: Tensor | None = None
    routers: dict[int, dict] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.k.shape[-2]


@dataclass
class ContextCache:
    """A cross-attention layer's decoding cache: the context's keys and values (b, h, m, d),
    which never change, and each head group's router state."""
    k: Tensor
    v: Tensor
    routers: dict[int, dict] = field(default_factory=dict)


class Attention(nn.Module):
    """Projections, shared-QK, learned memory key/values and rotary positions around a router.

    The first `n_local_heads` heads use `local_router`, the rest `router` (full attention when
    None). With `cross_attend=True` keys and values come from `ctx.context`, masked by
    `ctx.context_mask`. `forward(x, ctx)` returns `(out, aux_loss)`.

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
                 router: Router | None = None, local_router: Router | None = None, n_local_heads: int = 0,
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

        # (router, first head, last head + 1) for every group of heads
        routers, self.head_slices = [], []
        if n_local_heads > 0:
            routers.append(local_router)
            self.head_slices.append((0, n_local_heads))
        if n_local_heads < heads:
            routers.append(default(router, FullRouter()))
            self.head_slices.append((n_local_heads, heads))
        self.routers = nn.ModuleList(routers)
        self.executor = executor if exists(executor) else RoutedAttention(dropout=dropout, backend=backend)

    @property
    def needs_routing_keys(self) -> bool:
        return any(r.needs_routing_keys for r in self.routers)

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
        kv_input = ctx.context if self.cross_attend else x
        if self.cross_attend and kv_input is None:
            raise ValueError('this model has cross-attention layers: pass context=<encoder output> (b, m, dim)')
        key_mask = ctx.context_mask if self.cross_attend else ctx.mask
        cache_key = ctx.key(self)
        entry = ctx.cache.get(cache_key) if exists(ctx.cache) else None
        if exists(ctx.cache) and entry is None and not self.cross_attend and x.shape[1] == 1:
            # decoding from an empty cache (a prompt shorter than the router's multiple)
            entry = ctx.cache[cache_key] = self.empty_cache_entry(x)

        if exists(entry) and not self.cross_attend:
            out = self.decode(x, ctx, entry)
            return self.post_attn_dropout(self.to_out(rearrange(out, 'b h n d -> b n (h d)'))), x.new_zeros(())

        if exists(entry):  # cross-attention while decoding: the context's keys/values never change
            q = rearrange(self.to_q(x), 'b n (h d) -> b h n d', h=self.heads)
            k, v = entry.k, entry.v
        else:
            q, k, v = self.project(x, kv_input)

        aux = x.new_zeros(())
        plans = []
        for gi, (router, (start, end)) in enumerate(zip(self.routers, self.head_slices)):
            # cross-attention while decoding routes the new query like the full forward pass does
            key = (*cache_key, gi)
            cached = ctx.plans.get(key) if (ctx.recompute and exists(ctx.plans)) else None
            if exists(entry):
                plan = router.decode_context(ctx.offset, q=q[:, start:end], k=k[:, start:end], mask=key_mask,
                                             state=entry.routers.setdefault(gi, {}), q_mask=ctx.mask)
            else:
                extra = dict(q_mask=ctx.mask) if self.cross_attend and router.needs_query_mask else {}
                plan = router(q[:, start:end], k[:, start:end], causal=self.causal, mask=key_mask, cached=cached,
                              **extra)
            if exists(ctx.plans) and not ctx.recompute:
                ctx.plans[key] = plan
            if exists(plan.aux_loss):
                aux = aux + plan.aux_loss
            plans.append(plan)

        k_route = k  # routers see content, not positions: rotary comes after routing
        if exists(self.rotary):
            freqs = self.rotary(ctx.offset + torch.arange(x.shape[1], device=x.device))
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)

        if exists(ctx.cache) and not exists(entry):
            # routers that keep bucket/cluster ids continue decoding from the prefill's plan
            states = {gi: dict(prefill=plan) for gi, plan in enumerate(plans)}
            if self.cross_attend:
                ctx.cache[cache_key] = ContextCache(k=k, v=v, routers=states)
            else:
                mask = default(key_mask, torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool, device=x.device))
                ctx.cache[cache_key] = KVCache(k=k, v=v, mask=mask, routers=states,
                                               k_route=k_route if self.needs_routing_keys else None)

        record = exists(ctx.recordings) and not ctx.recompute
        outs = []
        for plan, (start, end) in zip(plans, self.head_slices):
            out, weights = self.attend_heads(plan, q, k, v, start, end, key_mask=key_mask, need_weights=record)
            outs.append(out)
            if record:
                self.record(ctx, weights, plan, start, end, q_len=q.shape[-2], kv_len=k.shape[-2])

        out = rearrange(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1), 'b h n d -> b n (h d)')
        return self.post_attn_dropout(self.to_out(out)), aux

    def empty_cache_entry(self, x) -> KVCache:
        b, d = x.shape[0], self.dim_head
        empty = x.new_zeros(b, self.heads, 0, d)
        return KVCache(k=empty, v=empty, mask=torch.ones(b, 0, dtype=torch.bool, device=x.device),
                       k_route=empty if self.needs_routing_keys else None)

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

    def decode(self, x: Tensor, ctx: LayerContext, entry: KVCache) -> Tensor:
        """One new token against the cache: the work is the router's window, not the prefix."""
        return self.decode_heads(*self.extend_cache(x, ctx, entry), entry=entry)

    def extend_cache(self, x: Tensor, ctx: LayerContext,
                     entry: KVCache) -> tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Projects the new token and appends it to the cache: (pos, pre-rotary q, q, k, v, key mask)
        with k, v and the key mask of every position so far."""
        if x.shape[1] != 1:
            raise ValueError(f'cached decoding takes one new token per call, got {x.shape[1]}')
        pos = entry.length
        q, k, v = self.project(x, x)
        q_route = q
        if self.needs_routing_keys:
            entry.k_route = torch.cat((entry.k_route, k), dim=-2)
        if exists(self.rotary):
            freqs = self.rotary(torch.tensor([pos], device=x.device))
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        entry.k = k = torch.cat((entry.k, k), dim=-2)
        entry.v = v = torch.cat((entry.v, v), dim=-2)
        new_mask = ctx.mask[:, -1:] if exists(ctx.mask) else torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        entry.mask = key_mask = torch.cat((entry.mask, new_mask), dim=-1)
        return pos, q_route, q, k, v, key_mask

    def decode_heads(self, pos, q_route, q, k, v, key_mask, *, entry: KVCache) -> Tensor:
        """The new token's output (b, h, 1, d) in every group of heads, each by its router's decode plan."""
        outs = []
        for gi, (router, (start, end)) in enumerate(zip(self.routers, self.head_slices)):
            k_route = entry.k_route[:, start:end] if router.needs_routing_keys else None
            extra = dict(mask=key_mask) if router.needs_decode_mask else {}
            plan = router.decode(pos, q=q_route[:, start:end], k=k_route, state=entry.routers.setdefault(gi, {}),
                                 **extra)
            outs.append(self.attend_heads(plan, q, k, v, start, end, key_mask=key_mask)[0])
        return torch.cat(outs, dim=1)

