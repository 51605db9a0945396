"""The flex backend (FlexAttention) and the backends' declarations.

In eval mode on a CPU every causal configuration and a set of encoders (padding masks, several
hash rounds, memory key/values, shared-QK) give the reference backend's outputs through it and stay
causal; compiled FlexAttention, whose block masks skip work, equals the reference at lengths of
several kernel blocks; and the backends say what they support and why they refuse.
"""

import pytest
import torch

import routeformer
from routeformer import (AutoregressiveWrapper, MoBATransformerLM, Recorder, ReformerLM, RoutingTransformerLM,
                         SinkhornTransformerLM, TransformerLM)
from routeformer.attention import backends, flex
from routeformer.attention.backends import Call, choose

from probes import CAUSAL_CONFIGS, assert_causal, logits_of, tokens

pytestmark = pytest.mark.skipif(not flex.available(), reason='this torch has no FlexAttention')

CONFIGS = dict(CAUSAL_CONFIGS)
# float32: the kernel sums in another order than the einsum
TOLERANCE = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture
def uncompiled(monkeypatch):
    """Uncompiled FlexAttention (it evaluates each mask_mod at every pair): the exactness of the
    mask_mods, at the small sizes of the causality configurations."""
    monkeypatch.setattr(flex, 'compiled_on', lambda *args: False)


def encoder(cls, n=32, **kwargs):
    def factory():
        torch.manual_seed(0)
        cfg = dict(num_tokens=32, dim=16, depth=2, max_seq_len=n, heads=2, causal=False, **kwargs)
        return cls(**cfg), None
    return factory


ENCODERS = {
    'full_encoder': encoder(TransformerLM),
    'local_encoder': encoder(TransformerLM, n_local_attn_heads=1, local_attn_window_size=8),
    'routing_encoder': encoder(RoutingTransformerLM, window_size=8),
    'routing_encoder_memkv': encoder(RoutingTransformerLM, window_size=8, num_mem_kv=2),
    'reformer_encoder_2hashes': encoder(ReformerLM, bucket_size=4, n_hashes=2),
    'reformer_encoder_no_duplicates': encoder(ReformerLM, bucket_size=4, n_hashes=3,
                                              lsh_allow_duplicate_attention=False),
    'sinkhorn_encoder': encoder(SinkhornTransformerLM, bucket_size=8),
}
PADDED = ['full_encoder', 'local_encoder', 'routing_encoder', 'reformer_encoder_2hashes', 'sinkhorn_encoder']


def run(model, x, backend, **kwargs):
    routeformer.use_backend(model, backend)
    with torch.no_grad():
        return logits_of(model(x, **kwargs))


def build(name):
    model, context = {**CONFIGS, **ENCODERS}[name]()
    n, vocab = getattr(model, 'max_seq_len', 16), getattr(model, 'num_tokens', 32)
    return model.eval(), tokens(n=n, vocab=vocab), ({} if context is None else dict(context=context))


@pytest.mark.parametrize('name', [*CONFIGS, *ENCODERS])
def test_flex_equals_reference_in_eval(name, uncompiled):
    model, x, kwargs = build(name)
    expected = run(model, x, 'reference', **kwargs)
    assert torch.allclose(run(model, x, 'flex', **kwargs), expected, **TOLERANCE)
    with torch.no_grad():
        choices = routeformer.explain_backends(model, x, **kwargs)
    # every call ran on it, but those that keep weights (NSA's compressed branch needs them)
    assert choices and all(c.backend.name == 'flex' or c.call.need_weights for c in choices)


@pytest.mark.parametrize('name', PADDED)
def test_flex_equals_reference_with_padding(name, uncompiled):
    model, x, _ = build(name)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, -5:] = False
    mask[1, :3] = False
    expected = run(model, x, 'reference', input_mask=mask)
    assert torch.allclose(run(model, x, 'flex', input_mask=mask), expected, **TOLERANCE)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_flex_is_causal(name, uncompiled):
    model, x, kwargs = build(name)
    routeformer.use_backend(model, 'flex')
    assert_causal(model, x=x, vocab=getattr(model, 'num_tokens', 32), **kwargs)


