"""CoLT5: the seed README examples, equality with the seed package where its behaviour is right,
the fixes of its defects (cross-attention, route_block_size, image attention across the whole map,
a strictly causal autoregressive attention with linear memory), routing (masks, straight-through
gates, gradients reaching the routers), the fast path against the reference path, and the
decoder LM (causality beyond the shared registry, cached decoding, generation)."""

import pytest
import torch
from einops import rearrange

from routeformer import (AutoregressiveWrapper, ConditionalRoutedAttention, ConditionalRoutedAutoregressiveAttention,
                         ConditionalRoutedCrossAttention, ConditionalRoutedFeedForward,
                         ConditionalRoutedImageAttention, ConditionalRoutedTransformerBlock,
                         ConditionalRoutedTransformerLM, ConditionalRoutedViT, CoordinateDescentRouter, TopKRouter,
                         topk)
from routeformer.context import LayerContext
from routeformer.models.builder import build_transformer
from routeformer.lm import LM

DIM = 32
SMALL_ATTN = dict(light_dim_head=8, light_heads=2, heavy_dim_head=8, heavy_heads=4)


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def grads_of(module, prefix):
    return {n: p.grad for n, p in module.named_parameters() if n.startswith(prefix)}


# ---------------------------------------------------------------- seed README examples

def readme_feedforward_attention_block(n, dim, num_heavy, window, heads):
    tokens = torch.randn(2, n, dim)
    mask = torch.ones(2, n).bool()  # can handle variable lengthed sequences
    ff = ConditionalRoutedFeedForward(dim=dim, light_ff_mult=0.5, heavy_ff_mult=4, num_heavy_tokens=num_heavy)
    ff_out = ff(tokens, mask=mask)
    attn = ConditionalRoutedAttention(dim=dim, light_dim_head=64, light_heads=heads, light_window_size=window,
                                      heavy_dim_head=64, heavy_heads=heads, num_heavy_tokens_q=num_heavy,
                                      num_heavy_tokens_kv=num_heavy)
    attn_out = attn(tokens, mask=mask)
    block = ConditionalRoutedTransformerBlock(dim=dim, light_dim_head=64, light_heads=heads,
                                              light_window_size=window, heavy_dim_head=64, heavy_heads=heads,
                                              light_ff_mult=0.5, heavy_ff_mult=4, num_heavy_ff_tokens=num_heavy,
                                              num_heavy_attn_tokens_q=num_heavy, num_heavy_attn_tokens_kv=num_heavy)
    block_out = block(tokens, mask=mask)
    for out in (ff_out, attn_out, block_out):
        assert out.shape == (2, n, dim) and torch.isfinite(out).all()
    assert not torch.allclose(block_out, tokens)


def readme_cross_attention(n, n_memory, dim, num_q, num_kv, block_size):
    tokens = torch.randn(1, n, dim)
    tokens_mask = torch.ones(1, n).bool()
    memories = torch.randn(1, n_memory, dim)
    memories_mask = torch.ones(1, n_memory).bool()
    cross_attn = ConditionalRoutedCrossAttention(dim=dim, dim_head=64, heads=8, num_tokens_q=num_q,
                                                 num_tokens_kv=num_kv, kv_routing_tokens=2, use_triton=True,
                                                 route_block_size=block_size)
    cross_attn_out = cross_attn(tokens, context=memories, mask=tokens_mask, context_mask=memories_mask)
    assert cross_attn_out.shape == (1, n, dim) and torch.isfinite(cross_attn_out).all()


def readme_autoregressive(n, dim, window, num_q, num_kv):
    tokens = torch.randn(2, n, dim)
    attn = ConditionalRoutedAutoregressiveAttention(dim=dim, light_dim_head=64, light_heads=8,
                                                    light_window_size=window, heavy_window_size=window,
                                                    heavy_dim_head=64, heavy_heads=8, num_heavy_tokens_q=num_q,
                                                    num_heavy_tokens_kv=num_kv, num_routed_kv=2, use_triton=True,
                                                    use_flash_attn=True)
    attn_out = attn(tokens) + tokens
    assert attn_out.shape == (2, n, dim) and torch.isfinite(attn_out).all()


def readme_image(dim, window, side, num_heavy):
    attn = ConditionalRoutedImageAttention(dim=dim, light_dim_head=64, light_heads=8, light_window_size=window,
                                           channel_first=True, heavy_dim_head=64, heavy_heads=8,
                                           num_heavy_tokens_q=num_heavy, num_heavy_tokens_kv=num_heavy)
    fmap = torch.randn(1, dim, side, side)
    out = attn(fmap)
    assert out.shape == fmap.shape and torch.isfinite(out).all()


