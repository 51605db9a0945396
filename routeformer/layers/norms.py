"""Normalisations for the pre-norm residual, and ReZero's learned residual gate."""

from __future__ import annotations

import torch
from torch import nn


class ScaleNorm(nn.Module):
    """'Transformers without Tears': one learned scale times x / ||x||."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(1))
        self.eps = eps

    def forward(self, x):
        norm = x.norm(dim=-1, keepdim=True).clamp(min=self.eps) / self.scale
        return x / norm * self.g


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        norm = x.norm(dim=-1, keepdim=True).clamp(min=self.eps) / self.scale
        return x / norm * self.g


class ReZero(nn.Module):
    """'ReZero is All You Need': no norm, the residual branch is scaled by a gate that starts at 0."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * self.g


NORMS = dict(layer=nn.LayerNorm, scale=ScaleNorm, rms=RMSNorm)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == 'none':
        return nn.Identity()
    if kind not in NORMS:
        raise ValueError(f'unknown norm {kind!r}; choose one of none, {", ".join(NORMS)}')
    return NORMS[kind](dim)
