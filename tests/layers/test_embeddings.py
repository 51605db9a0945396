import math

import pytest
import torch

from routeformer.layers import embeddings
from routeformer.layers.embeddings import (
    AbsolutePositionalEmbedding,
    AxialPositionalEmbedding,
    FixedPositionalEmbedding,
    RotaryEmbedding,
    apply_rotary,
)


def test_absolute_takes_absolute_positions_and_rejects_overflow():
    emb = AbsolutePositionalEmbedding(8, max_seq_len=16)
    assert emb.max_seq_len == 16
    pos = torch.arange(5, 9)   # a decoding step starting at offset 5
    assert torch.equal(emb(pos), emb.emb.weight[5:9])
    with pytest.raises(ValueError, match='16'):
        emb(torch.arange(10, 17))


def test_fixed_matches_closed_form():
    dim, max_len = 6, 20
    emb = FixedPositionalEmbedding(dim, max_seq_len=max_len)
    assert emb.max_seq_len == max_len
    assert 'table' not in emb.state_dict()
    pos = torch.tensor([0, 3, 19])
    out = emb(pos)
    for row, p in enumerate(pos.tolist()):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            assert out[row, i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert out[row, dim // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-5)
    with pytest.raises(ValueError, match='20'):
        emb(torch.tensor([20]))


def test_axial_summed_decomposes_position():
    emb = AxialPositionalEmbedding(8, axial_shape=(4, 5))
    assert emb.max_seq_len == 20
    out = emb(torch.arange(20))
    assert out.shape == (20, 8)
    # position 13 = row 2, column 3 of the (4, 5) grid
    assert torch.allclose(out[13], emb.embs[0][2] + emb.embs[1][3])


def test_axial_concatenated_shapes_and_errors():
    emb = AxialPositionalEmbedding(8, axial_shape=(4, 5), axial_dims=(3, 5))
    out = emb(torch.arange(7, 12))
    assert out.shape == (5, 8)
    assert torch.equal(out[0], torch.cat((emb.embs[0][1], emb.embs[1][2])))
    assert [p.shape for p in emb.embs] == [(4, 3), (5, 5)]
    with pytest.raises(ValueError, match='20'):
        emb(torch.tensor([20]))
    with pytest.raises(ValueError, match='add up'):
        AxialPositionalEmbedding(8, axial_shape=(4, 5), axial_dims=(3, 4))


def test_rotary_dot_product_depends_only_on_offset():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(16)
    freqs = rotary(torch.arange(64))
    assert freqs.shape == (64, 16) and freqs.dtype == torch.float32
    q, k = torch.randn(2, 16)

    def score(i, j):
        return (apply_rotary(q[None], freqs[i:i + 1]) * apply_rotary(k[None], freqs[j:j + 1])).sum()

    assert torch.allclose(score(3, 1), score(40, 38), atol=1e-4)
    assert torch.allclose(score(10, 25), score(30, 45), atol=1e-4)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)
    # position 0 is the identity rotation
    assert torch.allclose(apply_rotary(q[None], freqs[:1]), q[None])


def test_apply_rotary_partial_keeps_tail_and_dtype():
    rotary = RotaryEmbedding(8)
    t = torch.randn(2, 3, 10, 12, dtype=torch.bfloat16)
    out = apply_rotary(t, rotary(torch.arange(10)))
    assert out.dtype == torch.bfloat16 and out.shape == t.shape
    assert torch.equal(out[..., 8:], t[..., 8:])
    assert not torch.equal(out[..., 1:, :8], t[..., 1:, :8])
    # a rotation keeps the norm of each rotated pair's vector
    assert torch.allclose(out[..., :8].float().norm(dim=-1), t[..., :8].float().norm(dim=-1), rtol=2e-2)
    with pytest.raises(ValueError, match='dim <= 12'):
        apply_rotary(t, RotaryEmbedding(16)(torch.arange(10)))


def rotate_half_reference(t, freqs):
    """RoFormer's rotate_half formula, written out: t * cos + rotate_half(t) * sin."""
    r = freqs.shape[-1]
    rotated, passed = t[..., :r], t[..., r:]
    first, second = rotated[..., :r // 2], rotated[..., r // 2:]
    turned = rotated * freqs.cos() + torch.cat((-second, first), dim=-1) * freqs.sin()
    return torch.cat((turned, passed), dim=-1)


@pytest.mark.parametrize('rot_dim', [16, 8])
@pytest.mark.parametrize('per_sample', [False, True])
def test_apply_rotary_in_steps_equals_rotate_half_formula(rot_dim, per_sample, monkeypatch):
    monkeypatch.setattr(embeddings, 'ROTARY_STEP', 3)  # several steps, the last one short
    torch.manual_seed(0)
    t = torch.randn(2, 10, 3, 16, dtype=torch.float64).transpose(1, 2).requires_grad_()  # a strided view
    freqs = RotaryEmbedding(rot_dim)(torch.arange(10)).double()
    if per_sample:  # (b, 1, n, r) angles, as CoLT5's routed queries have
        freqs = torch.stack((freqs, freqs.flip(0)))[:, None]
    out = apply_rotary(t, freqs)
    assert out.stride() == t.stride()  # written in the input's memory layout: no copy to undo later
    assert torch.allclose(out, rotate_half_reference(t, freqs), atol=1e-6)
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, freqs), (t,))
    # half precision is rotated in float32 and rounded once
    low = apply_rotary(t.detach().bfloat16(), freqs)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.double(), rotate_half_reference(t.detach().bfloat16().double(), freqs), atol=2e-2)
