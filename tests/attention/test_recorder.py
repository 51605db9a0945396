"""The Recorder's compact recordings: the dense weights rebuilt from each call's group weights and
merge shares equal the attention the executor applied (every family that records), per head and per
query slice; a recording stays at the size of the groups, at the seed README's 8192 tokens too."""

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import routeformer.attention.executor as executor
import routeformer.attention.plan as plan_module
from routeformer import Recorder, Reformer
from routeformer.attention import RoutedAttention
from routeformer.attention.recording import AttentionRecord
from routeformer.layers.attention import Attention

from probes import CAUSAL_CONFIGS, non_causal_configs, tokens

CONFIGS = ['full', 'local_heads', 'mem_kv_local', 'context', 'full_relative_positions', 'routing_local_heads',
           'routing_non_causal', 'routing_context', 'sinkhorn_top2', 'sinkhorn_local_heads',
           'sinkhorn_non_causal_sortcut', 'reformer_4hashes', 'reformer_no_duplicates_twin', 'reformer_mem_kv',
           'reformer_attn_chunks', 'reformer_non_causal', 'colt5', 'colt5_sdpa_no_null_tokens']


def factories():
    return dict(CAUSAL_CONFIGS + non_causal_configs())


class DenseOracle(nn.Module):
    """The wrapped executor, which also, where weights are asked for, runs the reference executor on
    values that are the identity (memory values zero): its output is then the dense attention, found
    through the executor's own gather, scatter and merge. Value and output gates scale values and
    outputs, not the weights: the oracle leaves them out."""

    def __init__(self, inner: nn.Module, dense: list):
        super().__init__()
        self.inner, self.dense = inner, dense

    def forward(self, q, k, v, plan, *, mem_kv=None, need_weights=False, **kwargs):
        if need_weights:
            b, h, m = k.shape[0], k.shape[1], k.shape[-2]
            eye = torch.eye(m, dtype=q.dtype).expand(b, h, m, m)
            memory = None if mem_kv is None else (mem_kv[0], mem_kv[0].new_zeros(*mem_kv[0].shape[:2], m))
            dense, _ = RoutedAttention(backend='reference')(q, k, eye, replace(plan, kv_gate=None, q_gate=None),
                                                             mem_kv=memory, **kwargs)
            self.dense.append(dense)
        return self.inner(q, k, v, plan, mem_kv=mem_kv, need_weights=need_weights, **kwargs)


def record(name):
    """(recorder, dense weights of every recorded call by the oracle) of config `name` in float64."""
    model, context = factories()[name]()
    model.double().eval()
    expected = []
    for m in model.modules():
        if isinstance(m, Attention):
            m.executor = DenseOracle(m.executor, expected)
    recorder = Recorder(model)
    x = tokens(n=getattr(model, 'max_seq_len', 16), vocab=getattr(model, 'num_tokens', 32))
    with torch.no_grad():
        recorder(x, **({} if context is None else dict(context=context.double())))
    assert len(recorder.recordings[0]) == len(expected) > 0
    return recorder, expected


@pytest.mark.parametrize('name', CONFIGS)
def test_dense_weights_are_the_attention_applied(name):
    recorder, expected = record(name)
    for rec, oracle in zip(recorder.recordings[0], expected):
        assert isinstance(rec, AttentionRecord)
        dense = rec.dense()
        assert dense.dtype == torch.float64 and dense.shape == oracle.shape == (2, *oracle.shape[1:])
        torch.testing.assert_close(dense, oracle, atol=1e-12, rtol=0)
        # a query's weights sum to 1 over the keys it saw, memory key/values left out
        if 'mem' not in name:
            sums = dense.sum(-1)
            torch.testing.assert_close(sums, (sums > 0.5).double(), atol=1e-12, rtol=0)
            assert (sums > 0.5).double().mean() > 0.5
        if 'non_causal' not in name and not rec.cross:
            assert (dense.triu(1) == 0).all()
        torch.testing.assert_close(rec['attn'], dense, atol=0, rtol=0)


@pytest.mark.parametrize('name', ['local_heads', 'routing_non_causal', 'sinkhorn_top2', 'reformer_4hashes'])
def test_heads_and_query_slices_are_slices_of_the_dense_weights(name):
    recorder, _ = record(name)
    for rec in recorder.recordings[0]:
        dense = rec.dense()
        for h in range(dense.shape[1]):
            torch.testing.assert_close(rec.dense(heads=h), dense[:, h:h + 1], atol=1e-15, rtol=0)
        torch.testing.assert_close(rec.dense(queries=slice(3, 14, 2)), dense[:, :, 3:14:2], atol=1e-15, rtol=0)
        torch.testing.assert_close(rec.dense(heads=-1, queries=-1), dense[:, -1:, -1:], atol=1e-15, rtol=0)
        torch.testing.assert_close(rec.dense(heads=slice(0, None), queries=slice(5, 6)), dense[:, :, 5:6],
                                   atol=1e-15, rtol=0)


