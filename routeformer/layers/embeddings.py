"""Positional embeddings: learned, sinusoidal, axial and rotary.

Every embedding takes absolute positions rather than a length, so cached decoding can ask for
positions `offset .. offset + n - 1` directly.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from routeformer.helpers import check_values, compiling, divisible_by, exists

# n sequence (positions asked for), d feature, r rotary features


def _check_positions(pos: Tensor, max_seq_len: int, owner: str) -> None:
    ok = ((pos >= 0) & (pos < max_seq_len)).all()
    if pos.numel() == 0 or not check_values(ok, f'{owner}: positions must be in [0, {max_seq_len})') or ok:
        return
    low, high = int(pos.min()), int(pos.max())
    if low < 0:
        raise ValueError(f'{owner}: positions must be >= 0, got {low}')
    if high >= max_seq_len:
        raise ValueError(
            f'{owner}: position {high} is beyond the max length {max_seq_len} '
            f'(positions must be < {max_seq_len}); build the embedding with a larger max_seq_len'
        )


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positional embedding: `forward(pos[n]) -> [n, dim]`."""

    def __init__(self, dim: int, *, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, pos: Tensor) -> Tensor:
        _check_positions(pos, self.max_seq_len, type(self).__name__)
        return self.emb(pos)


class FixedPositionalEmbedding(nn.Module):
    """Sinusoidal embedding (Vaswani et al.), laid out as [sin | cos]: `forward(pos[n]) -> [n, dim]`."""

    def __init__(self, dim: int, *, max_seq_len: int, base: float = 10000.):
        super().__init__()
        if not divisible_by(dim, 2):
            raise ValueError(f'FixedPositionalEmbedding needs an even dim (sin and cos halves), got {dim}')
        self.max_seq_len = max_seq_len
        inv_freq = 1. / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        angles = rearrange(torch.arange(max_seq_len, dtype=torch.float32), 'n -> n 1') * inv_freq
        # non-persistent: it is a function of the constructor args, so checkpoints need not carry it
        self.register_buffer('table', torch.cat((angles.sin(), angles.cos()), dim=-1), persistent=False)

    def forward(self, pos: Tensor) -> Tensor:
        _check_positions(pos, self.max_seq_len, type(self).__name__)
        return self.table[pos]


