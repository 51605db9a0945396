"""The causal coordinate-descent routers of CoLT5 decoders: the rule against a reference written
token by token, causality (a later token changes no earlier decision), and cached decoding
(prefill + decode_step) equal to routing the whole sequence."""

import pytest
import torch

from routeformer.routers.causal_topk import CausalKeyRouter, CausalQueryRouter

WINDOW, DIM = 4, 8


def tokens(b=2, n=15, seed=0):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed))


def routed_positions(index):
    """index (b, g, k) -> per sample, the sorted set of routed positions."""
    return [sorted(int(i) for i in row.flatten() if i >= 0) for row in index]


def query_reference(s, valid, k):
    """The rule, token by token: routed when the score reaches the previous window's k-th best
    valid score (-inf without k of them) and fewer than k tokens of its own window were routed."""
    b, n = s.shape
    out = []
    for bi in range(b):
        chosen = []
        for t in range(n):
            m, first = t // WINDOW, t // WINDOW * WINDOW
            prev = [float(s[bi, j]) for j in range(first - WINDOW, first) if j >= 0 and valid[bi, j]]
            tau = sorted(prev, reverse=True)[k - 1] if m > 0 and len(prev) >= k and k < WINDOW else float('-inf')
            count = sum(1 for j in chosen if j >= first)
            if valid[bi, t] and float(s[bi, t]) >= tau and count < min(k, WINDOW):
                chosen.append(t)
        out.append(chosen)
    return out


@pytest.mark.parametrize('k', [1, 2, 4])
def test_query_routing_follows_the_rule(k):
    router = CausalQueryRouter(DIM, window_size=WINDOW)
    x = tokens()
    valid = torch.ones(2, 15, dtype=torch.bool)
    valid[1, 5] = valid[1, 9] = False
    with torch.no_grad():
        index, gates = router.route(x, valid, k)
        s = router.scores(x)[:, 0]
    assert index.shape == (2, 4, min(k, WINDOW))
    assert routed_positions(index) == query_reference(s, valid, k)
    assert torch.equal(gates, (index >= 0).float())  # straight-through: exactly 1 where routed


def test_query_routing_is_causal():
    router = CausalQueryRouter(DIM, window_size=WINDOW)
    x = tokens()
    valid = torch.ones(2, 15, dtype=torch.bool)
    with torch.no_grad():
        before = routed_positions(router.route(x, valid, 2)[0])
        for t in (6, 11):
            edited = x.clone()
            edited[:, t:] = torch.randn_like(edited[:, t:]) * 5
            after = routed_positions(router.route(edited, valid, 2)[0])
            assert [[p for p in row if p < t] for row in after] == [[p for p in row if p < t] for row in before]


def test_key_routing_takes_the_best_earlier_keys():
    router = CausalKeyRouter(DIM, window_size=WINDOW, num_routing_tokens=2)
    x = tokens()
    valid = torch.ones(2, 15, dtype=torch.bool)
    valid[0, 2] = False
    with torch.no_grad():
        index, gates = router.route(x, valid, 3)
        s = router.scores(x)
    assert index.shape == (2, 2, 4, 3)
    for bi in range(2):
        for r in range(2):
            for m in range(4):
                earlier = [j for j in range(m * WINDOW) if valid[bi, j]]
                best = sorted(earlier, key=lambda j: -float(s[bi, r, j]))[:3]
                assert sorted(int(i) for i in index[bi, r, m] if i >= 0) == sorted(best)
    assert torch.equal(gates, (index >= 0).float())


@pytest.mark.parametrize('grad', [False, True])
@pytest.mark.parametrize('prompt', [0, 3, 8])
def test_cached_decoding_equals_route(prompt, grad):
    torch.manual_seed(0)
    q_router = CausalQueryRouter(DIM, window_size=WINDOW, straight_through=False)
    kv_router = CausalKeyRouter(DIM, window_size=WINDOW, num_routing_tokens=2, straight_through=False)
    x = tokens(n=14).requires_grad_(grad)
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, 6] = False
    with torch.set_grad_enabled(grad):
        q_index, q_gates = q_router.route(x, valid, 2)
        kv_index, kv_gates = kv_router.route(x, valid, 3)
        if prompt:
            q_cache = q_router.prefill(x[:, :prompt], valid[:, :prompt], 2)
            kv_cache = kv_router.prefill(x[:, :prompt], valid[:, :prompt], 3)
        else:
            q_cache, kv_cache = q_router.empty_cache(x), kv_router.empty_cache(x)
        for t in range(prompt, 14):
            m, slot = t // WINDOW, q_cache.count if q_cache.window == t // WINDOW else torch.zeros(2, dtype=torch.long)
            routed, gate = q_router.decode_step(x[:, t:t + 1], valid[:, t], q_cache, 2)
            index, gates = kv_router.decode_step(x[:, t:t + 1], valid[:, t], kv_cache, 3)
            torch.testing.assert_close(index[:, :, 0], kv_index[:, :, m])
            torch.testing.assert_close(gates[:, :, 0], kv_gates[:, :, m])
            for bi in range(2):
                expected = t in q_index[bi, m].tolist()
                assert bool(routed[bi]) == expected
                if expected:
                    torch.testing.assert_close(gate[bi], q_gates[bi, m, int(slot[bi])])


def test_window_size_must_be_positive():
    with pytest.raises(ValueError, match='window_size'):
        CausalQueryRouter(DIM, window_size=0)
    with pytest.raises(ValueError, match='window_size'):
        CausalKeyRouter(DIM, window_size=-1)
