"""Seed checkpoints load into our models and give the same outputs (float32, eval, to 1e-5) where
both compute the same function; the seed README configurations build models with as many
parameters as the seeds' (or a documented, asserted difference)."""

import warnings

import pytest
import torch

import routeformer as R
from routeformer.cli.checkpoint import read_weights
from routeformer.compat import convert_seed_state_dict, from_seed_state_dict, load_seed_state_dict, save_converted

RT = pytest.importorskip('routing_transformer')
RF = pytest.importorskip('reformer_pytorch')
SK = pytest.importorskip('sinkhorn_transformer')
C5 = pytest.importorskip('colt5_attention')

TOL = dict(atol=1e-5, rtol=1e-4)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def build(cls, kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return cls(**kwargs)


def seed_checkpoint(seed_model, tmp_path):
    path = tmp_path / 'seed.pt'
    torch.save(seed_model.state_dict(), path)
    return path


def tokens(n, vocab=64, b=2, seed=1):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def features(n, dim, b=2, seed=1):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed))


def first(out):
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- same keywords, same outputs

# (name, seed class, our class, keyword arguments, input): configurations where the seed computes
# what we compute (see the docstring of routeformer.compat.seed_weights for the others)
LM = dict(num_tokens=64, dim=32, heads=4, dim_head=8)
EQUAL_OUTPUT = [
    # causal local heads (the seed LM's routed heads rotate their values: not compared there),
    # with the options that shape the parameters: factorised embedding, GLU, PKM, token shift,
    # reversible, tied layers
    ('routing_lm_local', RT.RoutingTransformerLM, R.RoutingTransformerLM,
     dict(**LM, depth=2, max_seq_len=32, window_size=8, n_local_attn_heads=4, causal=True, emb_dim=16, ff_glu=True,
          pkm_layers=(2,), pkm_num_keys=32, shift_tokens=True, reversible=True), tokens(32)),
    ('routing_lm_tied', RT.RoutingTransformerLM, R.RoutingTransformerLM,
     dict(**LM, depth=3, max_seq_len=16, window_size=8, n_local_attn_heads=4, causal=True, weight_tie=True,
          tie_embedding=True), tokens(16)),
    # routed heads: every token in the one cluster (max_seq_len == window_size), where the seed
    # neither leaks nor drops tokens
    ('routing_trunk', RT.RoutingTransformer, R.RoutingTransformer,
     dict(dim=32, heads=4, depth=2, max_seq_len=16, window_size=16, rel_pos_emb=False), features(16, 32)),
    ('routing_trunk_causal_shared_qk', RT.RoutingTransformer, R.RoutingTransformer,
     dict(dim=32, heads=4, depth=2, max_seq_len=16, window_size=16, rel_pos_emb=False, causal=True, reversible=True),
     features(16, 32)),
    # one hash round of two LSH chunks that see each other: full attention, whatever the rotations
    # (rotary positions included)
    ('reformer_lm', RF.ReformerLM, R.ReformerLM,
     dict(**LM, depth=2, max_seq_len=16, bucket_size=8, n_hashes=1, emb_dim=16, ff_chunks=2), tokens(16)),
    ('lsh_self_attention', RF.LSHSelfAttention, R.LSHSelfAttention,
     dict(dim=32, heads=4, bucket_size=8, n_hashes=1), features(16, 32)),
    # causal: below full_attn_thres, where the seed's chunks cannot leak (its full attention drops
    # rotary positions, so absolute ones), with memory key/values
    ('reformer_lm_full_attn_causal', RF.ReformerLM, R.ReformerLM,
     dict(**LM, depth=2, max_seq_len=32, bucket_size=8, causal=True, full_attn_thres=32, absolute_position_emb=True,
          num_mem_kv=2, ff_glu=True), tokens(30)),
    # Sinkhorn: local heads (with the axial positions), and sortcut over one bucket (the seed's
    # default path uses keys as values)
    ('sinkhorn_lm_local', SK.SinkhornTransformerLM, R.SinkhornTransformerLM,
     dict(**LM, depth=2, max_seq_len=32, bucket_size=8, n_local_attn_heads=4, reversible=True, weight_tie=True,
          pkm_layers=(2,), pkm_num_keys=32), tokens(32)),
    ('sinkhorn_lm_sortcut', SK.SinkhornTransformerLM, R.SinkhornTransformerLM,
     dict(**LM, depth=2, max_seq_len=32, bucket_size=32, n_sortcut=1, emb_dim=16, ff_glu=True), tokens(32)),
    # CoLT5: fetch_k_ratio 1, so both keep the k best tokens; a light window that covers the
    # sequence (the seed's window is exact, ours blockwise)
    ('colt5_feedforward', C5.ConditionalRoutedFeedForward, R.ConditionalRoutedFeedForward,
     dict(dim=32, num_heavy_tokens=10, router_kwargs=dict(fetch_k_ratio=1.)), features(40, 32, b=1)),
    ('colt5_attention', C5.ConditionalRoutedAttention, R.ConditionalRoutedAttention,
     dict(dim=32, num_heavy_tokens_q=6, num_heavy_tokens_kv=10, light_window_size=32, light_heads=2,
          light_dim_head=8, heavy_heads=2, heavy_dim_head=8, router_kwargs=dict(fetch_k_ratio=1.)),
     features(16, 32, b=1)),
    ('colt5_block', C5.ConditionalRoutedTransformerBlock, R.ConditionalRoutedTransformerBlock,
     dict(dim=32, num_heavy_attn_tokens_q=6, num_heavy_attn_tokens_kv=10, num_heavy_ff_tokens=8,
          light_window_size=32, light_heads=2, light_dim_head=8, heavy_heads=2, heavy_dim_head=8,
          router_kwargs=dict(fetch_k_ratio=1.)), features(16, 32, b=1)),
]


