"""Flat keyword arguments -> a Transformer. The one place the seed packages' shared options
(local heads, memory key/values, GLU, chunking, PKM, MoE, norms, token shift, weight tying,
reversibility) turn into modules; every family's model class calls it with its own router.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from ..helpers import cast_tuple, check_positive, default, exists
from ..layers.attention import Attention
from ..layers.embeddings import (AbsolutePositionalEmbedding, AxialPositionalEmbedding, FixedPositionalEmbedding,
                                 RotaryEmbedding)
from ..layers.feedforward import FeedForward
from ..layers.moe import MoE
from ..layers.pkm import PKM
from ..layers.relative_position import RelativePositionLogits
from ..routers import LocalRouter, Router
from ..transformer import Block, Sublayer, Transformer


def build_transformer(*, dim: int, depth: int, heads: int = 8, dim_head: int | None = None, causal: bool = False,
                      make_router: Callable[[int], Router | None] | None = None,
                      n_local_attn_heads: int | tuple = 0, local_attn_window_size: int = 128,
                      local_attn_radius_blocks: int = 1, attn_dropout: float = 0., attn_layer_dropout: float = 0.,
                      ff_dropout: float = 0., layer_dropout: float = 0., ff_mult: float = 4,
                      ff_activation: type[nn.Module] | None = None, ff_glu: bool = False, ff_chunks: int = 1,
                      shared_qk: bool = False, num_mem_kv: int = 0, reversible: bool = False,
                      weight_tie: bool = False, use_scale_norm: bool = False, use_rms_norm: bool = False,
                      use_rezero: bool = False, shift_tokens: bool = False, pkm_layers: tuple = (),
                      pkm_num_keys: int = 128, moe_layers: tuple = (), moe_num_experts: int = 4,
                      moe_loss_coef: float = 1e-2, receives_context: bool = False, dim_context: int | None = None,
                      rotary: bool = False, backend: str = 'auto',
                      make_context_router: Callable[[int], Router | None] | None = None,
                      context_shared_qk: bool = False, max_relative_position: int | None = None,
                      twin_attention: bool = False, local_qkv: bool = False,
                      attn_out_bias: bool = True, context_ff: bool = False,
                      mem_kv_from_inputs: bool = False,
                      self_attention: Callable[..., Attention] = Attention,
                      cross_attention: Callable[..., Attention] = Attention,
                      tied_context: Callable[[Sublayer], nn.Module] | None = None) -> Transformer:
    """Builds the blocks. Layer indices in `pkm_layers`/`moe_layers` count from 1 (seed convention);
    `n_local_attn_heads` may be one number or one per layer; `make_router(layer)` gives the main
    router of each layer (full attention when it returns None), `make_context_router(layer)` the
    router of its cross-attention. `context_shared_qk` projects the context's keys with the query
    projection; `max_relative_position` adds relative position logits (Shaw et al.) to every
    self-attention head. `twin_attention` makes both branches of every block self-attention (the
    feed-forward becomes a second attention; Reformer). `local_qkv` gives local heads their own
    projection (Routing Transformer), `attn_out_bias` is the attention output projection's bias.
    `context_ff` puts each layer's cross-attention in a block of its own, after the layer, with a
    feed-forward of its own (the Routing and Sinkhorn decoders); by default it is a second mixer of
    the layer's block. `mem_kv_from_inputs` learns memory key/values as inputs to the layer's
    projections (Reformer). `self_attention` builds every self-attention layer from Attention's
    keyword arguments: a layer class that is not one router's plan (NSA's gated branches) plugs in
    here; `cross_attention` builds the cross-attention layers (Reformer passes its own parts in).
    `tied_context(self_attention_sublayer)` gives every layer a last mixer built from its
    self-attention's own parts (Reformer's `keys=`, projected by the layer's projections)."""
    check_positive(dim=dim, heads=heads, **({} if dim_head is None else dict(dim_head=dim_head)))
    dim_head = default(dim_head, dim // heads)
    if twin_attention and (pkm_layers or moe_layers):
        raise ValueError('twin_attention replaces every feed-forward by attention: it cannot be combined with '
                         'pkm_layers or moe_layers')
    if context_shared_qk and dim_context not in (None, dim):
        raise ValueError(f'context_shared_qk projects the context with the query projection: it needs '
                         f'dim_context ({dim_context}) equal to dim ({dim})')
    local_heads = cast_tuple(n_local_attn_heads, depth)
    if len(local_heads) != depth:
        raise ValueError(f'n_local_attn_heads has {len(local_heads)} entries but depth is {depth}')
    if any(not 0 <= n <= heads for n in local_heads):
        raise ValueError(f'n_local_attn_heads ({n_local_attn_heads}) must be between 0 and heads ({heads})')
    for name, layers in (('pkm_layers', pkm_layers), ('moe_layers', moe_layers)):
        if any(not 1 <= layer <= depth for layer in layers):
            raise ValueError(f'{name} {tuple(layers)} must be layer numbers between 1 and depth ({depth})')
    if weight_tie and len(set(local_heads)) > 1:
        raise ValueError('weight_tie shares one layer across the depth: it cannot be combined with per-layer '
                         'n_local_attn_heads')
    norm = 'scale' if use_scale_norm else 'rms' if use_rms_norm else 'layer'
    # token shift: causal models see only the previous position (Peng, RWKV)
    shifts = ((0, 1) if causal else (-1, 0, 1)) if shift_tokens else None
    rotary_emb = RotaryEmbedding(dim_head) if rotary else None

    def sublayer(fn):
        return Sublayer(fn, dim=dim, norm=norm, rezero=use_rezero, shifts=shifts)

    def attention(layer, cross=False):
        n_local = 0 if cross else local_heads[layer]
        make_attn = cross_attention if cross else self_attention
        return make_attn(dim, heads=heads, dim_head=dim_head, causal=causal,
                         router=make_layer_router(layer, cross),
                         local_router=LocalRouter(local_attn_window_size, look_backward=local_attn_radius_blocks) if n_local else None,
                         n_local_heads=n_local, shared_qk=context_shared_qk if cross else shared_qk, num_mem_kv=num_mem_kv,
                         dropout=attn_dropout, post_attn_dropout=attn_layer_dropout, cross_attend=cross,
                         dim_context=dim_context, rotary=rotary_emb, backend=backend,
                         local_qkv=local_qkv, out_bias=attn_out_bias, mem_kv_from_inputs=mem_kv_from_inputs,
                         rel_pos=None if cross or max_relative_position is None else
                         RelativePositionLogits(dim_head, max_relative_position=max_relative_position))

    def make_layer_router(layer, cross):
        make = make_context_router if cross else make_router
        return None if make is None else make(layer)

    def feedforward(layer):
        number = layer + 1
        if number in moe_layers:  # MoE wins over PKM when a layer is in both (seed behaviour)
            return MoE(dim, num_experts=moe_num_experts, loss_coef=moe_loss_coef)
        if number in pkm_layers:
            return PKM(dim, num_keys=pkm_num_keys, topk=min(32, pkm_num_keys))
        return plain_feedforward()

    def plain_feedforward():
        return FeedForward(dim, mult=ff_mult, dropout=ff_dropout, activation=ff_activation, glu=ff_glu, chunks=ff_chunks)

    def with_tied(mixers):
        return [*mixers, tied_context(mixers[0])] if exists(tied_context) else mixers

    def layer_blocks(layer):
        mixers = [sublayer(attention(layer))]
        if receives_context and not context_ff:
            mixers.append(sublayer(attention(layer, cross=True)))
        blocks = [Block(with_tied(mixers), sublayer(attention(layer) if twin_attention else feedforward(layer)))]
        if receives_context and context_ff:
            blocks.append(Block([sublayer(attention(layer, cross=True))], sublayer(plain_feedforward())))
        return blocks

    own_ff = {number - 1 for number in (*pkm_layers, *moe_layers)}
    if weight_tie:
        # ALBERT sharing as in the seeds: every layer shares the attention and feed-forward but has
        # norms (or ReZero gates) of its own; PKM and MoE layers keep their own memory/experts in
        # place of the shared feed-forward
        tied = layer_blocks(next((layer for layer in range(depth) if layer not in own_ff), 0))

        def tied_layer(layer):
            first, *rest = tied  # the layer's block, and its cross-attention block (context_ff)
            own = first.mixers[:-1] if exists(tied_context) else first.mixers
            blocks = [Block(with_tied([sublayer(m.fn) for m in own]),
                            sublayer(feedforward(layer) if layer in own_ff else first.ff.fn))]
            return blocks + [Block([sublayer(m.fn) for m in b.mixers], sublayer(b.ff.fn)) for b in rest]
        per_layer = [tied_layer(layer) for layer in range(depth)]
    else:
        per_layer = [layer_blocks(layer) for layer in range(depth)]
    return Transformer([b for blocks in per_layer for b in blocks], reversible=reversible,
                       layer_dropout=layer_dropout)


TRANSFORMER_KWARGS = set(inspect.signature(build_transformer).parameters) - {'make_router', 'make_context_router'}


def build_pos_emb(kind: str | None, *, dim: int, max_seq_len: int, axial_position_shape: tuple | None = None,
                  axial_position_dims: tuple | None = None) -> nn.Module | None:
    """Absolute positional embeddings added to the token embeddings ('rotary' lives in attention)."""
    if kind in (None, 'rotary'):
        return None
    if kind == 'absolute':
        return AbsolutePositionalEmbedding(dim, max_seq_len=max_seq_len)
    if kind == 'fixed':
        return FixedPositionalEmbedding(dim, max_seq_len=max_seq_len)
    if kind == 'axial':
        if not exists(axial_position_shape):
            raise ValueError('pos_emb="axial" needs axial_position_shape, e.g. (64, 128) for max_seq_len 8192')
        return AxialPositionalEmbedding(dim, axial_shape=axial_position_shape, axial_dims=axial_position_dims)
    raise ValueError(f'unknown pos_emb {kind!r}; choose one of absolute, fixed, axial, rotary, None')
