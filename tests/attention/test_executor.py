"""The routed-attention executor against dense attention written out in the test.

Every expected value here is computed from first principles (an explicit admissibility mask over
original positions and a plain softmax), never through the executor's own mask builder.
"""

import itertools

import pytest
import torch

from routeformer.attention.executor import RoutedAttention
from routeformer.attention.plan import RoutePlan
from routeformer.routers import FullRouter, LocalRouter

from probes import CAUSAL_CONFIGS, logits_of, non_causal_configs, tokens

B, H, N, D = 2, 3, 16, 8


def seeded(seed=0):
    torch.manual_seed(seed)


def qkv(n=N, dtype=torch.float64, b=B, h=H, d=D, n_kv=None):
    n_kv = n if n_kv is None else n_kv
    return (torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, h, n_kv, d, dtype=dtype),
            torch.randn(b, h, n_kv, d, dtype=dtype))


def dense(q, k, v, allowed, mem=None):
    """softmax(q k^T / sqrt(d)) v over the keys `allowed` (b|1, h|1, n, n_kv) permits; memory
    key/values (h, m, d) are visible to every query. Rows with nothing admissible come out NaN."""
    if mem is not None:
        mk, mv = mem
        b = q.shape[0]
        k = torch.cat((mk.expand(b, -1, -1, -1), k), dim=-2)
        v = torch.cat((mv.expand(b, -1, -1, -1), v), dim=-2)
        allowed = torch.cat((torch.ones(*allowed.shape[:-1], mk.shape[-2], dtype=torch.bool).expand(
            *allowed.shape[:-1], -1), allowed), dim=-1)
    sim = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    sim = sim.masked_fill(~allowed, float('-inf'))
    return sim.softmax(dim=-1) @ v


def causal_mask(n, n_kv=None):
    n_kv = n if n_kv is None else n_kv
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n_kv).view(1, -1)
    return j <= i


def trailing_key_mask(lengths, n):
    return torch.arange(n).view(1, -1) < torch.tensor(lengths).view(-1, 1)


def banded_mask(n, window, back, fwd, causal):
    """Query in window a sees key windows a-back .. a+fwd (whole windows), plus causal."""
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    qa, ka = i // window, j // window
    allowed = (ka >= qa - back) & (ka <= qa + (0 if causal else fwd))
    if causal:
        allowed &= j <= i
    return allowed


