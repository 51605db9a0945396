"""MoSA: the router against a dense reference of the method, its causal thresholds (causal,
tracked from training forwards, NaN-safe, discardable), cached decoding and bad input."""

import math

import pytest
import torch

from routeformer import AutoregressiveWrapper, MoSARouter, MoSATransformerLM, discard_statistics
from routeformer.context import LayerContext
from routeformer.layers.attention import Attention
from routeformer.routers.mosa import SelectionCache

NUM_TOKENS = 32


def tokens(b=2, n=32, seed=1):
    return torch.randint(0, NUM_TOKENS, (b, n), generator=torch.Generator().manual_seed(seed))


def lm(train_step=True, **kwargs):
    torch.manual_seed(0)
    cfg = dict(num_tokens=NUM_TOKENS, dim=16, depth=2, max_seq_len=32, heads=2, dim_head=8, causal=True, sparsity=4)
    cfg.update(kwargs)
    model = MoSATransformerLM(**cfg)
    if train_step:  # thresholds from data
        logits, aux = model(tokens(seed=7))
        (logits.mean() + aux).backward()
    return model


def routers_of(model):
    return [m for m in model.modules() if isinstance(m, MoSARouter)]


# ---------------------------------------------------------------- a dense reference of the method

def attention_layer(causal, **router_kwargs):
    torch.manual_seed(0)
    router = MoSARouter(heads=2, dim_head=4, **router_kwargs)
    return Attention(8, heads=2, dim_head=4, causal=causal, router=router).double().eval()  # thresholds stay


def reference(attn, x, causal, mask=None):
    """MoSA written densely: per head, the selected tokens as a 0/1 vector, attention among them
    (causal by position), the output scaled by the gate, zero where the head selected nothing;
    with `value_gate` the values scaled by it too. The gate is the score, or in causal mode with
    `threshold_gate` the score relative to the threshold,
    sigmoid(logit(s) - logit(tau)) = s (1 - tau) / (s (1 - tau) + tau (1 - s))."""
    router = attn.routers[0]
    q, k, v = attn.project(x, x)
    b, h, n, d = q.shape
    logits = torch.einsum('bhnd,ehd->ben', q, router.weight)
    s = torch.sigmoid(logits)
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    chosen = torch.zeros(b, h, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            if causal:
                taken = 0
                for t in range(n):
                    if valid[bi, t] and s[bi, hi, t] >= router.threshold()[hi] and taken < (router.capacity or n):
                        chosen[bi, hi, t], taken = True, taken + 1
            else:
                top = max(int(n // router.sparsity), 2)
                best = s[bi, hi].masked_fill(~valid[bi], -1).topk(top).indices
                chosen[bi, hi, best] = valid[bi, best]
    allowed = chosen[..., None, :] & chosen[..., :, None] & valid[:, None, None, :]
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    logits = torch.einsum('bhid,bhjd->bhij', q, k) / math.sqrt(d)
    weights = logits.masked_fill(~allowed, float('-inf')).softmax(dim=-1).nan_to_num(0.)
    gate = s
    if causal and router.threshold_gate:
        tau = router.threshold()[:, None]
        gate = s * (1 - tau) / (s * (1 - tau) + tau * (1 - s))
    if router.value_gate:
        v = v * (gate * chosen)[..., None]
    out = torch.einsum('bhij,bhjd->bhid', weights, v) * (gate * chosen)[..., None]
    return attn.to_out(out.transpose(1, 2).reshape(b, n, h * d))


GATES = {'score_gate': dict(), 'threshold_gate': dict(threshold_gate=True),
         'value_gate': dict(value_gate=True), 'both_gates': dict(threshold_gate=True, value_gate=True)}


@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'expert_choice'])
@pytest.mark.parametrize('gates', GATES.values(), ids=GATES.keys())
def test_equals_a_dense_reference(causal, gates):
    attn = attention_layer(causal, sparsity=3, capacity=5, **gates)
    router = attn.routers[0]
    router.threshold_ema.fill_(0.4)  # a threshold of 0.4, where the two gates differ
    router.threshold_weight.fill_(1.)
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False
    for m in (None, mask):
        out, _ = attn(x, LayerContext(mask=m))
        expected = reference(attn, x, causal, m)
        rows = slice(None) if m is None else m  # padded positions' outputs are not defined
        assert torch.allclose(out[rows], expected[rows], atol=1e-12)
    if causal:  # more tokens passed the threshold than a head can take: the capacity cut was exercised
        passed = router.scores(attn.project(x, x)[0]) >= 0.4
        assert int(passed.sum(dim=-1).max()) > router.capacity


@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'expert_choice'])
@pytest.mark.parametrize('gates', GATES.values(), ids=GATES.keys())
def test_gradcheck(causal, gates):
    """Gradients reach the inputs and the router (through the gates that scale the outputs, and
    with `value_gate` the values)."""
    attn = attention_layer(causal, sparsity=2, **gates)
    attn.routers[0].threshold_ema.fill_(0.3)  # the causal gate is then not the score itself
    attn.routers[0].threshold_weight.fill_(1.)
    x = torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True)
    w = attn.routers[0].weight.detach().clone().requires_grad_()

    def fn(x, w):
        return torch.func.functional_call(attn, {'routers.0.weight': w}, (x, LayerContext()))[0]
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize('gates', GATES.values(), ids=GATES.keys())
def test_reversible_gradients_equal_the_plain_model(gates):
    """A reversible recompute replays the selection and recomputes the differentiable gates, against
    the thresholds the forward pass admitted by (the forward has moved them since)."""
    grads = []
    for recompute in (False, True):
        model = lm(train_step=False, reversible=True, **gates).double()
        model.transformer.recompute_in_backward = recompute  # False: the same coupling, plain autograd
        logits, aux = model(tokens())
        logits.square().mean().backward()
        grads.append([r.weight.grad.clone() for r in routers_of(model)])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, atol=1e-10)


