"""MoSATransformerLM: Mixture of Sparse Attention (Piękos et al. 2025) on the shared skeleton.

The routed heads of every self-attention layer are MoSA heads (`MoSARouter`); the paper's hybrids
keep a few ordinary heads beside them: `num_dense_heads` heads of full attention (the reference's
`hybrid_type='dense'`) and/or `n_local_attn_heads` heads of local attention (`hybrid_type='local'`,
whose window defaults to the reference's max_seq_len // sparsity). Heads are ordered local,
dense, MoSA.
"""

from __future__ import annotations

import math

from torch import nn

from ..helpers import cast_tuple
from ..layers.attention import Attention
from ..routers import FullRouter
from ..routers.mosa import MoSARouter
from .transformer_lm import TransformerLM


def add_dense_heads(transformer: nn.Module, count: int) -> None:
    """The first `count` heads of every self-attention layer's MoSA group attend densely: that group
    is split into a full-attention group and the MoSA router's (built for the heads after them)."""
    for attn in {m for m in transformer.modules() if isinstance(m, Attention) and not m.cross_attend}:
        if not isinstance(attn.routers[-1], MoSARouter):
            continue  # no MoSA heads in this layer: its routed heads are dense already
        start, end = attn.head_slices[-1]
        attn.head_slices[-1:] = [(start, start + count), (start + count, end)]
        attn.routers.insert(len(attn.routers) - 1, FullRouter())


class MoSATransformerLM(TransformerLM):
    """A language model whose routed heads are MoSA heads: each selects about n / `sparsity`
    tokens by a learned sigmoid router and attends among them (see `routeformer.routers.mosa`).

    `sparsity` (the paper's; 16 in the reference's example), `num_dense_heads` (full-attention
    heads beside the MoSA heads), `include_first` (every MoSA head also takes position 0),
    `capacity_factor` (causal mode: a head takes at most capacity_factor * max_seq_len / sparsity
    tokens, the earliest when more pass its threshold), `threshold_decay` (EMA decay of the
    causal thresholds), plus every keyword of TransformerLM. Returns `(logits, aux_loss)`."""

    def __init__(self, *, depth: int, max_seq_len: int, heads: int = 8, dim_head: int = 64, sparsity: float = 16,
                 num_dense_heads: int = 0, include_first: bool = False, capacity_factor: float = 2.,
                 threshold_decay: float = 0.99, **kwargs):
        if not isinstance(capacity_factor, (int, float)) or isinstance(capacity_factor, bool) or capacity_factor < 1:
            raise ValueError(f'capacity_factor must be a number >= 1, got {capacity_factor!r}')
        local_heads = cast_tuple(kwargs.get('n_local_attn_heads', 0), depth)
        if isinstance(num_dense_heads, bool) or not isinstance(num_dense_heads, int) or num_dense_heads < 0 or \
                any(num_dense_heads + n > heads for n in local_heads):
            raise ValueError(f'num_dense_heads must be an integer between 0 and heads - n_local_attn_heads, got '
                             f'{num_dense_heads!r} with heads={heads} and n_local_attn_heads={local_heads}')
        if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and sparsity >= 1:
            # the reference's local hybrid: windows of as many tokens as a MoSA head takes
            kwargs.setdefault('local_attn_window_size', max(1, int(max_seq_len // sparsity)))
            capacity = min(max_seq_len, math.ceil(capacity_factor * max_seq_len / sparsity))
        else:
            capacity = None  # MoSARouter names the bad sparsity

        def router(layer, routed):
            routed -= num_dense_heads
            return MoSARouter(heads=routed, dim_head=dim_head, sparsity=sparsity, capacity=capacity,
                              include_first=include_first, threshold_decay=threshold_decay) if routed else None

        super().__init__(depth=depth, max_seq_len=max_seq_len, heads=heads, dim_head=dim_head, make_router=router,
                         **kwargs)
        if num_dense_heads:
            add_dense_heads(self.transformer, num_dense_heads)
