"""DSATransformerLM: a language model whose routed heads attend the tokens a lightning indexer selects."""

from __future__ import annotations

from dataclasses import dataclass

from ..routers.dsa import DSARouter
from .options import Options, call_arguments
from .transformer_lm import TransformerLM


@dataclass(frozen=True)
class DSAOptions(Options):
    """DSA's lightning indexer (`DSARouter`), under the reference's names and the paper's
    defaults: `index_n_heads`, `index_head_dim` and `index_topk` (64, 128 and 2048),
    `index_loss_weight` (the indexer's KL loss, part of the returned aux loss; it reaches the
    indexer only) and `dense_warmup_steps` (0: sparse from the start)."""

    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    index_loss_weight: float = 1.
    dense_warmup_steps: int = 0

    def make_router(self, layer: int, heads: int, dim_head: int) -> DSARouter:
        return DSARouter(heads=heads, dim_head=dim_head, index_n_heads=self.index_n_heads,
                         index_head_dim=self.index_head_dim, index_topk=self.index_topk,
                         index_loss_weight=self.index_loss_weight, dense_warmup_steps=self.dense_warmup_steps)


class DSATransformerLM(TransformerLM):
    """Every keyword argument of `TransformerLM`, plus DSA's (`DSAOptions`). The heads that are
    not local route by DSA. Returns `(logits, aux_loss)`."""

    def __init__(self, *, index_n_heads: int = 64, index_head_dim: int = 128, index_topk: int = 2048,
                 index_loss_weight: float = 1., dense_warmup_steps: int = 0, **kwargs):
        options, trunk = DSAOptions.split(call_arguments(locals()))
        super().__init__(make_router=options.make_router, **trunk)
