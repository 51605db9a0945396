"""MoBA (block selection) and DSA (token selection by a lightning indexer) against dense references
written from their papers' rules, cached decoding against the full forward pass, gradients and
bad input. Causality of every causal configuration is in tests/test_causality.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from routeformer import AutoregressiveWrapper, DSARouter, DSATransformerLM, MoBARouter, MoBATransformerLM
from routeformer.attention.executor import RoutedAttention

NUM_TOKENS, DIM = 32, 32


def qkv(b=2, h=2, n=23, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))


def masked_attention(q, k, v, allowed):
    """Dense attention of q, k, v (b, h, n, d) where allowed (b, h, n, m) admits a key."""
    logits = torch.einsum('b h n d, b h m d -> b h n m', q, k) / math.sqrt(q.shape[-1])
    return torch.einsum('b h n m, b h m d -> b h n d', logits.masked_fill(~allowed, float('-inf')).softmax(-1), v)


# ---------------------------------------------------------------- MoBA

def moba_reference(q, k, block_size, top_k, causal, mask=None):
    """Which keys every query attends, by the paper's rule, one query at a time."""
    b, h, n, _ = q.shape
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    allowed = torch.zeros(b, h, n, n, dtype=torch.bool)
    blocks = [range(s, min(n, s + block_size)) for s in range(0, n, block_size)]
    for bi in range(b):
        for hi in range(h):
            for t in range(n):
                own = t // block_size
                scores = {}
                for c, members in enumerate(blocks):
                    real = [s for s in members if valid[bi, s]]
                    if (c < own if causal else c != own) and real:
                        scores[c] = float(q[bi, hi, t] @ k[bi, hi, real].mean(0))
                best = sorted(scores, key=lambda c: (-scores[c], c))[:top_k]
                for c in [own, *best]:
                    for s in blocks[c]:
                        allowed[bi, hi, t, s] = valid[bi, s] and (s <= t or not causal)
    return allowed


@pytest.fixture(params=['compact', 'per_query'])
def layout(request, monkeypatch):
    """Both plans of each selector: the compact one (MoBA: a group per key block and run of the
    queries that chose it, merged by log-sum-exp; DSA at these short lengths: one dense group masked
    to the selections) and a group per query (MoBA: what a compiled graph takes; DSA: what long
    sequences take; forced here)."""
    import routeformer.routers.selection as selection
    if request.param == 'per_query':
        monkeypatch.setattr(selection, 'compiling', lambda: True)
        monkeypatch.setattr(selection, 'DENSE_RATIO', 0)
    return request.param


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('padded', [False, True])
@pytest.mark.parametrize('block_size,top_k', [(4, 2), (5, 1), (8, 10)])
def test_moba_equals_the_dense_reference(causal, padded, block_size, top_k, layout):
    q, k, v = qkv()
    mask = None
    if padded:
        mask = torch.ones(2, 23, dtype=torch.bool)
        mask[0, :6] = False  # left padding: a whole block and part of one
    router = MoBARouter(block_size=block_size, top_k=top_k)
    plan = router(q, k, causal=causal, mask=mask)
    assert (plan.q_index.shape[-1] == 1) == (layout == 'per_query')
    out, _ = RoutedAttention(backend='reference')(q, k, v, plan, causal=causal, key_mask=mask)
    allowed = moba_reference(q, k, block_size, top_k, causal, mask)
    rows = allowed.any(-1, keepdim=True)  # a padded query with no real key before it gets zeros
    expected = masked_attention(q, k, v, allowed).masked_fill(~rows, 0.)
    assert torch.allclose(out, expected, atol=1e-12)


def test_moba_gradcheck(layout):
    q, k, v = (t[:1, :1, :10].requires_grad_() for t in qkv())
    plan = MoBARouter(block_size=3, top_k=1)(q, k, causal=True)
    executor = RoutedAttention()
    assert torch.autograd.gradcheck(lambda q, k, v: executor(q, k, v, plan, causal=True)[0], (q, k, v))


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('backend', ['reference', 'auto'])
@pytest.mark.parametrize('memory', [False, True])
def test_groups_per_key_block_equal_groups_per_query(causal, backend, memory):
    """The two plans of selected blocks give the same output and gradients, with padded keys,
    queries without any block, popular blocks (more queries than a group holds) and memory
    key/values, which each of a query's groups holds and the merge counts once. Every query has a
    block (its own, as in MoBA and NSA)."""
    from routeformer.routers.selection import block_slots, key_block_plan, per_query_plan
    q, k, v = (t.requires_grad_() for t in qkv(n=23))
    g = torch.Generator().manual_seed(1)
    size, n = 4, 23
    scores = torch.rand(2, 2, n, 6, generator=g)
    scores[..., 0] += 1.  # block 0 is chosen by most queries: several groups
    blocks = scores.topk(3, dim=-1).indices
    own = torch.arange(n).view(1, 1, n, 1) // size
    blocks = torch.cat((own.expand(2, 2, n, 1), blocks.masked_fill(blocks == own, -1)), dim=-1)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :6] = False
    mem = tuple(torch.randn(2, 3, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)) if memory else None
    executor = RoutedAttention(backend=backend)
    results = []
    for plan in (per_query_plan(block_slots(blocks, size, n)), key_block_plan(blocks, size, n)):
        out, _ = executor(q, k, v, plan, causal=causal, key_mask=mask, mem_kv=mem)
        leaves = (q, k, v, *(mem or ()))
        results.append((out, torch.autograd.grad(out.square().sum(), leaves)))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads_a, grads_b))


