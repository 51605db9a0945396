"""The one executor: gather q/k/v by a RoutePlan, build the mask, attend inside every group in
batched calls (one per piece of groups), and scatter back. On a CPU, groups gathered by index take
the lean path: one autograd node over all pieces that gathers and masks each piece again in the
backward pass instead of keeping the gathered copies (GatheredPieces, backends.flash_pieces).

Axes: b batch, h heads, n sequence, d head dim, g groups, i queries per group, j keys per group,
m memory key/values.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from ..helpers import any_true, compiling, exists
from . import backends, flex
from .plan import RoutePlan, SelectedBlocks, SlidingWindow, SortedBand, flat_rows, gather, merge_shares, positions_of, scatter
from .recording import GroupWeights


def gather_queries(q: Tensor, plan: RoutePlan, bounds: list[tuple[int, int]]) -> list[Tensor]:
    """The (b, h, g, i, d) queries of each piece of groups start:stop in `bounds`."""
    if not plan.contiguous_queries:
        return gather(q, plan.q_index, bounds)
    if plan.q_index is None:
        grouped = rearrange(q, 'b h n d -> b h 1 n d')
    else:  # a padded view, sliced per piece
        g, i = plan.q_index.shape[-2:]
        grouped = rearrange(F.pad(q, (0, 0, 0, g * i - q.shape[-2])), 'b h (g i) d -> b h g i d', g=g)
    return [grouped[:, :, start:stop] for start, stop in bounds]


def gather_keys(t: Tensor, plan: RoutePlan, bounds: list[tuple[int, int]]) -> list[Tensor]:
    """The (b, h, g, j, d) keys (or values) of each piece of groups start:stop in `bounds`."""
    if plan.kv_index is None:
        grouped = rearrange(t, 'b h n d -> b h 1 n d')
    elif isinstance(plan.layout, SlidingWindow):
        # contiguous windows (local attention): a strided view instead of an index gather, whose
        # backward would be a slow scatter-add; slots outside the sequence read zero padding
        window, back, forward = plan.layout.window, plan.layout.back, plan.layout.forward
        padded = F.pad(t, (0, 0, back, forward))
        grouped = rearrange(padded.unfold(-2, back + window + forward, window), 'b h g d j -> b h g j d')
    else:
        return gather(t, plan.kv_index, bounds)
    return [grouped[:, :, start:stop] for start, stop in bounds]


def span_bounds(span: Tensor, *, exclude_self: bool = False, has_memory: bool = False) -> tuple[Tensor, Tensor]:
    """(lo, hi), each (b|1, h|1, g, i, 1), of key spans (b|1, h|1, g, i, 2): a query attends slots
    lo <= slot < hi. With `exclude_self`, its own key, which ends its span (RoutePlan.span), is
    dropped when anything else is visible, memory key/values included."""
    lo, hi = (rearrange(t, '... i -> ... i 1') for t in span.unbind(dim=-1))
    if exclude_self:
        hi = hi - 1 if has_memory else hi - (hi - lo > 1).long()
    return lo, hi


def in_span(lo: Tensor, hi: Tensor, j: int) -> Tensor:
    """(b|1, h|1, g, i, j) bool: key slot in [lo, hi), from bounds (b|1, h|1, g, i, 1). Rows of the
    (j + 1, j) table `slot >= r`: "at least lo and not at least hi" is two row gathers and one
    comparison, several times faster than comparing every slot with broadcast bounds."""
    at_least = torch.arange(j, device=lo.device) >= torch.arange(j + 1, device=lo.device)[:, None]
    rows = (rearrange(t, '... i 1 -> ... i').clamp(0, j) for t in (lo, hi))
    return torch.gt(*(at_least[r] for r in rows))


def build_mask(plan: RoutePlan, *, q_len: int, kv_len: int, causal: bool, key_mask: Tensor | None,
               exclude_self: bool, has_memory: bool, device) -> tuple[Tensor | None, Tensor | None]:
    """The admissibility mask of every gathered (query, key) pair, None when everything is allowed:
    the plan's key spans, or predicates over the original positions of the gathered slots.

    A row with no admissible key (a padded query, a routed query whose cluster holds no earlier
    key) would be undefined: the mask opens it in full, and it is returned in `empty` (..., i, 1)
    (None when there is none, as always with memory key/values) for the caller to zero its output,
    so that it contributes nothing and sees no later key. Returns (mask, empty)."""
    if exists(plan.span) and key_mask is None:
        lo, hi = span_bounds(plan.span, exclude_self=exclude_self, has_memory=has_memory)
        mask, empty = in_span(lo, hi, plan.kv_index.shape[-1]), lo >= hi
    else:
        mask = masked_positions(plan, q_len=q_len, kv_len=kv_len, causal=causal, key_mask=key_mask,
                                exclude_self=exclude_self, has_memory=has_memory, device=device)
        empty = None if mask is None or has_memory else ~mask.any(dim=-1, keepdim=True)
    if empty is None or has_memory or not any_true(empty):
        return mask, None
    return mask | empty, empty


def masked_positions(plan: RoutePlan, *, q_len: int, kv_len: int, causal: bool, key_mask: Tensor | None,
                     exclude_self: bool, has_memory: bool, device) -> Tensor | None:
    """`build_mask` as predicates over the original positions of the gathered slots."""
    q_pos = positions_of(plan.q_index, q_len, device) + plan.q_offset
    kv_pos = positions_of(plan.kv_index, kv_len, device)
    q_pos, kv_pos = rearrange(q_pos, '... i -> ... i 1'), rearrange(kv_pos, '... j -> ... 1 j')

    mask = plan.mask
    def both(new):
        return new if mask is None else mask & new

    if exists(plan.span):  # valid and causal slots by construction
        mask = in_span(*span_bounds(plan.span), plan.kv_index.shape[-1])
    elif exists(plan.kv_index):
        mask = both(kv_pos >= 0)
    if causal and plan.span is None:
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


def admit_memory(mask: Tensor | None, bias: Tensor | None, n_mem: int, n_keys: int,
                 mem_bias: Tensor | None = None, dtype=None) -> tuple[Tensor | None, Tensor | None]:
    """Memory key/values come first on the key axis, before `n_keys` gathered keys: every query may
    attend them, with no bias but the plan's `mem_bias` (b|1, h|1, g, i), in `dtype`, where it has one."""
    if exists(mask):
        mask = F.pad(mask, (n_mem, 0), value=True)
    if exists(mem_bias):
        keys = rearrange(mem_bias.to(dtype), '... i -> ... i 1')
        bias = keys.new_zeros(()).expand(*keys.shape[:-1], n_keys) if bias is None else bias
        shape = torch.broadcast_shapes(keys.shape[:-1], bias.shape[:-1])
        bias = torch.cat((keys.expand(*shape, n_mem), bias.expand(*shape, bias.shape[-1])), dim=-1)
    elif exists(bias):
        bias = F.pad(bias, (n_mem, 0), value=0.)
    return mask, bias


