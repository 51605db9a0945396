"""The CUDA paths, skipped without a CUDA device: the fused Triton coordinate-descent kernel against
the PyTorch loop (values and gradients, compiled, not interpreted), every causal configuration on
the GPU against the same weights on the CPU and still causal there, gradients on the GPU against
the CPU, cached generation against uncached, and bf16 autocast training steps."""

import pytest
import torch

from routeformer import AutoregressiveWrapper, coor_descent, topk
from probes import CAUSAL_CONFIGS, NUM_TOKENS, SEQ, assert_causal, logits_of, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
CUDA = torch.device('cuda')
CONFIG_IDS = [c[0] for c in CAUSAL_CONFIGS]
FACTORIES = [c[1] for c in CAUSAL_CONFIGS]


@pytest.fixture(autouse=True)
def exact_float32():
    # TF32 matrix products differ from the CPU's float32 by ~1e-3; compare like with like
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_cuda(context):
    return context.to(CUDA) if context is not None else None


def sequence_length(model):
    return getattr(model, 'max_seq_len', SEQ)


# ---------------------------------------------------------------- the fused kernel

@pytest.mark.parametrize('shape', [(3, 4, 50), (2, 1000), (1, 8, 4096)], ids=['small', 'wide', 'widest'])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('segments', [1, 4])
def test_triton_kernel_equals_the_pytorch_loop(shape, masked, segments):
    from routeformer.kernels.coor_descent_triton import triton_coor_descent
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(*shape, generator=g) * 3).to(CUDA)
    mask = (torch.rand(*shape, generator=g) > 0.2).to(CUDA) if masked else None
    weights = torch.randn(*shape, generator=g).to(CUDA)
    schedule = dict(n_iters=20, k=7, eps=0.03, eps_init=4., eps_decay=0.7, mask=mask)

    s1 = s.clone().requires_grad_()
    fused = triton_coor_descent(s1, checkpoint_segments=segments, **schedule)
    (fused * weights).sum().backward()
    s2 = s.clone().requires_grad_()
    plain = coor_descent(s2, **schedule)
    (plain * weights).sum().backward()
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-3, atol=1e-4)
    assert s1.grad.abs().max() > 0


def test_fused_topk_equals_unfused_in_half_precision():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 16, 256, generator=g) * 3).to(CUDA, torch.bfloat16)
    fused = topk(x, k=32, fused=True, n_iters=20, eps=0.03, eps_init=4., eps_decay=0.7)
    plain = topk(x, k=32, fused=False, n_iters=20, eps=0.03, eps_init=4., eps_decay=0.7)
    assert torch.equal(fused.indices, plain.indices)
    assert fused.coor_descent_values.dtype == torch.float32  # routed in float32 whatever the input
    torch.testing.assert_close(fused.coor_descent_values, plain.coor_descent_values, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- every causal configuration

@pytest.mark.parametrize('factory', FACTORIES, ids=CONFIG_IDS)
def test_causal_on_the_gpu_and_equal_to_the_cpu(factory):
    model, context = factory()
    model.eval()
    vocab, n = getattr(model, 'num_tokens', NUM_TOKENS), sequence_length(model)
    x = tokens(n=n, vocab=vocab)
    kwargs = dict(context=context) if context is not None else {}
    with torch.no_grad():
        on_cpu = logits_of(model(x, **kwargs))
    model.to(CUDA)
    kwargs = dict(context=to_cuda(context)) if context is not None else {}
    with torch.no_grad():
        on_gpu = logits_of(model(x.to(CUDA), **kwargs))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
    assert_causal(model, x=x.to(CUDA), context=to_cuda(context), vocab=vocab)


# one configuration per family: enough to see every backward kernel run on the GPU
GRADIENT_IDS = ['full', 'local_heads', 'routing_local_heads', 'colt5_sdpa_no_null_tokens', 'sinkhorn_top2',
                'reformer_attn_chunks']


@pytest.mark.parametrize('config', [c for c in GRADIENT_IDS if c in CONFIG_IDS])
def test_gradients_on_the_gpu_equal_the_cpu(config):
    model, context = dict(CAUSAL_CONFIGS)[config]()
    model.eval()  # fixed routing, no dropout: the same function on both devices
    vocab, n = getattr(model, 'num_tokens', NUM_TOKENS), sequence_length(model)
    x = tokens(n=n, vocab=vocab)

    def grads(device):
        # a copy: moving the model to another device moves the grad tensors it still holds in place
        model.to(device).zero_grad()
        kwargs = dict(context=context.to(device)) if context is not None else {}
        logits_of(model(x.to(device), **kwargs)).logsumexp(-1).sum().backward()
        return {name: p.grad.to('cpu', copy=True) for name, p in model.named_parameters() if p.grad is not None}

    cpu, gpu = grads('cpu'), grads(CUDA)
    assert cpu.keys() == gpu.keys() and cpu
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-4, msg=name)


