"""Reformer family: the LSH router against dense references written as loops, the fused
log-sum-exp backend against the reference backend, and the reformer-pytorch API (README examples,
every keyword argument, cached decoding, attn_chunks with reversible layers, Recorder, enc-dec).
Causality of every causal configuration is checked in test_causality.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from routeformer import (Autopadder, AutoregressiveWrapper, LSHAttention, LSHRouter, LSHSelfAttention, Recorder,
                         Reformer, ReformerEncDec, ReformerLM)
from routeformer.attention import RoutedAttention, backends
from routeformer.layers.feedforward import FeedForward
from routeformer.routers import lsh
from routeformer.routers.lsh import SELF_ATTN_PENALTY

NUM_TOKENS, DIM, SEQ, BUCKET = 32, 16, 32, 4
SMALL = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, max_seq_len=SEQ, heads=2, dim_head=8, bucket_size=BUCKET,
             n_hashes=2)


def lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    return ReformerLM(**{**SMALL, **kwargs})


def tokens(b=2, n=SEQ, seed=1):
    return torch.randint(0, NUM_TOKENS, (b, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- dense references, as loops

def admitted(buckets, window, causal, attend_across_buckets=True):
    """buckets (n,) of one round -> (n, n) bool: the keys each query may see in that round,
    from the definition (not from the sort-and-chunk code)."""
    n = buckets.shape[0]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    if causal:  # the last `window` tokens of my bucket, up to and including me
        for i in range(n):
            mates = [j for j in range(i + 1) if buckets[j] == buckets[i]]
            allowed[i, mates[-window:]] = True
        return allowed
    order = sorted(range(n), key=lambda t: (int(buckets[t]), t))
    chunk = {t: rank // window for rank, t in enumerate(order)}
    chunks = n // window
    for i in range(n):
        for j in range(n):
            near = chunk[j] == chunk[i] or (chunks > 1 and chunk[j] == (chunk[i] - 1) % chunks)
            allowed[i, j] = near and (attend_across_buckets or bool(buckets[i] == buckets[j]))
    return allowed


def shared_qk_attention(q, v, allowed, bias=None):
    """q, v (n, d); allowed (n, n). Keys are the normalised queries; a token attends to itself only
    when nothing else is allowed. Returns (out, lse)."""
    k = F.normalize(q, dim=-1)
    sim = q @ k.t() * q.shape[-1] ** -0.5
    if bias is not None:
        sim = sim + bias
    eye = torch.eye(q.shape[0], dtype=torch.bool)
    others = allowed & ~eye
    allowed = others | (eye & ~others.any(-1, keepdim=True))
    sim = sim.masked_fill(~allowed, float('-inf'))
    return sim.softmax(-1) @ v, sim.logsumexp(-1)


def lsh_reference(q, v, buckets, window, causal, attend_across_buckets=True, duplicates=True):
    """q, v (n, d), buckets (r, n): one attention per round (self penalised when there are several
    rounds, so that it wins only where no round offers anything else), merged by log-sum-exp; or,
    without duplicates, one attention over the union of the rounds' keys."""
    rounds = buckets.shape[0]
    sets = [admitted(buckets[r], window, causal, attend_across_buckets) for r in range(rounds)]
    if not duplicates:
        return shared_qk_attention(q, v, torch.stack(sets).any(0))[0]
    penalty = torch.eye(q.shape[0], dtype=q.dtype) * SELF_ATTN_PENALTY if rounds > 1 else None
    outs, lses = zip(*(shared_qk_attention(q, v, s, penalty) for s in sets))
    weights = torch.stack(lses).softmax(0)[..., None]
    return (torch.stack(outs) * weights).sum(0)


def run_lsh(router, q, v, *, causal, mask=None):
    """The router's plan through the executor, as the Attention layer runs it (shared QK)."""
    k = F.normalize(q, dim=-1)
    plan = router(q, k, causal=causal, mask=mask)
    out, _ = RoutedAttention(backend='flash_lse')(q, k, v, plan, causal=causal, key_mask=mask, exclude_self=True)
    return out, plan


# ---------------------------------------------------------------- the router

