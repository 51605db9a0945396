from .builder import build_pos_emb, build_transformer
from .transformer_lm import TransformerEncDec, TransformerLM
from .routing import RoutingTransformer, RoutingTransformerEncDec, RoutingTransformerLM

__all__ = ['TransformerEncDec', 'TransformerLM', 'build_transformer', 'build_pos_emb']
__all__ += ['RoutingTransformer', 'RoutingTransformerEncDec', 'RoutingTransformerLM']
from .sinkhorn import SinkhornTransformer, SinkhornTransformerEncDec, SinkhornTransformerLM  # noqa: E402
__all__ += ['SinkhornTransformer', 'SinkhornTransformerEncDec', 'SinkhornTransformerLM']
from .colt5 import (ConditionalRoutedAttention, ConditionalRoutedCrossAttention,  # noqa: E402
                    ConditionalRoutedFeedForward, ConditionalRoutedImageAttention, ConditionalRoutedTransformerBlock)
from .colt5_decoder import ConditionalRoutedAutoregressiveAttention, ConditionalRoutedTransformerLM  # noqa: E402
from .colt5_vit import ConditionalRoutedViT  # noqa: E402
__all__ += ['ConditionalRoutedAttention', 'ConditionalRoutedAutoregressiveAttention', 'ConditionalRoutedCrossAttention',
            'ConditionalRoutedFeedForward', 'ConditionalRoutedImageAttention', 'ConditionalRoutedTransformerBlock',
            'ConditionalRoutedTransformerLM', 'ConditionalRoutedViT']
from .reformer import LSHAttention, LSHSelfAttention, Reformer, ReformerEncDec, ReformerLM  # noqa: E402
__all__ += ['LSHAttention', 'LSHSelfAttention', 'Reformer', 'ReformerEncDec', 'ReformerLM']