def flange_mask(n, query_shape, flange, causal):
    """Block a = [a*s, (a+1)*s) of queries sees `flange` tokens before the block, and `flange`
    after it when not causal (Routing Transformer's local attention), plus causal."""
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    start = (i // query_shape) * query_shape
    end = start + query_shape
    allowed = (j >= start - flange) & (j < end + (0 if causal else flange))
    if causal:
        allowed &= j <= i
    return allowed


def run(q, k, v, plan, backend='reference', **kwargs):
    attn = RoutedAttention(backend=backend).eval()
    out, _ = attn(q, k, v, plan, **kwargs)
    return out


def plan_of(router, q, k, causal, key_mask=None):
    return router(q, k, causal=causal, mask=key_mask)


def assert_rows_close(out, expected, rows, atol):
    """Compare the (b, h, n, d) outputs on the rows (b|1, h|1, n) selects."""
    rows = rows.expand(out.shape[:-1])
    assert rows.any()
    diff = (out - expected).abs()[rows]
    assert torch.isfinite(expected[rows]).all()
    assert diff.max().item() <= atol, f'max abs diff {diff.max().item():.3g} > {atol}'


# ---------------------------------------------------------------- reference == SDPA

class MaskedFullRouter(FullRouter):
    """Full attention plus a fixed random router mask (b|1, h|1, 1, n, n)."""

    def route(self, inp):
        q, k = inp.q, inp.k
        g = torch.Generator().manual_seed(123)
        rmask = torch.rand(1, q.shape[1], 1, q.shape[-2], k.shape[-2], generator=g) < 0.6
        return RoutePlan(q_index=None, kv_index=None, mask=rmask)


ROUTERS = {
    'full': lambda: FullRouter(),
    'full_masked': lambda: MaskedFullRouter(),
    'local4': lambda: LocalRouter(4),
    'local4_b2_f1': lambda: LocalRouter(4, look_backward=2, look_forward=1),
    'local_flange': lambda: LocalRouter.from_query_shape(4, 3),
}


@pytest.mark.parametrize('router', list(ROUTERS))
@pytest.mark.parametrize('dtype,atol', [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=['f32', 'f64'])
def test_reference_equals_sdpa(router, dtype, atol):
    seeded(1)
    q, k, v = qkv(dtype=dtype)
    mem = (torch.randn(H, 2, D, dtype=dtype), torch.randn(H, 2, D, dtype=dtype))
    key_mask = trailing_key_mask([N, N - 5], N)
    r = ROUTERS[router]()
    checked = 0
    for causal, use_key_mask, use_mem, exclude_self in itertools.product([False, True], repeat=4):
        km = key_mask if use_key_mask else None
        plan = plan_of(r, q, k, causal, km)
        kwargs = dict(causal=causal, key_mask=km, mem_kv=mem if use_mem else None, exclude_self=exclude_self)
        ref = run(q, k, v, plan, 'reference', **kwargs)
        fast = run(q, k, v, plan, 'sdpa', **kwargs)
        assert ref.dtype == fast.dtype == dtype
        assert torch.isfinite(ref).all()
        err = (ref - fast).abs().max().item()
        assert err <= atol, f'causal={causal} key_mask={use_key_mask} mem={use_mem} exclude_self={exclude_self}: {err}'
        checked += 1
    assert checked == 16


def test_auto_backend_equals_reference():
    seeded(2)
    q, k, v = qkv(dtype=torch.float64)
    for router in (FullRouter(), LocalRouter(4)):
        for causal in (False, True):
            plan = plan_of(router, q, k, causal)
            ref = run(q, k, v, plan, 'reference', causal=causal)
            auto = run(q, k, v, plan, 'auto', causal=causal)
            assert torch.allclose(ref, auto, atol=1e-10)


# ---------------------------------------------------------------- FullRouter == dense

@pytest.mark.parametrize('backend', ['reference', 'sdpa'])
@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('use_key_mask', [False, True])
def test_full_router_equals_dense(backend, causal, use_key_mask):
    seeded(3)
    q, k, v = qkv()
    key_mask = trailing_key_mask([N - 3, 6], N) if use_key_mask else None
    plan = plan_of(FullRouter(), q, k, causal, key_mask)
    out = run(q, k, v, plan, backend, causal=causal, key_mask=key_mask)

    allowed = torch.ones(1, 1, N, N, dtype=torch.bool)
    if causal:
        allowed = allowed & causal_mask(N)
    if key_mask is not None:
        allowed = allowed & key_mask.view(B, 1, 1, N)
    expected = dense(q, k, v, allowed)
    assert_rows_close(out, expected, allowed.any(-1), 1e-10)


def test_full_router_cross_attention_lengths():
    # queries and keys of different lengths (cross-attention) with a context mask
    seeded(4)
    q, k, v = qkv(n=6, n_kv=10)
    key_mask = trailing_key_mask([10, 4], 10)
    out = run(q, k, v, FullRouter()(q, k, causal=False, mask=key_mask), key_mask=key_mask)
    expected = dense(q, k, v, key_mask.view(B, 1, 1, 10).expand(B, 1, 6, 10))
    assert_rows_close(out, expected, torch.ones(B, 1, 6, dtype=torch.bool), 1e-10)


def test_full_router_mem_kv_equals_dense():
    seeded(5)
    q, k, v = qkv()
    mem = (torch.randn(H, 3, D, dtype=torch.float64), torch.randn(H, 3, D, dtype=torch.float64))
    for causal in (False, True):
        out = run(q, k, v, FullRouter()(q, k, causal=causal), causal=causal, mem_kv=mem)
        allowed = causal_mask(N).view(1, 1, N, N) if causal else torch.ones(1, 1, N, N, dtype=torch.bool)
        expected = dense(q, k, v, allowed, mem=(mem[0].unsqueeze(0), mem[1].unsqueeze(0)))
        assert torch.allclose(out, expected, atol=1e-10)


# ---------------------------------------------------------------- LocalRouter == dense band

@pytest.mark.parametrize('backend', ['reference', 'sdpa'])
@pytest.mark.parametrize('window,look_backward,look_forward', [
    (2, 1, None), (4, 1, None), (4, 2, None), (4, 1, 0), (4, 1, 2), (4, 2, 1), (8, 1, None), (16, 1, None),
])
@pytest.mark.parametrize('causal', [False, True])
def test_local_router_equals_dense_band(backend, window, look_backward, look_forward, causal):
    seeded(6)
    q, k, v = qkv()
    key_mask = trailing_key_mask([N, N - 3], N)
    router = LocalRouter(window, look_backward=look_backward, look_forward=look_forward)
    plan = plan_of(router, q, k, causal, key_mask)
    out = run(q, k, v, plan, backend, causal=causal, key_mask=key_mask)

    # non-causal local attention looks as far forward as backward unless look_forward says otherwise
    fwd = look_backward if look_forward is None else look_forward
    allowed = banded_mask(N, window, look_backward, fwd, causal).view(1, 1, N, N) & key_mask.view(B, 1, 1, N)
    expected = dense(q, k, v, allowed)
    assert_rows_close(out, expected, allowed.any(-1), 1e-10)
    # and it really is sparse: the dense full attention gives something else
    if window * (1 + look_backward + fwd) < N:
        full = dense(q, k, v, key_mask.view(B, 1, 1, N).expand(B, 1, N, N))
        assert not torch.allclose(out, full, atol=1e-3)


@pytest.mark.parametrize('query_shape,flange', [(4, 3), (4, 4), (2, 5), (8, 1)])
@pytest.mark.parametrize('causal', [False, True])
def test_local_router_from_query_shape_equals_dense(query_shape, flange, causal):
    seeded(7)
    q, k, v = qkv()
    router = LocalRouter.from_query_shape(query_shape, flange)
    out = run(q, k, v, plan_of(router, q, k, causal), causal=causal)
    allowed = flange_mask(N, query_shape, flange, causal).view(1, 1, N, N)
    expected = dense(q, k, v, allowed)
    assert torch.allclose(out, expected, atol=1e-10)


def test_local_router_mem_kv_and_exclude_self_equal_dense():
    seeded(8)
    q, k, v = qkv()
    mem = (torch.randn(H, 2, D, dtype=torch.float64), torch.randn(H, 2, D, dtype=torch.float64))
    router = LocalRouter(4)
    out = run(q, k, v, plan_of(router, q, k, True), causal=True, mem_kv=mem)
    allowed = banded_mask(N, 4, 1, 0, True).view(1, 1, N, N)
    expected = dense(q, k, v, allowed, mem=(mem[0].unsqueeze(0), mem[1].unsqueeze(0)))
    assert torch.allclose(out, expected, atol=1e-10)

    # exclude_self without memory: the diagonal is admissible only where nothing else is
    out = run(q, k, v, plan_of(router, q, k, True), causal=True, exclude_self=True)
    eye = torch.eye(N, dtype=torch.bool)
    allowed = banded_mask(N, 4, 1, 0, True) & ~eye
    allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))
    expected = dense(q, k, v, allowed.view(1, 1, N, N))
    assert torch.allclose(out, expected, atol=1e-10)


