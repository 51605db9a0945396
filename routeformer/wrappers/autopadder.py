"""Autopadder: pads inputs to whatever multiple the wrapped model needs, and strips the output."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..helpers import exists, pad_to_multiple


class Autopadder(nn.Module):
    """Pads the sequence (token ids or embeddings) to a multiple of `net.multiple_of`, on the right
    or, with `pad_left`, on the left; extends (or creates) `input_mask` with False for the padding;
    pads `context`/`context_mask` to `net.context_multiple_of` when the model has one; and cuts the
    padding off the output (the first element when the model returns a tuple)."""

    def __init__(self, net: nn.Module, pad_left: bool = False, pad_value: int = 0):
        super().__init__()
        self.net, self.pad_left, self.pad_value = net, pad_left, pad_value

    @property
    def multiple_of(self) -> int:
        return getattr(self.net, 'multiple_of', 1)

    def __getattr__(self, name):
        # attributes of the wrapped model (max_seq_len, num_tokens, update_kmeans, ...) stay reachable
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == 'net':  # not built yet (copying, unpickling)
                raise
            return getattr(self.net, name)

    def pad(self, x: Tensor, mask: Tensor | None, multiple: int):
        x, pad = pad_to_multiple(x, multiple, dim=1, value=self.pad_value if not x.is_floating_point() else 0.,
                                 left=self.pad_left)
        if pad == 0:
            return x, mask, 0
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[1] - pad, dtype=torch.bool, device=x.device)
        mask, _ = pad_to_multiple(mask.bool(), multiple, dim=1, value=False, left=self.pad_left)
        return x, mask, pad

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, **kwargs):
        n = x.shape[1]
        max_seq_len = getattr(self.net, 'max_seq_len', None)
        if exists(max_seq_len) and n > max_seq_len:
            # checked before padding, so that the error names the length the caller passed
            raise ValueError(f'sequence length {n} is longer than max_seq_len {max_seq_len}: truncate the input or '
                             f'build the model with a larger max_seq_len')
        x, input_mask, pad = self.pad(x, input_mask, self.multiple_of)
        if exists(context):
            context, context_mask, _ = self.pad(context, context_mask, getattr(self.net, 'context_multiple_of', 1))
        out = self.net(x, input_mask=input_mask, context=context, context_mask=context_mask, **kwargs)
        if pad == 0:
            return out

        def strip(t):
            return t[:, pad:] if self.pad_left else t[:, :n]
        return (strip(out[0]), *out[1:]) if isinstance(out, tuple) else strip(out)
