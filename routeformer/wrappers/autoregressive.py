"""AutoregressiveWrapper: next-token loss and sampling, with a key/value cache for decoding.

Axes: b batch, n sequence, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from ..helpers import exists
from .autopadder import Autopadder


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keeps the top (1 - thres) fraction of the vocabulary (seed convention), at least one token."""
    k = max(1, int((1 - thres) * logits.shape[-1]))
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float('-inf')).scatter(-1, indices, values)


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus filtering keeping probability mass 1 - thres (seed convention), at least one token."""
    sorted_logits, indices = logits.sort(dim=-1, descending=True)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum_probs > (1 - thres)
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
    remove[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float('-inf'))
    return torch.full_like(logits, float('-inf')).scatter(-1, indices, sorted_logits)


def logits_and_aux(out) -> tuple[Tensor, Tensor | None]:
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


class AutoregressiveWrapper(nn.Module):
    """Wraps a causal token model for training (`return_loss=True`: cross-entropy of the next token,
    ignoring `ignore_index`, plus the model's aux loss) and sampling (`generate`). Inputs of any
    length are padded to the model's multiple internally; a list of 1-D tensors is right-padded
    with `pad_value`."""

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        self.net = net
        self.padded = Autopadder(net)
        self.ignore_index, self.pad_value = ignore_index, pad_value
        self.max_seq_len = net.max_seq_len

    def update_kmeans(self):
        self.net.update_kmeans()

    def forward(self, x, return_loss: bool = False, randomly_truncate_sequence: bool = False, **kwargs):
        if isinstance(x, (list, tuple)):
            x = pad_sequence(list(x), batch_first=True, padding_value=self.pad_value)
        if not return_loss:
            return self.padded(x, **kwargs)

        if x.ndim == 2 and x.shape[1] < 2:
            raise ValueError(f'return_loss needs sequences of at least 2 tokens (the inputs and their next tokens), '
                             f'got {x.shape[1]}')
        input_mask = kwargs.pop('input_mask', None)
        if randomly_truncate_sequence:
            # train on all lengths, so that decoding short prefixes is in distribution (seed README)
            length = int(torch.randint(2, x.shape[1] + 1, ()))
            x = x[:, :length]
            input_mask = input_mask[:, :length] if exists(input_mask) else None
        inputs, targets = x[:, :-1], x[:, 1:]
        if exists(input_mask):
            input_mask = input_mask[:, :-1]
        logits, aux = logits_and_aux(self.padded(inputs, input_mask=input_mask, **kwargs))
        loss = F.cross_entropy(rearrange(logits, 'b n v -> b v n'), targets, ignore_index=self.ignore_index)
        return loss + aux if exists(aux) else loss

    @torch.no_grad()
    def generate(self, start_tokens: Tensor, seq_len: int, eos_token: int | None = None, temperature: float = 1.,
                 filter_logits_fn=top_k, filter_thres: float = 0.9, input_mask: Tensor | None = None,
                 use_cache: bool = True, **kwargs) -> Tensor:
        """Samples `seq_len` tokens after `start_tokens` (b, t) and returns them (b, <= seq_len).
        `input_mask` marks real prompt tokens (for left-padded prompts). `temperature=0` is greedy.
        With `use_cache` each new token costs one position of attention work: keys/values of the
        prefix are kept per layer. Generation stops early when every sample has emitted `eos_token`;
        positions after a sample's eos are filled with `pad_value`."""
        was_training = self.net.training
        self.net.eval()
        squeeze = start_tokens.ndim == 1
        out = start_tokens[None] if squeeze else start_tokens
        if out.shape[1] == 0:
            raise ValueError('generate needs at least one start token per sample')
        b, t = out.shape
        mask = input_mask.bool() if exists(input_mask) else None
        cache = {} if use_cache else None
        done = torch.zeros(b, dtype=torch.bool, device=out.device)

        last = self.prefill(out, mask, cache, **kwargs) if use_cache else None
        for _ in range(seq_len):
            if not exists(cache):
                window = out[:, -self.max_seq_len:]
                window_mask = mask[:, -self.max_seq_len:] if exists(mask) else None
                last = logits_and_aux(self.padded(window, input_mask=window_mask, **kwargs))[0][:, -1]
            sample = self.sample(last, temperature, filter_logits_fn, filter_thres)
            if exists(eos_token):
                sample = sample.masked_fill(done, self.pad_value)
                done |= sample == eos_token
            out = torch.cat((out, sample[:, None]), dim=-1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=-1) if exists(mask) else None
            if exists(eos_token) and done.all():
                break
            if exists(cache):
                if cache['offset'] >= self.max_seq_len:
                    cache = None  # positions ran out: continue on a sliding window without a cache
                else:
                    last = self.step(sample[:, None], mask, cache, **kwargs)

        self.net.train(was_training)
        out = out[:, t:]
        return out[0] if squeeze else out

    def step(self, tokens, mask, cache, **kwargs) -> Tensor:
        return logits_and_aux(self.net(tokens, input_mask=mask, cache=cache, **kwargs))[0][:, -1]

    def prefill(self, prompt, mask, cache, **kwargs) -> Tensor:
        # the longest prefix the model takes in one pass, then the rest token by token: no padding
        # ever enters the cache
        multiple = getattr(self.net, 'multiple_of', 1)
        whole = (prompt.shape[1] // multiple) * multiple
        last = None
        if whole > 0:
            chunk_mask = mask[:, :whole] if exists(mask) else None
            last = logits_and_aux(self.net(prompt[:, :whole], input_mask=chunk_mask, cache=cache, **kwargs))[0][:, -1]
        for pos in range(whole, prompt.shape[1]):
            last = self.step(prompt[:, pos:pos + 1], mask[:, :pos + 1] if exists(mask) else None, cache, **kwargs)
        return last

    @staticmethod
    def sample(logits, temperature, filter_logits_fn, filter_thres) -> Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        filtered = filter_logits_fn(logits, thres=filter_thres) if exists(filter_logits_fn) else logits
        probs = F.softmax(filtered / temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(-1)
