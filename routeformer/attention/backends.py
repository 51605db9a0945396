"""Attention backends: kernels over gathered groups, what each supports, and the one place that
chooses among them.

Axes: b batch, h heads, g groups, i queries per group, j keys per group, d head dim.
Every kernel takes q (b, h, g, i, d), k and v (b, h, g, j, d), an optional bool mask
broadcastable to (b, h, g, i, j) (True = may attend) and an optional additive bias of the same
shape, and returns (out, lse, weights). Each Backend pairs a kernel with its declaration:
`refusals(call)` lists why it cannot run a call (device, dtype, outputs, gradients, compilation),
and `choose` picks the backend of every executor call from them; `explain_backends` reports it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, einsum

from ..helpers import compiling, exists, max_neg_value
from . import flex


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


def flash_lse(q, k, v, mask, *, scale, bias=None, dropout_p=0., causal=False, need_lse=False, need_weights=False):
    """The CPU flash kernel with a differentiable log-sum-exp (multi-group merges): no (i, j)
    weights are kept for the backward pass. Without the log-sum-exp it is SDPA. What it cannot do
    (dropout, weights, other devices) its declaration (FlashCPU) refuses."""
    assert dropout_p == 0. and not need_weights, 'the CPU flash kernel applies no dropout and returns no weights'
    if not need_lse:
        return sdpa(q, k, v, mask, scale=scale, bias=bias, causal=causal)
    b, h, g, i, _ = q.shape
    j = k.shape[-2]
    if causal:
        causal_mask = torch.ones(i, j, dtype=torch.bool, device=q.device).tril(j - i)
        mask = causal_mask if mask is None else mask & causal_mask
    k, v = k.to(q.dtype), v.to(q.dtype)
    q, k, v = (rearrange(t, 'b h g n d -> (b h) g n d') for t in (q, k, v))
    out, lse = _FlashLSE.apply(q, k, v, mask, bias, scale, (b, h, g, i, j))
    return (rearrange(out, '(b h) g n d -> b h g n d', b=b), rearrange(lse, '(b h) g n -> b h g n', b=b), None)


# ---------------------------------------------------------------- declarations and selection

@dataclass(frozen=True)
class Call:
    """What one executor call asks of a backend; each backend's `refusals` are checked against it."""
    layout: str             # the plan's layout class: Dense, SlidingWindow, SortedBand, SelectedBlocks, Gathered
    device: str             # 'cpu', 'cuda', ...
    dtype: torch.dtype
    need_lse: bool          # several groups of a query merge by their log-sum-exp
    need_weights: bool      # the attention weights are kept (Recorder)
    dropout: bool           # attention dropout is on
    grad: bool              # gradients flow through the call
    compiling: bool         # inside a torch.compile graph
    bias_grad: bool         # logits added per pair that need a gradient (relative positions)
    decoding: bool = False  # one new query against a cache
    pairs: int = 0          # the (query, key) pairs of the call over the whole (sorted) sequence
    length: int = 0         # queries per sample and head


class Backend:
    """A kernel for gathered groups (`kernel`, the interface at the top of this module) and what it
    supports; `refusals(call)` says why it cannot run a call (empty when it can)."""
    name: str
    kernel = None

    def refusals(self, call: Call) -> list[str]:
        raise NotImplementedError

    def __repr__(self):
        return f'{type(self).__name__}({self.name!r})'


class Reference(Backend):
    """einsum + softmax: every layout, device and output; the test oracle."""
    name, kernel = 'reference', staticmethod(reference)

    def refusals(self, call):
        return []


class SDPA(Backend):
    """torch's scaled_dot_product_attention over the gathered groups."""
    name, kernel = 'sdpa', staticmethod(sdpa)

    def refusals(self, call):
        reasons = []
        if call.need_lse:
            reasons.append('it returns no log-sum-exp, which merging a query\'s groups needs (hash rounds, '
                           'overlapping clusters)')
        if call.need_weights:
            reasons.append('it returns no attention weights')
        return reasons


def fused_kernel_refusals(call: Call) -> list[str]:
    """What neither fused kernel (the CPU flash kernel, FlexAttention) does."""
    reasons = []
    if call.dropout:
        reasons.append('it applies no attention dropout')
    if call.need_weights:
        reasons.append('it returns no attention weights')
    if call.bias_grad:
        reasons.append('it takes no gradient for logits added per pair (relative positions)')
    return reasons


class FlashCPU(Backend):
    """torch's CPU flash kernel with a differentiable log-sum-exp; groups gathered by index take the
    executor's lean path through it (nothing gathered is kept for the backward pass). Without the
    log-sum-exp it is SDPA."""
    name, kernel = 'flash_lse', staticmethod(flash_lse)

    def refusals(self, call):
        reasons = []
        if call.device != 'cpu':
            reasons.append(f'it is the CPU kernel and the call is on {call.device}')
        if _flash_cpu_backward is None:
            reasons.append('this torch has no CPU flash kernel that returns the log-sum-exp')
        reasons += fused_kernel_refusals(call)
        if call.compiling and call.need_lse:
            reasons.append('inside a compiled graph its log-sum-exp is an opaque kernel; the reference '
                           'einsum, which the compiler fuses, takes its place')
        return reasons


# uncompiled FlexAttention materialises the scores of every pair: beyond this many (1 GiB of
# float32) it is refused instead of running out of memory
FLEX_CPU_PAIRS = 2 ** 28


