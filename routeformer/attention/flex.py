"""FlexAttention (torch.nn.attention.flex_attention) for routed plans: one kernel call per plan that
skips the key blocks a query must not see.

Two forms. Plans whose every query sees one run of key slots (`ranges`: dense, sliding windows, the
causal sorted band of LSH and k-means routing) run over the (sorted) sequence itself with a
BlockMask built from the runs' block bounds (`BlockMask.from_kv_blocks`, never by evaluating a
mask over the whole query x key grid) and a `mask_mod` that reads the runs. MoBA's selected blocks
run over the sequence too, from the selected block ids. Every other plan (`groups`) runs as one
call over its gathered groups, groups on the kernel's head axis, with the executor's mask.

A `mask_mod` is exact by itself: uncompiled FlexAttention evaluates it at every pair and ignores
the block mask, which only skips work. Compiled FlexAttention on a CPU runs forward only and
returns no log-sum-exp (torch 2.13), so on a CPU a call that needs the log-sum-exp, or that is in
float64, runs uncompiled, which materialises the scores of every pair: fine at test sizes, the
backend's declaration keeps it out of training there.

Axes: b batch, h heads, n query slots, m key slots, d head dim, g groups, i queries and j keys per
group, c candidate blocks, k selected blocks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from ..helpers import compiling, exists
from .plan import Dense, RoutePlan, SelectedBlocks, SlidingWindow, SortedBand, scatter

try:
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: the backend declares itself unavailable
    AuxRequest = BlockMask = flex_attention = None

# the kernel's block of query and key slots
BLOCK = 128
# compiled kernels kept per process (see `kernel`)
RECOMPILE_LIMIT = 256
_compiled = None


def available() -> bool:
    return flex_attention is not None


def compiled_on(device: torch.device, dtype: torch.dtype, need_lse: bool) -> bool:
    """Whether a call outside a compiled graph runs the compiled kernel (otherwise the uncompiled
    reference implementation): always on a GPU; on a CPU, where the compiled kernel has no
    log-sum-exp and no float64, only without them."""
    return device.type != 'cpu' or not (need_lse or dtype == torch.float64)


def kernel(q: Tensor, k: Tensor, v: Tensor, block_mask, *, scale: float, need_lse: bool, score_mod=None):
    """flex_attention on (b, h, n|m, d) tensors: (out (b, h, n, d), lse (b, h, n) or None)."""
    global _compiled
    extra = dict(return_aux=AuxRequest(lse=True)) if need_lse else {}
    args = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, **extra)
    if compiling():
        result = flex_attention(q, k, v, **args)
    elif compiled_on(q.device, q.dtype, need_lse):
        if _compiled is None:
            _compiled = torch.compile(flex_attention, dynamic=False)
        # every shape, mask kind and captured size is a graph of its own: past torch's default of 8
        # per function (a process that runs several models or lengths) the compiler would silently
        # run the uncompiled implementation, which scores every pair
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            result = _compiled(q, k, v, **args)
    else:
        with warnings.catch_warnings():  # the uncompiled path is chosen on purpose here
            warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')
            result = flex_attention(q, k, v, **args)
    if need_lse:
        out, aux = result
        return out, aux.lse
    return result, None


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def from_block_flags(flags: Tensor, mask_mod, seq_lengths: tuple[int, int]):
    """BlockMask from (b, h, query blocks, key blocks) bool flags: each query block computes the
    key blocks it flags."""
    count = flags.sum(dim=-1, dtype=torch.int32)
    order = flags.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(count, order, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=seq_lengths)


def range_flags(lo: Tensor, hi: Tensor, n_kv: int) -> Tensor:
    """(b, h, query blocks, key blocks) bool: the key blocks that the runs [lo, hi) (b, h, n) of a
    query block's slots touch (an empty run, lo >= hi, touches none)."""
    b, h, n = lo.shape
    empty = lo >= hi
    pad = blocks(n) * BLOCK - n
    first = F.pad(lo.masked_fill(empty, n_kv), (0, pad), value=n_kv)
    last = F.pad(hi.masked_fill(empty, 0), (0, pad), value=0)
    first = rearrange(first, 'b h (q s) -> b h q s', s=BLOCK).amin(dim=-1) // BLOCK
    last = (rearrange(last, 'b h (q s) -> b h q s', s=BLOCK).amax(dim=-1) + BLOCK - 1) // BLOCK
    key_blocks = torch.arange(blocks(n_kv), device=lo.device)
    return (key_blocks >= first[..., None]) & (key_blocks < last[..., None])