def test_groups_per_key_block_gradcheck():
    from routeformer.routers.selection import key_block_plan
    q, k, v = (t[:1, :1, :9].requires_grad_() for t in qkv())
    mem = tuple(torch.randn(1, 2, 8, dtype=torch.float64).requires_grad_() for _ in range(2))
    blocks = torch.tensor([[0, -1], [0, -1], [0, -1], [1, 0], [1, 0], [1, 0], [2, 0], [2, 1], [2, -1]]).view(1, 1, 9, 2)
    plan = key_block_plan(blocks, 3, 9)
    executor = RoutedAttention()
    assert torch.autograd.gradcheck(lambda *t: executor(*t[:3], plan, causal=True, mem_kv=t[3:])[0], (q, k, v, *mem))


def moba_lm(**kwargs):
    torch.manual_seed(0)
    cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=64, heads=2, dim_head=8, causal=True,
               block_size=4, top_k=2)
    return MoBATransformerLM(**{**cfg, **kwargs})


def dsa_lm(**kwargs):
    torch.manual_seed(0)
    cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=64, heads=2, dim_head=8, causal=True,
               index_n_heads=2, index_head_dim=8, index_topk=6)
    return DSATransformerLM(**{**cfg, **kwargs})


DECODE_CONFIGS = {
    'moba': lambda: moba_lm(),
    'moba_local_memkv_shift': lambda: moba_lm(n_local_attn_heads=1, local_attn_window_size=4, num_mem_kv=2,
                                              shift_tokens=True),
    'moba_reversible_absolute': lambda: moba_lm(reversible=True, pos_emb='absolute'),
    'dsa': lambda: dsa_lm(),
    'dsa_local_memkv_shift': lambda: dsa_lm(n_local_attn_heads=1, local_attn_window_size=4, num_mem_kv=2,
                                            shift_tokens=True),
    'dsa_reversible': lambda: dsa_lm(reversible=True),
}