# ---------------------------------------------------------------- logsumexp merge

def overlapping_plan(q_groups, kv_groups, merge='logsumexp'):
    return RoutePlan(q_index=torch.tensor(q_groups).view(1, 1, len(q_groups), -1),
                     kv_index=torch.tensor(kv_groups).view(1, 1, len(kv_groups), -1), merge=merge)


def expected_union(q, k, v, q_groups, kv_groups, causal=False):
    """Dense attention where query i sees the union of the keys of every group it is in."""
    n = q.shape[-2]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    chosen = torch.zeros(n, dtype=torch.bool)
    for qs, ks in zip(q_groups, kv_groups):
        for i in qs:
            if i < 0:
                continue
            chosen[i] = True
            for j in ks:
                if j >= 0:
                    allowed[i, j] = True
    if causal:
        allowed &= causal_mask(n)
    out = dense(q, k, v, allowed.view(1, 1, n, n))
    return out, chosen, allowed


@pytest.mark.parametrize('backend', ['reference', 'auto', 'flash_lse'])
def test_logsumexp_merge_is_attention_over_union(backend):
    seeded(9)
    n = 8
    q, k, v = qkv(n=n)
    # query 2 is in both groups (keys 0-2 and 3-5); query 6 is in both (keys 6-7 and 3-5)
    q_groups = [[0, 1, 2, 6], [2, 3, 4, 6]]
    kv_groups = [[0, 1, 2, -1, 6, 7], [3, 4, 5, -1, -1, -1]]
    plan = overlapping_plan(q_groups, kv_groups)
    out = run(q, k, v, plan, backend)

    expected, chosen, _ = expected_union(q, k, v, q_groups, kv_groups)
    assert torch.allclose(out[:, :, chosen], expected[:, :, chosen], atol=1e-10)
    single = torch.tensor([0, 1, 3, 4])
    assert torch.allclose(out[:, :, single], expected[:, :, single], atol=1e-12)
    # positions no group chose (5, 7) get zeros
    assert torch.equal(out[:, :, ~chosen], torch.zeros_like(out[:, :, ~chosen]))
    # and the union really differs from either group alone
    only_first = dense(q, k, v, torch.tensor([[j in (0, 1, 2, 6, 7) for j in range(n)]] * n).view(1, 1, n, n))
    assert not torch.allclose(out[:, :, 2], only_first[:, :, 2], atol=1e-3)


