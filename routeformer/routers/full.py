from __future__ import annotations

import torch

from ..attention.plan import RoutePlan
from .base import Router


class FullRouter(Router):
    """The whole sequence as one group: ordinary dense attention."""

    def forward(self, q, k, *, causal, mask=None, cached=None):
        return RoutePlan(q_index=None, kv_index=None)

    def decode(self, pos, *, q, k, state):
        return RoutePlan(q_index=None, kv_index=torch.arange(pos + 1, device=q.device).view(1, 1, 1, -1), q_offset=pos)