def with_memory(k: Tensor, v: Tensor, mem_kv, flags: Tensor) -> tuple[Tensor, Tensor, int, Tensor]:
    """Memory key/values before the sequence's keys, in blocks of their own that every query block
    computes: (k, v, key slots before the sequence, flags with the memory blocks first)."""
    if mem_kv is None:
        return k, v, 0, flags
    b = k.shape[0]
    m = mem_kv[0].shape[-2]
    front = blocks(m) * BLOCK
    mk, mv = (F.pad(repeat(t.to(k.dtype), 'h m d -> b h m d', b=b), (0, 0, 0, front - m)) for t in mem_kv)
    flags = torch.cat((flags.new_ones(*flags.shape[:-1], front // BLOCK), flags), dim=-1)
    return torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2), front, flags


def attend_ranges(q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, *, scale: float, need_lse: bool,
                  mem_kv=None, key_valid: Tensor | None = None, pair_mask: Tensor | None = None):
    """Query slot t of q (b, h, n, d) attends key slots lo[t] <= s < hi[t] of k, v (b, h, m, d),
    lo and hi (b, h, n) long, and every memory key/value ((h, m_mem, d) each); `key_valid` (b, m)
    and `pair_mask` (b, h, n, m) bool narrow the runs. Returns (out (b, h, n, d), lse or None); a
    query with nothing to attend gets zeros and a log-sum-exp of -inf."""
    n, n_kv = q.shape[-2], k.shape[-2]
    flags = range_flags(lo, hi, n_kv)
    k, v, front, flags = with_memory(k.to(q.dtype), v.to(q.dtype), mem_kv, flags)
    n_mem = 0 if mem_kv is None else mem_kv[0].shape[-2]

    def mask_mod(b, h, q_idx, kv_idx):
        t, s = q_idx.clamp(max=n - 1), (kv_idx - front).clamp(0, n_kv - 1)
        seen = (kv_idx >= front) & (kv_idx - front >= lo[b, h, t]) & (kv_idx - front < hi[b, h, t])
        if exists(key_valid):
            seen = seen & key_valid[b, s]
        if exists(pair_mask):
            seen = seen & pair_mask[b, h, t, s]
        return seen | (kv_idx < n_mem) if n_mem else seen

    block_mask = from_block_flags(flags, mask_mod, (n, k.shape[-2]))
    return kernel(q, k, v, block_mask, scale=scale, need_lse=need_lse)


def sequence_ranges(plan: RoutePlan, n: int, n_kv: int, causal: bool, device) -> tuple[Tensor, Tensor]:
    """(lo, hi), each (1, 1, n): the key run of every query of a Dense or SlidingWindow plan."""
    t = torch.arange(n, device=device)
    if isinstance(plan.layout, SlidingWindow):
        start = t // plan.layout.window * plan.layout.window
        lo = (start - plan.layout.back).clamp(min=0)
        hi = (start + plan.layout.window + plan.layout.forward).clamp(max=n_kv)
    else:
        lo, hi = torch.zeros_like(t), torch.full_like(t, n_kv)
    if causal:
        hi = torch.minimum(hi, t + plan.q_offset + 1)
    return lo.view(1, 1, n), hi.view(1, 1, n)


def runs_whole(plan: RoutePlan, *, key_mask, exclude_self: bool, rel_pos) -> bool:
    """Whether `plan` runs over the sequence (its queries' key runs or selected blocks) rather than
    as gathered groups: no gates, bias or relative positions to apply per pair, and a layout whose
    admitted keys the runs state exactly."""
    if exists(rel_pos) or any(exists(t) for t in (plan.bias, plan.k_gate, plan.kv_gate, plan.q_gate)):
        return False
    layout = plan.layout
    if isinstance(layout, (Dense, SlidingWindow)):
        # a shared-QK query may see its own key only when nothing else: not a run
        return not exclude_self and (plan.mask is None or isinstance(layout, Dense))
    if isinstance(layout, SortedBand):
        return not layout.cyclic and exists(plan.span) and key_mask is None
    if isinstance(layout, SelectedBlocks):  # the blocks say it all; the plan's own mask is its gathered form
        return not exclude_self and plan.q_offset == 0
    return False


def attend_whole(q: Tensor, k: Tensor, v: Tensor, plan: RoutePlan, *, causal: bool, key_mask, mem_kv,
                 exclude_self: bool, need_lse: bool) -> Tensor:
    """A plan that `runs_whole`: its output (b, h, n, d), the sorted band's rounds merged by their
    log-sum-exp."""
    from .executor import span_bounds  # the executor's reading of spans, one copy

    b, h, n, _ = q.shape
    n_kv, scale = k.shape[-2], q.shape[-1] ** -0.5
    layout = plan.layout
    if isinstance(layout, SortedBand):
        # the band over the sorted sequence: keys of chunk c are chunks c - 1 and c of the same order
        g, w = plan.q_index.shape[-2:]
        # -1: a slot past the sequence (k-means pads it to a multiple of the chunk) in a bucket of its
        # own, which no real query's span reaches; its output is dropped by the scatter
        order = rearrange(plan.q_index.expand(b, h, g, w), 'b h g i -> b h (g i)').clamp(min=0)
        qs, ks, vs = (t.gather(2, repeat(order, 'b h n -> b h n d', d=t.shape[-1])) for t in (q, k, v))
        lo, hi = span_bounds(plan.span, exclude_self=exclude_self, has_memory=exists(mem_kv))
        base = rearrange(torch.arange(g, device=q.device) - 1, 'g -> g 1 1') * w
        lo, hi = (rearrange((base + t).expand(b, h, g, w, 1), 'b h g i 1 -> b h (g i)') for t in (lo, hi))
        out, lse = attend_ranges(qs, ks, vs, lo, hi, scale=scale, need_lse=need_lse, mem_kv=mem_kv)
        return scatter([rearrange(out, 'b h (g i) d -> b h g i d', g=g)], plan, n,
                       lse=None if lse is None else rearrange(lse, 'b h (g i) -> b h g i', g=g))
    if isinstance(layout, SelectedBlocks):
        out, _ = attend_selected_blocks(q, k, v, layout, causal=causal, key_mask=key_mask, mem_kv=mem_kv,
                                        need_lse=False)
    else:
        lo, hi = (t.expand(b, h, n) for t in sequence_ranges(plan, n, n_kv, causal, q.device))
        pair_mask = None if plan.mask is None else plan.mask[:, :, 0].expand(b, h, n, n_kv)
        out, _ = attend_ranges(q, k, v, lo, hi, scale=scale, need_lse=False, mem_kv=mem_kv,
                               key_valid=key_mask, pair_mask=pair_mask)
    return out  # queries in sequence order, each in one group: nothing to merge


def attend_selected_blocks(q: Tensor, k: Tensor, v: Tensor, layout: SelectedBlocks, *, causal: bool, key_mask,
                           mem_kv, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """MoBA: query t attends the tokens of its selected blocks (layout.blocks (b|1, h|1, n, k)),
    causally. The kernel's key blocks of a query block are the union of its queries' selections."""
    b, h, n, _ = q.shape
    n_kv, size = k.shape[-2], layout.block_size
    chosen = layout.blocks.expand(b, h, n, -1)
    # (b, h, n, c): which of the sequence's blocks each query selected
    picked = torch.zeros(b, h, n, -(-n_kv // size) + 1, dtype=torch.bool, device=q.device)
    picked = picked.scatter_(-1, chosen.masked_fill(chosen < 0, picked.shape[-1] - 1), True)[..., :-1]
    # a kernel key block is computed by a query block when any of its queries selected a block that
    # overlaps it: the (c, kernel key blocks) overlaps, block against block, never token against token
    starts = torch.arange(picked.shape[-1], device=q.device) * size
    kernel_start = torch.arange(blocks(n_kv), device=q.device) * BLOCK
    overlaps = (starts[:, None] < kernel_start + BLOCK) & (kernel_start < starts[:, None] + size)
    per_query = (picked.to(torch.float32) @ overlaps.to(torch.float32)) > 0                  # (b, h, n, kernel blocks)
    flags = rearrange(F.pad(per_query, (0, 0, 0, blocks(n) * BLOCK - n)), 'b h (q s) c -> b h q s c',
                      s=BLOCK).any(dim=-2)
    k, v, front, flags = with_memory(k.to(q.dtype), v.to(q.dtype), mem_kv, flags)
    n_mem = 0 if mem_kv is None else mem_kv[0].shape[-2]

    def mask_mod(b_, h_, q_idx, kv_idx):
        t, s = q_idx.clamp(max=n - 1), (kv_idx - front).clamp(0, n_kv - 1)
        seen = (kv_idx >= front) & picked[b_, h_, t, s // size]
        if causal:
            seen = seen & (s <= t)
        if exists(key_mask):
            seen = seen & key_mask[b_, s]
        return seen | (kv_idx < n_mem) if n_mem else seen

    block_mask = from_block_flags(flags, mask_mod, (n, k.shape[-2]))
    return kernel(q, k, v, block_mask, scale=q.shape[-1] ** -0.5, need_lse=need_lse)


def groups(q, k, v, mask, *, scale, bias=None, dropout_p=0., causal=False, need_lse=False, need_weights=False):
    """The kernel interface of backends.py over gathered groups: q (b, h, g, i, d), k and v
    (b, h, g, j, d), mask and bias broadcastable to (b, h, g, i, j); one call with batch and heads
    folded into the kernel's batch axis and groups on its head axis, the mask read per pair."""
    assert dropout_p == 0. and not need_weights, 'FlexAttention applies no dropout and returns no weights'
    b, h, g, i, _ = q.shape
    j = k.shape[-2]
    q, k, v = (rearrange(t.to(q.dtype), 'b h g n d -> (b h) g n d') for t in (q, k, v))
    if exists(mask):
        mask = rearrange(mask.expand(b, h, g, i, j), 'b h g i j -> (b h) g i j')
    if exists(bias):
        bias = rearrange(bias.expand(b, h, g, i, j), 'b h g i j -> (b h) g i j')

    def mask_mod(bh, group, q_idx, kv_idx):
        t, s = q_idx.clamp(max=i - 1), kv_idx.clamp(max=j - 1)
        seen = kv_idx - (j - i) <= q_idx if causal else kv_idx >= 0
        return seen & mask[bh, group, t, s] if exists(mask) else seen

    def score_mod(score, bh, group, q_idx, kv_idx):
        return score + bias[bh, group, q_idx.clamp(max=i - 1), kv_idx.clamp(max=j - 1)].to(score.dtype)

    every = torch.ones(b * h, g, blocks(i), blocks(j), dtype=torch.bool, device=q.device)
    block_mask = from_block_flags(every, mask_mod, (i, j))
    out, lse = kernel(q, k, v, block_mask, scale=scale, need_lse=need_lse,
                      score_mod=score_mod if exists(bias) else None)
    return (rearrange(out, '(b h) g n d -> b h g n d', b=b),
            None if lse is None else rearrange(lse, '(b h) g n -> b h g n', b=b), None)
