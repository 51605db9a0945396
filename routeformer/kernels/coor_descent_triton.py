"""Fused coordinate descent in Triton: one program per row, the whole row in registers, forward and
backward kernels, with segment checkpointing (the backward recomputes each segment of iterations
from its saved b instead of keeping every iteration's intermediates).

Import this module only when it is needed: it imports triton. `triton_coor_descent` runs the
kernels on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, how the
tests check it against the PyTorch version); anywhere else it falls back to `coor_descent`.
Same arguments and results as `coor_descent` (see kernels/coor_descent.py for the iteration).

Axes: r rows, n entries per row, t segments.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor, autograd

from ..helpers import default
from .coor_descent import coor_descent, epsilon_schedule, row_k

MAX_BLOCK = 131072  # one row must fit one program; longer rows: route in blocks (route_block_size)


# n_iters is a compile-time constant (one kernel per segment length, a handful): Triton's
# interpreter cannot loop over a runtime integer argument
@triton.jit
def _forward_kernel(s_ptr, use_ptr, logk_ptr, eps_ptr, b_in_ptr, a_out_ptr, b_out_ptr,
                    n_cols, row_stride, start, n_iters: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    offsets = row * row_stride + cols
    use = tl.load(use_ptr + offsets, mask=in_row, other=0) != 0
    s = tl.load(s_ptr + offsets, mask=in_row, other=0.)
    b = tl.load(b_in_ptr + offsets, mask=in_row, other=0.)
    logk = tl.load(logk_ptr + row)
    a = logk * 0.
    for it in range(n_iters):
        eps = tl.load(eps_ptr + start + it)
        sb = tl.where(use, (s + b) / eps, -float('inf'))
        top = tl.max(sb, axis=0)
        lse = tl.log(tl.sum(tl.exp(sb - top), axis=0)) + top
        a = eps * (logk - lse)
        b = -tl.maximum(s + a, 0.)
    tl.store(a_out_ptr + row, a)
    tl.store(b_out_ptr + offsets, b, mask=in_row)


@triton.jit
def _backward_kernel(s_ptr, use_ptr, logk_ptr, eps_ptr, b_in_ptr, ds_ptr, gb_ptr, ga_ptr, dlogk_ptr,
                     n_cols, row_stride, start, n_iters: tl.constexpr, BLOCK: tl.constexpr):
    """Back through one segment: gb holds the gradient of the segment's last b on entry and of its
    first b on exit; ds and dlogk accumulate; ga is the gradient of the last a (nonzero only for
    the final segment, whose a feeds the scores)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    offsets = row * row_stride + cols
    use = tl.load(use_ptr + offsets, mask=in_row, other=0) != 0
    s = tl.load(s_ptr + offsets, mask=in_row, other=0.)
    b_first = tl.load(b_in_ptr + offsets, mask=in_row, other=0.)
    ds = tl.load(ds_ptr + offsets, mask=in_row, other=0.)
    gb = tl.load(gb_ptr + offsets, mask=in_row, other=0.)
    logk = tl.load(logk_ptr + row)
    ga_carry = tl.load(ga_ptr + row)
    dlogk = tl.load(dlogk_ptr + row)

    for rev in range(n_iters):
        t = n_iters - 1 - rev
        # recompute b before iteration t from the segment's checkpoint
        b = b_first
        for it in range(t):
            eps = tl.load(eps_ptr + start + it)
            sb = tl.where(use, (s + b) / eps, -float('inf'))
            top = tl.max(sb, axis=0)
            lse = tl.log(tl.sum(tl.exp(sb - top), axis=0)) + top
            b = -tl.maximum(s + eps * (logk - lse), 0.)
        eps = tl.load(eps_ptr + start + t)
        sb = tl.where(use, (s + b) / eps, -float('inf'))
        top = tl.max(sb, axis=0)
        e = tl.exp(sb - top)
        total = tl.sum(e, axis=0)
        softmax = e / total
        a = eps * (logk - (tl.log(total) + top))

        # b_t = -relu(s + a_t)
        gsa = tl.where(s + a > 0., -gb, 0.)
        ds += gsa
        ga = tl.sum(gsa, axis=0) + ga_carry
        ga_carry = ga * 0.
        # a_t = eps (log k - logsumexp((s + b_{t-1}) / eps))
        dlogk += eps * ga
        g = -ga * softmax
        ds += g
        gb = g

    tl.store(ds_ptr + offsets, ds, mask=in_row)
    tl.store(gb_ptr + offsets, gb, mask=in_row)
    tl.store(dlogk_ptr + row, dlogk)


