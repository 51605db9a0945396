"""Sinkhorn routing (Tay et al. 2020, "Sparse Sinkhorn Attention"): a learned sort net matches
every block of queries to the key blocks most relevant to it.

Queries never move: the `bucket_size` queries of block c are one group. Its keys are the key
blocks the sort net ranks highest for it (`n_top_buckets`, or the `n_sortcut` blocks shared by
every query block), followed by its own block in self-attention. The values of a selected block
are scaled by its sort score (the plan's `kv_gate`), which is how the sort net gets gradients;
the own block has weight 1.

Sort nets (`use_simple_sort_net`):
- attention (default): score(c, u) = mean query of block c . mean key of key block u / sqrt(d).
  It has no weights of its own (it learns through q and k) and works at every length.
- simple (the paper's): a learned linear map of [mean query, mean key] of block c to one score
  per key block position, so it handles up to `max_seq_len` tokens.
Means are taken over real tokens only: padding never steers the routing.

Normalisation (`non_permutative`):
- True: softmax over the candidate key blocks at `temperature`; the top blocks and their
  probabilities are kept (one softmax; the seed renormalised after each pick).
- False: Gumbel-Sinkhorn. log(relu(scores)) plus Gumbel noise (training only, so evaluation is
  deterministic), divided by `temperature`, then `sinkhorn_iter` alternating row and column
  normalisations: a soft permutation matrix. The paper mixes every key block into every sorted
  block by that dense matrix (cost quadratic in the number of blocks). We keep the n_top largest
  entries of each row, with their values as weights: linear cost, and exactly the paper's sorted
  block whenever the matrix is a hard permutation. With sortcut there is one row, and the
  normalisation is the row's Gumbel-softmax.

Self-attention excludes a block's own key block from its candidates (it is always attended, with
weight 1), so every selected block is a different one and `n_top_buckets` = number of blocks - 1
is exactly full attention with gated values.

Causal mode is strictly causal by construction. The routing of block c is decided from what is
known at its first token cw: the query summary is the mean of the w routing queries ending there
(positions cw - w + 1 .. cw, i.e. the previous block's content and the first token; the seed
took the running mean of every earlier query, which flattens out over long sequences, and
rotated half of the heads so that a block's last token led), the candidates are the completed
blocks before c and
`n_top_buckets` learned null candidates (routing keys with no content: a null that wins leaves
its slot empty). Within its own block a query sees keys up to itself. So nothing after position
t reaches the output at t. Causal routing normalises rows only: Sinkhorn's column normalisation
would mix later query blocks into the routing of earlier ones, so `non_permutative` and
`sinkhorn_iter` do not apply (as in the seed). Cached decoding reproduces the forward pass: the
routing of a block is computed when its first token arrives and kept for the rest of the block.

Cross-attention (`cross=True`): keys are a context of any length in blocks of `kv_bucket_size`
(the last one may be partial), with no own block and no null candidates. The router reads the
queries' padding mask (`RouteInput.q_mask`), so padded queries do not steer the routing of real
ones. With causal queries (a decoder) the query summary is the causal one
above, and sortcut, whose one shared choice would have to be made at the first token, becomes a
per-block choice of `n_sortcut` context blocks.

Axes: b batch, h heads, n query sequence, m key sequence, d head dim, c query blocks (= groups),
u candidate key blocks, k selected blocks per query block, w block length, j keys per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..attention.plan import RoutePlan
from ..helpers import check_positive, exists, topk_first
from .base import KeyHistory, Router, RouterCache


# ---------------------------------------------------------------- summaries

def block_mean(t: Tensor, mask: Tensor | None, size: int) -> tuple[Tensor, Tensor]:
    """(b, h, n, d) -> mean over each block of `size` positions of the real ones (b, h, c, d), and
    the number of real positions per block (b|1, c). The last block may be partial; an empty
    block has mean 0."""
    n = t.shape[-2]
    blocks = math.ceil(n / size)
    pad = blocks * size - n
    if pad > 0:
        mask = torch.ones(1, n, dtype=torch.bool, device=t.device) if mask is None else mask
        t, mask = F.pad(t, (0, 0, 0, pad)), F.pad(mask.bool(), (0, pad), value=False)
    if exists(mask):
        t = t.masked_fill(~rearrange(mask.bool(), 'b n -> b 1 n 1'), 0.)
        count = rearrange(mask.bool(), 'b (c w) -> b c w', w=size).sum(dim=-1)
    else:
        count = torch.full((1, blocks), size, device=t.device)
    sums = rearrange(t, 'b h (c w) d -> b h c w d', w=size).sum(dim=-2)
    return sums / rearrange(count.clamp(min=1), 'b c -> b 1 c 1').to(sums.dtype), count


def window_mean(t: Tensor, mask: Tensor | None, size: int) -> Tensor:
    """Causal block summary: for block c, the mean of the real positions among the `size`
    positions ending at the block's first token (c*size - size + 1 .. c*size)."""
    n = t.shape[-2]
    blocks = math.ceil(n / size)
    real = mask.bool() if exists(mask) else torch.ones(1, n, dtype=torch.bool, device=t.device)
    # shifted right by size - 1, block c of the padded sequence is exactly that window
    t = F.pad(t, (0, 0, size - 1, 0))[..., :blocks * size, :]
    real = F.pad(real, (size - 1, 0), value=False)[:, :blocks * size]
    return block_mean(t, real, size)[0]


