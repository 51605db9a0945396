"""Token model: embeddings -> Transformer -> norm -> logits (x-transformers' TransformerWrapper).

Axes: b batch, n sequence, m context length, d model dim, e embedding dim, v vocabulary.
"""

from __future__ import annotations

from math import lcm

import torch
from torch import Tensor, nn

from .context import LayerContext
from .helpers import as_loss, check_positive, check_values, default, exists, single_output
from .layers.moe import MoE
from .transformer import Transformer


def check_batch(shape: tuple, what: str) -> None:
    """A batch of no sequences, or of sequences without a token, has nothing to attend over."""
    if shape[0] == 0:
        raise ValueError(f'{what} has batch size 0: give at least one sequence')
    if shape[1] == 0:
        raise ValueError(f'{what} has length 0: give at least one token per sequence')


def check_mask(mask: Tensor | None, shape: tuple, name: str, like: str) -> Tensor | None:
    """A padding mask: bool (or 0/1 integers), True = real token. A float mask is refused: an
    additive one (0 = keep, -inf = drop) would be read the other way round."""
    if mask is None:
        return None
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f'{name} has dtype {mask.dtype} but must be bool (True = real token, False = padding): '
                         f'for an additive mask (0 = keep, -inf = drop) pass `{name} == 0`, for a 0/1 mask '
                         f'`{name}.bool()`')
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f'{name} has shape {tuple(mask.shape)} but must be {tuple(shape)}, the shape of {like} '
                         f'(True = real token)')
    return mask.bool()


def trunk_context(x: Tensor, *, dim: int, max_seq_len: int | None, input_mask: Tensor | None,
                  context: Tensor | None, context_mask: Tensor | None) -> LayerContext:
    """The checked inputs of a trunk that maps features (b, n, dim) to features: the padding mask
    of x, and an optional context (b, m, dim_context) with its own mask."""
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f'expected features of shape (batch, seq_len, dim={dim}), got {tuple(x.shape)}')
    check_batch(x.shape, 'the input')
    b, n, _ = x.shape
    if exists(max_seq_len) and n > max_seq_len:
        raise ValueError(f'sequence length {n} is longer than max_seq_len {max_seq_len}: truncate the '
                         f'input or build the model with a larger max_seq_len')
    input_mask = check_mask(input_mask, (b, n), 'input_mask', 'the input (batch, seq_len)')
    if exists(context):
        context_mask = check_mask(context_mask, context.shape[:2], 'context_mask', 'the context (batch, context_len)')
    elif exists(context_mask):
        raise ValueError('context_mask was given without a context')
    return LayerContext(mask=input_mask, context=context, context_mask=context_mask)


def reject_aux_layers(transformer: nn.Module, owner: str) -> None:
    """Models that return a bare tensor (the Reformer and Sinkhorn seed APIs) cannot carry an aux loss."""
    if any(isinstance(m, MoE) for m in transformer.modules()):
        raise ValueError(f'{owner} returns its output without an aux loss, so the mixture of experts\' '
                         f'load-balancing loss would be lost: drop moe_layers, or use TransformerLM')


