"""AutoregressiveWrapper (loss, cached and uncached generation), Autopadder, Recorder and
EncoderDecoder."""

import pytest
import torch
import torch.nn.functional as F

from routeformer import (Autopadder, AutoregressiveWrapper, Recorder, TransformerEncDec, TransformerLM, top_k,
                         top_p)

NUM_TOKENS, DIM = 40, 32


def lm(seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(num_tokens=NUM_TOKENS, dim=DIM, depth=2, heads=4, dim_head=8, max_seq_len=64, causal=True)
    cfg.update(kwargs)
    return TransformerLM(**cfg)


def prompt(b=2, n=11, seed=1):
    return torch.randint(0, NUM_TOKENS, (b, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- generation

DECODE_CONFIGS = {
    'full': dict(),
    'local_heads': dict(n_local_attn_heads=2, local_attn_window_size=8),
    'all_local_radius2': dict(n_local_attn_heads=4, local_attn_window_size=4, local_attn_radius_blocks=2),
    'shift_shared_qk_memkv_reversible': dict(shift_tokens=True, shared_qk=True, num_mem_kv=2, reversible=True,
                                             n_local_attn_heads=2, local_attn_window_size=8),
    'pkm_moe_absolute': dict(pkm_layers=(1,), pkm_num_keys=16, moe_layers=(2,), pos_emb='absolute'),
    'emb_dim_axial': dict(emb_dim=16, tie_embedding=True, pos_emb='axial', axial_position_shape=(8, 8)),
}


@pytest.mark.parametrize('kwargs', DECODE_CONFIGS.values(), ids=DECODE_CONFIGS.keys())
def test_cached_generation_equals_uncached(kwargs):
    wrapper = AutoregressiveWrapper(lm(**kwargs))
    x = prompt()
    cached = wrapper.generate(x, 30, temperature=0)
    uncached = wrapper.generate(x, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 30)
    assert torch.equal(cached, uncached)


def test_cached_generation_from_a_prompt_shorter_than_the_window():
    wrapper = AutoregressiveWrapper(lm(n_local_attn_heads=4, local_attn_window_size=8, shift_tokens=True))
    x = prompt(n=3)
    assert torch.equal(wrapper.generate(x, 20, temperature=0), wrapper.generate(x, 20, temperature=0, use_cache=False))


def test_cached_step_logits_equal_the_full_forward():
    model = lm(n_local_attn_heads=2, local_attn_window_size=8).eval()
    x = prompt(n=24)
    with torch.no_grad():
        full, _ = model(x)
        cache = {}
        model(x[:, :16], cache=cache)
        steps = [model(x[:, i:i + 1], cache=cache)[0] for i in range(16, 24)]
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 16:], atol=1e-5)


def test_prompt_mask_hides_left_padding():
    wrapper = AutoregressiveWrapper(lm())
    x = prompt()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :4] = False
    shuffled = x.clone()
    shuffled[0, :4] = (shuffled[0, :4] + 7) % NUM_TOKENS  # what hides behind the mask must not matter
    for use_cache in (True, False):
        a = wrapper.generate(x, 12, temperature=0, input_mask=mask, use_cache=use_cache)
        b = wrapper.generate(shuffled, 12, temperature=0, input_mask=mask, use_cache=use_cache)
        assert torch.equal(a, b)
    assert torch.equal(wrapper.generate(x, 12, temperature=0, input_mask=mask),
                       wrapper.generate(x, 12, temperature=0, input_mask=mask, use_cache=False))


def test_generation_stops_at_eos_and_pads_after_it():
    wrapper = AutoregressiveWrapper(lm(), pad_value=0)
    x = prompt()
    free = wrapper.generate(x, 20, temperature=0)
    eos = int(free[0, 3])  # the first sample emits this at step 3
    out = wrapper.generate(x, 20, temperature=0, eos_token=eos)
    first = (out[0] == eos).nonzero()[0].item()
    assert first <= 3 and (out[0, first + 1:] == 0).all()
    for row in out:  # every sample either ends in eos then padding, or has no eos
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0].item() + 1:] == 0).all()