def test_flex_generation_equals_reference(uncompiled):
    torch.manual_seed(0)
    model = RoutingTransformerLM(num_tokens=32, dim=16, depth=2, max_seq_len=32, heads=2, causal=True, window_size=4,
                                 n_local_attn_heads=1).eval()
    wrapper, prompt = AutoregressiveWrapper(model), tokens(n=6)
    expected = wrapper.generate(prompt, 12, temperature=0)
    routeformer.use_backend(model, 'flex')
    assert torch.equal(wrapper.generate(prompt, 12, temperature=0), expected)


# ---------------------------------------------------------------- compiled, several kernel blocks

N = 512


def long_model(name):
    torch.manual_seed(0)
    common = dict(num_tokens=64, dim=64, depth=1, max_seq_len=N, heads=2, causal=True)
    return {
        'full': lambda: TransformerLM(**common),
        'local': lambda: TransformerLM(**common, n_local_attn_heads=2, local_attn_window_size=64),
        'routing_band_and_local': lambda: RoutingTransformerLM(**common, window_size=64, n_local_attn_heads=1),
        'routing_band_memkv': lambda: RoutingTransformerLM(**common, window_size=96, num_mem_kv=4),
        'reformer_1hash': lambda: ReformerLM(**common, bucket_size=32, n_hashes=1),
        'moba': lambda: MoBATransformerLM(**common, block_size=64, top_k=2),
    }[name]().eval()


@pytest.mark.parametrize('name', [pytest.param(n, marks=() if n in ('full', 'routing_band_and_local', 'moba')
                                               else pytest.mark.slow)
                                  for n in ('full', 'local', 'routing_band_and_local', 'routing_band_memkv',
                                            'reformer_1hash', 'moba')])
