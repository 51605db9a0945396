"""Model registry for benchmarks/bench.py.

Each entry maps a name to a builder `(ModelConfig) -> nn.Module`. The module maps token ids
`(b, n)` to logits `(b, n, vocab)`, or to a tuple `(logits, aux_loss)`. Builders import their
package inside the function so that a missing optional package fails only its own rows.
To compare a new model family, add one builder here (and install its seed package).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    dim: int
    depth: int
    heads: int
    window: int     # local attention window, for models that have one
    seq_len: int


Builder = Callable[[ModelConfig], nn.Module]
REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        REGISTRY[name] = builder
        return builder
    return add


def resolve_builder(name: str) -> Builder:
    """A registry name, or `package.module:function` for an unregistered builder (e.g. a test's stand-in)."""
    if name in REGISTRY:
        return REGISTRY[name]
    module, _, attr = name.partition(':')
    return getattr(importlib.import_module(module), attr)


def is_known(name: str) -> bool:
    return name in REGISTRY or ':' in name


def _routeformer_lm(cfg: ModelConfig, **kwargs) -> nn.Module:
    from routeformer import TransformerLM
    return TransformerLM(
        num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
        dim_head=cfg.dim // cfg.heads, max_seq_len=cfg.seq_len, causal=True, **kwargs,
    )


@register('routeformer-full')
def routeformer_full(cfg: ModelConfig) -> nn.Module:
    return _routeformer_lm(cfg)


@register('routeformer-local')
def routeformer_local(cfg: ModelConfig) -> nn.Module:
    # every head attends within its local window
    return _routeformer_lm(cfg, n_local_attn_heads=cfg.heads, local_attn_window_size=cfg.window)


@register('x-transformers')
def x_transformers_decoder(cfg: ModelConfig) -> nn.Module:
    # full causal attention through torch SDPA: the reference point
    from x_transformers import Decoder, TransformerWrapper
    return TransformerWrapper(
        num_tokens=cfg.vocab, max_seq_len=cfg.seq_len,
        attn_layers=Decoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, attn_flash=True),
    )
