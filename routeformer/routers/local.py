"""Local attention as a router: contiguous query windows, each attending to its own window and
`look_backward` windows before it (and `look_forward` after it when not causal).

Axes: g windows, i queries per window, j keys per window.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..attention.plan import RoutePlan, SlidingWindow
from .base import Router


class LocalRouter(Router):
    def __init__(self, window_size: int, *, look_backward: int = 1, look_forward: int | None = None,
                 memory_flange: int | None = None):
        super().__init__()
        if window_size < 1:
            raise ValueError(f'window_size must be a positive integer, got {window_size}')
        self.window_size = self.multiple_of = window_size
        # spans in tokens; `look_*` count windows, `memory_flange` counts tokens (original Routing Transformer)
        self.back = memory_flange if memory_flange is not None else look_backward * window_size
        self.forward_span = None if look_forward is None else look_forward * window_size
        if memory_flange is not None and look_forward is None:
            self.forward_span = memory_flange

    @classmethod
    def from_query_shape(cls, query_shape: int, memory_flange: int) -> 'LocalRouter':
        """The original paper's parametrization: blocks of `query_shape` queries see `memory_flange`
        tokens before the block (and after it when not causal)."""
        return cls(query_shape, memory_flange=memory_flange)

    def span(self, causal: bool) -> tuple[int, int]:
        fwd = 0 if causal else (self.back if self.forward_span is None else self.forward_span)
        return self.back, fwd

    def route(self, inp):
        q, k = inp.q, inp.k
        n, w = q.shape[-2], self.window_size
        self.check_length(n)
        back, fwd = self.span(inp.causal)
        g = n // w
        starts = torch.arange(g, device=q.device) * w - back
        kv_index = rearrange(starts, 'g -> g 1') + torch.arange(back + w + fwd, device=q.device)
        kv_index = kv_index.masked_fill((kv_index < 0) | (kv_index >= k.shape[-2]), -1)
        q_index = torch.arange(n, device=q.device).view(1, 1, g, w)
        return RoutePlan(q_index=q_index, kv_index=kv_index.view(1, 1, g, -1),
                         layout=SlidingWindow(window=w, back=back, forward=fwd))

    def decode_step(self, step, cache):
        pos = step.offset
        start = max(0, (pos // self.window_size) * self.window_size - self.back)
        kv_index = torch.arange(start, pos + 1, device=step.q.device).view(1, 1, 1, -1)
        return RoutePlan(q_index=None, kv_index=kv_index, q_offset=pos)

    def extra_repr(self):
        return f'window_size={self.window_size}, back={self.back}, forward={self.forward_span}'