def test_generation_past_max_seq_len_slides_the_window():
    wrapper = AutoregressiveWrapper(lm(max_seq_len=32, n_local_attn_heads=2, local_attn_window_size=8))
    out = wrapper.generate(prompt(n=20), 30, temperature=0)
    assert out.shape == (2, 30)


def test_sampling_filters():
    logits = torch.tensor([[4., 3., 2., 1., 0., -1., -2., -3., -4., -5.]])
    assert torch.isfinite(top_k(logits, thres=0.75)).sum() == 2  # keeps (1 - thres) of the vocabulary
    probs = logits.softmax(-1)
    kept = torch.isfinite(top_p(logits, thres=0.5))
    # the nucleus is the smallest prefix whose mass reaches 1 - thres
    assert kept.sum() == int((probs.cumsum(-1) < 0.5).sum()) + 1
    torch.manual_seed(0)
    wrapper = AutoregressiveWrapper(lm())
    out = wrapper.generate(prompt(), 8, filter_logits_fn=top_p, filter_thres=0.9, temperature=0.7)
    assert out.shape == (2, 8) and out.max() < NUM_TOKENS


# ---------------------------------------------------------------- training loss

def test_loss_is_next_token_cross_entropy_with_ignore_index_and_aux():
    model = lm(moe_layers=(1,)).eval()  # eval: MoE's random second-expert policy draws in training
    wrapper = AutoregressiveWrapper(model, ignore_index=0)
    x = prompt(n=16)
    x[:, -3:] = 0
    logits, aux = model(x[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], ignore_index=0) + aux
    assert aux > 0
    assert torch.allclose(wrapper(x, return_loss=True), expected)


def test_list_input_is_padded_and_random_truncation_trains():
    wrapper = AutoregressiveWrapper(lm(n_local_attn_heads=2, local_attn_window_size=8), pad_value=0, ignore_index=0)
    seqs = [torch.randint(1, NUM_TOKENS, (n,)) for n in (20, 13)]
    loss = wrapper(seqs, return_loss=True)
    loss.backward()
    torch.manual_seed(3)
    truncated = wrapper(prompt(n=40), return_loss=True, randomly_truncate_sequence=True)
    assert torch.isfinite(truncated)


# ---------------------------------------------------------------- Autopadder

@pytest.mark.parametrize('pad_left', [False, True])
def test_autopadder_pads_masks_and_strips(pad_left):
    torch.manual_seed(0)
    model = lm(causal=False, n_local_attn_heads=4, local_attn_window_size=8).eval()
    padded = Autopadder(model, pad_left=pad_left)
    x = prompt(n=13)
    with pytest.raises(ValueError, match='Autopadder'):
        model(x)
    logits, _ = padded(x)
    assert logits.shape == (2, 13, NUM_TOKENS)
    # the padding is masked out: the result equals a hand-padded input with an explicit mask
    pad = 3
    tokens = torch.cat((torch.zeros(2, pad, dtype=torch.long), x), 1) if pad_left else \
        torch.cat((x, torch.zeros(2, pad, dtype=torch.long)), 1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    if pad_left:
        mask[:, :pad] = False
    else:
        mask[:, -pad:] = False
    by_hand, _ = model(tokens, input_mask=mask)
    by_hand = by_hand[:, pad:] if pad_left else by_hand[:, :13]
    assert torch.allclose(logits, by_hand, atol=1e-6)
    assert padded.max_seq_len == model.max_seq_len  # attributes of the model stay reachable


def test_autopadder_extends_a_given_mask_and_pads_context():
    model = lm(causal=False, n_local_attn_heads=4, local_attn_window_size=8, receives_context=True).eval()
    x = prompt(n=13)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, -2:] = False
    context, context_mask = torch.randn(2, 5, DIM), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    logits, _ = Autopadder(model)(x, input_mask=mask, context=context, context_mask=context_mask)
    assert logits.shape == (2, 13, NUM_TOKENS) and torch.isfinite(logits).all()


