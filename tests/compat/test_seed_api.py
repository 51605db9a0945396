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
    # num_tokens, dim, depth, max_seq_len, heads, dim_head, window_size
    model = RoutingTransformerLM(16, 32, 1, 64, 2, 8, 16)
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


# ---------------------------------------------------------------- wrappers: the seeds' defaults

NUM_TOKENS = 20


def family_models():
    torch.manual_seed(0)
    return dict(
        routing=RoutingTransformerLM(NUM_TOKENS, 32, 1, 32, 2, window_size=8, causal=True, n_local_attn_heads=1),
        reformer=ReformerLM(NUM_TOKENS, 32, 1, 32, 2, bucket_size=8, causal=True, n_local_attn_heads=1),
        sinkhorn=SinkhornTransformerLM(NUM_TOKENS, 32, 32, 1, 2, bucket_size=8, causal=True),
        colt5=routeformer.ConditionalRoutedTransformerLM(
            num_tokens=NUM_TOKENS, dim=32, depth=1, max_seq_len=32, num_heavy_attn_tokens_q=2,
            num_heavy_attn_tokens_kv=4, num_heavy_ff_tokens=2, light_window_size=8, light_heads=2, heavy_heads=2,
            light_dim_head=8, heavy_dim_head=8),
    )


@pytest.mark.parametrize('family', ['routing', 'reformer', 'sinkhorn', 'colt5'])
def test_left_padded_batch_generates_as_each_prompt_alone(family):
    wrapper = AutoregressiveWrapper(family_models()[family])
    torch.manual_seed(1)
    prompts = [torch.randint(1, NUM_TOKENS, (n,)) for n in (9, 3, 6)]  # pads 0, 6, 3: off the block grid
    batch = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for row, p in enumerate(prompts):
        batch[row, 9 - len(p):], mask[row, 9 - len(p):] = p, True
    for use_cache in (True, False):
        out = wrapper.generate(batch, 5, temperature=0, input_mask=mask, use_cache=use_cache)
        for row, p in enumerate(prompts):
            alone = wrapper.generate(p[None], 5, temperature=0, use_cache=use_cache)[0]
            assert torch.equal(out[row], alone), (family, use_cache, row)


