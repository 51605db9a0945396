"""The original Routing Transformer's hyper-parameters (google-research/routing_transformer,
`sparse_transformer.py`) and their translation into `RoutingTransformerLM` keyword arguments.

    model = RoutingTransformerLM.from_preset('enwik8_local_cluster8k')             # the paper's size
    model = RoutingTransformerLM.from_preset('pg19_local_cluster8k', shrink=True,  # same structure,
                                             num_tokens=256)                         # CPU-sized

Translation (paper hparam -> keyword argument):
- `local_num_heads` + `sparsity_cluster_num_heads` -> `heads`; the first `local_num_heads` heads
  of a layer are local (`n_local_attn_heads`), and every head of the first `sparsity_skip_first`
  layers is local (no clustering there);
- `query_shape` / `memory_flange` -> local windows of `query_shape` queries that see
  `memory_flange` tokens before them (`local_attn_window_size`, `local_attn_radius_blocks =
  memory_flange / query_shape`: the same plan as `LocalRouter.from_query_shape`);
- `sparsity_cluster_size` -> `num_clusters`; `sparsity_cluster_attention_window` -> `window_size`;
- `share_qk` -> `shared_qk`; `max_relative_position` -> relative position logits in every head
  (the paper's only positional signal: `add_timing_signal` is off, so no rotary);
- `hidden_size`, `embedding_dims`, `filter_size` (GeGLU) -> `dim`, `emb_dim`, `ff_mult` with
  `ff_glu`; `attention_dropout`, `relu_dropout`, `dropout` -> `attn_dropout`, `ff_dropout`,
  `attn_layer_dropout`; `beta`, `decay` -> `commitment_factor`, `kmeans_ema_decay`;
  `shared_embedding_and_softmax_weights` -> `tie_embedding`.
Not translated: `input_dropout`/`target_dropout` (token dropout), optimizer and decoding settings.
"""

from __future__ import annotations

# every model is a decoder-only language model (num_encoder_layers = 0)
BASE = dict(hidden_size=512, embedding_dims=512, filter_size=2048, num_decoder_layers=24, local_num_heads=8,
            sparsity_cluster_num_heads=0, sparsity_cluster_size=0, sparsity_cluster_attention_window=0,
            sparsity_skip_first=0, query_shape=512, memory_flange=512, max_length=4096, max_relative_position=1024,
            share_qk=True, attention_dropout=0., relu_dropout=0., dropout=0., beta=1e-4, decay=0.999,
            shared_embedding_and_softmax_weights=True, vocab_size=None)

ENWIK8_LOCAL8K = dict(BASE, max_length=8192, hidden_size=1024, embedding_dims=1024, num_decoder_layers=22,
                      local_num_heads=8, filter_size=3072, query_shape=256, memory_flange=256,
                      max_relative_position=513, attention_dropout=0.4, relu_dropout=0.4, vocab_size=256)
WIKITEXT103_LOCAL4K = dict(BASE, max_length=4096, hidden_size=1024, embedding_dims=256, filter_size=3072,
                           local_num_heads=16, num_decoder_layers=14, query_shape=256, memory_flange=256,
                           attention_dropout=0.4, relu_dropout=0.4, dropout=0.4, max_relative_position=513,
                           vocab_size=267735)
PG19_LOCAL_CLUSTER8K = dict(WIKITEXT103_LOCAL4K, max_length=8192, hidden_size=1032, embedding_dims=1032,
                            filter_size=4096, local_num_heads=6, sparsity_cluster_num_heads=2, num_decoder_layers=22,
                            sparsity_skip_first=21, sparsity_cluster_size=16, query_shape=256, memory_flange=256,
                            attention_dropout=0., relu_dropout=0., dropout=0., sparsity_cluster_attention_window=512,
                            max_relative_position=513, vocab_size=None)

PRESETS = {
    'enwik8_local8k': ENWIK8_LOCAL8K,
    'enwik8_local_cluster8k': dict(ENWIK8_LOCAL8K, sparsity_cluster_size=16, local_num_heads=4,
                                   sparsity_cluster_num_heads=4, sparsity_cluster_attention_window=512,
                                   num_decoder_layers=12, attention_dropout=0., relu_dropout=0.),
    'wikitext103_local4k': WIKITEXT103_LOCAL4K,
    'wikitext103_local_cluster4k': dict(WIKITEXT103_LOCAL4K, local_num_heads=8, sparsity_cluster_num_heads=8,
                                        sparsity_cluster_attention_window=512, sparsity_cluster_size=8, share_qk=True),
    'pg19_local_cluster8k': PG19_LOCAL_CLUSTER8K,
    'pg19_local8k': dict(PG19_LOCAL_CLUSTER8K, local_num_heads=8, sparsity_cluster_num_heads=0, num_decoder_layers=24),
}


