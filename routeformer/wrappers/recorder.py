"""Recorder: keeps, for each forward pass, every attention layer's weights and routing plan."""

from __future__ import annotations

from torch import nn


class Recorder(nn.Module):
    """`recordings[k]` is a list with one entry per attention call of the k-th recorded forward:
    a dict with `layer`, `heads` (first, last + 1), `cross`, `attn` (dense (b, h, n, m) float32
    weights on the CPU, memory key/values excluded) and `plan` (the router's RoutePlan on the CPU).
    Recording runs attention through the reference backend, which returns the weights."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.on = True
        self.recordings: list[list[dict]] = []

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

    def forward(self, *args, **kwargs):
        if not self.on:
            return self.net(*args, **kwargs)
        recordings = []
        out = self.net(*args, recordings=recordings, **kwargs)
        self.recordings.append(recordings)
        return out
