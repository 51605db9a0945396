"""Position-wise feed-forward: GELU or GLU, optionally run in chunks along the sequence."""

from __future__ import annotations

import torch
from torch import nn

from ..helpers import default


# rows (batch x positions) of the smallest chunk: a (1024, hidden) activation is a few MiB, so smaller
# chunks save no memory worth having, and their matrix products only run slower (at 16k tokens, the
# Reformer's ff_chunks=100 would make chunks of 164 rows)
MIN_CHUNK_ROWS = 1024


class FeedForward(nn.Module):
    """`chunks`: the sequence goes through in at most this many chunks, none under MIN_CHUNK_ROWS rows."""

    def __init__(self, dim: int, *, mult: float = 4, dropout: float = 0., activation: type[nn.Module] | None = None,
                 glu: bool = False, chunks: int = 1):
        super().__init__()
        hidden = int(dim * mult)
        self.glu = glu
        self.chunks = chunks
        self.proj_in = nn.Linear(dim, hidden * (2 if glu else 1))
        self.act = default(activation, nn.GELU)()
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(hidden, dim)

    def ff(self, x):
        if self.glu:
            x, gate = self.proj_in(x).chunk(2, dim=-1)
            x = self.act(x) * gate
        else:
            x = self.act(self.proj_in(x))
        return self.proj_out(self.dropout(x))

    def forward(self, x, ctx=None):
        # chunking bounds the (n, hidden) activation to n / chunks rows at a time (Reformer);
        # it saves memory where activations are not kept, i.e. in reversible or no-grad runs
        chunks = min(self.chunks, x.shape[0] * x.shape[1] // MIN_CHUNK_ROWS)
        if chunks > 1:
            out = torch.cat([self.ff(c) for c in x.chunk(chunks, dim=1)], dim=1)
        else:
            out = self.ff(x)
        return out, x.new_zeros(())