def test_logsumexp_merge_float32_and_key_padding():
    # float32 inputs, and a key mask that pads out key 5: query 2 sees keys 0-4
    seeded(9)
    n = 8
    q, k, v = qkv(n=n, dtype=torch.float32)
    q_groups = [[0, 1, 2, 6], [2, 3, 4, 6]]
    kv_groups = [[0, 1, 2, -1, 6, 7], [3, 4, 5, -1, -1, -1]]
    key_mask = torch.ones(B, n, dtype=torch.bool)
    key_mask[:, 5] = False
    out = run(q, k, v, overlapping_plan(q_groups, kv_groups), key_mask=key_mask)
    _, chosen, allowed = expected_union(q, k, v, q_groups, kv_groups)
    allowed = allowed & key_mask.view(B, 1, 1, n)
    expected = dense(q, k, v, allowed)
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, :, chosen], expected[:, :, chosen], atol=1e-5)


def test_logsumexp_merge_per_batch_and_head_plans():
    # plans that differ across batch and heads (b, h, g, i): each row merged independently
    seeded(10)
    n = 6
    q, k, v = qkv(n=n, b=2, h=2)
    q_index = torch.tensor([
        [[[0, 1, 2], [2, 3, 4]], [[5, 0, 1], [1, 3, 5]]],
        [[[4, 5, 0], [0, 2, 4]], [[1, 2, 3], [3, 4, 5]]],
    ])
    kv_index = torch.tensor([
        [[[0, 1, 2], [3, 4, 5]], [[0, 1, 5], [2, 3, 4]]],
        [[[4, 5, 0], [1, 2, 3]], [[1, 2, 3], [0, 4, 5]]],
    ])
    plan = RoutePlan(q_index=q_index, kv_index=kv_index, merge='logsumexp')
    out = run(q, k, v, plan)
    for bi, hi in itertools.product(range(2), range(2)):
        qg, kg = q_index[bi, hi].tolist(), kv_index[bi, hi].tolist()
        exp, chosen, _ = expected_union(q[bi:bi + 1, hi:hi + 1], k[bi:bi + 1, hi:hi + 1], v[bi:bi + 1, hi:hi + 1], qg, kg)
        got = out[bi, hi]
        assert torch.allclose(got[chosen], exp[0, 0][chosen], atol=1e-10)
        assert (got[~chosen] == 0).all()


def test_sdpa_rejects_logsumexp_plan():
    q, k, v = qkv(n=4)
    plan = overlapping_plan([[0, 1], [1, 2]], [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match='log-sum-exp'):
        run(q, k, v, plan, 'sdpa')


@pytest.mark.parametrize('backend', ['reference', 'flash_lse'])
def test_logsumexp_merge_group_without_admissible_key_contributes_nothing(backend):
    # causal: query 2 is in group 0 (keys 0-2) and in group 1 whose keys (3-5) are all in its future.
    # Attention over the union of the *admissible* keys is attention over keys 0-2.
    seeded(11)
    n = 6
    q, k, v = qkv(n=n)
    q_groups = [[0, 1, 2], [2, 3, 4]]
    kv_groups = [[0, 1, 2], [3, 4, 5]]
    out = run(q, k, v, overlapping_plan(q_groups, kv_groups), backend, causal=True)
    expected, chosen, allowed = expected_union(q, k, v, q_groups, kv_groups, causal=True)
    # the leak itself: query 2's output must not depend on the value at its future position 5
    v_future = v.clone()
    v_future[:, :, 5] += 1.
    out_future = run(q, k, v_future, overlapping_plan(q_groups, kv_groups), backend, causal=True)
    assert torch.equal(out_future[:, :, :5], out[:, :, :5])
    rows = chosen & allowed.any(-1)
    assert torch.allclose(out[:, :, rows], expected[:, :, rows], atol=1e-10)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- exclude_self

@pytest.mark.parametrize('backend', ['reference', 'sdpa'])
def test_exclude_self_causal(backend):
    seeded(12)
    q, k, v = qkv()
    out = run(q, k, v, FullRouter()(q, k, causal=True), backend, causal=True, exclude_self=True)
    # position 0 has no other admissible key: it attends to itself, i.e. returns its own value
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-12)
    # every later position attends strictly to its past
    strict = torch.ones(N, N, dtype=torch.bool).tril(-1)
    expected = dense(q, k, v, strict.view(1, 1, N, N))
    assert torch.allclose(out[:, :, 1:], expected[:, :, 1:], atol=1e-10)


