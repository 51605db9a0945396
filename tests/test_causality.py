"""One causality test for every causal configuration in the package (tests/probes.py): change the
token at position p, and no output before p may change (eval mode, so random routing is fixed)."""

import pytest

from probes import CAUSAL_CONFIGS, NUM_TOKENS, SEQ, assert_causal, tokens, transformer_lm


@pytest.mark.parametrize('factory', [c[1] for c in CAUSAL_CONFIGS], ids=[c[0] for c in CAUSAL_CONFIGS])
def test_causal(factory):
    model, context = factory()
    vocab = getattr(model, 'num_tokens', NUM_TOKENS)
    n = getattr(model, 'max_seq_len', SEQ)
    assert_causal(model, x=tokens(n=n, vocab=vocab), context=context, vocab=vocab)


def test_non_causal_model_is_not_causal():
    # the check above can fail: a bidirectional model's earlier outputs do move
    model, _ = transformer_lm(causal=False)()
    with pytest.raises(AssertionError, match='leaks'):
        assert_causal(model, x=tokens())
