"""Recorder: keeps, for each forward pass, every attention call's group weights and routing plan."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention.recording import AttentionRecord, as_slice


class Recorder(nn.Module):
    """`recordings[k]` is a list with one AttentionRecord per attention call of the k-th recorded
    forward: `layer`, `heads` (first, last + 1), `cross`, `plan` (the router's RoutePlan) and
    `weights` (each group's softmax weights and merge shares), on the CPU, at the size of the groups:
    O(n x group size) per layer. Dense (b, h, n, m) weights are built on request, for some heads and
    queries: `record.dense(heads, queries)`, `record['attn']` (all of them) or `dense_attention`
    (every call of a layer). Recording runs attention through the reference backend, which returns
    the weights."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.on = True
        self.recordings: list[list[AttentionRecord]] = []

    def turn_on(self):
        self.on = True

    def turn_off(self):
        self.on = False

    def clear(self):
        self.recordings.clear()

    def eject(self) -> nn.Module:
        net = self.net
        self.clear()
        return net

    def dense_attention(self, k: int, layer: int, heads=None, queries=None, *, cross: bool = False) -> Tensor:
        """The dense (b, h', n', m) weights of layer `layer` in the k-th recorded forward, its heads
        `heads` (the layer's head numbers: int, slice or None = all) joined across the calls that
        attend them (local and routed heads), for the query positions `queries` (int, slice or None);
        `cross` picks the cross-attention of the layer."""
        if not -len(self.recordings) <= k < len(self.recordings):
            raise ValueError(f'recording {k} does not exist: {len(self.recordings)} forward passes were recorded')
        records = sorted((r for r in self.recordings[k] if r.layer == layer and r.cross == cross),
                         key=lambda r: r.heads)
        if not records:
            raise ValueError(f'recording {k} has no {"cross-" if cross else "self-"}attention of layer {layer}')
        chosen = range(records[-1].heads[1])[as_slice(heads, records[-1].heads[1], 'heads')]
        if chosen.step != 1:
            raise ValueError(f'heads must be consecutive (a slice with step 1), got {heads}')
        parts = []
        for record in records:
            start, end = max(chosen.start, record.heads[0]), min(chosen.stop, record.heads[1])
            if start < end:
                first = record.heads[0]
                parts.append(record.dense(heads=slice(start - first, end - first), queries=queries))
        if not parts:
            raise ValueError(f'heads {heads} select none of the {records[-1].heads[1]} heads of layer {layer}')
        return torch.cat(parts, dim=1)

    def forward(self, *args, **kwargs):
        if not self.on:
            return self.net(*args, **kwargs)
        recordings = []
        out = self.net(*args, recordings=recordings, **kwargs)
        self.recordings.append(recordings)
        return out
