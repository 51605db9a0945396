"""Sort-and-chunk plans (LSH, k-means): causal mode equals a dense reference with the
'last `window` tokens of my bucket' mask, and is strictly causal."""

import pytest
import torch

from routeformer.attention import RoutedAttention, RoutePlan
from routeformer.routers.bucketed import rank_in_bucket, sort_and_chunk, sort_and_chunk_pairs


def dense(q, k, v, allowed):
    sim = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    sim = sim.masked_fill(~allowed, float('-inf'))
    return sim.softmax(-1) @ v


def recent_same_bucket(buckets, window):
    """(b, h, n) buckets -> (b, h, n, n): key in the query's bucket, not later, fewer than `window`
    bucket-mates between them; written as a loop, independently of the sort."""
    return recent_keys_of_bucket(buckets, buckets, window)


def recent_keys_of_bucket(q_buckets, k_buckets, window):
    """(b, h, n, n): the `window` most recent keys of the query's bucket, not later than it."""
    b, h, n = q_buckets.shape
    allowed = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                mates = [j for j in range(i + 1) if k_buckets[bi, hi, j] == q_buckets[bi, hi, i]]
                allowed[bi, hi, i, mates[-window:]] = True
    return allowed


def plan_as_dense(plan, n):
    """(b, h, n, n) bool: the (query, key) pairs the plan admits (its mask, or its key spans)."""
    b, h, g, i = plan.q_index.shape
    out = torch.zeros(b, h, n, n, dtype=torch.bool)
    if plan.span is not None:
        slots = torch.arange(plan.kv_index.shape[-1])
        admitted = (slots >= plan.span[..., :1]) & (slots < plan.span[..., 1:])
    else:
        admitted = plan.mask
    for bi, hi, gi, ii, ji in admitted.nonzero().tolist():
        q, k = plan.q_index[bi, hi, gi, ii], plan.kv_index[bi, hi, gi, ji]
        if q >= 0 and k >= 0:
            out[bi, hi, q, k] = True
    return out


@pytest.mark.parametrize('pattern', ['random', 'keys_one_bucket', 'queries_one_bucket', 'alternating'])
@pytest.mark.parametrize('window', [2, 4])
def test_pairs_plan_admits_the_recent_keys_of_the_query_bucket(pattern, window):
    """Queries and keys with buckets of their own; the extreme patterns crowd one bucket with the
    other kind, where a reach counted in items (queries and keys) would fall short."""
    g = torch.Generator().manual_seed(window)
    b, h, n = 2, 2, 24
    q_buckets = torch.randint(0, 3, (b, h, n), generator=g)
    k_buckets = torch.randint(0, 3, (b, h, n), generator=g)
    if pattern == 'keys_one_bucket':
        k_buckets.fill_(1)
    elif pattern == 'queries_one_bucket':
        q_buckets.fill_(2)
    elif pattern == 'alternating':
        q_buckets = k_buckets = (torch.arange(n) % 2).expand(b, h, n).contiguous()
    plan = sort_and_chunk_pairs(q_buckets, k_buckets, window)
    assert torch.equal(plan_as_dense(plan, n), recent_keys_of_bucket(q_buckets, k_buckets, window))
    # every query appears exactly once
    q = plan.q_index[plan.q_index >= 0]
    assert q.numel() == b * h * n and torch.equal(q.view(b, h, n).sort(-1).values, torch.arange(n).expand(b, h, n))


@pytest.mark.parametrize('window,num_buckets', [(4, 3), (4, 1), (2, 5)])
def test_causal_spans_admit_the_recent_tokens_of_the_bucket(window, num_buckets):
    """Every round's key spans hold exactly the last `window` tokens of the query's bucket up to
    the query itself, and the query's own key ends its span."""
    g = torch.Generator().manual_seed(window)
    b, h, r, n = 2, 2, 3, 24
    buckets = torch.randint(0, num_buckets, (b, h, r, n), generator=g)
    plan = sort_and_chunk(buckets, window, causal=True)
    assert plan.mask is None and plan.span is not None
    c = n // window
    for rnd in range(r):
        groups = slice(rnd * c, (rnd + 1) * c)
        round_plan = RoutePlan(q_index=plan.q_index[:, :, groups], kv_index=plan.kv_index[:, :, groups],
                               span=plan.span[:, :, groups])
        assert torch.equal(plan_as_dense(round_plan, n), recent_same_bucket(buckets[:, :, rnd], window))
    last = plan.kv_index.gather(-1, plan.span[..., 1] - 1)
    assert torch.equal(last, plan.q_index)


def test_rank_in_bucket():
    sorted_buckets = torch.tensor([[0, 0, 0, 2, 2, 5, 7, 7]])
    assert rank_in_bucket(sorted_buckets).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize('window,num_buckets', [(4, 3), (4, 1), (2, 5), (8, 2)])
def test_causal_single_round_equals_dense(window, num_buckets):
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 16, 8
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    buckets = torch.randint(0, num_buckets, (b, h, n))
    plan = sort_and_chunk(buckets[:, :, None], window, causal=True)
    out, _ = RoutedAttention(backend='reference')(q, k, v, plan, causal=True)
    expected = dense(q, k, v, recent_same_bucket(buckets, window))
    assert torch.allclose(out, expected, atol=1e-12)


def test_causal_multi_round_equals_dense_over_the_multiset_union():
    torch.manual_seed(1)
    b, h, n, d, window, rounds = 1, 2, 16, 8, 4, 3
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    buckets = torch.randint(0, 3, (b, h, rounds, n))
    plan = sort_and_chunk(buckets, window, causal=True)
    out, _ = RoutedAttention(backend='reference')(q, k, v, plan, causal=True)
    # each round is a softmax over its admitted keys; rounds combine by their normalisers, i.e.
    # one softmax over the keys counted once per round that admits them
    counts = sum(recent_same_bucket(buckets[:, :, r], window).double() for r in range(rounds))
    sim = (q @ k.transpose(-1, -2)) * d ** -0.5 + counts.log()
    expected = sim.softmax(-1) @ v
    assert torch.allclose(out, expected, atol=1e-12)


def test_causal_plan_is_strictly_causal():
    torch.manual_seed(2)
    b, h, n, d, window = 1, 2, 32, 8, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    buckets = torch.randint(0, 4, (b, h, 2, n))
    attend = RoutedAttention(backend='reference')
    base, _ = attend(q, k, v, sort_and_chunk(buckets, window, causal=True), causal=True)
    for p in (3, 17, 31):
        # a later token changes its content and its bucket in every round
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[..., p, :] = torch.randn(d, dtype=torch.float64)
        buckets2 = buckets.clone()
        buckets2[..., p] = (buckets2[..., p] + 1) % 4
        out, _ = attend(q2, k2, v2, sort_and_chunk(buckets2, window, causal=True), causal=True)
        assert (out[..., :p, :] - base[..., :p, :]).abs().max() < 1e-12, p


def test_non_causal_chunks_see_own_and_previous_chunk_cyclically():
    buckets = torch.zeros(1, 1, 1, 8, dtype=torch.long)  # one bucket: sorted order is the identity
    plan = sort_and_chunk(buckets, 2, causal=False)
    assert plan.q_index[0, 0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.kv_index[0, 0, 0].tolist() == [6, 7, 0, 1]
    assert plan.mask is None


def test_length_must_be_a_multiple_of_the_window():
    with pytest.raises(ValueError, match='Autopadder'):
        sort_and_chunk(torch.zeros(1, 1, 1, 10, dtype=torch.long), 4, causal=True)