def readme_vit(image_size, patch_size, dim, depth, num_heavy, window):
    vit = ConditionalRoutedViT(image_size=image_size, patch_size=patch_size, num_classes=1000, dim=dim, depth=depth,
                               attn_num_heavy_tokens_q=num_heavy, attn_num_heavy_tokens_kv=num_heavy,
                               attn_heavy_dim_head=64, attn_heavy_heads=8, attn_light_window_size=window,
                               attn_light_dim_head=32, attn_light_heads=4, ff_num_heavy_tokens=num_heavy,
                               ff_heavy_mult=4, ff_light_mult=2)
    images = torch.randn(1, 3, image_size, image_size)
    logits = vit(images)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def readme_topk(n, d, k):
    x = torch.randn(n, d)
    values, indices, coor_descent_values, gates = topk(x, k=k, fused=True)
    assert torch.equal(indices, x.topk(k, dim=-1).indices)
    torch.testing.assert_close(values, x.topk(k, dim=-1).values)


def test_readme_examples_shrunk():
    torch.manual_seed(0)
    with torch.no_grad():
        readme_feedforward_attention_block(n=512, dim=64, num_heavy=32, window=32, heads=2)
        readme_cross_attention(n=64, n_memory=4096, dim=64, num_q=32, num_kv=64, block_size=1024)
        readme_autoregressive(n=256, dim=64, window=32, num_q=8, num_kv=64)
        readme_image(dim=32, window=8, side=32, num_heavy=64)
        readme_vit(image_size=64, patch_size=16, dim=64, depth=2, num_heavy=4, window=2)
        readme_topk(n=64, d=128, k=10)


@pytest.mark.slow
def test_readme_examples_as_written():
    torch.manual_seed(0)
    with torch.no_grad():
        readme_feedforward_attention_block(n=32768, dim=512, num_heavy=1024, window=128, heads=8)
        readme_cross_attention(n=1024, n_memory=1_048_576, dim=512, num_q=512, num_kv=1024, block_size=131072)
        readme_autoregressive(n=8192, dim=512, window=128, num_q=32, num_kv=1024)
        readme_image(dim=32, window=32, side=256, num_heavy=1024)
        readme_vit(image_size=256, patch_size=32, dim=1024, depth=6, num_heavy=16, window=4)
        readme_topk(n=1024, d=512, k=10)


# ---------------------------------------------------------------- equal to the seed package where it is right

def load_heavy_from_seed(ours, theirs, routes):
    """Copies the seed's routers, heavy attention and null output into ours (layouts differ)."""
    heavy, seed_heavy = ours.heavy_attn, theirs.heavy_attn
    with torch.no_grad():
        ours.q_router.routing_token.copy_(theirs.q_router.routing_token)
        ours.kv_router.routing_token.copy_(theirs.kv_router.routing_token)
        heavy.norm.g.copy_(seed_heavy.norm.gamma)
        heavy.to_q.weight.copy_(seed_heavy.to_q.weight)
        heavy.to_out.weight.copy_(seed_heavy.to_out.weight)
        # seed: per route and head, keys then values; ours: keys of every head, then values
        heavy.to_kv.weight.copy_(rearrange(seed_heavy.to_kv.weight, '(r h t e) i -> (t r h e) i', r=routes, t=2,
                                           e=heavy.dim_head))
        heavy.null_kv.copy_(rearrange(seed_heavy.null_kv, 't h e -> t h 1 e'))
        if ours.null_q_token is not None:
            ours.null_q_token.copy_(theirs.null_q_token)


def assert_seed_selects_top_scores(router, x, num_tokens, mask=None):
    """The seed ranks by coordinate-descent scores, which tie at exactly 1 when saturated, so with
    fetch_k_ratio > 1 it may keep a token below the k best; we keep the k best raw scores (the same
    ranking, ties broken by score). Where the seed keeps them too, outputs must agree."""
    ret = router(x, num_tokens=num_tokens, mask=mask, keep_one_route_dim=True)
    s = torch.einsum('b n d, r d -> b r n', x, router.routing_token)
    if mask is not None:
        s = s.masked_fill(~mask[:, None], float('-inf'))
    best = s.topk(num_tokens, dim=-1).indices
    assert torch.equal(ret.indices.sort(dim=-1).values, best.sort(dim=-1).values), 'pick another seed for this test'


@pytest.mark.parametrize('kwargs', [dict(), dict(num_routed_kv=2, multiply_keys_by_score=True),
                                    dict(rotary_emb=True, multiply_queries_by_score=True, use_null_q_tokens=False)],
                         ids=['plain', 'two_routes_keys_scaled', 'rotary_queries_scaled'])
