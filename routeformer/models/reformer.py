"""Reformer (Kitaev et al. 2020) with the reformer-pytorch API, built from the shared parts.

LSH attention is the LSHRouter; everything else (shared-QK attention, memory key/values, local
heads, reversible blocks, chunked feed-forward, PKM, positions, LM, wrappers) is the package's.
Same keywords, same parameters as reformer-pytorch (`num_mem_kv` memory slots are learned as
inputs to each layer's projections, positional embeddings live at `emb_dim`, tied layers keep
their own norms); a seed checkpoint loads with `routeformer.compat.from_seed_state_dict`.
What differs from reformer-pytorch 1.4.4, on purpose:
- causal LSH attention is strictly causal, and eval-mode hashing is deterministic;
- ReformerLM hashes into a fixed max_seq_len / bucket_size buckets (trax's fixed `n_buckets`), so a
  token's bucket does not depend on the sequence length: cached decoding equals the full pass;
- `keys=` (encoder output) goes through cross-attention, not into the decoder's LSH buckets, so
  ReformerEncDec's decoder has a cross-attention sublayer of its own per layer (more parameters);
- memory key/values are seen by every query, not hashed into the buckets with the sequence;
- use_full_attn and short sequences keep their rotary positions; post_attn_dropout is applied;
  attn_chunks splits the attention without touching the routing, so reversible gradients are exact.

Axes: b batch, h heads, n sequence, d head dim, g groups, i queries per group, j keys per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..attention.executor import RoutedAttention
from ..attention.plan import RoutePlan, map_layout_tensors
from ..attention.recording import cat_weights, dense_weights
from ..context import LayerContext
from ..helpers import check_positive, default, exists, l2norm, single_output
from ..layers.attention import Attention
from ..layers.embeddings import apply_rotary
from ..lm import LM, check_batch, check_mask
from ..routers import FullRouter, LocalRouter
from ..routers.lsh import LSHRouter
from ..transformer import Sublayer, Transformer
from ..wrappers.encoder_decoder import EncoderDecoder
from .builder import build_pos_emb, build_transformer
from .options import Options, call_arguments
from .transformer_lm import split_kwargs

# ---------------------------------------------------------------- attention parts

class OneValueHead(nn.Module):
    """`one_value_head`: one value projection shared by every head."""

    def __init__(self, dim_in: int, *, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(dim_in, dim_head, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return repeat(self.proj(x), 'b n d -> b n (h d)', h=self.heads)


def slice_plan(plan: RoutePlan, batch: int, heads: slice) -> RoutePlan:
    """The part of a plan for one sample and a range of heads: every per-pair tensor field has
    leading (b|1, h|1) axes (size 1 broadcasts)."""
    def cut(t):
        if not isinstance(t, Tensor) or t.ndim < 2:
            return t
        t = t[batch:batch + 1] if t.shape[0] > 1 else t
        return t[:, heads] if t.shape[1] > 1 else t
    skip = ('aux_loss', 'router_state', 'layout')
    fields = {name: cut(getattr(plan, name)) for name in plan.__dataclass_fields__ if name not in skip}
    return replace(plan, **fields, aux_loss=None, router_state={}, layout=map_layout_tensors(plan.layout, cut))


class ChunkedRoutedAttention(nn.Module):
    """`attn_chunks`: runs an executor on `chunks` slices of batch x heads, one after another. With
    gradients on, each slice is checkpointed, so only one slice's attention weights are alive at a
    time, in the backward pass too. The plan is made once for all slices (a reversible recompute
    replays it), which keeps gradients exact."""

    def __init__(self, executor: RoutedAttention, chunks: int):
        super().__init__()
        self.executor, self.chunks = executor, chunks

    @property
    def backend(self) -> str:
        return self.executor.backend

    def pieces(self, b: int, h: int):
        """(sample, head slice) rectangles covering `chunks` near-equal runs of the flattened b x h."""
        bounds = [round(c * b * h / self.chunks) for c in range(self.chunks + 1)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            while start < end:
                batch, head = divmod(start, h)
                stop = min(h, head + end - start)
                yield batch, slice(head, stop)
                start += stop - head

    def forward(self, q, k, v, plan, *, key_mask=None, mem_kv=None, need_weights=False, **kwargs):
        b, h = q.shape[:2]
        if self.chunks <= 1 or b * h == 1:
            return self.executor(q, k, v, plan, key_mask=key_mask, mem_kv=mem_kv, need_weights=need_weights, **kwargs)
        outs, weights = [[] for _ in range(b)], [[] for _ in range(b)]
        for batch, heads in self.pieces(b, h):
            part = slice_plan(plan, batch, heads)
            mask = key_mask[batch:batch + 1] if exists(key_mask) else None
            memory = tuple(t[heads] for t in mem_kv) if exists(mem_kv) else None

            def run(qs, ks, vs, part=part, mask=mask, memory=memory):
                return self.executor(qs, ks, vs, part, key_mask=mask, mem_kv=memory, need_weights=need_weights,
                                     **kwargs)
            args = (q[batch:batch + 1, heads], k[batch:batch + 1, heads], v[batch:batch + 1, heads])
            if torch.is_grad_enabled() and any(t.requires_grad for t in args):
                out, w = checkpoint(run, *args, use_reentrant=False)
            else:
                out, w = run(*args)
            outs[batch].append(out)
            weights[batch].append(w)
        out = torch.cat([torch.cat(o, dim=1) for o in outs], dim=0)
        if not need_weights:
            return out, None
        return out, cat_weights([cat_weights(w, dim=1) for w in weights], dim=0)


def reformer_parts(dim_kv: int, *, heads: int, dim_head: int, one_value_head: bool, attn_chunks: int,
                   dropout: float = 0., backend: str = 'auto') -> dict:
    """Reformer's components of an attention layer, as Attention keyword arguments: a value
    projection shared by every head (`one_value_head`), and chunked execution (`attn_chunks`)."""
    parts = {}
    if one_value_head:
        parts['to_v'] = OneValueHead(dim_kv, heads=heads, dim_head=dim_head)
    if attn_chunks > 1:
        parts['executor'] = ChunkedRoutedAttention(RoutedAttention(dropout=dropout, backend=backend), attn_chunks)
    return parts


def reformer_attention(*, one_value_head: bool, attn_chunks: int):
    """An Attention factory for `build_transformer` that passes Reformer's parts in."""
    def make(dim: int, *, heads: int, dim_head: int, dim_context: int | None = None, dropout: float = 0.,
             backend: str = 'auto', **kwargs) -> Attention:
        parts = reformer_parts(default(dim_context, dim), heads=heads, dim_head=dim_head,
                               one_value_head=one_value_head, attn_chunks=attn_chunks, dropout=dropout,
                               backend=backend)
        return Attention(dim, heads=heads, dim_head=dim_head, dim_context=dim_context, dropout=dropout,
                         backend=backend, **kwargs, **parts)
    return make