# ---------------------------------------------------------------- normalisation

def masked_logsumexp(t: Tensor, valid: Tensor, dim: int) -> Tensor:
    """logsumexp over the valid entries, finite (and with finite gradients) when there are none."""
    peak = t.masked_fill(~valid, -torch.finfo(t.dtype).max).amax(dim=dim, keepdim=True).detach()
    peak = peak.masked_fill(~valid.any(dim=dim, keepdim=True), 0.)
    total = torch.where(valid, t - peak, float('-inf')).exp().sum(dim=dim, keepdim=True)
    return peak + total.clamp(min=torch.finfo(t.dtype).tiny).log()


def masked_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the last axis restricted to valid entries; invalid entries (and rows without a
    valid entry) get probability 0."""
    logits = logits - masked_logsumexp(logits, valid, -1)
    return torch.where(valid, logits, float('-inf')).exp()


def sinkhorn(logits: Tensor, valid: Tensor, iters: int) -> Tensor:
    """Alternating row/column normalisation in log space over the valid entries: a soft
    permutation matrix (doubly stochastic where the valid entries allow it)."""
    for _ in range(iters):
        logits = logits - masked_logsumexp(logits, valid, -1)
        logits = logits - masked_logsumexp(logits, valid, -2)
    return torch.where(valid, logits, float('-inf')).exp()


def gumbel_noise(like: Tensor, eps: float = 1e-6) -> Tensor:
    u = torch.rand_like(like).clamp(eps, 1 - eps)
    return -(-u.log()).log()


# ---------------------------------------------------------------- the router

@dataclass
class SortCache(KeyHistory):
    """Causal Sinkhorn decoding: besides the routing keys and key mask of every position
    (self-attention; None in cross-attention, whose context comes with every step), the recent
    routing queries (b, h, < w, d) and their mask, the summaries (b, h, u, d) and real-key counts
    (b, u) of the key blocks completed so far, and the current query block's choice."""
    q_window: Tensor | None = None
    q_window_mask: Tensor | None = None
    k_summary: Tensor | None = None
    k_count: Tensor | None = None
    blocks: Tensor | None = None
    gate: Tensor | None = None
    block: int | None = None


