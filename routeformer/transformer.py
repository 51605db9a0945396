"""The transformer skeleton shared by every family: residual sublayers, blocks, and a stack run
sequentially or reversibly.

Axes: b batch, n sequence, d model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .context import LayerContext
from .helpers import exists
from .layers.norms import ReZero, make_norm
from .reversible import reversible_stack


def shift_tokens(x: Tensor, shifts: tuple[int, ...], mask: Tensor | None = None) -> Tensor:
    """Split the features into len(shifts) segments and move segment s by shifts[s] positions along
    the sequence (zero fill); features beyond the last whole segment stay put (RWKV token shift)."""
    if exists(mask):
        x = x.masked_fill(~mask[..., None], 0.)
    size = x.shape[-1] // len(shifts)
    segments = list(x.split(size, dim=-1))
    n = x.shape[1]
    for s, amount in enumerate(shifts):
        if amount == 0:
            continue
        seg = segments[s]
        if amount > 0:
            segments[s] = F.pad(seg, (0, 0, amount, 0))[:, :n]
        else:
            segments[s] = F.pad(seg, (0, 0, 0, -amount))[:, -amount:]
    return torch.cat(segments, dim=-1)


class Sublayer(nn.Module):
    """norm -> (token shift) -> fn, or fn scaled by a ReZero gate. Returns (residual branch, aux);
    the caller adds the residual, which is what lets the same sublayer run reversibly."""

    def __init__(self, fn: nn.Module, *, dim: int, norm: str = 'layer', rezero: bool = False,
                 shifts: tuple[int, ...] | None = None):
        super().__init__()
        self.fn = fn
        self.norm = make_norm('none' if rezero else norm, dim)
        self.rezero = ReZero() if rezero else None
        self.shifts = shifts

    @classmethod
    def sharing(cls, fn: nn.Module, other: 'Sublayer') -> 'Sublayer':
        """fn behind `other`'s norm, ReZero gate and token shift (the same parameters)."""
        sub = cls(fn, dim=1, norm='none', shifts=other.shifts)
        sub.norm, sub.rezero = other.norm, other.rezero
        return sub

    def forward(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        x = self.norm(x)
        if self.shifts:
            x = self.shift(x, ctx)
        out, aux = self.fn(x, ctx)
        if exists(self.rezero):
            out = self.rezero(out)
        return out, aux

    def shift(self, x, ctx):
        if not exists(ctx.cache):
            return shift_tokens(x, self.shifts, ctx.mask)
        # cached decoding: the shift needs the (masked) inputs of the last few positions
        if exists(ctx.mask):
            x = x.masked_fill(~ctx.mask[..., None], 0.)
        key = ctx.key(self)
        past = ctx.cache.get(key)
        full = x if past is None else torch.cat((past['x'], x), dim=1)
        ctx.cache[key] = dict(x=full[:, -max(map(abs, self.shifts)):])
        return shift_tokens(full, self.shifts)[:, -x.shape[1]:]


class Block(nn.Module):
    """One layer: mixers (self-attention, then cross-attention if any) and a feed-forward.

    Reversible coupling needs two functions: f (all mixers, applied one after another with their
    residuals, minus the input) and g (the feed-forward)."""

    def __init__(self, mixers: list[Sublayer], ff: Sublayer):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)
        self.ff = ff

    def f(self, x, ctx):
        # a mixer with nothing to contribute here (cross-attention that runs only with a context) is
        # skipped, instead of adding its zeros and taking the difference, two passes over x
        mixers = [m for m in self.mixers if getattr(m, 'contributes', lambda ctx: True)(ctx)]
        if len(mixers) == 1:
            return mixers[0](x, ctx)
        h, aux = x, x.new_zeros(())
        for mixer in mixers:
            out, a = mixer(h, ctx)
            h, aux = h + out, aux + a
        return h - x, aux

    def g(self, x, ctx):
        return self.ff(x, ctx)

    def forward(self, x, ctx):
        out, aux_f = self.f(x, ctx)
        x = x + out
        out, aux_g = self.g(x, ctx)
        return x + out, aux_f + aux_g


class Transformer(nn.Module):
    """A stack of blocks with layer dropout, run sequentially or reversibly.

    Reversible execution (RevNet, as in Reformer) keeps two streams, x1 and x2, both starting at
    the input: y1 = x1 + f(x2), y2 = x2 + g(y1), and the output is their mean. Activations are
    not stored; the backward pass reconstructs them block by block.
    `forward(x, ctx)` returns `(x, aux_loss)`.
    """

    def __init__(self, blocks: list[Block], *, reversible: bool = False, layer_dropout: float = 0.):
        super().__init__()
        # a list may hold the same block several times: weights tied across layers (ALBERT)
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible
        self.layer_dropout = layer_dropout
        # recompute activations in backward; False runs the same reversible coupling with plain
        # autograd, the reference the memory-saving path is tested against
        self.recompute_in_backward = True

    def kept_layers(self, device) -> list[int]:
        depth = len(self.blocks)
        if not self.training or self.layer_dropout == 0.:
            return list(range(depth))
        keep = torch.rand(depth) >= self.layer_dropout
        if not keep.any():  # LayerDrop keeps at least one layer, or no gradient reaches the stack
            keep[torch.randint(depth, ())] = True
        return keep.nonzero().flatten().tolist()

    def forward(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        layers = [(i, self.blocks[i]) for i in self.kept_layers(x.device)]
        if not self.reversible:
            aux = x.new_zeros(())
            for i, block in layers:
                x, a = block(x, ctx.at_layer(i))
                aux = aux + a
            return x, aux

        use_function = self.recompute_in_backward and torch.is_grad_enabled()
        x1, x2, aux = reversible_stack(x, x, layers, ctx, recompute_in_backward=use_function)
        return (x1 + x2) / 2, aux