class ContextOptional(nn.Module):
    """A cross-attention sublayer that contributes nothing when no context (`keys`) is given."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    @staticmethod
    def contributes(ctx: LayerContext) -> bool:
        return ctx.context is not None

    def forward(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        if not self.contributes(ctx):
            return torch.zeros_like(x), x.new_zeros(())
        return self.fn(x, ctx)


def tied_cross_attention(own_sublayer: Sublayer, *, attn_dropout: float, post_attn_dropout: float,
                         attn_chunks: int) -> ContextOptional:
    """A cross-attention mixer made of a block's self-attention parts: its projections and norm
    (the encoder keys are projected as reformer-pytorch projects them: shared QK, normalised
    keys), skipped when no keys are given. No parameters of its own, so a model that never gets
    keys has no unused parameters."""
    own = own_sublayer.fn
    heads, dim_head = own.heads, own.dim_head
    executor = reformer_parts(0, heads=heads, dim_head=dim_head, one_value_head=False, attn_chunks=attn_chunks,
                              dropout=attn_dropout, backend=own.executor.backend).get('executor')
    tied = Attention(own.to_q.in_features, heads=heads, dim_head=dim_head, shared_qk=True, cross_attend=True,
                     dropout=attn_dropout, post_attn_dropout=post_attn_dropout, backend=own.executor.backend,
                     to_q=own.to_q, to_v=own.to_v, to_out=own.to_out, executor=executor)
    return ContextOptional(Sublayer.sharing(tied, own_sublayer))


# ---------------------------------------------------------------- the stack

@dataclass(frozen=True)
class ReformerOptions(Options):
    """LSH attention and the Reformer's own layers, under reformer-pytorch's names (defaults:
    `Reformer`'s).

    `bucket_size`: tokens per hash bucket (and twice that is the local heads' window); `n_hashes`:
    hash rounds, merged by log-sum-exp; `max_seq_len` fixes the number of buckets to max_seq_len /
    bucket_size; `use_full_attn` replaces LSH by full attention, as does a sequence of at most
    `full_attn_thres` tokens; `lsh_attend_across_buckets`, `lsh_allow_duplicate_attention`,
    `rehash_each_round`, `random_rotations_per_head` and `drop_for_hash_rate` as in LSHRouter;
    `lsh_dropout`: attention dropout; `post_attn_dropout`: dropout of each attention layer's output;
    `one_value_head`: one value projection for every head; `attn_chunks`: attention run in that many
    slices of batch x heads, one alive at a time; `receives_context`: cross-attention layers with
    their own weights (without it, `keys=` goes through cross-attention that reuses each layer's
    projections)."""

    bucket_size: int = 64
    n_hashes: int = 8
    max_seq_len: int | None = None
    use_full_attn: bool = False
    full_attn_thres: int = 0
    lsh_attend_across_buckets: bool = True
    lsh_allow_duplicate_attention: bool = True
    rehash_each_round: bool = True
    random_rotations_per_head: bool = False
    drop_for_hash_rate: float = 0.
    lsh_dropout: float = 0.
    post_attn_dropout: float = 0.
    one_value_head: bool = False
    attn_chunks: int | None = None
    receives_context: bool = False


# the shells' arguments that are neither options nor `build_transformer`'s
SHELL_ONLY = ('reverse_thres', 'num_tokens', 'emb_dim', 'return_embeddings', 'weight_tie_embedding', 'fixed_position_emb',
              'absolute_position_emb', 'axial_position_emb', 'axial_position_shape', 'emb_dropout')


def build_reformer(options: ReformerOptions, *, dim: int, depth: int, heads: int, dim_head: int | None, causal: bool,
                   n_local_attn_heads, **kwargs) -> Transformer:
    """A Transformer of shared-QK LSH attention layers (local attention in the first
    `n_local_attn_heads` heads). Any other keyword argument of `build_transformer` passes through."""
    o = options
    check_positive(heads=heads, bucket_size=o.bucket_size)
    if dim_head is None and dim % heads != 0:
        raise ValueError(f'dim ({dim}) is not divisible by heads ({heads}): set dim_head')
    if o.attn_chunks is not None and o.attn_chunks < 1:
        raise ValueError(f'attn_chunks must be a positive integer, got {o.attn_chunks}')
    attn_chunks = default(o.attn_chunks, 1)
    # a fixed bucket count when the length is known: a token's bucket then never depends on how
    # long the sequence is (padding, cached decoding)
    n_buckets = LSHRouter.buckets_for_length(o.max_seq_len, o.bucket_size) if exists(o.max_seq_len) else None

    def make_router(layer):
        if o.use_full_attn:
            return FullRouter()
        return LSHRouter(bucket_size=o.bucket_size, n_hashes=o.n_hashes, n_buckets=n_buckets,
                         full_attn_thres=o.full_attn_thres, attend_across_buckets=o.lsh_attend_across_buckets,
                         allow_duplicate_attention=o.lsh_allow_duplicate_attention,
                         rehash_each_round=o.rehash_each_round, random_rotations_per_head=o.random_rotations_per_head,
                         drop_for_hash_rate=o.drop_for_hash_rate)

    attention = reformer_attention(one_value_head=o.one_value_head, attn_chunks=attn_chunks)
    # the seed's layers take keys= without cross-attention of their own: each layer's is tied to it
    tied = None if o.receives_context else partial(tied_cross_attention, attn_dropout=o.lsh_dropout,
                                                   post_attn_dropout=o.post_attn_dropout, attn_chunks=attn_chunks)
    return build_transformer(
        dim=dim, depth=depth, heads=heads, dim_head=dim_head, causal=causal, make_router=make_router,
        n_local_attn_heads=n_local_attn_heads, local_attn_window_size=2 * o.bucket_size, shared_qk=True,
        attn_dropout=o.lsh_dropout, attn_layer_dropout=o.post_attn_dropout, receives_context=o.receives_context,
        mem_kv_from_inputs=kwargs.pop('mem_kv_from_inputs', True), self_attention=attention,
        cross_attention=attention, tied_context=tied, **kwargs)


def reformer_stack(arguments: dict, owner: str, **overrides) -> Transformer:
    """A shell's arguments (`call_arguments(locals())`) -> its stack."""
    options, trunk = ReformerOptions.split(arguments)
    trunk = {k: v for k, v in trunk.items() if k not in SHELL_ONLY}
    return build_reformer(options, **{**split_kwargs(trunk, owner), **overrides})


def context_of(context: Tensor | None, keys: Tensor | None) -> Tensor | None:
    if exists(context) and exists(keys):
        raise ValueError('pass the encoder output once, as keys= or as context=')
    return default(context, keys)


def no_input_attn_mask(input_attn_mask) -> None:
    if exists(input_attn_mask):
        raise ValueError('input_attn_mask (an arbitrary (t, t) mask) is not supported: mark padding with '
                         'input_mask, and use causal=True for autoregressive masking')


class _ReverseThreshold:
    """What Reformer and ReformerLM share besides the stack: the reverse threshold."""

    def use_recompute(self, n: int) -> None:
        # sequences up to reverse_thres run the same coupling with plain autograd (faster, more memory)
        self.transformer.recompute_in_backward = n > self.reverse_thres


class Reformer(_ReverseThreshold, nn.Module):
    """A stack of reversible shared-QK LSH attention layers: `forward(x (b, n, dim)) -> (b, n, dim)`.

    Arguments as reformer-pytorch's `Reformer` (the LSH ones are described in `ReformerOptions`),
    plus: `max_seq_len` (optional; fixes the number of buckets and bounds the input length),
    `twin_attention` (both reversible branches are attention), `receives_context`,
    `rehash_each_round`, `drop_for_hash_rate`, `reversible`, `rotary` (rotary positions in
    attention; on by default) and any keyword argument of `build_transformer`.
    `forward(x, input_mask=None, context=None, context_mask=None, *, keys=None)`.
    """

    multiple_of = LM.multiple_of

    def __init__(self, dim, depth, heads=8, dim_head=None, bucket_size=64, n_hashes=8, ff_chunks=100,
                 attn_chunks=None, causal=False, weight_tie=False, lsh_dropout=0., ff_dropout=0., ff_activation=None,
                 ff_mult=4, ff_glu=False, post_attn_dropout=0., layer_dropout=0., lsh_attend_across_buckets=True,
                 lsh_allow_duplicate_attention=True, random_rotations_per_head=False, use_scale_norm=False,
                 use_rezero=False, use_full_attn=False, full_attn_thres=0, reverse_thres=0, num_mem_kv=0,
                 one_value_head=False, n_local_attn_heads=0, pkm_layers=(), pkm_num_keys=128, *,
                 max_seq_len: int | None = None, twin_attention: bool = False, receives_context: bool = False,
                 rehash_each_round: bool = True, drop_for_hash_rate: float = 0., reversible: bool = True,
                 rotary: bool = True, **kwargs):
        super().__init__()
        self.dim, self.max_seq_len, self.reverse_thres = dim, max_seq_len, reverse_thres
        self.bucket_size, self.num_mem_kv, self.full_attn_thres = bucket_size, num_mem_kv, full_attn_thres
        self.transformer = reformer_stack(call_arguments(locals()), type(self).__name__)

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, *, keys: Tensor | None = None,
                input_attn_mask: Tensor | None = None, recordings: list | None = None) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'expected embeddings of shape (batch, seq_len, dim={self.dim}), got {tuple(x.shape)}')
        check_batch(x.shape, 'the input')
        if exists(self.max_seq_len) and x.shape[1] > self.max_seq_len:
            raise ValueError(f'sequence length {x.shape[1]} is longer than max_seq_len {self.max_seq_len}: '
                             f'truncate the input or build the model with a larger max_seq_len')
        no_input_attn_mask(input_attn_mask)
        context = context_of(context, keys)
        input_mask = check_mask(input_mask, x.shape[:2], 'input_mask', 'the input')
        if exists(context):
            context_mask = check_mask(context_mask, context.shape[:2], 'context_mask', 'the keys (batch, keys_len)')
        self.use_recompute(x.shape[1])
        ctx = LayerContext(mask=input_mask, context=context, context_mask=context_mask, recordings=recordings)
        out, _ = self.transformer(x, ctx)
        return single_output(out, type(self).__name__)


