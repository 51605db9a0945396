"""Model classes with the seed packages' APIs, and today's routers, built on the shared skeleton."""

from .builder import build_pos_emb, build_transformer
from .colt5 import (ConditionalRoutedAttention, ConditionalRoutedCrossAttention, ConditionalRoutedFeedForward,
                    ConditionalRoutedImageAttention, ConditionalRoutedTransformerBlock)
from .colt5_decoder import ConditionalRoutedAutoregressiveAttention, ConditionalRoutedTransformerLM
from .colt5_vit import ConditionalRoutedViT
from .dsa import DSATransformerLM
from .kmeans_attention import KmeansAttention, update_kmeans_on_backwards
from .moba import MoBATransformerLM
from .mosa import MoSATransformerLM
from .nsa import NSATransformerLM
from .reformer import LSHAttention, LSHSelfAttention, Reformer, ReformerEncDec, ReformerLM
from .routing import RoutingTransformer, RoutingTransformerEncDec, RoutingTransformerLM
from .sinkhorn import SinkhornSelfAttention, SinkhornTransformer, SinkhornTransformerEncDec, SinkhornTransformerLM
from .transformer_lm import TransformerEncDec, TransformerLM

__all__ = [
    'ConditionalRoutedAttention', 'ConditionalRoutedAutoregressiveAttention', 'ConditionalRoutedCrossAttention',
    'ConditionalRoutedFeedForward', 'ConditionalRoutedImageAttention', 'ConditionalRoutedTransformerBlock',
    'ConditionalRoutedTransformerLM', 'ConditionalRoutedViT', 'DSATransformerLM', 'KmeansAttention', 'LSHAttention',
    'LSHSelfAttention', 'MoBATransformerLM', 'MoSATransformerLM', 'NSATransformerLM', 'Reformer', 'ReformerEncDec',
    'ReformerLM', 'RoutingTransformer', 'RoutingTransformerEncDec', 'RoutingTransformerLM', 'SinkhornSelfAttention',
    'SinkhornTransformer', 'SinkhornTransformerEncDec', 'SinkhornTransformerLM', 'TransformerEncDec', 'TransformerLM',
    'build_pos_emb', 'build_transformer', 'update_kmeans_on_backwards',
]