# ---------------------------------------------------------------- causal thresholds

def test_causal_gates_ignore_a_shift_of_all_logits():
    """Admission follows the scores' quantile, so a head whose logits all fall by c selects the same
    tokens once its threshold follows; the causal gate, relative to the threshold, is unchanged
    too and at least 0.5 for every admitted token (the score as the gate would shrink by ~e^-c)."""
    router = MoSARouter(heads=2, dim_head=4).double()
    logits = torch.randn(1, 2, 16, dtype=torch.float64)
    tau = torch.tensor([0.4, 0.6], dtype=torch.float64)
    shift = 6.
    shifted_tau = torch.sigmoid(torch.logit(tau) - shift)
    gates = router.gate_values(logits, tau)
    assert torch.allclose(router.gate_values(logits - shift, shifted_tau), gates, atol=1e-12)
    admitted = torch.sigmoid(logits) >= tau[:, None]
    assert admitted.any() and (gates[admitted] >= 0.5).all()
    assert torch.equal(router.gate_values(logits, None), torch.sigmoid(logits))


def test_thresholds_come_from_training_forwards_and_keep_one_in_sparsity():
    """Thresholds move only in training forwards; after a few on one batch about n / sparsity
    tokens pass (the EMA of the batch quantile that keeps that many)."""
    model = lm(train_step=False, sparsity=4)
    x = tokens()
    before = [r.threshold().clone() for r in routers_of(model)]
    model.eval()
    with torch.no_grad():
        model(x)
    assert all(torch.equal(r.threshold(), t) for r, t in zip(routers_of(model), before))
    assert all(torch.equal(t, torch.full_like(t, 0.5)) for t in before)
    model.train()
    for _ in range(5):
        model(x)
    model.eval()
    recordings = []
    with torch.no_grad():
        model(x, recordings=recordings)
    for rec in recordings:
        selected = (rec['plan'].router_state['selected'] >= 0).sum(dim=-1).float()  # (b, h)
        assert selected.mean().item() == pytest.approx(32 / 4, rel=0.35), selected


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_a_nonfinite_token_counts_as_padding(value):
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 16, 4, dtype=torch.float64), torch.randn(2, 2, 16, 4, dtype=torch.float64)
    poisoned, masked = (MoSARouter(heads=2, dim_head=4, sparsity=4).double().train() for _ in range(2))
    masked.load_state_dict(poisoned.state_dict())
    bad = q.clone()
    bad[0, :, 5, 1] = value
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 5] = False
    plan = poisoned(bad, k, causal=True)
    masked(q, k, causal=True, mask=mask)
    assert torch.isfinite(poisoned.threshold()).all()
    assert torch.equal(poisoned.threshold(), masked.threshold())
    assert not (plan.router_state['selected'][0] == 5).any()  # never selected


