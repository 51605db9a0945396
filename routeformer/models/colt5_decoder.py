"""CoLT5 for decoders: strictly causal routed attention and a decoder-only LM with cached decoding.

The seed's autoregressive attention decided which queries of a window were heavy by coordinate
descent over the whole window (so a token's output depended on later tokens of its window), and
replicated the whole sequence once per window to route key/values (memory quadratic in length).
Here, with windows of `heavy_window_size` tokens:
- a query is heavy when its routing score reaches the previous window's k-th best and fewer than
  k earlier queries of its window are heavy (`CausalQueryRouter`): it depends on nothing after it;
- the keys of window m are the num_heavy_tokens_kv best-scoring tokens of windows < m, kept by a
  running top-k (`CausalKeyRouter`), gated by coordinate descent over the best candidates of
  that prefix; keys/values are projected once and gathered per window by the executor;
- the first window has no earlier keys and no heavy output; the light causal local attention
  covers each window and the one before it.
Cached decoding keeps the heavy keys/values and each router's own cache, and reproduces the full
forward pass token by token.

Axes: b batch, n sequence, d model dim, h heads, e head dim, r kv routes, g windows,
i heavy queries per window, j keys per window, c candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from ..attention.plan import RoutePlan
from ..context import LayerContext
from ..helpers import default, exists, pad_to_multiple, route_back, valid_mask
from ..layers.attention import Attention
from ..layers.embeddings import RotaryEmbedding, apply_rotary
from ..lm import LM
from ..routers.local import LocalRouter
from ..routers.causal_topk import KeyRouteCache, QueryRouteCache
from ..transformer import Block, Sublayer, Transformer
from .builder import build_pos_emb
from .colt5 import (ConditionalRoutedFeedForward, RoutedBranches, SeedRoutedNames, backend_for, check_positive,
                    light_local_attention)
from .options import call_arguments


@dataclass
class HeavyCache:
    """Cached decoding of the heavy branch: its keys and values (b, h, n, e) of every position
    so far (rotated), and the caches of its query and key routers."""
    k: Tensor
    v: Tensor
    q: QueryRouteCache
    kv: KeyRouteCache


class ConditionalRoutedAutoregressiveAttention(SeedRoutedNames, nn.Module):
    """Causal CoLT5 attention. Light: causal local attention (window light_window_size, sees its
    window and the previous one). Heavy: per window of heavy_window_size tokens (default the light
    window), num_heavy_tokens_q routed queries attend to num_heavy_tokens_kv key/values routed from
    all earlier windows (`num_routed_kv` routes over the heavy heads). Strictly causal; memory and
    time linear in length. Prenorm inside, no residual. `light_rotary_emb` adds rotary positions to
    the light branch (`rotary_emb` is the heavy branch's). `mask` (b, n) marks real tokens."""

    def __init__(self, dim: int, *, num_heavy_tokens_q: int, num_heavy_tokens_kv: int, num_routed_kv: int = 1,
                 light_dim_head: int = 64, light_heads: int = 8, light_window_size: int = 128,
                 heavy_window_size: int | None = None, heavy_dim_head: int = 64, heavy_heads: int = 8,
                 router_straight_through: bool = True, router_kwargs: dict = {}, multiply_keys_by_score: bool = False,
                 multiply_queries_by_score: bool = False, use_triton: bool = False, use_null_q_tokens: bool = True,
                 use_flash_attn: bool = False, rotary_emb: bool = False, light_rotary_emb: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.heavy_window_size = default(heavy_window_size, light_window_size)
        check_positive(light_window_size=light_window_size, heavy_window_size=self.heavy_window_size)
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.light_norm = nn.LayerNorm(dim)
        self.light_attn = Attention(
            dim, heads=light_heads, dim_head=light_dim_head, causal=True, n_local_heads=light_heads,
            local_router=LocalRouter(light_window_size, look_backward=1), backend=backend_for(use_flash_attn, backend),
            rotary=RotaryEmbedding(light_dim_head) if light_rotary_emb else None, out_bias=False)
        self.routed = RoutedBranches.from_arguments(call_arguments(locals()), window_size=self.heavy_window_size,
                                                    backend=backend_for(use_flash_attn, backend))


    @property
    def multiple_of(self) -> int:
        return self.light_attn.multiple_of

    def forward(self, x: Tensor, *, num_heavy_tokens_q: int | None = None, num_heavy_tokens_kv: int | None = None,
                random_route: bool = False, mask: Tensor | None = None) -> Tensor:
        return self.forward_ctx(x, LayerContext(mask=mask), num_heavy_tokens_q=num_heavy_tokens_q,
                                num_heavy_tokens_kv=num_heavy_tokens_kv, random_route=random_route)

    def forward_ctx(self, x: Tensor, ctx: LayerContext, *, num_heavy_tokens_q: int | None = None,
                    num_heavy_tokens_kv: int | None = None, random_route: bool = False) -> Tensor:
        """The skeleton's entry point: ctx carries the padding mask and the decoding cache."""
        num_q = default(num_heavy_tokens_q, self.num_heavy_tokens_q)
        num_kv = default(num_heavy_tokens_kv, self.num_heavy_tokens_kv)
        normed = self.light_norm(x)
        if exists(ctx.cache):
            # decoding: the light attention keeps its own cache and takes the lengths the wrapper gives it
            light, _ = self.light_attn(normed, ctx)
        else:
            light = light_local_attention(self.light_attn, normed, ctx.mask, ctx)

        state = ctx.cache.get(ctx.key(self)) if exists(ctx.cache) else None
        if exists(ctx.cache) and state is None and x.shape[1] == 1:
            state = ctx.cache[ctx.key(self)] = self.empty_state(x)
        if exists(state):
            if x.shape[1] != 1:
                raise ValueError(f'cached decoding takes one new token per call, got {x.shape[1]}')
            return light + self.decode_heavy(x, valid_mask(x, ctx.mask)[:, -1], state, num_q, num_kv)

        heavy = self.heavy(x, valid_mask(x, ctx.mask), num_q, num_kv, random_route=random_route,
                           offset=ctx.offset, cache=ctx.cache, cache_key=ctx.key(self))
        return light + heavy

    # ------------------------------------------------------------------ the full pass

    def heavy(self, x: Tensor, valid: Tensor, num_q: int, num_kv: int, *, random_route: bool = False,
              offset: int = 0, cache: dict | None = None, cache_key=None) -> Tensor:
        routed, w = self.routed, self.heavy_window_size
        n = x.shape[1]
        x, _ = pad_to_multiple(x, w, dim=1)
        valid, _ = pad_to_multiple(valid, w, dim=-1, value=False)
        q_index, q_gates = routed.q_router.route(x, valid, num_q, random_route=random_route)
        # the first window has no earlier keys: no heavy queries
        q_index[:, 0] = -1
        q_gates = q_gates * (q_index >= 0)
        kv_index, kv_gates = routed.kv_router.route(x, valid, num_kv, random_route=random_route)

        out = routed.heavy_attn.forward_windows(
            x, q_index, kv_index, kv_gates, rotary=routed.rotary_emb, offset=offset,
            q_scale=q_gates if routed.multiply_queries_by_score else None)
        out = out * rearrange(q_gates, 'b g i -> b (g i) 1').to(out.dtype)
        heavy = route_back(self.unrouted_output(x), out, rearrange(q_index, 'b g i -> b (g i)'))[:, :n]

        if exists(cache):
            cache[cache_key] = self.prefill(x[:, :n], valid[:, :n], num_q, num_kv, offset)
        return heavy

    def unrouted_output(self, x: Tensor) -> Tensor:
        """What a position gets from the heavy branch when it is not routed: the learned null output,
        except in the first window (nothing to attend to: zeros, as in the seed)."""
        b, n, d = x.shape
        null = self.routed.null_q_token
        if null is None:
            return x.new_zeros(b, n, d)
        first = torch.arange(n, device=x.device) < self.heavy_window_size
        return null.to(x.dtype).expand(b, n, d).masked_fill(first[:, None], 0.)

    # ------------------------------------------------------------------ cached decoding

    def empty_state(self, x: Tensor) -> HeavyCache:
        b, e, heads = x.shape[0], self.heavy_attn.dim_head, self.heavy_attn.heads
        no_keys = x.new_zeros(b, heads, 0, e)
        return HeavyCache(k=no_keys, v=no_keys, q=self.q_router.empty_cache(x), kv=self.kv_router.empty_cache(x))

    def prefill(self, x, valid, num_q, num_kv, offset) -> HeavyCache:
        """The decoding state after a prefill of x (b, n, d), equal to decoding it token by token."""
        k, v = self.heavy_attn.project_kv(x)
        if exists(self.routed.rotary_emb):
            k = apply_rotary(k, self.routed.rotary_emb(torch.arange(offset, offset + x.shape[1], device=x.device)))
        return HeavyCache(k=k, v=v, q=self.q_router.prefill(x, valid, num_q),
                          kv=self.kv_router.prefill(x, valid, num_kv))

    def decode_heavy(self, x: Tensor, valid: Tensor, state: HeavyCache, num_q: int, num_kv: int) -> Tensor:
        routed, attn = self.routed, self.heavy_attn
        pos = state.k.shape[2]
        is_routed, gate = routed.q_router.decode_step(x, valid, state.q, num_q)
        kv_index, kv_gates = routed.kv_router.decode_step(x, valid, state.kv, num_kv)

        k, v = attn.project_kv(x)
        q = attn.project_q(x)
        if exists(routed.rotary_emb):
            freqs = routed.rotary_emb(torch.tensor([pos], device=x.device))
            q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        state.k = torch.cat((state.k, k), dim=2)
        state.v = torch.cat((state.v, v), dim=2)
        if pos < self.heavy_window_size:
            return torch.zeros_like(x)

        if routed.multiply_queries_by_score:
            q = q * rearrange(gate, 'b -> b 1 1 1').to(q.dtype)
        r = kv_index.shape[1]
        plan = RoutePlan(q_index=None, kv_index=attn.per_head(kv_index, r), kv_gate=attn.per_head(kv_gates, r))
        out = attn.attend(q, state.k, state.v, plan) * rearrange(gate, 'b -> b 1 1').to(x.dtype)
        null = routed.null_q_token
        unrouted = null.to(out.dtype).expand_as(out) if exists(null) else torch.zeros_like(out)
        return torch.where(rearrange(is_routed, 'b -> b 1 1'), out, unrouted)


class SkeletonAdapter(nn.Module):
    """Runs a CoLT5 module inside the shared Transformer skeleton: (x, ctx) -> (out, no aux loss)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        return self.module.forward_ctx(x, ctx), x.new_zeros(())


class ConditionalRoutedTransformerLM(LM):
    """A decoder-only CoLT5 language model: token embedding, `depth` blocks of
    ConditionalRoutedAutoregressiveAttention and a causal ConditionalRoutedFeedForward (each with a
    residual), final norm and logits. `num_heavy_attn_tokens_q` and `num_heavy_ff_tokens` count per
    window of `heavy_window_size` tokens. `shift_tokens` feeds every sublayer half of the previous
    position's features (RWKV token shift). Strictly causal; wrap it in AutoregressiveWrapper for the
    loss and `generate` (cached decoding). Returns `(logits, aux_loss)`."""

    def __init__(self, *, num_tokens: int, dim: int, depth: int, max_seq_len: int, num_heavy_attn_tokens_q: int,
                 num_heavy_attn_tokens_kv: int, num_heavy_ff_tokens: int, num_routed_kv: int = 1,
                 light_dim_head: int = 64, light_heads: int = 8, light_window_size: int = 128,
                 heavy_window_size: int | None = None, heavy_dim_head: int = 64, heavy_heads: int = 8,
                 light_ff_mult: float = 0.5, heavy_ff_mult: float = 4, router_straight_through: bool = True,
                 router_kwargs: dict = {}, multiply_keys_by_score: bool = False,
                 multiply_queries_by_score: bool = False, use_triton: bool = False, use_null_q_tokens: bool = True,
                 use_flash_attn: bool = False, pos_emb: str | None = 'rotary', emb_dim: int | None = None,
                 emb_dropout: float = 0., tie_embedding: bool = False, return_embeddings: bool = False,
                 layer_dropout: float = 0., shift_tokens: bool = False, backend: str | None = None):
        heavy_window_size = default(heavy_window_size, light_window_size)
        # token shift (as in the other families): half the features come from the previous position
        shifts = (0, 1) if shift_tokens else None
        rotary = pos_emb == 'rotary'

        def block():
            attn = ConditionalRoutedAutoregressiveAttention(
                dim, num_heavy_tokens_q=num_heavy_attn_tokens_q, num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
                num_routed_kv=num_routed_kv, light_dim_head=light_dim_head, light_heads=light_heads,
                light_window_size=light_window_size, heavy_window_size=heavy_window_size,
                heavy_dim_head=heavy_dim_head, heavy_heads=heavy_heads,
                router_straight_through=router_straight_through, router_kwargs=router_kwargs,
                multiply_keys_by_score=multiply_keys_by_score, multiply_queries_by_score=multiply_queries_by_score,
                use_triton=use_triton, use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
                rotary_emb=rotary, light_rotary_emb=rotary, backend=backend)
            ff = ConditionalRoutedFeedForward(
                dim, num_heavy_tokens=num_heavy_ff_tokens, light_ff_mult=light_ff_mult, heavy_ff_mult=heavy_ff_mult,
                router_straight_through=router_straight_through, router_kwargs=router_kwargs, use_triton=use_triton,
                causal=True, window_size=heavy_window_size)
            # both modules normalise their own inputs
            return Block([Sublayer(SkeletonAdapter(attn), dim=dim, norm='none', shifts=shifts)],
                         Sublayer(SkeletonAdapter(ff), dim=dim, norm='none', shifts=shifts))

        transformer = Transformer([block() for _ in range(depth)], layer_dropout=layer_dropout)
        super().__init__(num_tokens=num_tokens, dim=dim, max_seq_len=max_seq_len, transformer=transformer,
                         emb_dim=emb_dim, emb_dropout=emb_dropout, tie_embedding=tie_embedding,
                         return_embeddings=return_embeddings, causal=True,
                         pos_emb=build_pos_emb(pos_emb, dim=dim, max_seq_len=max_seq_len))
