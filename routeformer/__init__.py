"""routeformer: long-sequence transformers with content-routed sparse attention."""

from .attention import RoutedAttention, RoutePlan
from .context import LayerContext
from .layers.attention import Attention
from .layers.feedforward import FeedForward
from .lm import LM
from .models import TransformerLM, build_transformer
from .routers import ROUTERS, FullRouter, LocalRouter, Router
from .transformer import Block, Sublayer, Transformer

__all__ = [
    'Attention', 'Block', 'FeedForward', 'FullRouter', 'LM', 'LayerContext', 'LocalRouter', 'ROUTERS',
    'RoutePlan', 'RoutedAttention', 'Router', 'Sublayer', 'Transformer', 'TransformerLM', 'build_transformer',
]
