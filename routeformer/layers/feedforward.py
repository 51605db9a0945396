"""Position-wise feed-forward: GELU or GLU, optionally run in chunks along the sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..helpers import default


class _ActivationThenLinear(torch.autograd.Function):
    """linear(act(h)) that keeps only h for the backward pass and recomputes act(h) there: the
    (n, hidden) activation is the largest tensor a layer saves, and an elementwise activation
    costs next to nothing to recompute (unlike the matrix product torch.utils.checkpoint would
    redo). Under autocast it computes in the autocast dtype, as nn.Linear would."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, act: nn.Module) -> Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            h = h.to(dtype)
            w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
            out = F.linear(act(h), w, b)
        ctx.save_for_backward(h, w)
        ctx.act, ctx.has_bias, ctx.weight_dtype = act, bias is not None, weight.dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        h, w = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False), torch.enable_grad():
            h = h.detach().requires_grad_()
            a = ctx.act(h)
        dout = dout.to(w.dtype)
        flat_dout, flat_a = dout.reshape(-1, dout.shape[-1]), a.detach().reshape(-1, a.shape[-1])
        dweight = (flat_dout.t() @ flat_a).to(ctx.weight_dtype)
        dbias = flat_dout.sum(dim=0).to(ctx.weight_dtype) if ctx.has_bias else None
        dh, = torch.autograd.grad(a, h, dout @ w)
        return dh, dweight, dbias, None


class FeedForward(nn.Module):
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
        elif torch.is_grad_enabled() and not (self.training and self.dropout.p > 0):
            return _ActivationThenLinear.apply(self.proj_in(x), self.proj_out.weight, self.proj_out.bias, self.act)
        else:
            x = self.act(self.proj_in(x))
        return self.proj_out(self.dropout(x))

    def forward(self, x, ctx=None):
        # chunking bounds the (n, hidden) activation to n / chunks rows at a time (Reformer);
        # it saves memory where activations are not kept, i.e. in reversible or no-grad runs
        if self.chunks > 1 and x.shape[1] > 1:
            out = torch.cat([self.ff(c) for c in x.chunk(self.chunks, dim=1)], dim=1)
        else:
            out = self.ff(x)
        return out, x.new_zeros(())