@pytest.mark.parametrize('name,seed_cls,ours_cls,kwargs,x', EQUAL_OUTPUT, ids=[c[0] for c in EQUAL_OUTPUT])
def test_seed_checkpoint_loads_and_gives_the_same_outputs(name, seed_cls, ours_cls, kwargs, x, tmp_path):
    seed = build(seed_cls, kwargs).eval()
    for m in seed.modules():  # centroids as a trained model has them (the seed inits from data otherwise)
        if type(m).__name__ == 'Kmeans':
            m.initted.fill_(True)
    ours = from_seed_state_dict(ours_cls, seed_checkpoint(seed, tmp_path), **kwargs).eval()
    with torch.no_grad():
        expected, got = first(seed(x)), first(ours(x))
    torch.testing.assert_close(got, expected, **TOL)


def test_a_routing_encoder_decoder_checkpoint_loads():
    """Both LMs load; the decoders agree given the same encoder output (their self-attention
    local, cross-attention routed over one cluster: where the seed is right)."""
    kwargs = dict(dim=32, enc_num_tokens=64, enc_depth=1, enc_heads=4, enc_dim_head=8, enc_max_seq_len=16,
                  enc_window_size=16, dec_num_tokens=64, dec_depth=2, dec_heads=4, dec_dim_head=8, dec_max_seq_len=16,
                  dec_window_size=16, dec_n_local_attn_heads=4)
    seed = build(RT.RoutingTransformerEncDec, kwargs).eval()
    for m in seed.modules():
        if type(m).__name__ == 'Kmeans':
            m.initted.fill_(True)
    ours = from_seed_state_dict(R.RoutingTransformerEncDec, seed.state_dict(), **kwargs).eval()
    assert torch.equal(ours.encoder.net.token_emb.weight, seed.enc.token_emb.weight)
    context, tgt = features(16, 32), tokens(16)
    with torch.no_grad():
        expected, _ = seed.dec.base_net(tgt, context=context)
        got, _ = ours.decoder.net(tgt, context=context)
    torch.testing.assert_close(got, expected, **TOL)
    # the Reformer seed's decoder has no cross-attention weights to load into ours
    kwargs = dict(dim=32, enc_num_tokens=64, enc_depth=1, enc_max_seq_len=32, dec_num_tokens=64, dec_depth=1,
                  dec_max_seq_len=32)
    with pytest.raises(ValueError, match='cross-attends with weights of its own'):
        from_seed_state_dict(R.ReformerEncDec, build(RF.ReformerEncDec, kwargs).state_dict(), **kwargs)