# ---------------------------------------------------------------- Recorder

def test_recorder_records_weights_and_plans():
    model = Recorder(lm(n_local_attn_heads=2, local_attn_window_size=4).eval())
    x = prompt(n=16)
    with torch.no_grad():
        plain, _ = model.net(x)
        recorded, _ = model(x)
    assert torch.allclose(plain, recorded, atol=1e-5)  # recording does not change the result
    entries = model.recordings[0]
    assert [(e['layer'], e['heads']) for e in entries] == [(0, (0, 2)), (0, (2, 4)), (1, (0, 2)), (1, (2, 4))]
    local, full = entries[0]['attn'], entries[1]['attn']
    assert torch.allclose(local.sum(-1), torch.ones(2, 2, 16))  # rows are distributions
    assert (full.triu(1) == 0).all()  # causal
    # window 4, one window back: position 15 sees 8..15
    assert (local[..., 15, :8] == 0).all() and (local[..., 15, 8:] > 0).all()
    assert entries[0]['plan'].kv_index is not None

    model.turn_off()
    model(x)
    assert len(model.recordings) == 1
    model.turn_on()
    model(x)
    assert len(model.recordings) == 2
    model.clear()
    assert model.recordings == []
    assert isinstance(model.eject(), TransformerLM)


def test_recorder_in_bf16_autocast():
    model = Recorder(lm(pkm_layers=(1,), pkm_num_keys=16, moe_layers=(2,)))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, aux = model(prompt(n=16))
        (logits.float().mean() + aux).backward()
    attn = model.recordings[0][0]['attn']
    assert attn.dtype == torch.float32 and torch.isfinite(attn).all()


# ---------------------------------------------------------------- encoder-decoder

def encdec(**kwargs):
    torch.manual_seed(0)
    return TransformerEncDec(dim=DIM, enc_num_tokens=NUM_TOKENS, enc_depth=1, enc_heads=2, enc_max_seq_len=32,
                             dec_num_tokens=NUM_TOKENS, dec_depth=2, dec_heads=2, dec_max_seq_len=32, **kwargs)


def test_encoder_decoder_uses_the_source_through_cross_attention():
    model = encdec(dec_reversible=True).eval()
    src, tgt = prompt(n=20), prompt(n=12, seed=2)
    with torch.no_grad():
        a, _ = model(src, tgt)
        b, _ = model((src + 1) % NUM_TOKENS, tgt)
    assert (a - b).abs().max() > 1e-4


def test_encoder_decoder_loss_backward_and_generate():
    model = encdec(dec_reversible=True, enc_n_local_attn_heads=2, enc_local_attn_window_size=4)
    src, tgt = prompt(n=19), prompt(n=12, seed=2)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[0, -5:] = False
    loss, aux = model(src, tgt, return_loss=True, enc_input_mask=src_mask, dec_input_mask=torch.ones_like(tgt).bool(),
                      randomly_truncate_sequence=True)
    loss.backward()
    aux.backward()  # the seed README calls both; the aux is already part of the loss
    assert all(p.grad is not None for p in model.encoder.net.transformer.parameters())
    out = model.generate(src, tgt[:, :1], seq_len=8, enc_input_mask=src_mask, temperature=0)
    uncached = model.generate(src, tgt[:, :1], seq_len=8, enc_input_mask=src_mask, temperature=0, use_cache=False)
    assert out.shape == (2, 8) and torch.equal(out, uncached)


def test_encoder_decoder_rejects_unprefixed_kwargs():
    with pytest.raises(TypeError, match='enc_ or dec_'):
        encdec(depth=2)
