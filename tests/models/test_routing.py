"""Routing Transformer: the k-means router against dense attention written out here, k-means
semantics (init, EMA, automatic vs manual update, eval, reversible, torch.distributed), the seed
API and its README examples, cached decoding, the Recorder and the paper's presets.

Causal configurations are in tests/test_causality.py (`routing_*`)."""

import math
from pathlib import Path

import pytest
import torch

from routeformer import (Autopadder, AutoregressiveWrapper, KMeansRouter, Recorder, RoutingTransformer,
                         RoutingTransformerEncDec, RoutingTransformerLM)
from routeformer.attention import RoutedAttention
from routeformer.helpers import l2norm
from routeformer.layers.relative_position import RelativePositionLogits
from routeformer.models.routing_presets import PRESETS, paper_hparams_to_kwargs, preset_kwargs
from routeformer.routers import LocalRouter, RouteInput
from routeformer.routers.kmeans import ClusterCache, groups_by_cluster

from probes import assert_causal

NUM_TOKENS, DIM = 40, 32


@pytest.fixture(autouse=True)
def one_thread():
    # these models are tiny: a second thread only adds synchronisation (and on a loaded machine, waiting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm(seed=0, train_step=True, **kwargs):
    """A small causal RoutingTransformerLM; `train_step` runs one training step so the centroids are
    initialised from data and updated once."""
    torch.manual_seed(seed)
    cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, heads=4, dim_head=8, max_seq_len=64, causal=True,
               window_size=4)
    cfg.update(kwargs)
    model = RoutingTransformerLM(**cfg)
    if train_step:
        context = torch.randn(2, 16, DIM) if cfg.get('receives_context') else None
        logits, aux = model(tokens(n=cfg['max_seq_len'], seed=seed + 100), context=context)
        (logits.mean() + aux).backward()
        model.zero_grad(set_to_none=True)
    return model


def tokens(b=2, n=64, seed=1):
    return torch.randint(0, NUM_TOKENS, (b, n), generator=torch.Generator().manual_seed(seed))


def routers_of(model):
    return [m for m in model.modules() if isinstance(m, KMeansRouter)]


