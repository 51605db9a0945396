"""Bad input to any family gets a one-line error that says what to change, and a model's output
cannot be unpacked as the wrong kind."""

import pytest
import torch

from routeformer import (AutoregressiveWrapper, ConditionalRoutedTransformerLM, NSATransformerLM, Reformer,
                         ReformerLM, RoutingTransformer, RoutingTransformerLM, SinkhornTransformer,
                         SinkhornTransformerLM, TransformerLM)

NUM_TOKENS, DIM, SEQ = 32, 32, 16
COMMON = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=1, max_seq_len=64, heads=2)

LMS = {
    'full': lambda **kw: TransformerLM(**{**COMMON, 'causal': True, **kw}),
    'routing': lambda **kw: RoutingTransformerLM(**{**COMMON, 'causal': True, 'window_size': 8, **kw}),
    'reformer': lambda **kw: ReformerLM(**{**COMMON, 'causal': True, 'bucket_size': 8, **kw}),
    'sinkhorn': lambda **kw: SinkhornTransformerLM(**{**COMMON, 'causal': True, 'bucket_size': 8, **kw}),
    'colt5': lambda **kw: ConditionalRoutedTransformerLM(
        num_tokens=NUM_TOKENS, dim=DIM, depth=1, max_seq_len=64, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4,
        num_heavy_ff_tokens=4, light_heads=2, heavy_heads=2, light_dim_head=8, heavy_dim_head=8, light_window_size=8,
        **kw),
    'nsa': lambda **kw: NSATransformerLM(**{**COMMON, 'compress_block_size': 4, 'compress_stride': 2,
                                            'select_block_size': 8, 'num_selected_blocks': 2, **kw}),
}
TRUNK = dict(dim=DIM, depth=1, max_seq_len=64, heads=2)
TRUNKS = {
    'routing': lambda: RoutingTransformer(window_size=8, causal=True, **TRUNK),
    'reformer': lambda: Reformer(bucket_size=8, causal=True, **TRUNK),
    'sinkhorn': lambda: SinkhornTransformer(bucket_size=8, causal=True, **TRUNK),
}


def tokens(b=2, n=SEQ):
    return torch.randint(0, NUM_TOKENS, (b, n))


@pytest.fixture(params=list(LMS), scope='module')
def lm(request):
    return LMS[request.param]().eval()


@pytest.mark.parametrize('kind', ['additive', 'binary'])
def test_float_masks_are_refused(lm, kind):
    """An additive float mask (0 keep, -inf drop) was read as a bool mask, the other way round."""
    keep = torch.ones(2, SEQ, dtype=torch.bool)
    keep[:, -3:] = False
    mask = torch.zeros(2, SEQ).masked_fill(~keep, float('-inf')) if kind == 'additive' else keep.float()
    with pytest.raises(ValueError, match='must be bool') as info:
        lm(tokens(), input_mask=mask)
    assert '`input_mask == 0`' in str(info.value) and '`input_mask.bool()`' in str(info.value)


def test_integer_and_bool_masks_mean_the_same(lm):
    keep = torch.ones(2, SEQ, dtype=torch.bool)
    keep[0, -3:] = False
    x = tokens()
    with torch.no_grad():
        out_bool, out_int = (lm(x, input_mask=m) for m in (keep, keep.long()))
    out_bool, out_int = (o[0] if isinstance(o, tuple) else o for o in (out_bool, out_int))
    assert torch.equal(out_bool, out_int)


@pytest.mark.parametrize('shape,phrase', [((0, SEQ), 'batch size 0'), ((2, 0), 'length 0')])
def test_empty_batches_and_sequences(lm, shape, phrase):
    with pytest.raises(ValueError, match=phrase):
        lm(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize('family', list(TRUNKS))
@pytest.mark.parametrize('shape,phrase', [((0, SEQ, DIM), 'batch size 0'), ((2, 0, DIM), 'length 0')])
def test_empty_inputs_to_trunks(family, shape, phrase):
    with pytest.raises(ValueError, match=phrase):
        TRUNKS[family]()(torch.zeros(shape))


def test_one_dimensional_token_input(lm):
    with pytest.raises(ValueError, match=r'shape \(batch, seq_len\)'):
        lm(tokens()[0])


def test_a_loss_needs_two_tokens(lm):
    """A 1-token sequence has no next token: the loss was a silent NaN."""
    with pytest.raises(ValueError, match='at least 2 tokens'):
        AutoregressiveWrapper(lm)(tokens(n=1), return_loss=True)


@pytest.mark.parametrize('family,kwargs,name', [
    ('full', dict(heads=0), 'heads'), ('routing', dict(heads=0), 'heads'), ('reformer', dict(heads=0), 'heads'),
    ('sinkhorn', dict(heads=0), 'heads'), ('full', dict(dim=0), 'dim'), ('full', dict(dim_head=0), 'dim_head'),
    ('full', dict(num_tokens=0), 'num_tokens'), ('full', dict(max_seq_len=0), 'max_seq_len'),
    ('reformer', dict(bucket_size=0), 'bucket_size'), ('sinkhorn', dict(bucket_size=0), 'bucket_size'),
    ('routing', dict(window_size=0), 'window_size'),
    ('nsa', dict(heads=0), 'heads'), ('nsa', dict(select_block_size=0), 'select_block_size'),
])
def test_sizes_must_be_positive(family, kwargs, name):
    with pytest.raises(ValueError, match=f'^{name} must be a positive integer, got 0$'):
        LMS[family](**kwargs)


# ---------------------------------------------------------------- what a model returns

@pytest.mark.parametrize('make', [LMS['reformer'], LMS['sinkhorn'], TRUNKS['reformer'], TRUNKS['sinkhorn']],
                         ids=['ReformerLM', 'SinkhornTransformerLM', 'Reformer', 'SinkhornTransformer'])
def test_single_tensor_outputs_cannot_be_unpacked_as_a_pair(make):
    """The Reformer and Sinkhorn families return one tensor, as their seeds do: `logits, aux = model(x)`
    with a batch of two would split the batch silently, so unpacking raises instead."""
    model = make()
    x = tokens() if isinstance(model, (ReformerLM, SinkhornTransformerLM)) else torch.randn(2, SEQ, DIM)
    out = model(x)
    with pytest.raises(TypeError, match=f'{type(model).__name__} returns one tensor'):
        first, second = out
    # otherwise a plain tensor: operations give plain tensors, gradients flow
    assert type(out[0]) is torch.Tensor and type(out + 1) is torch.Tensor and out.shape[0] == 2
    assert [t.shape for t in out.unbind(0)] == [out.shape[1:]] * 2
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.grad is not None)


@pytest.mark.parametrize('make', [LMS['full'], LMS['routing'], LMS['colt5'], TRUNKS['routing']],
                         ids=['TransformerLM', 'RoutingTransformerLM', 'ConditionalRoutedTransformerLM',
                              'RoutingTransformer'])
def test_the_other_models_return_output_and_aux_loss(make):
    model = make()
    x = torch.randn(2, SEQ, DIM) if isinstance(model, RoutingTransformer) else tokens()
    out, aux = model(x)
    assert out.shape[:2] == (2, SEQ) and aux.ndim == 0