def test_exclude_self_non_causal_and_weights():
    seeded(13)
    q, k, v = qkv()
    attn = RoutedAttention(backend='reference')
    out, weights = attn(q, k, v, FullRouter()(q, k, causal=False), exclude_self=True, need_weights=True)
    diag = weights.probs[:, :, 0].diagonal(dim1=-2, dim2=-1)
    assert torch.equal(diag, torch.zeros_like(diag))
    assert torch.allclose(weights.probs.sum(-1), torch.ones(()).double())
    expected = dense(q, k, v, ~torch.eye(N, dtype=torch.bool).view(1, 1, N, N))
    assert torch.allclose(out, expected, atol=1e-10)


def test_exclude_self_with_key_padding():
    # sample 0 has a single real key (position 0): query 0's only other keys are padding, so it keeps
    # itself; sample 1 is unpadded, so every query sees every key but itself
    seeded(14)
    q, k, v = qkv()
    key_mask = trailing_key_mask([1, N], N)   # sample 0: only key 0 is real
    out = run(q, k, v, FullRouter()(q, k, causal=False), causal=False, key_mask=key_mask, exclude_self=True)
    assert torch.allclose(out[0, :, 0], v[0, :, 0], atol=1e-12)
    expected = dense(q[1:], k[1:], v[1:], ~torch.eye(N, dtype=torch.bool).view(1, 1, N, N))
    assert torch.allclose(out[1:], expected, atol=1e-10)


# ---------------------------------------------------------------- bad input

def test_unknown_backend_raises():
    with pytest.raises(ValueError, match='unknown attention backend'):
        RoutedAttention(backend='flash_attn_typo')


def test_local_router_rejects_length_not_multiple():
    q, k, _ = qkv(n=10)
    with pytest.raises(ValueError, match='Autopadder') as info:
        LocalRouter(4)(q, k, causal=True)
    assert 'multiple of 4' in str(info.value)


def test_local_router_rejects_bad_window():
    with pytest.raises(ValueError, match='window_size'):
        LocalRouter(0)


# ---------------------------------------------------------------- gates and additive bias

def test_gates_and_bias_match_an_explicit_computation():
    torch.manual_seed(5)
    b, h, n, d = 2, 2, 8, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    kv_index = torch.arange(n).view(1, 1, 2, 4).repeat(b, h, 1, 1)
    q_index = kv_index.clone()
    k_gate, kv_gate = torch.rand(b, h, 2, 4, dtype=torch.float64), torch.rand(b, h, 2, 4, dtype=torch.float64)
    q_gate, bias = torch.rand(b, h, 2, 4, dtype=torch.float64), torch.randn(b, h, 2, 4, 4, dtype=torch.float64)
    plan = RoutePlan(q_index=q_index, kv_index=kv_index, k_gate=k_gate, kv_gate=kv_gate, q_gate=q_gate, bias=bias)
    outs = {name: RoutedAttention(backend=name)(q, k, v, plan)[0] for name in ('reference', 'sdpa')}

    # by hand: two blocks of four, keys and values scaled, logits biased, outputs scaled
    qb, kb, vb = (t.view(b, h, 2, 4, d) for t in (q, k, v))
    sim = (qb @ (kb * k_gate[..., None]).transpose(-1, -2)) * d ** -0.5 + bias
    expected = (sim.softmax(-1) @ (vb * kv_gate[..., None])) * q_gate[..., None]
    for out in outs.values():
        assert torch.allclose(out, expected.reshape(b, h, n, d), atol=1e-10)