def test_routed_attention_equals_seed(kwargs):
    seed_module = pytest.importorskip('colt5_attention')
    # fetch_k_ratio 1: at most k scores saturate, so the seed's pick is the k best scores
    cfg = dict(dim=DIM, num_heavy_tokens_q=12, num_heavy_tokens_kv=20, has_light_attn=False,
               router_kwargs=dict(fetch_k_ratio=1.), **SMALL_ATTN, **kwargs)
    torch.manual_seed(0)
    theirs = seed_module.ConditionalRoutedAttention(**cfg)
    ours = ConditionalRoutedAttention(**cfg)
    load_heavy_from_seed(ours, theirs, kwargs.get('num_routed_kv', 1))
    x = randn(2, 64, DIM).requires_grad_()
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 50:] = False
    assert_seed_selects_top_scores(theirs.q_router, x.detach(), 12, mask)
    assert_seed_selects_top_scores(theirs.kv_router, x.detach(), 20, mask)

    # the seed, one sample at a time: with several routes and a batch, it gathers sample i's routed
    # tokens from the wrong row of its repeated input (x repeated '(b r)', gathered by b alone)
    out_theirs = torch.cat([theirs(x[i:i + 1], mask=mask[i:i + 1]) for i in range(2)])
    out_ours = ours(x, mask=mask)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-4)
    # the same gradients, routers included: the gates carry the coordinate-descent gradient
    out_theirs.square().mean().backward()
    seed_grads = {n: p.grad.clone() for n, p in theirs.named_parameters() if 'router' in n}
    out_ours.square().mean().backward()
    for name in ('q_router.routing_token', 'kv_router.routing_token'):
        ours_grad = getattr(ours, name.split('.')[0]).routing_token.grad
        torch.testing.assert_close(ours_grad, seed_grads[name], atol=1e-5, rtol=1e-3)
    assert ours.kv_router.routing_token.grad.abs().sum() > 0


def test_routed_feedforward_equals_seed():
    seed_module = pytest.importorskip('colt5_attention')
    torch.manual_seed(0)
    theirs = seed_module.ConditionalRoutedFeedForward(DIM, num_heavy_tokens=10, router_kwargs=dict(fetch_k_ratio=1.))
    ours = ConditionalRoutedFeedForward(DIM, num_heavy_tokens=10, router_kwargs=dict(fetch_k_ratio=1.))
    with torch.no_grad():
        ours.router.routing_token.copy_(theirs.router.routing_token)
        for mine, seed_ff in ((ours.light_ff, theirs.light_ff), (ours.heavy_ff, theirs.heavy_ff)):
            mine.norm.g.copy_(seed_ff[0].gamma)
            mine.ff.proj_in.load_state_dict(seed_ff[1].state_dict())
            mine.ff.proj_out.load_state_dict(seed_ff[3].state_dict())
    x = randn(2, 40, DIM)
    assert_seed_selects_top_scores(theirs.router, x, 10)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_autoregressive_attention_equals_seed_when_everything_is_routed():
    """With every query and every earlier key routed, the seed's windowed attention has no leak to
    fix: ours (light local attention + heavy attention to all earlier windows) must equal it."""
    seed_module = pytest.importorskip('colt5_attention')
    torch.manual_seed(0)
    cfg = dict(dim=DIM, light_window_size=8, num_heavy_tokens_q=8, num_heavy_tokens_kv=64, rotary_emb=True,
               **SMALL_ATTN)
    theirs = seed_module.ConditionalRoutedAutoregressiveAttention(**cfg)
    ours = ConditionalRoutedAutoregressiveAttention(**cfg)
    load_heavy_from_seed(ours, theirs, 1)
    with torch.no_grad():
        ours.light_norm.load_state_dict(theirs.light_attn.norm.state_dict())
        q, k, v = theirs.light_attn.to_qkv.weight.chunk(3, dim=0)
        ours.light_attn.to_q.weight.copy_(q)
        ours.light_attn.to_k.weight.copy_(k)
        ours.light_attn.to_v.weight.copy_(v)
        ours.light_attn.to_out.weight.copy_(theirs.light_attn.to_out.weight)
        x = randn(2, 44, DIM)  # not a multiple of the window
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the seed's defects, fixed