class AxialPositionalEmbedding(nn.Module):
    """Factorised learned embedding over a grid of positions (Reformer).

    Position p is unravelled row-major into one index per axis; the per-axis embeddings are summed
    (`axial_dims=None`, each axis has `dim` features) or concatenated (`axial_dims` adds up to `dim`).
    """

    def __init__(self, dim: int, *, axial_shape: tuple, axial_dims: tuple | None = None):
        super().__init__()
        axial_shape = tuple(axial_shape)
        if len(axial_shape) == 0 or any(s < 1 for s in axial_shape):
            raise ValueError(f'axial_shape must be a non-empty tuple of positive sizes, got {axial_shape}')

        self.summed = not exists(axial_dims)
        axial_dims = (dim,) * len(axial_shape) if self.summed else tuple(axial_dims)
        if len(axial_dims) != len(axial_shape):
            raise ValueError(
                f'axial_dims {axial_dims} must have one entry per axis of axial_shape {axial_shape}'
            )
        if not self.summed and sum(axial_dims) != dim:
            raise ValueError(f'axial_dims {axial_dims} must add up to dim={dim} (they are concatenated)')

        self.axial_shape = axial_shape
        self.max_seq_len = math.prod(axial_shape)
        self.embs = nn.ParameterList([
            nn.Parameter(torch.randn(size, axis_dim) * 0.02) for size, axis_dim in zip(axial_shape, axial_dims)
        ])
        # row-major strides: the last axis varies fastest, so consecutive positions share the leading indices
        strides = [math.prod(axial_shape[i + 1:]) for i in range(len(axial_shape))]
        self.strides = tuple(strides)

    def forward(self, pos: Tensor) -> Tensor:
        _check_positions(pos, self.max_seq_len, type(self).__name__)
        per_axis = [
            emb[torch.div(pos, stride, rounding_mode='floor') % size]
            for emb, stride, size in zip(self.embs, self.strides, self.axial_shape)
        ]
        if self.summed:
            return torch.stack(per_axis).sum(dim=0)
        return torch.cat(per_axis, dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position angles (RoFormer), "rotate_half" layout: `forward(pos[n]) -> [n, dim]` float32."""

    def __init__(self, dim: int, *, base: float = 10000.):
        super().__init__()
        if not divisible_by(dim, 2):
            raise ValueError(f'RotaryEmbedding needs an even dim (features rotate in pairs), got {dim}')
        inv_freq = 1. / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer('inv_freq', inv_freq, persistent=False)

    def forward(self, pos: Tensor) -> Tensor:
        # an elementwise product, not a matmul, so autocast cannot drop the angles to bf16
        angles = rearrange(pos.to(torch.float32), 'n -> n 1') * self.inv_freq.to(torch.float32)
        return torch.cat((angles, angles), dim=-1)


# positions rotated per step: the few intermediate passes of a step stay in cache, so a long
# sequence is read and written once
ROTARY_STEP = 1024


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t (..., n, d) with its first 2 * r features rotated in pairs (f, f + r) by the angles whose
    cosines and sines are cos / sin (..., n|1, r), broadcast over t's leading axes; a copy in
    t's memory layout, written in steps of ROTARY_STEP positions."""
    half = cos.shape[-1]
    out = torch.empty_like(t)
    n = t.shape[-2]
    for start in range(0, n, ROTARY_STEP):
        rows = slice(start, start + ROTARY_STEP)
        first, second = t[..., rows, :half], t[..., rows, half:2 * half]
        c, s = (f if f.shape[-2] == 1 else f[..., rows, :] for f in (cos, sin))
        out_first, out_second = out[..., rows, :half], out[..., rows, half:2 * half]
        torch.mul(first, c, out=out_first).addcmul_(second, s, value=-1.)
        torch.mul(second, c, out=out_second).addcmul_(first, s)
        out[..., rows, 2 * half:] = t[..., rows, 2 * half:]
    return out


def _rotate_plain(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rotary`'s rotation in plain operations (for torch.compile), in float32 where t is
    of half precision."""
    half = cos.shape[-1]
    first, second, rest = t[..., :half], t[..., half:2 * half], t[..., 2 * half:]
    precise = torch.promote_types(t.dtype, torch.float32)
    first, second = first.to(precise), second.to(precise)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(t.dtype)
    return torch.cat((rotated, rest), dim=-1)


class _Rotary(torch.autograd.Function):
    """Rotation by given angles; its gradient is the rotation by the opposite angles, so only the
    (n, r) cosines and sines are kept for the backward pass."""

    @staticmethod
    def forward(fctx, t, cos, sin):
        fctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin)

    @staticmethod
    def backward(fctx, grad):
        cos, sin = fctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rotary(t: Tensor, freqs: Tensor) -> Tensor:
    """Rotates the first r = freqs.shape[-1] features of t[..., n, d] by the angles freqs[..., n, r]
    in the "rotate_half" layout of `RotaryEmbedding` (feature f and f + r / 2 turn together by the
    angle freqs[..., f], which both halves of freqs hold)."""
    rot_dim = freqs.shape[-1]
    if rot_dim > t.shape[-1]:
        raise ValueError(
            f'apply_rotary: freqs have {rot_dim} features but t has only {t.shape[-1]}; '
            f'build RotaryEmbedding with dim <= {t.shape[-1]}'
        )
    # float32 because bf16 angles at large positions lose most of their precision
    angles = freqs[..., :rot_dim // 2].to(torch.float32)
    cos, sin = angles.cos(), angles.sin()
    if compiling():
        return _rotate_plain(t, cos, sin)
    if t.dtype in (torch.float32, torch.float64):
        return _Rotary.apply(t, cos.to(t.dtype), sin.to(t.dtype))
    # half precision: rotated in float32 and rounded once
    rotated = _Rotary.apply(t[..., :rot_dim].to(torch.float32), cos, sin).to(t.dtype)
    return torch.cat((rotated, t[..., rot_dim:]), dim=-1)
