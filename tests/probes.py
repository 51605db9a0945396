"""Shared probes: the tiny model of every causal configuration in the package, the causality check
and token helpers (tests/test_causality.py runs the check on every configuration; the compile,
CUDA, flex, executor and recorder tests reuse the configurations).

Each entry of CAUSAL_CONFIGS is (id, factory); the factory returns (model, context) where
`model(x, context=context)` maps token ids (b, n) to logits or (logits, aux_loss). Every model
family adds its causal configurations here.
"""

import torch

from routeformer import TransformerLM
from routeformer.layers.norms import ReZero

NUM_TOKENS, DIM, SEQ = 32, 16, 16


def tokens(b=2, n=SEQ, seed=1, vocab=NUM_TOKENS):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, n), generator=g)


def transformer_lm(context=False, **kwargs):
    def factory():
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=SEQ, heads=2, dim_head=8, causal=True)
        cfg.update(kwargs)
        model = TransformerLM(**cfg, receives_context=context)
        for m in model.modules():
            if isinstance(m, ReZero):  # ReZero gates start at 0, which would make every layer the identity
                m.g.data.fill_(0.5)
        return model, (torch.randn(2, 5, DIM) if context else None)
    return factory


CAUSAL_CONFIGS = [
    ('full', transformer_lm()),
    ('local_heads', transformer_lm(n_local_attn_heads=1, local_attn_window_size=4)),
    ('all_local', transformer_lm(n_local_attn_heads=2, local_attn_window_size=4)),
    ('all_local_radius2', transformer_lm(n_local_attn_heads=2, local_attn_window_size=2, local_attn_radius_blocks=2)),
    ('per_layer_local_heads', transformer_lm(n_local_attn_heads=(2, 0), local_attn_window_size=4)),
    ('shared_qk', transformer_lm(shared_qk=True)),
    ('shared_qk_local', transformer_lm(shared_qk=True, n_local_attn_heads=1, local_attn_window_size=4)),
    ('num_mem_kv', transformer_lm(num_mem_kv=3)),
    ('mem_kv_local', transformer_lm(num_mem_kv=2, n_local_attn_heads=2, local_attn_window_size=4)),
    ('reversible', transformer_lm(reversible=True)),
    ('reversible_local_memkv', transformer_lm(reversible=True, n_local_attn_heads=1, local_attn_window_size=4, num_mem_kv=1)),
    ('shift_tokens', transformer_lm(shift_tokens=True)),
    ('pkm', transformer_lm(pkm_layers=(1,), pkm_num_keys=32)),
    ('moe', transformer_lm(moe_layers=(2,))),
    ('weight_tie', transformer_lm(weight_tie=True, depth=3)),
    ('rezero', transformer_lm(use_rezero=True)),
    ('scale_norm', transformer_lm(use_scale_norm=True)),
    ('rms_norm', transformer_lm(use_rms_norm=True)),
    ('ff_glu_chunks', transformer_lm(ff_glu=True, ff_chunks=4)),
    ('emb_dim_tied', transformer_lm(emb_dim=8, tie_embedding=True)),
    ('pos_absolute', transformer_lm(pos_emb='absolute')),
    ('pos_fixed', transformer_lm(pos_emb='fixed')),
    ('pos_axial', transformer_lm(pos_emb='axial', axial_position_shape=(4, 4))),
    ('pos_none', transformer_lm(pos_emb=None)),
    ('context', transformer_lm(context=True)),
    ('context_reversible_local', transformer_lm(context=True, reversible=True, n_local_attn_heads=1,
                                                local_attn_window_size=4)),
]


def routing_lm(context=False, **kwargs):
    """A RoutingTransformerLM whose centroids were initialised from data and updated once, so
    that clusters are content-dependent in the eval-mode check."""
    def factory():
        from routeformer import RoutingTransformerLM
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=SEQ, heads=2, dim_head=8, causal=True,
                   window_size=4)
        cfg.update(kwargs)
        model = RoutingTransformerLM(**cfg, receives_context=context)
        ctx = torch.randn(2, 5, DIM) if context else None
        logits, aux = model(tokens(seed=7), context=ctx)
        (logits.mean() + aux).backward()  # k-means init + automatic EMA update
        return model, ctx
    return factory


