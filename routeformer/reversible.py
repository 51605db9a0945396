"""Reversible execution with exact gradients (RevNet / Reformer).

The forward pass runs every block without storing activations. The backward pass walks the
blocks in reverse, reconstructs each block's inputs from its outputs, re-runs the block with
autograd on, and backpropagates through it. Three things make the recompute identical to the
forward pass:
- RNG state (dropout, random routing) recorded before each function and replayed;
- routing decisions: the forward pass stores every router's plan in `ctx.plans`, and the
  recompute runs with `ctx.recompute=True`, so routers replay their plan and skip stateful
  updates (k-means EMA);
- layer dropout: the kept layers are drawn once, before the stack runs.
Parameters and the cross-attention context are explicit inputs of the autograd Function, so
they get gradients even when the stack's input does not require grad, and aux losses returned
by the blocks are differentiated too.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .context import LayerContext
from .helpers import compiling, exists


class RNGState:
    """Records the CPU (and the input's CUDA device) RNG state, and replays it."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
        self.device = device

    def replay(self):
        devices = [self.device] if exists(self.cuda) else []
        fork = torch.random.fork_rng(devices=devices)
        fork.__enter__()
        torch.set_rng_state(self.cpu)
        if exists(self.cuda):
            torch.cuda.set_rng_state(self.cuda, self.device)
        return fork


def _reusable(buffer: Tensor, like: Tensor, *others: Tensor) -> bool:
    """Whether `buffer`, a result the caller no longer needs, may hold a result of `like`'s shape
    and dtype: it must share memory with neither `like` nor `others` (a branch that returns its
    input, or a gradient passed through unchanged)."""
    return (buffer.shape == like.shape and buffer.dtype == like.dtype and buffer.is_contiguous()
            and all(buffer.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (like, *others)))


# The residual sums and differences below are written into the branch output they consume when it
# is free to take them: at long lengths every new activation-sized buffer is fresh memory that the
# kernel maps in page by page (a 64 MiB buffer costs several times its arithmetic), and the
# branch output is dead once summed.

def _add(x: Tensor, out: Tensor, *others: Tensor) -> Tensor:
    """x + out (no grad), written into `out` when it is free (see _reusable)."""
    return out.detach().add_(x) if _reusable(out, x, *others) else x + out


def _sub(y: Tensor, out: Tensor, *others: Tensor) -> Tensor:
    """y - out (no grad), written into `out` when it is free."""
    return torch.sub(y, out, out=out.detach()) if _reusable(out, y, *others) else y - out


def _run(fn, x, ctx, state: RNGState | None):
    if state is None:
        return fn(x, ctx)
    fork = state.replay()
    try:
        return fn(x, ctx)
    finally:
        fork.__exit__(None, None, None)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x1, x2, context, run, *params):
        with torch.no_grad():
            aux = x1.new_zeros(())
            for step in run.steps:
                step['f_state'] = RNGState(x1.device)
                out, a_f = step['block'].f(x2, step['ctx'])
                x1 = _add(x1, out, x2)
                step['g_state'] = RNGState(x1.device)
                out, a_g = step['block'].g(x1, step['ctx'])
                x2 = _add(x2, out, x1)
                aux = aux + a_f + a_g
        fctx.run = run
        fctx.save_for_backward(x1, x2)
        return x1, x2, aux

    @staticmethod
    def backward(fctx, dy1, dy2, daux):
        run = fctx.run
        y1, y2 = fctx.saved_tensors
        params = run.params
        grads = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        context = run.context
        dcontext = torch.zeros_like(context) if exists(context) and context.requires_grad else None
        daux = daux if exists(daux) else y1.new_zeros(())

        def backprop(outputs, inputs, grad_outputs):
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
            wrt = [inputs] + [p for p in params if p.requires_grad] + ([run.context_leaf] if exists(dcontext) else [])
            got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            d_input, rest = got[0], list(got[1:])
            for idx, p in enumerate(params):
                if p.requires_grad:
                    g = rest.pop(0)
                    if exists(g):
                        grads[idx] += g
            if exists(dcontext):
                g = rest.pop(0)
                if exists(g):
                    dcontext.add_(g)
            return d_input if exists(d_input) else torch.zeros_like(inputs)

        for step in reversed(run.steps):
            ctx = replace(step['ctx'], recompute=True, context=run.context_leaf)
            block = step['block']
            with torch.enable_grad(), run.autocast():
                y1_leaf = y1.detach().requires_grad_()
                g_out, g_aux = _run(block.g, y1_leaf, ctx, step['g_state'])
                dy1 = _add(dy1, backprop((g_out, g_aux), y1_leaf, (dy2, daux)), dy2)
            with torch.no_grad():
                x2 = _sub(y2, g_out, y1)
            with torch.enable_grad(), run.autocast():
                x2_leaf = x2.detach().requires_grad_()
                f_out, f_aux = _run(block.f, x2_leaf, ctx, step['f_state'])
                dx2 = _add(dy2, backprop((f_out, f_aux), x2_leaf, (dy1, daux)), dy1)
            with torch.no_grad():
                x1 = _sub(y1, f_out, x2)
            y1, y2, dy2 = x1, x2, dx2

        return dy1, dy2, dcontext, None, *grads


class _Run:
    """What the autograd Function needs from the forward pass besides tensors."""

    def __init__(self, layers, ctx: LayerContext, params, context, device_type: str):
        self.steps = [dict(block=block, ctx=ctx.at_layer(i)) for i, block in layers]
        self.params = params
        self.context = context
        self.context_leaf = context.detach().requires_grad_() if exists(context) and context.requires_grad else context
        # the recompute must run in the precision the forward ran in
        self.device_type = device_type
        self.autocast_enabled = torch.is_autocast_enabled(device_type)
        self.autocast_dtype = torch.get_autocast_dtype(device_type)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_enabled)


def reversible_stack(x1: Tensor, x2: Tensor, layers: list, ctx: LayerContext, *,
                     recompute_in_backward: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Runs `layers` ((index, block) pairs) as reversible couplings; returns (x1, x2, aux_loss).

    Traced by torch.compile, the couplings run as plain autograd (`recompute_in_backward=False`):
    the same outputs and gradients, but activations are kept, because the recompute reads and
    replays the RNG state and calls autograd inside the backward pass, which a graph cannot hold."""
    if not recompute_in_backward or compiling():
        aux = x1.new_zeros(())
        for i, block in layers:
            layer_ctx = ctx.at_layer(i)
            out, a_f = block.f(x2, layer_ctx)
            x1 = x1 + out
            out, a_g = block.g(x1, layer_ctx)
            x2 = x2 + out
            aux = aux + a_f + a_g
        return x1, x2, aux

    # unique parameters of the blocks that run (a tied block appears once)
    params = list({id(p): p for _, block in layers for p in block.parameters()}.values())
    ctx = replace(ctx, plans={} if ctx.plans is None else ctx.plans)
    run = _Run(layers, ctx, params, ctx.context, x1.device.type)
    context = ctx.context if exists(ctx.context) else x1.new_zeros(())
    return _ReversibleFunction.apply(x1, x2, context, run, *params)
