"""Sinkhorn Transformer: the sort-net router against dense references (full attention when every
block is selected, values not keys, gates = sort scores), Gumbel-Sinkhorn, sortcut, strict
causality and cached decoding at the router level, and the seed API end to end (README examples,
Autopadder, AutoregressiveWrapper, encoder-decoder, reversible, padding, errors)."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from routeformer import (Autopadder, AutoregressiveWrapper, Recorder, SinkhornRouter, SinkhornTransformer,
                         SinkhornTransformerEncDec, SinkhornTransformerLM)
from routeformer.attention import RoutedAttention
from routeformer.routers import RouteInput
from routeformer.routers.sinkhorn import masked_softmax, sinkhorn

B, H, D, W = 2, 2, 8, 4
NUM_TOKENS = 32


def qkv(n=16, seed=0, b=B, h=H, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, D, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for _ in range(3)]


def router(**kwargs):
    torch.manual_seed(0)
    cfg = dict(bucket_size=W, heads=H, dim_head=D)
    cfg.update(kwargs)
    return SinkhornRouter(**cfg).double().eval()


def attend(q, k, v, plan, causal=False, key_mask=None, need_weights=False):
    return RoutedAttention(backend='reference')(q, k, v, plan, causal=causal, key_mask=key_mask,
                                                need_weights=need_weights)


def dense_gates(plan, n, m):
    """The plan as dense (b, h, n, m) matrices: which (query, key) pairs are gathered and with what
    value weight."""
    b, h, c, j = plan.kv_index.shape
    w = plan.q_index.shape[-1]
    seen = torch.zeros(b, h, n, m, dtype=torch.float64)
    gate = torch.zeros(b, h, n, m, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for g in range(c):
                for slot in range(j):
                    key = int(plan.kv_index[bi, hi, g, slot])
                    if key < 0:
                        continue
                    rows = slice(g * w, (g + 1) * w)
                    seen[bi, hi, rows, key] += 1
                    gate[bi, hi, rows, key] = plan.kv_gate[bi, hi, g, slot].detach()
    return seen, gate


def dense_reference(q, k, v, seen, gate, causal=False):
    """softmax over the gathered keys (each counted as often as it is gathered) of gated values."""
    n, m = q.shape[-2], k.shape[-2]
    sim = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + seen.log()
    if causal:
        sim = sim.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(), float('-inf'))
    return torch.einsum('bhij,bhij,bhjd->bhid', sim.softmax(-1), gate, v)


# ---------------------------------------------------------------- every block selected = full attention

NON_CAUSAL_MODES = {
    'attention_softmax': dict(),
    'attention_sinkhorn': dict(non_permutative=False, sinkhorn_iter=7),
    'simple_softmax': dict(use_simple_sort_net=True, max_seq_len=16),
    'simple_sinkhorn': dict(use_simple_sort_net=True, max_seq_len=16, non_permutative=False),
    'sortcut': dict(n_sortcut=4),
    'sortcut_sinkhorn': dict(n_sortcut=4, non_permutative=False),
}


@pytest.mark.parametrize('mode', list(NON_CAUSAL_MODES))
def test_selecting_every_block_is_full_attention_with_gated_values(mode):
    q, k, v = qkv()
    r = router(n_top_buckets=4, **NON_CAUSAL_MODES[mode])  # 4 blocks: more than there are candidates
    plan = r(q, k, causal=False)
    out, weights = attend(q, k, v, plan, need_weights=True)
    seen, gate = dense_gates(plan, 16, 16)
    assert torch.equal(seen, torch.ones_like(seen))  # every key exactly once: no duplicated own block
    from routeformer.attention.recording import dense_weights
    full = ((q @ k.transpose(-1, -2)) * D ** -0.5).softmax(-1)
    assert torch.allclose(dense_weights(weights, plan, 16, 16), full, atol=1e-12)
    assert torch.allclose(out, dense_reference(q, k, v, seen, gate), atol=1e-12)
    own = torch.block_diag(*[torch.ones(W, W)] * 4).bool()
    assert torch.all(gate[..., own] == 1)  # the own block has weight 1


def test_sortcut_selects_one_set_of_blocks_for_every_query_block():
    q, k, v = qkv()
    plan = router(n_sortcut=1)(q, k, causal=False)
    blocks = plan.router_state['blocks']  # (b, h, c, 1): the shared choice, emptied where it is the own block
    chosen = plan.router_state['select'][..., 0, 0]
    for c in range(4):
        expected = torch.where(chosen == c, -1, chosen)
        assert torch.equal(blocks[..., c, 0], expected)


# ---------------------------------------------------------------- values, not keys (seed defect SK-1)

def test_selected_blocks_contribute_their_values():
    q, k, v = qkv()
    plan = router(n_top_buckets=1)(q, k, causal=False)
    out, _ = attend(q, k, v, plan)
    chosen = int(plan.router_state['blocks'][0, 0, 0, 0])  # the block query block 0 of sample 0, head 0 selected
    assert chosen not in (-1, 0)
    others = [c for c in range(1, 4) if c != chosen]

    v2 = v.clone()
    v2[0, 0, chosen * W:(chosen + 1) * W] += 1.
    changed, _ = attend(q, k, v2, plan)
    assert (changed[0, 0, :W] - out[0, 0, :W]).abs().min() > 1e-3  # the selected block's values arrive

    v3 = v.clone()
    for c in others:
        v3[0, 0, c * W:(c + 1) * W] += 1.
    unchanged, _ = attend(q, k, v3, plan)
    assert torch.equal(unchanged[0, 0, :W], out[0, 0, :W])  # unselected blocks stay out


# ---------------------------------------------------------------- the sort net

def test_attention_sort_net_gates_are_softmax_of_block_scores_at_temperature():
    q, k, v = qkv()
    r = router(n_top_buckets=2, temperature=0.5)
    plan = r(q, k, causal=False)
    sq = q.view(B, H, 4, W, D).mean(-2)
    sk = k.view(B, H, 4, W, D).mean(-2)
    scores = (sq @ sk.transpose(-1, -2)) * D ** -0.5
    scores = scores.masked_fill(torch.eye(4, dtype=torch.bool), float('-inf'))  # own block excluded
    probs = (scores / 0.5).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(plan.router_state['blocks'], top.indices)
    gates = plan.kv_gate[..., :2 * W:W]
    assert torch.allclose(gates, top.values, atol=1e-12)


@pytest.mark.parametrize('kwargs', [dict(), dict(use_simple_sort_net=True, max_seq_len=16),
                                    dict(causal=True), dict(causal=True, use_simple_sort_net=True, max_seq_len=16),
                                    dict(non_permutative=False), dict(n_sortcut=2)],
                         ids=['attention', 'simple', 'causal', 'causal_simple', 'sinkhorn', 'sortcut'])
def test_sort_net_learns_through_the_gates(kwargs):
    q, k, v = qkv(requires_grad=True)
    r = router(n_top_buckets=2, **kwargs).train()
    plan = r(q, k, causal=kwargs.get('causal', False))
    out, _ = attend(q, k, v, plan, causal=kwargs.get('causal', False))
    out.square().sum().backward()
    params = [p for p in r.parameters()]
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the gates carry gradient into the queries (the attention sort net has no weights of its own)
    q_grad = q.grad.clone()
    q.grad = None
    plan_detached = r(q, k, causal=kwargs.get('causal', False))
    plan_detached.kv_gate = plan_detached.kv_gate.detach()
    out, _ = attend(q, k, v, plan_detached, causal=kwargs.get('causal', False))
    out.square().sum().backward()
    assert not torch.allclose(q.grad, q_grad)


def test_gumbel_noise_only_in_training():
    q, k, v = qkv()
    for kwargs in (dict(non_permutative=False), dict(non_permutative=False, n_sortcut=2)):
        r = router(n_top_buckets=2, **kwargs)
        r.eval()
        assert torch.equal(r(q, k, causal=False).kv_gate, r(q, k, causal=False).kv_gate)
        r.train()
        torch.manual_seed(1)
        a = r(q, k, causal=False).kv_gate
        b = r(q, k, causal=False).kv_gate
        assert not torch.equal(a, b)


def test_sinkhorn_normalisation_is_doubly_stochastic_over_the_valid_entries():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 5, dtype=torch.float64)
    valid = ~torch.eye(5, dtype=torch.bool).expand(2, 5, 5)
    s = sinkhorn(logits, valid, iters=200)
    assert torch.allclose(s.sum(-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(s.sum(-2), torch.ones(2, 5, dtype=torch.float64), atol=1e-8)
    assert torch.all(s[~valid] == 0)


def test_masked_softmax_without_valid_entries_is_zero_with_finite_gradients():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    probs = masked_softmax(logits, valid)
    assert torch.all(probs[1] == 0) and torch.allclose(probs[[0, 2]].sum(-1), torch.ones(2, dtype=torch.float64))
    probs.square().sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- causal routing

CAUSAL_ROUTERS = {
    'attention_top1': dict(n_top_buckets=1),
    'attention_top2': dict(n_top_buckets=2),
    'attention_top3': dict(n_top_buckets=3),
    'simple_top2': dict(n_top_buckets=2, use_simple_sort_net=True, max_seq_len=32),
}


@pytest.mark.parametrize('name', list(CAUSAL_ROUTERS))
def test_causal_router_is_strictly_causal(name):
    q, k, v = qkv(n=32)
    r = router(causal=True, **CAUSAL_ROUTERS[name])
    key_mask = torch.ones(B, 32, dtype=torch.bool)
    key_mask[0, :3] = False  # left padding
    key_mask[1, 9:14] = False  # holes
    base, _ = attend(q, k, v, r(q, k, causal=True, mask=key_mask), causal=True, key_mask=key_mask)
    for p in (0, 4, 7, 13, 20, 31):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[..., p, :] = torch.randn(D, dtype=torch.float64) * 3
        out, _ = attend(q2, k2, v2, r(q2, k2, causal=True, mask=key_mask), causal=True, key_mask=key_mask)
        assert torch.equal(out[..., :p, :], base[..., :p, :]), p
        assert (out[..., p, :] - base[..., p, :]).abs().max() > 1e-6


def test_causal_plan_selects_only_completed_past_blocks():
    q, k, v = qkv(n=32)
    plan = router(causal=True, n_top_buckets=3)(q, k, causal=True)
    blocks = plan.router_state['blocks']
    for c in range(8):
        assert torch.all(blocks[..., c, :] < c)
    seen, gate = dense_gates(plan, 32, 32)
    assert seen.max() == 1  # no key twice
    out, _ = attend(q, k, v, plan, causal=True)
    assert torch.allclose(out, dense_reference(q, k, v, seen, gate, causal=True), atol=1e-12)


def test_causal_router_decoding_equals_the_forward_pass():
    q, k, v = qkv(n=32)
    key_mask = torch.ones(B, 32, dtype=torch.bool)
    key_mask[0, :6] = False
    key_mask[1, 17] = False
    for kwargs in CAUSAL_ROUTERS.values():
        r = router(causal=True, **kwargs)
        full, _ = attend(q, k, v, r(q, k, causal=True, mask=key_mask), causal=True, key_mask=key_mask)
        prefix = RouteInput(q=q[..., :8, :], k=k[..., :8, :], causal=True, mask=key_mask[:, :8])
        cache = r.prefill(prefix, r.route(prefix))
        for pos in range(8, 32):
            step = RouteInput(q=q[..., pos:pos + 1, :], k=k[..., pos:pos + 1, :], causal=True,
                              mask=key_mask[:, pos:pos + 1], offset=pos)
            plan = r.decode_step(step, cache)
            out, _ = attend(q[..., pos:pos + 1, :], k[..., :pos + 1, :], v[..., :pos + 1, :], plan, causal=True,
                            key_mask=key_mask[:, :pos + 1])
            assert torch.allclose(out[..., 0, :], full[..., pos, :], atol=1e-12), (kwargs, pos)


def test_cross_router_takes_a_context_of_any_length_and_masks_it():
    q, _, _ = qkv(n=16)
    _, k, v = qkv(n=11, seed=1)  # context blocks of 4: the last one partial
    context_mask = torch.ones(B, 11, dtype=torch.bool)
    context_mask[0, 4:8] = False  # a whole block of padding is no candidate
    r = router(kv_bucket_size=4, n_top_buckets=3, cross=True)
    plan = r(q, k, causal=False, mask=context_mask)
    assert plan.kv_index.max() < 11 and plan.kv_index.shape[-1] == 3 * 4
    assert not (plan.router_state['blocks'][0] == 1).any()
    out, _ = attend(q, k, v, plan, key_mask=context_mask)
    v2 = v.clone()
    v2[0, :, 4:8] = 100.
    out2, _ = attend(q, k, v2, r(q, k, causal=False, mask=context_mask), key_mask=context_mask)
    assert torch.equal(out, out2)


def test_different_key_bucket_size():
    q, k, v = qkv(n=16)
    plan = router(kv_bucket_size=8, n_top_buckets=2)(q, k, causal=False)
    assert plan.kv_index.shape[-2:] == (4, 16)  # 4 query blocks, 2 key blocks of 8, no own block
    seen, gate = dense_gates(plan, 16, 16)
    assert torch.equal(seen, torch.ones_like(seen))


@pytest.mark.parametrize('kwargs,phrase', [
    (dict(causal=True, n_sortcut=2), 'sortcut'),
    (dict(causal=True, kv_bucket_size=8), 'kv_bucket_size'),
    (dict(use_simple_sort_net=True), 'max_seq_len'),
    (dict(temperature=0.), 'temperature'),
    (dict(bucket_size=0), 'bucket_size'),
])
def test_bad_router_configuration(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        router(**kwargs)


def test_router_errors_at_call_time():
    q, k, _ = qkv(n=14)
    with pytest.raises(ValueError, match='Autopadder'):
        router()(q, k, causal=False)
    q, k, _ = qkv(n=32)
    with pytest.raises(ValueError, match='max_seq_len'):
        router(use_simple_sort_net=True, max_seq_len=16)(q, k, causal=False)
    with pytest.raises(ValueError, match='causal'):
        router()(q, k, causal=True)


# ---------------------------------------------------------------- the models

def lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(num_tokens=NUM_TOKENS, dim=16, depth=2, heads=2, max_seq_len=32, bucket_size=4)
    cfg.update(kwargs)
    return SinkhornTransformerLM(**cfg)


def tokens(b=2, n=32, seed=1):
    return torch.randint(0, NUM_TOKENS, (b, n), generator=torch.Generator().manual_seed(seed))


def test_eval_outputs_are_identical_across_calls():
    x = tokens()
    for kwargs in (dict(), dict(non_permutative=False), dict(non_permutative=False, n_sortcut=2),
                   dict(use_simple_sort_net=True, non_permutative=False), dict(causal=True)):
        model = lm(**kwargs).eval()
        assert torch.equal(model(x), model(x)), kwargs


PADDING_CONFIGS = {
    'attention': dict(),
    'sinkhorn_sortcut': dict(non_permutative=False, n_sortcut=2),
    'simple': dict(use_simple_sort_net=True),
    'causal_top3_local': dict(causal=True, n_top_buckets=3, n_local_attn_heads=1),
    'context': dict(receives_context=True, context_bucket_size=3),
}


@pytest.mark.parametrize('config', list(PADDING_CONFIGS))
def test_padding_does_not_affect_real_positions(config):
    kwargs = PADDING_CONFIGS[config]
    model = lm(**kwargs).eval()
    x = tokens()
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, :7] = False  # left padding
    mask[1, 21:] = False  # right padding
    other = x.clone()
    other[~mask] = (other[~mask] + 5) % NUM_TOKENS
    context = torch.randn(2, 10, 16) if kwargs.get('receives_context') else None
    with torch.no_grad():
        a = model(x, input_mask=mask, context=context)
        b = model(other, input_mask=mask, context=context)
        unmasked = model(other, context=context)
    assert torch.allclose(a[mask], b[mask], atol=1e-6, rtol=0)
    assert (unmasked[mask] - a[mask]).abs().max() > 1e-4


def test_reversible_gradients_equal_plain_autograd():
    # the recompute replays the forward pass's block choice (and its Gumbel noise)
    x = tokens()
    grads = []
    for recompute in (True, False):
        model = lm(reversible=True, causal=False, non_permutative=False, n_top_buckets=2,
                   n_local_attn_heads=1).double().train()
        model.transformer.recompute_in_backward = recompute
        torch.manual_seed(3)
        model(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-10), name


def test_plain_transformer_and_autopadder():
    torch.manual_seed(0)
    model = SinkhornTransformer(dim=16, depth=1, heads=2, bucket_size=4, n_top_buckets=2).eval()
    x = torch.randn(2, 14, 16)
    with pytest.raises(ValueError, match='Autopadder'):
        model(x)
    padded = Autopadder(model)
    out = padded(x)
    assert out.shape == (2, 14, 16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, 14:] = False
    expected = model(F.pad(x, (0, 0, 0, 2), value=7.), input_mask=mask)  # the padding's content is masked
    assert torch.allclose(out, expected[:, :14], atol=1e-6)


@pytest.mark.parametrize('pad_left', [False, True])
def test_autopadder_on_the_lm(pad_left):
    model = Autopadder(lm(causal=True), pad_left=pad_left).eval()
    x = tokens(n=29)
    logits = model(x)
    assert logits.shape == (2, 29, NUM_TOKENS)
    mask = torch.ones(2, 32, dtype=torch.bool)
    sl = slice(0, 3) if pad_left else slice(29, 32)
    mask[:, sl] = False
    manual = F.pad(x, (3, 0) if pad_left else (0, 3), value=9)
    expected = model.net(manual, input_mask=mask)
    assert torch.allclose(logits, expected[:, 3:] if pad_left else expected[:, :29], atol=1e-6)


def test_random_truncation_trains():
    wrapper = AutoregressiveWrapper(lm(causal=True))
    torch.manual_seed(0)
    loss = wrapper(tokens(), return_loss=True, randomly_truncate_sequence=True)
    loss.backward()
    assert torch.isfinite(loss)


DECODE_CONFIGS = {
    'top1': dict(n_top_buckets=1),
    'top2_local_heads': dict(n_top_buckets=2, n_local_attn_heads=1),
    'top3_rotary': dict(n_top_buckets=3, pos_emb='rotary'),
    'simple_reversible': dict(use_simple_sort_net=True, reversible=True),
}


@pytest.mark.parametrize('config', list(DECODE_CONFIGS))
def test_cached_generation_equals_uncached(config):
    wrapper = AutoregressiveWrapper(lm(causal=True, max_seq_len=48, **DECODE_CONFIGS[config]))
    for n in (9, 2):  # a prefill of whole blocks then single tokens; a prompt shorter than a block
        x = tokens(n=n)
        cached = wrapper.generate(x, 20, temperature=0)
        uncached = wrapper.generate(x, 20, temperature=0, use_cache=False)
        assert torch.equal(cached, uncached), n


def test_cached_generation_with_left_padded_prompts():
    wrapper = AutoregressiveWrapper(lm(causal=True, max_seq_len=48, n_top_buckets=2))
    x = tokens(n=11)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :9] = False  # padding reaches past the prefilled blocks
    shuffled = x.clone()
    shuffled[0, :9] = (shuffled[0, :9] + 3) % NUM_TOKENS
    a = wrapper.generate(x, 20, temperature=0, input_mask=mask)
    assert torch.equal(a, wrapper.generate(x, 20, temperature=0, input_mask=mask, use_cache=False))
    assert torch.equal(a, wrapper.generate(shuffled, 20, temperature=0, input_mask=mask))


@pytest.mark.parametrize('padded', [False, True])
def test_cached_step_logits_equal_the_full_forward(padded):
    # cross-attention included: the decoder's blocks route to context blocks as in the full pass
    model = lm(causal=True, n_top_buckets=2, receives_context=True, context_bucket_size=3).eval()
    x, context = tokens(), torch.randn(2, 10, 16)
    mask = torch.ones_like(x, dtype=torch.bool)
    if padded:
        mask[0, :11] = False  # left padding beyond the prefill
    with torch.no_grad():
        full = model(x, input_mask=mask, context=context)
        cache = {}
        model(x[:, :8], input_mask=mask[:, :8], context=context, cache=cache)
        steps = [model(x[:, i:i + 1], input_mask=mask[:, :i + 1], context=context, cache=cache)
                 for i in range(8, 32)]
    assert torch.allclose(torch.cat(steps, dim=1)[mask[:, 8:]], full[:, 8:][mask[:, 8:]], atol=1e-5)


def test_encoder_decoder_trains_and_generates_with_a_cache():
    torch.manual_seed(0)
    model = SinkhornTransformerEncDec(dim=16, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_max_seq_len=32,
                                      enc_bucket_size=4, enc_heads=2, dec_num_tokens=NUM_TOKENS, dec_depth=1,
                                      dec_max_seq_len=32, dec_bucket_size=4, dec_heads=2, dec_context_bucket_size=4)
    src, tgt = tokens(n=13), tokens(n=20, seed=2)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[1, 10:] = False
    loss, aux = model(src, tgt, return_loss=True, enc_input_mask=src_mask)
    loss.backward()
    assert torch.isfinite(loss)
    # as in the seed, the cross-attention is a layer of its own after each decoder layer
    assert model.decoder.net.transformer.blocks[1].mixers[0].fn.routers[0].cross
    cached = model.generate(src, tgt[:, :5], 12, enc_input_mask=src_mask, temperature=0)
    context, _ = model.encode(src, input_mask=src_mask)
    uncached = model.decoder.generate(tgt[:, :5], 12, context=context, context_mask=src_mask, temperature=0,
                                      use_cache=False)
    assert torch.equal(cached, uncached)


def test_recorder_sees_the_gathered_attention():
    model = Recorder(lm(causal=True).eval())
    with torch.no_grad():
        model(tokens(b=1))
    sinkhorn = [r for r in model.recordings[0] if r['heads'] == (0, 2)]
    assert len(sinkhorn) == 2
    attn = sinkhorn[0]['attn']
    assert torch.all(attn.triu(1) == 0)  # causal
    assert torch.allclose(attn.sum(-1), torch.ones(1, 2, 32), atol=1e-5)


def test_bf16_autocast():
    model = lm(causal=True, n_local_attn_heads=1, reversible=True).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(tokens())
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- the seed API

def test_seed_defaults():
    def defaults(cls):
        return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
    assert defaults(SinkhornTransformerLM)['n_top_buckets'] == 2
    assert defaults(SinkhornTransformer)['n_top_buckets'] == 1
    assert defaults(SinkhornTransformer)['non_permutative'] is False
    assert defaults(SinkhornTransformer)['context_n_sortcut'] == 2
    model = SinkhornTransformerLM(NUM_TOKENS, 16, 30, 1, heads=2, bucket_size=4)  # seed positional order
    assert model.max_seq_len == 32  # rounded up to whole buckets


def test_weight_tie_with_pkm_layers_shares_all_but_the_memories():
    model = lm(depth=3, weight_tie=True, pkm_layers=(2,), pkm_num_keys=16)
    blocks = model.transformer.blocks
    # shared attention and feed-forward, each layer with norms of its own (as in the seed)
    assert blocks[0].ff.fn is blocks[2].ff.fn and blocks[1].ff.fn is not blocks[0].ff.fn
    assert all(b.mixers[0].fn is blocks[0].mixers[0].fn for b in blocks)
    assert blocks[0].mixers[0].norm is not blocks[1].mixers[0].norm
    assert type(blocks[1].ff.fn).__name__ == 'PKM'


@pytest.mark.parametrize('kwargs,error,phrase', [
    (dict(bucket_sizes=4), TypeError, 'bucket_sizes'),
    (dict(dim=15, heads=2), ValueError, 'divisible'),
    (dict(causal=True, n_sortcut=2), ValueError, 'sortcut'),
    (dict(weight_tie=True, n_local_attn_heads=(1, 0)), ValueError, 'weight_tie'),
])
def test_bad_model_configuration(kwargs, error, phrase):
    with pytest.raises(error, match=phrase):
        lm(**kwargs)


def test_every_sinkhorn_keyword_has_an_effect():
    x = tokens()
    base = lm().eval()
    with torch.no_grad():
        reference = base(x)
    for kwargs in (dict(n_top_buckets=1), dict(n_sortcut=1), dict(temperature=0.1), dict(non_permutative=False),
                   dict(non_permutative=False, sinkhorn_iter=1), dict(kv_bucket_size=8),
                   dict(use_simple_sort_net=True), dict(n_local_attn_heads=1)):
        model = lm(**kwargs).eval()
        with torch.no_grad():
            assert not torch.allclose(model(x), reference, atol=1e-5), kwargs


README_LM = dict(num_tokens=20000, dim=1024, heads=8, depth=12, max_seq_len=8192, bucket_size=128, causal=False,
                 n_sortcut=2, n_top_buckets=2, ff_chunks=10, reversible=True, emb_dropout=0.1, ff_dropout=0.1,
                 attn_dropout=0.1, attn_layer_dropout=0.1, layer_dropout=0.1, weight_tie=True, emb_dim=128,
                 dim_head=64, ff_glu=True, n_local_attn_heads=2, pkm_layers=(4, 7), pkm_num_keys=128)


def shrink(kwargs, **smaller):
    out = dict(kwargs)
    out.update(smaller)
    return out


def run_readme_lm(cfg, seq):
    model = SinkhornTransformerLM(**cfg)
    x = torch.randint(0, cfg['num_tokens'], (1, seq))
    y = model(x)  # (1, seq, num_tokens), as in the seed README
    assert y.shape == (1, seq, cfg['num_tokens'])


def run_readme_plain(dim, depth, bucket, seq, heads=8):
    model = SinkhornTransformer(dim=dim, heads=heads, depth=depth, bucket_size=bucket)
    out = model(torch.randn(1, seq, dim))
    assert out.shape == (1, seq, dim)


def run_readme_enc_dec(de_len, en_len, dim, depth, bucket, num_tokens=20000):
    enc = SinkhornTransformerLM(num_tokens=num_tokens, dim=dim, depth=depth, heads=8, bucket_size=bucket,
                                max_seq_len=de_len, reversible=True, return_embeddings=True)
    dec = SinkhornTransformerLM(num_tokens=num_tokens, dim=dim, depth=depth, causal=True, bucket_size=bucket,
                                max_seq_len=en_len, receives_context=True, context_bucket_size=bucket, reversible=True)
    x = torch.randint(0, num_tokens, (1, de_len))
    y = torch.randint(0, num_tokens, (1, en_len))
    x_mask, y_mask = torch.ones_like(x).bool(), torch.ones_like(y).bool()
    context = enc(x, input_mask=x_mask)
    logits = dec(y, context=context, input_mask=y_mask, context_mask=x_mask)
    assert logits.shape == (1, en_len, num_tokens)


def run_readme_autopadder(cfg, seq):
    model = Autopadder(SinkhornTransformerLM(**cfg), pad_left=True)
    logits = model(torch.randint(0, cfg['num_tokens'], (1, seq)))
    assert logits.shape == (1, seq, cfg['num_tokens'])


def run_readme_truncation(cfg, seq):
    model = AutoregressiveWrapper(SinkhornTransformerLM(**cfg))
    loss = model(torch.randint(0, cfg['num_tokens'], (1, seq)), return_loss=True, randomly_truncate_sequence=True)
    loss.backward()


README_PLAIN_SINKHORN = dict(num_tokens=20000, dim=1024, heads=8, depth=12, bucket_size=128, max_seq_len=8192,
                             use_simple_sort_net=True, sinkhorn_iter=7, n_sortcut=2, temperature=0.75,
                             non_permutative=False)
README_AUTOPAD = dict(num_tokens=20000, dim=1024, heads=8, depth=12, max_seq_len=2048, bucket_size=128, causal=True)
README_TRUNCATE = dict(num_tokens=20000, dim=1024, heads=8, depth=12, bucket_size=75, max_seq_len=8192, causal=True)
SMALL = dict(num_tokens=64, dim=32, heads=4)


def test_readme_examples_shrunk():
    torch.manual_seed(0)
    run_readme_lm(shrink(README_LM, **SMALL, depth=8, emb_dim=16, dim_head=8, max_seq_len=128, bucket_size=8,
                         pkm_num_keys=16), 128)
    run_readme_plain(dim=32, depth=2, bucket=8, seq=64, heads=4)
    run_readme_enc_dec(de_len=48, en_len=40, dim=32, depth=1, bucket=8, num_tokens=64)
    run_readme_lm(shrink(README_PLAIN_SINKHORN, **SMALL, depth=2, bucket_size=8, max_seq_len=64), 64)
    run_readme_autopadder(shrink(README_AUTOPAD, **SMALL, depth=2, max_seq_len=64, bucket_size=8), 45)
    run_readme_truncation(shrink(README_TRUNCATE, **SMALL, depth=2, bucket_size=5, max_seq_len=64), 64)


@pytest.mark.slow
def test_readme_examples_as_written():
    torch.manual_seed(0)
    with torch.no_grad():  # the README calls the models without a backward pass
        run_readme_lm(README_LM, 2048)
        run_readme_plain(dim=1024, depth=12, bucket=128, seq=2048)
        run_readme_enc_dec(de_len=4096, en_len=4096, dim=512, depth=6, bucket=128)
        run_readme_lm(README_PLAIN_SINKHORN, 8192)
        run_readme_autopadder(README_AUTOPAD, 1117)


@pytest.mark.slow
def test_readme_random_truncation_as_written():
    # a training step of a 12-layer, dim-1024 model on up to 8192 tokens: several GB of memory, minutes
    torch.manual_seed(0)
    run_readme_truncation(README_TRUNCATE, 8192)


def test_max_seq_len_rounding_lets_autopadded_inputs_fit():
    # bucket_size 75 and max_seq_len 8192 (README): 8191 inputs pad to 8250 positions
    model = SinkhornTransformerLM(num_tokens=16, dim=8, heads=1, depth=1, bucket_size=5, max_seq_len=32, causal=True)
    assert model.max_seq_len == 35 and math.prod(model.pos_emb.axial_shape) == 35
    logits = Autopadder(model)(torch.randint(0, 16, (1, 31)))
    assert logits.shape == (1, 31, 16)