CAUSAL_CONFIGS += [
    ('routing', routing_lm()),
    ('routing_separate_qk', routing_lm(shared_qk=False)),
    ('routing_local_heads', routing_lm(n_local_attn_heads=1, local_attn_window_size=4)),
    ('routing_mem_kv_separate_qk', routing_lm(num_mem_kv=2, shared_qk=False)),
    ('routing_reversible_local_memkv', routing_lm(reversible=True, n_local_attn_heads=1, local_attn_window_size=4,
                                                  num_mem_kv=1, shift_tokens=True)),
    ('routing_context', routing_lm(context=True, context_window_size=2)),
    ('routing_context_reversible_shared', routing_lm(context=True, reversible=True, context_shared_qk=True)),
    ('routing_relative_positions', routing_lm(max_relative_position=5, rel_pos_emb=False,
                                              n_local_attn_heads=(2, 1), local_attn_window_size=4)),
    ('routing_window_not_dividing_length', routing_lm(window_size=3, num_clusters=3)),
    ('full_relative_positions', transformer_lm(max_relative_position=5)),
]


def colt5_lm(**kwargs):
    """A decoder-only CoLT5 LM: windows of 4 over 32 tokens, so that routing (a few heavy queries per
    window, keys routed from earlier windows, a routed feed-forward) really selects."""
    def factory():
        from routeformer import ConditionalRoutedTransformerLM
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=32, num_heavy_attn_tokens_q=2,
                   num_heavy_attn_tokens_kv=6, num_heavy_ff_tokens=2, light_dim_head=8, light_heads=2,
                   light_window_size=4, heavy_dim_head=8, heavy_heads=2)
        cfg.update(kwargs)
        return ConditionalRoutedTransformerLM(**cfg), None
    return factory


CAUSAL_CONFIGS += [
    ('colt5', colt5_lm()),
    ('colt5_token_shift', colt5_lm(shift_tokens=True)),
    ('colt5_routes2_keys_queries_scaled', colt5_lm(num_routed_kv=2, multiply_keys_by_score=True,
                                                   multiply_queries_by_score=True)),
    ('colt5_heavy_window8_soft_gates', colt5_lm(heavy_window_size=8, router_straight_through=False,
                                                pos_emb='absolute')),
    ('colt5_sdpa_no_null_tokens', colt5_lm(use_flash_attn=True, use_null_q_tokens=False, pos_emb=None)),
]