class SinkhornRouter(Router):
    """Routes blocks of `bucket_size` queries to learned choices of key blocks of `kv_bucket_size`
    (see the module docstring). `heads` and `dim_head` size the sort net's weights: the heads this
    router serves. `causal` and `cross` are fixed at construction: the causal query summary and
    the null candidates are built for them."""

    def __init__(self, *, bucket_size: int, heads: int, dim_head: int, kv_bucket_size: int | None = None,
                 n_top_buckets: int = 1, n_sortcut: int = 0, non_permutative: bool = True, sinkhorn_iter: int = 5,
                 temperature: float = 0.75, use_simple_sort_net: bool = False, max_seq_len: int | None = None,
                 causal: bool = False, cross: bool = False):
        super().__init__()
        kv_bucket_size = bucket_size if kv_bucket_size is None else kv_bucket_size
        check_positive(bucket_size=bucket_size, kv_bucket_size=kv_bucket_size, heads=heads, dim_head=dim_head)
        if n_top_buckets < 0 or n_sortcut < 0 or sinkhorn_iter < 0:
            raise ValueError('n_top_buckets, n_sortcut and sinkhorn_iter must be >= 0')
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        if causal and cross:
            # a decoder's shared sortcut choice would have to be made at its first token
            n_top_buckets, n_sortcut = (n_sortcut or n_top_buckets), 0
        if causal and not cross and n_sortcut > 0:
            raise ValueError('sortcut (n_sortcut > 0) shares one choice of key blocks across the whole sequence, '
                             'which a causal model cannot make: use n_top_buckets instead')
        if causal and not cross and kv_bucket_size != bucket_size:
            raise ValueError(f'causal sinkhorn attention needs kv_bucket_size ({kv_bucket_size}) equal to '
                             f'bucket_size ({bucket_size})')
        if use_simple_sort_net and cross:
            raise ValueError('the simple sort net scores key block positions of a fixed-length sequence; '
                             'cross-attention uses the attention sort net')
        if use_simple_sort_net and max_seq_len is None:
            raise ValueError('use_simple_sort_net=True needs max_seq_len: its weights have one column per key block')

        self.bucket_size, self.kv_bucket_size = bucket_size, kv_bucket_size
        self.multiple_of = bucket_size if cross else math.lcm(bucket_size, kv_bucket_size)
        self.n_top, self.n_sortcut = n_top_buckets, n_sortcut
        self.non_permutative, self.sinkhorn_iter, self.temperature = non_permutative, sinkhorn_iter, temperature
        self.causal, self.cross = causal, cross
        self.own_block = not cross and kv_bucket_size == bucket_size
        self.scale = dim_head ** -0.5

        # learned null candidates where a block may have no past; a context is all there from the start
        self.n_null = n_top_buckets if causal and not cross else 0
        self.max_blocks = None
        if use_simple_sort_net:
            self.max_blocks = math.ceil(max_seq_len / kv_bucket_size)
            self.sort_weight = nn.Parameter(torch.randn(heads, 2 * dim_head, self.max_blocks + self.n_null)
                                            * (2 * dim_head) ** -0.5)
            self.null_keys = None
        else:
            self.sort_weight = None
            # zero: at first a null wins only where no past block scores above 0
            self.null_keys = nn.Parameter(torch.zeros(heads, self.n_null, dim_head)) if self.n_null else None

    @property
    def use_simple_sort_net(self) -> bool:
        return self.sort_weight is not None

    # ------------------------------------------------------------ scores

    def query_summary(self, t: Tensor, mask: Tensor | None) -> Tensor:
        """(b, h, c|1, d): what a query block routes by."""
        if self.causal:
            return window_mean(t, mask, self.bucket_size)
        if self.n_sortcut > 0:
            return block_mean(t, mask, t.shape[-2])[0]
        return block_mean(t, mask, self.bucket_size)[0]

    def scores(self, sq: Tensor, sk: Tensor, k_count: Tensor, own_keys: Tensor | None = None,
               first_block: int = 0) -> tuple[Tensor, Tensor]:
        """Sort-net scores (b, h, c, u + nulls) of query blocks first_block, first_block + 1, ...
        summarised by sq (b, h, c, d) against the key blocks summarised by sk (b, h, u, d) with
        k_count (b, u) real keys, and which candidates are admissible (broadcastable to the scores).
        The simple sort net also reads `own_keys`, the key summary over each query block's span."""
        u = sk.shape[-2]
        if self.use_simple_sort_net:
            if u > self.max_blocks:
                raise ValueError(f'{u} key blocks but the simple sort net was built for at most {self.max_blocks} '
                                 f'(max_seq_len): build the model with a larger max_seq_len')
            weight = torch.cat((self.sort_weight[..., :u], self.sort_weight[..., self.max_blocks:]), dim=-1)
            scores = torch.einsum('b h c e, h e u -> b h c u', torch.cat((sq, own_keys), dim=-1), weight.to(sq.dtype))
            scores = F.leaky_relu(scores) if self.causal else F.relu(scores)  # as the seed
        else:
            scores = torch.einsum('b h c d, b h u d -> b h c u', sq, sk) * self.scale
            if self.n_null:
                nulls = torch.einsum('b h c d, h u d -> b h c u', sq, self.null_keys.to(sq.dtype)) * self.scale
                scores = torch.cat((scores, nulls), dim=-1)

        c = scores.shape[-2]
        # candidates: the u key blocks, then the null blocks, which are always admissible
        block = torch.arange(u + self.n_null, device=sq.device)
        query_block = rearrange(torch.arange(first_block, first_block + c, device=sq.device), 'c -> c 1')
        counts = F.pad(k_count, (0, self.n_null), value=1)
        valid = rearrange(counts > 0, 'b u -> b 1 1 u')  # a block of padding is no candidate
        if self.causal and not self.cross:
            valid = valid & ((block < query_block) | (block >= u))  # completed blocks strictly before the query's
        elif self.own_block and self.n_sortcut == 0:
            valid = valid & (block != query_block)     # the own block is attended anyway
        return scores, valid.expand(-1, -1, c, -1)

    def normalise(self, scores: Tensor, valid: Tensor) -> Tensor:
        """Scores -> selection weights (b, h, c, u): softmax rows, or a Gumbel-Sinkhorn matrix."""
        permutative = not self.non_permutative and not self.causal
        # Gumbel-Sinkhorn works on the log-weights of a positive matrix (seed and paper)
        logits = (F.relu(scores) + 1e-6).log() if permutative else scores
        if permutative and self.training:
            logits = logits + gumbel_noise(logits)
        logits = logits / self.temperature
        if not permutative or logits.shape[-2] == 1:  # one row (sortcut): its column normalisation is void
            return masked_softmax(logits, valid)
        return sinkhorn(logits, valid.expand_as(logits), self.sinkhorn_iter)

    # ------------------------------------------------------------ plan

    def n_select(self, u: int) -> int:
        """How many key blocks each query block selects, given u key blocks."""
        excluded = 1 if self.own_block and self.n_sortcut == 0 and not self.causal else 0
        return max(0, min(self.n_sortcut or self.n_top, u + self.n_null - excluded))

    def choose(self, sq, sk, k_count, own_keys=None, *, first_block=0, select=None):
        """Selected key blocks (b, h, c, k) (-1 = none: a null or inadmissible candidate), the
        candidate ids `select` (replayed when given) and the weights of the selected blocks."""
        b, h = sq.shape[:2]
        k_sel = self.n_select(sk.shape[-2])
        if k_sel == 0:
            none = torch.zeros(b, h, sq.shape[-2], 0, dtype=torch.long, device=sq.device)
            return none, none, sq.new_zeros(none.shape)
        scores, valid = self.scores(sq, sk, k_count, own_keys, first_block=first_block)
        weights = self.normalise(scores, valid)
        if select is None:  # the discrete choice carries no gradient; a reversible recompute replays it
            select = topk_first(weights.detach(), k_sel).indices
        chosen = valid.expand_as(weights).gather(-1, select) & (select < sk.shape[-2])
        return select.masked_fill(~chosen, -1), select, weights.gather(-1, select)

    def route(self, inp):
        q, k, mask, causal, cached = inp.q, inp.k, inp.mask, inp.causal, inp.cached
        if causal != (self.causal and not self.cross):
            raise ValueError(f'this SinkhornRouter was built with causal={self.causal}, cross={self.cross} but is '
                             f'called with causal={causal}: build it with the attention layer\'s settings')
        n, m, w = q.shape[-2], k.shape[-2], self.bucket_size
        if not self.cross:
            self.check_length(n)
        c = math.ceil(n / w)
        q_mask = inp.q_mask if self.cross else mask  # padded queries must not steer the routing of real ones
        sk, k_count = block_mean(k, mask, self.kv_bucket_size)
        sq = self.query_summary(q, q_mask)
        own_keys = self.query_summary(k, mask) if self.use_simple_sort_net else None
        blocks, select, gate = self.choose(sq, sk, k_count.expand(q.shape[0], -1), own_keys,
                                           select=cached.router_state['select'] if exists(cached) else None)

        if self.n_sortcut > 0:  # one choice for every query block
            blocks, gate = blocks.expand(-1, -1, c, -1), gate.expand(-1, -1, c, -1)
            if self.own_block:  # a query block's own block is attended with weight 1 already
                blocks = blocks.masked_fill(blocks == rearrange(torch.arange(c, device=q.device), 'c -> c 1'), -1)

        kv_index, kv_gate = self.gather_blocks(blocks, gate, m, first_block=0, upto=n)
        info = dict(contiguous_queries=True, select=select, blocks=blocks)
        if self.causal:  # what cached decoding needs of the prefix besides its keys: the recent queries
            recent = slice(max(0, n - w + 1), n)
            info['q_window'] = q[..., recent, :].detach()
            info['q_window_mask'] = q_mask[:, recent] if exists(q_mask) else None
        q_index = torch.arange(c * w, device=q.device).view(1, 1, c, w)
        return RoutePlan(q_index=q_index, kv_index=kv_index, kv_gate=kv_gate, router_state=info)

    def gather_blocks(self, blocks: Tensor, gate: Tensor, m: int, *, first_block: int,
                      upto: int) -> tuple[Tensor, Tensor]:
        """Selected key blocks (b, h, c, k) (-1 = none) and their weights -> kv_index and kv_gate
        (b, h, c, j): the m keys' positions in every selected block, then, in self-attention, the
        own block's positions below `upto`."""
        wk, w = self.kv_bucket_size, self.bucket_size
        blocks_ = rearrange(blocks, '... k -> ... k 1')
        pos = blocks_ * wk + torch.arange(wk, device=blocks.device)
        pos = pos.masked_fill((blocks_ < 0) | (pos >= m), -1)
        kv_index = rearrange(pos, 'b h c k w -> b h c (k w)')
        kv_gate = repeat(gate * (blocks >= 0), 'b h c k -> b h c (k w)', w=wk)
        if self.own_block:
            b, h, c = blocks.shape[:3]
            starts = torch.arange(first_block, first_block + c, device=blocks.device) * w
            own = rearrange(starts, 'c -> c 1') + torch.arange(w, device=blocks.device)
            own = own.masked_fill(own >= upto, -1)
            kv_index = torch.cat((kv_index, own.expand(b, h, c, w)), dim=-1)
            kv_gate = torch.cat((kv_gate, kv_gate.new_ones(b, h, c, w)), dim=-1)
        return kv_index, kv_gate

    # ------------------------------------------------------------ cached decoding

    def window_summary(self, t: Tensor, mask: Tensor | None) -> Tensor:
        """The mean over the last (up to w) positions of t, laid out as the forward pass lays out
        a causal window (left-padded to w), so decoding reproduces its numbers."""
        w, length = self.bucket_size, t.shape[-2]
        real = mask.bool() if exists(mask) else torch.ones(1, length, dtype=torch.bool, device=t.device)
        t, real = F.pad(t, (0, 0, w - length, 0)), F.pad(real, (w - length, 0), value=False)
        return block_mean(t, real, w)[0]

    def advance_window(self, q: Tensor, cache: SortCache, q_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Appends the new routing query (and, in cross-attention, its mask) to the recent ones;
        returns the (up to w) ones ending at it."""
        window, window_mask = cache.q_window, cache.q_window_mask
        if exists(window_mask) or exists(q_mask):
            def real(m, like):
                return m.bool() if exists(m) else torch.ones(like.shape[0], like.shape[-2], dtype=torch.bool,
                                                             device=like.device)
            new_mask = real(q_mask, q)
            window_mask = new_mask if window is None else torch.cat((real(window_mask, window), new_mask), dim=-1)
        window = q if window is None else torch.cat((window, q), dim=-2)
        keep = max(0, window.shape[-2] - self.bucket_size + 1)
        cache.q_window = window[..., keep:, :]
        cache.q_window_mask = window_mask[:, keep:] if exists(window_mask) else None
        last = slice(max(0, window.shape[-2] - self.bucket_size), None)
        return window[..., last, :], (window_mask[:, last] if exists(window_mask) else None)

    def key_summaries(self, k: Tensor, mask: Tensor | None, upto_block: int, cache: SortCache):
        """Summaries of the key blocks before `upto_block`, extended as blocks complete."""
        w, b = self.bucket_size, k.shape[0]
        sk, count = cache.k_summary, cache.k_count
        done = 0 if sk is None else sk.shape[-2]
        if sk is None or upto_block > done:
            span = slice(done * w, upto_block * w)
            new_sk, new_count = block_mean(k[..., span, :], mask[:, span] if exists(mask) else None, w)
            new_count = new_count.expand(b, -1)
            sk = new_sk if sk is None else torch.cat((sk, new_sk), dim=-2)
            count = new_count if count is None else torch.cat((count, new_count), dim=-1)
            cache.k_summary, cache.k_count = sk, count
        return sk, count

    def prefill(self, inp, plan):
        """The recent routing queries of the prefix and, in self-attention, its routing keys, from
        which the summaries of the blocks are recomputed as they complete."""
        if not self.causal:
            return RouterCache()  # decode_step says what to change
        recent = (plan.router_state['q_window'], plan.router_state['q_window_mask']) if exists(plan) else (None, None)
        if self.cross:  # the context arrives with every step
            return SortCache(keys=None, mask=None, q_window=recent[0], q_window_mask=recent[1])
        return SortCache.of(inp, q_window=recent[0], q_window_mask=recent[1])

    def check_block(self, cache: SortCache, block: int) -> None:
        if cache.block != block:
            raise ValueError('cached decoding starts at a block boundary: prefill a multiple of bucket_size tokens')

    def decode_step(self, step, cache):
        if not self.causal or self.cross:
            raise ValueError('cached decoding needs a causal SinkhornRouter')
        cache.extend(step)
        k, mask, pos = cache.keys, cache.mask, step.offset
        block, offset = divmod(pos, self.bucket_size)
        window, _ = self.advance_window(step.q, cache)
        if offset == 0:  # a block starts: route it from what is known now, keep that for the block
            start = pos + 1 - window.shape[-2]
            window_mask = mask[:, start:pos + 1]
            sq = self.window_summary(window, window_mask)
            own_keys = self.window_summary(k[..., start:pos + 1, :], window_mask) if self.use_simple_sort_net else None
            sk, count = self.key_summaries(k, mask, block, cache)
            cache.blocks, _, cache.gate = self.choose(sq, sk, count, own_keys, first_block=block)
            cache.block = block
        self.check_block(cache, block)
        kv_index, kv_gate = self.gather_blocks(cache.blocks, cache.gate, pos + 1, first_block=block, upto=pos + 1)
        return RoutePlan(q_index=None, kv_index=kv_index, kv_gate=kv_gate, q_offset=pos)

    def decode_context_step(self, step, cache):
        if not self.causal:
            raise ValueError('cached decoding needs a SinkhornRouter built with causal=True')
        k, mask, pos = step.k, step.mask, step.offset
        block, offset = divmod(pos, self.bucket_size)
        window, window_mask = self.advance_window(step.q, cache, step.q_mask)
        if cache.k_summary is None:  # the context never changes: summarise it once
            sk, count = block_mean(k, mask, self.kv_bucket_size)
            cache.k_summary, cache.k_count = sk, count.expand(k.shape[0], -1)
        if offset == 0:
            sq = self.window_summary(window, window_mask)
            cache.blocks, _, cache.gate = self.choose(sq, cache.k_summary, cache.k_count, first_block=block)
            cache.block = block
        self.check_block(cache, block)
        kv_index, kv_gate = self.gather_blocks(cache.blocks, cache.gate, k.shape[-2], first_block=block, upto=0)
        return RoutePlan(q_index=None, kv_index=kv_index, kv_gate=kv_gate, q_offset=pos)

    def extra_repr(self):
        net = 'simple' if self.use_simple_sort_net else 'attention'
        return (f'bucket_size={self.bucket_size}, kv_bucket_size={self.kv_bucket_size}, n_top={self.n_top}, '
                f'n_sortcut={self.n_sortcut}, sort_net={net}, causal={self.causal}, cross={self.cross}')