# Groups whose keys are gathered by index are attended in pieces of at most this many bytes of
# float (i, j) logits. The pieces' gathered keys, masks and kernel buffers are then small enough for
# the C allocator to reuse their memory from one piece to the next, where one call over all groups
# would page-fault every large buffer in afresh (a Reformer training step at 16k tokens on a CPU
# runs about 1.4x faster in pieces), and the transient memory of a call stays bounded. Contiguous
# windows are views with a mask shared by every head: they gain nothing from pieces, one call.
PIECE_BYTES = 8 * 2 ** 20


def slice_groups(plan: RoutePlan, start: int, stop: int) -> RoutePlan:
    """The plan of groups start:stop; tensors of size 1 on the group axis broadcast and stay whole."""
    def cut(t):
        return t[:, :, start:stop] if isinstance(t, Tensor) and t.ndim >= 3 and t.shape[2] > 1 else t
    return replace(plan, q_index=cut(plan.q_index), kv_index=cut(plan.kv_index), mask=cut(plan.mask),
                   span=cut(plan.span), bias=cut(plan.bias), k_gate=cut(plan.k_gate), kv_gate=cut(plan.kv_gate),
                   q_gate=cut(plan.q_gate), mem_bias=cut(plan.mem_bias))


def piece_bounds(plan: RoutePlan, q: Tensor) -> list[tuple[int, int]]:
    """Group ranges of at most PIECE_BYTES of float32 logits (b, h, g, i, j), or of gathered keys
    (b, h, g, j, d) where groups have fewer queries than a head has features (one query per group:
    MoBA, DSA), each; one range unless keys are gathered by index."""
    g = 1 if plan.q_index is None else plan.q_index.shape[-2]
    if plan.q_index is None or plan.kv_index is None or isinstance(plan.layout, SlidingWindow):
        return [(0, g)]
    b, h = q.shape[:2]
    i, j = plan.q_index.shape[-1], plan.kv_index.shape[-1]
    pieces = min(g, -(-b * h * g * max(i, q.shape[-1]) * j * 4 // PIECE_BYTES))
    bounds = [round(p * g / pieces) for p in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class GatheredPieces:
    """The kernel inputs of every piece of a plan whose queries and keys are gathered by index, built
    from the ungathered q ((b n h), d), k and v ((b n_kv h), d) and memory key/values (h, m, d) by
    `inputs`, alike in the forward and the backward pass of backends.flash_pieces, which therefore
    keeps no gathered rows and no masks; `accumulate` adds a piece's gradients back by the same rows.
    Pieces are ((b h), g, i|j, d), the layout of the flash kernel (groups on its head axis)."""

    def __init__(self, plan: RoutePlan, bounds: list[tuple[int, int]], *, b: int, h: int, q_len: int, kv_len: int,
                 n_mem: int, scale: float, **mask_args):
        q_rows = flat_rows(plan.q_index, b, h, q_len)
        self.q_rows = [q_rows[:, :, start:stop].flatten() for start, stop in bounds]
        # look-one-back (causal sort-and-chunk): the keys of group g are the queries of groups g - 1
        # and g, so a piece gathers its groups' rows once, and one group before them (group 0 twice
        # for the first), and its keys are overlapping windows of those rows: half the gathering.
        # Where group g - 1 is of another round, or the stand-in, its slots are outside every span.
        self.look_back = exists(plan.span) and isinstance(plan.layout, SortedBand) and not plan.layout.cyclic
        if self.look_back:
            kv_rows = flat_rows(plan.q_index, b, h, kv_len)
            kv_rows = torch.cat((kv_rows[:, :, :1], kv_rows), dim=2)  # group g - 1 at g; group 0 as the stand-in
            self.kv_rows = [kv_rows[:, :, start:stop + 1].flatten() for start, stop in bounds]
        else:
            kv_rows = flat_rows(plan.kv_index, b, h, kv_len)
            self.kv_rows = [kv_rows[:, :, start:stop].flatten() for start, stop in bounds]
        self.plans = [slice_groups(plan, start, stop) for start, stop in bounds]
        self.count, self.scale, self.b, self.h, self.n_mem = len(bounds), scale, b, h, n_mem
        self.i, self.j = plan.q_index.shape[-1], plan.kv_index.shape[-1]
        self.mask_args = dict(q_len=q_len, kv_len=kv_len, has_memory=n_mem > 0, **mask_args)

    def keys(self, t: Tensor, p: int) -> Tensor:
        """The keys (or values) of piece p, ((b h), g, j, d)."""
        picked = t.index_select(0, self.kv_rows[p])
        bh, d = self.b * self.h, t.shape[-1]
        if not self.look_back:
            return picked.view(bh, -1, self.j, d)
        w, rows = self.i, picked.shape[0] // bh
        return picked.as_strided((bh, rows // w - 1, 2 * w, d), (rows * d, w * d, d, 1))

    def inputs(self, p: int, q: Tensor, k: Tensor, v: Tensor, mem: tuple[Tensor, ...]):
        """(qg, kg, vg, float mask or None, empty rows or None) of piece p."""
        b, h, d = self.b, self.h, q.shape[-1]
        qg = q.index_select(0, self.q_rows[p]).view(b * h, -1, self.i, d)
        kg, vg = self.keys(k, p), self.keys(v, p)
        plan, g = self.plans[p], qg.shape[1]
        (mask, empty), bias = build_mask(plan, **self.mask_args, device=q.device), plan.bias
        if self.n_mem:
            mk, mv = (repeat(t, 'h m d -> (b h) g m d', b=b, g=g) for t in mem)
            kg, vg = torch.cat((mk, kg), dim=-2), torch.cat((mv, vg), dim=-2)
            mask, bias = admit_memory(mask, bias, self.n_mem, kg.shape[-2] - self.n_mem, plan.mem_bias, q.dtype)
        attn_mask = backends.additive_mask(mask, bias, q.dtype, (b, h, g, self.i, kg.shape[-2]))
        return qg, kg, vg, attn_mask, backends.fold_mask(empty, b, h)

    def accumulate(self, p: int, grads: tuple[Tensor, Tensor, Tensor], dq: Tensor, dk: Tensor, dv: Tensor,
                   dmem: list[Tensor]) -> None:
        dqg, dkg, dvg = grads
        m, d, w = self.n_mem, dq.shape[-1], self.i
        dq.index_add_(0, self.q_rows[p], dqg.reshape(-1, d))
        for full, grad, dm in zip((dk, dv), (dkg, dvg), dmem or (None, None)):
            if m:
                dm += reduce(grad[..., :m, :], '(b h) g m d -> h m d', 'sum', b=self.b)
            grad = grad[..., m:, :]
            if self.look_back:  # a gathered group is the second half of one window and the first of the next
                previous, own = grad[:, :, :w], grad[:, :, w:]
                grad = torch.cat((previous[:, :1], own[:, :-1] + previous[:, 1:], own[:, -1:]), dim=1)
            full.index_add_(0, self.kv_rows[p], grad.reshape(-1, d))


class RoutedAttention(nn.Module):
    """gather -> attend inside groups -> scatter back, on the backend that `backends.choose` picks
    for each call. Groups are attended piece by piece (PIECE_BYTES), each piece gathering only its
    own queries and keys; the flash_lse backend takes the lean path (GatheredPieces) where it can,
    and the flex backend one FlexAttention call over the sequence where the layout allows
    (flex.runs_whole)."""

    def __init__(self, *, dropout: float = 0., backend: str = 'auto'):
        super().__init__()
        backends.check_name(backend)  # fail early on a typo
        self.dropout = dropout
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, plan: RoutePlan, *, causal: bool = False,
                key_mask: Tensor | None = None, mem_kv: tuple[Tensor, Tensor] | None = None,
                exclude_self: bool = False, need_weights: bool = False, rel_pos=None):
        """q (b, h, n, d), k/v (b, h, n_kv, d), key_mask (b, n_kv), mem_kv two (h, m, d) tensors
        visible to every query. `rel_pos(qg, q_pos, kv_pos)`, when given, returns logits added to
        every gathered pair from the gathered queries (b, h, g, i, d) and the original positions of
        the slots, q_pos (b|1, h|1, g, i) and kv_pos (b|1, h|1, g, j) (relative position attention).
        Returns (out (b, h, n, d), GroupWeights or None); weights come only with `need_weights`,
        which runs the reference backend, the one that returns them."""
        q_len, kv_len = q.shape[-2], k.shape[-2]
        need_lse = plan.merge == 'logsumexp'
        choice = backends.choose(self.backend, self.call(q, k, v, plan, mem_kv=mem_kv, need_lse=need_lse,
                                                          need_weights=need_weights, rel_pos=rel_pos))
        backends.note(choice, self)
        name = choice.backend.name
        if name == 'flex' and flex.runs_whole(plan, key_mask=key_mask, exclude_self=exclude_self, rel_pos=rel_pos):
            return flex.attend_whole(q, k, v, plan, causal=causal, key_mask=key_mask, mem_kv=mem_kv,
                                     exclude_self=exclude_self, need_lse=need_lse), None

        bounds = piece_bounds(plan, q)
        if name == 'flash_lse' and self.lean(plan, rel_pos=rel_pos):
            b, h, d = q.shape[0], q.shape[1], q.shape[-1]
            source = GatheredPieces(plan, bounds, b=b, h=h, q_len=q_len, kv_len=kv_len, scale=d ** -0.5,
                                    n_mem=0 if mem_kv is None else mem_kv[0].shape[-2], causal=causal,
                                    key_mask=key_mask, exclude_self=exclude_self)
            flat = [rearrange(t.to(q.dtype), 'b h n d -> (b n h) d') for t in (q, k, v)]
            mem = () if mem_kv is None else tuple(t.to(q.dtype) for t in mem_kv)
            outs, lses = backends.flash_pieces(source, *flat, mem)
            outs = [rearrange(o, '(b h) g i d -> b h g i d', b=b) for o in outs]
            lse = rearrange(torch.cat(lses, dim=1), '(b h) g i -> b h g i', b=b) if need_lse else None
            return scatter(outs, plan, q_len, lse=lse), None

        qgs, kgs, vgs = gather_queries(q, plan, bounds), gather_keys(k, plan, bounds), gather_keys(v, plan, bounds)
        pieces = []
        for (start, stop), qg, kg, vg in zip(bounds, qgs, kgs, vgs):
            pieces.append(self.attend(qg, kg, vg, slice_groups(plan, start, stop), kernel=choice.backend.kernel,
                                      q_len=q_len, kv_len=kv_len, causal=causal, key_mask=key_mask, mem_kv=mem_kv,
                                      exclude_self=exclude_self, need_lse=need_lse, need_weights=need_weights,
                                      rel_pos=rel_pos))
        outs, lses, probs = zip(*pieces)
        lse, probs = (None if t[0] is None else torch.cat(t, dim=2) for t in (lses, probs))
        # the merge shares, once: the scatter weighs the group outputs by them, the Recorder the weights
        shares = merge_shares(plan, lse, q_len) if need_lse and not plan.contiguous_queries else None
        out = scatter(list(outs), plan, q_len, shares=shares)
        return out, (GroupWeights(probs, shares) if need_weights else None)

    def call(self, q: Tensor, k: Tensor, v: Tensor, plan: RoutePlan, *, mem_kv, need_lse: bool, need_weights: bool,
             rel_pos) -> backends.Call:
        """What this call asks of a backend (backends.Call)."""
        grad_enabled = torch.is_grad_enabled()
        inputs = (q, k, v, *(mem_kv or ()), *(t for t in (plan.k_gate, plan.kv_gate, plan.q_gate) if exists(t)))
        bias_grad = exists(plan.bias) and plan.bias.requires_grad
        if exists(rel_pos):
            bias_grad = bias_grad or any(p.requires_grad for p in rel_pos.parameters())
        b, h, n = q.shape[:3]
        # the pairs a kernel that scores everything would score: the whole sorted sequence for a
        # band, the sequence for queries in order, every group's otherwise
        if isinstance(plan.layout, SortedBand):
            pairs = b * h * plan.q_index.shape[-2:].numel() ** 2
        elif plan.contiguous_queries or plan.kv_index is None or isinstance(plan.layout, SelectedBlocks):
            pairs = b * h * n * k.shape[-2]
        else:
            pairs = b * h * plan.q_index.shape[-2:].numel() * plan.kv_index.shape[-1]
        return backends.Call(layout=type(plan.layout).__name__, device=q.device.type, dtype=q.dtype,
                             decoding=n == 1 and plan.q_offset > 0, pairs=pairs, length=n,
                             need_lse=need_lse, need_weights=need_weights, dropout=self.training and self.dropout > 0.,
                             grad=grad_enabled and any(t.requires_grad for t in inputs), compiling=compiling(),
                             bias_grad=grad_enabled and bias_grad)

    def lean(self, plan: RoutePlan, *, rel_pos) -> bool:
        """Whether groups gathered by index go through the CPU flash kernel as one node that keeps
        nothing gathered (GatheredPieces): eager, without gates or relative positions to
        differentiate."""
        return (not compiling() and exists(plan.q_index) and exists(plan.kv_index)
                and not plan.contiguous_queries and rel_pos is None
                and all(t is None for t in (plan.k_gate, plan.kv_gate, plan.q_gate))
                and not (exists(plan.bias) and plan.bias.requires_grad))

    def attend(self, qg: Tensor, kg: Tensor, vg: Tensor, plan: RoutePlan, *, kernel, q_len: int, kv_len: int,
               causal: bool, key_mask, mem_kv, exclude_self: bool, need_lse: bool, need_weights: bool,
               rel_pos) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Attention inside the gathered groups of `plan`: (out (b, h, g, i, d), lse, weights)."""
        device = qg.device
        if exists(plan.k_gate):
            kg = kg * rearrange(plan.k_gate, '... j -> ... j 1').to(kg.dtype)
        if exists(plan.kv_gate):
            vg = vg * rearrange(plan.kv_gate, '... j -> ... j 1').to(vg.dtype)
        bias = plan.bias
        if exists(rel_pos):
            q_pos = positions_of(plan.q_index, q_len, device) + plan.q_offset
            rel = rel_pos(qg, q_pos, positions_of(plan.kv_index, kv_len, device))
            bias = rel if bias is None else bias + rel

        # one dense causal group and nothing else to mask: let the kernel apply the causal mask
        # itself, without materialising an (n, n) mask (the fused kernels skip the masked half;
        # SDPA takes an additive bias only as a mask, without is_causal)
        kernel_causal = (causal and plan.q_index is None and plan.kv_index is None and plan.q_offset == 0
                         and plan.mask is None and key_mask is None and not exclude_self and bias is None)
        mask, empty = build_mask(plan, q_len=q_len, kv_len=kv_len, causal=causal and not kernel_causal,
                                 key_mask=key_mask, exclude_self=exclude_self, has_memory=exists(mem_kv), device=device)

        if exists(mem_kv):
            b, g, n_keys = kg.shape[0], kg.shape[2], kg.shape[-2]
            mk, mv = (repeat(t, 'h m d -> b h g m d', b=b, g=g).to(kg.dtype) for t in mem_kv)
            kg, vg = torch.cat((mk, kg), dim=-2), torch.cat((mv, vg), dim=-2)
            if kernel_causal:
                mask = torch.ones(1, 1, 1, qg.shape[-2], n_keys, dtype=torch.bool, device=device).tril()
                kernel_causal = False
            mask, bias = admit_memory(mask, bias, mk.shape[-2], n_keys, plan.mem_bias, qg.dtype)

        out, lse, weights = kernel(qg, kg, vg, mask, scale=qg.shape[-1] ** -0.5, bias=bias,
                                   dropout_p=self.dropout if self.training else 0.,
                                   causal=kernel_causal, need_lse=need_lse, need_weights=need_weights)
        if exists(empty):
            out = out.masked_fill(empty, 0.)
            weights = weights.masked_fill(empty, 0.) if exists(weights) else None
            if need_lse:
                lse = lse.masked_fill(empty.squeeze(-1), float('-inf'))
        if exists(plan.q_gate):
            out = out * rearrange(plan.q_gate, '... i -> ... i 1').to(out.dtype)
        return out, lse, weights


def use_backend(model: nn.Module, backend: str) -> nn.Module:
    """Sets the attention backend of every executor inside `model` (each backend's meaning in
    backends.py; 'auto' picks per call) and returns the model."""
    backends.check_name(backend)
    for m in model.modules():
        if isinstance(m, RoutedAttention):
            m.backend = backend
    return model