def num_warps_for(block: int) -> int:
    return 16 if block >= 4096 else 8 if block >= 2048 else 4


def split_iterations(n_iters: int, segments: int) -> list[int]:
    """n_iters as `segments` nearly equal positive parts."""
    segments = max(1, min(segments, n_iters))
    base, extra = divmod(n_iters, segments)
    return [base + (i < extra) for i in range(segments)]


class _CoorDescent(autograd.Function):
    @staticmethod
    def forward(ctx, s, logk, use, schedule, segments):
        """s (r, n) float32 with masked entries 0, logk (r,), use (r, n) int8: entries in the sums."""
        rows, n = s.shape
        block = triton.next_power_of_2(n)
        warps = num_warps_for(block)
        eps = torch.tensor(schedule, dtype=torch.float32, device=s.device)
        parts = split_iterations(len(schedule) - 1, segments)

        b_saved = s.new_empty(len(parts), rows, n)  # b at the start of every segment
        b_saved[0] = -s
        a = s.new_empty(rows)
        b_last = s.new_empty(rows, n)
        start = 0
        for i, iters in enumerate(parts):
            b_out = b_saved[i + 1] if i + 1 < len(parts) else b_last
            _forward_kernel[(rows,)](s, use, logk, eps, b_saved[i], a, b_out, n, n, start, iters,
                                     BLOCK=block, num_warps=warps)
            start += iters
        y = ((s + a[:, None] + b_last) / schedule[-1]).exp() * use
        ctx.save_for_backward(s, logk, use, eps, b_saved, y)
        ctx.parts, ctx.block, ctx.warps, ctx.final_eps = parts, block, warps, schedule[-1]
        return y

    @staticmethod
    def backward(ctx, grad):
        s, logk, use, eps, b_saved, y = ctx.saved_tensors
        rows, n = s.shape
        gz = (grad.float() * y) / ctx.final_eps
        ds, gb = gz.clone(), gz.clone()
        ga = gz.sum(dim=-1)
        dlogk = torch.zeros_like(logk)
        zeros = torch.zeros_like(ga)
        starts = [sum(ctx.parts[:i]) for i in range(len(ctx.parts))]
        for i in reversed(range(len(ctx.parts))):
            _backward_kernel[(rows,)](s, use, logk, eps, b_saved[i], ds, gb,
                                      ga if i == len(ctx.parts) - 1 else zeros, dlogk,
                                      n, n, starts[i], ctx.parts[i], BLOCK=ctx.block, num_warps=ctx.warps)
        ds = ds - gb  # b_0 = -s
        return ds, dlogk, None, None, None


def interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def triton_coor_descent(s: Tensor, *, n_iters: int, k, eps: float = 0.1, eps_init: float | None = None,
                        eps_decay: float = 1., mask: Tensor | None = None,
                        checkpoint_segments: int | None = None) -> Tensor:
    """`coor_descent` fused into two Triton kernels. `checkpoint_segments` (default n_iters // 5)
    trades backward recomputation for memory: b is saved once per segment."""
    if not (s.is_cuda or interpreting()):
        return coor_descent(s, n_iters=n_iters, k=k, eps=eps, eps_init=eps_init, eps_decay=eps_decay, mask=mask)
    if s.shape[-1] > MAX_BLOCK:
        raise ValueError(f'rows of {s.shape[-1]} entries exceed the fused kernel limit of {MAX_BLOCK}: '
                         f'route in blocks (route_block_size={MAX_BLOCK} or less)')
    schedule = epsilon_schedule(n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay)
    segments = default(checkpoint_segments, max(1, n_iters // 5))
    shape = s.shape
    with torch.autocast(s.device.type, enabled=False):
        s = s.float().reshape(-1, shape[-1])
        logk = row_k(k, s.reshape(shape)).reshape(-1).clamp(min=1e-20).log().contiguous()
        if mask is None:
            use = torch.ones_like(s, dtype=torch.int8)
            valid = None
        else:
            valid = mask.reshape(-1, shape[-1])
            # a fully masked row keeps its entries in the sums (never a logsumexp over nothing) and scores 0
            use = (valid | ~valid.any(dim=-1, keepdim=True)).to(torch.int8)
            s = s.masked_fill(~valid, 0.)
        y = _CoorDescent.apply(s.contiguous(), logk, use.contiguous(), schedule, segments)
        if valid is not None:
            y = y.masked_fill(~valid, 0.)
    return y.reshape(shape)
