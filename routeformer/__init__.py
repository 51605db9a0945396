"""routeformer: long-sequence transformers with content-routed sparse attention."""

from .attention import RoutedAttention, RoutePlan, explain_backends, use_backend
from .context import LayerContext
from .kernels import coor_descent, topk
from .layers.attention import Attention
from .layers.feedforward import FeedForward
from .lm import LM
from .compat import from_seed_state_dict, load_seed_state_dict, save_converted
from .models import (ConditionalRoutedAttention, ConditionalRoutedAutoregressiveAttention,
                     ConditionalRoutedCrossAttention, ConditionalRoutedFeedForward, ConditionalRoutedImageAttention,
                     ConditionalRoutedTransformerBlock, ConditionalRoutedTransformerLM, ConditionalRoutedViT,
                     DSATransformerLM, KmeansAttention, LSHAttention, LSHSelfAttention, MoBATransformerLM,
                     MoSATransformerLM, NSATransformerLM, Reformer, ReformerEncDec, ReformerLM, RoutingTransformer,
                     RoutingTransformerEncDec, RoutingTransformerLM, SinkhornSelfAttention, SinkhornTransformer,
                     SinkhornTransformerEncDec, SinkhornTransformerLM, TransformerEncDec, TransformerLM,
                     build_transformer, update_kmeans_on_backwards)
from .routers import (ROUTERS, CoordinateDescentRouter, DSARouter, FullRouter, KMeansRouter, LocalRouter, LSHRouter,
                      MoBARouter, MoSARouter, Router, SinkhornRouter, TopKRouter, apply_statistics, discard_statistics)
from .transformer import Block, Sublayer, Transformer
from .wrappers import Autopadder, AutoregressiveWrapper, EncoderDecoder, Recorder, TrainingWrapper, top_k, top_p

__all__ = [
    # the seed packages' classes
    'RoutingTransformer', 'RoutingTransformerLM', 'RoutingTransformerEncDec', 'KmeansAttention',
    'update_kmeans_on_backwards',
    'LSHAttention', 'LSHSelfAttention', 'Reformer', 'ReformerLM', 'ReformerEncDec', 'TrainingWrapper',
    'SinkhornTransformer', 'SinkhornTransformerLM', 'SinkhornTransformerEncDec', 'SinkhornSelfAttention',
    'ConditionalRoutedAttention', 'ConditionalRoutedAutoregressiveAttention', 'ConditionalRoutedCrossAttention',
    'ConditionalRoutedFeedForward', 'ConditionalRoutedImageAttention', 'ConditionalRoutedTransformerBlock',
    'ConditionalRoutedTransformerLM', 'ConditionalRoutedViT', 'coor_descent', 'topk',
    # today's routers
    'MoBATransformerLM', 'MoBARouter', 'DSATransformerLM', 'DSARouter', 'MoSATransformerLM', 'MoSARouter',
    'NSATransformerLM',
    # wrappers
    'Autopadder', 'AutoregressiveWrapper', 'EncoderDecoder', 'Recorder', 'top_k', 'top_p',
    # the shared core
    'TransformerLM', 'TransformerEncDec', 'build_transformer', 'LM', 'Transformer', 'Block', 'Sublayer', 'Attention',
    'FeedForward', 'LayerContext', 'RoutedAttention', 'RoutePlan', 'explain_backends', 'use_backend',
    'ROUTERS', 'Router', 'FullRouter', 'LocalRouter', 'KMeansRouter', 'LSHRouter', 'SinkhornRouter', 'TopKRouter',
    'CoordinateDescentRouter', 'apply_statistics', 'discard_statistics',
    # seed checkpoints
    'from_seed_state_dict', 'load_seed_state_dict', 'save_converted',
]


from importlib import metadata as _metadata  # noqa: E402

try:
    __version__ = _metadata.version('routeformer')
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = '0+unknown'


def load(path, device='cpu'):
    """`(model, config)` of a run written by `routeformer train`: its run folder (the newest
    checkpoint) or one of its `checkpoints/step-*` folders. The model is in eval mode on `device`,
    its weights checked against their checksum; `config` is the run's `Config` (`.model`, `.data`,
    `.train`). A missing, damaged or foreign checkpoint raises ValueError. Needs the `train` extra."""
    from .cli.commands import load as load_run
    config, model, _, _ = load_run(str(path), str(device))
    return model, config
