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

from ..helpers import compiling, exists, max_neg_value


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


def fold_mask(mask: Tensor | None, b: int, h: int) -> Tensor | None:
    """(b|1, h|1, g, i, j) -> ((b h)|1, g, i, j), for kernels that take batch and heads as one axis;
    a mask shared by every sample and head stays a single broadcast copy."""
    if mask is None:
        return None
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        return mask[0]
    return rearrange(mask.expand(b, h, *mask.shape[2:]), 'b h g i j -> (b h) g i j')


def sdpa(q, k, v, mask, *, scale, bias=None, dropout_p=0., causal=False, need_lse=False, need_weights=False):
    """torch's fused scaled_dot_product_attention, with batch and heads folded into its batch axis
    and groups as its head axis: a mask shared by every sample and head (local attention) then
    broadcasts instead of being copied per head."""
    assert not (need_lse or need_weights), 'sdpa returns neither the log-sum-exp nor the weights'
    b, h, g, i, _ = q.shape
    # with a bias, a float mask added to the logits; the executor guarantees every row keeps an entry
    mask = additive_mask(mask, bias, q.dtype, (b, h, g, i, k.shape[-2])) if exists(bias) else fold_mask(mask, b, h)
    q, k, v = (rearrange(t, 'b h g n d -> (b h) g n d') for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=causal and mask is None, scale=scale)
    return rearrange(out, '(b h) g n d -> b h g n d', b=b), None, None


# torch's CPU flash-attention kernel, which also returns the log-sum-exp (absent from old torch)
_flash_cpu = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
_flash_cpu_backward = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu_backward', None)


def _with_column(t: Tensor, value: float) -> Tensor:
    return torch.cat((t, t.new_full((*t.shape[:-1], 1), value)), dim=-1)


def additive_mask(mask: Tensor | None, bias: Tensor | None, dtype, shape) -> Tensor | None:
    """The float mask of the fused kernels, ((b h)|1, g, i, j), from a bool mask and an additive
    bias, each broadcastable to `shape` (b, h, g, i, j); None when there is neither. Masked pairs
    get the dtype's lowest finite value, whose weight is exactly 0 as with -inf, in one branch-free
    select (torch.where): a fill branches on every element, which on the irregular masks of routed
    groups is several times slower than the kernel itself, and a conversion followed by arithmetic
    takes three passes."""
    if mask is None and bias is None:
        return None
    b, h, g, i, j = shape
    if mask is None:
        attn_mask = bias.to(dtype)
    else:
        attn_mask = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device) if bias is None
                                else bias.to(dtype), torch.finfo(dtype).min)
    return fold_mask(attn_mask.expand(*attn_mask.shape[:2], g, i, j), b, h)


def flash_lse_backward(dout: Tensor | None, dlse: Tensor | None, q, k, v, out, lse, attn_mask, scale):
    """(dq, dk, dv) of the CPU flash kernel's (out, lse) given gradients on both (either may be
    None). The kernel's backward takes no gradient for the log-sum-exp, and uses `out` only through
    delta = rowsum(d out * out); as d lse / d logits are the attention weights, a gradient g on the
    log-sum-exp is exactly a delta lowered by g. So the kernel gets out - g * d out / |d out|^2 in
    place of out (bounded where g comes through a log-sum-exp merge, since g is then proportional
    to d out), and where a row has a gradient on its log-sum-exp but none on its output, a value
    column of ones whose output gradient is g (and an output column of zeros) does the same. Exact."""
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    if dlse is None:
        return _flash_cpu_backward(dout, q, k, v, out, lse, 0.0, False, attn_mask=attn_mask, scale=scale)[:3]
    precise = torch.promote_types(dout.dtype, torch.float32)
    norm = dout.to(precise).square().sum(dim=-1)
    if not bool(((norm == 0) & (dlse != 0)).any()):
        shift = (dlse.to(precise) / norm.clamp(min=torch.finfo(precise).tiny))[..., None] * dout.to(precise)
        return _flash_cpu_backward(dout, q, k, v, (out.to(precise) - shift).to(out.dtype), lse, 0.0, False,
                                   attn_mask=attn_mask, scale=scale)[:3]
    # the kernel needs one head size for q, k and v: q and k get a zero column (same logits)
    dq, dk, dv = _flash_cpu_backward(
        torch.cat((dout, dlse[..., None].to(dout.dtype)), dim=-1), _with_column(q, 0.), _with_column(k, 0.),
        _with_column(v, 1.), _with_column(out, 0.), lse, 0.0, False, attn_mask=attn_mask, scale=scale)[:3]
    return dq[..., :-1], dk[..., :-1], dv[..., :-1]


class _FlashLSE(torch.autograd.Function):
    """Fused attention returning (out, lse), differentiable in both (`flash_lse_backward`)."""

    @staticmethod
    def forward(fctx, q, k, v, mask, bias, scale, shape):
        # the float mask is four times the size of the bool one: it is saved as the bool mask and
        # the bias, and rebuilt in the backward pass
        attn_mask = additive_mask(mask, bias, q.dtype, shape)
        out, lse = _flash_cpu(q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale)
        fctx.save_for_backward(q, k, v, mask, bias, out, lse)
        fctx.scale, fctx.shape = scale, shape
        return out, lse

    @staticmethod
    def backward(fctx, dout, dlse):
        q, k, v, mask, bias, out, lse = fctx.saved_tensors
        attn_mask = additive_mask(mask, bias, q.dtype, fctx.shape)
        return (*flash_lse_backward(dout, dlse, q, k, v, out, lse, attn_mask, fctx.scale), None, None, None, None)


