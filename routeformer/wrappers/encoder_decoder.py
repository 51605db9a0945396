"""Encoder-decoder: an encoder LM's final hidden states feed the decoder's cross-attention."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..helpers import as_loss, exists
from .autopadder import Autopadder
from .autoregressive import AutoregressiveWrapper, logits_and_aux


def split_prefixed(kwargs: dict, owner: str) -> tuple[dict, dict]:
    """`enc_x=1, dec_y=2` -> ({'x': 1}, {'y': 2}); any other name is an error."""
    enc, dec, unknown = {}, {}, []
    for key, value in kwargs.items():
        if key.startswith('enc_'):
            enc[key[4:]] = value
        elif key.startswith('dec_'):
            dec[key[4:]] = value
        else:
            unknown.append(key)
    if unknown:
        raise TypeError(f'{owner}: keyword arguments must start with enc_ or dec_, got {", ".join(unknown)}')
    return enc, dec


class EncoderDecoder(nn.Module):
    """`forward(src, tgt, return_loss=True, enc_input_mask=..., dec_input_mask=...)` returns
    `(loss, aux_loss)`: `loss` already includes every auxiliary loss (encoder and decoder);
    `aux_loss` is the encoder's, for logging (its backward is a no-op). Without `return_loss` it returns the
    decoder's `(logits, aux_loss)`. The encoder's `input_mask` becomes the decoder's `context_mask`.
    `ignore_index` defaults to `pad_value`, as in routing-transformer's and reformer-pytorch's
    encoder-decoders: padding never counts toward the loss."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, *, ignore_index: int | None = None, pad_value: int = 0):
        super().__init__()
        self.encoder = Autopadder(encoder)
        self.decoder = AutoregressiveWrapper(decoder, ignore_index=ignore_index, pad_value=pad_value)

    @classmethod
    def from_kwargs(cls, make_lm: Callable[..., nn.Module], *, dim: int, ignore_index: int | None = None,
                    pad_value: int = 0, enc_defaults: dict | None = None, dec_defaults: dict | None = None,
                    **kwargs) -> 'EncoderDecoder':
        """Builds encoder and decoder with `make_lm(dim=dim, **enc_/dec_ kwargs with the prefix removed)`.
        The encoder returns embeddings; the decoder is causal with cross-attention."""
        enc, dec = split_prefixed(kwargs, cls.__name__)
        enc = {**(enc_defaults or {}), **enc, 'return_embeddings': True}
        dec = {**(dec_defaults or {}), **dec, 'causal': True, 'receives_context': True}
        return cls(make_lm(dim=dim, **enc), make_lm(dim=dim, **dec), ignore_index=ignore_index, pad_value=pad_value)

    def encode(self, src: Tensor, **enc_kwargs) -> tuple[Tensor, Tensor]:
        out, aux = logits_and_aux(self.encoder(src, **enc_kwargs))
        # an encoder that returns only its hidden states has no auxiliary loss
        return out, aux if exists(aux) else out.new_zeros(())

    def forward(self, seq_in: Tensor, seq_out: Tensor, return_loss: bool = False,
                randomly_truncate_sequence: bool = False, **kwargs):
        enc_kwargs, dec_kwargs = split_prefixed(kwargs, type(self).__name__)
        context, enc_aux = self.encode(seq_in, **enc_kwargs)
        dec_kwargs.setdefault('context_mask', enc_kwargs.get('input_mask'))
        if not return_loss:
            logits, dec_aux = logits_and_aux(self.decoder(seq_out, context=context, **dec_kwargs))
            return logits, as_loss(enc_aux + dec_aux if exists(dec_aux) else enc_aux)
        loss = self.decoder(seq_out, return_loss=True, randomly_truncate_sequence=randomly_truncate_sequence,
                            context=context, **dec_kwargs) + enc_aux
        return loss, as_loss(enc_aux.detach())

    @torch.no_grad()
    def generate(self, seq_in: Tensor, seq_out_start: Tensor, seq_len: int, enc_input_mask: Tensor | None = None,
                 **kwargs) -> Tensor:
        """Encodes `seq_in` once and samples up to `seq_len` decoder tokens after `seq_out_start`
        (keyword arguments as in AutoregressiveWrapper.generate: eos_token, temperature, ...)."""
        context, _ = self.encode(seq_in, input_mask=enc_input_mask)
        return self.decoder.generate(seq_out_start, seq_len, context=context, context_mask=enc_input_mask, **kwargs)