def dense_heavy(heavy, q_tokens, kv_tokens, kv_mask=None):
    """Heavy attention written out with einsum from the module's weights: q_tokens (b, i, d),
    kv_tokens (b, r, j, d) with heads split evenly among the r routes, one null key/value per head."""
    b, r = kv_tokens.shape[:2]
    h, e = heavy.heads, heavy.dim_head
    q = rearrange(heavy.to_q(heavy.norm(q_tokens)), 'b i (h e) -> b h i e', h=h)
    wk, wv = rearrange(heavy.to_kv.weight, '(t h e) d -> t h e d', t=2, h=h)
    route = torch.arange(h) // (h // r)
    kv_in = heavy.norm(kv_tokens)[:, route]  # (b, h, j, d): each head reads its route's tokens
    k, v = torch.einsum('b h j d, h e d -> b h j e', kv_in, wk), torch.einsum('b h j d, h e d -> b h j e', kv_in, wv)
    k = torch.cat((heavy.null_kv[0].expand(b, -1, -1, -1), k), dim=2)
    v = torch.cat((heavy.null_kv[1].expand(b, -1, -1, -1), v), dim=2)
    sim = torch.einsum('b h i e, b h j e -> b h i j', q, k) * e ** -0.5
    if kv_mask is not None:
        allowed = torch.cat((torch.ones(b, r, 1, dtype=torch.bool), kv_mask), dim=-1)[:, route]
        sim = sim.masked_fill(~allowed[:, :, None], float('-inf'))
    out = torch.einsum('b h i j, b h j e -> b h i e', sim.softmax(dim=-1), v)
    return heavy.to_out(rearrange(out, 'b h i e -> b i (h e)'))