class Flex(Backend):
    """FlexAttention (flex.py): one call per plan, skipping the key blocks no query sees."""
    name, kernel = 'flex', staticmethod(flex.groups)

    def refusals(self, call):
        reasons = []
        if not flex.available():
            reasons.append('this torch has no torch.nn.attention.flex_attention')
        reasons += fused_kernel_refusals(call)
        if call.decoding:
            reasons.append('a decoding step is one query against a cache whose length changes every step, '
                           'for which the compiled kernel would be compiled again each time')
        # selected blocks run as one call over the sequence (flex.runs_whole), with nothing to merge:
        # the log-sum-exp is for the groups per key block of the other backends
        need_lse = call.need_lse and call.layout != 'SelectedBlocks'
        if call.device == 'cpu':
            if not flex.compiled_on(torch.device('cpu'), call.dtype, need_lse) and call.pairs > FLEX_CPU_PAIRS:
                reasons.append(f'uncompiled FlexAttention (the CPU path for the log-sum-exp and float64) scores all '
                               f'{call.pairs:,} pairs, over the {FLEX_CPU_PAIRS:,} it is allowed')
            if call.grad:
                reasons.append('FlexAttention has no backward pass on the CPU (torch 2.13): train there with '
                               'backend="auto"')
            if call.compiling and (need_lse or call.dtype == torch.float64):
                reasons.append('compiled FlexAttention on the CPU returns no log-sum-exp and takes no float64')
        elif call.device != 'cuda':
            reasons.append(f'FlexAttention runs on CPU and CUDA, not {call.device}')
        return reasons


BACKENDS = {b.name: b for b in (Reference(), SDPA(), FlashCPU(), Flex())}

# 'auto' takes the first of these that supports the call. On the CPU the flash kernel (lean path)
# wins at training and at inference; FlexAttention serves CPU inference only, and measured no
# faster there (benchmarks/flex_cpu.py; MoBA's groups per key block through the flash kernel: 1.6x
# flex at 4,096 tokens, 3.6x at 16,384). On a GPU one FlexAttention call per plan replaces the
# gathered groups; dense attention keeps flash SDPA.
AUTO_ORDER = dict(cpu=('flash_lse', 'sdpa', 'reference'), cuda=('flex', 'sdpa', 'reference'))
AUTO_ORDER_DENSE = dict(cuda=('sdpa', 'flex', 'reference'))


@dataclass
class Choice:
    """The backend a call runs on, and why every other one was passed over."""
    backend: Backend
    call: Call
    rejected: dict[str, list[str]]
    layer: str = ''

    def __str__(self):
        why = '; '.join(f'{name}: {", ".join(reasons)}' for name, reasons in self.rejected.items())
        where = f'{self.layer}: ' if self.layer else ''
        return f'{where}{self.call.layout} -> {self.backend.name}' + (f' (passed over: {why})' if why else '')


def check_name(name: str) -> None:
    if name not in ('auto', *BACKENDS):
        raise ValueError(f'unknown attention backend {name!r}; choose one of auto, {", ".join(BACKENDS)}')


def choose(name: str, call: Call) -> Choice:
    """The one place a backend is selected. A named backend that cannot run the call is an error
    that says why, except a decoding step, which then runs where 'auto' puts it; 'auto' takes the
    first in AUTO_ORDER that can. The Recorder's calls (weights
    kept) always run the reference, the backend that returns them."""
    check_name(name)
    if call.need_weights:
        name = 'reference'
    if name != 'auto':
        reasons = BACKENDS[name].refusals(call)
        if reasons and call.decoding:  # a decoding step the named backend refuses: auto's choice, and why
            choice = choose('auto', call)
            return Choice(choice.backend, call, {name: reasons, **choice.rejected})
        if reasons:
            raise ValueError(f'attention backend {name!r} cannot run this {call.layout} call: {"; ".join(reasons)}. '
                             f'Use backend="auto", or see routeformer.explain_backends')
        return Choice(BACKENDS[name], call, {})
    order = AUTO_ORDER.get(call.device, ('sdpa', 'reference'))
    if call.layout == 'Dense':
        order = AUTO_ORDER_DENSE.get(call.device, order)
    rejected = {}
    for candidate in order:
        reasons = BACKENDS[candidate].refusals(call)
        if not reasons:
            return Choice(BACKENDS[candidate], call, rejected)
        rejected[candidate] = reasons
    return Choice(BACKENDS['reference'], call, rejected)  # the reference refuses nothing


_explained: list | None = None


@contextmanager
def explaining():
    """Collects the Choice of every executor call made inside it (outside compiled graphs)."""
    global _explained
    outer, _explained = _explained, []
    try:
        yield _explained
    finally:
        _explained = outer


def note(choice: Choice, executor) -> None:
    if _explained is not None and not compiling():
        _explained.append((executor, choice))


def explain_backends(model, *args, **kwargs) -> list[Choice]:
    """Runs `model(*args, **kwargs)` and returns the Choice of every attention call it made: which
    layer, which layout, which backend, and why the others were passed over. The choice depends on
    the call (device, dtype, training or eval, gradients on or off), so run it as you will."""
    names = {id(m): name for name, m in model.named_modules()}
    with explaining() as log:
        model(*args, **kwargs)
    return [Choice(c.backend, c.call, c.rejected, layer=names.get(id(executor), '')) for executor, c in log]
