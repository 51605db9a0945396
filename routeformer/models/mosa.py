"""MoSATransformerLM: Mixture of Sparse Attention (Piękos et al. 2025) on the shared skeleton.

The routed heads of every self-attention layer are MoSA heads (`MoSARouter`); the paper's hybrids
keep a few ordinary heads beside them: `num_dense_heads` heads of full attention (the reference's
`hybrid_type='dense'`) and/or `n_local_attn_heads` heads of local attention (`hybrid_type='local'`,
whose window defaults to the reference's max_seq_len // sparsity). Heads are ordered local,
dense, MoSA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from ..helpers import cast_tuple
from ..routers import FullRouter
from ..routers.mosa import MoSARouter
from .options import Options, call_arguments
from .transformer_lm import TransformerLM


@dataclass(frozen=True)
class MoSAOptions(Options):
    """MoSA heads, under the paper's and the reference's names: `sparsity` (a head takes about
    n / sparsity tokens; 16 in the reference's example), `num_dense_heads` (full-attention heads
    beside the MoSA heads), `include_first` (every MoSA head also takes position 0),
    `capacity_factor` (causal mode: a head takes at most capacity_factor * max_seq_len / sparsity
    tokens, the earliest when more pass its threshold), `threshold_decay` (EMA decay of the
    causal thresholds), `threshold_gate` (causal mode: a chosen token's gate is its score
    relative to the threshold, not the score) and `value_gate` (a chosen token's value is scaled
    by its gate too); see `routeformer.routers.mosa`."""

    sparsity: float = 16
    num_dense_heads: int = 0
    include_first: bool = False
    capacity_factor: float = 2.
    threshold_decay: float = 0.99
    threshold_gate: bool = False
    value_gate: bool = False

    def check(self, heads: int, local_heads: tuple) -> None:
        c, d = self.capacity_factor, self.num_dense_heads
        if not isinstance(c, (int, float)) or isinstance(c, bool) or c < 1:
            raise ValueError(f'capacity_factor must be a number >= 1, got {c!r}')
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or any(d + n > heads for n in local_heads):
            raise ValueError(f'num_dense_heads must be an integer between 0 and heads - n_local_attn_heads, got '
                             f'{d!r} with heads={heads} and n_local_attn_heads={local_heads}')

    def valid_sparsity(self) -> bool:
        s = self.sparsity
        return isinstance(s, (int, float)) and not isinstance(s, bool) and s >= 1

    def make_router(self, layer: int, heads: int, dim_head: int, *, max_seq_len: int):
        """The routed heads of a layer: `num_dense_heads` of full attention, then MoSA heads."""
        # a bad sparsity is named by MoSARouter
        capacity = min(max_seq_len, math.ceil(self.capacity_factor * max_seq_len / self.sparsity)) \
            if self.valid_sparsity() else None
        routed = heads - self.num_dense_heads
        mosa = MoSARouter(heads=routed, dim_head=dim_head, sparsity=self.sparsity, capacity=capacity,
                          include_first=self.include_first, threshold_decay=self.threshold_decay,
                          threshold_gate=self.threshold_gate, value_gate=self.value_gate) if routed else None
        if not self.num_dense_heads:
            return mosa
        return [(FullRouter(), self.num_dense_heads)] + ([(mosa, routed)] if routed else [])


class MoSATransformerLM(TransformerLM):
    """A language model whose routed heads are MoSA heads (`MoSAOptions`): each selects about
    n / `sparsity` tokens by a learned sigmoid router and attends among them (see
    `routeformer.routers.mosa`). Takes every keyword of TransformerLM besides. Returns
    `(logits, aux_loss)`.

    On text, give about half the heads to local attention (`n_local_attn_heads=heads // 2`, the
    paper's local hybrid, as `routeformer train` does): with every head a MoSA head, byte-level
    text is learned 0.55 bits/byte worse than local attention at 300 steps, and 0.09 worse with
    half the heads local (benchmarks/README.md, "Real text")."""

    def __init__(self, *, depth: int, max_seq_len: int, heads: int = 8, dim_head: int = 64, sparsity: float = 16,
                 num_dense_heads: int = 0, include_first: bool = False, capacity_factor: float = 2.,
                 threshold_decay: float = 0.99, threshold_gate: bool = False,
                 value_gate: bool = False, **kwargs):
        options, trunk = MoSAOptions.split(call_arguments(locals()))
        options.check(heads, cast_tuple(kwargs.get('n_local_attn_heads', 0), depth))
        if options.valid_sparsity():
            # the reference's local hybrid: windows of as many tokens as a MoSA head takes
            trunk.setdefault('local_attn_window_size', max(1, int(max_seq_len // sparsity)))
        super().__init__(make_router=partial(options.make_router, max_seq_len=max_seq_len), **trunk)
