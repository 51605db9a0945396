"""MoBATransformerLM: a language model whose routed heads attend by MoBA block selection."""

from __future__ import annotations

from ..routers.moba import MoBARouter
from .transformer_lm import TransformerLM


class MoBATransformerLM(TransformerLM):
    """Every keyword argument of `TransformerLM`, plus MoBA's: `block_size` (keys per block, the
    paper's 512) and `top_k` (blocks a query selects besides its own, the paper's 3). The heads
    that are not local (`n_local_attn_heads`) route by `MoBARouter`. Returns `(logits, aux_loss)`."""

    def __init__(self, *, block_size: int = 512, top_k: int = 3, **kwargs):
        super().__init__(make_router=lambda layer, heads: MoBARouter(block_size=block_size, top_k=top_k), **kwargs)