def test_a_loaded_checkpoint_is_written_as_the_cli_writes_weights(tmp_path):
    kwargs = dict(**LM, depth=1, max_seq_len=16, window_size=8, n_local_attn_heads=2, causal=True)
    seed = build(RT.RoutingTransformerLM, kwargs)
    ours = from_seed_state_dict(R.RoutingTransformerLM, seed.state_dict(), **kwargs)
    save_converted(ours, tmp_path / 'model.safetensors')
    again = build(R.RoutingTransformerLM, kwargs)
    again.load_state_dict(read_weights(tmp_path / 'model.safetensors'))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_a_sinkhorn_decoder_loads_with_identity_context_projections():
    """The seed's cross-attention takes the raw context as keys and values: ours gets identity
    key/value projections there, which compute the same."""
    kwargs = dict(**LM, depth=2, max_seq_len=32, bucket_size=8, causal=False, receives_context=True)
    seed = build(SK.SinkhornTransformerLM, kwargs)
    ours = from_seed_state_dict(R.SinkhornTransformerLM, seed.state_dict(), **kwargs)
    cross = ours.transformer.blocks[1].mixers[0].fn
    assert cross.cross_attend and torch.equal(cross.to_k.weight, torch.eye(32)) and torch.equal(cross.to_v.weight,
                                                                                                torch.eye(32))
    torch.testing.assert_close(cross.to_q.weight, seed.sinkhorn_transformer.layers.layers[1][0].fn.to_q.weight)


def test_seed_weights_with_no_place_here_are_a_clear_error():
    kwargs = dict(**LM, depth=1, max_seq_len=16, window_size=8)
    seed = build(RT.RoutingTransformerLM, kwargs).state_dict()
    ours = build(R.RoutingTransformerLM, kwargs)
    with pytest.raises(ValueError, match=r'with no place in RoutingTransformerLM: extra\.weight'):
        load_seed_state_dict(ours, {**seed, 'extra.weight': torch.zeros(3)})
    with pytest.raises(ValueError, match=r'does not provide: to_logits\.bias'):
        load_seed_state_dict(ours, {k: v for k, v in seed.items() if k != 'out.bias'})
    with pytest.raises(ValueError, match=r'shapes that differ: out\.weight \(64, 16\) -> to_logits\.weight \(64, 32\)'):
        load_seed_state_dict(ours, {**seed, 'out.weight': torch.zeros(64, 16)})
    # a seed model built with other keywords
    with pytest.raises(ValueError, match='keyword arguments the seed model was built with'):
        load_seed_state_dict(build(R.RoutingTransformerLM, {**kwargs, 'depth': 2}), seed)
    # weights the seed has and ours cannot hold say why
    causal_unshared = build(RT.RoutingTransformerLM, {**kwargs, 'causal': True, 'shared_qk': False}).state_dict()
    with pytest.raises(ValueError, match='memory key/values per k-means cluster'):
        load_seed_state_dict(build(R.RoutingTransformerLM, {**kwargs, 'causal': True, 'shared_qk': False}),
                             causal_unshared)
    with pytest.raises(TypeError, match='not a model of a seed family'):
        convert_seed_state_dict(build(R.TransformerLM, dict(num_tokens=8, dim=8, depth=1, max_seq_len=8)), seed)


def test_a_checkpoint_path_is_read_without_running_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ('this must not run',))

    path = tmp_path / 'evil.pt'
    torch.save({'token_emb.weight': torch.zeros(1), 'x': Payload()}, path)
    with pytest.raises(Exception, match='Weights only load failed|weights_only'):
        load_seed_state_dict(build(R.RoutingTransformerLM, dict(**LM, depth=1, max_seq_len=8, window_size=8)), path)
    with pytest.raises(ValueError, match='expected a state dict'):
        load_seed_state_dict(build(R.RoutingTransformerLM, dict(**LM, depth=1, max_seq_len=8, window_size=8)),
                             {'token_emb.weight': 3})


# ---------------------------------------------------------------- same keywords, same parameters

def routing_memory_difference(seed, ours):
    """The Routing seed learns num_mem_kv memory key/values per k-means cluster for the routed
    heads only; ours one set per head, seen from every cluster and by the local heads too."""
    per_cluster = sum(m.mem_key.numel() + m.mem_value.numel() for m in seed.modules()
                      if type(m).__name__ == 'KmeansAttention')
    per_head = sum(m.mem_kv.numel() for m in ours.modules() if isinstance(m, R.Attention) and m.mem_kv is not None)
    return per_cluster - per_head


def context_projections(seed, ours):
    """The Sinkhorn seed's cross-attention uses the raw context as keys and values (no projection,
    a known defect); ours projects them."""
    return -sum(m.to_k.weight.numel() + m.to_v.weight.numel() for m in ours.modules()
                if isinstance(m, R.Attention) and m.cross_attend)