def test_cross_attention_works_and_equals_dense_attention_over_the_routed_tokens():
    torch.manual_seed(0)
    attn = ConditionalRoutedCrossAttention(DIM, num_tokens_q=6, num_tokens_kv=16, dim_head=8, heads=4,
                                           kv_routing_tokens=2)
    x, memory = randn(2, 20, DIM), randn(2, 300, DIM, seed=1)
    memory_mask = torch.ones(2, 300, dtype=torch.bool)
    memory_mask[1, 100:] = False
    with torch.no_grad():
        out = attn(x, context=memory, context_mask=memory_mask)
        q_best = torch.einsum('b n d, r d -> b r n', x, attn.q_router.routing_token)[:, 0].topk(6, dim=-1).indices
        s_kv = torch.einsum('b n d, r d -> b r n', memory, attn.kv_router.routing_token)
        kv_best = s_kv.masked_fill(~memory_mask[:, None], float('-inf')).topk(16, dim=-1).indices
        batch = torch.arange(2)[:, None]
        expected = dense_heavy(attn.heavy_attn, x[batch, q_best], memory[batch[:, None], kv_best])
        assert (kv_best[1] < 100).all()  # padded memory is never routed
        torch.testing.assert_close(out[batch, q_best], expected, atol=1e-5, rtol=1e-4)
        unrouted = torch.ones(2, 20, dtype=torch.bool)
        unrouted[batch, q_best] = False
        assert torch.equal(out[unrouted], attn.null_q_token.expand(int(unrouted.sum()), -1))

        # nothing to route: every query, every memory token
        few = attn(x[:, :5], context=memory[:, :10], num_tokens_kv=10)
        everything = dense_heavy(attn.heavy_attn, x[:, :5], memory[:, None, :10].expand(2, 2, 10, DIM))
        torch.testing.assert_close(few, everything, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('n, block, num_tokens', [(1000, 300, 40), (905, 300, 40), (1000, 1000, 40), (64, 16, 3)])
def test_route_block_size_routes_an_equal_share_of_every_block(n, block, num_tokens):
    torch.manual_seed(0)
    router = CoordinateDescentRouter(DIM, num_routing_tokens=2, route_block_size=block)
    x = randn(2, n, DIM)
    with torch.no_grad():
        indices, scores, routed, routed_mask = router(x, num_tokens=num_tokens)
    s = torch.einsum('b n d, r d -> b r n', x, router.routing_token)
    blocks = -(-n // block)
    per_block = min(-(-num_tokens // blocks), block)
    assert indices.shape == (2, 2, blocks * per_block)
    for g in range(blocks):
        chunk = indices[..., g * per_block:(g + 1) * per_block]
        start, end = g * block, min(n, (g + 1) * block)
        valid = chunk[chunk >= 0]
        assert ((valid >= start) & (valid < end)).all()
        best = s[..., start:end].topk(min(per_block, end - start), dim=-1).indices + start
        assert torch.equal(chunk[..., :best.shape[-1]].sort(dim=-1).values, best.sort(dim=-1).values)
        assert (chunk[..., best.shape[-1]:] == -1).all()  # a short last block leaves empty slots
    empty = indices < 0
    assert (routed_mask is None and not empty.any()) or torch.equal(routed_mask, ~empty)
    batch = torch.arange(2)[:, None, None]
    assert torch.equal(routed[~empty], x[batch.expand_as(indices), indices.clamp(min=0)][~empty])
    assert torch.equal(scores, (~empty).float())


def test_cross_attention_over_a_long_memory_in_blocks():
    torch.manual_seed(0)
    attn = ConditionalRoutedCrossAttention(DIM, num_tokens_q=8, num_tokens_kv=64, dim_head=8, heads=4,
                                           route_block_size=16384, use_triton=True)
    with torch.no_grad():
        out = attn(randn(1, 32, DIM), context=randn(1, 65536 + 1000, DIM, seed=1))
    assert out.shape == (1, 32, DIM) and torch.isfinite(out).all()


MILLION_MEMORY = r"""
import resource, torch
from routeformer import ConditionalRoutedCrossAttention
torch.manual_seed(0)
attn = ConditionalRoutedCrossAttention(dim=512, dim_head=64, heads=8, num_tokens_q=512, num_tokens_kv=1024,
                                       kv_routing_tokens=2, use_triton=True, route_block_size=131072)
memories = torch.randn(1, 1_048_576, 512)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out = attn(torch.randn(1, 1024, 512), context=memories, context_mask=torch.ones(1, 1_048_576).bool())
assert out.shape == (1, 1024, 512) and torch.isfinite(out).all()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20)
"""


@pytest.mark.slow
def test_cross_attention_over_a_million_memory_tokens_in_a_few_gigabytes():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, '-c', MILLION_MEMORY], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    extra_gib = float(done.stdout.strip().splitlines()[-1])
    # the memory itself is 2 GiB of float32; routing it may not add more than one more copy
    assert extra_gib < 2.5, f'{extra_gib:.2f} GiB on top of the inputs'


def test_image_attention_routes_across_the_whole_feature_map():
    torch.manual_seed(0)
    attn = ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=40, num_heavy_tokens_kv=40, light_window_size=4,
                                           **SMALL_ATTN)
    fmap = randn(1, 12, 12, DIM)
    changed = fmap.clone()
    changed[:, :4, :4] += randn(1, 4, 4, DIM, seed=3)  # the top-left light window only
    with torch.no_grad():
        base, out = attn(fmap), attn(changed)
    outside = torch.ones(12, 12, dtype=torch.bool)
    outside[:4, :4] = False
    # the light branch cannot see across windows: every change outside comes from the heavy branch
    assert (out - base)[:, outside].abs().amax() > 1e-3
    attn.routed.heavy_attn.to_out.weight.data.zero_()
    attn.routed.null_q_token.data.zero_()
    with torch.no_grad():
        assert torch.equal(attn(changed)[:, outside], attn(fmap)[:, outside])


def test_image_attention_takes_any_size_channel_first_and_masks():
    torch.manual_seed(0)
    attn = ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=20, num_heavy_tokens_kv=20, light_window_size=4,
                                           channel_first=True, **SMALL_ATTN)
    fmap = randn(2, DIM, 10, 7)
    with torch.no_grad():
        out = attn(fmap)
        assert out.shape == fmap.shape
        attn.channel_first = False
        torch.testing.assert_close(attn(rearrange(fmap, 'b d y x -> b y x d')), rearrange(out, 'b d y x -> b y x d'))
        # masked pixels change nothing for the others
        mask = torch.ones(2, 10, 7, dtype=torch.bool)
        mask[:, 8:] = False
        x = rearrange(fmap, 'b d y x -> b y x d')
        noisy = x.clone()
        noisy[:, 8:] = randn(2, 2, 7, DIM, seed=5)
        torch.testing.assert_close(attn(noisy, mask=mask)[:, :8], attn(x, mask=mask)[:, :8])
    with pytest.raises(ValueError, match='feature map'):
        attn(randn(2, 10, DIM))


def causal_leak(module, x, positions):
    """Largest change of any output before p when the input at p changes."""
    worst = 0.
    with torch.no_grad():
        base = module(x)
        for p in positions:
            changed = x.clone()
            changed[:, p] += randn(x.shape[0], x.shape[-1], seed=p)
            worst = max(worst, (module(changed)[:, :p] - base[:, :p]).abs().max().item())
    return worst


@pytest.mark.parametrize('kwargs', [dict(), dict(num_routed_kv=2, heavy_window_size=4, rotary_emb=True),
                                    dict(router_straight_through=False, multiply_queries_by_score=True,
                                         multiply_keys_by_score=True, use_null_q_tokens=False)],
                         ids=['plain', 'routes_window4_rotary', 'soft_gates_scaled'])
def test_autoregressive_attention_is_strictly_causal_at_every_position(kwargs):
    torch.manual_seed(0)
    attn = ConditionalRoutedAutoregressiveAttention(DIM, light_window_size=8, num_heavy_tokens_q=3,
                                                    num_heavy_tokens_kv=10, **SMALL_ATTN, **kwargs).eval()
    assert causal_leak(attn, randn(2, 40, DIM), positions=range(1, 40)) < 1e-6


def test_seed_autoregressive_attention_leaks_within_a_window():
    # the check above can fail: the seed routes a window's queries by coordinate descent over the window
    seed_module = pytest.importorskip('colt5_attention')
    torch.manual_seed(0)
    attn = seed_module.ConditionalRoutedAutoregressiveAttention(dim=DIM, light_window_size=8, num_heavy_tokens_q=3,
                                                                num_heavy_tokens_kv=10, **SMALL_ATTN).eval()
    assert causal_leak(attn, randn(2, 40, DIM), positions=range(8, 40)) > 1e-3


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op produces while active: what memory a forward+backward holds at least."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def largest_tensor(module, n):
    x = randn(1, n, DIM).requires_grad_()
    with LargestTensor() as tracker:
        module(x).sum().backward()
    return tracker.largest


def test_autoregressive_attention_memory_grows_linearly():
    torch.manual_seed(0)
    cfg = dict(dim=DIM, light_window_size=8, num_heavy_tokens_q=2, num_heavy_tokens_kv=16, **SMALL_ATTN)
    ours = ConditionalRoutedAutoregressiveAttention(**cfg)
    growth = largest_tensor(ours, 512) / largest_tensor(ours, 128)
    assert growth < 4.5, f'largest tensor grew {growth:.1f}x for 4x the length'
    seed_module = pytest.importorskip('colt5_attention')
    seed = seed_module.ConditionalRoutedAutoregressiveAttention(**cfg)
    seed_growth = largest_tensor(seed, 512) / largest_tensor(seed, 128)
    assert seed_growth > 12  # the seed copies the sequence once per window: quadratic


# ---------------------------------------------------------------- routing: masks, gates, gradients

def test_router_gates_are_straight_through_or_soft():
    torch.manual_seed(0)
    x = randn(2, 50, DIM)
    hard = CoordinateDescentRouter(DIM, eps=1., eps_init=1.)
    soft = CoordinateDescentRouter(DIM, straight_through=False, eps=1., eps_init=1.)
    soft.load_state_dict(hard.state_dict())
    idx_h, gates_h, _, _ = hard(x, num_tokens=8)
    idx_s, gates_s, _, _ = soft(x, num_tokens=8)
    assert torch.equal(idx_h, idx_s)
    assert torch.equal(gates_h, torch.ones_like(gates_h))
    assert (gates_s < 1).any() and (gates_s > 0).all() and (gates_s <= 1).all()
    # under no_grad a straight-through router skips coordinate descent: the gates are the same
    with torch.no_grad():
        assert torch.equal(hard(x, num_tokens=8).scores, gates_h.detach())
    # seed behaviour: nothing to route when the sequence is short
    indices, scores, routed, _ = hard(x[:, :8], num_tokens=8)
    assert indices is None and torch.equal(routed, x[:, :8]) and (scores == 1).all()


def test_masked_tokens_are_routed_only_when_too_few_are_valid_and_then_gated_off():
    torch.manual_seed(0)
    router = CoordinateDescentRouter(DIM)
    x = randn(2, 30, DIM)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 10:] = False   # 10 valid, 8 routed
    mask[1, 5:] = False    # 5 valid, 8 routed
    indices, scores, _, routed_mask = router(x, num_tokens=8, mask=mask)
    assert (indices[0] < 10).all() and (scores[0] == 1).all() and routed_mask[0].all()
    assert set(indices[1, :5].tolist()) == set(range(5)) or (routed_mask[1].sum() == 5)
    assert torch.equal(scores[1] == 1, routed_mask[1]) and routed_mask[1].sum() == 5
    # random routing (a negative control) with no mask used to raise TypeError
    indices, scores, _, _ = router(x, num_tokens=8, random_route=True)
    assert indices.shape == (2, 8) and (scores == 1).all()