class NormalizedTiedLogits(nn.Module):
    """`weight_tie_embedding`: logits against the l2-normalised token embeddings."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        # the LM's own embedding, not registered a second time (one tensor, one state-dict entry)
        object.__setattr__(self, 'embedding', embedding)

    def forward(self, h: Tensor) -> Tensor:
        return h @ l2norm(self.embedding.weight).t().to(h.dtype)


class ReformerLM(_ReverseThreshold, LM):
    """Reformer language model with reformer-pytorch's arguments. Returns logits (b, n, num_tokens),
    or the final hidden states with `return_embeddings`.

    Positions: rotary inside attention unless `fixed_position_emb`, `absolute_position_emb` or
    `axial_position_emb` is set. `keys=` (encoder output, (b, m, dim)) is attended through
    cross-attention. Extra keyword-only arguments as `Reformer`'s (`twin_attention`,
    `receives_context`, `lsh_attend_across_buckets`, ...), and any of `build_transformer` except
    `moe_layers` (its auxiliary loss would be dropped with the tuple).

    On text, give about half the heads to local attention with a q/k/v projection of their own
    (`n_local_attn_heads=heads // 2, local_qkv=True`, as `routeformer train` does): LSH needs shared
    QK, which costs byte-level text 0.39 bits/byte in full attention too at 300 steps; with those
    local heads the model is 0.17 behind local attention instead of 0.46 (benchmarks/README.md,
    "Real text").
    """

    def __init__(self, num_tokens, dim, depth, max_seq_len, heads=8, dim_head=64, bucket_size=64, n_hashes=4,
                 ff_chunks=100, attn_chunks=1, causal=False, weight_tie=False, lsh_dropout=0., ff_dropout=0.,
                 ff_mult=4, ff_activation=None, ff_glu=False, post_attn_dropout=0., layer_dropout=0.,
                 random_rotations_per_head=False, use_scale_norm=False, use_rezero=False, use_full_attn=False,
                 full_attn_thres=0, reverse_thres=0, num_mem_kv=0, one_value_head=False, emb_dim=None,
                 return_embeddings=False, weight_tie_embedding=False, fixed_position_emb=False,
                 absolute_position_emb=False, axial_position_emb=False, axial_position_shape=None,
                 n_local_attn_heads=0, pkm_layers=(), pkm_num_keys=128, *, twin_attention: bool = False,
                 receives_context: bool = False, lsh_attend_across_buckets: bool = True,
                 lsh_allow_duplicate_attention: bool = True, rehash_each_round: bool = True,
                 drop_for_hash_rate: float = 0., reversible: bool = True, emb_dropout: float = 0., **kwargs):
        arguments = call_arguments(locals())
        if kwargs.get('moe_layers'):
            raise ValueError('ReformerLM returns logits only, so a mixture-of-experts aux loss would be lost: '
                             'use TransformerLM (which returns (logits, aux_loss)) for moe_layers')
        pos_kind = ('axial' if axial_position_emb else 'absolute' if absolute_position_emb
                    else 'fixed' if fixed_position_emb else 'rotary')
        transformer = reformer_stack(arguments, type(self).__name__, rotary=pos_kind == 'rotary')
        axial_shape = default(axial_position_shape, (math.ceil(max_seq_len / bucket_size), bucket_size))
        super().__init__(num_tokens=num_tokens, dim=dim, max_seq_len=max_seq_len, transformer=transformer,
                         emb_dim=emb_dim, emb_dropout=emb_dropout, return_embeddings=return_embeddings, causal=causal,
                         pos_emb_before_project_in=True,
                         pos_emb=build_pos_emb(pos_kind, dim=default(emb_dim, dim), max_seq_len=max_seq_len,
                                               axial_position_shape=axial_shape))
        self.reverse_thres, self.bucket_size, self.num_mem_kv = reverse_thres, bucket_size, num_mem_kv
        self.full_attn_thres = full_attn_thres
        if weight_tie_embedding:
            self.to_logits = NormalizedTiedLogits(self.token_emb)

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, *, keys: Tensor | None = None,
                input_attn_mask: Tensor | None = None, cache: dict | None = None, recordings: list | None = None,
                return_embeddings: bool | None = None) -> Tensor:
        no_input_attn_mask(input_attn_mask)
        self.check_shape(x)
        self.use_recompute(x.shape[1])
        out, _ = super().forward(x, input_mask, context_of(context, keys), context_mask, cache=cache,
                                 recordings=recordings, return_embeddings=return_embeddings)
        return single_output(out, type(self).__name__)


class ReformerEncDec(EncoderDecoder):
    """Encoder-decoder of two ReformerLMs (`enc_`/`dec_` keyword arguments; the decoder's bucket
    size defaults to twice the encoder's, 64). The decoder reads the encoder output through its own
    cross-attention layers. `forward(seq_in, seq_out, return_loss=False, enc_input_mask=...)` returns
    the loss, or the decoder's logits; `generate(seq_in, seq_out_start, seq_len, ...)`."""

    def __init__(self, dim: int, ignore_index: int = 0, pad_value: int = 0, **kwargs):
        enc_bucket = kwargs.get('enc_bucket_size', 64)
        built = EncoderDecoder.from_kwargs(ReformerLM, dim=dim, ignore_index=ignore_index, pad_value=pad_value,
                                           enc_defaults=dict(bucket_size=64),
                                           dec_defaults=dict(bucket_size=2 * enc_bucket), **kwargs)
        super().__init__(built.encoder.net, built.decoder.net, ignore_index=ignore_index, pad_value=pad_value)

    def forward(self, seq_in: Tensor, seq_out: Tensor, return_loss: bool = False, **kwargs) -> Tensor:
        return super().forward(seq_in, seq_out, return_loss=return_loss, **kwargs)[0]


# ---------------------------------------------------------------- single layers

class LSHSelfAttention(nn.Module):
    """Shared-QK multi-head LSH self-attention (with `n_local_attn_heads` local heads and
    `num_mem_kv` learned memory key/values): `forward(x (b, n, dim), input_mask=None) -> (b, n, dim)`,
    or `(out, attn (b, h, n, n), buckets (b, h_lsh, n_hashes, n))` when built with `return_attn`.
    Sequences of at most `full_attn_thres` tokens (default: bucket_size) use full attention.
    Positions: none (as reformer-pytorch's layer); Reformer and ReformerLM add rotary positions."""

    multiple_of = LM.multiple_of

    def __init__(self, dim, heads=8, bucket_size=64, n_hashes=8, causal=False, dim_head=None, attn_chunks=1,
                 random_rotations_per_head=False, attend_across_buckets=True, allow_duplicate_attention=True,
                 num_mem_kv=0, one_value_head=False, use_full_attn=False, full_attn_thres=None, return_attn=False,
                 post_attn_dropout=0., dropout=0., n_local_attn_heads=0, *, rehash_each_round: bool = True,
                 drop_for_hash_rate: float = 0., n_buckets: int | None = None, backend: str = 'auto'):
        super().__init__()
        check_positive(heads=heads, bucket_size=bucket_size)
        if dim_head is None and dim % heads != 0:
            raise ValueError(f'dim ({dim}) is not divisible by heads ({heads}): set dim_head')
        dim_head = default(dim_head, dim // heads)
        router = FullRouter() if use_full_attn else LSHRouter(
            bucket_size=bucket_size, n_hashes=n_hashes, n_buckets=n_buckets,
            full_attn_thres=default(full_attn_thres, bucket_size), attend_across_buckets=attend_across_buckets,
            allow_duplicate_attention=allow_duplicate_attention, rehash_each_round=rehash_each_round,
            random_rotations_per_head=random_rotations_per_head, drop_for_hash_rate=drop_for_hash_rate)
        local = LocalRouter(2 * bucket_size, look_backward=1) if n_local_attn_heads > 0 else None
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, causal=causal, router=router, local_router=local,
                              n_local_heads=n_local_attn_heads, shared_qk=True, num_mem_kv=num_mem_kv,
                              mem_kv_from_inputs=True, dropout=dropout, post_attn_dropout=post_attn_dropout,
                              backend=backend,
                              **reformer_parts(dim, heads=heads, dim_head=dim_head, one_value_head=one_value_head,
                                               attn_chunks=default(attn_chunks, 1), dropout=dropout, backend=backend))
        self.dim, self.return_attn = dim, return_attn
        self.bucket_size, self.num_mem_kv, self.full_attn_thres = bucket_size, num_mem_kv, default(full_attn_thres, bucket_size)

    def forward(self, x: Tensor, keys: Tensor | None = None, input_mask: Tensor | None = None,
                input_attn_mask: Tensor | None = None, context_mask: Tensor | None = None, pos_emb=None, *,
                context: Tensor | None = None, recordings: list | None = None):
        if exists(context_of(context, keys)) or exists(context_mask):
            raise ValueError('LSHSelfAttention attends within x only; for encoder output use Reformer or ReformerLM, '
                             'whose cross-attention layers take keys=')
        if exists(pos_emb):
            raise ValueError('LSHSelfAttention has no positions of its own; Reformer and ReformerLM apply rotary '
                             'positions inside attention')
        no_input_attn_mask(input_attn_mask)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'expected x of shape (batch, seq_len, dim={self.dim}), got {tuple(x.shape)}')
        input_mask = check_mask(input_mask, x.shape[:2], 'input_mask', 'x')
        record = [] if self.return_attn else recordings
        out, _ = self.attn(x, LayerContext(mask=input_mask, recordings=record))
        if not self.return_attn:
            return out
        if exists(recordings):
            recordings.extend(record)
        attn = torch.cat([r['attn'] for r in record], dim=1)
        buckets = [r['plan'].router_state['buckets'] for r in record if 'buckets' in r['plan'].router_state]
        return out, attn, (buckets[0] if buckets else torch.empty(0))