def reformer_cross_attention(seed, ours):
    """The Reformer seed's decoder concatenates the encoder output into its LSH self-attention
    (a known defect, keys compete with the decoder's tokens for buckets); ours cross-attends
    with a sublayer of its own."""
    return -sum(n_params(block.mixers[1]) for block in ours.decoder.net.transformer.blocks)


SMALL = dict(num_tokens=256, dim=64, heads=8)
# the seed READMEs' configurations, shrunk (width, length, vocabulary), same structure
README_CONFIGS = [
    ('routing_lm', RT.RoutingTransformerLM, R.RoutingTransformerLM,
     dict(**SMALL, depth=7, max_seq_len=256, causal=True, emb_dim=32, weight_tie=False, tie_embedding=False,
          dim_head=8, attn_dropout=0.1, attn_layer_dropout=0., ff_dropout=0.1, layer_dropout=0., window_size=32,
          n_local_attn_heads=4, reversible=True, ff_chunks=10, ff_glu=True, pkm_layers=(4, 7), pkm_num_keys=32,
          moe_layers=(3, 6), moe_num_experts=4, moe_loss_coef=1e-2, num_mem_kv=8, use_scale_norm=False,
          use_rezero=False, shift_tokens=True), routing_memory_difference),
    ('routing_transformer', RT.RoutingTransformer, R.RoutingTransformer,
     dict(dim=64, heads=8, depth=3, max_seq_len=256, window_size=32, n_local_attn_heads=4), None),
    ('routing_enc_dec', RT.RoutingTransformerEncDec, R.RoutingTransformerEncDec,
     dict(dim=64, enc_num_tokens=256, enc_depth=2, enc_heads=8, enc_max_seq_len=256, enc_window_size=32,
          dec_num_tokens=256, dec_depth=2, dec_heads=8, dec_max_seq_len=256, dec_window_size=32, dec_reversible=True),
     None),
    ('routing_update_kmeans', RT.RoutingTransformerLM, R.RoutingTransformerLM,
     dict(**SMALL, depth=2, window_size=32, max_seq_len=256, causal=True, _register_kmeans_update=False), None),
    ('reformer_lm', RF.ReformerLM, R.ReformerLM,
     dict(**SMALL, depth=3, max_seq_len=256, lsh_dropout=0.1, emb_dim=32, causal=True, bucket_size=16, n_hashes=4,
          ff_chunks=20, weight_tie=False, attn_chunks=8, num_mem_kv=16, use_full_attn=False, full_attn_thres=64,
          use_scale_norm=False), None),
    ('reformer', RF.Reformer, R.Reformer, dict(dim=64, depth=3, heads=8, lsh_dropout=0.1, causal=True), None),
    ('lsh_self_attention', RF.LSHSelfAttention, R.LSHSelfAttention,
     dict(dim=32, heads=8, bucket_size=16, n_hashes=8, causal=False), None),
    ('reformer_encoder', RF.ReformerLM, R.ReformerLM,
     dict(**SMALL, emb_dim=32, depth=3, max_seq_len=256, fixed_position_emb=True, return_embeddings=True), None),
    ('reformer_decoder', RF.ReformerLM, R.ReformerLM,
     dict(**SMALL, emb_dim=32, depth=3, max_seq_len=256, fixed_position_emb=True, causal=True), None),
    ('reformer_enc_dec', RF.ReformerEncDec, R.ReformerEncDec,
     dict(dim=64, enc_num_tokens=256, enc_depth=2, enc_max_seq_len=256, dec_num_tokens=256, dec_depth=2,
          dec_max_seq_len=256), reformer_cross_attention),
    ('sinkhorn_lm', SK.SinkhornTransformerLM, R.SinkhornTransformerLM,
     dict(**SMALL, depth=7, max_seq_len=256, bucket_size=32, causal=False, n_sortcut=2, n_top_buckets=2,
          ff_chunks=10, reversible=True, emb_dropout=0.1, ff_dropout=0.1, attn_dropout=0.1, attn_layer_dropout=0.1,
          layer_dropout=0.1, weight_tie=True, emb_dim=32, dim_head=8, ff_glu=True, n_local_attn_heads=2,
          pkm_layers=(4, 7), pkm_num_keys=32), None),
    ('sinkhorn_transformer', SK.SinkhornTransformer, R.SinkhornTransformer,
     dict(dim=64, heads=8, depth=3, bucket_size=32), None),
    ('sinkhorn_encoder', SK.SinkhornTransformerLM, R.SinkhornTransformerLM,
     dict(num_tokens=256, dim=64, depth=3, heads=8, bucket_size=32, max_seq_len=256, reversible=True,
          return_embeddings=True), None),
    ('sinkhorn_decoder', SK.SinkhornTransformerLM, R.SinkhornTransformerLM,
     dict(num_tokens=256, dim=64, depth=3, causal=True, bucket_size=32, max_seq_len=256, receives_context=True,
          context_bucket_size=32, reversible=True), context_projections),
    ('sinkhorn_simple_sort_net', SK.SinkhornTransformerLM, R.SinkhornTransformerLM,
     dict(**SMALL, depth=3, bucket_size=32, max_seq_len=256, use_simple_sort_net=True, sinkhorn_iter=7,
          n_sortcut=2, temperature=0.75, non_permutative=False), None),
    ('sinkhorn_causal', SK.SinkhornTransformerLM, R.SinkhornTransformerLM,
     dict(**SMALL, depth=3, bucket_size=25, max_seq_len=400, causal=True), None),
    ('colt5_feedforward', C5.ConditionalRoutedFeedForward, R.ConditionalRoutedFeedForward,
     dict(dim=64, light_ff_mult=0.5, heavy_ff_mult=4, num_heavy_tokens=16), None),
    ('colt5_attention', C5.ConditionalRoutedAttention, R.ConditionalRoutedAttention,
     dict(dim=64, light_dim_head=8, light_heads=8, light_window_size=16, heavy_dim_head=8, heavy_heads=8,
          num_heavy_tokens_q=16, num_heavy_tokens_kv=16), None),
    ('colt5_block', C5.ConditionalRoutedTransformerBlock, R.ConditionalRoutedTransformerBlock,
     dict(dim=64, light_dim_head=8, light_heads=8, light_window_size=16, heavy_dim_head=8, heavy_heads=8,
          light_ff_mult=0.5, heavy_ff_mult=4, num_heavy_ff_tokens=16, num_heavy_attn_tokens_q=16,
          num_heavy_attn_tokens_kv=16), None),
    ('colt5_cross_attention', C5.ConditionalRoutedCrossAttention, R.ConditionalRoutedCrossAttention,
     dict(dim=64, dim_head=8, heads=8, num_tokens_q=16, num_tokens_kv=32, kv_routing_tokens=2), None),
    ('colt5_autoregressive_attention', C5.ConditionalRoutedAutoregressiveAttention,
     R.ConditionalRoutedAutoregressiveAttention,
     dict(dim=64, light_dim_head=8, light_heads=8, light_window_size=16, heavy_window_size=16, heavy_dim_head=8,
          heavy_heads=8, num_heavy_tokens_q=4, num_heavy_tokens_kv=32, num_routed_kv=2), None),
    ('colt5_image_attention', C5.ConditionalRoutedImageAttention, R.ConditionalRoutedImageAttention,
     dict(dim=32, light_dim_head=8, light_heads=8, light_window_size=4, channel_first=True, heavy_dim_head=8,
          heavy_heads=8, num_heavy_tokens_q=16, num_heavy_tokens_kv=16), None),
    ('colt5_vit', C5.ConditionalRoutedViT, R.ConditionalRoutedViT,
     dict(image_size=64, patch_size=8, num_classes=10, dim=64, depth=2, attn_num_heavy_tokens_q=16,
          attn_num_heavy_tokens_kv=16, attn_heavy_dim_head=8, attn_heavy_heads=8, attn_light_window_size=4,
          attn_light_dim_head=8, attn_light_heads=4, ff_num_heavy_tokens=16, ff_heavy_mult=4, ff_light_mult=2), None),
]


@pytest.mark.parametrize('name,seed_cls,ours_cls,kwargs,difference', README_CONFIGS,
                         ids=[c[0] for c in README_CONFIGS])
def test_seed_readme_configurations_have_the_seed_parameter_count(name, seed_cls, ours_cls, kwargs, difference):
    seed, ours = build(seed_cls, kwargs), build(ours_cls, kwargs)
    expected = 0 if difference is None else difference(seed, ours)
    if difference is not None:
        assert expected != 0, 'the documented difference has vanished: drop it'
    assert n_params(seed) - n_params(ours) == expected