class LM(nn.Module):
    """Composes token embedding (factorised when `emb_dim` differs from `dim`), an optional absolute
    positional embedding, a Transformer, a final norm and the logits (tied to the embedding when
    `tie_embedding`). `forward` returns `(logits, aux_loss)`: the final hidden states instead of the
    logits with `return_embeddings`, the bare tensor without the aux loss with `return_aux=False`
    (seed APIs whose models return one tensor). A model built with `return_embeddings=True` has no
    logits head (as in the seeds). `norm_after_project_out` puts the final norm after the
    factorised embedding's projection back to `emb_dim` (Routing Transformer) instead of before;
    `pos_emb_before_project_in` adds the positional embedding (then `emb_dim` wide) before the
    projection up to `dim` (Reformer, Sinkhorn) instead of after."""

    def __init__(self, *, num_tokens: int, dim: int, max_seq_len: int, transformer: Transformer,
                 emb_dim: int | None = None, pos_emb: nn.Module | None = None, emb_dropout: float = 0.,
                 tie_embedding: bool = False, return_embeddings: bool = False, final_norm: nn.Module | None = None,
                 causal: bool = False, return_aux: bool = True, norm_after_project_out: bool = False,
                 pos_emb_before_project_in: bool = False):
        super().__init__()
        check_positive(num_tokens=num_tokens, max_seq_len=max_seq_len)
        emb_dim = default(emb_dim, dim)
        self.num_tokens, self.dim, self.max_seq_len, self.causal = num_tokens, dim, max_seq_len, causal
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = pos_emb
        self.pos_emb_first = pos_emb_before_project_in
        self.emb_dropout = nn.Dropout(emb_dropout)
        # ALBERT factorisation: a small embedding projected up to the model width and back
        self.project_in = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.transformer = transformer
        self.has_head = not return_embeddings
        self.norm_last = norm_after_project_out and emb_dim != dim and self.has_head
        self.norm = default(final_norm, nn.LayerNorm(emb_dim if self.norm_last else dim))
        self.project_out = nn.Linear(dim, emb_dim) if emb_dim != dim and self.has_head else nn.Identity()
        self.to_logits = nn.Linear(emb_dim, num_tokens) if self.has_head and not tie_embedding else None
        self.return_embeddings = return_embeddings
        # seed APIs whose models return a bare tensor (Reformer, Sinkhorn) have no aux loss to lose
        self.return_aux = return_aux
        if not return_aux:
            reject_aux_layers(transformer, type(self).__name__)

    @property
    def multiple_of(self) -> int:
        """Sequence lengths must be multiples of this (what Autopadder pads to)."""
        routers = [r for m in self.modules() if hasattr(m, 'routers') and not m.cross_attend for r in m.routers]
        return lcm(1, *(r.multiple_of for r in routers))

    def check_shape(self, x: Tensor) -> None:
        if x.ndim != 2 or x.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise ValueError(f'expected token ids of shape (batch, seq_len) and an integer dtype, got shape '
                             f'{tuple(x.shape)} and dtype {x.dtype}')
        check_batch(x.shape, 'the input')

    def check_input(self, x: Tensor, offset: int):
        self.check_shape(x)
        in_range = ((x >= 0) & (x < self.num_tokens)).all()
        if check_values(in_range, f'token ids must be in [0, {self.num_tokens}) (num_tokens={self.num_tokens})') \
                and not in_range:
            bad = int(x.max()) if int(x.max()) >= self.num_tokens else int(x.min())
            raise ValueError(f'token id {bad} is out of range: ids must be in [0, {self.num_tokens}) '
                             f'(num_tokens={self.num_tokens})')
        if offset + x.shape[1] > self.max_seq_len:
            raise ValueError(f'sequence length {offset + x.shape[1]} is longer than max_seq_len {self.max_seq_len}: '
                             f'truncate the input or build the model with a larger max_seq_len')

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, *, cache: dict | None = None,
                recordings: list | None = None, return_embeddings: bool | None = None):
        offset = cache.get('offset', 0) if exists(cache) else 0
        self.check_input(x, offset)
        b, n = x.shape
        if exists(cache) and exists(input_mask) and input_mask.shape[1] == offset + n:
            input_mask = input_mask[:, offset:]  # the mask of the whole sequence so far: cached positions keep theirs
        input_mask = check_mask(input_mask, (b, n), 'input_mask', 'the input')
        if exists(context):
            if context.ndim != 3 or context.shape[0] != b:
                raise ValueError(f'context must have shape (batch={b}, context_len, dim), got {tuple(context.shape)}')
            context_mask = check_mask(context_mask, context.shape[:2], 'context_mask', 'the context (batch, context_len)')
        elif exists(context_mask):
            raise ValueError('context_mask was given without a context')

        h = self.token_emb(x)
        if exists(self.pos_emb) and self.pos_emb_first:
            h = h + self.pos_emb(torch.arange(offset, offset + n, device=x.device)).to(h.dtype)
        h = self.project_in(h)
        if exists(self.pos_emb) and not self.pos_emb_first:
            h = h + self.pos_emb(torch.arange(offset, offset + n, device=x.device)).to(h.dtype)
        h = self.emb_dropout(h)

        ctx = LayerContext(mask=input_mask, context=context, context_mask=context_mask, offset=offset,
                           cache=cache, recordings=recordings)
        h, aux = self.transformer(h, ctx)
        if exists(cache):
            cache['offset'] = offset + n

        aux = as_loss(aux)
        h = self.norm(self.project_out(h)) if self.norm_last else self.norm(h)
        if not default(return_embeddings, self.return_embeddings):
            if not self.has_head:
                raise ValueError('this model was built with return_embeddings=True and has no logits head: build it '
                                 'with return_embeddings=False to get logits')
            if not self.norm_last:
                h = self.project_out(h)
            h = h @ self.token_emb.weight.t() if self.to_logits is None else self.to_logits(h)
        return (h, aux) if self.return_aux else single_output(h, type(self).__name__)
