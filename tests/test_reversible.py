"""Reversible execution: the memory-saving custom autograd path against the same reversible coupling
run with plain autograd (`transformer.recompute_in_backward = False`)."""

import pytest
import torch

from routeformer import LM, LayerContext, TransformerLM, build_transformer
from routeformer.attention.plan import RoutePlan
from routeformer.layers.norms import ReZero
from routeformer.reversible import reversible_stack
from routeformer.routers import FullRouter

NUM_TOKENS, DIM, SEQ = 32, 16, 16


def make_lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=SEQ, heads=2, dim_head=8, reversible=True)
    cfg.update(kwargs)
    model = TransformerLM(**cfg).double()
    for m in model.modules():
        if isinstance(m, ReZero):  # a gate at 0 would hide every branch's gradient path
            m.g.data.fill_(0.7)
    return model


def run_once(model, x, *, recompute, seed, context=None, input_mask=None):
    """Forward + backward with the RNG reset to `seed`; returns outputs, aux, grads and d(context)."""
    model.transformer.recompute_in_backward = recompute
    model.zero_grad(set_to_none=True)
    ctx_leaf = None
    if context is not None:
        ctx_leaf = context.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    logits, aux = model(x, input_mask=input_mask, context=ctx_leaf)
    weights = torch.linspace(-1., 1., logits.numel(), dtype=logits.dtype).view_as(logits)
    loss = (logits * weights).sum() + 10. * aux
    loss.backward()
    grads = {name: (None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}
    return logits.detach(), aux.detach(), grads, (None if ctx_leaf is None else ctx_leaf.grad)


def assert_grads_equal(got, expected, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        g, e = got[name], expected[name]
        assert (g is None) == (e is None), f'{name}: gradient exists on only one path'
        if e is not None:
            err = (g - e).abs().max().item()
            assert err <= atol, f'{name}: max abs grad diff {err:.3g}'


REVERSIBLE_CONFIGS = {
    'dropouts_chunks_layerdrop': dict(depth=3, attn_dropout=0.2, ff_dropout=0.2, ff_chunks=4, layer_dropout=0.4,
                                      attn_layer_dropout=0.1),
    'moe_pkm_memkv': dict(depth=2, moe_layers=(1,), pkm_layers=(2,), pkm_num_keys=32, num_mem_kv=2, attn_dropout=0.1),
    'causal_local_shift': dict(causal=True, n_local_attn_heads=1, local_attn_window_size=4, shift_tokens=True,
                               attn_dropout=0.1),
    'causal_tied_sharedqk_rezero': dict(causal=True, depth=3, weight_tie=True, shared_qk=True, use_rezero=True,
                                        num_mem_kv=1),
    'context_norms': dict(receives_context=True, attn_dropout=0.1, use_scale_norm=True, moe_layers=(2,)),
    'causal_context_all_local_rms': dict(causal=True, receives_context=True, n_local_attn_heads=2,
                                         local_attn_window_size=8, use_rms_norm=True, layer_dropout=0.3, depth=3),
}


@pytest.mark.parametrize('config', list(REVERSIBLE_CONFIGS))
def test_reversible_recompute_equals_plain_autograd(config):
    kwargs = REVERSIBLE_CONFIGS[config]
    model = make_lm(**kwargs).train()
    torch.manual_seed(100)
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))
    context = torch.randn(2, 5, DIM, dtype=torch.float64) if kwargs.get('receives_context') else None
    input_mask = None
    if not kwargs.get('causal'):
        input_mask = torch.ones(2, SEQ, dtype=torch.bool)
        input_mask[1, -3:] = False

    out_a, aux_a, grads_a, dctx_a = run_once(model, x, recompute=True, seed=7, context=context, input_mask=input_mask)
    out_b, aux_b, grads_b, dctx_b = run_once(model, x, recompute=False, seed=7, context=context, input_mask=input_mask)

    assert torch.allclose(out_a, out_b, atol=1e-6, rtol=0)
    assert torch.allclose(aux_a, aux_b, atol=1e-6, rtol=0)
    assert_grads_equal(grads_a, grads_b)
    if context is not None:
        assert dctx_a is not None and dctx_b is not None
        assert dctx_b.abs().max() > 0
        assert torch.allclose(dctx_a, dctx_b, atol=1e-6, rtol=0)
    if kwargs.get('moe_layers'):
        # the MoE balance loss is in the aux loss, and its gradient reaches the gating weights
        assert aux_b.item() > 0
        gate = [name for name in grads_a if name.endswith('gate.w_gating')]
        assert gate and all(grads_a[name].abs().max() > 0 for name in gate)

    # the check can fail: a different dropout draw gives different numbers
    if kwargs.get('attn_dropout') or kwargs.get('ff_dropout'):
        out_c, *_ = run_once(model, x, recompute=True, seed=8, context=context, input_mask=input_mask)
        assert not torch.allclose(out_a, out_c, atol=1e-6)


