"""CoLT5 conditional computation (Ainslie et al. 2023), with the colt5-attention API: every token
goes through a light branch (local attention, a narrow feed-forward), and a router sends a few
tokens through a heavy branch (full attention among routed tokens, a wide feed-forward) whose
output is scaled by the routing gates and added back at the routed positions.

Attention runs on the shared executor: light branches are the shared Attention layer with a local
(or full, per image window) router; the heavy branch builds a RoutePlan over the routed tokens
(gates on values/keys, the padded-key mask, one learned null key/value per head as memory).
The parameters are the seed's, one for one (`routeformer.compat.from_seed_state_dict` loads a
seed checkpoint); the light attention's window is blockwise (the seed's: exact, |i - j| <= w/2).

Axes: b batch, n sequence, d model dim, h heads, e head dim, r kv routes, g windows,
i routed queries (per window), j routed keys (per window), c candidates.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..attention.executor import RoutedAttention
from ..attention.plan import RoutePlan
from ..context import LayerContext
from ..helpers import any_true, batched_gather, default, exists, pad_to_multiple, route_back, valid_mask
from ..layers.attention import Attention
from ..layers.embeddings import RotaryEmbedding, apply_rotary
from ..layers.feedforward import FeedForward
from ..layers.norms import RMSNorm
from ..routers.local import LocalRouter
from ..routers.causal_topk import CausalKeyRouter, CausalQueryRouter
from ..routers.topk import CoordinateDescentRouter
from .options import call_arguments


def backend_for(use_flash_attn: bool, backend: str | None = None) -> str:
    """The attention backend of a CoLT5 layer: `backend` when given (its meaning in
    attention/backends.py, as for every model); otherwise the seed's `use_flash_attn`: torch's
    fused SDPA, or the einsum path."""
    if backend is not None:
        return backend
    return 'sdpa' if use_flash_attn else 'reference'


def with_triton(router_kwargs: dict, use_triton: bool) -> dict:
    return {**router_kwargs, 'use_triton': True} if use_triton else dict(router_kwargs)


def check_positive(**values):
    for name, value in values.items():
        if value is None or value < 1:
            raise ValueError(f'{name} must be a positive number of tokens, got {value}')


def check_routes(heads: int, routes: int):
    if heads % routes != 0:
        raise ValueError(f'heavy_heads ({heads}) must be divisible by the number of key/value routes ({routes}): '
                         f'each route gets heads / routes heads')


class PreNormFeedForward(nn.Module):
    """RMSNorm then the shared feed-forward (GELU): one branch of the routed feed-forward."""

    def __init__(self, dim: int, mult: float):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.ff = FeedForward(dim, mult=mult)

    def forward(self, x):
        return self.ff.ff(self.norm(x))


class HeavyAttention(nn.Module):
    """Full attention among routed tokens. RMSNorm, then queries from the routed queries and
    keys/values from the routed key/values of each route (heads split evenly among the routes);
    values (and keys, with `multiply_keys_by_score`) scaled by the kv gates, the only path by
    which the kv router learns; one learned null key/value per head, so a query always has
    something to attend to. Output (b, i, d) before any query gate."""

    def __init__(self, dim: int, *, dim_head: int = 64, heads: int = 8, multiply_keys_by_score: bool = False,
                 backend: str = 'reference'):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.multiply_keys_by_score = multiply_keys_by_score
        inner = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, 1, dim_head))
        self.executor = RoutedAttention(backend=backend)

    def project_q(self, x: Tensor) -> Tensor:
        return rearrange(self.to_q(self.norm(x)), 'b n (h e) -> b h n e', h=self.heads)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every head's keys/values of x (b, n, d) -> two (b, h, n, e)."""
        kv = rearrange(self.to_kv(self.norm(x)), 'b n (t h e) -> t b h n e', t=2, h=self.heads)
        return kv[0], kv[1]

    def project_kv_routes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (b, r, j, d): route r's tokens through only route r's heads -> two (b, h, j, e)."""
        r = x.shape[1]
        weight = rearrange(self.to_kv.weight, '(t r h e) d -> t r h e d', t=2, r=r, e=self.dim_head)
        kv = torch.einsum('b r j d, t r h e d -> t b r h j e', self.norm(x), weight)
        kv = rearrange(kv, 't b r h j e -> t b (r h) j e')
        return kv[0], kv[1]

    def per_head(self, t: Tensor, routes: int) -> Tensor:
        """(b, r, ...) route values -> (b, h, ...), each route's value for each of its heads."""
        return repeat(t, 'b r ... -> b (r h) ...', h=self.heads // routes)

    def attend(self, q, k, v, plan: RoutePlan) -> Tensor:
        if self.multiply_keys_by_score and exists(plan.kv_gate):
            plan.k_gate = plan.kv_gate
        out, _ = self.executor(q, k, v, plan, mem_kv=(self.null_kv[0], self.null_kv[1]))
        return self.to_out(rearrange(out, 'b h n e -> b n (h e)'))

    def forward(self, q_tokens: Tensor, kv_tokens: Tensor, *, kv_gates: Tensor | None = None,
                kv_mask: Tensor | None = None, q_scale: Tensor | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """q_tokens (b, i, d); kv_tokens (b, r, j, d) (or (b, j, d): one route); kv_gates and kv_mask
        (b, r, j); q_scale (b, i) multiplies the queries (multiply_queries_by_score); rotary: the
        angles of the queries (b, i, e) and keys (b, r, j, e)."""
        if kv_tokens.ndim == 3:
            kv_tokens = rearrange(kv_tokens, 'b j d -> b 1 j d')
            kv_gates = rearrange(kv_gates, 'b j -> b 1 j') if exists(kv_gates) else None
            kv_mask = rearrange(kv_mask, 'b j -> b 1 j') if exists(kv_mask) else None
        r = kv_tokens.shape[1]
        q = self.project_q(q_tokens)
        if exists(q_scale):
            q = q * rearrange(q_scale, 'b i -> b 1 i 1').to(q.dtype)
        k, v = self.project_kv_routes(kv_tokens)
        if exists(rotary):
            q_freqs, k_freqs = rotary
            q = apply_rotary(q, rearrange(q_freqs, 'b i e -> b 1 i e'))
            k = apply_rotary(k, self.per_head(k_freqs, r))
        gates = rearrange(self.per_head(kv_gates, r), 'b h j -> b h 1 j') if exists(kv_gates) else None
        mask = rearrange(self.per_head(kv_mask, r), 'b h j -> b h 1 1 j') if exists(kv_mask) else None
        plan = RoutePlan(q_index=None, kv_index=None, kv_gate=gates, mask=mask)
        return self.attend(q, k, v, plan)


    def forward_windows(self, x: Tensor, q_index: Tensor, kv_index: Tensor, kv_gates: Tensor, *,
                        q_scale: Tensor | None = None, rotary: RotaryEmbedding | None = None,
                        offset: int = 0) -> Tensor:
        """Windowed heavy attention (decoders): x (b, n, d); the queries of window g are the positions
        q_index[:, g] (b, g, i) (-1 = empty slot), its keys the positions kv_index[:, :, g] of each
        route (b, r, g, j) with gates kv_gates. Returns the output of every query slot (b, g * i, d).

        Keys/values are projected once for every position, and each window's are gathered as whole
        rows (index_select, whose backward is a row-wise index_add) with the null key/value as one
        more position, so no per-window copy is made twice; windows go to the executor as batch."""
        b, g, i = q_index.shape
        r, n = kv_index.shape[1], x.shape[1]
        q = self.project_q(batched_gather(x, rearrange(q_index, 'b g i -> b (g i)')))
        if exists(q_scale):
            q = q * rearrange(q_scale, 'b g i -> b 1 (g i) 1').to(q.dtype)
        k, v = self.project_kv(x)
        if exists(rotary):
            q_pos = rearrange(q_index.clamp(min=0), 'b g i -> (b g i)') + offset
            q = apply_rotary(q, rearrange(rotary(q_pos), '(b n) e -> b 1 n e', b=b))
            k = apply_rotary(k, rotary(torch.arange(offset, offset + n, device=x.device)))
        # the null key/value is position n of every head
        null_k, null_v = (t.to(k.dtype).expand(b, -1, -1, -1) for t in self.null_kv)
        k, v = torch.cat((k, null_k), dim=2), torch.cat((v, null_v), dim=2)

        index = rearrange(self.per_head(kv_index, r), 'b h g j -> b g h j')
        index = torch.cat((torch.full_like(index[..., :1], n), index), dim=-1)
        gates = rearrange(self.per_head(kv_gates, r), 'b h g j -> b g h j')
        gates = torch.cat((torch.ones_like(gates[..., :1]), gates), dim=-1)
        empty = index < 0
        # rows of k.view(b * h * (n + 1), e), in (b, g, h, j) order
        rows = index.clamp(min=0) + rearrange(torch.arange(b * self.heads, device=x.device) * (n + 1),
                                              '(b h) -> b 1 h 1', b=b)
        kg, vg = (t.reshape(-1, t.shape[-1]).index_select(0, rows.flatten()).view(b * g, self.heads, -1, t.shape[-1])
                  for t in (k, v))
        q = rearrange(q, 'b h (g i) e -> (b g) h i e', g=g)
        plan = RoutePlan(q_index=None, kv_index=None, kv_gate=rearrange(gates, 'b g h j -> (b g) h 1 j'),
                         mask=rearrange(~empty, 'b g h j -> (b g) h 1 1 j') if any_true(empty) else None)
        if self.multiply_keys_by_score:
            plan.k_gate = plan.kv_gate
        out, _ = self.executor(q, kg, vg, plan)
        return self.to_out(rearrange(out, '(b g) h i e -> b (g i) (h e)', b=b))


def scatter_heavy(x: Tensor, out: Tensor, indices: Tensor | None, null: Tensor | None) -> Tensor:
    """Heavy outputs (b, i, d) back to (b, n, d) at `indices` (b, i) (-1 dropped); the other positions
    get the learned null output (or 0). indices None: every position was routed, in order."""
    if indices is None:
        return out
    base = null.to(out.dtype).expand_as(x) if exists(null) else x.new_zeros(x.shape).to(out.dtype)
    return route_back(base, out, indices)


class ConditionalRoutedFeedForward(nn.Module):
    """light_ff(x) for every token + heavy_ff(routed tokens) * gates at the routed positions.
    Both branches are RMSNorm -> Linear -> GELU -> Linear; no residual inside.

    `causal=True` (for decoders) routes strictly causally: `num_heavy_tokens` per window of
    `window_size` tokens, by the rule of `CausalQueryRouter` (the first window routes its first
    tokens)."""

    def __init__(self, dim: int, *, num_heavy_tokens: int, light_ff_mult: float = 0.5, heavy_ff_mult: float = 4,
                 router_straight_through: bool = True, router_kwargs: dict = {}, use_triton: bool = False,
                 causal: bool = False, window_size: int = 128):
        super().__init__()
        check_positive(num_heavy_tokens=num_heavy_tokens, window_size=window_size)
        self.num_heavy_tokens, self.causal, self.window_size = num_heavy_tokens, causal, window_size
        router_kwargs = dict(straight_through=router_straight_through, **with_triton(router_kwargs, use_triton))
        self.router = (CausalQueryRouter(dim, window_size=window_size, **router_kwargs) if causal
                       else CoordinateDescentRouter(dim, **router_kwargs))
        self.light_ff = PreNormFeedForward(dim, light_ff_mult)
        self.heavy_ff = PreNormFeedForward(dim, heavy_ff_mult)

    def forward(self, x: Tensor, mask: Tensor | None = None, num_heavy_tokens: int | None = None) -> Tensor:
        num_heavy_tokens = default(num_heavy_tokens, self.num_heavy_tokens)
        light = self.light_ff(x)
        if self.causal:
            indices, gates = self.router.route(x, valid_mask(x, mask), num_heavy_tokens)
            indices, gates = rearrange(indices, 'b g i -> b (g i)'), rearrange(gates, 'b g i -> b (g i)')
            routed = batched_gather(x, indices)
        else:
            indices, gates, routed, _ = self.router(x, num_tokens=num_heavy_tokens, mask=mask)
        heavy = self.heavy_ff(routed) * rearrange(gates, '... -> ... 1').to(x.dtype)
        # unrouted tokens get no heavy output
        return light + scatter_heavy(x, heavy, indices, None).to(light.dtype)

    def forward_ctx(self, x: Tensor, ctx: LayerContext) -> Tensor:
        """The skeleton's entry point (decoders): ctx carries the padding mask and the decoding cache."""
        if not self.causal:
            raise ValueError('inside a decoder the routed feed-forward must be built with causal=True')
        valid = valid_mask(x, ctx.mask)
        key = ctx.key(self)
        cache = ctx.cache.get(key) if exists(ctx.cache) else None
        if exists(ctx.cache) and cache is None and x.shape[1] == 1:
            cache = ctx.cache[key] = self.router.empty_cache(x)
        if cache is None:
            out = self(x, mask=ctx.mask)
            if exists(ctx.cache):
                ctx.cache[key] = self.router.prefill(x, valid, self.num_heavy_tokens)
            return out
        # decoding one token
        routed, gate = self.router.decode_step(x, valid[:, -1], cache, self.num_heavy_tokens)
        gate = gate * routed
        return self.light_ff(x) + self.heavy_ff(x) * rearrange(gate, 'b -> b 1 1').to(x.dtype)


class SeedRoutedNames:
    """The seed's attribute names on a layer whose routed branches live in `self.routed`."""

    q_router = property(lambda self: self.routed.q_router)
    kv_router = property(lambda self: self.routed.kv_router)
    heavy_attn = property(lambda self: self.routed.heavy_attn)
    null_q_token = property(lambda self: self.routed.null_q_token)


class RoutedBranches(nn.Module):
    """What the routed self-attention variants share: the two routers, the heavy attention, the
    learned output of unrouted queries and optional rotary positions for the heavy branch."""

    def __init__(self, dim: int, *, num_heavy_tokens_q: int, num_heavy_tokens_kv: int, num_routed_kv: int,
                 heavy_dim_head: int, heavy_heads: int, router_straight_through: bool, router_kwargs: dict,
                 multiply_keys_by_score: bool, multiply_queries_by_score: bool, use_triton: bool,
                 use_null_q_tokens: bool, backend: str, rotary_emb: bool = False, window_size: int | None = None):
        """`window_size`: route strictly causally in windows of that many tokens (decoders)."""
        super().__init__()
        check_positive(num_heavy_tokens_q=num_heavy_tokens_q, num_heavy_tokens_kv=num_heavy_tokens_kv,
                       num_routed_kv=num_routed_kv)
        check_routes(heavy_heads, num_routed_kv)
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.multiply_queries_by_score = multiply_queries_by_score
        router_kwargs = with_triton(router_kwargs, use_triton)
        # unrouted queries get a learned output instead of zeros (it matters for generation)
        self.null_q_token = nn.Parameter(torch.randn(dim)) if use_null_q_tokens else None
        router_kwargs = dict(straight_through=router_straight_through, **router_kwargs)
        if window_size is None:
            self.q_router = CoordinateDescentRouter(dim, **router_kwargs)
            self.kv_router = CoordinateDescentRouter(dim, num_routing_tokens=num_routed_kv, **router_kwargs)
        else:
            self.q_router = CausalQueryRouter(dim, window_size=window_size, **router_kwargs)
            self.kv_router = CausalKeyRouter(dim, window_size=window_size, num_routing_tokens=num_routed_kv,
                                             **router_kwargs)
        self.heavy_attn = HeavyAttention(dim, dim_head=heavy_dim_head, heads=heavy_heads,
                                         multiply_keys_by_score=multiply_keys_by_score, backend=backend)
        self.rotary_emb = RotaryEmbedding(heavy_dim_head) if rotary_emb else None

    @classmethod
    def from_arguments(cls, arguments: dict, **overrides) -> RoutedBranches:
        """From a routed attention layer's own arguments (`call_arguments(locals())`): the ones
        this takes, then `overrides`."""
        names = inspect.signature(cls.__init__).parameters
        return cls(**{**{k: v for k, v in arguments.items() if k in names}, **overrides})

    def routed_heavy(self, x: Tensor, *, mask: Tensor | None, num_q: int, num_kv: int,
                     random_route: bool = False) -> Tensor:
        """Heavy branch over the whole sequence x (b, n, d): (b, n, d)."""
        b, n = x.shape[:2]
        idx_q, gates_q, routed_q, _ = self.q_router(x, num_tokens=num_q, mask=mask, random_route=random_route)
        idx_kv, gates_kv, routed_kv, kv_mask = self.kv_router(x, num_tokens=num_kv, mask=mask,
                                                              random_route=random_route, keep_one_route_dim=True)
        rotary = None
        if exists(self.rotary_emb):
            positions = torch.arange(n, device=x.device).expand(b, n)
            q_pos = positions if idx_q is None else idx_q.clamp(min=0)
            kv_pos = positions[:, None].expand(b, routed_kv.shape[1], n) if idx_kv is None else idx_kv.clamp(min=0)
            rotary = (self.rotary_emb(q_pos.flatten()).view(*q_pos.shape, -1),
                      self.rotary_emb(kv_pos.flatten()).view(*kv_pos.shape, -1))
        out = self.heavy_attn(routed_q, routed_kv, kv_gates=gates_kv, kv_mask=kv_mask, rotary=rotary,
                              q_scale=gates_q if self.multiply_queries_by_score else None)
        out = out * rearrange(gates_q, 'b i -> b i 1').to(out.dtype)
        return scatter_heavy(x, out, idx_q, self.null_q_token)


class ConditionalRoutedAttention(SeedRoutedNames, nn.Module):
    """Light local attention over every token (each sees about light_window_size / 2 tokens either
    side) + heavy full attention among num_heavy_tokens_q routed queries and num_heavy_tokens_kv
    routed key/values (split into `num_routed_kv` routes over the heavy heads). Non-causal.
    Prenorm inside, no residual. Any sequence length."""

    def __init__(self, dim: int, *, num_heavy_tokens_q: int, num_heavy_tokens_kv: int, num_routed_kv: int = 1,
                 has_light_attn: bool = True, light_dim_head: int = 64, light_heads: int = 8,
                 light_window_size: int = 128, heavy_dim_head: int = 64, heavy_heads: int = 8,
                 router_straight_through: bool = True, router_kwargs: dict = {}, multiply_keys_by_score: bool = False,
                 multiply_queries_by_score: bool = False, use_triton: bool = False, use_null_q_tokens: bool = True,
                 use_flash_attn: bool = False, rotary_emb: bool = False, backend: str | None = None):
        super().__init__()
        if has_light_attn and light_window_size < 2:
            raise ValueError(f'light_window_size must be at least 2 (tokens see half of it either side), '
                             f'got {light_window_size}')
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.light_norm = nn.LayerNorm(dim) if has_light_attn else None
        self.light_attn = Attention(
            dim, heads=light_heads, dim_head=light_dim_head, n_local_heads=light_heads,
            local_router=LocalRouter(light_window_size // 2, look_backward=1, look_forward=1),
            backend=backend_for(use_flash_attn, backend), out_bias=False) if has_light_attn else None
        self.routed = RoutedBranches.from_arguments(call_arguments(locals()),
                                                    backend=backend_for(use_flash_attn, backend))


    def forward(self, x: Tensor, *, num_heavy_tokens_q: int | None = None, num_heavy_tokens_kv: int | None = None,
                mask: Tensor | None = None) -> Tensor:
        heavy = self.routed.routed_heavy(x, mask=mask, num_q=default(num_heavy_tokens_q, self.num_heavy_tokens_q),
                                         num_kv=default(num_heavy_tokens_kv, self.num_heavy_tokens_kv))
        if self.light_attn is None:
            return heavy
        return light_local_attention(self.light_attn, self.light_norm(x), mask) + heavy


def light_local_attention(attn: Attention, x: Tensor, mask: Tensor | None, ctx: LayerContext | None = None) -> Tensor:
    """The shared Attention layer on x padded to its routers' multiple (padding masked out)."""
    n = x.shape[1]
    x, pad = pad_to_multiple(x, attn.multiple_of, dim=1)
    if pad or exists(mask):
        mask = default(mask, torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device))
        mask, _ = pad_to_multiple(mask, attn.multiple_of, dim=1, value=False)
    out, _ = attn(x, LayerContext(mask=mask) if ctx is None else replace(ctx, mask=mask))
    return out[:, :n]


class ConditionalRoutedImageAttention(SeedRoutedNames, nn.Module):
    """For feature maps (b, H, W, d), or (b, d, H, W) with `channel_first`. Light branch: full
    attention inside each light_window_size x light_window_size patch (H and W are padded up to
    multiples of it). Heavy branch: queries and key/values routed from the whole map, so a pixel
    can attend to any other. `mask` (b, H, W) marks real pixels. Prenorm inside, no residual."""

    def __init__(self, dim: int, *, num_heavy_tokens_q: int, num_heavy_tokens_kv: int, num_routed_kv: int = 1,
                 light_dim_head: int = 64, light_heads: int = 8, light_window_size: int = 128,
                 heavy_dim_head: int = 64, heavy_heads: int = 8, router_straight_through: bool = True,
                 router_kwargs: dict = {}, multiply_keys_by_score: bool = False,
                 multiply_queries_by_score: bool = False, use_triton: bool = False, use_null_q_tokens: bool = True,
                 use_flash_attn: bool = False, channel_first: bool = False, backend: str | None = None):
        super().__init__()
        check_positive(light_window_size=light_window_size)
        self.channel_first, self.light_window_size = channel_first, light_window_size
        self.num_heavy_tokens_q, self.num_heavy_tokens_kv = num_heavy_tokens_q, num_heavy_tokens_kv
        self.light_norm = RMSNorm(dim)
        self.light_attn = Attention(dim, heads=light_heads, dim_head=light_dim_head,
                                    backend=backend_for(use_flash_attn, backend), out_bias=False)
        self.routed = RoutedBranches.from_arguments(call_arguments(locals()),
                                                    backend=backend_for(use_flash_attn, backend))


    def forward(self, x: Tensor, *, num_heavy_tokens_q: int | None = None, num_heavy_tokens_kv: int | None = None,
                mask: Tensor | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f'expected a feature map (b, H, W, d) (or (b, d, H, W) with channel_first=True), '
                             f'got shape {tuple(x.shape)}')
        if self.channel_first:
            x = rearrange(x, 'b d y x -> b y x d')
        b, height, width, _ = x.shape
        if exists(mask) and tuple(mask.shape) != (b, height, width):
            raise ValueError(f'mask must have shape (b, H, W) = {(b, height, width)}, got {tuple(mask.shape)}')

        light = self.light(x, mask)
        tokens = rearrange(x, 'b y x d -> b (y x) d')
        flat_mask = rearrange(mask, 'b y x -> b (y x)') if exists(mask) else None
        heavy = self.routed.routed_heavy(tokens, mask=flat_mask,
                                         num_q=default(num_heavy_tokens_q, self.num_heavy_tokens_q),
                                         num_kv=default(num_heavy_tokens_kv, self.num_heavy_tokens_kv))
        out = light + rearrange(heavy, 'b (y x) d -> b y x d', y=height)
        return rearrange(out, 'b y x d -> b d y x') if self.channel_first else out

    def light(self, x: Tensor, mask: Tensor | None) -> Tensor:
        w = self.light_window_size
        b, height, width, _ = x.shape
        pad_h, pad_w = -height % w, -width % w
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            mask = default(mask, torch.ones(b, height, width, dtype=torch.bool, device=x.device))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=False)
        windows = rearrange(self.light_norm(x), 'b (y p) (x q) d -> (b y x) (p q) d', p=w, q=w)
        window_mask = rearrange(mask, 'b (y p) (x q) -> (b y x) (p q)', p=w, q=w) if exists(mask) else None
        out, _ = self.light_attn(windows, LayerContext(mask=window_mask))
        out = rearrange(out, '(b y x) (p q) d -> b (y p) (x q) d', b=b, y=x.shape[1] // w, p=w)
        return out[:, :height, :width]


class ConditionalRoutedCrossAttention(nn.Module):
    """Routed cross-attention to a long memory: num_tokens_q routed queries of x attend to
    num_tokens_kv key/values routed from `context` (per route: `kv_routing_tokens` routes share the
    heads). `route_block_size` routes an equal share inside each block of the context, for
    memories longer than the fused kernel's 131072-token rows. Only the routed tokens are
    normalised and projected, so a million-token memory costs little beyond itself. Unrouted
    queries get the learned null output. `num_sets_kv` is another name for kv_routing_tokens."""

    def __init__(self, dim: int, *, num_tokens_q: int, num_tokens_kv: int, num_sets_kv: int = 1, dim_head: int = 64,
                 heads: int = 8, router_straight_through: bool = True, router_kwargs: dict = {},
                 kv_routing_tokens: int = 1, multiply_keys_by_score: bool = False, use_triton: bool = False,
                 use_null_q_tokens: bool = True, use_flash_attn: bool = False, route_block_size: int | None = None,
                 backend: str | None = None):
        super().__init__()
        if num_sets_kv != 1 and kv_routing_tokens != 1 and num_sets_kv != kv_routing_tokens:
            raise ValueError(f'num_sets_kv ({num_sets_kv}) and kv_routing_tokens ({kv_routing_tokens}) both set the '
                             f'number of key/value routes: give one of them')
        routes = kv_routing_tokens if kv_routing_tokens != 1 else num_sets_kv
        check_positive(num_tokens_q=num_tokens_q, num_tokens_kv=num_tokens_kv, kv_routing_tokens=routes)
        check_routes(heads, routes)
        self.num_tokens_q, self.num_tokens_kv = num_tokens_q, num_tokens_kv
        router_kwargs = with_triton(router_kwargs, use_triton)
        self.null_q_token = nn.Parameter(torch.randn(dim)) if use_null_q_tokens else None
        self.q_router = CoordinateDescentRouter(dim, straight_through=router_straight_through, **router_kwargs)
        self.kv_router = CoordinateDescentRouter(dim, straight_through=router_straight_through,
                                                 num_routing_tokens=routes, route_block_size=route_block_size,
                                                 **router_kwargs)
        self.heavy_attn = HeavyAttention(dim, dim_head=dim_head, heads=heads,
                                         multiply_keys_by_score=multiply_keys_by_score,
                                         backend=backend_for(use_flash_attn, backend))

    def forward(self, x: Tensor, context: Tensor, *, num_tokens_q: int | None = None, num_tokens_kv: int | None = None,
                mask: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != x.shape[-1]:
            raise ValueError(f'context must have shape (batch={x.shape[0]}, context_len, dim={x.shape[-1]}), '
                             f'got {tuple(context.shape)}')
        idx_q, gates_q, routed_q, _ = self.q_router(x, num_tokens=default(num_tokens_q, self.num_tokens_q), mask=mask)
        _, gates_kv, routed_kv, kv_mask = self.kv_router(context, num_tokens=default(num_tokens_kv, self.num_tokens_kv),
                                                         mask=context_mask, keep_one_route_dim=True)
        out = self.heavy_attn(routed_q, routed_kv, kv_gates=gates_kv, kv_mask=kv_mask)
        out = out * rearrange(gates_q, 'b i -> b i 1').to(out.dtype)
        return scatter_heavy(x, out, idx_q, self.null_q_token)


class ConditionalRoutedTransformerBlock(nn.Module):
    """x + ConditionalRoutedAttention(x), then + ConditionalRoutedFeedForward(.): one layer of the
    CoLT5 encoder. `rotary_emb` and `has_light_attn` pass through to the attention."""

    def __init__(self, dim: int, *, num_heavy_attn_tokens_q: int, num_heavy_attn_tokens_kv: int,
                 num_routed_kv: int = 1, num_heavy_ff_tokens: int, light_dim_head: int = 64, light_heads: int = 8,
                 light_window_size: int = 128, heavy_dim_head: int = 64, heavy_heads: int = 8,
                 light_ff_mult: float = 0.5, heavy_ff_mult: float = 4, router_straight_through: bool = True,
                 router_kwargs: dict = {}, multiply_keys_by_score: bool = False,
                 multiply_queries_by_score: bool = False, use_triton: bool = False, use_null_q_tokens: bool = True,
                 use_flash_attn: bool = False, rotary_emb: bool = False, has_light_attn: bool = True,
                 backend: str | None = None):
        super().__init__()
        self.conditional_ff = ConditionalRoutedFeedForward(
            dim, num_heavy_tokens=num_heavy_ff_tokens, light_ff_mult=light_ff_mult, heavy_ff_mult=heavy_ff_mult,
            router_straight_through=router_straight_through, router_kwargs=router_kwargs, use_triton=use_triton)
        self.conditional_attn = ConditionalRoutedAttention(
            dim, num_heavy_tokens_q=num_heavy_attn_tokens_q, num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
            num_routed_kv=num_routed_kv, has_light_attn=has_light_attn, light_dim_head=light_dim_head,
            light_heads=light_heads, light_window_size=light_window_size, heavy_dim_head=heavy_dim_head,
            heavy_heads=heavy_heads, router_straight_through=router_straight_through, router_kwargs=router_kwargs,
            multiply_keys_by_score=multiply_keys_by_score, multiply_queries_by_score=multiply_queries_by_score,
            use_triton=use_triton, use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
            rotary_emb=rotary_emb, backend=backend)

    def forward(self, x: Tensor, mask: Tensor | None = None, num_heavy_attn_tokens_q: int | None = None,
                num_heavy_attn_tokens_kv: int | None = None, num_heavy_ff_tokens: int | None = None) -> Tensor:
        x = self.conditional_attn(x, mask=mask, num_heavy_tokens_q=num_heavy_attn_tokens_q,
                                  num_heavy_tokens_kv=num_heavy_attn_tokens_kv) + x
        return self.conditional_ff(x, mask=mask, num_heavy_tokens=num_heavy_ff_tokens) + x