# ---------------------------------------------------------------- groups attended in pieces

def piece_configs():
    """The configurations whose attention gathers keys by index into many groups (full and local
    attention, and CoLT5's one group of routed tokens, are one call)."""
    routed = ('routing', 'sinkhorn', 'reformer')
    return [(name, factory) for name, factory in CAUSAL_CONFIGS + non_causal_configs()
            if any(family in name for family in routed) and 'full_attn' not in name]


def outputs_and_grads_of(factory):
    """A function giving the logits and parameter gradients of the model `factory` builds, in float64
    (two runs differ only in summation order) and eval mode (fixed routing; gradients still flow)."""
    model, context = factory()
    model.double().eval()
    context = context.double() if context is not None and context.is_floating_point() else context
    x = tokens(n=getattr(model, 'max_seq_len', 16), vocab=getattr(model, 'num_tokens', 32))
    kwargs = dict(context=context) if context is not None else {}

    def run():
        model.zero_grad(set_to_none=True)
        out = logits_of(model(x, **kwargs))
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return run


def assert_same_outputs_and_grads(got, expected):
    (out, grads), (expected_out, expected_grads) = got, expected
    torch.testing.assert_close(out, expected_out, atol=1e-10, rtol=1e-10)
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-9, rtol=1e-9, msg=name)


@pytest.mark.parametrize('factory', [c[1] for c in piece_configs()], ids=[c[0] for c in piece_configs()])
def test_groups_in_pieces_equal_one_call(factory, monkeypatch):
    """Every model, with each group of every routed call attended as a piece of its own, gives the
    outputs and gradients of one call over all groups (tiny models run as one piece by default)."""
    import routeformer.attention.executor as executor

    outputs_and_grads = outputs_and_grads_of(factory)
    whole = outputs_and_grads()
    monkeypatch.setattr(executor, 'PIECE_BYTES', 1)
    calls = []
    original = executor.piece_bounds
    monkeypatch.setattr(executor, 'piece_bounds', lambda *a: calls.append(original(*a)) or calls[-1])
    pieces = outputs_and_grads()
    assert max(len(bounds) for bounds in calls) > 1, 'no call was cut into pieces'
    assert_same_outputs_and_grads(pieces, whole)


