"""MoBATransformerLM: a language model whose routed heads attend by MoBA block selection."""

from __future__ import annotations

from dataclasses import dataclass

from ..routers.moba import MoBARouter
from .options import Options, call_arguments
from .transformer_lm import TransformerLM


@dataclass(frozen=True)
class MoBAOptions(Options):
    """MoBA block selection, under the reference's names and the paper's defaults: `block_size`
    keys per block (`moba_chunk_size`, 512) and `top_k` blocks a query selects besides its own
    (`moba_topk`, 3)."""

    block_size: int = 512
    top_k: int = 3

    def make_router(self, layer: int, heads: int, dim_head: int) -> MoBARouter:
        return MoBARouter(block_size=self.block_size, top_k=self.top_k)


class MoBATransformerLM(TransformerLM):
    """Every keyword argument of `TransformerLM`, plus MoBA's (`MoBAOptions`). The heads that are
    not local (`n_local_attn_heads`) route by `MoBARouter`. Returns `(logits, aux_loss)`.

    On text, give about half the heads to local attention (`n_local_attn_heads=heads // 2`, as
    `routeformer train` does): byte-level text after 200 steps, 2 local and 2 MoBA heads against
    4 MoBA heads, 2.991 against 3.005 bits/byte at 1,024 tokens and 3.245 against 3.378 at 4,096
    (benchmarks/README.md, "Real text")."""

    def __init__(self, *, block_size: int = 512, top_k: int = 3, **kwargs):
        options, trunk = MoBAOptions.split(call_arguments(locals()))
        super().__init__(make_router=options.make_router, **trunk)