def test_layer_dense_attention_joins_local_and_routed_heads():
    recorder, _ = record('routing_local_heads')
    calls = [r for r in recorder.recordings[0] if r.layer == 1]
    assert [r.heads for r in calls] == [(0, 1), (1, 2)]  # one local and one routed head
    layer = torch.cat([r['attn'] for r in calls], dim=1)
    torch.testing.assert_close(recorder.dense_attention(0, 1), layer, atol=0, rtol=0)
    torch.testing.assert_close(recorder.dense_attention(0, 1, heads=1, queries=slice(2, 9)), layer[:, 1:, 2:9],
                               atol=0, rtol=0)
    torch.testing.assert_close(recorder.dense_attention(-1, 1, queries=4), layer[:, :, 4:5], atol=0, rtol=0)
    with pytest.raises(ValueError, match='no self-attention of layer 5'):
        recorder.dense_attention(0, 5)
    with pytest.raises(ValueError, match='recording 1 does not exist'):
        recorder.dense_attention(1, 0)
    with pytest.raises(ValueError, match='consecutive'):
        recorder.dense_attention(0, 1, heads=slice(None, None, -1))
    with pytest.raises(ValueError, match='out of range'):
        recorder.dense_attention(0, 1, heads=2)
    with pytest.raises(TypeError, match='queries must be an int, a slice or None'):
        calls[0].dense(queries=[1, 2])


def test_cross_attention_is_asked_for_by_layer():
    recorder, _ = record('context')
    cross = [r for r in recorder.recordings[0] if r.cross and r.layer == 0]
    assert len(cross) == 1 and cross[0].kv_len == 5
    torch.testing.assert_close(recorder.dense_attention(0, 0, cross=True), cross[0]['attn'], atol=0, rtol=0)


def test_group_weights_and_merge_shares_are_kept():
    recorder, _ = record('reformer_4hashes')
    rec = recorder.recordings[0][0]
    assert set(rec) == {'layer', 'heads', 'cross', 'plan', 'weights', 'attn'} and len(rec) == 6
    probs, shares = rec['weights']
    groups, slots = rec.plan.q_index.shape[-2:]
    assert probs.shape[:4] == shares.shape == (2, 2, groups, slots)
    # each group's softmax sums to 1 (or 0 where no key was admissible); a query's shares over the
    # groups that hold it (its hash rounds) sum to 1
    sums = probs.sum(-1)
    torch.testing.assert_close(sums, (sums > 0.5).double(), atol=1e-12, rtol=0)
    index = rec.plan.q_index.expand_as(shares).flatten(2)
    total = torch.zeros(2, 2, rec.q_len, dtype=shares.dtype).scatter_add_(2, index, shares.flatten(2))
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-12, rtol=0)


def test_merge_shares_are_computed_once_per_recorded_call(monkeypatch):
    calls = []
    original = plan_module.merge_shares

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(plan_module, 'merge_shares', counted)
    monkeypatch.setattr(executor, 'merge_shares', counted)
    torch.manual_seed(0)
    model = Reformer(dim=16, depth=1, max_seq_len=32, heads=2, bucket_size=4, n_hashes=2, causal=True).eval()
    recorder = Recorder(model)
    with torch.no_grad():
        recorder(torch.randn(1, 32, 16))
    assert len(recorder.recordings[0]) == 1 and len(calls) == 1


def test_a_recording_holds_no_sequence_squared_tensor():
    torch.manual_seed(0)
    n = 512
    recorder = Recorder(Reformer(dim=16, depth=2, max_seq_len=n, heads=2, bucket_size=8, n_hashes=2, causal=True))
    with torch.no_grad():
        recorder(torch.randn(1, n, 16))
    for rec in recorder.recordings[0]:
        tensors = [*rec.weights, *(getattr(rec.plan, f) for f in rec.plan.__dataclass_fields__)]
        tensors += list(rec.plan.router_state.values())
        sizes = [t.numel() for t in tensors if isinstance(t, torch.Tensor)]
        # 2 heads x 2 rounds x n queries x 16 slots each, against 2 x n x n for dense weights
        assert max(sizes) == 2 * 2 * n * 16 and sum(sizes) < n * n / 2


README_RECORDER = """
    import resource, torch
    from routeformer import Reformer, Recorder

    model = Reformer(
        dim = 512,
        depth = 12,
        max_seq_len = 8192,
        heads = 8,
        lsh_dropout = 0.1,
        causal = True
    )

    model = Recorder(model)

    x = torch.randn(1, 8192, 512)
    y = model(x)

    recording = model.recordings[0]
    assert len(recording) == 12 and y.shape == (1, 8192, 512)
    head = recording[0].dense(heads=0, queries=slice(0, 1024))
    assert head.shape == (1, 1, 1024, 8192)
    assert torch.allclose(head.sum(-1), torch.ones(()), atol=1e-4)

    model.turn_off()
    model.turn_on()
    model.clear()

    model = model.eject()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_readme_recorder_example_at_full_size_stays_under_8gb():
    """The seed README's Recorder example as written (on the CPU): 12 layers x 8 heads at 8192 tokens,
    whose dense weights alone would be 26 GB."""
    child = subprocess.run([sys.executable, '-c', textwrap.dedent(README_RECORDER)], capture_output=True, text=True,
                           cwd=Path(__file__).parents[2], timeout=1800)
    assert child.returncode == 0, child.stderr[-2000:]
    peak_kb = int(child.stdout.split()[-1])  # the child's own peak: other children of this process don't count
    assert peak_kb < 8 * 2 ** 20, f'peak RSS {peak_kb / 2 ** 20:.1f} GB'
