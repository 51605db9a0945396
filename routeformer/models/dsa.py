"""DSATransformerLM: a language model whose routed heads attend the tokens a lightning indexer selects."""

from __future__ import annotations

from ..routers.dsa import DSARouter
from .transformer_lm import TransformerLM


class DSATransformerLM(TransformerLM):
    """Every keyword argument of `TransformerLM`, plus DSA's (`DSARouter`): `index_n_heads`,
    `index_head_dim` and `index_topk` (the paper's 64, 128 and 2048), `index_loss_weight` (the
    indexer's KL loss, part of the returned aux loss; it reaches the indexer only) and
    `dense_warmup_steps` (0: sparse from the start). The heads that are not local route by DSA.
    Returns `(logits, aux_loss)`."""

    def __init__(self, *, index_n_heads: int = 64, index_head_dim: int = 128, index_topk: int = 2048,
                 index_loss_weight: float = 1., dense_warmup_steps: int = 0, dim_head: int = 64, **kwargs):
        def router(layer, heads):
            return DSARouter(heads=heads, dim_head=dim_head, index_n_heads=index_n_heads,
                             index_head_dim=index_head_dim, index_topk=index_topk,
                             index_loss_weight=index_loss_weight, dense_warmup_steps=dense_warmup_steps)
        super().__init__(make_router=router, dim_head=dim_head, **kwargs)
