"""routeformer: long-sequence transformers with content-routed sparse attention."""

from .attention import RoutedAttention, RoutePlan
from .context import LayerContext
from .layers.attention import Attention
from .layers.feedforward import FeedForward
from .lm import LM
from .models import TransformerEncDec, TransformerLM, build_transformer
from .routers import ROUTERS, FullRouter, LocalRouter, Router
from .transformer import Block, Sublayer, Transformer
from .models import RoutingTransformer, RoutingTransformerEncDec, RoutingTransformerLM
from .routers import KMeansRouter
from .models import SinkhornTransformer, SinkhornTransformerEncDec, SinkhornTransformerLM
from .routers import SinkhornRouter
from .wrappers import Autopadder, AutoregressiveWrapper, EncoderDecoder, Recorder, top_k, top_p

__all__ = [
    'Autopadder', 'AutoregressiveWrapper', 'EncoderDecoder', 'Recorder', 'TransformerEncDec', 'top_k', 'top_p',
    'Attention', 'Block', 'FeedForward', 'FullRouter', 'LM', 'LayerContext', 'LocalRouter', 'ROUTERS',
    'RoutePlan', 'RoutedAttention', 'Router', 'Sublayer', 'Transformer', 'TransformerLM', 'build_transformer',
]
__all__ += ['KMeansRouter', 'RoutingTransformer', 'RoutingTransformerEncDec', 'RoutingTransformerLM']
__all__ += ['SinkhornRouter', 'SinkhornTransformer', 'SinkhornTransformerEncDec', 'SinkhornTransformerLM']
from .models import (ConditionalRoutedAttention, ConditionalRoutedAutoregressiveAttention,  # noqa: E402
                     ConditionalRoutedCrossAttention, ConditionalRoutedFeedForward, ConditionalRoutedImageAttention,
                     ConditionalRoutedTransformerBlock, ConditionalRoutedTransformerLM, ConditionalRoutedViT)
from .routers import CoordinateDescentRouter, TopKRouter  # noqa: E402
from .kernels import coor_descent, topk  # noqa: E402
__all__ += ['ConditionalRoutedAttention', 'ConditionalRoutedAutoregressiveAttention', 'ConditionalRoutedCrossAttention',
            'ConditionalRoutedFeedForward', 'ConditionalRoutedImageAttention', 'ConditionalRoutedTransformerBlock',
            'ConditionalRoutedTransformerLM', 'ConditionalRoutedViT', 'CoordinateDescentRouter', 'TopKRouter',
            'coor_descent', 'topk']
from .models import LSHAttention, LSHSelfAttention, Reformer, ReformerEncDec, ReformerLM  # noqa: E402
from .routers import LSHRouter  # noqa: E402
__all__ += ['LSHAttention', 'LSHRouter', 'LSHSelfAttention', 'Reformer', 'ReformerEncDec', 'ReformerLM']