@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('n_hashes', [1, 3])
def test_one_bucket_equals_full_shared_qk_attention(causal, n_hashes):
    torch.manual_seed(0)
    n, d = 16, 8
    q, v = torch.randn(2, 1, n, d, dtype=torch.float64), torch.randn(2, 1, n, d, dtype=torch.float64)
    # one bucket; chunks of n/2 looking one back (non-causal) or one chunk of n (causal) see everything
    router = LSHRouter(bucket_size=n if causal else n // 2, n_hashes=n_hashes, n_buckets=1).eval()
    out, _ = run_lsh(router, q, v, causal=causal)
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    for b in range(2):
        expected, _ = shared_qk_attention(q[b, 0], v[b, 0], allowed)
        assert torch.allclose(out[b, 0], expected, atol=1e-12)


@pytest.mark.parametrize('causal,across,rounds', [(True, True, 1), (True, True, 3), (False, True, 1),
                                                  (False, True, 3), (False, False, 2)])
def test_multi_round_merge_equals_loop_over_rounds(causal, across, rounds):
    torch.manual_seed(1)
    n, d, w = 32, 8, 4
    q, v = torch.randn(1, 2, n, d, dtype=torch.float64), torch.randn(1, 2, n, d, dtype=torch.float64)
    router = LSHRouter(bucket_size=w, n_hashes=rounds, n_buckets=4, attend_across_buckets=across).eval()
    out, plan = run_lsh(router, q, v, causal=causal)
    buckets = plan.router_state['buckets']
    assert buckets.shape == (1, 2, rounds, n) and len(buckets.unique()) > 1
    for h in range(2):
        expected = lsh_reference(q[0, h], v[0, h], buckets[0, h], w, causal, across)
        assert torch.allclose(out[0, h], expected, atol=1e-10)


@pytest.mark.parametrize('causal', [False, True])
def test_no_duplicate_attention_equals_attention_over_union_of_rounds(causal):
    torch.manual_seed(2)
    n, d, w = 32, 8, 4
    q, v = torch.randn(1, 2, n, d, dtype=torch.float64), torch.randn(1, 2, n, d, dtype=torch.float64)
    router = LSHRouter(bucket_size=w, n_hashes=3, n_buckets=4, allow_duplicate_attention=False).eval()
    out, plan = run_lsh(router, q, v, causal=causal)
    for h in range(2):
        expected = lsh_reference(q[0, h], v[0, h], plan.router_state['buckets'][0, h], w, causal, duplicates=False)
        assert torch.allclose(out[0, h], expected, atol=1e-10)
    # and it differs from counting each round's keys again
    with_duplicates, _ = run_lsh(LSHRouter(bucket_size=w, n_hashes=3, n_buckets=4).eval(), q, v, causal=causal)
    assert (with_duplicates - out).abs().max() > 1e-3


def test_single_round_matches_reformer_pytorch():
    # same buckets -> same output as the seed package's LSH attention (non-causal, one round)
    seed_pkg = pytest.importorskip('reformer_pytorch.reformer_pytorch')
    torch.manual_seed(3)
    n, d, w = 64, 16, 8
    qk, v = torch.randn(3, n, d), torch.randn(3, n, d)
    theirs = seed_pkg.LSHAttention(bucket_size=w, n_hashes=1, causal=False)
    out_seed, _, seed_buckets = theirs(qk, v)
    router = LSHRouter(bucket_size=w, n_hashes=1)
    q = qk[:, None]
    k = F.normalize(q, dim=-1)
    plan = router.plan(seed_buckets.view(3, 1, 1, n), causal=False)
    out, _ = RoutedAttention()(q, k, v[:, None], plan, exclude_self=True)
    assert torch.allclose(out[:, 0], out_seed, atol=1e-5)


@pytest.mark.parametrize('block', [None, 48, 144])
def test_hash_is_argmax_over_rotations_and_their_negation(block, monkeypatch):
    if block is not None:  # hashed one or three tokens at a time (16 = 5 * 3 + a short last block)
        monkeypatch.setattr(lsh, 'HASH_BLOCK', block)
    router = LSHRouter(bucket_size=4, n_hashes=3, n_buckets=8, random_rotations_per_head=True).eval()
    k = torch.randn(2, 2, 16, 8)
    rot = router.rotations(batch=2, heads=2, dim=8, n_buckets=8, device=k.device, seed=None)
    rotated = torch.einsum('bhnd,bhdrk->bhrnk', k, rot)
    expected = torch.cat((rotated, -rotated), dim=-1).argmax(-1)
    assert torch.equal(router.hash(k, 8), expected)
    # per head: the same vector in two heads lands in different buckets somewhere
    same = k[:, :1].expand(2, 2, 16, 8)
    hashed = router.hash(same, 8)
    assert not torch.equal(hashed[:, 0], hashed[:, 1])


def test_eval_rotations_are_fixed_and_saved_training_ones_fresh():
    torch.manual_seed(4)
    router = LSHRouter(bucket_size=4, n_hashes=2, n_buckets=8)
    k = F.normalize(torch.randn(2, 2, 32, 8), dim=-1)
    router.eval()
    a = router(k, k, causal=True).router_state['buckets']
    assert torch.equal(a, router(k, k, causal=True).router_state['buckets'])
    # the seed travels with the state dict; a fresh router draws different rotations
    other = LSHRouter(bucket_size=4, n_hashes=2, n_buckets=8).eval()
    assert not torch.equal(a, other(k, k, causal=True).router_state['buckets'])
    other.load_state_dict(router.state_dict())
    assert torch.equal(a, other(k, k, causal=True).router_state['buckets'])
    router.train()
    b, c = (router(k, k, causal=True).router_state['buckets'] for _ in range(2))
    assert not torch.equal(b, c)
    torch.manual_seed(5)
    b2 = router(k, k, causal=True).router_state['buckets']
    torch.manual_seed(5)
    assert torch.equal(b2, router(k, k, causal=True).router_state['buckets'])


@pytest.mark.parametrize('block', [None, 16])
def test_rehash_each_round_false_puts_tokens_in_their_best_buckets(block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(lsh, 'HASH_BLOCK', block)
    router = LSHRouter(bucket_size=4, n_hashes=3, n_buckets=8, rehash_each_round=False).eval()
    k = torch.randn(1, 2, 16, 8)
    buckets = router.hash(k, 8)
    rot = router.rotations(batch=1, heads=2, dim=8, n_buckets=8, device=k.device, seed=None)
    assert rot.shape[-2] == 1  # one rotation for every round
    rotated = torch.einsum('bhnd,bhdrk->bhrnk', k, rot)[:, :, 0]
    top = torch.cat((rotated, -rotated), -1).topk(3, dim=-1).indices
    assert torch.equal(buckets, top.permute(0, 1, 3, 2))
    with pytest.raises(ValueError, match='n_hashes'):
        LSHRouter(bucket_size=4, n_hashes=9, n_buckets=8, rehash_each_round=False)


def test_drop_for_hash_rate_changes_training_hashes_only():
    k = F.normalize(torch.randn(1, 2, 64, 8), dim=-1)
    plain, dropped = (LSHRouter(bucket_size=4, n_hashes=2, n_buckets=16, drop_for_hash_rate=p) for p in (0., 0.5))
    dropped.load_state_dict(plain.state_dict())
    for router in (plain, dropped):
        torch.manual_seed(6)
        router.buckets_seen = router(k, k, causal=False).router_state['buckets']
    assert not torch.equal(plain.buckets_seen, dropped.buckets_seen)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(k, k, causal=False).router_state['buckets'], dropped(k, k, causal=False).router_state['buckets'])


def test_padding_gets_its_own_bucket_and_cannot_move_real_tokens():
    torch.manual_seed(7)
    n, d = 32, 8
    q, v = torch.randn(2, 2, n, d), torch.randn(2, 2, n, d)
    mask = torch.arange(n) < torch.tensor([[n - 9], [n]])
    router = LSHRouter(bucket_size=4, n_hashes=2, n_buckets=4).eval()
    out, plan = run_lsh(router, q, v, causal=False, mask=mask)
    assert (plan.router_state['buckets'][0, :, :, ~mask[0]] == 4).all()
    q2, v2 = q.clone(), v.clone()
    q2[0, :, ~mask[0]], v2[0, :, ~mask[0]] = torch.randn(2, 9, d), torch.randn(2, 9, d)
    out2, _ = run_lsh(router, q2, v2, causal=False, mask=mask)
    assert torch.allclose(out[0, :, mask[0]], out2[0, :, mask[0]], atol=1e-6)
    assert torch.allclose(out[1], out2[1])


def test_decode_plan_admits_what_the_causal_plan_admits():
    torch.manual_seed(8)
    n, w = 24, 4
    router = LSHRouter(bucket_size=w, n_hashes=3, n_buckets=4).eval()
    buckets = torch.randint(0, 4, (1, 1, 3, n))
    for pos in (0, 5, 23):
        plan = router.decode_plan(buckets[..., :pos + 1], pos)
        for r in range(3):
            got = sorted(i for i in plan.kv_index[0, 0, r].tolist() if i >= 0)
            expected = admitted(buckets[0, 0, r], w, causal=True)[pos].nonzero().flatten().tolist()
            assert got == expected


def test_router_rejects_bad_arguments():
    with pytest.raises(ValueError, match='even'):
        LSHRouter(bucket_size=4, n_buckets=6 - 1)
    with pytest.raises(ValueError, match='Autopadder'):
        LSHRouter(bucket_size=4)(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8), causal=False)
    with pytest.raises(ValueError, match='drop_for_hash_rate'):
        LSHRouter(drop_for_hash_rate=1.)
    assert LSHRouter.buckets_for_length(1024, 64) == 16 and LSHRouter.buckets_for_length(192, 64) == 2 and LSHRouter.buckets_for_length(8, 64) == 2


