"""Attention kernels over gathered groups.

Axes: b batch, h heads, g groups, i queries per group, j keys per group, d head dim.
Every backend takes q (b, h, g, i, d), k and v (b, h, g, j, d), an optional bool mask
broadcastable to (b, h, g, i, j) (True = may attend) and an optional additive bias of the same
shape, and returns (out, lse, weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, einsum

from ..helpers import exists, max_neg_value


def reference(q, k, v, mask, *, scale, bias=None, dropout_p=0., causal=False, need_lse=False, need_weights=False):
    """einsum + softmax: any mask, returns the log-sum-exp and the weights. The test oracle."""
    sim = einsum('b h g i d, b h g j d -> b h g i j', q, k) * scale
    if exists(bias):
        sim = sim + bias
    if causal:
        i, j = sim.shape[-2:]
        causal_mask = torch.ones(i, j, dtype=torch.bool, device=q.device).tril(j - i)
        mask = causal_mask if mask is None else mask & causal_mask
    if exists(mask):
        sim = sim.masked_fill(~mask, max_neg_value(sim))
    # normalisers and softmax in at least float32 (half-precision logits under autocast)
    precise = torch.promote_types(sim.dtype, torch.float32)
    lse = sim.to(precise).logsumexp(dim=-1) if need_lse else None
    attn = sim.softmax(dim=-1, dtype=precise).to(v.dtype)
    weights = attn if need_weights else None
    if dropout_p > 0.:
        attn = F.dropout(attn, p=dropout_p)
    out = einsum('b h g i j, b h g j d -> b h g i d', attn, v)
    return out, lse, weights


def sdpa(q, k, v, mask, *, scale, bias=None, dropout_p=0., causal=False, need_lse=False, need_weights=False):
    """torch's fused scaled_dot_product_attention, with batch and heads folded into its batch axis
    and groups as its head axis: a mask shared by every sample and head (local attention) then
    broadcasts instead of being copied per head."""
    assert not (need_lse or need_weights), 'sdpa returns neither the log-sum-exp nor the weights'
    b, h, g = q.shape[:3]
    if exists(bias):
        # a float mask is added to the logits; the executor guarantees every row keeps a finite entry
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float('-inf'))
    if exists(mask):
        if mask.shape[0] == 1 and mask.shape[1] == 1:
            mask = mask[0]
        else:
            mask = rearrange(mask.expand(b, h, *mask.shape[2:]), 'b h g i j -> (b h) g i j')
    q, k, v = (rearrange(t, 'b h g n d -> (b h) g n d') for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=causal and mask is None, scale=scale)
    return rearrange(out, '(b h) g n d -> b h g n d', b=b), None, None


BACKENDS = dict(reference=reference, sdpa=sdpa)


def select(name: str, *, need_lse: bool, need_weights: bool):
    """'auto' takes SDPA when it can do the job and the reference path when the caller needs the
    log-sum-exp (multi-group merges) or the attention weights (Recorder)."""
    if name not in ('auto', *BACKENDS):
        raise ValueError(f'unknown attention backend {name!r}; choose one of auto, {", ".join(BACKENDS)}')
    if name == 'auto':
        return reference if (need_lse or need_weights) else sdpa
    if name == 'sdpa' and (need_lse or need_weights):
        raise ValueError('backend "sdpa" cannot return the log-sum-exp or attention weights this '
                         'configuration needs; use backend="auto" or "reference"')
    return BACKENDS[name]
