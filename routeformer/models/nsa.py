"""NSATransformerLM: a causal language model whose self-attention is Native Sparse Attention
(routeformer.layers.nsa: compressed, selected and sliding-window branches, gated)."""

from __future__ import annotations

from functools import partial

from ..layers.nsa import NSAAttention
from .transformer_lm import TransformerLM


class NSATransformerLM(TransformerLM):
    """TransformerLM (every keyword of it) with NSA in every self-attention layer's heads after the
    `n_local_attn_heads` local ones, with the paper's defaults: compressed blocks of
    `compress_block_size` keys every `compress_stride` positions, the `num_selected_blocks` best
    blocks of `select_block_size` keys, and a sliding window of `sliding_window_size` keys.
    Causal only. Returns `(logits, aux_loss)`."""

    def __init__(self, *, causal: bool = True, compress_block_size: int = 32, compress_stride: int = 16,
                 select_block_size: int = 64, num_selected_blocks: int = 16, sliding_window_size: int = 512,
                 **kwargs):
        if not causal:
            raise ValueError('NSATransformerLM is a causal language model: drop causal=False')
        if 'self_attention' in kwargs:
            raise TypeError('NSATransformerLM builds its own self-attention layers: drop self_attention')
        nsa = partial(NSAAttention, compress_block_size=compress_block_size, compress_stride=compress_stride,
                      select_block_size=select_block_size, num_selected_blocks=num_selected_blocks,
                      sliding_window_size=sliding_window_size)
        super().__init__(causal=True, self_attention=nsa, **kwargs)