# ---------------------------------------------------------------- generation and mixed precision

@pytest.mark.parametrize('config', ['full', 'routing_local_heads', 'sinkhorn_top2', 'reformer_2hashes',
                                    'colt5_sdpa_no_null_tokens'])
def test_cached_generation_equals_uncached_on_the_gpu(config):
    if config not in CONFIG_IDS:
        pytest.skip(f'{config} is not a causal configuration')
    model, _ = dict(CAUSAL_CONFIGS)[config]()
    wrapper = AutoregressiveWrapper(model.to(CUDA))
    prompt = tokens(n=5, vocab=getattr(model, 'num_tokens', NUM_TOKENS)).to(CUDA)
    cached = wrapper.generate(prompt, 12, temperature=0)
    assert cached.is_cuda
    assert torch.equal(cached, wrapper.generate(prompt, 12, temperature=0, use_cache=False))


@pytest.mark.parametrize('config', GRADIENT_IDS)
def test_bf16_autocast_training_step_is_finite(config):
    if config not in CONFIG_IDS:
        pytest.skip(f'{config} is not a causal configuration')
    model, context = dict(CAUSAL_CONFIGS)[config]()
    model.to(CUDA).train()
    vocab, n = getattr(model, 'num_tokens', NUM_TOKENS), sequence_length(model)
    x = tokens(n=n, vocab=vocab).to(CUDA)
    kwargs = dict(context=to_cuda(context)) if context is not None else {}
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = model(x, **kwargs)
        logits = logits_of(out)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten())
        if isinstance(out, tuple):
            loss = loss + out[1]
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- the flex backend on the GPU

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('factory', FACTORIES, ids=CONFIG_IDS)
def test_flex_equals_reference_forward_and_gradients(factory, dtype):
    import routeformer
    model, context = factory()
    model.to(CUDA, dtype).eval()  # fixed routing, no dropout: one function for both backends
    vocab, n = getattr(model, 'num_tokens', NUM_TOKENS), sequence_length(model)
    x = tokens(n=n, vocab=vocab).to(CUDA)
    kwargs = dict(context=to_cuda(context).to(dtype)) if context is not None else {}

    def run(backend):
        routeformer.use_backend(model, backend).zero_grad()
        out = logits_of(model(x, **kwargs))
        out.float().logsumexp(-1).sum().backward()
        return out.float(), {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}

    (ref_out, ref_grads), (out, grads) = run('reference'), run('flex')
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize('factory', FACTORIES, ids=CONFIG_IDS)
def test_flex_is_causal_on_the_gpu(factory):
    import routeformer
    model, context = factory()
    routeformer.use_backend(model.to(CUDA), 'flex')
    vocab, n = getattr(model, 'num_tokens', NUM_TOKENS), sequence_length(model)
    assert_causal(model, x=tokens(n=n, vocab=vocab).to(CUDA), vocab=vocab,
                  **(dict(context=to_cuda(context)) if context is not None else {}))


@pytest.mark.parametrize('config', ['full', 'all_local', 'routing', 'reformer_2hashes', 'sinkhorn_top1', 'moba'])
def test_training_step_has_no_host_sync(config):
    model, context = dict(CAUSAL_CONFIGS)[config]()
    model.to(CUDA).train()
    vocab, n = getattr(model, 'num_tokens', NUM_TOKENS), sequence_length(model)
    x = tokens(n=n, vocab=vocab).to(CUDA)
    kwargs = dict(context=to_cuda(context)) if context is not None else {}
    logits_of(model(x, **kwargs)).sum().backward()  # first step: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        logits_of(model(x, **kwargs)).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