# ---------------------------------------------------------------- the fused log-sum-exp backend

@pytest.mark.parametrize('loss', ['both', 'lse_only', 'out_only'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_flash_lse_backend_equals_reference(loss, dtype):
    torch.manual_seed(9)
    q = torch.randn(2, 3, 4, 8, 5, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 3, 4, 16, 5, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 1, 4, 8, 16) > 0.3
    mask[..., 3] = True
    bias = torch.randn(1, 1, 1, 8, 16, dtype=dtype)
    results = []
    for attend in (backends.reference, backends.flash_lse):
        out, lse, _ = attend(q, k, v, mask, scale=0.4, bias=bias, need_lse=True)
        value = dict(both=out.sin().sum() + lse.cos().sum(), lse_only=lse.cos().sum(), out_only=out.sin().sum())[loss]
        grads = torch.autograd.grad(value, (q, k, v), allow_unused=True)
        results.append((out, lse, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=tol)


# ---------------------------------------------------------------- README examples

def test_readme_lm_example_shrunk():
    model = ReformerLM(num_tokens=64, dim=32, depth=2, max_seq_len=128, heads=4, lsh_dropout=0.1, emb_dim=16,
                       causal=True, bucket_size=8, n_hashes=4, ff_chunks=8, weight_tie=False, attn_chunks=2,
                       num_mem_kv=4, twin_attention=False, use_full_attn=False, full_attn_thres=32,
                       use_scale_norm=False)
    x = torch.randint(0, 64, (1, 128)).long()
    y = model(x)
    assert y.shape == (1, 128, 64) and torch.isfinite(y).all()


def test_readme_stack_and_layer_examples_shrunk():
    model = Reformer(dim=32, depth=2, max_seq_len=128, heads=4, lsh_dropout=0.1, causal=True, bucket_size=8)
    x = torch.randn(1, 128, 32)
    assert model(x).shape == (1, 128, 32)

    attn = LSHSelfAttention(dim=32, heads=4, bucket_size=8, n_hashes=4, causal=False)
    assert attn(torch.randn(3, 64, 32)).shape == (3, 64, 32)

    attn = LSHAttention(bucket_size=8, n_hashes=4, causal=True)
    qk, v = torch.randn(3, 64, 16), torch.randn(3, 64, 16)
    out, attn_weights, buckets = attn(qk, v)
    assert out.shape == (3, 64, 16) and attn_weights.numel() == 0
    assert buckets.shape == (3, 4 * 64) and int(buckets.max()) < 4 * LSHRouter.buckets_for_length(64, 8)


def test_readme_encoder_decoder_example_shrunk():
    encoder = ReformerLM(num_tokens=64, emb_dim=16, dim=32, depth=2, heads=4, max_seq_len=64, bucket_size=8,
                         fixed_position_emb=True, return_embeddings=True)
    decoder = ReformerLM(num_tokens=64, emb_dim=16, dim=32, depth=2, heads=4, max_seq_len=48, bucket_size=8,
                         fixed_position_emb=True, causal=True)
    x, yi = torch.randint(0, 64, (1, 64)).long(), torch.randint(0, 64, (1, 48)).long()
    enc_keys = encoder(x)
    yo = decoder(yi, keys=enc_keys)
    assert enc_keys.shape == (1, 64, 32) and yo.shape == (1, 48, 64)


def small_cnn():
    # an untrained stand-in for the README's pretrained ResNet trunk: (b, 3, H, W) -> (b, 32, H/8, W/8)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, stride=2, padding=1))


def test_readme_image_caption_example_shrunk():
    cnn = small_cnn()
    encoder = Reformer(dim=32, depth=1, heads=4, max_seq_len=64, bucket_size=8)
    decoder = ReformerLM(num_tokens=64, dim=32, depth=1, heads=4, max_seq_len=32, bucket_size=8, causal=True)
    x, yi = torch.randn(1, 3, 64, 64), torch.randint(0, 64, (1, 32)).long()
    visual_emb = cnn(x)
    b, c, h, w = visual_emb.shape
    visual_emb = visual_emb.view(1, c, h * w).transpose(1, 2)
    enc_keys = encoder(visual_emb)
    yo = decoder(yi, keys=enc_keys)
    assert yo.shape == (1, 32, 64)
    yo.sum().backward()
    assert cnn[0].weight.grad.abs().sum() > 0  # the gradient reaches the image encoder through the keys


def test_readme_recorder_example_shrunk():
    model = Recorder(Reformer(dim=32, depth=2, max_seq_len=64, heads=4, lsh_dropout=0.1, causal=True, bucket_size=8))
    x = torch.randn(1, 64, 32)
    model(x)
    assert len(model.recordings[0]) == 2
    model.turn_off()
    model(x)
    assert len(model.recordings) == 1
    model.turn_on()
    model(x)
    assert len(model.recordings) == 2
    model.clear()
    assert model.recordings == []
    assert isinstance(model.eject(), Reformer)


@pytest.mark.slow
def test_readme_examples_as_written():
    model = ReformerLM(num_tokens=20000, dim=1024, depth=12, max_seq_len=8192, heads=8, lsh_dropout=0.1, emb_dim=128,
                       causal=True, bucket_size=64, n_hashes=4, ff_chunks=200, weight_tie=False, attn_chunks=8,
                       num_mem_kv=128, twin_attention=False, use_full_attn=False, full_attn_thres=1024,
                       use_scale_norm=False)
    with torch.no_grad():
        assert model(torch.randint(0, 20000, (1, 8192)).long()).shape == (1, 8192, 20000)
    del model
    model = Reformer(dim=512, depth=12, max_seq_len=8192, heads=8, lsh_dropout=0.1, causal=True)
    with torch.no_grad():
        assert model(torch.randn(1, 8192, 512)).shape == (1, 8192, 512)
    # the README's recording at 8192 tokens, with its peak memory, is a slow test of test_recorder.py
    model = Recorder(model)
    with torch.no_grad():
        model(torch.randn(1, 2048, 512))
    assert len(model.recordings[0]) == 12
    model = model.eject()
    del model
    attn = LSHSelfAttention(dim=128, heads=8, bucket_size=64, n_hashes=8, causal=False)
    assert attn(torch.randn(10, 1024, 128)).shape == (10, 1024, 128)
    attn = LSHAttention(bucket_size=64, n_hashes=16, causal=True)
    out, _, buckets = attn(torch.randn(10, 1024, 128), torch.randn(10, 1024, 128))
    assert out.shape == (10, 1024, 128) and buckets.shape == (10, 16 * 1024)

    kwargs = dict(num_tokens=20000, emb_dim=128, dim=1024, depth=12, heads=8, max_seq_len=4096,
                  fixed_position_emb=True)
    encoder, decoder = ReformerLM(**kwargs, return_embeddings=True), ReformerLM(**kwargs, causal=True)
    x, yi = torch.randint(0, 20000, (1, 4096)).long(), torch.randint(0, 20000, (1, 4096)).long()
    with torch.no_grad():
        assert decoder(yi, keys=encoder(x)).shape == (1, 4096, 20000)
    del encoder, decoder

    resnet_like = nn.Sequential(small_cnn(), nn.Conv2d(32, 512, 1))
    encoder = Reformer(dim=512, depth=6, heads=8, max_seq_len=4096)
    decoder = ReformerLM(num_tokens=20000, dim=512, depth=6, heads=8, max_seq_len=4096, causal=True)
    x, yi = torch.randn(1, 3, 512, 512), torch.randint(0, 20000, (1, 4096)).long()
    with torch.no_grad():
        visual_emb = resnet_like(x)
        b, c, h, w = visual_emb.shape
        visual_emb = visual_emb.view(1, c, h * w).transpose(1, 2)
        assert decoder(yi, keys=encoder(visual_emb)).shape == (1, 4096, 20000)


# ---------------------------------------------------------------- decoding, determinism, gradients

@pytest.mark.parametrize('config', [dict(), dict(n_hashes=4, num_mem_kv=2, n_local_attn_heads=1),
                                    dict(lsh_allow_duplicate_attention=False, attn_chunks=3, depth=1)],
                         ids=['default', 'memkv_local_4hashes', 'nodup_chunks'])
def test_cached_decoding_equals_full_forward(config):
    model = lm(causal=True, **config).eval()
    x = tokens(b=2, n=SEQ)
    with torch.no_grad():
        full = model(x)
        cache = {}
        prefix = 8
        steps = [model(x[:, :prefix], cache=cache)]
        steps += [model(x[:, t:t + 1], cache=cache) for t in range(prefix, SEQ)]
    cached = torch.cat(steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()
    wrapper = AutoregressiveWrapper(model)
    prompt = tokens(b=2, n=5, seed=3)
    greedy = wrapper.generate(prompt, 8, temperature=0., use_cache=True)
    assert torch.equal(greedy, wrapper.generate(prompt, 8, temperature=0., use_cache=False))


def test_eval_outputs_identical_across_calls_training_ones_not():
    model = lm(causal=False, lsh_dropout=0.)
    x = tokens()
    model.train()
    assert not torch.allclose(model(x), model(x))  # fresh rotations every training call
    model.eval()
    assert torch.equal(model(x), model(x))


def grads_of(model, x, *, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('config', [dict(), dict(lsh_dropout=0.2, num_mem_kv=2, n_local_attn_heads=1)],
                         ids=['plain', 'dropout_memkv_local'])
def test_attn_chunks_with_reversible_gives_exact_gradients(config):
    chunked = lm(attn_chunks=3, causal=True, **config).double().train()
    plain = lm(attn_chunks=1, causal=True, reversible=False, **config).double().train()
    plain.load_state_dict(chunked.state_dict())
    x = tokens()
    out_a, grads_a = grads_of(chunked, x, seed=11)
    out_b, grads_b = grads_of(plain, x, seed=11)
    # plain sequential residuals differ from the reversible coupling: compare against the coupling
    # run with plain autograd (no recompute), which is the model the reversible path must equal
    plain_rev = lm(attn_chunks=1, causal=True, **config).double().train()
    plain_rev.load_state_dict(chunked.state_dict())
    plain_rev.transformer.recompute_in_backward = False
    plain_rev.reverse_thres = SEQ  # the threshold switch does the same
    out_c, grads_c = grads_of(plain_rev, x, seed=11)
    assert not plain_rev.transformer.recompute_in_backward
    assert torch.allclose(out_a, out_c, atol=1e-10)
    assert grads_a.keys() == grads_c.keys() and len(grads_a) > 10
    for name in grads_c:
        assert torch.allclose(grads_a[name], grads_c[name], atol=1e-8), name
    assert out_b.shape == out_a.shape and grads_b  # the sequential model trains too


def test_layer_dropout_never_removes_all_gradients():
    for reverse_thres in (0, SEQ):  # reversible recompute, and plain autograd below the threshold
        model = lm(layer_dropout=0.95, reverse_thres=reverse_thres).train()
        for seed in range(3):
            torch.manual_seed(seed)
            model.zero_grad(set_to_none=True)
            model(tokens()).sum().backward()
            layer_grads = [p.grad for p in model.transformer.parameters() if p.grad is not None]
            assert layer_grads and any(g.abs().sum() > 0 for g in layer_grads)


@pytest.mark.parametrize('kwargs', [dict(use_full_attn=True), dict(full_attn_thres=SEQ)], ids=['full', 'thres'])
def test_full_attention_keeps_positions(kwargs):
    model = lm(**kwargs).eval()
    x = tokens(b=1)
    swapped = x.clone()
    swapped[0, [3, 20]] = x[0, [20, 3]]
    out, out_swapped = model(x), model(swapped)
    # without positions the outputs would just be swapped as well
    assert (out_swapped[0, [20, 3]] - out[0, [3, 20]]).abs().max() > 1e-3


def test_flash_backend_equals_reference_in_the_model():
    model = lm(causal=True, num_mem_kv=2).double().train()
    x = tokens()
    out_a, grads_a = grads_of(model, x, seed=3)
    for module in model.modules():
        if isinstance(module, RoutedAttention):
            module.backend = 'reference'
    out_b, grads_b = grads_of(model, x, seed=3)
    assert torch.allclose(out_a, out_b, atol=1e-10)
    for name in grads_b:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-9), name


# ---------------------------------------------------------------- keys, enc-dec, Recorder

def test_keys_go_through_cross_attention_not_into_the_buckets():
    model = Recorder(lm(causal=True).eval())
    x, keys = tokens(b=1), torch.randn(1, 12, DIM)
    plain = model(x)
    with_keys = model(x, keys=keys)
    assert (plain - with_keys).abs().max() > 1e-3
    assert torch.allclose(model(x, context=keys), with_keys)
    first, second = model.recordings[0], model.recordings[1]
    lsh = [r for r in first if 'buckets' in r['plan'].router_state]
    lsh_keys = [r for r in second if 'buckets' in r['plan'].router_state]
    assert len(lsh) == len(lsh_keys) == 2
    # the first layer hashes the same tokens with or without keys: the keys are not hashed
    assert torch.equal(lsh[0]['plan'].router_state['buckets'], lsh_keys[0]['plan'].router_state['buckets'])
    assert lsh_keys[0]['plan'].router_state['buckets'].shape[-1] == SEQ
    assert sum(r['cross'] for r in second) == 2 and not any(r['cross'] for r in first)
    # the default cross-attention reuses each layer's projections and norm: no weights of its own
    names = {n for n, _ in model.net.named_parameters()}
    assert not any('mixers.1.' in n for n in names)
    assert n_params(model.net) == n_params(lm(causal=True, reversible=False))
    with pytest.raises(ValueError, match='once'):
        model(x, keys=keys, context=keys)


def test_receives_context_builds_own_cross_attention_weights():
    model = lm(causal=True, receives_context=True)
    own = sum(p.numel() for n, p in model.named_parameters() if 'mixers.1.' in n)
    assert own > 4 * DIM * 16
    with pytest.raises(ValueError, match='context'):
        model(tokens())
    assert model(tokens(), keys=torch.randn(2, 7, DIM)).shape == (2, SEQ, NUM_TOKENS)


def test_encoder_decoder_trains_and_generates():
    torch.manual_seed(0)
    enc_dec = ReformerEncDec(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
                             enc_bucket_size=2, dec_num_tokens=NUM_TOKENS, dec_depth=1, dec_heads=2,
                             dec_max_seq_len=16, ignore_index=-100)
    assert enc_dec.decoder.net.bucket_size == 4  # twice the encoder's
    src, tgt = tokens(n=16), tokens(n=16, seed=4)
    opt = torch.optim.Adam(enc_dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = enc_dec(src, tgt, return_loss=True)
        assert loss.ndim == 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert enc_dec(src, tgt).shape == (2, 16, NUM_TOKENS)
    out = enc_dec.generate(src, tgt[:, :1], 6, temperature=0.)
    assert out.shape == (2, 6)


@pytest.mark.parametrize('precision', ['autocast', 'bf16_weights'])
def test_recorder_attention_and_buckets(precision):
    model = lm(causal=False, n_hashes=3, n_local_attn_heads=1, heads=3).eval()
    if precision == 'bf16_weights':
        model = model.to(torch.bfloat16)
    rec = Recorder(model)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'autocast'):
        rec(tokens())
    entries = rec.recordings[0]
    lsh = [e for e in entries if 'buckets' in e['plan'].router_state]
    assert len(lsh) == 2 and all(e['heads'] == (1, 3) for e in lsh)
    for e in lsh:
        attn = e['attn']
        assert attn.shape == (2, 2, SEQ, SEQ) and attn.dtype == torch.float32
        # the rounds' weights are weighted by their share of the merge: each row sums to one
        assert torch.allclose(attn.sum(-1), torch.ones(2, 2, SEQ), atol=2e-2)
        assert e['plan'].router_state['buckets'].shape == (2, 2, 3, SEQ)


def test_lsh_attention_return_attn_matches_its_output():
    torch.manual_seed(12)
    attn = LSHAttention(bucket_size=4, n_hashes=3, causal=True, return_attn=True).eval()
    qk, v = torch.randn(2, 32, 8, dtype=torch.float64), torch.randn(2, 32, 8, dtype=torch.float64)
    out, weights, buckets = attn(qk, v)
    assert torch.allclose(weights.to(out.dtype) @ v, out, atol=1e-5)
    assert (weights.triu(1) == 0).all()
    assert buckets.shape == (2, 3 * 32)


def test_lsh_self_attention_return_attn():
    attn = LSHSelfAttention(dim=DIM, heads=2, bucket_size=4, n_hashes=2, return_attn=True, n_local_attn_heads=1)
    out, weights, buckets = attn(torch.randn(2, SEQ, DIM))
    assert out.shape == (2, SEQ, DIM) and weights.shape == (2, 2, SEQ, SEQ) and buckets.shape == (2, 1, 2, SEQ)


# ---------------------------------------------------------------- keyword arguments have effects

def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_structural_keyword_arguments():
    base = lm()
    assert n_params(lm(one_value_head=True)) < n_params(base)
    twin = lm(twin_attention=True)
    assert not any(isinstance(m, FeedForward) for m in twin.modules())
    assert len(twin.transformer.blocks[0].ff.fn.routers) == 1
    tied = lm(weight_tie=True, depth=3)
    assert tied.transformer.blocks[0].mixers[0].fn is tied.transformer.blocks[2].mixers[0].fn
    assert tied.transformer.blocks[0].ff.fn is tied.transformer.blocks[2].ff.fn
    assert lm(pkm_layers=(1,), pkm_num_keys=8).transformer.blocks[0].ff.fn.__class__.__name__ == 'PKM'
    assert n_params(lm(emb_dim=8)) < n_params(base)
    assert lm(return_embeddings=True)(tokens()).shape == (2, SEQ, DIM)
    assert lm(num_mem_kv=3).transformer.blocks[0].mixers[0].fn.mem_inputs.shape == (1, 3, DIM)
    local = lm(n_local_attn_heads=1).transformer.blocks[0].mixers[0].fn
    assert local.routers[0].window_size == 2 * BUCKET
    assert lm(use_scale_norm=True).transformer.blocks[0].ff.norm.__class__.__name__ == 'ScaleNorm'
    assert lm(use_rezero=True).transformer.blocks[0].ff.rezero is not None
    ff = lm(ff_glu=True, ff_mult=2).transformer.blocks[0].ff.fn
    assert ff.glu and ff.proj_out.in_features == 2 * DIM
    assert lm(ff_activation=nn.ReLU).transformer.blocks[0].ff.fn.act.__class__ is nn.ReLU
    for flag, cls in (('fixed_position_emb', 'FixedPositionalEmbedding'),
                      ('absolute_position_emb', 'AbsolutePositionalEmbedding'),
                      ('axial_position_emb', 'AxialPositionalEmbedding')):
        model = lm(**{flag: True})
        assert model.pos_emb.__class__.__name__ == cls
        assert model.transformer.blocks[0].mixers[0].fn.rotary is None
    assert lm(axial_position_emb=True).pos_emb.axial_shape == (SEQ // BUCKET, BUCKET)
    router = lm(random_rotations_per_head=True, lsh_attend_across_buckets=False, lsh_allow_duplicate_attention=False,
                rehash_each_round=False, drop_for_hash_rate=0.1).transformer.blocks[0].mixers[0].fn.routers[0]
    assert (router.random_rotations_per_head, router.attend_across_buckets, router.allow_duplicate_attention,
            router.rehash_each_round, router.drop_for_hash_rate) == (True, False, False, False, 0.1)
    assert router.n_buckets == SEQ // BUCKET


def test_weight_tie_embedding_uses_normalised_embeddings():
    model = lm(weight_tie_embedding=True).eval()
    h = model(tokens(), return_embeddings=True)
    expected = h @ F.normalize(model.token_emb.weight, dim=-1).t()
    assert torch.allclose(model(tokens()), expected, atol=1e-5)
    assert not any('to_logits' in name for name, _ in model.named_parameters())


@pytest.mark.parametrize('kwargs', [dict(post_attn_dropout=0.5), dict(lsh_dropout=0.5), dict(ff_dropout=0.5)])
def test_dropouts_act_in_training_only(kwargs):
    model, reference = lm(**kwargs), lm()
    x = tokens()
    for m in (model, reference):
        m.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = reference(x)
    assert (a - b).abs().max() > 1e-3
    model.eval(), reference.eval()
    assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_ff_chunks_do_not_change_results():
    a, b = lm(ff_chunks=1).double(), lm(ff_chunks=5).double()
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():  # chunking applies where activations are not kept
        assert torch.allclose(a(tokens()), b(tokens()), atol=1e-10)


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match='no_such_option'):
        lm(no_such_option=1)
    with pytest.raises(ValueError, match='moe_layers'):
        lm(moe_layers=(1,))
    with pytest.raises(ValueError, match='input_attn_mask'):
        lm()(tokens(), input_attn_mask=torch.ones(2, SEQ, SEQ, dtype=torch.bool))
    with pytest.raises(ValueError, match='Autopadder'):
        lm()(tokens(n=SEQ - 3))
    with pytest.raises(ValueError, match='longer than max_seq_len'):
        Reformer(dim=DIM, depth=1, heads=2, bucket_size=4, max_seq_len=16)(torch.randn(1, 32, DIM))
    with pytest.raises(ValueError, match='divisible'):
        Reformer(dim=10, depth=1, heads=4)
    with pytest.raises(ValueError, match='pkm_layers'):
        lm(twin_attention=True, pkm_layers=(1,))


def test_autopadder_pads_lm_stack_and_layer():
    x = tokens(n=SEQ - 5)
    model = lm(causal=True).eval()
    padded = Autopadder(model)
    assert padded.multiple_of == BUCKET
    out = padded(x)
    assert out.shape == (2, SEQ - 5, NUM_TOKENS)
    # causal: the real positions are what a full-length input gives at those positions
    full = model(torch.cat((x, tokens(n=5, seed=9)), dim=1))
    assert torch.allclose(out, full[:, :SEQ - 5], atol=1e-5)
    stack = Autopadder(Reformer(dim=DIM, depth=1, heads=2, bucket_size=4, n_local_attn_heads=1))
    assert stack.multiple_of == 8
    assert stack(torch.randn(1, 13, DIM)).shape == (1, 13, DIM)
    layer = Autopadder(LSHSelfAttention(dim=DIM, heads=2, bucket_size=4, num_mem_kv=2))
    assert layer(torch.randn(2, 13, DIM)).shape == (2, 13, DIM)


def test_bf16_autocast_forward_backward():
    model = lm(causal=True, num_mem_kv=2, n_local_attn_heads=1, attn_chunks=2).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(tokens())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
