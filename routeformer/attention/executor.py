"""The one executor: gather q/k/v by a RoutePlan, build the mask, attend inside every group in
one batched call, and scatter back.

Axes: b batch, h heads, n sequence, d head dim, g groups, i queries per group, j keys per group,
m memory key/values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..helpers import exists
from . import backends
from .plan import RoutePlan, gather, merge_shares, positions_of, scatter


def gather_queries(q: Tensor, plan: RoutePlan) -> Tensor:
    if plan.q_index is None:
        return rearrange(q, 'b h n d -> b h 1 n d')
    if plan.info.get('contiguous_queries', False):
        g, i = plan.q_index.shape[-2:]
        q = F.pad(q, (0, 0, 0, g * i - q.shape[-2]))
        return rearrange(q, 'b h (g i) d -> b h g i d', g=g)
    return gather(q, plan.q_index)


def gather_keys(t: Tensor, plan: RoutePlan) -> Tensor:
    if plan.kv_index is None:
        return rearrange(t, 'b h n d -> b h 1 n d')
    if 'sliding_windows' in plan.info:
        # contiguous windows (local attention): a strided view instead of an index gather, whose
        # backward would be a slow scatter-add; slots outside the sequence read zero padding
        window, back, forward = plan.info['sliding_windows']
        padded = F.pad(t, (0, 0, back, forward))
        return rearrange(padded.unfold(-2, back + window + forward, window), 'b h g d j -> b h g j d')
    return gather(t, plan.kv_index)


def build_mask(plan: RoutePlan, *, q_len: int, kv_len: int, causal: bool, key_mask: Tensor | None,
               exclude_self: bool, has_memory: bool, device) -> Tensor | None:
    """The admissibility mask of every gathered (query, key) pair, None when everything is allowed.
    Written once, as predicates over the original positions of the gathered slots."""
    q_pos = positions_of(plan.q_index, q_len, device) + plan.q_offset
    kv_pos = positions_of(plan.kv_index, kv_len, device)
    q_pos, kv_pos = rearrange(q_pos, '... i -> ... i 1'), rearrange(kv_pos, '... j -> ... 1 j')

    mask = plan.mask
    def both(new):
        return new if mask is None else mask & new

    if exists(plan.kv_index):
        mask = both(kv_pos >= 0)
    if causal:
        mask = both(q_pos >= kv_pos)
    if exists(key_mask):
        if plan.kv_index is None:
            gathered = rearrange(key_mask, 'b j -> b 1 1 1 j')
        else:
            batch = torch.arange(key_mask.shape[0], device=device).view(-1, 1, 1, 1)
            gathered = rearrange(key_mask[batch, plan.kv_index.clamp(min=0)], '... j -> ... 1 j')
        mask = both(gathered)
    if exclude_self:
        # shared-QK: a token's key is its own query, so self-attention dominates; allow it only
        # when nothing else is visible, memory key/values included (reformer)
        is_self = q_pos == kv_pos
        others = both(~is_self)
        mask = others if has_memory else others | (is_self & ~others.any(dim=-1, keepdim=True))
    return mask


class RoutedAttention(nn.Module):
    """gather -> attend inside groups -> scatter back."""

    def __init__(self, *, dropout: float = 0., backend: str = 'auto'):
        super().__init__()
        backends.select(backend, need_lse=False, need_weights=False)  # fail early on a typo
        self.dropout = dropout
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, plan: RoutePlan, *, causal: bool = False,
                key_mask: Tensor | None = None, mem_kv: tuple[Tensor, Tensor] | None = None,
                exclude_self: bool = False, need_weights: bool = False, rel_pos=None):
        """q (b, h, n, d), k/v (b, h, n_kv, d), key_mask (b, n_kv), mem_kv two (h, m, d) tensors
        visible to every query. `rel_pos(qg, q_pos, kv_pos)`, when given, returns logits added to
        every gathered pair from the gathered queries (b, h, g, i, d) and the original positions of
        the slots, q_pos (b|1, h|1, g, i) and kv_pos (b|1, h|1, g, j) (relative position attention).
        Returns (out (b, h, n, d), weights (b, h, g, i, [m +] j) or None)."""
        q_len, kv_len = q.shape[-2], k.shape[-2]
        qg, kg, vg = gather_queries(q, plan), gather_keys(k, plan), gather_keys(v, plan)
        if exists(plan.k_gate):
            kg = kg * rearrange(plan.k_gate, '... j -> ... j 1').to(kg.dtype)
        if exists(plan.kv_gate):
            vg = vg * rearrange(plan.kv_gate, '... j -> ... j 1').to(vg.dtype)
        bias = plan.bias
        if exists(rel_pos):
            q_pos = positions_of(plan.q_index, q_len, q.device) + plan.q_offset
            rel = rel_pos(qg, q_pos, positions_of(plan.kv_index, kv_len, q.device))
            bias = rel if bias is None else bias + rel

        # one dense causal group and nothing else to mask: let the kernel apply the causal mask
        # itself, without materialising an (n, n) mask (the fused kernels skip the masked half;
        # SDPA takes an additive bias only as a mask, without is_causal)
        kernel_causal = (causal and plan.q_index is None and plan.kv_index is None and plan.q_offset == 0
                         and plan.mask is None and key_mask is None and not exclude_self and bias is None)
        mask = build_mask(plan, q_len=q_len, kv_len=kv_len, causal=causal and not kernel_causal, key_mask=key_mask,
                          exclude_self=exclude_self, has_memory=exists(mem_kv), device=q.device)

        if exists(mem_kv):
            b, h, g = kg.shape[:3]
            mk, mv = (repeat(t, 'h m d -> b h g m d', b=b, g=g).to(kg.dtype) for t in mem_kv)
            kg, vg = torch.cat((mk, kg), dim=-2), torch.cat((mv, vg), dim=-2)
            if kernel_causal:
                i, j = qg.shape[-2], kg.shape[-2] - mk.shape[-2]
                mask = torch.ones(1, 1, 1, i, j, dtype=torch.bool, device=q.device).tril()
                kernel_causal = False
            if exists(mask):
                mask = F.pad(mask, (mk.shape[-2], 0), value=True)
            if exists(bias):
                bias = F.pad(bias, (mk.shape[-2], 0), value=0.)

        empty = None
        if exists(mask):
            # a row with no admissible key (a padded query, a routed query whose cluster holds no
            # earlier key) would be undefined: the kernel sees all of it, and its output is zeroed
            # below, so that it contributes nothing and sees no later key
            empty = ~mask.any(dim=-1, keepdim=True)
            mask = mask | empty

        need_lse = plan.merge == 'logsumexp'
        attend = backends.select(self.backend, need_lse=need_lse, need_weights=need_weights)
        out, lse, weights = attend(qg, kg, vg, mask, scale=q.shape[-1] ** -0.5, bias=bias,
                                   dropout_p=self.dropout if self.training else 0.,
                                   causal=kernel_causal, need_lse=need_lse, need_weights=need_weights)
        if exists(empty):
            out = out.masked_fill(empty, 0.)
            weights = weights.masked_fill(empty, 0.) if exists(weights) else None
            if need_lse:
                lse = lse.masked_fill(empty.squeeze(-1), float('-inf'))
        if exists(plan.q_gate):
            out = out * rearrange(plan.q_gate, '... i -> ... i 1').to(out.dtype)
        if need_weights and need_lse:
            # a query's weights in each group, scaled by the group's share of the merge: summed over
            # groups they are the attention the query really paid
            weights = weights * rearrange(merge_shares(plan, lse, q_len), '... -> ... 1').to(weights.dtype)
        return scatter(out, plan, q_len, lse=lse), weights
