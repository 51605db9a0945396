"""NSATransformerLM: a causal language model whose self-attention is Native Sparse Attention
(routeformer.layers.nsa: compressed, selected and sliding-window branches, gated)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

from ..layers.nsa import NSAAttention
from .options import Options, call_arguments
from .transformer_lm import TransformerLM


@dataclass(frozen=True)
class NSAOptions(Options):
    """NSA's three branches, under the paper's names and defaults: compressed blocks of
    `compress_block_size` keys every `compress_stride` positions (32, 16), the
    `num_selected_blocks` best blocks of `select_block_size` keys (16, 64), and a sliding window
    of `sliding_window_size` keys (512)."""

    compress_block_size: int = 32
    compress_stride: int = 16
    select_block_size: int = 64
    num_selected_blocks: int = 16
    sliding_window_size: int = 512

    def self_attention(self):
        """Builds a self-attention layer from Attention's keyword arguments."""
        return partial(NSAAttention, **asdict(self))


class NSATransformerLM(TransformerLM):
    """TransformerLM (every keyword of it) with NSA (`NSAOptions`) in every self-attention
    layer's heads after the `n_local_attn_heads` local ones. Causal only. Returns
    `(logits, aux_loss)`."""

    def __init__(self, *, causal: bool = True, compress_block_size: int = 32, compress_stride: int = 16,
                 select_block_size: int = 64, num_selected_blocks: int = 16, sliding_window_size: int = 512,
                 **kwargs):
        if not causal:
            raise ValueError('NSATransformerLM is a causal language model: drop causal=False')
        if 'self_attention' in kwargs:
            raise TypeError('NSATransformerLM builds its own self-attention layers: drop self_attention')
        options, trunk = NSAOptions.split(call_arguments(locals()))
        super().__init__(self_attention=options.self_attention(), **trunk)