@pytest.mark.parametrize('make', DECODE_CONFIGS.values(), ids=DECODE_CONFIGS.keys())
def test_cached_step_logits_equal_the_full_forward(make, layout):
    """Distinct tokens: a repeated token scores exactly as its earlier copy in the full pass, and
    the projections of one cached row round differently from those of the whole sequence, so
    which of two tied tokens wins the last slot may differ (DSA's top-k over tokens)."""
    model = make().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.randperm(NUM_TOKENS, generator=g)[:28] for _ in range(2)])
    with torch.no_grad():
        full, _ = model(x)
        cache = {}
        steps = [model(x[:, :12], cache=cache)[0]]  # a prefill of whole local windows
        steps += [model(x[:, i:i + 1], cache=cache)[0] for i in range(12, 28)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize('make', DECODE_CONFIGS.values(), ids=DECODE_CONFIGS.keys())
def test_cached_generation_equals_uncached(make):
    wrapper = AutoregressiveWrapper(make())
    for n in (9, 1):  # a one-token prompt decodes from an empty cache
        x = torch.randint(0, NUM_TOKENS, (2, n), generator=torch.Generator().manual_seed(n))
        assert torch.equal(wrapper.generate(x, 20, temperature=0), wrapper.generate(x, 20, temperature=0, use_cache=False))


@pytest.mark.parametrize('make', [moba_lm, dsa_lm])
def test_training_step_and_left_padded_prompts(make):
    model = make()
    x = torch.randint(0, NUM_TOKENS, (2, 24))
    loss = AutoregressiveWrapper(model)(x, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # padding in front of a prompt changes nothing a real token sees
    model.eval()
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, :5] = False
    shifted = x.clone()
    shifted[0, :5] = (x[0, :5] + 7) % NUM_TOKENS
    with torch.no_grad():
        a, _ = model(x, input_mask=mask)
        b, _ = model(shifted, input_mask=mask)
    assert torch.allclose(a[mask], b[mask], atol=1e-6)


# ---------------------------------------------------------------- DSA

@torch.no_grad()
def dsa_reference(router, q, k, causal, mask=None):
    """The indexer's top-k earlier tokens of every query, from I(t, s) = sum_j w_tj relu(q_tj . k_s)."""
    ix = router.indexer
    x_q = q.permute(0, 2, 1, 3).flatten(2)
    x_k = k.permute(0, 2, 1, 3).flatten(2)
    iq = ix.to_q(x_q).unflatten(-1, (ix.heads, -1))
    w = ix.to_w(x_q) * ix.heads ** -0.5
    ik = ix.to_k(x_k)
    b, n = q.shape[0], q.shape[2]
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    allowed = torch.zeros(b, 1, n, n, dtype=torch.bool)
    for bi in range(b):
        for t in range(n):
            scores = {s: float((F.relu(iq[bi, t] @ ik[bi, s] * ix.scale) * w[bi, t]).sum())
                      for s in range(n) if valid[bi, s] and (s <= t or not causal)}
            for s in sorted(scores, key=lambda s: (-scores[s], s))[:router.topk]:
                allowed[bi, 0, t, s] = True
    return allowed


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('padded', [False, True])
def test_dsa_equals_the_dense_reference(causal, padded, layout):
    q, k, v = qkv()
    mask = None
    if padded:
        mask = torch.ones(2, 23, dtype=torch.bool)
        mask[1, :4] = False
    router = DSARouter(heads=2, dim_head=8, index_n_heads=3, index_head_dim=4, index_topk=5).double().eval()
    plan = router(q, k, causal=causal, mask=mask)
    assert (plan.kv_index is None) == (layout == 'compact')
    out, _ = RoutedAttention(backend='reference')(q, k, v, plan, causal=causal, key_mask=mask)
    allowed = dsa_reference(router, q, k, causal, mask).expand(2, 2, 23, 23)
    rows = allowed.any(-1, keepdim=True)
    assert torch.allclose(out, masked_attention(q, k, v, allowed).masked_fill(~rows, 0.), atol=1e-12)


def test_dsa_index_loss_is_the_kl_to_the_main_attention_and_trains_only_the_indexer(layout):
    q, k, _ = (t.requires_grad_() for t in qkv(n=12))
    router = DSARouter(heads=2, dim_head=8, index_n_heads=2, index_head_dim=4, index_topk=4).double().train()
    plan = router(q, k, causal=True)
    index = plan.router_state['index']                                                   # (b, n, k)
    valid = index >= 0
    # the KL, written out: the heads' softmax over the selected tokens, summed and renormalised
    picked = torch.stack([k[bi][:, index[bi].clamp(min=0)] for bi in range(2)])  # (b, h, n, k, d)
    logits = torch.einsum('b h n d, b h n k d -> b h n k', q, picked) / math.sqrt(8)
    p = logits.masked_fill(~valid[:, None], float('-inf')).softmax(-1).sum(1)
    p = (p / p.sum(-1, keepdim=True)).detach()
    iq, w, ik = router.indexer(q, k)
    scores = router.indexer.scores_at(iq, w, ik, index).masked_fill(~valid, float('-inf'))
    expected = torch.where(valid, p * (p.clamp(min=1e-30).log() - scores.log_softmax(-1)), 0.).sum(-1).mean()
    assert torch.allclose(plan.aux_loss, expected, atol=1e-12) and plan.aux_loss >= 0
    plan.aux_loss.backward()
    assert q.grad is None and k.grad is None  # the indexer's loss never changes the main attention
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.indexer.parameters())

    names = [name for name, _ in router.indexer.named_parameters()]

    def loss(*params):
        iq, w, ik = torch.func.functional_call(router.indexer, dict(zip(names, params)), (q.detach(), k.detach()))
        return router.index_loss(q.detach(), k.detach(), index, iq, w, ik)
    assert torch.autograd.gradcheck(loss, tuple(p.detach().clone().requires_grad_() for p in router.indexer.parameters()))


def test_dsa_dense_warmup_attends_everything_then_selects():
    model = dsa_lm(index_topk=2, dense_warmup_steps=2).train()
    router = model.transformer.blocks[0].mixers[0].fn.routers[0]
    x = torch.randint(0, NUM_TOKENS, (2, 16))
    plans = []
    for _ in range(3):
        plan = router(torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8), causal=True)
        plans.append(plan)
    assert plans[0].mask is None and plans[1].mask is None  # dense: full causal attention
    assert plans[2].router_state['index'].shape[-1] == 2 and plans[2].mask.sum(-1).max() == 2 and int(router.steps) == 3
    assert all(torch.isfinite(p.aux_loss) for p in plans)
    model(x)  # the model trains through both stages


@pytest.mark.parametrize('make,kwargs,name', [
    (moba_lm, dict(block_size=0), 'block_size'), (moba_lm, dict(top_k=0), 'top_k'),
    (dsa_lm, dict(index_topk=0), 'index_topk'), (dsa_lm, dict(index_n_heads=0), 'index_n_heads'),
])
def test_bad_sizes(make, kwargs, name):
    with pytest.raises(ValueError, match=f'^{name} must be a positive integer, got 0$'):
        make(**kwargs)


def test_moba_routes_self_attention_only():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match='MoBA routes self-attention'):
        MoBARouter(block_size=4)(q, k[:, :, :10], causal=False)