def qkv(b=2, h=2, n=24, d=8, n_kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_kv = n if n_kv is None else n_kv
    return (torch.randn(b, h, n, d, generator=g, dtype=torch.float64),
            torch.randn(b, h, n_kv, d, generator=g, dtype=torch.float64),
            torch.randn(b, h, n_kv, d, generator=g, dtype=torch.float64))


def dense(q, k, v, counts):
    """Attention over the keys each query may see, a key counted as often as `counts` (b, h, n, m)
    says (a log-sum-exp merge of overlapping groups is exactly that)."""
    sim = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + counts.log()
    return sim.softmax(dim=-1) @ v


def routing_vectors(q, k):
    """What the centroids are trained on without shared QK: the unit queries and the unit keys."""
    return torch.cat((l2norm(q), l2norm(k)), dim=-2)


def nearest(x, means, bias=None):
    """Independent argmax over centroids (similarities offset by the balance `bias` (h, c)), one
    token at a time."""
    b, h, n, _ = x.shape
    bias = torch.zeros(means.shape[:2]) if bias is None else bias
    out = torch.empty(b, h, n, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                out[bi, hi, i] = int((means[hi] @ x[bi, hi, i] + bias[hi]).argmax())
    return out


# ---------------------------------------------------------------- the router against dense attention

def allowed_keys(q_clusters, k_clusters, window):
    """The keys each query may see, one token at a time: the last `window` keys of its cluster at
    positions up to its own; with one cluster per position (k_clusters None), the last `window`
    tokens of its cluster, itself included."""
    b, h, n = q_clusters.shape
    allowed = torch.zeros(b, h, n, n)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                c = q_clusters[bi, hi, i]
                if c < 0:
                    allowed[bi, hi, i, i] = 1  # a padding query: anything finite, compared nowhere
                    continue
                clusters = q_clusters if k_clusters is None else k_clusters
                mates = [j for j in range(i + 1) if clusters[bi, hi, j] == c]
                allowed[bi, hi, i, mates[-window:]] = 1
    return allowed


@pytest.mark.parametrize('shared_qk', [False, True])
@pytest.mark.parametrize('n,window,padded', [(24, 4, False), (23, 4, True), (24, 8, True), (5, 4, False)])
def test_causal_plan_equals_recent_keys_of_own_cluster(n, window, padded, shared_qk):
    q, k, v = qkv(n=n)
    router = KMeansRouter(heads=2, dim_head=8, num_clusters=3, window_size=window, shared_qk=shared_qk).double().eval()
    mask = None
    if padded:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, :3] = False  # left padding
    if shared_qk:
        k = l2norm(q)
    plan = router(q, k, causal=True, mask=mask)
    real = torch.ones(2, n, dtype=torch.bool) if mask is None else mask
    q_clusters = nearest(l2norm(q), router.means).masked_fill(~real[:, None], -1)
    k_clusters = None if shared_qk else nearest(l2norm(k), router.means).masked_fill(~real[:, None], -1)
    assert torch.equal(plan.router_state['clusters'], q_clusters)
    assert shared_qk or torch.equal(plan.router_state['key_clusters'], k_clusters)
    # commitment loss: mean squared distance of a real query's (and key's) unit vector to its
    # centroid, per feature, times 1e-4
    vectors = [(q, q_clusters)] + ([] if shared_qk else [(k, k_clusters)])
    errors = [(l2norm(x) - torch.stack([router.means[h][c[:, h].clamp(min=0)] for h in range(2)], dim=1))
              .square().mean(-1).transpose(1, 2)[real] for x, c in vectors]
    assert torch.allclose(plan.aux_loss, torch.cat(errors).mean() * 1e-4, atol=1e-15)

    allowed = allowed_keys(q_clusters, k_clusters, window)
    assert shared_qk or (allowed.sum(-1) == 0).any() or n < 8  # separate clusters: some queries meet no key
    for backend in ('reference', 'sdpa'):
        out, _ = RoutedAttention(backend=backend)(q, k, v, plan, causal=True, key_mask=mask)
        seen = real & (allowed.sum(-1) > 0).all(dim=1)  # a query no key is admitted to gets 0
        assert torch.allclose(out.transpose(1, 2)[seen], dense(q, k, v, allowed).transpose(1, 2)[seen], atol=1e-12)
        empty = (allowed.sum(-1) == 0) & real[:, None]
        assert (out[empty] == 0).all()


def test_shared_qk_routes_by_the_query_and_separate_qk_routes_queries_and_keys_apart():
    q, k, _ = qkv()
    # shared-QK keys are the normalised queries: a token's cluster is its query's
    shared = KMeansRouter(heads=2, dim_head=8, num_clusters=4, window_size=4, shared_qk=True).double().eval()
    plan = shared(q, l2norm(q), causal=True)
    assert torch.equal(plan.router_state['clusters'], nearest(l2norm(q), shared.means)) and 'key_clusters' not in plan.router_state
    assert shared.prefill(RouteInput(q=q, k=l2norm(q), causal=True), plan).key_clusters is None
    router = KMeansRouter(heads=2, dim_head=8, num_clusters=4, window_size=4).double().eval()
    plan = router(q, k, causal=True)
    assert torch.equal(router.prefill(RouteInput(q=q, k=k, causal=True), plan).key_clusters,
                       plan.router_state['key_clusters'])
    assert torch.equal(plan.router_state['clusters'], nearest(l2norm(q), router.means))
    assert torch.equal(plan.router_state['key_clusters'], nearest(l2norm(k), router.means))


def balanced_reference(q, k, router, mask=None):
    """The seed's balanced assignment written out per cluster, plus coverage: a query no centroid
    took sees its nearest centroid's keys. Returns (counts (b, h, n, n), uncovered (b, h, n))."""
    b, h, n, _ = q.shape
    w = min(router.window_size, n)
    means = router.means
    q_sim, k_sim = l2norm(q) @ means.transpose(-1, -2)[None], l2norm(k) @ means.transpose(-1, -2)[None]
    if mask is not None:
        q_sim = q_sim.masked_fill(~mask[:, None, :, None], -math.inf)
        k_sim = k_sim.masked_fill(~mask[:, None, :, None], -math.inf)
    counts = torch.zeros(b, h, n, n, dtype=torch.float64)
    uncovered = torch.ones(b, h, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for c in range(means.shape[1]):
                qs = [i for i in q_sim[bi, hi, :, c].topk(w).indices.tolist() if q_sim[bi, hi, i, c] > -math.inf]
                ks = [j for j in k_sim[bi, hi, :, c].topk(w).indices.tolist() if k_sim[bi, hi, j, c] > -math.inf]
                for i in qs:
                    uncovered[bi, hi, i] = False
                    counts[bi, hi, i, ks] += 1
            for i in range(n):
                if uncovered[bi, hi, i] and (mask is None or mask[bi, i]):
                    c = int(q_sim[bi, hi, i].argmax())
                    ks = [j for j in k_sim[bi, hi, :, c].topk(w).indices.tolist() if k_sim[bi, hi, j, c] > -math.inf]
                    counts[bi, hi, i, ks] += 1
    if mask is not None:
        uncovered &= mask[:, None]
    return counts, uncovered


@pytest.mark.parametrize('masked', [False, True])
def test_non_causal_balanced_clusters_cover_every_query(masked):
    q, k, v = qkv(n=32)
    router = KMeansRouter(heads=2, dim_head=8, num_clusters=8, window_size=4).double().eval()
    mask = None
    if masked:
        mask = torch.ones(2, 32, dtype=torch.bool)
        mask[0, -5:] = False
    plan = router(q, k, causal=False, mask=mask)
    counts, uncovered = balanced_reference(q, k, router, mask)
    # the seed's assignment alone leaves queries without output: the coverage groups matter here
    assert uncovered.sum() > 0.1 * uncovered.numel()
    # the first num_clusters groups are the balanced clusters: window_size queries and keys each
    assert (plan.q_index[:, :, :8] >= 0).all() and (plan.kv_index[:, :, :8] >= 0).all()
    out, _ = RoutedAttention(backend='reference')(q, k, v, plan, key_mask=mask)
    rows = torch.ones(2, 32, dtype=torch.bool) if mask is None else mask
    assert torch.allclose(out.transpose(1, 2)[rows], dense(q, k, v, counts).transpose(1, 2)[rows], atol=1e-12)
    assert (out.abs().sum(-1) > 0).transpose(1, 2)[rows].all(), 'a query received no attention output'


def test_cross_attention_query_sees_its_nearest_centroids_keys_only():
    q, k, v = qkv(n=20, n_kv=12)
    router = KMeansRouter(heads=2, dim_head=8, num_clusters=4, window_size=4, context_window_size=3,
                          cross_attention=True).double().eval()
    context_mask = torch.ones(2, 12, dtype=torch.bool)
    context_mask[1, -4:] = False
    plan = router(q, k, causal=False, mask=context_mask)
    q_clusters = nearest(l2norm(q), router.means)
    k_sim = (l2norm(k) @ router.means.transpose(-1, -2)[None]).masked_fill(~context_mask[:, None, :, None], -math.inf)
    counts = torch.zeros(2, 2, 20, 12, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            for i in range(20):
                counts[b, h, i, k_sim[b, h, :, q_clusters[b, h, i]].topk(3).indices] = 1
    out, _ = RoutedAttention()(q, k, v, plan, key_mask=context_mask)
    assert torch.allclose(out, dense(q, k, v, counts), atol=1e-12)
    # a query's output depends on nothing but itself and the context: causal-safe for decoders
    q2 = q.clone()
    q2[:, :, 10:] = torch.randn(2, 2, 10, 8, dtype=torch.float64)
    out2, _ = RoutedAttention()(q2, k, v, router(q2, k, causal=False, mask=context_mask), key_mask=context_mask)
    assert torch.allclose(out2[:, :, :10], out[:, :, :10], atol=1e-12)


def test_groups_by_cluster_packs_positions_of_one_cluster():
    clusters = torch.tensor([[[2, 0, 2, 2, 1, 2, 0, 2]]])
    take = torch.tensor([[[True, True, True, True, False, True, True, True]]])
    index, group_cluster = groups_by_cluster(clusters, take, num_clusters=3, size=2)
    # cluster 0: {1, 6}; cluster 2: {0, 2, 3, 5, 7} in three groups; position 4 not taken
    assert index[0, 0].tolist() == [[1, 6], [0, 2], [3, 5], [7, -1]]
    assert group_cluster[0, 0].tolist() == [0, 2, 2, 2]


# ---------------------------------------------------------------- k-means semantics

def test_init_from_data_on_first_training_forward_only():
    q, k, _ = qkv(n=32)
    torch.manual_seed(0)  # the centroids are sampled from the data at random
    # Lloyd iterations until convergence (a few random starts need more than the default 10)
    router = KMeansRouter(heads=2, dim_head=8, num_clusters=4, window_size=4, init_iters=50).double()
    start = router.means.clone()
    router.eval()
    router(q, k, causal=True)
    assert not router.initted and torch.equal(router.means, start), 'eval mode must not touch the centroids'
    router.train()
    state = torch.get_rng_state()
    router(q, k, causal=True)
    assert torch.equal(torch.get_rng_state(), state), 'init must not consume the global RNG (reversible replay)'
    assert router.initted and not torch.allclose(router.means, start)
    assert torch.allclose(router.means.norm(dim=-1), torch.ones(2, 4, dtype=torch.float64))
    # a centroid sits on the data: every one is the normalised mean of the vectors nearest to it
    x = routing_vectors(q, k)
    clusters = nearest(x, router.means)
    for h in range(2):
        for c in clusters[:, h].unique().tolist():
            members = x[:, h][clusters[:, h] == c]
            assert torch.allclose(router.means[h, c], l2norm(members.sum(0)), atol=1e-6)
    initted = router.means.clone()
    router(q * 2 + 1, k, causal=True)
    assert torch.equal(router.means, initted), 'init runs once'


def test_ema_update_formula_and_decay():
    q, k, _ = qkv(n=32)
    for decay in (0.9, 0.5):
        router = KMeansRouter(heads=2, dim_head=8, num_clusters=4, window_size=4, ema_decay=decay).double()
        router.initted.fill_(True)  # keep the constructor's centroids
        old = router.means.clone()
        router.train()
        router(q, k, causal=True)
        router(q.flip(-2), k, causal=True)  # statistics of several forwards add up
        x = torch.cat((routing_vectors(q, k), routing_vectors(q.flip(-2), k)), dim=0)
        clusters = nearest(x, old)
        expected = old.clone()
        for h in range(2):
            for c in clusters[:, h].unique().tolist():
                direction = l2norm(x[:, h][clusters[:, h] == c].sum(0))
                expected[h, c] = l2norm(decay * old[h, c] + (1 - decay) * direction)
        router.update()
        assert torch.allclose(router.means, expected, atol=1e-12)
        router.update()  # nothing accumulated since: a no-op
        assert torch.allclose(router.means, expected, atol=1e-12)


def test_automatic_update_after_backward_and_manual_update():
    x = tokens()
    auto, manual = lm(train_step=False), lm(train_step=False, _register_kmeans_update=False)
    for model in (auto, manual):
        logits, aux = model(x)
        before = [r.means.clone() for r in routers_of(model)]
        (logits.mean() + aux).backward()
        after = [r.means.clone() for r in routers_of(model)]
        changed = any(not torch.equal(a, b) for a, b in zip(before, after))
        assert changed == (model is auto)
    manual.update_kmeans()
    assert all(torch.allclose(a.means, m.means) for a, m in zip(routers_of(auto), routers_of(manual)))
    # through AutoregressiveWrapper, as in the seed README
    wrapper = AutoregressiveWrapper(lm(train_step=False, _register_kmeans_update=False))
    loss = wrapper(x, return_loss=True)
    before = [r.means.clone() for r in routers_of(wrapper)]  # after the forward's init from data
    loss.backward()
    assert all(torch.equal(a, r.means) for a, r in zip(before, routers_of(wrapper)))
    wrapper.update_kmeans()
    assert any(not torch.equal(a, r.means) for a, r in zip(before, routers_of(wrapper)))


def test_cancel_and_register_kmeans_update():
    model = lm(train_step=False)
    model.cancel_kmeans_update()
    logits, aux = model(tokens())
    before = [r.means.clone() for r in routers_of(model)]
    aux.backward()
    assert all(torch.equal(a, r.means) for a, r in zip(before, routers_of(model)))
    model.register_kmeans_update()
    logits, aux = model(tokens())
    aux.backward()
    assert any(not torch.equal(a, r.means) for a, r in zip(before, routers_of(model)))


@pytest.mark.parametrize('restart_dead', [True, False])
def test_dead_centroids_restart_at_the_worst_served_tokens(restart_dead):
    # every token is nearest to centroid 0; centroids 1 and 2 get none and, left alone, never move
    e1 = torch.eye(4)[0]
    g = torch.Generator().manual_seed(0)
    x = l2norm(2 * e1 + 0.4 * torch.randn(1, 1, 32, 4, generator=g))
    router = KMeansRouter(heads=1, dim_head=4, num_clusters=3, window_size=8, ema_decay=0.5, shared_qk=True,
                          restart_dead=restart_dead).train()
    router.means.copy_(torch.stack((e1, -e1, -e1))[None])
    router.initted.fill_(True)
    router(x, None, causal=True)
    router.update()
    means = router.means[0]
    assert means[0] @ e1 > 0.9  # the live centroid moved by EMA
    if not restart_dead:
        assert torch.equal(means[1:], torch.stack((-e1, -e1)))
        return
    similarity = (x[0, 0] @ e1)
    worst = x[0, 0, similarity.argsort()[:2]]
    torch.testing.assert_close(means[1:], worst)  # the two tokens centroid 0 serves worst, worst first
    clusters = router(x, None, causal=True).router_state['clusters']
    assert len(clusters.unique()) == 3  # and they take tokens again


@pytest.mark.parametrize('shared_qk', [True, False])
def test_balance_offsets_spread_queries_and_keys_over_the_clusters(shared_qk):
    # queries and keys crowd near centroid 0; the offsets move them out, each kind on its own
    e1 = torch.eye(4)[0]
    g = torch.Generator().manual_seed(0)
    q, k = (l2norm(2 * sign * e1 + 0.5 * torch.randn(1, 1, 64, 4, generator=g)) for sign in (1, -1))
    router = KMeansRouter(heads=1, dim_head=4, num_clusters=4, window_size=8, shared_qk=shared_qk, ema_decay=0.999,
                          restart_dead=False, balance_rate=0.02).train()
    router.means.copy_(torch.stack((e1, *torch.eye(4)[1:]))[None])
    router.initted.fill_(True)

    def loads():
        plan = router(q, k, causal=True)
        kinds = ('clusters',) if shared_qk else ('clusters', 'key_clusters')
        return [torch.bincount(plan.router_state[kind].flatten(), minlength=4) for kind in kinds]

    before = loads()
    assert before[0][0] > 48  # crowded
    for _ in range(150):
        router.update()
        after = loads()
    assert all(load.max() <= 24 for load in after), after  # about 16 each
    assert (router.balance[1] == 0).all() if shared_qk else (router.balance[1] != 0).any()
    router.update()  # what the last training forward gathered
    router.eval()
    balance = router.balance.clone()
    router(q, k, causal=True)
    router.update()
    assert torch.equal(router.balance, balance)  # nothing moves in eval mode


def test_nothing_changes_in_eval_mode():
    model = lm().eval()
    before = [r.means.clone() for r in routers_of(model)]
    logits, aux = model(tokens())
    (logits.mean() + aux).backward()
    model.update_kmeans()
    assert all(torch.equal(a, r.means) for a, r in zip(before, routers_of(model)))
    assert all(r._sums is None for r in routers_of(model))
    with torch.no_grad():  # and eval outputs are deterministic
        assert torch.equal(model(tokens())[0], model(tokens())[0])


def run_reversible(model, x, recompute, seed=3):
    model.transformer.recompute_in_backward = recompute
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits, aux = model(x)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
    ((logits * weights).sum() + 100 * aux).backward()
    return logits.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('kwargs', [dict(causal=True, n_local_attn_heads=1, local_attn_window_size=4, attn_dropout=0.1),
                                    dict(causal=False, num_mem_kv=1, shared_qk=True)],
                         ids=['causal_local_dropout', 'non_causal_memkv'])
def test_reversible_recompute_reuses_clusters_and_differentiates_the_commitment_loss(kwargs):
    model = lm(train_step=True, reversible=True, commitment_factor=1., _register_kmeans_update=False, **kwargs).double()
    model.update_kmeans()
    x = tokens()
    out_a, aux_a, grads_a = run_reversible(model, x, recompute=True)
    first = sum(float(r._counts.sum()) for r in routers_of(model))
    out_b, aux_b, grads_b = run_reversible(model, x, recompute=False)
    counts = [first, sum(float(r._counts.sum()) for r in routers_of(model)) - first]
    assert torch.allclose(out_a, out_b, atol=1e-8) and torch.allclose(aux_a, aux_b, atol=1e-10)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-7), name
    # the commitment loss reaches the query projection of the routed heads
    assert grads_a['transformer.blocks.0.mixers.0.fn.to_q.weight'].abs().max() > 0
    # one forward's statistics each, whether or not the backward recomputed the layers
    heads = sum(r.means.shape[0] for r in routers_of(model))
    per_token = 2 if not kwargs['causal'] else 1  # non-causal clusters queries and keys
    assert counts == [x.numel() * heads * per_token] * 2


def test_automatic_update_waits_for_the_whole_reversible_backward():
    x = tokens()
    results = []
    for auto in (True, False):
        model = lm(reversible=True, commitment_factor=10., _register_kmeans_update=False, kmeans_ema_decay=0.).double()
        model.update_kmeans()
        if auto:
            model.register_kmeans_update()
        results.append(run_reversible(model, x, recompute=True))
        if auto:  # the update did happen, after the backward
            assert routers_of(model)[0]._sums is None
    for name in results[0][2]:
        assert torch.allclose(results[0][2][name], results[1][2][name], atol=1e-10), name


def test_commitment_factor_scales_the_aux_loss():
    x = tokens()
    a, b = lm(train_step=False).eval(), lm(train_step=False, commitment_factor=1.).eval()
    with torch.no_grad():
        aux_a, aux_b = a(x)[1], b(x)[1]
    assert aux_a.ndim == 0 and aux_a > 0
    assert torch.allclose(aux_b, aux_a * 1e4, rtol=1e-5)


# ---------------------------------------------------------------- torch.distributed

def _distributed_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        model = lm(train_step=False)
        saved = {}
        for step in range(2):
            x = tokens(seed=10 * rank + step)  # every process trains on its own data
            logits, aux = model(x)
            (logits.mean() + aux).backward()  # automatic update: all-reduced statistics
            saved[step] = [r.means.clone() for r in routers_of(model)]
            saved[f'balance{step}'] = [r.balance.clone() for r in routers_of(model)]
            saved[f'x{step}'] = x
        torch.save(saved, Path(out_dir) / f'{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_distributed_processes_keep_identical_centroids(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    for step in (0, 1):
        for a, b in zip(r0[step] + r0[f'balance{step}'], r1[step] + r1[f'balance{step}']):
            assert torch.equal(a, b), 'centroids drifted apart across processes'
    # and they are the update from both processes' data: one process on the union gives the same
    model = lm(train_step=False)
    for r, means, balance in zip(routers_of(model), r0[0], r0['balance0']):
        r.means.copy_(means)
        r.balance.copy_(balance)
        r.initted.fill_(True)
    logits, aux = model(torch.cat((r0['x1'], r1['x1'])))
    (logits.mean() * 0 + aux).backward()
    for r, expected in zip(routers_of(model), r0[1]):
        assert torch.allclose(r.means, expected, atol=1e-6)
    # which differs from one process's data alone
    alone = lm(train_step=False)
    for r, means in zip(routers_of(alone), r0[0]):
        r.means.copy_(means)
        r.initted.fill_(True)
    alone(r1['x1'])[1].backward()
    assert any(not torch.allclose(r.means, e, atol=1e-6) for r, e in zip(routers_of(alone), r0[1]))


# ---------------------------------------------------------------- cached decoding, Recorder

DECODE_CONFIGS = {
    'shared_qk': dict(),
    'separate_qk_memkv': dict(shared_qk=False, num_mem_kv=1),
    'local_reversible_shift': dict(n_local_attn_heads=2, local_attn_window_size=8, num_mem_kv=2, reversible=True,
                                   shift_tokens=True),
    'relative_positions': dict(max_relative_position=6, rel_pos_emb=False, n_local_attn_heads=1,
                               local_attn_window_size=8),
}


@pytest.mark.parametrize('kwargs', DECODE_CONFIGS.values(), ids=DECODE_CONFIGS.keys())
def test_cached_generation_equals_uncached(kwargs):
    wrapper = AutoregressiveWrapper(lm(**kwargs))
    # a prompt of one token decodes from an empty cache; 11 tokens prefill past a local window
    for n in (11, 1):
        x = tokens(n=n)
        cached = wrapper.generate(x, 16, temperature=0)
        assert torch.equal(cached, wrapper.generate(x, 16, temperature=0, use_cache=False))


def test_cached_step_logits_equal_the_full_forward():
    model = lm(shared_qk=False, n_local_attn_heads=1, local_attn_window_size=8).eval()
    x = tokens(n=40)
    with torch.no_grad():
        full, _ = model(x)
        cache = {}
        steps = [model(x[:, :16], cache=cache)[0]]
        steps += [model(x[:, i:i + 1], cache=cache)[0] for i in range(16, 40)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # the router kept the cluster of every position, and a step attends at most window_size keys
    state = next(c for v in cache.values() for c in getattr(v, 'routers', ()) if isinstance(c, ClusterCache))
    assert state.clusters.shape == (2, 3, 40)


def test_encoder_decoder_cached_generation_equals_uncached():
    torch.manual_seed(0)
    model = RoutingTransformerEncDec(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2,
                                     enc_max_seq_len=32, enc_window_size=8, dec_num_tokens=NUM_TOKENS, dec_depth=2,
                                     dec_heads=2, dec_max_seq_len=32, dec_window_size=4, dec_context_window_size=4)
    src, tgt = tokens(n=32), tokens(n=32, seed=2)
    loss, _ = model(src, tgt, return_loss=True)
    loss.backward()
    cached = model.generate(src, tgt[:, :3], 16, temperature=0)
    assert torch.equal(cached, model.generate(src, tgt[:, :3], 16, temperature=0, use_cache=False))


def test_recorder_shows_the_cluster_of_every_token():
    model = lm(n_local_attn_heads=1, local_attn_window_size=8).eval()
    captured = []
    handles = [r.register_forward_hook(lambda m, args, kw, out: captured.append((m, kw, args)), with_kwargs=True)
               for r in routers_of(model)]
    recorder = Recorder(model)
    with torch.no_grad():
        recorder(tokens())
    for h in handles:
        h.remove()
    routed = [rec for rec in recorder.recordings[0] if 'clusters' in rec['plan'].router_state]
    assert len(routed) == 2 and all(rec['heads'] == (1, 4) for rec in routed)
    for rec, (router, _, (q, k)) in zip(routed, captured):
        # causal models share QK by default: one cluster per token, its query's
        clusters = rec['plan'].router_state['clusters']
        key_clusters = rec['plan'].router_state.get('key_clusters', clusters)
        assert clusters.shape == key_clusters.shape == (2, 3, 64)
        assert torch.equal(clusters, nearest(l2norm(q), router.means, router.balance[0]))
        assert 'key_clusters' not in rec['plan'].router_state or torch.equal(
            key_clusters, nearest(l2norm(k), router.means, router.balance[1]))
        # attention only ever lands on keys of the query's own cluster
        same = clusters[..., :, None] == key_clusters[..., None, :]
        attn = rec['attn']
        assert attn.shape == (2, 3, 64, 64) and (attn[~same] == 0).all()
        # a query sums to 1, or to 0 where its cluster held no recent key
        sums = attn.sum(-1)
        assert torch.allclose(sums, (sums > 0.5).float(), atol=1e-5) and (sums > 0.5).float().mean() > 0.5


# ---------------------------------------------------------------- the seed API and every keyword

def test_lm_returns_logits_and_a_scalar_aux_loss():
    model = lm(train_step=False)
    logits, aux = model(tokens())
    assert logits.shape == (2, 64, NUM_TOKENS) and aux.shape == ()
    hidden, _ = lm(train_step=False, return_embeddings=True)(tokens())
    assert hidden.shape == (2, 64, DIM)


def test_unknown_keyword_rejected_with_the_class_name():
    with pytest.raises(TypeError, match='RoutingTransformerLM got unexpected keyword argument.*conv_query_kernl'):
        lm(conv_query_kernl=9)
    with pytest.raises(TypeError, match='RoutingTransformer got unexpected'):
        RoutingTransformer(dim=DIM, depth=1, max_seq_len=64, rotary=True)


@pytest.mark.parametrize('kwargs,phrase', [
    (dict(window_size=128), 'gives no cluster'),
    (dict(kmeans_ema_decay=1.), 'kmeans_ema_decay'),
    (dict(context_window_size=0, receives_context=True), 'context_window_size'),
])
def test_bad_configuration(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        lm(train_step=False, **kwargs)


def test_input_longer_than_max_seq_len():
    with pytest.raises(ValueError, match='longer than max_seq_len'):
        lm(train_step=False)(tokens(n=65))


def test_any_length_without_local_heads_and_autopadder_with_them():
    model = lm().eval()
    assert model.multiple_of == 1
    with torch.no_grad():
        assert model(tokens(n=23))[0].shape == (2, 23, NUM_TOKENS)
    local = lm(n_local_attn_heads=1, local_attn_window_size=8).eval()
    assert local.multiple_of == 8
    with pytest.raises(ValueError, match='Autopadder'):
        local(tokens(n=23))
    with torch.no_grad():
        padded = Autopadder(local)(tokens(n=23))[0]
        # causal: the padding after position 22 changes nothing before it
        longer = torch.cat((tokens(n=23), tokens(n=1, seed=9)), dim=1)
        assert padded.shape == (2, 23, NUM_TOKENS)
        assert torch.allclose(padded, local(longer)[0][:, :23], atol=1e-5)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('kwargs', [dict(ff_mult=2), dict(num_mem_kv=2), dict(ff_glu=True), dict(emb_dim=16),
                                    dict(tie_embedding=True), dict(use_absolute_pos_emb=True), dict(shared_qk=False),
                                    dict(receives_context=True), dict(max_relative_position=4),
                                    dict(pkm_layers=(1,), pkm_num_keys=32), dict(moe_layers=(2,)),
                                    dict(use_scale_norm=True), dict(weight_tie=True)],
                         ids=lambda kw: ','.join(kw))
def test_keyword_changes_parameter_count(kwargs):
    assert num_params(lm(train_step=False, **kwargs)) != num_params(lm(train_step=False))


@pytest.mark.parametrize('kwargs', [
    dict(window_size=8), dict(num_clusters=2), dict(n_local_attn_heads=2), dict(local_attn_window_size=8, n_local_attn_heads=2),
    dict(local_attn_radius_blocks=2, n_local_attn_heads=2), dict(rel_pos_emb=False), dict(causal=False),
    dict(shift_tokens=True), dict(use_rezero=True), dict(reversible=True), dict(ff_activation=torch.nn.ReLU),
], ids=lambda kw: ','.join(kw))
def test_keyword_without_parameters_changes_output(kwargs):
    base = lm(train_step=False).eval()
    changed = lm(train_step=False, **kwargs).eval()
    shapes = {name: t.shape for name, t in changed.state_dict().items()}
    changed.load_state_dict({name: t for name, t in base.state_dict().items() if shapes.get(name) == t.shape},
                            strict=False)
    with torch.no_grad():
        assert (base(tokens())[0] - changed(tokens())[0]).abs().max() > 1e-4


def test_kmeans_ema_decay_reaches_the_routers():
    models = [lm(kmeans_ema_decay=decay) for decay in (0.999, 0.5)]
    assert [routers_of(m)[0].ema_decay for m in models] == [0.999, 0.5]
    for model in models:  # a second step on other data moves the centroids by (1 - decay)
        model(tokens(seed=5))[1].backward()
    assert not torch.allclose(routers_of(models[0])[0].means, routers_of(models[1])[0].means)


@pytest.mark.parametrize('name', ['attn_dropout', 'ff_dropout', 'attn_layer_dropout', 'layer_dropout'])
def test_dropouts_act_in_train_mode(name):
    base, drop = lm(train_step=False), lm(train_step=False, **{name: 0.5})
    drop.load_state_dict(base.state_dict())
    outs = []
    for model in (base, drop):
        torch.manual_seed(5)
        outs.append(model(tokens())[0])
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_context_window_size_and_context_shared_qk_act_in_cross_attention():
    context = torch.randn(2, 16, DIM)
    base = lm(train_step=False, receives_context=True).eval()
    for kwargs in (dict(context_window_size=2), dict(context_shared_qk=True)):
        changed = lm(train_step=False, receives_context=True, **kwargs).eval()
        changed.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            assert (base(tokens(), context=context)[0] - changed(tokens(), context=context)[0]).abs().max() > 1e-4
    router = [r for r in routers_of(lm(train_step=False, receives_context=True, context_window_size=3))
              if r.cross_attention][0]
    assert router.context_window_size == 3


def test_transformer_reversible_gets_parameter_grads_from_features_without_grad():
    torch.manual_seed(0)
    model = RoutingTransformer(dim=DIM, depth=2, max_seq_len=64, heads=4, window_size=4, n_local_attn_heads=2,
                               local_attn_window_size=8, reversible=True)
    y, aux = model(torch.randn(2, 64, DIM), input_mask=torch.ones(2, 64, dtype=torch.bool))
    (y.square().mean() + aux).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters()
               if 'mem_kv' not in n), 'a parameter got no gradient'


def test_encoder_decoder_losses_with_a_reversible_decoder():
    torch.manual_seed(0)
    model = RoutingTransformerEncDec(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2,
                                     enc_max_seq_len=32, enc_window_size=8, dec_num_tokens=NUM_TOKENS, dec_depth=1,
                                     dec_heads=2, dec_max_seq_len=32, dec_window_size=8, dec_reversible=True)
    src, tgt = tokens(n=32), tokens(n=32, seed=2)
    loss, aux = model(src, tgt, return_loss=True)
    before = [r.means.clone() for r in routers_of(model)]
    loss.backward()
    # the encoder's commitment loss is inside `loss`: its routed projections get gradients
    assert model.encoder.net.transformer.blocks[0].mixers[0].fn.to_q.weight.grad.abs().max() > 0
    assert aux > 0
    # every router of both models updated after the one backward
    assert all(not torch.equal(b, r.means) for b, r in zip(before, routers_of(model)))
    model.cancel_kmeans_update()
    before = [r.means.clone() for r in routers_of(model)]
    model(src, tgt, return_loss=True)[0].backward()
    assert all(torch.equal(b, r.means) for b, r in zip(before, routers_of(model)))


def test_bf16_autocast_forward_backward():
    model = lm(n_local_attn_heads=1, local_attn_window_size=8, receives_context=True, max_relative_position=8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, aux = model(tokens(), context=torch.randn(2, 16, DIM))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all() and torch.isfinite(aux)
    (logits.float().mean() + aux).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_balanced_routing_in_a_causal_model_would_leak(monkeypatch):
    # the causality test bites on k-means: the seed's balanced top-k assignment leaks future tokens
    model = lm(max_seq_len=16, window_size=4)
    monkeypatch.setattr(KMeansRouter, 'route_causal', KMeansRouter.route_balanced)
    with pytest.raises(AssertionError, match='leaks'):
        assert_causal(model, x=tokens(n=16), vocab=NUM_TOKENS)


# ---------------------------------------------------------------- relative positions

def test_relative_position_logits_are_clipped_shaw_terms():
    torch.manual_seed(0)
    rel = RelativePositionLogits(8, max_relative_position=3).double()
    q = torch.randn(1, 2, 1, 5, 8, dtype=torch.float64)
    q_pos = torch.tensor([0, 4, 5, 9, 20]).view(1, 1, 1, 5)
    kv_pos = torch.tensor([0, 1, 4, 8, 9, 19]).view(1, 1, 1, 6)
    out = rel(q, q_pos, kv_pos)
    for i in range(5):
        for j in range(6):
            distance = max(-3, min(3, int(kv_pos[0, 0, 0, j] - q_pos[0, 0, 0, i])))
            expected = q[0, :, 0, i] @ rel.table[distance + 3] / 8 ** 0.5
            assert torch.allclose(out[0, :, 0, i, j], expected, atol=1e-12)


# ---------------------------------------------------------------- the paper's presets

def test_presets_at_full_size():
    sizes = {}
    for name in PRESETS:
        kwargs = preset_kwargs(name, num_tokens=1000) if name.startswith('pg19') else preset_kwargs(name)
        with torch.device('meta'):
            model = RoutingTransformerLM(**kwargs)
        sizes[name] = num_params(model)
        attns = [block.mixers[0].fn for block in model.transformer.blocks]
        hp = PRESETS[name]
        heads = hp['local_num_heads'] + hp['sparsity_cluster_num_heads']
        clustered = [a for a in attns if len(a.routers) == 2]
        skip = hp['sparsity_skip_first'] if hp['sparsity_cluster_num_heads'] else hp['num_decoder_layers']
        assert len(attns) == hp['num_decoder_layers'] and len(clustered) == len(attns) - skip
        for a in clustered:
            local, routed = a.routers
            assert a.head_slices == [(0, hp['local_num_heads']), (hp['local_num_heads'], heads)]
            assert routed.means.shape == (hp['sparsity_cluster_num_heads'], hp['sparsity_cluster_size'],
                                          hp['hidden_size'] // heads)
            assert routed.window_size == hp['sparsity_cluster_attention_window']
        assert all(a.rel_pos.max_distance == hp['max_relative_position'] and a.rotary is None for a in attns)
        assert all(a.shared_qk == hp['share_qk'] for a in attns)
    # the pg19 model is the large one, enwik8's routing model about half its local baseline
    assert sizes['pg19_local8k'] > sizes['pg19_local_cluster8k'] > sizes['enwik8_local_cluster8k']
    assert sizes['enwik8_local8k'] > 1.5 * sizes['enwik8_local_cluster8k']
    with pytest.raises(ValueError, match='num_tokens'):
        preset_kwargs('pg19_local_cluster8k')
    with pytest.raises(ValueError, match='unknown preset'):
        preset_kwargs('enwik8')


def test_paper_local_blocks_are_local_router_from_query_shape():
    kwargs = paper_hparams_to_kwargs(dict(PRESETS['enwik8_local8k'], query_shape=4, memory_flange=8))
    model = RoutingTransformerLM(**dict(kwargs, dim=16, heads=2, dim_head=8, depth=1, max_seq_len=16,
                                        n_local_attn_heads=(2,), emb_dim=16))
    router = model.transformer.blocks[0].mixers[0].fn.routers[0]
    paper = LocalRouter.from_query_shape(4, 8)
    q = torch.randn(1, 1, 16, 8)
    for causal in (True, False):
        a, b = router(q, q, causal=causal), paper(q, q, causal=causal)
        assert torch.equal(a.kv_index, b.kv_index) and torch.equal(a.q_index, b.q_index)
    with pytest.raises(ValueError, match='multiple of query_shape'):
        paper_hparams_to_kwargs(dict(PRESETS['enwik8_local8k'], memory_flange=300))


@pytest.mark.parametrize('name', ['pg19_local_cluster8k', 'wikitext103_local_cluster4k', 'enwik8_local8k'])
def test_shrunk_presets_train_and_are_causal(name):
    model = RoutingTransformerLM.from_preset(name, shrink=True, num_tokens=64)
    wrapper = AutoregressiveWrapper(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = wrapper(x, return_loss=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert_causal(model, x=x, positions=(5, 40, 100), vocab=64)
    if name.startswith('pg19'):  # local-only first layers, clustering in the last
        attns = [block.mixers[0].fn for block in model.transformer.blocks]
        assert [len(a.routers) for a in attns] == [1] * (len(attns) - 1) + [2]


# ---------------------------------------------------------------- seed README examples

def readme_lm(num_tokens=20000, dim=512, heads=8, depth=12, max_seq_len=8192, emb_dim=128, dim_head=64,
              window_size=128, n_local_attn_heads=4, pkm_layers=(4, 7), pkm_num_keys=128, moe_layers=(3, 6),
              num_mem_kv=8, ff_chunks=10):
    model = RoutingTransformerLM(
        num_tokens=num_tokens, dim=dim, heads=heads, depth=depth, max_seq_len=max_seq_len, causal=True,
        emb_dim=emb_dim, weight_tie=False, tie_embedding=False, dim_head=dim_head, attn_dropout=0.1,
        attn_layer_dropout=0., ff_dropout=0.1, layer_dropout=0., window_size=window_size,
        n_local_attn_heads=n_local_attn_heads, reversible=True, ff_chunks=ff_chunks, ff_glu=True,
        pkm_layers=pkm_layers, pkm_num_keys=pkm_num_keys, moe_layers=moe_layers, moe_num_experts=4,
        moe_loss_coef=1e-2, num_mem_kv=num_mem_kv, use_scale_norm=False, use_rezero=False, shift_tokens=True)
    x = torch.randint(0, num_tokens, (1, max_seq_len)).long()
    input_mask = torch.ones_like(x).bool()
    y, aux_loss = model(x, input_mask=input_mask)
    aux_loss.backward()
    assert y.shape == (1, max_seq_len, num_tokens)


def readme_transformer(dim=512, heads=8, depth=12, max_seq_len=8192, window_size=128, n_local_attn_heads=4):
    model = RoutingTransformer(dim=dim, heads=heads, depth=depth, max_seq_len=max_seq_len, window_size=window_size,
                               n_local_attn_heads=n_local_attn_heads)
    x = torch.randn(1, max_seq_len, dim)
    input_mask = torch.ones(1, max_seq_len).bool()
    y, aux_loss = model(x, input_mask=input_mask)
    aux_loss.backward()
    assert y.shape == (1, max_seq_len, dim)


def readme_enc_dec(dim=512, num_tokens=20000, depth=4, heads=8, max_seq_len=4096, window_size=128, gen_len=2048):
    model = RoutingTransformerEncDec(
        dim=dim, enc_num_tokens=num_tokens, enc_depth=depth, enc_heads=heads, enc_max_seq_len=max_seq_len,
        enc_window_size=window_size, dec_num_tokens=num_tokens, dec_depth=depth, dec_heads=heads,
        dec_max_seq_len=max_seq_len, dec_window_size=window_size, dec_reversible=True)
    src = torch.randint(0, num_tokens, (1, max_seq_len))
    tgt = torch.randint(0, num_tokens, (1, max_seq_len))
    src_mask = torch.ones_like(src).bool()
    tgt_mask = torch.ones_like(tgt).bool()
    loss, aux_loss = model(src, tgt, enc_input_mask=src_mask, dec_input_mask=tgt_mask, return_loss=True,
                           randomly_truncate_sequence=True)
    loss.backward()
    aux_loss.backward()
    src = torch.randint(0, num_tokens, (1, max_seq_len))
    start_tokens = torch.ones(1, 1).long()
    sample = model.generate(src, start_tokens, seq_len=gen_len, eos_token=2)
    assert sample.shape[0] == 1 and 1 <= sample.shape[1] <= gen_len


def readme_manual_update(num_tokens=20000, dim=1024, heads=8, depth=6, window_size=256, max_seq_len=8192,
                         truncate=False):
    model = RoutingTransformerLM(num_tokens=num_tokens, dim=dim, heads=heads, depth=depth, window_size=window_size,
                                 max_seq_len=max_seq_len, causal=True, _register_kmeans_update=False)
    model = AutoregressiveWrapper(model)
    x = torch.randint(0, num_tokens, (1, max_seq_len))
    loss = model(x, return_loss=True, randomly_truncate_sequence=truncate)
    loss.backward()
    before = [r.means.clone() for r in routers_of(model)]
    model.update_kmeans()
    assert any(not torch.equal(b, r.means) for b, r in zip(before, routers_of(model)))


SMALL_README = {
    'lm': (readme_lm, dict(num_tokens=200, dim=32, heads=4, depth=8, max_seq_len=128, emb_dim=16, dim_head=8,
                           window_size=16, n_local_attn_heads=2, pkm_num_keys=32, num_mem_kv=2, ff_chunks=4)),
    'transformer': (readme_transformer, dict(dim=32, heads=4, depth=2, max_seq_len=256, window_size=16,
                                             n_local_attn_heads=2)),
    'enc_dec': (readme_enc_dec, dict(dim=32, num_tokens=200, depth=1, heads=4, max_seq_len=64, window_size=16,
                                     gen_len=16)),
    'manual_update': (readme_manual_update, dict(num_tokens=200, dim=32, heads=4, depth=2, window_size=16,
                                                 max_seq_len=128)),
    'random_truncation': (readme_manual_update, dict(num_tokens=200, dim=32, heads=4, depth=2, window_size=16,
                                                     max_seq_len=128, truncate=True)),
}


@pytest.mark.parametrize('example', SMALL_README)
def test_readme_example_shrunk(example):
    torch.manual_seed(0)
    fn, sizes = SMALL_README[example]
    fn(**sizes)


@pytest.mark.slow
@pytest.mark.parametrize('example', ['lm', 'transformer', 'enc_dec', 'manual_update', 'random_truncation'])
def test_readme_example_as_written(example):
    torch.manual_seed(0)
    fn, sizes = SMALL_README[example]
    fn(**(dict(truncate=True) if example == 'random_truncation' else {}))


def test_cached_generation_from_a_left_padded_prompt_shorter_than_the_window():
    wrapper = AutoregressiveWrapper(lm(n_local_attn_heads=1, local_attn_window_size=8, shared_qk=False))
    x = tokens(n=5)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    cached = wrapper.generate(x, 12, temperature=0, input_mask=mask)
    assert torch.equal(cached, wrapper.generate(x, 12, temperature=0, input_mask=mask, use_cache=False))


def test_decoded_padding_takes_no_slot_in_a_cluster():
    # token by token from an empty cache with masked tokens in the middle: a masked token must not
    # push a real cluster-mate out of a later token's window (the forward pass gives it no cluster)
    model = lm(n_local_attn_heads=1, local_attn_window_size=8, shared_qk=False, window_size=2, num_clusters=2).eval()
    x = tokens(n=16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 5:8] = False
    with torch.no_grad():
        full, _ = model(x, input_mask=mask)
        cache = {}
        steps = torch.cat([model(x[:, i:i + 1], input_mask=mask[:, :i + 1], cache=cache)[0] for i in range(16)], 1)
    assert torch.allclose(steps[mask], full[mask], atol=1e-5)
