"""Native Sparse Attention (NSA): every query attends three branches, whose outputs are mixed by
learned per-token, per-head gates g = sigmoid(W x).

Rule: blocks of `compress_block_size` keys (and values) taken every `compress_stride` positions are
compressed by a learned MLP into one key (value), and a query attends the compressed blocks that end
at or before it; the compressed branch's attention probabilities, summed over the compressed blocks
that overlap each block of `select_block_size` keys, rank those blocks, and the query attends in full
the `num_selected_blocks` best blocks not after it (its own block, causal inside, and the first block
always among them), plus a sliding window of the last `sliding_window_size` keys.

Reference: Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and Natively Trainable
Sparse Attention" (arXiv 2502.11089); Triton reference fla-org/native-sparse-attention.

What we changed: every head has its own keys here (no GQA), so blocks are selected per head, the
paper's rule for a group of one head. A block's importance is the plain sum over every compressed
block that overlaps it (the paper's closed form, eq. 9, weights them by the overlap and holds only
when the block sizes divide each other). The compressed key of a block is its mean plus the MLP of
its keys with the intra-block position encoding (the MLP's output starts at zero, so training
starts from mean pooling). The compressed branch attends the queries and keys before rotary (it
routes, and rotary comes after routing everywhere; a compressed key has no single position); the
selected and sliding branches attend them after rotary. Learned memory key/values are visible in
every branch; the importance is read from the compressed blocks' probabilities only.

Axes: b batch, h heads (this layer's NSA heads), n sequence, d head dim, c compressed blocks,
l keys per compressed block, s selection blocks, k selected blocks per query, j keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..attention.plan import RoutePlan
from ..context import LayerContext
from ..helpers import check_positive, exists, topk_first
from ..routers import LocalRouter
from ..routers.base import RouteInput
from ..routers.selection import block_slots, blocks_plan
from .attention import Attention, KVCache, cat_heads


@dataclass
class NSACache(KVCache):
    """KVCache plus the pre-rotary keys (b, h, n, d) of every position (blocks are compressed from
    them), the compressed keys and values (b, h, c, d) of the blocks completed so far and their
    mask (b, c)."""
    k_route: Tensor | None = None
    ck: Tensor | None = None
    cv: Tensor | None = None
    cmask: Tensor | None = None


# queries whose compressed probabilities are computed at once: bounds the (b, h, rows, c) logits
SCORE_ROWS = 4096
# sequences up to this many times the selected keys of a query attend the selected blocks through a
# mask over all keys (n logits a query) instead of a group per key block and run of its queries
DENSE_SELECTION = 2


class BlockCompressor(nn.Module):
    """(b, h, n, d) -> (b, h, c, d): one vector per block of `block_size` positions taken every
    `stride` positions (c = 0 when n < block_size), the block's mean plus an MLP of the whole block
    with a learned position encoding inside the block. Shared by every head."""

    def __init__(self, block_size: int, stride: int, dim_head: int):
        super().__init__()
        self.block_size, self.stride = block_size, stride
        self.pos = nn.Parameter(torch.randn(block_size, dim_head) * dim_head ** -0.5)
        self.mlp = nn.Sequential(nn.Linear(block_size * dim_head, dim_head), nn.GELU(), nn.Linear(dim_head, dim_head))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def count(self, n: int) -> int:
        """How many blocks of n positions are complete."""
        return 0 if n < self.block_size else (n - self.block_size) // self.stride + 1

    def forward(self, t: Tensor) -> Tensor:
        blocks = rearrange(t.unfold(-2, self.block_size, self.stride), 'b h c d l -> b h c l d')
        return blocks.mean(dim=-2) + self.mlp(rearrange(blocks + self.pos, 'b h c l d -> b h c (l d)'))

    def block_mask(self, key_mask: Tensor) -> Tensor:
        """(b, n) -> (b, c): a block counts when it holds at least one real token."""
        return key_mask.unfold(-1, self.block_size, self.stride).any(dim=-1)


class NSAAttention(Attention):
    """Self-attention whose heads after the first `n_local_heads` (which stay on their LocalRouter)
    are NSA heads: compressed, selected and sliding-window branches, gated per token and head. Takes
    every keyword argument of Attention (a router is NSA's own and cannot be given), causal only."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, causal: bool = True,
                 compress_block_size: int = 32, compress_stride: int = 16, select_block_size: int = 64,
                 num_selected_blocks: int = 16, sliding_window_size: int = 512, router=None, **kwargs):
        check_positive(compress_block_size=compress_block_size, compress_stride=compress_stride,
                       select_block_size=select_block_size, num_selected_blocks=num_selected_blocks,
                       sliding_window_size=sliding_window_size)
        if compress_stride > compress_block_size:
            raise ValueError(f'compress_stride ({compress_stride}) must be at most compress_block_size '
                             f'({compress_block_size}), or keys between the compressed blocks are never seen')
        if not causal or kwargs.get('cross_attend'):
            raise ValueError('NSA attention is causal self-attention: build it with causal=True')
        if router is not None:
            raise ValueError('NSA attention routes its heads itself: it takes no router')
        if kwargs.get('n_local_heads', 0) >= heads:
            raise ValueError(f'n_local_heads ({kwargs["n_local_heads"]}) must be less than heads ({heads}): '
                             f'NSA needs at least one head of its own')
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal, **kwargs)
        # the plain layer put full attention on the heads after the local ones: those are NSA's
        self.nsa_heads = (self.head_slices[-1][0], heads)
        self.routers, self.head_slices = nn.ModuleList(list(self.routers)[:-1]), self.head_slices[:-1]
        self.select_block_size, self.num_selected_blocks = select_block_size, num_selected_blocks
        self.compress_k = BlockCompressor(compress_block_size, compress_stride, dim_head)
        self.compress_v = BlockCompressor(compress_block_size, compress_stride, dim_head)
        self.window = LocalRouter(sliding_window_size)
        # one gate per branch, token and NSA head
        self.to_gates = nn.Linear(dim, 3 * (heads - self.nsa_heads[0]))

    def forward(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        key = ctx.key(self)
        if exists(ctx.cache) and (key in ctx.cache or x.shape[1] == 1):
            return super().forward(x, ctx)  # cached decoding: Attention hands the token to decode
        key_mask, n = ctx.mask, x.shape[1]
        q_route, k_route, v = self.project(x, x)
        inp = RouteInput(q=q_route, k=k_route, causal=True, mask=key_mask)
        plans = self.route(inp, ctx)  # the local heads'
        q, k = self.rotate(q_route, k_route, ctx.offset)
        record = exists(ctx.recordings) and not ctx.recompute

        outs = []
        for plan, (start, end) in zip(plans, self.head_slices):
            out, weights = self.attend_heads(plan, q, k, v, start, end, key_mask=key_mask, need_weights=record)
            outs.append(out)
            if record:
                self.record(ctx, weights, plan, start, end, q_len=n, kv_len=n)

        start, end = self.nsa_heads
        ck, cv, cmask = self.compress(k_route[:, start:end], v[:, start:end], key_mask)
        positions = torch.arange(n, device=x.device)
        out_cmp, scores = self.compressed(q_route[:, start:end], ck, cv, cmask, positions, n)
        # a reversible recompute replays the selection of the forward pass
        cached = ctx.plans.get((*key, 'selected')) if ctx.recompute else None
        selected = cached if exists(cached) else self.selected_plan(scores, positions, n)
        if not ctx.recompute:
            ctx.plans[(*key, 'selected')] = selected
        out_slc, weights = self.attend_heads(selected, q, k, v, start, end, key_mask=key_mask, need_weights=record)
        if record:
            self.record(ctx, weights, selected, start, end, q_len=n, kv_len=n)
        out_win = self.sliding(q, k, v, key_mask)
        outs.append(self.gated(x, out_cmp, out_slc, out_win))

        if exists(ctx.cache):
            ctx.cache[key] = NSACache(**vars(self.prefill(inp, plans, k, v)), k_route=k_route, ck=ck, cv=cv,
                                      cmask=cmask)
        return self.merge_heads(cat_heads(outs)), x.new_zeros(())

    def compress(self, k: Tensor, v: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The compressed keys, values (b, h, c, d) and block mask (b, c) of the blocks of k, v
        (b, h, n, d); padding is zeroed first, so that what hides behind the mask does not matter."""
        if exists(key_mask):
            hidden = rearrange(~key_mask, 'b n -> b 1 n 1')
            k, v = k.masked_fill(hidden, 0.), v.masked_fill(hidden, 0.)
        else:
            key_mask = torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool, device=k.device)
        if self.compress_k.count(k.shape[-2]) == 0:
            empty = k.new_zeros(*k.shape[:2], 0, k.shape[-1])
            return empty, empty, key_mask[:, :0]
        return self.compress_k(k), self.compress_v(v), self.compress_k.block_mask(key_mask)

    def compressed(self, q: Tensor, ck: Tensor, cv: Tensor, cmask: Tensor, positions: Tensor,
                   length: int) -> tuple[Tensor, Tensor]:
        """Queries q (b, h, n, d) at `positions` (n,) of a sequence of `length` attend the compressed
        blocks that end at or before them: (out (b, h, n, d), the importance of every selection
        block (b, h, n, s))."""
        c = ck.shape[-2]
        if c == 0:  # no block is complete yet: one stand-in block nobody sees (memory stays visible)
            ck, cv = (t.new_zeros(*t.shape[:2], 1, t.shape[-1]) for t in (ck, cv))
            cmask = cmask.new_zeros(cmask.shape[0], 1)
        ends = torch.arange(ck.shape[-2], device=q.device) * self.compress_k.stride + self.compress_k.block_size - 1
        visible = ends <= rearrange(positions, 'n -> n 1')                               # (n, c)
        mem = self.mem_slice(*self.nsa_heads)
        plan = RoutePlan(q_index=None, kv_index=None, mask=rearrange(visible, 'n c -> 1 1 1 n c'))
        out, _ = self.executor(q, ck, cv, plan, key_mask=cmask, mem_kv=mem)
        return out, self.importance(q, ck, visible, cmask, mem, length)

    @torch.no_grad()
    def importance(self, q: Tensor, ck: Tensor, visible: Tensor, cmask: Tensor, mem, length: int) -> Tensor:
        """(b, h, n, s): for each query and block of `select_block_size` keys of a sequence of
        `length`, the sum of the compressed branch's attention probabilities (memory included in
        the softmax) over the compressed blocks that overlap it. Computed SCORE_ROWS queries at a
        time, without gradients: only the ranking needs them, so no (n, c) probabilities are kept."""
        size, stride, l = self.select_block_size, self.compress_k.stride, self.compress_k.block_size
        blocks = torch.arange(math.ceil(length / size), device=q.device)
        starts = rearrange(torch.arange(ck.shape[-2], device=q.device) * stride, 'c -> c 1')
        overlap = ((starts < (blocks + 1) * size) & (starts + l > blocks * size)).to(q.dtype)   # (c, s)
        scale, scores = q.shape[-1] ** -0.5, []
        for start in range(0, q.shape[-2], SCORE_ROWS):
            rows = q[:, :, start:start + SCORE_ROWS]
            logits = torch.einsum('b h n d, b h c d -> b h n c', rows, ck) * scale
            seen = visible[start:start + SCORE_ROWS] & rearrange(cmask, 'b c -> b 1 1 c')
            logits = logits.masked_fill(~seen, float('-inf'))
            if exists(mem):
                logits = torch.cat((torch.einsum('b h n d, h m d -> b h n m', rows, mem[0]) * scale, logits), dim=-1)
            # a query that sees nothing has no probabilities (all zero), as the branch gives it no output
            probs = logits.softmax(dim=-1).nan_to_num(0.)[..., logits.shape[-1] - ck.shape[-2]:]
            scores.append(probs @ overlap)
        return torch.cat(scores, dim=-2)

    def selected_plan(self, scores: Tensor, positions: Tensor, length: int) -> RoutePlan:
        """The plan of the selected blocks: `num_selected_blocks` blocks not after the
        query, ranked by their importance (b, h, n, s) (`importance`),
        the query's own block and the first block first. Queries at `positions` (n,); a single query
        gives a decoding plan, a short sequence (DENSE_SELECTION) a mask over all its keys."""
        size = self.select_block_size
        blocks = torch.arange(math.ceil(length / size), device=scores.device)
        own = rearrange(positions // size, 'n -> n 1')
        scores = scores.masked_fill((blocks == own) | (blocks == 0), float('inf'))
        scores = scores.masked_fill(blocks > own, float('-inf'))
        values, chosen = topk_first(scores, min(self.num_selected_blocks, len(blocks)))
        if len(positions) > 1 and length <= DENSE_SELECTION * self.num_selected_blocks * size:
            # the selected keys of a query are much of a short sequence: a mask over all keys costs
            # less than a group per key block
            empty = len(blocks)  # a slot with no admissible block marks this extra column
            member = torch.zeros(*chosen.shape[:-1], empty + 1, dtype=torch.bool, device=scores.device)
            member.scatter_(-1, chosen.masked_fill(values == float('-inf'), empty), True)
            mask = repeat(member[..., :empty], 'b h n s -> b h 1 n (s l)', l=size)[..., :length]
            return RoutePlan(q_index=None, kv_index=None, mask=mask)
        chosen = chosen.masked_fill(values == float('-inf'), -1)
        if len(positions) > 1:  # causal inside the own block by the executor's causal mask
            return blocks_plan(chosen, size, length)
        kv_index = block_slots(chosen, size, int(positions[0]) + 1)  # a decoding step: the keys so far
        return RoutePlan(q_index=None, kv_index=kv_index, q_offset=int(positions[0]))

    def sliding(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
        """The sliding-window branch of the NSA heads: the local router's windows of w queries over
        2w keys (keys padded to whole windows), narrowed to the last w keys of each query."""
        w, n = self.window.window_size, k.shape[-2]
        pad = -n % w
        k, v = (F.pad(t, (0, 0, 0, pad)) for t in (k, v))
        key_mask = F.pad(key_mask, (0, pad), value=False) if exists(key_mask) else None
        plan = self.window(k, k, causal=True)
        band = torch.arange(2 * w, device=q.device) > rearrange(torch.arange(w, device=q.device), 'i -> i 1')
        plan.mask = rearrange(band, 'i j -> 1 1 1 i j')
        return self.attend_heads(plan, q, k, v, *self.nsa_heads, key_mask=key_mask)[0]

    def gated(self, x: Tensor, out_cmp: Tensor, out_slc: Tensor, out_win: Tensor) -> Tensor:
        gates = rearrange(self.to_gates(x).sigmoid(), 'b n (r h) -> r b h n 1', r=3)
        return gates[0] * out_cmp + gates[1] * out_slc + gates[2] * out_win

    def empty_cache_entry(self, x) -> NSACache:
        entry = super().empty_cache_entry(x)
        h, d = self.nsa_heads[1] - self.nsa_heads[0], entry.k.shape[-1]
        empty = x.new_zeros(x.shape[0], h, 0, d)
        return NSACache(**vars(entry), k_route=x.new_zeros(x.shape[0], self.heads, 0, d), ck=empty, cv=empty,
                        cmask=entry.mask)

    def decode_step(self, x, ctx, entry) -> Tensor:
        """One new token against the cache: the compressed key of a block enters the cache when its
        last token arrives, so the token sees what the full forward pass shows it."""
        step, q = self.extend_cache(x, ctx, entry)
        entry.k_route = torch.cat((entry.k_route, step.k), dim=-2)
        pos, q_route, k, v, key_mask = step.offset, step.q, entry.k, entry.v, entry.mask
        outs = [self.decode_heads(step, q, entry)] if self.routers else []
        start, end = self.nsa_heads
        l = self.compress_k.block_size
        first = pos + 1 - l
        if first >= 0 and first % self.compress_k.stride == 0:  # the token completes a block: compress it
            ck, cv, cmask = self.compress(entry.k_route[:, start:end, first:], v[:, start:end, first:],
                                          key_mask[:, first:])
            entry.ck, entry.cv = torch.cat((entry.ck, ck), dim=-2), torch.cat((entry.cv, cv), dim=-2)
            entry.cmask = torch.cat((entry.cmask, cmask), dim=-1)
        positions = torch.tensor([pos], device=q.device)
        out_cmp, scores = self.compressed(q_route[:, start:end], entry.ck, entry.cv, entry.cmask, positions, pos + 1)
        out_slc = self.attend_heads(self.selected_plan(scores, positions, pos + 1), q, k, v, start, end,
                                    key_mask=key_mask)[0]
        window = torch.arange(max(0, pos + 1 - self.window.window_size), pos + 1, device=q.device)
        out_win = self.attend_heads(RoutePlan(q_index=None, kv_index=window.view(1, 1, 1, -1), q_offset=pos),
                                    q, k, v, start, end, key_mask=key_mask)[0]
        outs.append(self.gated(x, out_cmp, out_slc, out_win))
        return cat_heads(outs)

    def extra_repr(self) -> str:
        c = self.compress_k
        return (f'nsa_heads={self.nsa_heads}, compress_block_size={c.block_size}, compress_stride={c.stride}, '
                f'select_block_size={self.select_block_size}, num_selected_blocks={self.num_selected_blocks}, '
                f'sliding_window_size={self.window.window_size}')