def test_compiled_flex_equals_reference(name):
    model, x = long_model(name), tokens(n=N, vocab=64)
    expected = run(model, x, 'reference')
    assert torch.allclose(run(model, x, 'flex'), expected, **TOLERANCE)
    if name == 'routing_band_and_local':
        assert_causal(model, x=x, vocab=64, positions=(N // 3, N - 1))


def test_several_hash_rounds_at_length(uncompiled):
    # four rounds merged by log-sum-exp over the sorted band (uncompiled: the CPU kernel's LSE)
    torch.manual_seed(0)
    model = ReformerLM(num_tokens=64, dim=32, depth=1, max_seq_len=256, heads=2, causal=True, bucket_size=32,
                       n_hashes=4).eval()
    x = tokens(n=256, vocab=64)
    assert torch.allclose(run(model, x, 'flex'), run(model, x, 'reference'), **TOLERANCE)


def test_groups_kernel_equals_reference_float64():
    torch.manual_seed(0)
    b, h, g, i, j, d = 2, 3, 5, 4, 7, 8
    q, k, v = torch.randn(b, h, g, i, d, dtype=torch.float64), *torch.randn(2, b, h, g, j, d, dtype=torch.float64)
    mask = torch.rand(b, 1, g, i, j) > 0.3
    mask[..., 0] = True
    bias = torch.randn(1, h, g, i, j, dtype=torch.float64)
    for causal in (False, True):
        args = dict(scale=d ** -0.5, bias=bias, causal=causal, need_lse=True)
        out, lse, _ = flex.groups(q, k, v, mask, **args)
        ref_out, ref_lse, _ = backends.reference(q, k, v, mask, **args)
        assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)


# ---------------------------------------------------------------- declarations and selection

def call(**kwargs):
    fields = dict(layout='SortedBand', device='cpu', dtype=torch.float32, need_lse=False, need_weights=False,
                  dropout=False, grad=False, compiling=False, bias_grad=False)
    return Call(**{**fields, **kwargs})


def test_auto_choices_and_reasons():
    assert choose('auto', call(grad=True, need_lse=True)).backend.name == 'flash_lse'
    on_gpu = choose('auto', call(device='cuda', grad=True, need_lse=True))
    assert on_gpu.backend.name == 'flex' and on_gpu.rejected == {}
    assert choose('auto', call(device='cuda', layout='Dense')).backend.name == 'sdpa'
    assert choose('auto', call(device='cuda', layout='Dense', need_lse=True)).backend.name == 'flex'
    # no silent fallback: on CUDA the CPU kernel is refused with its reason
    assert 'CPU kernel' in backends.BACKENDS['flash_lse'].refusals(call(device='cuda'))[0]
    compiled = choose('auto', call(compiling=True, need_lse=True))
    assert compiled.backend.name == 'reference' and set(compiled.rejected) == {'flash_lse', 'sdpa'}
    assert 'weights' in ' '.join(backends.BACKENDS['flex'].refusals(call(need_weights=True)))


def test_named_backend_that_cannot_run_the_call_says_why():
    with pytest.raises(ValueError, match='no backward pass on the CPU'):
        choose('flex', call(grad=True))
    with pytest.raises(ValueError, match='log-sum-exp'):
        choose('sdpa', call(need_lse=True))
    with pytest.raises(ValueError, match='unknown attention backend'):
        routeformer.use_backend(TransformerLM(num_tokens=8, dim=8, depth=1, max_seq_len=8), 'fast')


def test_flex_training_on_cpu_is_a_clear_error():
    model, x, _ = build('routing')
    routeformer.use_backend(model.train(), 'flex')
    with pytest.raises(ValueError, match='backend="auto"'):
        model(x)


def test_explain_backends_names_layers_layouts_and_reasons():
    model, x, _ = build('routing_local_heads')
    choices = routeformer.explain_backends(model.train(), x)
    assert {c.call.layout for c in choices} == {'SlidingWindow', 'SortedBand'}
    assert all(c.backend.name == 'flash_lse' and c.layer.endswith('executor') for c in choices)
    model.eval()
    with torch.no_grad():
        text = str(routeformer.explain_backends(routeformer.use_backend(model, 'flex'), x)[0])
    assert 'SlidingWindow -> flex' in text and 'blocks.0' in text


def test_recorder_records_through_the_reference_with_any_backend(uncompiled):
    model, x, _ = build('routing')
    routeformer.use_backend(model, 'flex')
    recorder = Recorder(model)
    with torch.no_grad():
        recorder(x)
    assert recorder.recordings[0]


def test_every_model_class_takes_backend():
    for cls, kwargs in ((TransformerLM, {}), (RoutingTransformerLM, dict(window_size=4)),
                        (ReformerLM, dict(bucket_size=4)), (SinkhornTransformerLM, dict(bucket_size=4)),
                        (MoBATransformerLM, dict(block_size=4))):
        model = cls(num_tokens=8, dim=16, depth=1, max_seq_len=16, backend='reference', **kwargs)
        assert {m.backend for m in model.modules() if isinstance(m, routeformer.RoutedAttention)} == {'reference'}
    colt5 = routeformer.ConditionalRoutedTransformerLM(
        num_tokens=8, dim=16, depth=1, max_seq_len=16, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=4,
        num_heavy_ff_tokens=4, light_window_size=4, backend='flex')
    assert {m.backend for m in colt5.modules() if isinstance(m, routeformer.RoutedAttention)} == {'flex'}


def test_flex_refuses_decoding_steps_and_oversized_uncompiled_calls():
    flex_backend = backends.BACKENDS['flex']
    assert any('decoding step' in r for r in flex_backend.refusals(call(decoding=True)))
    assert not flex_backend.refusals(call(pairs=2 ** 30))  # compiled: the block mask skips what it must
    assert any('scores all' in r for r in flex_backend.refusals(call(pairs=2 ** 30, need_lse=True)))


@pytest.mark.slow
def test_many_shapes_in_one_process_stay_compiled():
    # past torch's default recompile limit (8) the compiler would fall back to the uncompiled
    # implementation, which scores every pair and warns
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        for n in range(256, 256 + 128 * 10, 128):
            model = TransformerLM(num_tokens=16, dim=32, depth=1, max_seq_len=n, heads=2, causal=True).eval()
            x = torch.randint(0, 16, (1, n))
            assert torch.allclose(run(model, x, 'flex'), run(model, x, 'reference'), **TOLERANCE)


def test_auto_keeps_the_flash_kernel_for_selected_blocks_on_a_cpu():
    for grad in (False, True):
        choice = choose('auto', call(layout='SelectedBlocks', length=16384, grad=grad))
        assert choice.backend.name == 'flash_lse'
    # named, flex runs them at inference: one call over the sequence, with no log-sum-exp to merge
    assert choose('flex', call(layout='SelectedBlocks', length=16384, need_lse=True)).backend.name == 'flex'