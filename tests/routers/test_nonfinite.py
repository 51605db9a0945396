"""Non-finite values never reach a router's running statistics.

A NaN or inf in one token's routing vector must count exactly as if that token were padding: the
k-means EMA sums, counts, restart points, cluster loads and the data-driven initialisation all
skip it, and an update never writes a non-finite centroid or balance offset. A step whose
statistics are discarded leaves every buffer as it was.
"""

import pytest
import torch

from routeformer import KMeansRouter, RoutingTransformerLM, discard_statistics

torch.manual_seed(0)


def routing_inputs(n=32, heads=2, d=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, heads, n, d, generator=g, dtype=torch.float64),
            torch.randn(2, heads, n, d, generator=g, dtype=torch.float64))


def poison(t, value, batch=0, pos=5):
    t = t.clone()
    t[batch, :, pos, 3] = value
    return t


def router_state(router):
    return router.means.clone(), router.balance.clone(), router.initted.clone()


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
@pytest.mark.parametrize('mode', ['causal', 'causal-shared-qk', 'balanced', 'cross'])
@pytest.mark.parametrize('initted', [True, False])
def test_a_nonfinite_token_counts_as_padding(value, mode, initted):
    """Statistics of a batch with one non-finite token equal those of the same batch with that
    token masked out, from the data-driven initialisation to the EMA update."""
    q, k = routing_inputs()
    kwargs = dict(heads=2, dim_head=8, num_clusters=4, window_size=4, shared_qk=mode == 'causal-shared-qk',
                  cross_attention=mode == 'cross', balance_rate=0.1)
    poisoned, masked = (KMeansRouter(**kwargs).double().train() for _ in range(2))
    masked.load_state_dict(poisoned.state_dict())
    for router in (poisoned, masked):
        router.initted.fill_(initted)
    causal = mode.startswith('causal')
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, 5] = False
    # the token's query and key both carry the value (cross-attention: its key only, the queries
    # there have no mask)
    bad_q = q if mode == 'cross' else poison(q, value)
    with torch.random.fork_rng():
        poisoned(bad_q, poison(k, value), causal=causal)
    with torch.random.fork_rng():
        masked(q if mode == 'cross' else q.masked_fill(~mask[:, None, :, None], 0.), k, causal=causal, mask=mask)
    for router in (poisoned, masked):
        router.update()
    for a, b in zip(router_state(poisoned), router_state(masked)):
        assert torch.isfinite(a.double()).all()
        assert torch.allclose(a.double(), b.double(), atol=1e-12)


def test_update_never_writes_a_nonfinite_centroid():
    """Whatever the statistics hold (under torch.distributed they come from other processes too),
    a centroid whose update is not finite keeps its value."""
    router = KMeansRouter(heads=2, dim_head=8, num_clusters=4, window_size=4).double()
    before = router.means.clone()
    router._sums = torch.full((2, 4, 8), float('nan'), dtype=torch.float64)
    router._counts = torch.ones(2, 4, dtype=torch.float64)
    router.update()
    assert torch.equal(router.means, before)


def tiny_lm(**kwargs):
    return RoutingTransformerLM(num_tokens=32, dim=32, depth=2, max_seq_len=64, heads=2, window_size=8,
                                causal=True, **kwargs)


def routers_of(model):
    return [m for m in model.modules() if isinstance(m, KMeansRouter)]


def nan_at_one_position(model):
    """A forward hook that writes NaN into one position's token embedding."""
    def hook(module, args, out):
        out = out.clone()
        out[0, 7, 0] = float('nan')
        return out
    return model.token_emb.register_forward_hook(hook)


@pytest.mark.parametrize('shared_qk', [True, False])
def test_one_nan_batch_does_not_poison_the_centroids(shared_qk):
    """One training step on a batch with a single NaN (the automatic update runs after its
    backward), then clean steps: the centroids and the outputs stay finite."""
    model = tiny_lm(shared_qk=shared_qk).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.)  # only the k-means buffers move
    x = torch.randint(0, 32, (2, 64))
    for step in range(12):
        handle = nan_at_one_position(model) if step in (0, 3) else None
        logits, aux = model(x)
        (logits.mean() + aux).backward()
        opt.zero_grad()
        if handle is not None:
            handle.remove()
            assert torch.isnan(logits).any()  # the NaN did reach the routed layers
        for router in routers_of(model):
            assert torch.isfinite(router.means).all() and torch.isfinite(router.balance).all(), step
    model.eval()
    logits, _ = model(x)
    assert torch.isfinite(logits).all()


def test_discarded_statistics_leave_every_buffer_untouched():
    """A skipped step: forward, then the statistics are discarded instead of applied. The next
    update (here: the automatic one after a later backward) applies only the later forward's."""
    model = tiny_lm()
    model.train()
    x = torch.randint(0, 32, (2, 64))
    model(x)  # initialises the centroids from data
    skipped = {name: b.clone() for name, b in model.named_buffers()}
    logits, aux = model(torch.randint(0, 32, (2, 64)))  # the step to skip
    discard_statistics(model)
    model.update_kmeans()
    for name, b in model.named_buffers():
        assert torch.equal(b, skipped[name]), name

    # the same later step with and without a discarded one before it: equal buffers
    reference = tiny_lm()
    reference.load_state_dict(model.state_dict())
    reference.train()
    later = torch.randint(0, 32, (2, 64))
    model(torch.randint(0, 32, (2, 64)))
    discard_statistics(model)
    for m in (model, reference):
        logits, aux = m(later)
        (logits.mean() + aux).backward()
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name