@pytest.mark.parametrize('family', ['routing', 'sinkhorn'])
def test_prompt_longer_than_max_seq_len_slides_with_and_without_cache(family):
    model = family_models()[family]
    wrapper = AutoregressiveWrapper(model)
    prompt = torch.randint(0, NUM_TOKENS, (2, 45))
    cached = wrapper.generate(prompt, 3, temperature=0, use_cache=True)
    uncached = wrapper.generate(prompt, 3, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(wrapper.generate(prompt[:, -32:], 3, temperature=0, use_cache=False), uncached)
    with pytest.raises(ValueError, match='sequence length 45 is longer than max_seq_len 32'):
        wrapper(prompt)  # the length passed, not the padded one


def test_ignore_index_defaults_follow_each_seed():
    model = family_models()['routing'].eval()
    x = torch.randint(1, NUM_TOKENS, (2, 17))
    x[:, -4:] = 0  # token 0: the seeds' padding
    logits, aux = model(x[:, :-1])
    ce = {index: F.cross_entropy(logits.transpose(1, 2), x[:, 1:], ignore_index=index) + aux for index in (0, -100)}
    assert not torch.allclose(ce[0], ce[-100])
    # routing- and sinkhorn-transformer's AutoregressiveWrapper: ignore_index = pad_value
    assert torch.allclose(AutoregressiveWrapper(model)(x, return_loss=True), ce[0])
    # reformer-pytorch's TrainingWrapper: -100
    assert torch.allclose(TrainingWrapper(model)(x, return_loss=True), ce[-100])
    assert AutoregressiveWrapper(model, pad_value=3).ignore_index == 3
    enc_dec = RoutingTransformerEncDec(dim=16, enc_num_tokens=8, enc_depth=1, enc_heads=2, enc_max_seq_len=8,
                                       enc_window_size=4, dec_num_tokens=8, dec_depth=1, dec_heads=2,
                                       dec_max_seq_len=8, dec_window_size=4)
    assert enc_dec.decoder.ignore_index == 0


def test_training_wrapper_pads_inputs_and_targets_of_a_list_separately():
    model = family_models()['reformer'].eval()
    wrapper = TrainingWrapper(model)
    seqs = [torch.randint(1, NUM_TOKENS, (n,)) for n in (9, 14)]
    pad = torch.nn.utils.rnn.pad_sequence
    xi, xo = pad([s[:-1] for s in seqs], batch_first=True), pad([s[1:] for s in seqs], batch_first=True)
    expected = F.cross_entropy(AutoregressiveWrapper(model).padded(xi).transpose(1, 2), xo)  # counts padding
    assert torch.allclose(wrapper(seqs, return_loss=True), expected)


def test_pad_left_pads_on_the_left():
    model = family_models()['sinkhorn'].eval()
    x = torch.randint(1, NUM_TOKENS, (2, 12))
    wrapper = AutoregressiveWrapper(model, None, 0, True)  # sinkhorn-transformer's positional order
    logits = routeformer.Autopadder(model, pad_left=True)(x[:, :-1])
    assert torch.allclose(wrapper(x, return_loss=True), F.cross_entropy(logits.transpose(1, 2), x[:, 1:]))
    assert not torch.allclose(logits, AutoregressiveWrapper(model)(x[:, :-1]))


def test_random_truncation_draws_one_length_per_sample_and_drops_the_cut():
    wrapper = AutoregressiveWrapper(family_models()['routing'], ignore_index=-100)
    torch.manual_seed(0)
    x = torch.randint(1, NUM_TOKENS, (8, 20))
    kept, mask, cut = wrapper.truncate(x, None)
    lengths = mask.sum(dim=-1)
    assert len(set(lengths.tolist())) > 1 and int(lengths.min()) >= 2
    assert torch.equal(mask, ~cut) and (kept[cut] == 0).all() and torch.equal(kept[mask], x[:, :kept.shape[1]][mask])
    assert torch.isfinite(wrapper(x, return_loss=True, randomly_truncate_sequence=True))


# ---------------------------------------------------------------- the seeds' layer classes

def test_kmeans_attention_is_causal_and_updates_on_backwards():
    torch.manual_seed(0)
    attn = KmeansAttention(4, 8, 2, 8, causal=True, num_mem_kv=1)
    handle = update_kmeans_on_backwards(attn)
    q, k, v = (torch.randn(1, 2, 32, 8, requires_grad=True) for _ in range(3))
    out, aux = attn(q, k, v)
    means = attn.router.means.clone()
    (out.sum() + aux).backward()
    assert out.shape == q.shape and aux > 0 and not torch.equal(attn.router.means, means)
    handle.remove()
    means = attn.router.means.clone()
    attn(q, k, v)[0].sum().backward()
    assert torch.equal(attn.router.means, means)
    attn.eval()
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 20:] = torch.randn_like(t[:, :, 20:])
    assert torch.allclose(attn(q, k, v)[0][:, :, :20], attn(q2, k2, v2)[0][:, :, :20], atol=1e-6)


def test_sinkhorn_self_attention_is_causal_and_asks_for_padding():
    torch.manual_seed(0)
    attn = SinkhornSelfAttention(32, 8, 64, heads=4, causal=True, n_local_attn_heads=2).eval()
    x = torch.randn(2, 32, 32)
    edited = x.clone()
    edited[:, 20:] = torch.randn(2, 12, 32)
    assert torch.allclose(attn(x)[:, :20], attn(edited)[:, :20], atol=1e-6)
    with pytest.raises(ValueError, match='multiple of bucket_size 8'):
        attn(torch.randn(2, 30, 32))
    cross = SinkhornSelfAttention(32, 8, heads=4, context_only=True)
    assert cross(x, context=torch.randn(2, 24, 32)).shape == x.shape
