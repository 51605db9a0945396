"""The seed packages' public API from routeformer: every exported name, every class's positional
order, and the defaults a script written for a seed package relies on (ignore_index, pad_left)."""

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import routeformer
from routeformer import (AutoregressiveWrapper, KmeansAttention, ReformerLM, RoutingTransformerEncDec,
                         RoutingTransformerLM, SinkhornSelfAttention, SinkhornTransformerLM, TrainingWrapper,
                         update_kmeans_on_backwards)

SEEDS = ['routing_transformer', 'reformer_pytorch', 'sinkhorn_transformer', 'colt5_attention']


def seed_exports(package):
    module = importlib.import_module(package)
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith('_') and not inspect.ismodule(obj)}


def positional_order(fn) -> list[str]:
    fn = fn.__init__ if inspect.isclass(fn) else fn
    if hasattr(fn, 'positional_order'):
        return list(fn.positional_order)
    params = list(inspect.signature(fn).parameters.values())
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name != 'self']


@pytest.mark.parametrize('package', SEEDS)
def test_every_seed_export_imports_from_routeformer(package):
    exports = seed_exports(package)
    assert exports  # the seed package is installed and exports something
    missing = sorted(set(exports) - set(routeformer.__all__))
    assert not missing, f'{package} exports {missing}, which routeformer lacks'
    for name, obj in exports.items():
        ours = getattr(routeformer, name)
        assert inspect.isclass(ours) == inspect.isclass(obj), name


# reformer-pytorch's TrainingWrapper lives in a submodule its README and examples import from
EXTRA = [('reformer_pytorch.generative_tools', 'TrainingWrapper'), ('colt5_attention.vit', 'ConditionalRoutedViT')]


@pytest.mark.parametrize('package', SEEDS)
def test_every_seed_class_takes_the_seed_positional_order(package):
    for name, obj in seed_exports(package).items():
        seed, ours = positional_order(obj), positional_order(getattr(routeformer, name))
        assert ours[:len(seed)] == seed, f'{package}.{name}: seed order {seed}, ours {ours}'


@pytest.mark.parametrize('module, name', EXTRA)
def test_submodule_names_the_seed_examples_import(module, name):
    seed = getattr(importlib.import_module(module), name)
    ours = getattr(routeformer, name)
    assert positional_order(ours)[:len(positional_order(seed))] == positional_order(seed)


def test_positional_arguments_bind_in_the_seed_order():
    model = RoutingTransformerLM(16, 32, 1, 64, 2, 8, 16)  # num_tokens, dim, depth, max_seq_len, heads, dim_head, window
    assert (model.num_tokens, model.dim, model.max_seq_len) == (16, 32, 64)
    attn = model.transformer.blocks[0].mixers[0].fn
    assert attn.heads == 2 and attn.to_q.out_features == 16
    assert attn.routers[0].window_size == 16
    sinkhorn = SinkhornTransformerLM(16, 32, 64, 1, 2)  # num_tokens, dim, max_seq_len, depth, heads
    assert sinkhorn.max_seq_len == 64 and sinkhorn.transformer.blocks[0].mixers[0].fn.heads == 2
    with pytest.raises(TypeError, match='multiple values'):
        RoutingTransformerLM(16, 32, 1, 64, 2, heads=2)
    with pytest.raises(TypeError, match='positional arguments'):
        RoutingTransformerLM(16, 32, 1, 64, *range(60))
