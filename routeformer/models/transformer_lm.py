"""TransformerLM: the plain baseline, full (or local) attention built from the shared parts."""

from __future__ import annotations

from typing import Callable

from ..helpers import cast_tuple, exists, pop_unknown_kwargs
from ..lm import LM
from ..routers import Router
from .builder import TRANSFORMER_KWARGS, build_pos_emb, build_transformer


def split_kwargs(kwargs: dict, owner: str) -> dict:
    """Takes the transformer's keyword arguments out of `kwargs`; anything left over is an error."""
    taken = {k: kwargs.pop(k) for k in list(kwargs) if k in TRANSFORMER_KWARGS}
    pop_unknown_kwargs(kwargs, owner)
    return taken


class TransformerLM(LM):
    """A language model with full attention in every head (or local attention in
    `n_local_attn_heads` of them). Takes every keyword argument of `build_transformer`, plus the
    embedding options below. Returns `(logits, aux_loss)`.

    `make_router(layer, heads, dim_head)` gives the router of the `heads` heads of each layer that
    are not local (full attention when it returns None; a list of (router, heads) pairs shares
    them out between several routers): how the families of today's routers (MoBA, DSA, ...) are
    built on this class."""

    def __init__(self, *, num_tokens: int, dim: int, depth: int, max_seq_len: int, heads: int = 8,
                 dim_head: int = 64, causal: bool = False, emb_dim: int | None = None, emb_dropout: float = 0.,
                 tie_embedding: bool = False, return_embeddings: bool = False, pos_emb: str | None = 'rotary',
                 axial_position_shape: tuple | None = None,
                 make_router: Callable[[int, int, int], Router | list | None] | None = None, **kwargs):
        transformer_kwargs = split_kwargs(kwargs, type(self).__name__)
        if exists(make_router):
            local = cast_tuple(transformer_kwargs.get('n_local_attn_heads', 0), depth)
            if len(local) == depth:  # otherwise build_transformer says what is wrong
                # a layer of local heads only has no other router
                transformer_kwargs['make_router'] = lambda layer: (make_router(layer, heads - local[layer], dim_head)
                                                                   if heads > local[layer] else None)
        transformer = build_transformer(dim=dim, depth=depth, heads=heads, dim_head=dim_head, causal=causal,
                                        rotary=pos_emb == 'rotary', **transformer_kwargs)
        super().__init__(num_tokens=num_tokens, dim=dim, max_seq_len=max_seq_len, transformer=transformer,
                         emb_dim=emb_dim, emb_dropout=emb_dropout, tie_embedding=tie_embedding,
                         return_embeddings=return_embeddings, causal=causal,
                         pos_emb=build_pos_emb(pos_emb, dim=dim, max_seq_len=max_seq_len,
                                               axial_position_shape=axial_position_shape))


def TransformerEncDec(dim: int, **kwargs):
    """Encoder-decoder of two TransformerLMs; every other keyword is prefixed `enc_` or `dec_`."""
    from ..wrappers import EncoderDecoder
    return EncoderDecoder.from_kwargs(TransformerLM, dim=dim, **kwargs)
