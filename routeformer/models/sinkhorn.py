"""Sinkhorn Transformer (Tay et al. 2020) with the API of the `sinkhorn_transformer` package:
`SinkhornTransformer` (features in, `(features, aux_loss)` out), `SinkhornTransformerLM` (returns
`(logits, aux_loss)`) and `SinkhornTransformerEncDec`, which the seed's users asked for.

Sinkhorn heads use `SinkhornRouter` (see routeformer/routers/sinkhorn.py for the algorithm); the
first `n_local_attn_heads` heads of a layer attend locally in windows of `bucket_size`, as in the
seed. Every keyword argument of the seed package has an effect, with the seed's defaults, which
differ between `SinkhornTransformer` and `SinkhornTransformerLM` (`non_permutative`,
`n_top_buckets`, `context_n_sortcut`) as they did there. Same keywords, same parameters as the
seed (a decoder's cross-attention is a layer of its own with its own feed-forward, positions live
at `emb_dim`, the final norm comes after the factorised embedding's projection, tied layers keep
their own norms) except where noted below; a seed checkpoint loads with
`routeformer.compat.from_seed_state_dict`. Differences from the seed, all deliberate:
- the selected key blocks contribute their values (the seed used their keys as values in its
  default path), and padding is masked by position for every `n_top_buckets` (the seed's causal
  mask assumed 2 selected blocks);
- Gumbel noise only in training, so evaluation is deterministic; the attention sort net's softmax
  uses `temperature` (the seed ignored it there);
- causal routing decides a block's key blocks from the mean of the `bucket_size` routing queries
  ending at its first token (the seed: a cumulative mean at the first token, plus half of the heads
  rotated by bucket_size - 1); a null candidate that wins leaves its slot empty (the seed attended
  to copies of a learned null key/value there, so a causal seed checkpoint does not load);
- soft permutations (`non_permutative=False`) keep the `n_top_buckets` largest entries of each row
  as block weights instead of mixing every block into every sorted block;
- cross-attention (`receives_context`) projects the context to keys and values (the seed used the
  raw context as both: a seed checkpoint loads identity projections there), takes a context of any
  length and of width `dim_context`, and in a causal decoder routes each block from what is known
  at its first token (the seed's cross-attention routed by the whole block, so later tokens of a
  block steered what earlier ones saw);
- `use_simple_sort_net` takes any length up to `max_seq_len` (the seed: exactly `max_seq_len`
  when not causal);
- `max_seq_len` is rounded up to a whole number of buckets, so Autopadder can pad any input up to
  `max_seq_len` (the seed's README example with bucket_size 75 could exceed it);
- the axial positional embedding stays the default; `pos_emb` also takes 'rotary', 'absolute',
  'fixed' or None;
- cached decoding (`AutoregressiveWrapper.generate`) with cached keys/values and block routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..context import LayerContext
from ..helpers import cast_tuple, check_positive, default, exists, next_multiple, pop_unknown_kwargs, single_output
from ..layers.attention import Attention
from ..lm import LM, check_mask, reject_aux_layers, trunk_context
from ..routers import LocalRouter
from ..routers.sinkhorn import SinkhornRouter
from ..transformer import Transformer
from ..wrappers import EncoderDecoder
from .builder import TRANSFORMER_KWARGS, build_pos_emb, build_transformer
from .options import Options, call_arguments


def bucketed_length(max_seq_len: int, bucket_size: int, kv_bucket_size: int | None) -> int:
    """max_seq_len rounded up to a whole number of query and key buckets."""
    kv_bucket_size = default(kv_bucket_size, bucket_size)
    check_positive(bucket_size=bucket_size, kv_bucket_size=kv_bucket_size)
    return next_multiple(max_seq_len, math.lcm(bucket_size, kv_bucket_size))


@dataclass(frozen=True)
class SinkhornOptions(Options):
    """Sinkhorn routing, under the seed's names (defaults: `SinkhornTransformer`'s).

    `bucket_size`: queries per block, and keys unless `kv_bucket_size`; `context_bucket_size`:
    context keys per block in cross-attention (default `bucket_size`); `n_top_buckets`: key blocks
    each query block attends; `n_sortcut`: key blocks every query block shares (the sortcut,
    non-causal; `context_n_sortcut` in cross-attention); `non_permutative`: score blocks with a
    softmax instead of Sinkhorn-normalised Gumbel noise, `sinkhorn_iter` normalisation rounds, at
    `temperature`; `use_simple_sort_net`: key blocks scored by learned weights per position
    (needs `max_seq_len`) instead of the attention sort net."""

    bucket_size: int = 64
    kv_bucket_size: int | None = None
    context_bucket_size: int | None = None
    non_permutative: bool = False
    sinkhorn_iter: int = 5
    n_sortcut: int = 0
    temperature: float = 0.75
    use_simple_sort_net: bool | None = None
    max_seq_len: int | None = None
    context_n_sortcut: int = 2
    n_top_buckets: int = 1


def build_sinkhorn_transformer(options: SinkhornOptions, *, dim: int, depth: int, heads: int, dim_head: int | None,
                               causal: bool, n_local_attn_heads: int | tuple, rotary: bool = False,
                               owner: str = 'SinkhornTransformer', **kwargs) -> Transformer:
    """A Transformer with sinkhorn-routed heads. The other keyword arguments go to
    `build_transformer` unchanged; unknown ones are an error."""
    o = options
    pop_unknown_kwargs({k: v for k, v in kwargs.items() if k not in TRANSFORMER_KWARGS - {'rotary'}}, owner)
    check_positive(heads=heads, bucket_size=o.bucket_size)
    if dim_head is None:
        if dim % heads != 0:
            raise ValueError(f'dim ({dim}) must be divisible by heads ({heads}) when dim_head is not given')
        dim_head = dim // heads
    local_heads = cast_tuple(n_local_attn_heads, depth)
    if len(local_heads) != depth:
        raise ValueError(f'n_local_attn_heads has {len(local_heads)} entries but depth is {depth}')
    sort_kwargs = dict(bucket_size=o.bucket_size, dim_head=dim_head, n_top_buckets=o.n_top_buckets,
                       non_permutative=o.non_permutative, sinkhorn_iter=o.sinkhorn_iter, temperature=o.temperature,
                       causal=causal)

    def make_router(layer):
        routed = heads - local_heads[layer]
        if routed <= 0:
            return None
        return SinkhornRouter(heads=routed, kv_bucket_size=o.kv_bucket_size, n_sortcut=o.n_sortcut,
                              use_simple_sort_net=bool(o.use_simple_sort_net), max_seq_len=o.max_seq_len, **sort_kwargs)

    def make_context_router(layer):
        return SinkhornRouter(heads=heads, kv_bucket_size=default(o.context_bucket_size, o.bucket_size),
                              n_sortcut=o.context_n_sortcut, cross=True, **sort_kwargs)

    kwargs.setdefault('local_attn_window_size', o.bucket_size)  # the seed's local heads: windows of bucket_size
    kwargs.setdefault('context_ff', True)  # the seed's decoder: a cross-attention layer with its own feed-forward
    return build_transformer(dim=dim, depth=depth, heads=heads, dim_head=dim_head, causal=causal,
                             make_router=make_router, make_context_router=make_context_router,
                             n_local_attn_heads=n_local_attn_heads, rotary=rotary, **kwargs)


class SinkhornTransformer(nn.Module):
    """The transformer trunk on feature vectors: `forward(x (b, n, dim), input_mask=None,
    context=None, context_mask=None)` returns x (b, n, dim). The seed's keyword arguments and
    defaults (the routing ones are described in `SinkhornOptions`; `max_seq_len` is needed only by
    the simple sort net), plus those of `build_transformer`."""

    multiple_of = LM.multiple_of  # the sequence multiple Autopadder pads to

    def __init__(self, dim: int, depth: int, max_seq_len: int | None = None, causal: bool = False, heads: int = 8,
                 dim_head: int | None = None, bucket_size: int = 64, kv_bucket_size: int | None = None,
                 context_bucket_size: int | None = None, non_permutative: bool = False, sinkhorn_iter: int = 5,
                 n_sortcut: int = 0, temperature: float = 0.75, reversible: bool = False, ff_chunks: int = 1,
                 ff_dropout: float = 0., attn_dropout: float = 0., attn_layer_dropout: float = 0.,
                 layer_dropout: float = 0., weight_tie: bool = False, ff_glu: bool = False,
                 use_simple_sort_net: bool | None = None, receives_context: bool = False, context_n_sortcut: int = 2,
                 n_local_attn_heads: int | tuple = 0, use_rezero: bool = False, n_top_buckets: int = 1,
                 pkm_layers: tuple = (), pkm_num_keys: int = 128, **kwargs):
        super().__init__()
        if exists(max_seq_len):
            max_seq_len = bucketed_length(max_seq_len, bucket_size, kv_bucket_size)
        self.dim, self.max_seq_len, self.causal = dim, max_seq_len, causal
        options, trunk = SinkhornOptions.split(call_arguments(locals()))
        self.transformer = build_sinkhorn_transformer(options, owner=type(self).__name__, **trunk)
        reject_aux_layers(self.transformer, type(self).__name__)

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None):
        ctx = trunk_context(x, dim=self.dim, max_seq_len=self.max_seq_len, input_mask=input_mask, context=context,
                            context_mask=context_mask)
        x, _ = self.transformer(x, ctx)
        return single_output(x, type(self).__name__)


class SinkhornTransformerLM(LM):
    """A token model with sinkhorn-routed attention. Every keyword argument of the seed package's
    `SinkhornTransformerLM`, with its defaults (positional order `num_tokens, dim, max_seq_len,
    depth` as there), plus `pos_emb` ('axial' default, 'rotary', 'absolute', 'fixed' or None),
    `axial_position_shape` (default `(max_seq_len / bucket_size, bucket_size)`), `tie_embedding`
    and every other keyword argument of `build_transformer` (e.g. `dim_context`, `num_mem_kv`).
    `forward(x, input_mask=None, context=None, context_mask=None)` returns the logits (the hidden
    states with `return_embeddings`), as the seed package's model does.

    On text, prefer `pos_emb='rotary'` (what `routeformer train` uses): the seed's axial
    embedding, added to the input, learned byte-level text 0.28 bits/byte worse at 300 steps
    (benchmarks/README.md, "Real text")."""

    def __init__(self, num_tokens: int, dim: int, max_seq_len: int, depth: int, heads: int = 8,
                 dim_head: int | None = None, bucket_size: int = 64, kv_bucket_size: int | None = None,
                 context_bucket_size: int | None = None, causal: bool = False, non_permutative: bool = True,
                 sinkhorn_iter: int = 5, n_sortcut: int = 0, temperature: float = 0.75, reversible: bool = False,
                 ff_chunks: int = 1, ff_glu: bool = False, return_embeddings: bool = False, ff_dropout: float = 0.,
                 attn_dropout: float = 0., attn_layer_dropout: float = 0., layer_dropout: float = 0.,
                 emb_dropout: float = 0., weight_tie: bool = False, emb_dim: int | None = None,
                 use_simple_sort_net: bool | None = None, receives_context: bool = False, context_n_sortcut: int = 0,
                 n_local_attn_heads: int | tuple = 0, use_rezero: bool = False, n_top_buckets: int = 2,
                 pkm_layers: tuple = (), pkm_num_keys: int = 128, *, pos_emb: str | None = 'axial',
                 axial_position_shape: tuple | None = None, tie_embedding: bool = False, **kwargs):
        max_seq_len = bucketed_length(max_seq_len, bucket_size, kv_bucket_size)
        options, trunk = SinkhornOptions.split(call_arguments(locals()))
        lm_only = ('num_tokens', 'return_embeddings', 'emb_dropout', 'emb_dim', 'pos_emb', 'axial_position_shape',
                   'tie_embedding')
        transformer = build_sinkhorn_transformer(options, rotary=pos_emb == 'rotary', owner=type(self).__name__,
                                                 **{k: v for k, v in trunk.items() if k not in lm_only})
        axial_position_shape = default(axial_position_shape, (max_seq_len // bucket_size, bucket_size))
        super().__init__(num_tokens=num_tokens, dim=dim, max_seq_len=max_seq_len, transformer=transformer,
                         emb_dim=emb_dim, emb_dropout=emb_dropout, tie_embedding=tie_embedding,
                         return_embeddings=return_embeddings, causal=causal, return_aux=False,
                         norm_after_project_out=True, pos_emb_before_project_in=True,
                         pos_emb=build_pos_emb(pos_emb, dim=default(emb_dim, dim), max_seq_len=max_seq_len,
                                               axial_position_shape=axial_position_shape))


class SinkhornTransformerEncDec(EncoderDecoder):
    """Encoder and decoder `SinkhornTransformerLM`s: `dim` is shared, every other keyword argument
    is prefixed `enc_` or `dec_` (e.g. `enc_num_tokens`, `enc_max_seq_len`, `enc_depth`,
    `dec_bucket_size`, `dec_context_bucket_size`). The decoder is causal and cross-attends to the
    encoder's output through sinkhorn-routed heads.
    `forward(src, tgt, return_loss=True, enc_input_mask=..., dec_input_mask=...)` returns
    `(loss, aux_loss)`; `generate(src, start_tokens, seq_len, ...)` samples the decoder with a cache."""

    def __init__(self, dim: int, ignore_index: int | None = None, pad_value: int = 0, **kwargs):
        built = EncoderDecoder.from_kwargs(SinkhornTransformerLM, dim=dim, ignore_index=ignore_index,
                                           pad_value=pad_value, **kwargs)
        super().__init__(built.encoder.net, built.decoder.net, ignore_index=ignore_index, pad_value=pad_value)


class SinkhornSelfAttention(nn.Module):
    """One multi-head sinkhorn attention layer with sinkhorn-transformer's API (projections
    included): `forward(x (b, n, dim), input_mask=None, context=None, context_mask=None)` returns
    (b, n, dim); `n` must be a multiple of `bucket_size` (Autopadder pads it). The first
    `n_local_attn_heads` heads attend locally in windows of `bucket_size`. With `context_only` the
    keys and values come from `context` (b, m, dim), masked by `context_mask` (here projected to keys
    and values, as in SinkhornTransformer's cross-attention; the seed used the raw context).
    `max_seq_len` is needed only by the simple sort net."""

    def __init__(self, dim: int, bucket_size: int, max_seq_len: int | None = None, heads: int = 8,
                 dim_head: int | None = None, kv_bucket_size: int | None = None, causal: bool = False,
                 non_permutative: bool = True, sinkhorn_iter: int = 5, n_sortcut: int = 0, temperature: float = 0.75,
                 attn_dropout: float = 0., dropout: float = 0., context_only: bool = False,
                 use_simple_sort_net: bool = False, n_local_attn_heads: int = 0, n_top_buckets: int = 1):
        super().__init__()
        if dim_head is None and dim % heads != 0:
            raise ValueError(f'dim ({dim}) must be divisible by heads ({heads}) when dim_head is not given')
        if causal and context_only:
            raise ValueError('a context_only layer attends to the context, which has no order: it cannot be causal')
        dim_head = default(dim_head, dim // heads)
        self.dim, self.context_only, self.multiple_of = dim, context_only, bucket_size
        routed = heads - n_local_attn_heads
        router = SinkhornRouter(bucket_size=bucket_size, heads=routed, dim_head=dim_head,
                                kv_bucket_size=kv_bucket_size, n_top_buckets=n_top_buckets, n_sortcut=n_sortcut,
                                non_permutative=non_permutative, sinkhorn_iter=sinkhorn_iter, temperature=temperature,
                                use_simple_sort_net=use_simple_sort_net, max_seq_len=max_seq_len, causal=causal,
                                cross=context_only) if routed > 0 else None
        local = LocalRouter(bucket_size, look_backward=1) if n_local_attn_heads > 0 and not context_only else None
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, causal=causal, router=router, local_router=local,
                              n_local_heads=n_local_attn_heads if not context_only else 0, dropout=attn_dropout,
                              post_attn_dropout=dropout, cross_attend=context_only)

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'expected x of shape (batch, seq_len, dim={self.dim}), got {tuple(x.shape)}')
        if x.shape[1] % self.multiple_of != 0:
            raise ValueError(f'sequence length {x.shape[1]} is not a multiple of bucket_size {self.multiple_of}: '
                             f'pad it, or wrap the layer in Autopadder')
        if self.context_only and context is None:
            raise ValueError('a context_only layer needs context=(batch, context_len, dim)')
        if not self.context_only and (exists(context) or exists(context_mask)):
            raise ValueError('this layer attends within x: build it with context_only=True to attend to a context')
        input_mask = check_mask(input_mask, x.shape[:2], 'input_mask', 'x (batch, seq_len)')
        if exists(context):
            context_mask = check_mask(context_mask, context.shape[:2], 'context_mask',
                                      'the context (batch, context_len)')
        out, _ = self.attn(x, LayerContext(mask=input_mask, context=context, context_mask=context_mask))
        return out