def shrunk(hp: dict) -> dict:
    """The same structure (head split, local-only first layers, local block vs cluster window vs
    relative range, GLU width ratio, embedding factorisation, sharing) at a size a CPU trains in
    seconds: dim_head 8, at most 3 layers, 128 tokens."""
    hp = dict(hp)
    heads = hp['local_num_heads'] + hp['sparsity_cluster_num_heads']
    depth = min(hp['num_decoder_layers'], 3)
    skip = hp['sparsity_skip_first']
    if skip:  # keep some local-only layers and at least one clustered layer
        skip = max(1, round(skip * depth / hp['num_decoder_layers'])) if hp['sparsity_cluster_num_heads'] else 0
        skip = min(skip, depth - 1)
    dim = heads * 8
    hp.update(hidden_size=dim, embedding_dims=max(8, dim * hp['embedding_dims'] // hp['hidden_size']),
              filter_size=dim * hp['filter_size'] // hp['hidden_size'], num_decoder_layers=depth,
              sparsity_skip_first=skip, max_length=128, query_shape=16, memory_flange=16,
              max_relative_position=33)
    if hp['sparsity_cluster_num_heads']:
        hp.update(sparsity_cluster_attention_window=32, sparsity_cluster_size=4)
    if hp['vocab_size'] is not None:
        hp['vocab_size'] = min(hp['vocab_size'], 256)
    return hp


def paper_hparams_to_kwargs(hp: dict) -> dict:
    """Paper hyper-parameters -> RoutingTransformerLM keyword arguments (module docstring)."""
    local, clustered = hp['local_num_heads'], hp['sparsity_cluster_num_heads']
    heads, depth = local + clustered, hp['num_decoder_layers']
    if hp['memory_flange'] % hp['query_shape'] != 0:
        raise ValueError(f"memory_flange ({hp['memory_flange']}) must be a multiple of query_shape "
                         f"({hp['query_shape']}): local windows look back whole blocks")
    if clustered and not (hp['sparsity_cluster_size'] and hp['sparsity_cluster_attention_window']):
        raise ValueError('clustered heads need sparsity_cluster_size and sparsity_cluster_attention_window')
    skip = hp['sparsity_skip_first'] if clustered else depth
    dim = hp['hidden_size']
    return dict(
        num_tokens=hp['vocab_size'], dim=dim, depth=depth, max_seq_len=hp['max_length'], heads=heads,
        dim_head=dim // heads, emb_dim=hp['embedding_dims'], tie_embedding=hp['shared_embedding_and_softmax_weights'],
        ff_glu=True, ff_mult=hp['filter_size'] / dim, causal=True, shared_qk=hp['share_qk'],
        n_local_attn_heads=tuple(heads if layer < skip else local for layer in range(depth)),
        local_attn_window_size=hp['query_shape'], local_attn_radius_blocks=hp['memory_flange'] // hp['query_shape'],
        window_size=hp['sparsity_cluster_attention_window'] or hp['query_shape'],
        num_clusters=hp['sparsity_cluster_size'] or 1, max_relative_position=hp['max_relative_position'],
        rel_pos_emb=False, attn_dropout=hp['attention_dropout'], ff_dropout=hp['relu_dropout'],
        attn_layer_dropout=hp['dropout'], commitment_factor=hp['beta'], kmeans_ema_decay=hp['decay'])


def preset_kwargs(name: str, *, shrink: bool = False, **overrides) -> dict:
    """RoutingTransformerLM keyword arguments of a named paper model; `overrides` win. PG-19's
    vocabulary is the tokenizer's: pass `num_tokens`."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; choose one of {", ".join(sorted(PRESETS))}')
    hp = shrunk(PRESETS[name]) if shrink else PRESETS[name]
    kwargs = {**paper_hparams_to_kwargs(hp), **overrides}
    if kwargs['num_tokens'] is None:
        raise ValueError(f'preset {name!r} has no fixed vocabulary: pass num_tokens=<your tokenizer\'s size>')
    return kwargs
