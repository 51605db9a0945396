"""Prompts in, text out: encoding, and generation through the cached decoder of
AutoregressiveWrapper."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..wrappers import AutoregressiveWrapper, top_k, top_p
from .errors import CLIError

FILTERS = dict(top_k=top_k, top_p=top_p, none=None)


def encode_text(prompt: str, num_tokens: int) -> Tensor:
    """UTF-8 bytes as token ids; a byte the vocabulary has no id for is an error."""
    data = prompt.encode('utf-8')
    if not data:
        raise CLIError('the prompt is empty: give at least one character with --prompt')
    bad = [(i, b) for i, b in enumerate(data) if b >= num_tokens]
    if bad:
        i, b = bad[0]
        raise CLIError(f'the prompt has byte 0x{b:02x} at position {i}, which this model cannot encode: its '
                       f'vocabulary is {num_tokens} tokens (ids 0..{num_tokens - 1}), so only bytes below '
                       f'0x{num_tokens:02x} fit; use --prompt-ids for models trained on a task')
    return torch.tensor(list(data), dtype=torch.long)


def encode_ids(text: str, num_tokens: int) -> Tensor:
    try:
        ids = [int(t) for t in text.replace(',', ' ').split()]
    except ValueError:
        raise CLIError(f'--prompt-ids {text!r} must be token ids separated by commas or spaces, e.g. 0,3,7') from None
    if not ids:
        raise CLIError('--prompt-ids is empty: give at least one token id')
    bad = [i for i in ids if not 0 <= i < num_tokens]
    if bad:
        raise CLIError(f'--prompt-ids has id {bad[0]}, outside this model\'s vocabulary 0..{num_tokens - 1}')
    return torch.tensor(ids, dtype=torch.long)


def check_prompt_length(prompt: Tensor, max_seq_len: int) -> None:
    if prompt.numel() >= max_seq_len:
        raise CLIError(f'the prompt is {prompt.numel()} tokens but this model reads at most {max_seq_len} '
                       f'(its --seq-len), including what it generates: shorten the prompt')


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, length: int, *, temperature: float = 0.8, filter_name: str = 'top_k',
             filter_thres: float = 0.9, use_cache: bool = True) -> Tensor:
    """`length` tokens after `prompt` (1-D); the cached decoder when every router supports it."""
    wrapper = AutoregressiveWrapper(model)
    device = next(model.parameters()).device
    kwargs = dict(temperature=temperature, filter_logits_fn=FILTERS[filter_name], filter_thres=filter_thres)
    try:
        return wrapper.generate(prompt.to(device)[None], length, use_cache=use_cache, **kwargs)[0].cpu()
    except NotImplementedError:
        # a router without cached decoding: recompute the window at every step instead
        return wrapper.generate(prompt.to(device)[None], length, use_cache=False, **kwargs)[0].cpu()


def decode_text(ids: Tensor) -> str:
    return bytes(ids.clamp(0, 255).tolist()).decode('utf-8', errors='replace')
