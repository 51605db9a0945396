"""Model registry for benchmarks/bench.py.

Each entry maps a name to a builder `(BenchShape) -> nn.Module`. The module maps token ids
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
class BenchShape:
    vocab: int
    dim: int
    depth: int
    heads: int
    window: int     # local attention window, for models that have one
    seq_len: int


Builder = Callable[[BenchShape], nn.Module]
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


def _routeformer_lm(cfg: BenchShape, **kwargs) -> nn.Module:
    from routeformer import TransformerLM
    return TransformerLM(
        num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
        dim_head=cfg.dim // cfg.heads, max_seq_len=cfg.seq_len, causal=True, **kwargs,
    )


@register('routeformer-full')
def routeformer_full(cfg: BenchShape) -> nn.Module:
    return _routeformer_lm(cfg)


@register('routeformer-local')
def routeformer_local(cfg: BenchShape) -> nn.Module:
    # every head attends within its local window
    return _routeformer_lm(cfg, n_local_attn_heads=cfg.heads, local_attn_window_size=cfg.window)


@register('routeformer-moba')
def routeformer_moba(cfg: BenchShape) -> nn.Module:
    # each query: its own block and the 3 best blocks of `window` keys
    from routeformer import MoBATransformerLM
    return MoBATransformerLM(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                             dim_head=cfg.dim // cfg.heads, max_seq_len=cfg.seq_len, causal=True,
                             block_size=cfg.window, top_k=3)


@register('routeformer-dsa')
def routeformer_dsa(cfg: BenchShape) -> nn.Module:
    # a lightning indexer of 4 heads of 32 picks 2 * window tokens per query
    from routeformer import DSATransformerLM
    return DSATransformerLM(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                            dim_head=cfg.dim // cfg.heads, max_seq_len=cfg.seq_len, causal=True,
                            index_n_heads=4, index_head_dim=32, index_topk=2 * cfg.window)


@register('routeformer-mosa')
def routeformer_mosa(cfg: BenchShape) -> nn.Module:
    # every head selects 2 * window tokens of the sequence and attends among them
    from routeformer import MoSATransformerLM
    return MoSATransformerLM(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                             dim_head=cfg.dim // cfg.heads, max_seq_len=cfg.seq_len, causal=True,
                             sparsity=max(1, cfg.seq_len // (2 * cfg.window)))


@register('routeformer-nsa')
def routeformer_nsa(cfg: BenchShape) -> nn.Module:
    # as `--family nsa`: blocks of window / 2 compressed every window / 4, the best 4 blocks of
    # window keys, a sliding window of window keys
    from routeformer import NSATransformerLM
    return NSATransformerLM(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                            dim_head=cfg.dim // cfg.heads, max_seq_len=cfg.seq_len,
                            compress_block_size=cfg.window // 2, compress_stride=cfg.window // 4,
                            select_block_size=cfg.window, num_selected_blocks=4, sliding_window_size=cfg.window)


@register('x-transformers')
def x_transformers_decoder(cfg: BenchShape) -> nn.Module:
    # full causal attention through torch SDPA: the reference point
    from x_transformers import Decoder, TransformerWrapper
    return TransformerWrapper(
        num_tokens=cfg.vocab, max_seq_len=cfg.seq_len,
        attn_layers=Decoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, attn_flash=True),
    )


@register('routeformer-sinkhorn')
def routeformer_sinkhorn(cfg: BenchShape) -> nn.Module:
    # causal sinkhorn attention, blocks of `window` tokens, attention sort net, 2 selected blocks
    from routeformer import SinkhornTransformerLM
    return SinkhornTransformerLM(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                 max_seq_len=cfg.seq_len, bucket_size=cfg.window, causal=True)


@register('routeformer-sinkhorn-sortcut')
def routeformer_sinkhorn_sortcut(cfg: BenchShape) -> nn.Module:
    # the seed README's long-sequence recipe: reversible layers, chunked feed-forward and sortcut
    # (every query attends to the first 2 sorted key blocks: linear memory). Sortcut picks key
    # blocks once for the whole sequence, so the model is non-causal (the seed's 204k demonstration)
    from routeformer import SinkhornTransformerLM
    return SinkhornTransformerLM(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                 max_seq_len=cfg.seq_len, bucket_size=cfg.window, causal=False,
                                 reversible=True, ff_chunks=10, n_sortcut=2)


@register('sinkhorn-transformer')
def sinkhorn_transformer_seed(cfg: BenchShape) -> nn.Module:
    # the seed package (sinkhorn-transformer 0.11.4) with the same settings
    from sinkhorn_transformer import SinkhornTransformerLM
    return SinkhornTransformerLM(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                                 max_seq_len=cfg.seq_len, bucket_size=cfg.window, causal=True)


# Routing Transformer, benchmark settings: 2 of the heads local (window `window`), the rest k-means
# routed with clusters of `window` tokens; shared-QK, as both packages default to for causal models
def _routing_kwargs(cfg: BenchShape) -> dict:
    return dict(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, max_seq_len=cfg.seq_len, heads=cfg.heads,
                dim_head=cfg.dim // cfg.heads, window_size=cfg.window, n_local_attn_heads=min(2, cfg.heads),
                local_attn_window_size=cfg.window, causal=True)


@register('routeformer-routing')
def routeformer_routing(cfg: BenchShape) -> nn.Module:
    from routeformer import RoutingTransformerLM
    return RoutingTransformerLM(**_routing_kwargs(cfg))


@register('routeformer-routing-reversible')
def routeformer_routing_reversible(cfg: BenchShape) -> nn.Module:
    # the seed README's long-sequence recipe: reversible layers and chunked feed-forward
    from routeformer import RoutingTransformerLM
    return RoutingTransformerLM(**_routing_kwargs(cfg), reversible=True, ff_chunks=16)


@register('routing-transformer')
def routing_transformer_seed(cfg: BenchShape) -> nn.Module:
    # the seed package (routing-transformer 1.6.1) with the same settings
    from routing_transformer import RoutingTransformerLM
    return RoutingTransformerLM(**_routing_kwargs(cfg))


# CoLT5: the autoregressive attention block of the seed README (light local attention + heavy routed
# attention, 64-dim heads, heavy_window = window, window/4 routed queries per window, 1024 routed
# key/values in 2 routes, flash path). A block, not an LM: both packages' blocks are wrapped the same
# way, token embedding -> `depth` x (block(x) + x) -> linear head.
class _BlockLM(nn.Module):
    def __init__(self, cfg: BenchShape, make_block: Callable[[], nn.Module]):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.head = nn.Linear(cfg.dim, cfg.vocab)

    def forward(self, x):
        h = self.emb(x)
        for block in self.blocks:
            h = block(h) + h
        return self.head(h)


def _colt5_block_kwargs(cfg: BenchShape) -> dict:
    return dict(dim=cfg.dim, light_dim_head=64, light_heads=cfg.heads, light_window_size=cfg.window,
                heavy_window_size=cfg.window, heavy_dim_head=64, heavy_heads=cfg.heads,
                num_heavy_tokens_q=max(1, cfg.window // 4), num_heavy_tokens_kv=1024, num_routed_kv=2,
                use_flash_attn=True)


@register('routeformer-colt5')
def routeformer_colt5(cfg: BenchShape) -> nn.Module:
    from routeformer import ConditionalRoutedAutoregressiveAttention
    return _BlockLM(cfg, lambda: ConditionalRoutedAutoregressiveAttention(**_colt5_block_kwargs(cfg)))


@register('colt5-attention')
def colt5_attention_seed(cfg: BenchShape) -> nn.Module:
    # the seed package (colt5-attention 0.11.2); its Triton kernel only on CUDA (it falls back on CPU anyway)
    import torch
    from colt5_attention import ConditionalRoutedAutoregressiveAttention
    return _BlockLM(cfg, lambda: ConditionalRoutedAutoregressiveAttention(**_colt5_block_kwargs(cfg),
                                                                          use_triton=torch.cuda.is_available()))


# Reformer, benchmark settings: LSH attention in every head, buckets of `window` / 2 tokens (64 beside
# the other families' windows of 128: with look-one-back a query sees two buckets, a window's worth of
# keys), 4 hash rounds, reversible layers and the seed's default chunking (ff_chunks 100, attn_chunks 1)
# in both packages
def _reformer_kwargs(cfg: BenchShape) -> dict:
    return dict(num_tokens=cfg.vocab, dim=cfg.dim, depth=cfg.depth, max_seq_len=cfg.seq_len, heads=cfg.heads,
                dim_head=cfg.dim // cfg.heads, bucket_size=max(1, cfg.window // 2), n_hashes=4, causal=True)


@register('routeformer-reformer')
def routeformer_reformer(cfg: BenchShape) -> nn.Module:
    from routeformer import ReformerLM
    return ReformerLM(**_reformer_kwargs(cfg))


@register('routeformer-reformer-chunked')
def routeformer_reformer_chunked(cfg: BenchShape) -> nn.Module:
    # the seed README's recipe for the longest sequences: attention one head at a time
    from routeformer import ReformerLM
    return ReformerLM(**_reformer_kwargs(cfg), attn_chunks=cfg.heads)


@register('reformer-pytorch')
def reformer_pytorch_seed(cfg: BenchShape) -> nn.Module:
    # the seed package (reformer-pytorch 1.4.4) with the same settings
    from reformer_pytorch import ReformerLM
    return ReformerLM(**_reformer_kwargs(cfg))
