from __future__ import annotations

import torch

from ..attention.plan import RoutePlan
from .base import Router


class FullRouter(Router):
    """The whole sequence as one group: ordinary dense attention."""

    def route(self, inp):
        return RoutePlan(q_index=None, kv_index=None)

    def decode_step(self, step, cache):
        pos = step.offset
        return RoutePlan(q_index=None, kv_index=torch.arange(pos + 1, device=step.q.device).view(1, 1, 1, -1),
                         q_offset=pos)
