"""Model classes with the seed packages' APIs, built on the shared skeleton."""

from .builder import build_pos_emb, build_transformer
from .colt5 import (ConditionalRoutedAttention, ConditionalRoutedCrossAttention, ConditionalRoutedFeedForward,
                    ConditionalRoutedImageAttention, ConditionalRoutedTransformerBlock)
from .colt5_decoder import ConditionalRoutedAutoregressiveAttention, ConditionalRoutedTransformerLM
from .colt5_vit import ConditionalRoutedViT
from .reformer import LSHAttention, LSHSelfAttention, Reformer, ReformerEncDec, ReformerLM
from .routing import RoutingTransformer, RoutingTransformerEncDec, RoutingTransformerLM
from .sinkhorn import SinkhornTransformer, SinkhornTransformerEncDec, SinkhornTransformerLM
from .transformer_lm import TransformerEncDec, TransformerLM
from .nsa import NSATransformerLM

__all__ = [
    'ConditionalRoutedAttention', 'ConditionalRoutedAutoregressiveAttention', 'ConditionalRoutedCrossAttention',
    'ConditionalRoutedFeedForward', 'ConditionalRoutedImageAttention', 'ConditionalRoutedTransformerBlock',
    'ConditionalRoutedTransformerLM', 'ConditionalRoutedViT', 'LSHAttention', 'LSHSelfAttention', 'Reformer',
    'ReformerEncDec', 'ReformerLM', 'RoutingTransformer', 'RoutingTransformerEncDec', 'RoutingTransformerLM',
    'SinkhornTransformer', 'SinkhornTransformerEncDec', 'SinkhornTransformerLM', 'TransformerEncDec', 'TransformerLM',
    'build_pos_emb', 'build_transformer',
    'NSATransformerLM',
]
