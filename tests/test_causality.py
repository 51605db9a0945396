"""One causality test for every causal configuration in the package: change the token at position
p, and no output before p may change (eval mode, so random routing is fixed).

Each entry of CAUSAL_CONFIGS is (id, factory); the factory returns (model, context) where
`model(x, context=context)` maps token ids (b, n) to logits or (logits, aux_loss). Every model
family adds its causal configurations here.
"""

import pytest
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
            changed[:, p] = (changed[:, p] + 1 + torch.arange(x.shape[0])) % vocab
            out = logits_of(model(changed, **kwargs))
            assert torch.allclose(out[:, :p], base[:, :p], atol=1e-6, rtol=0), \
                f'position {p} leaks into earlier outputs: max diff {(out[:, :p] - base[:, :p]).abs().max():.3g}'
            assert (out[:, p] - base[:, p]).abs().max() > 1e-4, f'the output at {p} ignores its own token'


@pytest.mark.parametrize('factory', [c[1] for c in CAUSAL_CONFIGS], ids=[c[0] for c in CAUSAL_CONFIGS])
def test_causal(factory):
    model, context = factory()
    vocab = getattr(model, 'num_tokens', NUM_TOKENS)
    n = getattr(model, 'max_seq_len', SEQ)
    assert_causal(model, x=tokens(n=n, vocab=vocab), context=context, vocab=vocab)


def test_non_causal_model_is_not_causal():
    # the check above can fail: a bidirectional model's earlier outputs do move
    model, _ = transformer_lm(causal=False)()
    with pytest.raises(AssertionError, match='leaks'):
        assert_causal(model, x=tokens())