@pytest.mark.parametrize('config', ['reformer_4hashes', 'routing_local_heads', 'sinkhorn_top2'])
def test_recorded_weights_in_pieces_equal_one_call(config, monkeypatch):
    """The Recorder's dense weights (the log-sum-exp shares of every group) do not depend on pieces."""

    import routeformer.attention.executor as executor
    from routeformer import Recorder

    model, _ = dict(piece_configs())[config]()
    recorder = Recorder(model.eval())
    x = tokens(n=model.max_seq_len, vocab=model.num_tokens)
    with torch.no_grad():
        recorder(x)
        monkeypatch.setattr(executor, 'PIECE_BYTES', 1)
        recorder(x)
    whole, pieces = recorder.recordings
    assert len(whole) == len(pieces) > 0
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(b['attn'], a['attn'], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('merge', ['overwrite', 'logsumexp'])
def test_scatter_in_steps_gradcheck(merge, monkeypatch):
    """The weighted scatter, run a few rows at a time, whole or in pieces, against float64 finite
    differences: group outputs and log-sum-exps, with empty query slots (-1) and positions chosen by
    several groups."""
    import routeformer.attention.plan as plan_module
    from routeformer.attention.plan import scatter

    monkeypatch.setattr(plan_module, 'SCATTER_ROWS', 5)
    seeded(4)
    n, g, i = 7, 3, 4
    if merge == 'overwrite':  # every position in at most one group
        q_index = torch.tensor([[0, 1, 2, -1], [3, 4, -1, -1], [5, 6, -1, -1]])
    else:
        q_index = torch.tensor([[0, 1, 2, 6], [2, 3, 4, -1], [6, 5, 0, -1]])
    plan = RoutePlan(q_index=q_index.view(1, 1, g, i).expand(B, H, g, i), kv_index=None, merge=merge)
    out = torch.randn(B, H, g, i, D, dtype=torch.float64, requires_grad=True)
    lse = torch.randn(B, H, g, i, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda o, l: scatter([o], plan, n, lse=l), (out, lse))
    # the executor's pieces (consecutive along the group axis) as they are
    torch.autograd.gradcheck(lambda o, l: scatter(list(o.split([1, 2], dim=2)), plan, n, lse=l), (out, lse))
    # and the forward pass is the plain sum of weighted rows
    result = scatter([out], plan, n, lse=lse)
    torch.testing.assert_close(scatter(list(out.split([2, 1], dim=2)), plan, n, lse=lse), result)
    if merge == 'overwrite':
        expected = torch.zeros(B, H, n, D, dtype=torch.float64)
        for gi in range(g):
            for slot in range(i):
                if q_index[gi, slot] >= 0:
                    expected[:, :, q_index[gi, slot]] += out[:, :, gi, slot]
        torch.testing.assert_close(result, expected)


# ---------------------------------------------------------------- the lean flash path

def lsh_setup(causal, padded, n_mem, seed=15, n=16, window=4, rounds=3):
    """q, k, v, memory key/values, key mask and an LSH plan (3 rounds, buckets of 4) in float64, all
    requiring grad. Padding (the last 5 keys of sample 0) leaves queries without an admissible key."""
    from routeformer.routers.lsh import LSHRouter

    seeded(seed)
    q, k, v = (t.requires_grad_() for t in qkv(n=n))
    mem = tuple(torch.randn(H, n_mem, D, dtype=torch.float64, requires_grad=True) for _ in range(2)) if n_mem else None
    key_mask = trailing_key_mask([n - 5, n], n) if padded else None
    router = LSHRouter(bucket_size=window, n_hashes=rounds)
    buckets = router.with_padding_bucket(torch.randint(0, 4, (B, H, rounds, n)), key_mask, 4)
    return q, k, v, mem, key_mask, router.plan(buckets, causal=causal, dtype=torch.float64)


LEAN_CASES = [dict(causal=True, padded=False, n_mem=0), dict(causal=True, padded=True, n_mem=0),
              dict(causal=True, padded=True, n_mem=2), dict(causal=False, padded=True, n_mem=1)]


@pytest.mark.parametrize('case', LEAN_CASES, ids=lambda c: '-'.join(f'{k}{int(v)}' for k, v in c.items()))
@pytest.mark.parametrize('piece_bytes', [None, 1])
def test_lean_flash_path_equals_reference(case, piece_bytes, monkeypatch):
    """Groups gathered by index through the CPU flash kernel as one node (the flash_lse backend)
    give the reference backend's outputs and gradients, for q, k, v and memory key/values, with
    key padding, shared-QK self-exclusion and rows without any admissible key."""
    import routeformer.attention.backends as backends
    import routeformer.attention.executor as executor

    if piece_bytes:
        monkeypatch.setattr(executor, 'PIECE_BYTES', piece_bytes)
    q, k, v, mem, key_mask, plan = lsh_setup(**case)
    kwargs = dict(causal=case['causal'], key_mask=key_mask, mem_kv=mem, exclude_self=True)
    inputs = (q, k, v, *(mem or ()))
    calls = []
    original = backends.flash_pieces
    monkeypatch.setattr(backends, 'flash_pieces', lambda source, *a: calls.append(source.count) or original(source, *a))

    results = {}
    for backend in ('reference', 'flash_lse'):
        out, _ = RoutedAttention(backend=backend)(q, k, v, plan, **kwargs)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, D, dtype=out.dtype)).sum(), inputs)
        results[backend] = out, grads
    assert calls and (piece_bytes is None or calls[0] > 1), 'the lean path did not run (in pieces)'
    (out, grads), (lean_out, lean_grads) = results['reference'], results['flash_lse']
    torch.testing.assert_close(lean_out, out, atol=1e-10, rtol=1e-10)
    for name, got, expected in zip(('q', 'k', 'v', 'mem_k', 'mem_v'), lean_grads, grads):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10, msg=name)


def lean_configs():
    """Routed models whose groups take the lean path: Sinkhorn scales values by its sort scores
    (gates) and relative positions add learned logits, both of which the generic path differentiates."""
    return [(name, factory) for name, factory in piece_configs() if 'sinkhorn' not in name and 'relative' not in name]


