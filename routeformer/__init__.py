"""routeformer: long-sequence transformers with content-routed sparse attention."""

from .attention import RoutedAttention, RoutePlan
from .context import LayerContext
from .kernels import coor_descent, topk
from .layers.attention import Attention
from .layers.feedforward import FeedForward
from .lm import LM
from .models import (ConditionalRoutedAttention, ConditionalRoutedAutoregressiveAttention,
                     ConditionalRoutedCrossAttention, ConditionalRoutedFeedForward, ConditionalRoutedImageAttention,
                     ConditionalRoutedTransformerBlock, ConditionalRoutedTransformerLM, ConditionalRoutedViT,
                     LSHAttention, LSHSelfAttention, Reformer, ReformerEncDec, ReformerLM, RoutingTransformer,
                     RoutingTransformerEncDec, RoutingTransformerLM, SinkhornTransformer, SinkhornTransformerEncDec,
                     SinkhornTransformerLM, TransformerEncDec, TransformerLM, build_transformer)
from .routers import (ROUTERS, CoordinateDescentRouter, FullRouter, KMeansRouter, LocalRouter, LSHRouter, Router,
                      SinkhornRouter, TopKRouter, discard_statistics)
from .transformer import Block, Sublayer, Transformer
from .models import NSATransformerLM
from .wrappers import Autopadder, AutoregressiveWrapper, EncoderDecoder, Recorder, top_k, top_p

__all__ = [
    # the seed packages' classes
    'RoutingTransformer', 'RoutingTransformerLM', 'RoutingTransformerEncDec',
    'LSHAttention', 'LSHSelfAttention', 'Reformer', 'ReformerLM', 'ReformerEncDec',
    'SinkhornTransformer', 'SinkhornTransformerLM', 'SinkhornTransformerEncDec',
    'ConditionalRoutedAttention', 'ConditionalRoutedAutoregressiveAttention', 'ConditionalRoutedCrossAttention',
    'ConditionalRoutedFeedForward', 'ConditionalRoutedImageAttention', 'ConditionalRoutedTransformerBlock',
    'ConditionalRoutedTransformerLM', 'ConditionalRoutedViT', 'coor_descent', 'topk',
    # wrappers
    'Autopadder', 'AutoregressiveWrapper', 'EncoderDecoder', 'Recorder', 'top_k', 'top_p',
    # the shared core
    'TransformerLM', 'TransformerEncDec', 'build_transformer', 'LM', 'Transformer', 'Block', 'Sublayer', 'Attention',
    'FeedForward', 'LayerContext', 'RoutedAttention', 'RoutePlan',
    'ROUTERS', 'Router', 'FullRouter', 'LocalRouter', 'KMeansRouter', 'LSHRouter', 'SinkhornRouter', 'TopKRouter',
    'CoordinateDescentRouter', 'discard_statistics',
    # today's routers
    'NSATransformerLM',
]