class WithInputMask(torch.nn.Module):
    """Runs a token model with a fixed padding mask: left padding in sample 0, holes in sample 1."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.num_tokens, self.max_seq_len = model, model.num_tokens, model.max_seq_len
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[0, :5] = False
        mask[1, 9:15] = False
        self.register_buffer('mask', mask, persistent=False)  # moves with the model

    def forward(self, x, **kwargs):
        return self.model(x, input_mask=self.mask, **kwargs)


def sinkhorn_lm(context=False, padded=False, **kwargs):
    """A causal SinkhornTransformerLM over 32 tokens in blocks of 4."""
    def factory():
        from routeformer import SinkhornTransformerLM
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=32, heads=2, dim_head=8, causal=True,
                   bucket_size=4)
        cfg.update(kwargs)
        model = SinkhornTransformerLM(**cfg, receives_context=context)
        return (WithInputMask(model, 32) if padded else model), (torch.randn(2, 9, DIM) if context else None)
    return factory


CAUSAL_CONFIGS += [
    ('sinkhorn_top1', sinkhorn_lm(n_top_buckets=1)),
    ('sinkhorn_top2', sinkhorn_lm(n_top_buckets=2)),
    ('sinkhorn_top3', sinkhorn_lm(n_top_buckets=3)),
    ('sinkhorn_simple_sort_net', sinkhorn_lm(use_simple_sort_net=True, n_top_buckets=2)),
    ('sinkhorn_padded_top1', sinkhorn_lm(padded=True, n_top_buckets=1)),
    ('sinkhorn_padded_top3_simple', sinkhorn_lm(padded=True, n_top_buckets=3, use_simple_sort_net=True)),
    ('sinkhorn_local_heads', sinkhorn_lm(n_local_attn_heads=1)),
    ('sinkhorn_reversible_rotary', sinkhorn_lm(reversible=True, pos_emb='rotary', non_permutative=False)),
    ('sinkhorn_context', sinkhorn_lm(context=True, context_bucket_size=2)),
    ('sinkhorn_context_sortcut_padded', sinkhorn_lm(context=True, padded=True, context_n_sortcut=2)),
]


def reformer_lm(context=False, padded=False, **kwargs):
    """A causal ReformerLM over 32 tokens hashed into 8 buckets of 4 (eval mode: fixed rotations)."""
    def factory():
        from routeformer import ReformerLM
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=32, heads=2, dim_head=8, causal=True,
                   bucket_size=4, n_hashes=2)
        cfg.update(kwargs)
        model = ReformerLM(**cfg)
        return (WithInputMask(model, 32) if padded else model), (torch.randn(2, 9, DIM) if context else None)
    return factory


CAUSAL_CONFIGS += [
    ('reformer_1hash', reformer_lm(n_hashes=1)),
    ('reformer_2hashes', reformer_lm(n_hashes=2)),
    ('reformer_4hashes', reformer_lm(n_hashes=4)),
    ('reformer_local_heads', reformer_lm(n_local_attn_heads=1)),
    ('reformer_local_heads_own_qkv_mem_kv', reformer_lm(n_local_attn_heads=1, local_qkv=True, num_mem_kv=2)),
    ('reformer_mem_kv', reformer_lm(num_mem_kv=3)),
    ('reformer_not_reversible', reformer_lm(reversible=False)),
    ('reformer_attn_chunks', reformer_lm(attn_chunks=3, n_hashes=4)),
    ('reformer_no_duplicates_twin', reformer_lm(lsh_allow_duplicate_attention=False, twin_attention=True)),
    ('reformer_one_rotation_per_head', reformer_lm(rehash_each_round=False, random_rotations_per_head=True,
                                                   n_hashes=3)),
    ('reformer_full_attn_thres', reformer_lm(full_attn_thres=32)),
    ('reformer_use_full_attn_axial', reformer_lm(use_full_attn=True, axial_position_emb=True)),
    ('reformer_padded', reformer_lm(padded=True, num_mem_kv=1)),
    ('reformer_keys', reformer_lm(context=True)),
    ('reformer_own_cross_attention', reformer_lm(context=True, receives_context=True, n_local_attn_heads=1)),
]


def selection_lm(cls_name, **kwargs):
    """Today's block and token selectors on TransformerLM: MoBA (blocks of 4, top 2) and DSA (a
    lightning indexer picking 5 tokens). Trained once, so that the DSA indexer's scores are not
    those of its initialisation only."""
    def factory():
        import routeformer
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=SEQ, heads=2, dim_head=8, causal=True)
        cfg.update(dict(block_size=4, top_k=2) if cls_name == 'MoBATransformerLM' else
                   dict(index_n_heads=2, index_head_dim=4, index_topk=5))
        cfg.update(kwargs)
        model = getattr(routeformer, cls_name)(**cfg)
        logits, aux = model(tokens(seed=7))
        (logits.mean() + aux).backward()
        return model, None
    return factory


CAUSAL_CONFIGS += [
    (f'{name}{suffix}', selection_lm(cls, **kwargs))
    for name, cls in (('moba', 'MoBATransformerLM'), ('dsa', 'DSATransformerLM'))
    for suffix, kwargs in (('', {}),
                           ('_local_heads', dict(n_local_attn_heads=1, local_attn_window_size=4)),
                           ('_mem_kv_shift', dict(num_mem_kv=2, shift_tokens=True)),
                           ('_reversible', dict(reversible=True)),
                           ('_shared_qk', dict(shared_qk=True)),
                           ('_absolute_positions', dict(pos_emb='absolute')))
] + [('dsa_dense_warmup', selection_lm('DSATransformerLM', dense_warmup_steps=5))]


def mosa_lm(**kwargs):
    """A causal MoSATransformerLM after one training step, so that its thresholds come from data
    (about a quarter of the tokens pass) when it is checked in eval mode."""
    def factory():
        from routeformer import MoSATransformerLM
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=32, heads=2, dim_head=8, causal=True,
                   sparsity=4, local_attn_window_size=4)
        cfg.update(kwargs)
        model = MoSATransformerLM(**cfg)
        logits, aux = model(tokens(n=32, seed=7))
        (logits.mean() + aux).backward()
        return model, None
    return factory


CAUSAL_CONFIGS += [
    ('mosa', mosa_lm()),
    ('mosa_capacity_overflow', mosa_lm(capacity_factor=1, sparsity=8)),
    ('mosa_include_first_shift', mosa_lm(include_first=True, shift_tokens=True)),
    ('mosa_local_heads', mosa_lm(heads=3, n_local_attn_heads=1)),
    ('mosa_dense_heads_memkv', mosa_lm(heads=3, num_dense_heads=1, num_mem_kv=2)),
    ('mosa_reversible_local_memkv', mosa_lm(heads=3, reversible=True, n_local_attn_heads=1, num_mem_kv=1)),
    ('mosa_weight_tie_shared_qk', mosa_lm(weight_tie=True, shared_qk=True)),
    ('mosa_threshold_and_value_gates', mosa_lm(threshold_gate=True, value_gate=True)),
]


def nsa_lm(**kwargs):
    """An NSATransformerLM over 32 tokens: 8 selection blocks of 4, of which a query takes 3."""
    def factory():
        from routeformer import NSATransformerLM
        torch.manual_seed(0)
        cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=32, heads=2, dim_head=8,
                   compress_block_size=4, compress_stride=2, select_block_size=4, num_selected_blocks=3,
                   sliding_window_size=3)
        cfg.update(kwargs)
        return NSATransformerLM(**cfg), None
    return factory


CAUSAL_CONFIGS += [
    ('nsa', nsa_lm()),
    ('nsa_local_heads', nsa_lm(n_local_attn_heads=1, local_attn_window_size=4)),
    ('nsa_mem_kv_blocks_not_dividing', nsa_lm(num_mem_kv=2, compress_block_size=5, compress_stride=3)),
    ('nsa_reversible_local_memkv_shift', nsa_lm(reversible=True, n_local_attn_heads=1, local_attn_window_size=4,
                                                num_mem_kv=1, shift_tokens=True)),
    ('nsa_absolute_shared_qk', nsa_lm(pos_emb='absolute', shared_qk=True)),
]


def logits_of(out):
    return out[0] if isinstance(out, tuple) else out


def assert_causal(model, *, x, context=None, positions=None, vocab=NUM_TOKENS):
    """Changing the token at p leaves every output before p exactly as it was, and changes the output at p."""
    model.eval()
    n = x.shape[1]
    positions = positions or (0, n // 3, n // 2, n - 1)
    kwargs = dict(context=context) if context is not None else {}
    with torch.no_grad():
        base = logits_of(model(x, **kwargs))
        for p in positions:
            changed = x.clone()
            changed[:, p] = (changed[:, p] + 1 + torch.arange(x.shape[0], device=x.device)) % vocab
            out = logits_of(model(changed, **kwargs))
            assert torch.allclose(out[:, :p], base[:, :p], atol=1e-6, rtol=0), \
                f'position {p} leaks into earlier outputs: max diff {(out[:, :p] - base[:, :p]).abs().max():.3g}'
            assert (out[:, p] - base[:, p]).abs().max() > 1e-4, f'the output at {p} ignores its own token'


def non_causal_configs():
    """Encoder configurations of the routed families (causal=False)."""
    return [('routing_non_causal', routing_lm(causal=False, n_local_attn_heads=1, local_attn_window_size=4)),
            ('sinkhorn_non_causal_sortcut', sinkhorn_lm(causal=False, n_sortcut=2)),
            ('reformer_non_causal', reformer_lm(causal=False, n_hashes=3))]
