"""TransformerLM end to end: causality, padding, chunking, bf16 autocast, input validation and the
effect of every builder keyword."""

import pytest
import torch

from routeformer import TransformerLM
from routeformer.layers.norms import ReZero

NUM_TOKENS, DIM, SEQ = 32, 16, 16
BASE = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=SEQ, heads=2, dim_head=8)


def build(seed=0, model_cls=TransformerLM, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(BASE)
    cfg.update(kwargs)
    model = model_cls(**cfg)
    for m in model.modules():
        if isinstance(m, ReZero):  # ReZero gates start at 0, which would make every layer the identity
            m.g.data.fill_(0.5)
    return model


def tokens(b=2, n=SEQ, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_TOKENS, (b, n), generator=g)


# ---------------------------------------------------------------- feed-forward chunking

def test_feedforward_chunks_have_a_floor_of_rows(monkeypatch):
    """`chunks` is an upper bound: no chunk has fewer than MIN_CHUNK_ROWS rows (batch x positions)."""
    import routeformer.layers.feedforward as feedforward
    from routeformer.layers.feedforward import FeedForward

    monkeypatch.setattr(feedforward, 'MIN_CHUNK_ROWS', 8)
    ff = FeedForward(4, chunks=100)
    rows = []
    ff.proj_in.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0] * args[0].shape[1]))
    for batch, n, expected in ((1, 64, [8] * 8), (2, 64, [8] * 16), (1, 12, [12]), (3, 1, [3])):
        rows.clear()
        ff(torch.randn(batch, n, 4))
        assert rows == expected, (batch, n)


@pytest.mark.parametrize('kwargs', [dict(), dict(ff_glu=True), dict(reversible=True)], ids=['plain', 'glu', 'reversible'])
def test_chunked_feedforward_equals_unchunked(kwargs):
    a = build(ff_chunks=1, **kwargs).double()
    b = build(ff_chunks=4, **kwargs).double()
    b.load_state_dict(a.state_dict())
    x = tokens()
    out_a, _ = a(x)
    out_b, _ = b(x)
    assert torch.allclose(out_a, out_b, atol=1e-10)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-10), name


# ---------------------------------------------------------------- padding

PADDING_CONFIGS = {
    'full': dict(),
    'local_heads': dict(n_local_attn_heads=1, local_attn_window_size=4),
    'shift_tokens': dict(shift_tokens=True),
    'mem_kv_shared_qk': dict(num_mem_kv=2, shared_qk=True),
    'moe_pkm': dict(moe_layers=(1,), pkm_layers=(2,), pkm_num_keys=32),
    'reversible': dict(reversible=True, n_local_attn_heads=1, local_attn_window_size=4),
    'context': dict(receives_context=True),
}


@pytest.mark.parametrize('config', list(PADDING_CONFIGS))
def test_padding_does_not_affect_real_positions(config):
    kwargs = PADDING_CONFIGS[config]
    model = build(causal=False, **kwargs).eval()
    lengths = torch.tensor([SEQ - 5, 9])
    mask = torch.arange(SEQ).view(1, -1) < lengths.view(-1, 1)
    x = tokens()
    other = x.clone()
    other[~mask] = (other[~mask] + 7) % NUM_TOKENS
    context = torch.randn(2, 5, DIM) if kwargs.get('receives_context') else None
    with torch.no_grad():
        a, _ = model(x, input_mask=mask, context=context)
        b, _ = model(other, input_mask=mask, context=context)
        unmasked, _ = model(other, context=context)
    assert torch.allclose(a[mask], b[mask], atol=1e-6, rtol=0)
    # without the mask the padded tokens do reach the real positions
    assert (unmasked[mask] - a[mask]).abs().max() > 1e-4


def test_context_mask_hides_masked_context():
    model = build(receives_context=True).eval()
    x = tokens()
    context = torch.randn(2, 6, DIM)
    context_mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    other = context.clone()
    other[0, 4:] = torch.randn(2, DIM)
    with torch.no_grad():
        a, _ = model(x, context=context, context_mask=context_mask)
        b, _ = model(x, context=other, context_mask=context_mask)
        c, _ = model(x, context=other)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert (a[0] - c[0]).abs().max() > 1e-4


# ---------------------------------------------------------------- bf16 autocast