def test_reversible_coupling_formula_one_block():
    # both streams start at x: y1 = x + f(x), y2 = x + g(y1), output (y1 + y2) / 2
    torch.manual_seed(0)
    model = build_transformer(dim=DIM, depth=1, heads=2, reversible=True).double().eval()
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64)
    out, _ = model(x, LayerContext())
    block = model.blocks[0]
    f, _ = block.f(x, LayerContext())
    y1 = x + f
    g, _ = block.g(y1, LayerContext())
    assert torch.allclose(out, (y1 + x + g) / 2, atol=1e-12)


def test_parameter_grads_when_lm_input_needs_no_grad():
    model = make_lm(depth=2, moe_layers=(2,)).train()
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))
    _, _, grads, _ = run_once(model, x, recompute=True, seed=3)
    for name, g in grads.items():
        assert g is not None, f'{name} got no gradient'
        assert g.abs().max() > 0, f'{name} got a zero gradient'


def test_bare_transformer_param_grads_without_input_grad():
    torch.manual_seed(0)
    model = build_transformer(dim=DIM, depth=2, heads=2, reversible=True).double()
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64)   # requires_grad False
    assert not x.requires_grad
    grads = {}
    for recompute in (True, False):
        model.recompute_in_backward = recompute
        model.zero_grad(set_to_none=True)
        out, aux = model(x, LayerContext())
        assert out.requires_grad
        (out.sin().sum() + aux).backward()
        grads[recompute] = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}
    for name, g in grads[True].items():
        assert g is not None and g.abs().max() > 0, name
    assert_grads_equal(grads[True], grads[False], atol=1e-10)


def test_reversible_input_gradient_equals_plain():
    torch.manual_seed(0)
    model = build_transformer(dim=DIM, depth=3, heads=2, reversible=True, causal=True, num_mem_kv=2).double()
    x = torch.randn(2, SEQ, DIM, dtype=torch.float64)
    dx = {}
    for recompute in (True, False):
        model.recompute_in_backward = recompute
        leaf = x.clone().requires_grad_()
        out, _ = model(leaf, LayerContext())
        out.cos().sum().backward()
        dx[recompute] = leaf.grad
    assert torch.allclose(dx[True], dx[False], atol=1e-10)