class LSHAttention(nn.Module):
    """LSH attention on shared query-keys: `forward(qk (b, n, d), v (b, n, d), query_len=None,
    input_mask=None, input_attn_mask=None, pos_emb=None) -> (out (b, query_len, d), attn, buckets)`.
    `attn` is the dense (b, query_len, n) attention when built with `return_attn` (empty otherwise),
    `buckets` (b, n_hashes * n) the bucket of every token in every round, offset by
    round * n_buckets as in reformer-pytorch. `pos_emb`: rotary angles (n, r) (from
    routeformer's RotaryEmbedding), applied after hashing. Keys are l2-normalised; a token attends
    to itself only when nothing else is visible."""

    def __init__(self, dropout=0., bucket_size=64, n_hashes=8, causal=False, allow_duplicate_attention=True,
                 attend_across_buckets=True, rehash_each_round=True, drop_for_hash_rate=0.,
                 random_rotations_per_head=False, return_attn=False, *, n_buckets: int | None = None,
                 backend: str = 'auto'):
        super().__init__()
        if not 0. <= dropout < 1.:
            raise ValueError(f'dropout must be in [0, 1), got {dropout}')
        self.causal, self.return_attn = causal, return_attn
        self.router = LSHRouter(bucket_size=bucket_size, n_hashes=n_hashes, n_buckets=n_buckets,
                                attend_across_buckets=attend_across_buckets,
                                allow_duplicate_attention=allow_duplicate_attention,
                                rehash_each_round=rehash_each_round, drop_for_hash_rate=drop_for_hash_rate,
                                random_rotations_per_head=random_rotations_per_head)
        self.executor = RoutedAttention(dropout=dropout, backend=backend)

    def forward(self, qk: Tensor, v: Tensor, query_len: int | None = None, input_mask: Tensor | None = None,
                input_attn_mask: Tensor | None = None, pos_emb: Tensor | None = None):
        if qk.ndim != 3 or v.shape[:2] != qk.shape[:2]:
            raise ValueError(f'qk and v must be (batch, seq_len, dim) with the same batch and length, got '
                             f'{tuple(qk.shape)} and {tuple(v.shape)}')
        no_input_attn_mask(input_attn_mask)
        b, n, _ = qk.shape
        key_mask = check_mask(input_mask, (b, n), 'input_mask', 'qk')
        q, v = rearrange(qk, 'b n d -> b 1 n d'), rearrange(v, 'b n d -> b 1 n d')
        k = l2norm(q)
        plan = self.router(q, k, causal=self.causal, mask=key_mask)
        if exists(pos_emb):
            q, k = apply_rotary(q, pos_emb), apply_rotary(k, pos_emb)
        out, weights = self.executor(q, k, v, plan, causal=self.causal, key_mask=key_mask, exclude_self=True,
                                     need_weights=self.return_attn)
        query_len = default(query_len, n)
        attn = dense_weights(weights, plan, n, n, queries=slice(0, query_len))[:, 0] if self.return_attn \
            else qk.new_empty(0)
        buckets = plan.router_state.get('buckets')
        if exists(buckets):
            n_buckets = self.router.buckets_for(n)
            offsets = torch.arange(buckets.shape[-2], device=buckets.device).view(-1, 1) * n_buckets
            buckets = rearrange(buckets[:, 0] + offsets, 'b r n -> b (r n)')
        else:  # full attention on a short sequence
            buckets = qk.new_empty(0, dtype=torch.long)
        return out[:, 0, :query_len], attn, buckets
