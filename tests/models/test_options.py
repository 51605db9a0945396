"""The families' options dataclasses against the model classes that take them."""

import dataclasses
import inspect

import pytest
import torch

from routeformer import DSATransformerLM, MoBATransformerLM, MoSATransformerLM, NSATransformerLM
from routeformer.context import LayerContext
from routeformer.layers.attention import Attention
from routeformer.models.dsa import DSAOptions
from routeformer.models.moba import MoBAOptions
from routeformer.models.mosa import MoSAOptions
from routeformer.models.nsa import NSAOptions
from routeformer.routers import FullRouter, LocalRouter

FAMILIES = [(MoBAOptions, MoBATransformerLM), (DSAOptions, DSATransformerLM), (NSAOptions, NSATransformerLM),
            (MoSAOptions, MoSATransformerLM)]


@pytest.mark.parametrize('options, cls', FAMILIES, ids=lambda x: x.__name__)
def test_signature_shows_every_option_with_its_default(options, cls):
    signature = inspect.signature(cls.__init__).parameters
    for f in dataclasses.fields(options):
        assert signature[f.name].default == f.default, f.name


@pytest.mark.parametrize('options, cls, kwargs', [
    (MoBAOptions, MoBATransformerLM, dict(block_size=8, top_k=1)),
    (DSAOptions, DSATransformerLM, dict(index_n_heads=2, index_head_dim=4, index_topk=5, dense_warmup_steps=3)),
    (NSAOptions, NSATransformerLM, dict(compress_block_size=8, compress_stride=4, select_block_size=8,
                                        num_selected_blocks=2, sliding_window_size=8)),
    (MoSAOptions, MoSATransformerLM, dict(sparsity=4, threshold_decay=0.9)),
], ids=lambda x: getattr(x, '__name__', ''))
def test_keywords_reach_the_routers(options, cls, kwargs):
    model = cls(num_tokens=16, dim=16, depth=1, max_seq_len=32, heads=2, dim_head=8, causal=True, **kwargs)
    text = repr(model)
    assert options.split(kwargs)[0] == options(**kwargs)
    for name, value in kwargs.items():  # each router and layer prints its settings
        assert f'{name}={value}' in text, (name, text)


def test_mosa_dense_heads_are_a_head_group_of_their_own():
    model = MoSATransformerLM(num_tokens=16, dim=16, depth=1, max_seq_len=32, heads=4, dim_head=4, causal=True,
                              num_dense_heads=1, n_local_attn_heads=1)
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    assert attn.head_slices == [(0, 1), (1, 2), (2, 4)]
    assert [type(r).__name__ for r in attn.routers] == ['LocalRouter', 'FullRouter', 'MoSARouter']


def test_router_groups_must_cover_the_routed_heads():
    with pytest.raises(ValueError, match='router groups take 2 heads, but 3 heads follow'):
        Attention(16, heads=4, dim_head=4, router=[(FullRouter(), 2)], local_router=LocalRouter(4), n_local_heads=1)
    attn = Attention(16, heads=4, dim_head=4, router=[(None, 1), (LocalRouter(4), 3)])
    x = torch.randn(1, 8, 16)
    out, _ = attn(x, LayerContext())
    assert out.shape == x.shape