@pytest.mark.parametrize('factory', [
    lambda: ConditionalRoutedFeedForward(DIM, num_heavy_tokens=8, router_kwargs=dict(eps=1.)),
    lambda: ConditionalRoutedAttention(DIM, num_heavy_tokens_q=8, num_heavy_tokens_kv=12, num_routed_kv=2,
                                       light_window_size=8, router_kwargs=dict(eps=1.), **SMALL_ATTN),
    lambda: ConditionalRoutedAutoregressiveAttention(DIM, num_heavy_tokens_q=3, num_heavy_tokens_kv=12,
                                                     light_window_size=8, router_kwargs=dict(eps=1., eps_init=1.),
                                                     **SMALL_ATTN),
    lambda: ConditionalRoutedFeedForward(DIM, num_heavy_tokens=3, causal=True, window_size=8,
                                         router_kwargs=dict(eps=1.)),
], ids=['feedforward', 'attention', 'autoregressive', 'causal_feedforward'])
def test_gradients_reach_the_routers(factory):
    torch.manual_seed(0)
    module = factory()
    x = randn(2, 48, DIM)
    module(x).square().mean().backward()
    routers = {n: p.grad for n, p in module.named_parameters() if n.endswith('routing_token')}
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers.values()), routers


def test_variable_length_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    modules = [ConditionalRoutedAttention(DIM, num_heavy_tokens_q=8, num_heavy_tokens_kv=12, num_routed_kv=2,
                                          light_window_size=8, rotary_emb=True, **SMALL_ATTN),
               ConditionalRoutedFeedForward(DIM, num_heavy_tokens=8),
               ConditionalRoutedTransformerBlock(DIM, num_heavy_attn_tokens_q=8, num_heavy_attn_tokens_kv=12,
                                                 num_heavy_ff_tokens=8, light_window_size=8, **SMALL_ATTN)]
    x = randn(2, 45, DIM)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    with torch.no_grad():
        for module in modules:
            out = module(x, mask=mask)
            torch.testing.assert_close(out[1, :30], module(x[1:, :30])[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out[0], module(x[:1])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('factory', [
    lambda flash: ConditionalRoutedAttention(DIM, num_heavy_tokens_q=8, num_heavy_tokens_kv=12, num_routed_kv=2,
                                             light_window_size=8, use_flash_attn=flash, **SMALL_ATTN),
    lambda flash: ConditionalRoutedAutoregressiveAttention(DIM, num_heavy_tokens_q=3, num_heavy_tokens_kv=12,
                                                           num_routed_kv=2, light_window_size=8, use_flash_attn=flash,
                                                           **SMALL_ATTN),
    lambda flash: ConditionalRoutedImageAttention(DIM, num_heavy_tokens_q=8, num_heavy_tokens_kv=12,
                                                  light_window_size=4, use_flash_attn=flash, **SMALL_ATTN),
    lambda flash: ConditionalRoutedCrossAttention(DIM, num_tokens_q=8, num_tokens_kv=12, dim_head=8, heads=4,
                                                  kv_routing_tokens=2, use_flash_attn=flash),
], ids=['attention', 'autoregressive', 'image', 'cross'])
def test_flash_path_equals_reference_path_with_gradients(factory):
    results = []
    for flash in (False, True):
        torch.manual_seed(0)
        module = factory(flash)
        shape = (2, 12, 10, DIM) if isinstance(module, ConditionalRoutedImageAttention) else (2, 40, DIM)
        x = randn(*shape).requires_grad_()
        mask = torch.ones(shape[:-1], dtype=torch.bool)
        mask[1, -7:] = False
        if isinstance(module, ConditionalRoutedCrossAttention):
            out = module(x, context=randn(2, 60, DIM, seed=2), context_mask=mask[:, :1].expand(2, 60))
        else:
            out = module(x, mask=mask)
        out.square().mean().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (ref, ref_dx, ref_grads), (fast, dx, grads) = results
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-3)


def test_eval_mode_is_deterministic_and_bf16_autocast_routes_in_float32():
    torch.manual_seed(0)
    block = ConditionalRoutedTransformerBlock(DIM, num_heavy_attn_tokens_q=8, num_heavy_attn_tokens_kv=12,
                                              num_heavy_ff_tokens=8, light_window_size=8, **SMALL_ATTN).eval()
    x = randn(2, 40, DIM)
    with torch.no_grad():
        assert torch.equal(block(x), block(x))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = block(x)
            assert block.conditional_ff.router.scores(x.bfloat16()).dtype == torch.float32
        assert torch.isfinite(out).all()
        assert (out.float() - block(x)).abs().mean() < 0.1


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match='divisible by the number of key/value routes'):
        ConditionalRoutedAttention(DIM, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, num_routed_kv=3, **SMALL_ATTN)
    with pytest.raises(ValueError, match='positive number of tokens'):
        ConditionalRoutedFeedForward(DIM, num_heavy_tokens=0)
    with pytest.raises(ValueError, match='light_window_size'):
        ConditionalRoutedAttention(DIM, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, light_window_size=1)
    with pytest.raises(ValueError, match='fetch_k_ratio'):
        CoordinateDescentRouter(DIM, fetch_k_ratio=0.5)
    with pytest.raises(ValueError, match='num_sets_kv'):
        ConditionalRoutedCrossAttention(DIM, num_tokens_q=4, num_tokens_kv=4, num_sets_kv=2, kv_routing_tokens=4)
    with pytest.raises(ValueError, match='routing_tokens'):
        CoordinateDescentRouter(DIM, learned_routing_tokens=True)(randn(1, 10, DIM), num_tokens=2)
    with pytest.raises(TypeError):
        ConditionalRoutedFeedForward(DIM, num_heavy_tokens=4, router_kwargs=dict(n_iterations=3))
    with pytest.raises(TypeError):
        ConditionalRoutedAttention(DIM, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, heavy_head=8)
    with pytest.raises(ValueError, match='context must have shape'):
        ConditionalRoutedCrossAttention(DIM, num_tokens_q=4, num_tokens_kv=4)(randn(1, 5, DIM), randn(1, 5, 8))