BF16_CONFIGS = {
    'pkm_moe': dict(pkm_layers=(1,), moe_layers=(2,), pkm_num_keys=32),
    'local_memkv_sharedqk': dict(causal=True, n_local_attn_heads=1, local_attn_window_size=4, num_mem_kv=2,
                                 shared_qk=True),
    'reversible_context': dict(reversible=True, receives_context=True, ff_chunks=2, shift_tokens=True),
    'reversible_causal_local_moe': dict(reversible=True, causal=True, n_local_attn_heads=2,
                                        local_attn_window_size=4, moe_layers=(1,)),
    'norms_pos': dict(use_scale_norm=True, ff_glu=True, pos_emb='axial', axial_position_shape=(4, 4), emb_dim=8),
}


@pytest.mark.parametrize('config', list(BF16_CONFIGS))
def test_bf16_autocast_forward_backward(config):
    kwargs = BF16_CONFIGS[config]
    model = build(**kwargs).train()
    x = tokens()
    context = torch.randn(2, 5, DIM) if kwargs.get('receives_context') else None
    mask = None if kwargs.get('causal') else torch.arange(SEQ).view(1, -1) < torch.tensor([[SEQ], [11]])

    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, aux = model(x, input_mask=mask, context=context)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all() and torch.isfinite(aux).all()
    (logits.float().logsumexp(-1).mean() + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f'{name} got no gradient'
        assert p.grad.dtype == p.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name

    # the numbers are bf16-close to float32 ones
    model.eval()
    with torch.no_grad():
        ref, _ = model(x, input_mask=mask, context=context)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low, _ = model(x, input_mask=mask, context=context)
    rows = mask if mask is not None else torch.ones(2, SEQ, dtype=torch.bool)
    err = (low.float() - ref)[rows].abs().max()
    assert err <= 0.05 * ref[rows].abs().max() + 0.05, f'bf16 logits are {err:.3g} away from float32'


# ---------------------------------------------------------------- bad input

def test_sequence_longer_than_max_seq_len():
    model = build()
    with pytest.raises(ValueError, match='longer than max_seq_len') as info:
        model(tokens(n=SEQ + 1))
    assert 'larger max_seq_len' in str(info.value)


@pytest.mark.parametrize('shape', [(2, SEQ - 1), (1, SEQ), (2, SEQ, 1)])
def test_input_mask_wrong_shape(shape):
    model = build()
    with pytest.raises(ValueError, match='input_mask has shape') as info:
        model(tokens(), input_mask=torch.ones(shape, dtype=torch.bool))
    assert f'must be {(2, SEQ)}' in str(info.value)


@pytest.mark.parametrize('bad', [-1, NUM_TOKENS, NUM_TOKENS + 10])
def test_token_id_out_of_range(bad):
    model = build()
    x = tokens()
    x[1, 3] = bad
    with pytest.raises(ValueError, match=f'token id {bad} is out of range') as info:
        model(x)
    assert f'[0, {NUM_TOKENS})' in str(info.value)


def test_float_tokens_rejected():
    with pytest.raises(ValueError, match='integer dtype'):
        build()(torch.zeros(2, SEQ))


def test_unknown_keyword_argument():
    with pytest.raises(TypeError, match='unexpected keyword argument') as info:
        build(n_local_heads=2)
    assert 'n_local_heads' in str(info.value)


def test_length_not_multiple_of_local_window():
    model = build(n_local_attn_heads=1, local_attn_window_size=4)
    assert model.multiple_of == 4
    with pytest.raises(ValueError, match='Autopadder') as info:
        model(tokens(n=10))
    assert 'multiple of 4' in str(info.value)


def test_length_not_multiple_of_local_window_reversible():
    model = build(n_local_attn_heads=1, local_attn_window_size=4, reversible=True)
    with pytest.raises(ValueError, match='Autopadder'):
        model(tokens(n=10))


def test_context_mask_without_context():
    model = build(receives_context=True)
    with pytest.raises(ValueError, match='context_mask was given without a context'):
        model(tokens(), context_mask=torch.ones(2, 5, dtype=torch.bool))


def test_cross_attention_without_context():
    model = build(receives_context=True)
    with pytest.raises(ValueError, match='pass context='):
        model(tokens())


def test_context_mask_wrong_shape():
    model = build(receives_context=True)
    with pytest.raises(ValueError, match='context_mask has shape'):
        model(tokens(), context=torch.randn(2, 5, DIM), context_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize('kwargs,phrase', [
    (dict(n_local_attn_heads=3), 'between 0 and heads'),
    (dict(n_local_attn_heads=(1, 1, 1)), 'depth is 2'),
    (dict(pkm_layers=(3,)), 'between 1 and depth'),
    (dict(weight_tie=True, n_local_attn_heads=(1, 0)), 'weight_tie'),
    (dict(pos_emb='axial'), 'axial_position_shape'),
    (dict(pos_emb='learned'), 'unknown pos_emb'),
    (dict(backend='flash'), 'unknown attention backend'),
])
def test_bad_configuration(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        build(**kwargs)


# ---------------------------------------------------------------- every keyword has an effect

def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('kwargs,expected_delta', [
    (dict(ff_mult=2), -2 * (2 * DIM) * (2 * DIM + 1)),            # two layers, hidden 4*dim -> 2*dim
    (dict(num_mem_kv=3), 2 * (2 * 2 * 3 * 8)),                    # (2, heads, m, dim_head) per layer
    (dict(ff_glu=True), 2 * (4 * DIM * DIM + 4 * DIM)),            # proj_in doubles
    (dict(use_scale_norm=True), -2 * 2 * (2 * DIM - 1)),          # 4 norms: 2*dim params -> 1
    (dict(use_rms_norm=True), -2 * 2 * DIM),                      # 4 norms: 2*dim params -> dim
    (dict(tie_embedding=True), -(DIM * NUM_TOKENS + NUM_TOKENS)),  # no output projection
    (dict(emb_dim=8), None),
    (dict(pos_emb='absolute'), SEQ * DIM),
    (dict(shared_qk=True), -2 * DIM * DIM),
    (dict(weight_tie=True), None),
    (dict(receives_context=True), None),
])
def test_keyword_changes_parameter_count(kwargs, expected_delta):
    base, changed = num_params(build()), num_params(build(**kwargs))
    assert changed != base
    if expected_delta is not None:
        assert changed - base == expected_delta


def test_emb_dim_factorises_the_embedding():
    model = build(emb_dim=8)
    assert model.token_emb.weight.shape == (NUM_TOKENS, 8)
    assert model.project_in.weight.shape == (DIM, 8)
    logits, _ = model(tokens())
    assert logits.shape == (2, SEQ, NUM_TOKENS)


def test_tie_embedding_uses_the_embedding_matrix():
    model = build(tie_embedding=True, return_embeddings=False)
    x = tokens()
    logits, _ = model(x)
    hidden, _ = model(x, return_embeddings=True)
    assert torch.allclose(logits, hidden @ model.token_emb.weight.t(), atol=1e-6)


@pytest.mark.parametrize('kwargs', [dict(shift_tokens=True), dict(causal=True), dict(pos_emb='fixed'),
                                    dict(n_local_attn_heads=1, local_attn_window_size=4)],
                         ids=['shift_tokens', 'causal', 'pos_fixed', 'local_heads'])
def test_keyword_without_parameters_changes_output(kwargs):
    # same weights, one switch flipped: the outputs differ
    base = build().eval()
    changed = build(**kwargs).eval()
    changed.load_state_dict(base.state_dict())
    x = tokens()
    with torch.no_grad():
        a, _ = base(x)
        b, _ = changed(x)
    assert (a - b).abs().max() > 1e-4


def test_attn_layer_dropout_acts_in_train_mode_only():
    base = build(attn_layer_dropout=0.).train()
    drop = build(attn_layer_dropout=0.5).train()
    drop.load_state_dict(base.state_dict())
    x = tokens()
    torch.manual_seed(5)
    a, _ = base(x)
    torch.manual_seed(5)
    b, _ = drop(x)
    assert (a - b).abs().max() > 1e-4
    base.eval(), drop.eval()
    with torch.no_grad():
        assert torch.allclose(base(x)[0], drop(x)[0], atol=1e-6)


@pytest.mark.parametrize('name', ['attn_dropout', 'ff_dropout', 'layer_dropout', 'emb_dropout'])
def test_dropouts_act_in_train_mode(name):
    base = build().train()
    drop = build(**{name: 0.5}).train()
    drop.load_state_dict(base.state_dict())
    x = tokens()
    torch.manual_seed(5)
    a, _ = base(x)
    torch.manual_seed(5)
    b, _ = drop(x)
    assert (a - b).abs().max() > 1e-4


def test_moe_aux_loss_and_coef():
    a = build(moe_layers=(1, 2)).eval()
    b = build(moe_layers=(1, 2), moe_loss_coef=1.).eval()
    x = tokens()
    _, aux_plain = build()(x)
    assert aux_plain.item() == 0.
    _, aux_a = a(x)
    _, aux_b = b(x)
    assert aux_a.item() > 0
    assert torch.allclose(aux_b, aux_a * 100, rtol=1e-5)