@pytest.mark.parametrize('factory', [c[1] for c in lean_configs()], ids=[c[0] for c in lean_configs()])
def test_models_on_the_lean_path_equal_the_generic_path(factory, monkeypatch):
    """Every routed model gives the same outputs and parameter gradients whether its index-gathered
    groups take the lean flash path or the generic one (gather, attend, scatter under autograd)."""
    import routeformer.attention.backends as backends

    outputs_and_grads = outputs_and_grads_of(factory)
    calls = []
    original = backends.flash_pieces
    monkeypatch.setattr(backends, 'flash_pieces', lambda *a: calls.append(1) or original(*a))
    lean = outputs_and_grads()
    assert calls, 'no attention call took the lean path'
    monkeypatch.setattr(RoutedAttention, 'lean', lambda *a, **k: False)
    assert_same_outputs_and_grads(lean, outputs_and_grads())


def test_lean_flash_path_gradcheck(monkeypatch):
    """float64 finite differences through the lean path, in pieces: q, k, v and memory key/values."""
    import routeformer.attention.executor as executor

    monkeypatch.setattr(executor, 'PIECE_BYTES', 2000)
    q, k, v, mem, key_mask, plan = lsh_setup(causal=True, padded=True, n_mem=1, n=8, window=2)
    attn = RoutedAttention(backend='flash_lse')
    torch.autograd.gradcheck(lambda q, k, v, mk, mv: attn(q, k, v, plan, causal=True, key_mask=key_mask,
                                                         mem_kv=(mk, mv), exclude_self=True)[0],
                             (q, k, v, *mem))


def test_lean_flash_path_keeps_nothing_gathered():
    """What the lean path keeps for the backward pass is q, k, v and the group outputs: a fraction
    of what autograd keeps through the gathered copies and masks (the point of the path)."""
    q, k, v, _, _, plan = lsh_setup(causal=True, padded=False, n_mem=0, n=64, window=8)

    def saved_bytes(backend):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            RoutedAttention(backend=backend)(q, k, v, plan, causal=True, exclude_self=True)
        return sum(storages.values())

    rounds = plan.q_index.shape[2] * plan.q_index.shape[3] // q.shape[2]
    q_bytes, row_bytes = q.numel() * q.element_size(), rounds * q.numel() // D * 8
    lean = saved_bytes('flash_lse')
    # q, k, v and every round's outputs; per gathered row a few scalars (log-sum-exps, scatter rows, shares)
    assert lean <= (3 + rounds) * q_bytes + 12 * row_bytes
    assert lean < saved_bytes('reference') / 3


@pytest.mark.parametrize('backend', ['reference', 'flash_lse'])
@pytest.mark.parametrize('padded', [False, True])
@pytest.mark.parametrize('n_mem', [0, 2])
@pytest.mark.parametrize('exclude_self', [False, True])
def test_key_spans_equal_the_same_keys_as_a_mask(backend, padded, n_mem, exclude_self):
    """A causal plan's key spans (the arithmetic path: self-exclusion as the span's last slot) give
    what the same admitted keys give as a router mask under the positional predicates."""
    from routeformer.attention.executor import in_span, span_bounds

    q, k, v, mem, key_mask, plan = lsh_setup(causal=True, padded=padded, n_mem=n_mem)
    as_mask = RoutePlan(q_index=plan.q_index, kv_index=plan.kv_index, bias=plan.bias, merge=plan.merge,
                        mask=in_span(*span_bounds(plan.span), plan.kv_index.shape[-1]))
    kwargs = dict(causal=True, key_mask=key_mask, mem_kv=mem, exclude_self=exclude_self)
    attn = RoutedAttention(backend=backend)
    torch.testing.assert_close(attn(q, k, v, plan, **kwargs)[0], attn(q, k, v, as_mask, **kwargs)[0],
                               atol=1e-12, rtol=1e-12)


def test_lean_flash_path_in_bfloat16():
    """The lean path runs the kernel in the inputs' precision: bfloat16 q, k, v, with float32 memory
    key/values, give the float32 result to bfloat16 precision, and gradients of every input."""
    q, k, v, mem, key_mask, plan = lsh_setup(causal=True, padded=True, n_mem=2)
    kwargs = dict(causal=True, key_mask=key_mask, exclude_self=True)
    attn = RoutedAttention(backend='flash_lse')
    expected, _ = attn(q.float(), k.float(), v.float(), plan, mem_kv=tuple(t.float() for t in mem), **kwargs)
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    mem32 = tuple(t.detach().float().requires_grad_() for t in mem)
    out, _ = attn(q16, k16, v16, plan, mem_kv=mem32, **kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    for t in (q16, k16, v16, *mem32):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert mem32[0].grad.dtype == torch.float32
