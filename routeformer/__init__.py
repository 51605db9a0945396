"""routeformer: long-sequence transformers with content-routed sparse attention."""

from .attention import RoutedAttention, RoutePlan
from .context import LayerContext
from .layers.attention import Attention
from .layers.feedforward import FeedForward
from .lm import LM
from .models import TransformerEncDec, TransformerLM, build_transformer
from .routers import ROUTERS, FullRouter, LocalRouter, Router
from .transformer import Block, Sublayer, Transformer
from .wrappers import Autopadder, AutoregressiveWrapper, EncoderDecoder, Recorder, top_k, top_p

__all__ = [
    'Autopadder', 'AutoregressiveWrapper', 'EncoderDecoder', 'Recorder', 'TransformerEncDec', 'top_k', 'top_p',
    'Attention', 'Block', 'FeedForward', 'FullRouter', 'LM', 'LayerContext', 'LocalRouter', 'ROUTERS',
    'RoutePlan', 'RoutedAttention', 'Router', 'Sublayer', 'Transformer', 'TransformerLM', 'build_transformer',
]
