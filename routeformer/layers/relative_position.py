"""Relative position attention bounded by a maximum distance (Shaw et al. 2018), as the original
Routing Transformer uses it (`max_relative_position`).

Each clipped distance key_pos - query_pos in [-M, M] has a learned vector a (shared by the heads);
the logit of a (query, key) pair gains q . a[distance], scaled like q . k. It is computed from the
original positions of the gathered slots, so it works for any router: local windows, clusters,
one decoded token against a cache.

Axes: b batch, h heads, g groups, i queries per group, j keys per group, d head dim,
r relative distances (2M + 1).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class RelativePositionLogits(nn.Module):
    def __init__(self, dim_head: int, *, max_relative_position: int):
        super().__init__()
        if max_relative_position < 1:
            raise ValueError(f'max_relative_position must be a positive integer, got {max_relative_position}')
        self.max_distance = max_relative_position
        self.scale = dim_head ** -0.5
        self.table = nn.Parameter(torch.randn(2 * max_relative_position + 1, dim_head) * dim_head ** -0.5)

    def forward(self, q: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        """q (b, h, g, i, d), q_pos (b|1, h|1, g, i), kv_pos (b|1, h|1, g, j) -> logits (b, h, g, i, j)."""
        m = self.max_distance
        distance = rearrange(kv_pos, '... j -> ... 1 j') - rearrange(q_pos, '... i -> ... i 1')
        index = distance.clamp(-m, m) + m
        # q against every distance once (r of them), then each pair picks its own
        per_distance = torch.einsum('b h g i d, r d -> b h g i r', q, self.table.to(q.dtype)) * self.scale
        b, h, g, i, _ = per_distance.shape
        return per_distance.gather(-1, index.expand(b, h, g, i, index.shape[-1]))

    def extra_repr(self):
        return f'max_relative_position={self.max_distance}'
