"""Model registry of the command line: family name -> how the flat size flags become that
family's model class. A family plugs in with one `register` call; its class is looked up in
`routeformer` when a model is built, so a family that is not in this installation fails only
when it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .config import ModelConfig
from .errors import CLIError


@dataclass(frozen=True)
class Family:
    name: str
    class_name: str                           # an attribute of `routeformer`
    description: str
    kwargs: Callable[[ModelConfig], dict]     # the class's keyword arguments from the size flags
    takes_local_heads: bool = True            # whether --local-heads means something here
    # DistributedDataParallel must look for parameters a step leaves unused (costs a graph walk)
    ddp_find_unused: bool = False


FAMILIES: dict[str, Family] = {}


def register(name: str, class_name: str, description: str, kwargs: Callable[[ModelConfig], dict], *,
             takes_local_heads: bool = True, ddp_find_unused: bool = False) -> None:
    FAMILIES[name] = Family(name, class_name, description, kwargs, takes_local_heads, ddp_find_unused)


def head_dim(cfg: ModelConfig) -> int:
    return cfg.dim_head if cfg.dim_head is not None else cfg.dim // cfg.heads


def common(cfg: ModelConfig, **extra) -> dict:
    """The keywords every skeleton-built causal LM takes."""
    return dict(num_tokens=cfg.num_tokens, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=head_dim(cfg),
                max_seq_len=cfg.seq_len, causal=True, **extra)


def local_heads(cfg: ModelConfig, default: int = 0) -> dict:
    """Local heads beside the family's own: --local-heads, else `default` (the family's
    recommendation; 0 puts every head on the main router)."""
    n = cfg.local_heads if cfg.local_heads is not None else default
    return dict(n_local_attn_heads=n, local_attn_window_size=cfg.window) if n else {}


register('full', 'TransformerLM', 'full causal attention in every head (the quality reference)',
         lambda c: common(c, **local_heads(c)))
register('local', 'TransformerLM', 'local attention in every head: window --window, one window of look-back',
         lambda c: common(c, n_local_attn_heads=c.heads, local_attn_window_size=c.window), takes_local_heads=False)
# Recommended settings where the seed's defaults learn text slowly (benchmarks/real_text.py and
# benchmarks/README.md, "Real text"): half the heads local beside the k-means heads (every head
# routed learns byte-level text 0.4 bits/byte worse than local attention at 300 steps: a routed
# head sees nothing of its neighbourhood outside its cluster), and rotary positions for Sinkhorn
# (its axial embedding, added to the input, cost 0.28 bits/byte against rotary ones).
register('routing', 'RoutingTransformerLM', 'Routing Transformer: online k-means clusters of --window tokens, '
         'half the heads local (--local-heads)',
         lambda c: common(c, window_size=c.window, **local_heads(c, default=c.heads // 2)))
# Reformer: LSH needs shared QK, which costs full attention itself 0.39 bits/byte on text at 300
# steps (the query may not attend to its own key); half the heads local, with a q/k/v projection
# of their own, recovers most of it
def reformer_local_heads(c: ModelConfig) -> dict:
    n = c.local_heads if c.local_heads is not None else c.heads // 2
    return dict(n_local_attn_heads=n, local_qkv=True) if n else {}


register('reformer', 'ReformerLM', 'Reformer: LSH buckets of --window tokens, half the heads local with their own '
         'q/k/v (--local-heads)', lambda c: common(c, bucket_size=c.window, **reformer_local_heads(c)))
register('sinkhorn', 'SinkhornTransformerLM', 'Sinkhorn Transformer: learned sorting of --window-token buckets, '
         'rotary positions',
         lambda c: common(c, bucket_size=c.window, pos_emb='rotary', **local_heads(c)))
# CoLT5: every head in both branches; per window of --window tokens, half the queries and half the
# feed-forward tokens are heavy, and heavy queries see a quarter of the sequence's tokens
register('colt5', 'ConditionalRoutedTransformerLM',
         'CoLT5: light local attention (window --window) plus routed heavy queries and key/values',
         lambda c: dict(num_tokens=c.num_tokens, dim=c.dim, depth=c.depth, max_seq_len=c.seq_len,
                        light_window_size=c.window, light_heads=c.heads, light_dim_head=head_dim(c),
                        heavy_heads=c.heads, heavy_dim_head=head_dim(c), num_heavy_attn_tokens_q=max(1, c.window // 2),
                        num_heavy_attn_tokens_kv=max(1, c.seq_len // 4), num_heavy_ff_tokens=max(1, c.window // 2)),
         takes_local_heads=False)
# today's selectors; each query attends about as many keys as a local window with look-back and more
# MoBA: half the heads local, as for MoSA: byte-level text at 200 steps, 2 local + 2 MoBA heads
# against 4 MoBA heads: 2.991 against 3.005 bits/byte at 1,024 tokens, 3.245 against 3.378 at 4,096
register('moba', 'MoBATransformerLM',
         'MoBA: each query attends its own block and the 3 blocks of --window tokens whose mean key it scores '
         'best, half the heads local (--local-heads)',
         lambda c: common(c, block_size=c.window, top_k=3, **local_heads(c, default=c.heads // 2)))
register('dsa', 'DSATransformerLM',
         'DSA: a lightning indexer (4 heads of 32) picks 2 x --window earlier tokens for each query',
         lambda c: common(c, index_n_heads=4, index_head_dim=32, index_topk=2 * c.window, **local_heads(c)))
# NSA: selection blocks of --window tokens (the query's own, the first and the two best), compressed
# blocks of half a window every quarter window, and a sliding window of --window tokens
register('nsa', 'NSATransformerLM',
         'Native Sparse Attention: compressed blocks, the best --window-token blocks and a --window sliding window',
         lambda c: common(c, compress_block_size=max(1, c.window // 2), compress_stride=max(1, c.window // 4),
                          select_block_size=c.window, num_selected_blocks=4, sliding_window_size=c.window,
                          **local_heads(c)))

# MoSA: each head takes --window tokens of the sequence (sparsity seq_len / window), beside half
# the heads local (the paper's local hybrid): with every head a MoSA head, byte-level text is
# learned 0.55 bits/byte worse than local attention at 300 steps, as k-means routing is
register('mosa', 'MoSATransformerLM', 'MoSA: the routed heads attend among the --window tokens their router '
         'selects, half the heads local (--local-heads)',
         lambda c: common(c, sparsity=max(1, c.seq_len / c.window), **local_heads(c, default=c.heads // 2)))

def family_class(name: str) -> type[nn.Module]:
    import routeformer
    if name not in FAMILIES:
        raise CLIError(f'unknown family {name!r}; choose one of {", ".join(FAMILIES)}')
    cls = getattr(routeformer, FAMILIES[name].class_name, None)
    if cls is None:
        raise CLIError(f'family {name!r} is not available in this routeformer ({FAMILIES[name].class_name} is '
                       f'missing); available: {", ".join(available_families())}')
    return cls


def available_families() -> list[str]:
    import routeformer
    return [n for n, f in FAMILIES.items() if hasattr(routeformer, f.class_name)]


def build_model(cfg: ModelConfig) -> nn.Module:
    """A causal token model `(b, n) -> (logits, aux_loss)` with max_seq_len = cfg.seq_len. The
    model's own ValueError/TypeError (a bad size, an unknown --model-arg) becomes a CLIError."""
    cls = family_class(cfg.family)
    family = FAMILIES[cfg.family]
    if cfg.local_heads is not None and not family.takes_local_heads:
        raise CLIError(f'--local-heads does not apply to the {cfg.family} family ({family.description}): drop it')
    kwargs = {**family.kwargs(cfg), **cfg.kwargs}
    try:
        model = cls(**kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise CLIError(f'cannot build the {cfg.family} model ({cls.__name__}) from these settings: {e}') from None
    multiple = getattr(model, 'multiple_of', 1)
    if cfg.seq_len % multiple:
        fits = (cfg.seq_len // multiple + 1) * multiple
        raise CLIError(f'--seq-len {cfg.seq_len} is not a multiple of {multiple}, which the {cfg.family} model needs '
                       f'(its window or bucket size): use --seq-len {fits}, or change --window')
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once
