"""Native Sparse Attention: the layer against a query-by-query dense reference, gradients, cached
decoding against the full forward pass, the Recorder and bad configurations."""

import pytest
import torch
from einops import rearrange

from routeformer import AutoregressiveWrapper, NSATransformerLM, Recorder
from routeformer.context import LayerContext
from routeformer.layers.embeddings import RotaryEmbedding, apply_rotary
from routeformer.layers import nsa
from routeformer.layers.nsa import NSAAttention

DIM, NUM_TOKENS = 16, 24
# blocks small enough that 24 tokens hold 6 selection blocks, of which a query picks 3
SMALL = dict(compress_block_size=4, compress_stride=2, select_block_size=4, num_selected_blocks=3,
             sliding_window_size=3)


def nsa_layer(seed=0, rotary=True, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(heads=2, dim_head=8, rotary=RotaryEmbedding(8) if rotary else None, **SMALL)
    cfg.update(kwargs)
    layer = NSAAttention(DIM, **cfg).double()
    for p in layer.parameters():  # away from the zero-initialised MLP output, so that every part counts
        p.data.normal_(0, 0.4)
    return layer


def inputs(b=2, n=24, seed=1):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_nsa(layer, x, mask=None):
    """The NSA layer (no local heads) written out query by query, and how many queries selected a
    block other than their forced ones and the earliest candidates (the ranking mattered)."""
    b, n, _ = x.shape
    q_raw, k_raw, v = layer.project(x, x)
    q, k = q_raw, k_raw
    if layer.rotary is not None:
        freqs = layer.rotary(torch.arange(n))
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
    mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    h, d = q.shape[1], q.shape[-1]
    l, stride = layer.compress_k.block_size, layer.compress_k.stride
    size, top, w = layer.select_block_size, layer.num_selected_blocks, layer.window.window_size
    mem = None if layer.mem_kv is None else (layer.mem_kv[0], layer.mem_kv[1])
    gates = rearrange(torch.sigmoid(layer.to_gates(x)), 'b n (r h) -> b n r h', r=3)

    def attend(bi, hi, query, keys, values, allowed):
        logits = keys @ query * d ** -0.5
        logits = logits.masked_fill(~allowed, float('-inf'))
        if mem is not None:
            logits = torch.cat((mem[0][hi] @ query * d ** -0.5, logits))
            values = torch.cat((mem[1][hi], values))
        if not torch.isfinite(logits).any():
            return torch.zeros(d, dtype=x.dtype), torch.zeros(len(allowed), dtype=x.dtype)
        p = logits.softmax(-1)
        return p @ values, p[len(p) - len(allowed):]

    def compress(fn, block):
        return block.mean(0) + fn.mlp((block + fn.pos).flatten())

    out, informative = torch.zeros(b, h, n, d, dtype=x.dtype), 0
    for bi in range(b):
        kz, vz = (t[bi] * mask[bi, None, :, None] for t in (k_raw, v))  # padding is zeroed before compressing
        starts = list(range(0, n - l + 1, stride))
        for hi in range(h):
            ck = torch.stack([compress(layer.compress_k, kz[hi, s:s + l]) for s in starts]) if starts else None
            cv = torch.stack([compress(layer.compress_v, vz[hi, s:s + l]) for s in starts]) if starts else None
            for t in range(n):
                if starts:
                    visible = torch.tensor([s + l - 1 <= t and bool(mask[bi, s:s + l].any()) for s in starts])
                    o_cmp, p_cmp = attend(bi, hi, q_raw[bi, hi, t], ck, cv, visible)
                else:
                    o_cmp, p_cmp = attend(bi, hi, q_raw[bi, hi, t], k.new_zeros(1, d), v.new_zeros(1, d),
                                          torch.zeros(1, dtype=torch.bool))
                    p_cmp = p_cmp[:0]
                candidates = range(t // size + 1)
                score = {s: sum(float(p_cmp[c]) for c, start in enumerate(starts)
                                if start < (s + 1) * size and start + l > s * size) for s in candidates}
                forced = {0, t // size}
                ranked = sorted(candidates, key=lambda s: (s not in forced, -score[s], s))[:top]
                informative += set(ranked) != set(sorted(candidates, key=lambda s: (s not in forced, s))[:top])
                keys = torch.tensor([pos // size in ranked for pos in range(n)])
                allowed = keys & (torch.arange(n) <= t) & mask[bi]
                o_slc, _ = attend(bi, hi, q[bi, hi, t], k[bi, hi], v[bi, hi], allowed)
                window = (torch.arange(n) <= t) & (torch.arange(n) > t - w) & mask[bi]
                o_win, _ = attend(bi, hi, q[bi, hi, t], k[bi, hi], v[bi, hi], window)
                g = gates[bi, t, :, hi]
                out[bi, hi, t] = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
    return layer.to_out(rearrange(out, 'b h n d -> b n (h d)')), informative


REFERENCE_CASES = {
    'rotary': dict(),
    'memory_kv_padded': dict(rotary=False, num_mem_kv=2, padded=True),
    'blocks_not_dividing_padded': dict(compress_block_size=5, compress_stride=3, select_block_size=4,
                                       sliding_window_size=4, padded=True),
    'more_blocks_than_early_candidates': dict(num_selected_blocks=4),
}


@pytest.mark.parametrize('selection', ['gathered', 'masked'])
@pytest.mark.parametrize('kwargs', REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys())
def test_layer_equals_dense_reference(kwargs, selection, monkeypatch):
    # the selected keys of every query gathered, or a mask over all keys (short sequences)
    monkeypatch.setattr(nsa, 'DENSE_SELECTION', 0 if selection == 'gathered' else 100)
    kwargs = dict(kwargs)
    mask = None
    if kwargs.pop('padded', False):  # left padding in sample 0, a hole in sample 1
        mask = torch.ones(2, 20, dtype=torch.bool)
        mask[0, :5], mask[1, 9:15] = False, False
    layer, x = nsa_layer(**kwargs), inputs(n=20)
    with torch.no_grad():
        out, _ = layer(x, LayerContext(mask=mask))
        expected, informative = dense_nsa(layer, x, mask)
    assert informative > 0, 'the ranking never changed the choice: the check would miss a wrong ranking'
    assert torch.allclose(out, expected, atol=1e-10)


def test_every_branch_and_gate_contributes():
    layer, x = nsa_layer(), inputs()
    with torch.no_grad():
        base, _ = layer(x, LayerContext())
        for r in range(3):  # closing one branch's gates changes the output
            bias = layer.to_gates.bias.clone()
            layer.to_gates.bias[r * 2:(r + 1) * 2] = -1e4
            assert (layer(x, LayerContext())[0] - base).abs().max() > 1e-3
            layer.to_gates.bias.copy_(bias)


def test_gradcheck_float64():
    layer = nsa_layer(num_mem_kv=1)
    x = inputs(b=1, n=9).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(t, LayerContext())[0], (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradients_reach_the_compressor_and_the_gates():
    layer, x = nsa_layer(), inputs()
    layer(x, LayerContext())[0].square().sum().backward()
    for module in (layer.compress_k, layer.compress_v, layer.to_gates):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_cached_steps_equal_the_full_forward_from_a_prompt_shorter_than_a_block():
    layer, x = nsa_layer(num_mem_kv=1), inputs()
    with torch.no_grad():
        full, _ = layer(x, LayerContext())
        for prompt in (1, 9):
            cache = {}
            steps = [layer(x[:, :prompt], LayerContext(cache=cache))[0]]
            steps += [layer(x[:, i:i + 1], LayerContext(cache=cache, offset=i))[0] for i in range(prompt, 24)]
            assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10)


def lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(num_tokens=NUM_TOKENS, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64, **SMALL)
    cfg.update(kwargs)
    return NSATransformerLM(**cfg)


DECODE_CONFIGS = {  # (model keywords, prompt length)
    'plain_one_token_prompt': (dict(), 1),
    'local_heads_mem_kv': (dict(n_local_attn_heads=2, local_attn_window_size=8, num_mem_kv=2), 11),
    'shift_shared_qk_reversible_absolute': (dict(shift_tokens=True, shared_qk=True, reversible=True,
                                                 pos_emb='absolute'), 6),
    'relative_positions_larger_blocks': (dict(max_relative_position=4, **{k: v * 2 for k, v in SMALL.items()}), 11),
}


@pytest.mark.parametrize('kwargs, prompt', DECODE_CONFIGS.values(), ids=DECODE_CONFIGS.keys())
def test_cached_generation_equals_uncached(kwargs, prompt):
    wrapper = AutoregressiveWrapper(lm(**kwargs))
    x = torch.randint(0, NUM_TOKENS, (2, prompt), generator=torch.Generator().manual_seed(1))
    cached = wrapper.generate(x, 12, temperature=0)
    assert torch.equal(cached, wrapper.generate(x, 12, temperature=0, use_cache=False))


def test_cached_generation_with_left_padding_ignores_what_hides_behind_the_mask():
    wrapper = AutoregressiveWrapper(lm())
    x = torch.randint(0, NUM_TOKENS, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :6] = False
    shuffled = x.clone()
    shuffled[0, :6] = (shuffled[0, :6] + 5) % NUM_TOKENS
    results = []
    for use_cache in (True, False):
        a = wrapper.generate(x, 12, temperature=0, input_mask=mask, use_cache=use_cache)
        assert torch.equal(a, wrapper.generate(shuffled, 12, temperature=0, input_mask=mask, use_cache=use_cache))
        results.append(a)
    assert torch.equal(*results)


def test_reversible_backward_equals_plain_autograd():
    model = lm(reversible=True)
    x = torch.randint(0, NUM_TOKENS, (2, 24), generator=torch.Generator().manual_seed(3))
    grads = []
    for recompute in (True, False):
        model.zero_grad()
        model.transformer.recompute_in_backward = recompute
        model(x)[0].square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_recorder_shows_the_selected_blocks_and_the_local_heads(monkeypatch):
    monkeypatch.setattr(nsa, 'DENSE_SELECTION', 0)
    model = Recorder(lm(n_local_attn_heads=1, local_attn_window_size=8))
    model(torch.randint(0, NUM_TOKENS, (1, 24)))
    entries = model.recordings[0]
    assert [e['heads'] for e in entries] == [(0, 1), (1, 4)] * 2
    attn, plan = entries[1]['attn'], entries[1]['plan']
    assert attn.shape == (1, 3, 24, 24) and torch.allclose(attn.sum(-1), torch.ones(1, 3, 24))
    # a group per selected block (of 4 keys) and run of its queries; a query sees 3 blocks, causally
    assert plan.kv_index.shape[-1] == 4 and plan.merge == 'logsumexp'
    assert ((attn > 0).sum(-1) <= 3 * 4).all() and (attn.triu(1) == 0).all()


@pytest.mark.parametrize('kwargs, phrase', [
    (dict(compress_stride=5, compress_block_size=4), 'compress_stride'),
    (dict(num_selected_blocks=0), 'num_selected_blocks'),
    (dict(sliding_window_size=-1), 'sliding_window_size'),
    (dict(causal=False), 'causal'),
    (dict(n_local_attn_heads=4, local_attn_window_size=8), 'at least one head'),
])
def test_bad_configuration(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase) as info:
        lm(**kwargs)
    assert '\n' not in str(info.value)


def test_unknown_and_reserved_keywords_are_type_errors():
    with pytest.raises(TypeError, match='NSATransformerLM got unexpected keyword argument'):
        lm(window_size=8)
    with pytest.raises(TypeError, match='self_attention'):
        lm(self_attention=NSAAttention)
