"""AutoregressiveWrapper: next-token loss and sampling, with a key/value cache for decoding.

Axes: b batch, n sequence, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from ..helpers import default, exists
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
    length are padded to the model's multiple internally (on the left with `pad_left`, as
    sinkhorn-transformer's wrapper could; on the right by default, which leaves a causal model's
    outputs exactly those of the unpadded input). A list of 1-D tensors is padded with
    `pad_value`, inputs and targets each (as the seed packages do).

    `ignore_index` defaults to `pad_value`, as in routing-transformer's and sinkhorn-transformer's
    wrappers, so padding never counts toward the loss; pass `ignore_index=-100` to train on token
    `pad_value` too (reformer-pytorch's `TrainingWrapper` defaults to -100).
    `randomly_truncate_sequence` cuts every sample to its own random length (sinkhorn-transformer;
    routing-transformer drew one length per batch) and excludes the cut positions from the loss."""

    def __init__(self, net: nn.Module, ignore_index: int | None = None, pad_value: int = 0, pad_left: bool = False):
        super().__init__()
        self.net = net
        self.padded = Autopadder(net, pad_left=pad_left, pad_value=pad_value)
        self.ignore_index, self.pad_value = default(ignore_index, pad_value), pad_value
        self.max_seq_len = net.max_seq_len

    def update_kmeans(self):
        self.net.update_kmeans()

    def pad(self, seqs) -> Tensor:
        return pad_sequence(list(seqs), batch_first=True, padding_value=self.pad_value)

    def forward(self, x, return_loss: bool = False, randomly_truncate_sequence: bool = False, **kwargs):
        if not return_loss:
            return self.padded(self.pad(x) if isinstance(x, (list, tuple)) else x, **kwargs)

        shortest = min(len(t) for t in x) if isinstance(x, (list, tuple)) else x.shape[-1] if x.ndim == 2 else 2
        if shortest < 2:
            raise ValueError(f'return_loss needs sequences of at least 2 tokens (the inputs and their next tokens), '
                             f'got {shortest}')
        input_mask = kwargs.pop('input_mask', None)
        if isinstance(x, (list, tuple)) and exists(input_mask):
            raise ValueError('input_mask needs the input as one (batch, seq_len) tensor, not a list')
        if isinstance(x, (list, tuple)) and randomly_truncate_sequence:
            lengths = torch.tensor([len(t) for t in x])
            x = self.pad(x)
            input_mask = torch.arange(x.shape[1], device=x.device) < lengths.to(x.device)[:, None]
        if isinstance(x, (list, tuple)):
            inputs, targets = self.pad(t[:-1] for t in x), self.pad(t[1:] for t in x)
        else:
            if exists(input_mask) and input_mask.shape != x.shape:
                raise ValueError(f'input_mask has shape {tuple(input_mask.shape)} but must be {tuple(x.shape)}, '
                                 f'the shape of the input (True = real token)')
            cut = None
            if randomly_truncate_sequence:
                # train on all lengths, so that decoding short prefixes is in distribution (seed README)
                x, input_mask, cut = self.truncate(x, input_mask)
            inputs, targets = x[:, :-1], x[:, 1:]
            if exists(cut):
                targets = targets.masked_fill(cut[:, 1:], self.ignore_index)
            if exists(input_mask):
                input_mask = input_mask[:, :-1]
        logits, aux = logits_and_aux(self.padded(inputs, input_mask=input_mask, **kwargs))
        loss = F.cross_entropy(rearrange(logits, 'b n v -> b v n'), targets, ignore_index=self.ignore_index)
        return loss + aux if exists(aux) else loss

    def truncate(self, x: Tensor, input_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Every sample keeps a random prefix of at least 2 tokens; the rest becomes masked padding.
        Returns the tokens, the input mask and the positions cut off (b, n)."""
        b, n = x.shape
        lengths = torch.randint(2, n + 1, (b, 1), device=x.device)
        longest = int(lengths.max())
        cut = (torch.arange(n, device=x.device) >= lengths)[:, :longest]
        mask = ~cut if input_mask is None else input_mask[:, :longest].bool() & ~cut
        return x[:, :longest].masked_fill(cut, self.pad_value), mask, cut

    @torch.no_grad()
    def generate(self, start_tokens: Tensor, seq_len: int, eos_token: int | None = None, temperature: float = 1.,
                 filter_logits_fn=top_k, filter_thres: float = 0.9, input_mask: Tensor | None = None,
                 use_cache: bool = True, **kwargs) -> Tensor:
        """Samples `seq_len` tokens after `start_tokens` (b, t) and returns them (b, <= seq_len).
        `input_mask` marks the real prompt tokens of a padded batch (padding on either side): each
        sample is continued exactly as it would be alone, since padding never enters the model
        (the prompts run together up to the shortest one's length, then a sample still in its
        prompt is fed its next prompt token while the others sample). `temperature=0` is greedy.
        With `use_cache` each new token costs one position of attention work: keys/values of the
        prefix are kept per layer; the model sees the last `max_seq_len` tokens either way (a longer
        prompt, or a longer output, continues on a sliding window, as without the cache).
        Each sample stops at its own `eos_token`: what follows it is `pad_value`, and generation ends
        when every sample has stopped (the seed packages stopped only when all samples emitted eos
        at the same step, and kept sampling after a sample's eos)."""
        was_training = self.net.training
        self.net.eval()
        squeeze = start_tokens.ndim == 1
        prompts = start_tokens[None] if squeeze else start_tokens
        if exists(input_mask):
            if input_mask.shape != prompts.shape:
                raise ValueError(f'input_mask has shape {tuple(input_mask.shape)} but must be '
                                 f'{tuple(prompts.shape)}, the shape of start_tokens (True = real token)')
            prompts = self.pad([row[keep] for row, keep in zip(prompts, input_mask.bool())])
            lengths = input_mask.bool().sum(dim=-1)
        else:
            lengths = torch.full(prompts.shape[:1], prompts.shape[1], device=prompts.device)
        if prompts.shape[1] == 0 or int(lengths.min()) == 0:
            raise ValueError('generate needs at least one start token per sample')
        first, longest = int(lengths.min()), prompts.shape[1]
        out = prompts[:, :first]
        cache = {} if use_cache else None
        done = torch.zeros_like(lengths, dtype=torch.bool)

        # the cache holds at most max_seq_len positions: a longer prompt starts from its last ones
        last = self.prefill(out[:, -self.max_seq_len:], cache, **kwargs) if use_cache else None
        while True:
            pos = out.shape[1]
            if not exists(cache):
                last = logits_and_aux(self.padded(out[:, -self.max_seq_len:], **kwargs))[0][:, -1]
            sample = self.sample(last, temperature, filter_logits_fn, filter_thres)
            in_prompt = pos < lengths
            if exists(eos_token):
                sample = sample.masked_fill(done, self.pad_value)
                done |= (sample == eos_token) & ~in_prompt
            if pos < longest:
                sample = torch.where(in_prompt, prompts[:, pos], sample)
            out = torch.cat((out, sample[:, None]), dim=-1)
            if bool((done | (out.shape[1] - lengths >= seq_len)).all()):
                break
            if exists(cache):
                if cache['offset'] >= self.max_seq_len:
                    cache = None  # positions ran out: continue on a sliding window without a cache
                else:
                    last = self.step(sample[:, None], cache, **kwargs)

        self.net.train(was_training)
        width = min(seq_len, out.shape[1] - first)
        out = F.pad(out, (0, longest - first), value=self.pad_value)
        index = lengths[:, None] + torch.arange(width, device=out.device)
        out = out.gather(1, index)
        return out[0] if squeeze else out

    def step(self, tokens, cache, **kwargs) -> Tensor:
        return logits_and_aux(self.net(tokens, cache=cache, **kwargs))[0][:, -1]

    def prefill(self, prompt, cache, **kwargs) -> Tensor:
        # the longest prefix the model takes in one pass, then the rest token by token: no padding
        # ever enters the cache
        multiple = getattr(self.net, 'multiple_of', 1)
        whole = (prompt.shape[1] // multiple) * multiple
        last = None
        if whole > 0:
            last = logits_and_aux(self.net(prompt[:, :whole], cache=cache, **kwargs))[0][:, -1]
        for pos in range(whole, prompt.shape[1]):
            last = self.step(prompt[:, pos:pos + 1], cache, **kwargs)
        return last

    @staticmethod
    def sample(logits, temperature, filter_logits_fn, filter_thres) -> Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        filtered = filter_logits_fn(logits, thres=filter_thres) if exists(filter_logits_fn) else logits
        probs = F.softmax(filtered / temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(-1)


class TrainingWrapper(AutoregressiveWrapper):
    """reformer-pytorch's autoregressive wrapper (`reformer_pytorch.generative_tools.TrainingWrapper`):
    `forward(x, return_loss=True)` and `generate` as in AutoregressiveWrapper, with reformer-pytorch's
    default `ignore_index=-100`, so every target counts, token `pad_value` included (routing- and
    sinkhorn-transformer's AutoregressiveWrapper ignore `pad_value`)."""

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0):
        super().__init__(net, ignore_index=ignore_index, pad_value=pad_value)