class _FlashPieces(torch.autograd.Function):
    """The CPU flash kernel over consecutive pieces of groups whose inputs `source` builds from the
    ungathered q, k, v and memory key/values (executor.GatheredPieces), as one autograd node. It
    keeps only those and each piece's output and log-sum-exp: the backward pass gathers every
    piece and builds its mask again, where autograd would keep all gathered copies and masks of a
    layer alive (with look-one-back and 4 hash rounds, 5x the size of q, k and v, and the masks).
    Rows without any admissible key (`empty`) output zeros and a log-sum-exp of -inf."""

    @staticmethod
    def forward(fctx, source, q, k, v, *mem):
        outs, lses, kernel_lses = [], [], []
        for p in range(source.count):
            qg, kg, vg, attn_mask, empty = source.inputs(p, q, k, v, mem)
            out, lse = _flash_cpu(qg, kg, vg, 0.0, False, attn_mask=attn_mask, scale=source.scale)
            kernel_lses.append(lse)  # finite, as the kernel's backward needs it
            if exists(empty):
                out.masked_fill_(empty, 0.)
                lse = lse.masked_fill(empty.squeeze(-1), float('-inf'))
            outs.append(out)
            lses.append(lse)
        fctx.source, fctx.n_mem = source, len(mem)
        fctx.save_for_backward(q, k, v, *mem, *outs, *kernel_lses)
        return (*outs, *lses)

    @staticmethod
    def backward(fctx, *grads):
        source, count = fctx.source, fctx.source.count
        saved = fctx.saved_tensors
        (q, k, v), mem = saved[:3], saved[3:3 + fctx.n_mem]
        outs, lses = saved[3 + fctx.n_mem:3 + fctx.n_mem + count], saved[3 + fctx.n_mem + count:]
        douts, dlses = grads[:count], grads[count:]
        dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
        dmem = [torch.zeros_like(t) for t in mem]
        for p in range(count):
            dout, dlse = douts[p], dlses[p]
            if dout is None and dlse is None:
                continue
            qg, kg, vg, attn_mask, empty = source.inputs(p, q, k, v, mem)
            if exists(empty):  # their outputs were set, not computed
                dout = None if dout is None else dout.masked_fill(empty, 0.)
                dlse = None if dlse is None else dlse.masked_fill(empty.squeeze(-1), 0.)
            grads_p = flash_lse_backward(dout, dlse, qg, kg, vg, outs[p], lses[p], attn_mask, source.scale)
            source.accumulate(p, grads_p, dq, dk, dv, dmem)
        return None, dq, dk, dv, *dmem


def flash_pieces(source, q: Tensor, k: Tensor, v: Tensor, mem: tuple[Tensor, ...]) -> tuple[list, list]:
    """(outputs, log-sum-exps) of every piece of `source` (see _FlashPieces)."""
    results = _FlashPieces.apply(source, q, k, v, *mem)
    return list(results[:source.count]), list(results[source.count:])


def flash_usable(q: Tensor, *, dropout_p: float, need_weights: bool) -> bool:
    """Whether the CPU flash kernel can do the job: it has neither dropout nor weights to return."""
    return exists(_flash_cpu_backward) and q.device.type == 'cpu' and dropout_p == 0. and not need_weights


def flash_lse(q, k, v, mask, *, scale, bias=None, dropout_p=0., causal=False, need_lse=False, need_weights=False):
    """The CPU flash kernel with a differentiable log-sum-exp (multi-group merges): no (i, j)
    weights are kept for the backward pass. Falls back to the reference path where the kernel does
    not apply (other devices, dropout, weights asked for, a bias that needs a gradient) and in a
    compiled graph, where the compiler fuses the reference path's softmax itself."""
    usable = (flash_usable(q, dropout_p=dropout_p, need_weights=need_weights) and not causal
              and not (exists(bias) and bias.requires_grad))
    if not usable or (need_lse and compiling()):
        return reference(q, k, v, mask, scale=scale, bias=bias, dropout_p=dropout_p, causal=causal,
                         need_lse=need_lse, need_weights=need_weights)
    if not need_lse:
        return sdpa(q, k, v, mask, scale=scale, bias=bias, causal=causal)
    b, h, g, i, _ = q.shape
    k, v = k.to(q.dtype), v.to(q.dtype)
    q, k, v = (rearrange(t, 'b h g n d -> (b h) g n d') for t in (q, k, v))
    out, lse = _FlashLSE.apply(q, k, v, mask, bias, scale, (b, h, g, i, k.shape[-2]))
    return (rearrange(out, '(b h) g n d -> b h g n d', b=b), rearrange(lse, '(b h) g n -> b h g n', b=b), None)


BACKENDS = dict(reference=reference, sdpa=sdpa, flash_lse=flash_lse)


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