def test_routing_tokens_passed_to_forward():
    router = CoordinateDescentRouter(DIM, learned_routing_tokens=True)
    x, tokens = randn(2, 20, DIM), randn(2, 3, DIM, seed=1)
    indices, _, routed, _ = router(x, num_tokens=4, routing_tokens=tokens)
    expected = torch.einsum('b n d, b r d -> b r n', x, tokens).topk(4, dim=-1).indices
    assert torch.equal(indices, expected) and routed.shape == (2, 3, 4, DIM)


def test_topk_router_in_any_attention_layer():
    torch.manual_seed(0)
    transformer = build_transformer(
        dim=DIM, depth=2, heads=4, dim_head=8,
        make_router=lambda layer: TopKRouter(heads=4, dim_head=8, num_tokens_q=6, num_tokens_kv=10,
                                             eps=1., eps_init=1.))
    model = LM(num_tokens=20, dim=DIM, max_seq_len=32, transformer=transformer)
    x = torch.randint(0, 20, (2, 32))
    logits, _ = model(x)
    logits.square().mean().backward()
    router = transformer.blocks[0].mixers[0].fn.routers[0]
    assert router.q_router.routing_token.grad.abs().sum() > 0 and router.kv_router.routing_token.grad.abs().sum() > 0
    # a query that is not routed gets nothing from attention: only the output projection's bias
    attn = transformer.blocks[0].mixers[0].fn
    with torch.no_grad():
        h = torch.randn(1, 32, DIM)
        out, _ = attn(h, LayerContext())
        plan = router(*attn.project(h, h)[:2], causal=False)
        unrouted = torch.ones(32, dtype=torch.bool)
        unrouted[plan.q_index.flatten()] = False
        assert torch.allclose(out[0, unrouted], attn.to_out.bias.expand(int(unrouted.sum()), -1))
    with pytest.raises(ValueError, match='not causal'):
        router(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), causal=True)