def test_gradcheck_tiny_reversible_transformer():
    torch.manual_seed(0)
    model = build_transformer(dim=8, depth=2, heads=2, reversible=True, causal=True).double()
    model.eval()  # no dropout anywhere; recompute still runs: it is keyed on grad mode, not training
    assert model.recompute_in_backward
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: model(t, LayerContext())[0], (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradcheck_reversible_with_context():
    torch.manual_seed(0)
    model = build_transformer(dim=8, depth=2, heads=2, reversible=True, receives_context=True).double().eval()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    fn = lambda t, c: model(t, LayerContext(context=c))[0]
    assert torch.autograd.gradcheck(fn, (x, context), eps=1e-6, atol=1e-5, fast_mode=True)


class CountingRouter(FullRouter):
    """Full attention that records what `cached` it gets and the plan it returns."""

    def __init__(self):
        super().__init__()
        self.calls = []   # (cached, returned)

    def route(self, inp):
        cached = inp.cached
        if cached is not None:
            assert isinstance(cached, RoutePlan)
            plan = cached
        else:
            plan = RoutePlan(q_index=None, kv_index=None, router_state=dict(call=len(self.calls)))
        self.calls.append((cached, plan))
        return plan


def test_backward_recompute_replays_cached_plans():
    torch.manual_seed(0)
    routers = []

    def make_router(layer):
        routers.append(CountingRouter())
        return routers[-1]

    depth = 3
    transformer = build_transformer(dim=DIM, depth=depth, heads=2, causal=True, reversible=True,
                                    make_router=make_router)
    model = LM(num_tokens=NUM_TOKENS, dim=DIM, max_seq_len=SEQ, transformer=transformer, causal=True)
    assert len(routers) == depth
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))
    logits, aux = model(x)
    # forward: each router called once, with nothing cached
    assert [len(r.calls) for r in routers] == [1] * depth
    assert all(r.calls[0][0] is None for r in routers)
    logits.sum().backward()
    # backward recompute: each router called once more, handed back exactly the plan it made
    assert [len(r.calls) for r in routers] == [2] * depth
    for r in routers:
        (_, first), (cached, _) = r.calls
        assert cached is first

    # with plain autograd there is no recompute: routers run once per forward
    model.transformer.recompute_in_backward = False
    for r in routers:
        r.calls.clear()
    model(x)[0].sum().backward()
    assert [len(r.calls) for r in routers] == [1] * depth
    # and no grad mode runs the stack without the custom Function: one call, nothing cached
    model.transformer.recompute_in_backward = True
    for r in routers:
        r.calls.clear()
    with torch.no_grad():
        model(x)
    assert [len(r.calls) for r in routers] == [1] * depth and all(r.calls[0][0] is None for r in routers)


def test_backward_recompute_replays_plans_of_tied_layers():
    # one router shared by every layer (weight_tie): the plans are kept per layer
    router = CountingRouter()
    torch.manual_seed(0)
    transformer = build_transformer(dim=DIM, depth=3, heads=2, reversible=True, weight_tie=True,
                                    make_router=lambda layer: router)
    model = LM(num_tokens=NUM_TOKENS, dim=DIM, max_seq_len=SEQ, transformer=transformer)
    model(torch.randint(0, NUM_TOKENS, (1, SEQ)))[0].sum().backward()
    assert len(router.calls) == 6
    forward_plans = [plan for cached, plan in router.calls[:3]]
    assert all(cached is None for cached, _ in router.calls[:3])
    # backward runs the layers in reverse order and gets each layer's own plan
    replayed = [cached for cached, _ in router.calls[3:]]
    assert all(a is b for a, b in zip(replayed, forward_plans[::-1]))


def test_reversible_recompute_under_autocast_matches_plain_autograd():
    torch.manual_seed(0)
    model = TransformerLM(num_tokens=NUM_TOKENS, dim=DIM, depth=3, max_seq_len=SEQ, heads=2, dim_head=8,
                          reversible=True)
    x = torch.randint(0, NUM_TOKENS, (2, SEQ))
    grads = {}
    for recompute in (True, False):
        model.transformer.recompute_in_backward = recompute
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits, _ = model(x)
        logits.float().square().mean().backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, expected in grads[False].items():
        rel = ((grads[True][name] - expected).abs().max() / expected.abs().max()).item()
        assert rel < 1e-3, f'{name}: relative grad difference {rel:.3g}'


class PassThroughBlock(torch.nn.Module):
    """Branches that hand back their input (f) or pass gradients through unchanged (g): the
    residual arithmetic, which reuses the branch outputs' memory, must not write into them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def f(self, x, ctx):
        return x, x.new_zeros(())

    def g(self, x, ctx):
        return x * self.w, x.new_zeros(())


def test_reversible_branches_that_alias_their_input():
    block = PassThroughBlock()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    results = {}
    for recompute in (True, False):
        leaf = x.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        y1, y2, _ = reversible_stack(leaf, leaf, [(0, block), (1, block)], LayerContext(),
                                     recompute_in_backward=recompute)
        ((y1 + y2) * torch.linspace(-1., 1., x.numel(), dtype=x.dtype).view_as(x)).sum().backward()
        assert torch.equal(leaf.detach(), x)  # the input is untouched
        results[recompute] = (y1.detach(), y2.detach(), leaf.grad, block.w.grad)
    for got, expected in zip(results[True], results[False]):
        assert torch.allclose(got, expected, atol=1e-12)