def test_discard_statistics_undoes_a_skipped_step():
    model = lm(train_step=False, weight_tie=True)  # a tied router updates once per layer in one step
    x = tokens()
    logits, aux = model(x)
    logits.mean().backward()  # a completed step
    kept = {name: b.clone() for name, b in model.named_buffers()}
    logits, aux = model(tokens(seed=3))  # the step to skip (its backward runs, then it is skipped)
    logits.mean().backward()
    assert any(not torch.equal(b, kept[name]) for name, b in model.named_buffers())
    discard_statistics(model)
    for name, b in model.named_buffers():
        assert torch.equal(b, kept[name]), name
    # the next step starts from the kept thresholds, as if the skipped one never ran
    reference = lm(train_step=False, weight_tie=True)
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m(tokens(seed=4))
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name


def test_expert_choice_form_is_not_causal():
    """The encoder form's top-k over the whole sequence depends on later tokens (which is why the
    decoder admits by threshold)."""
    model = lm(train_step=False, causal=False).eval()
    x = tokens()
    changed = x.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % NUM_TOKENS
    with torch.no_grad():
        assert not torch.allclose(model(x)[0][:, :20], model(changed)[0][:, :20])


# ---------------------------------------------------------------- cached decoding

DECODE_CONFIGS = {  # (prompt length, model keywords); a prompt of one token decodes from an empty cache
    'empty_cache': (1, dict()),
    'capacity_overflow_include_first': (9, dict(capacity_factor=1, sparsity=8, include_first=True)),
    'local_dense_memkv_reversible_shift': (9, dict(heads=4, n_local_attn_heads=1, num_dense_heads=1, num_mem_kv=2,
                                                   reversible=True, shift_tokens=True)),
    'both_gates': (9, dict(threshold_gate=True, value_gate=True)),
    'value_gate_capacity_overflow': (9, dict(capacity_factor=1, sparsity=8, value_gate=True)),
}


@pytest.mark.parametrize('n, kwargs', DECODE_CONFIGS.values(), ids=DECODE_CONFIGS.keys())
def test_cached_generation_equals_uncached(n, kwargs):
    wrapper = AutoregressiveWrapper(lm(**kwargs))
    x = tokens(n=n)
    assert torch.equal(wrapper.generate(x, 12, temperature=0), wrapper.generate(x, 12, temperature=0, use_cache=False))


@pytest.mark.parametrize('gates', GATES.values(), ids=GATES.keys())
def test_cached_step_logits_equal_the_full_forward(gates):
    model = lm(num_mem_kv=1, **gates).eval()
    x = tokens()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        full, _ = model(x, input_mask=mask)
        cache = {}
        steps = [model(x[:, :10], input_mask=mask[:, :10], cache=cache)[0]]
        steps += [model(x[:, i:i + 1], input_mask=mask[:, :i + 1], cache=cache)[0] for i in range(10, 32)]
    assert torch.allclose(torch.cat(steps, dim=1)[mask], full[mask], atol=1e-5)
    # a head's set holds what passed its threshold, at most its capacity
    state = next(c for v in cache.values() for c in getattr(v, 'routers', ()) if isinstance(c, SelectionCache))
    assert state.selected.shape[:2] == (2, 2) and int(state.count.max()) <= routers_of(model)[0].capacity


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('kwargs, match', [
    (dict(sparsity=0), 'sparsity'),
    (dict(sparsity='4'), 'sparsity'),
    (dict(capacity_factor=0.5), 'capacity_factor'),
    (dict(num_dense_heads=3), 'num_dense_heads'),
    (dict(num_dense_heads=1, n_local_attn_heads=2), 'num_dense_heads'),
    (dict(threshold_decay=1.), 'threshold_decay'),
])
def test_bad_input_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        lm(train_step=False, **kwargs)
    assert '\n' not in str(info.value)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match='num_clusters'):
        lm(train_step=False, num_clusters=4)