# ---------------------------------------------------------------- the decoder LM

def colt5_lm(**kwargs):
    torch.manual_seed(0)
    cfg = dict(num_tokens=16, dim=DIM, depth=2, max_seq_len=64, num_heavy_attn_tokens_q=3,
               num_heavy_attn_tokens_kv=10, num_heavy_ff_tokens=3, num_routed_kv=2, light_window_size=8, **SMALL_ATTN)
    cfg.update(kwargs)
    return ConditionalRoutedTransformerLM(**cfg)


@pytest.mark.parametrize('kwargs', [dict(), dict(heavy_window_size=4, pos_emb='absolute',
                                                 router_straight_through=False), dict(shift_tokens=True)],
                         ids=['rotary', 'window4_absolute_soft_gates', 'token_shift'])
def test_cached_decoding_equals_the_full_forward_pass(kwargs):
    lm = colt5_lm(**kwargs).eval()
    # few distinct tokens: many exactly tied routing scores, which must break the same way
    seq = torch.randint(0, 4, (2, 34), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = lm(seq)
        for prefill in (0, 16):
            cache, outs = {}, []
            if prefill:
                outs.append(lm(seq[:, :prefill], cache=cache)[0])
            outs += [lm(seq[:, i:i + 1], cache=cache)[0] for i in range(prefill, 34)]
            torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)


def test_generate_with_and_without_cache_and_train_step():
    lm = colt5_lm()
    wrapper = AutoregressiveWrapper(lm)
    seq = torch.randint(0, 16, (2, 37), generator=torch.Generator().manual_seed(2))
    loss = wrapper(seq, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and lm.token_emb.weight.grad.abs().sum() > 0
    prompt = seq[:, :11]
    cached = wrapper.generate(prompt, 14, temperature=0)
    uncached = wrapper.generate(prompt, 14, temperature=0, use_cache=False)
    assert cached.shape == (2, 14) and torch.equal(cached, uncached)
    # the greedy continuation is the argmax of a full forward pass over prompt + continuation
    full = torch.cat((prompt, cached), dim=1)
    with torch.no_grad():
        logits, _ = lm.eval()(full[:, :-1])
    assert torch.equal(logits[:, 10:].argmax(dim=-1), cached)


def test_token_shift_changes_what_every_sublayer_sees():
    seq = torch.randint(0, 16, (1, 24), generator=torch.Generator().manual_seed(3))
    plain, shifted = colt5_lm().eval(), colt5_lm(shift_tokens=True).eval()  # same weights
    with torch.no_grad():
        assert not torch.allclose(plain(seq)[0], shifted(seq)[0])
