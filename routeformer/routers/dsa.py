"""DSA: DeepSeek sparse attention (DeepSeek-AI 2025, DeepSeek-V3.2-Exp, `deepseek-ai/DeepSeek-V3.2-Exp`).

A small "lightning indexer" scores every earlier token s for the query t as
I(t, s) = sum_j w(t, j) * relu(<q_I(t, j), k_I(s)>), with `index_n_heads` indexer heads of width
`index_head_dim` and one shared indexer key; each query attends to its `index_topk` best earlier
tokens only (the same tokens in every head of the layer). The selection has no gradient; the
indexer learns from its own loss, the KL divergence from the main attention's distribution over
the selected tokens (summed over heads and renormalised) to softmax(I), on detached inputs, so
that it never changes the main model. For `dense_warmup_steps` training forwards the layer attends
densely and the indexer learns the dense distribution, as in the paper's warm-up stage (which
starts from a trained dense model; here the rest of the model trains too, densely).

What we changed: the indexer reads the attention's queries and keys of its heads (all heads
concatenated, detached) instead of the hidden state: they are linear in the normed hidden state,
so this is the reference indexer restricted to the attention projections' row space, and routing
needs no other input. The main attention's distribution in the KL target is computed from those
same pre-rotary vectors (positions are applied after routing); with absolute or no positions it is
the attention's own. The indexer key is not normalised and has no rotary part.

Axes: b batch, h heads, n queries, m keys, d head dim, i indexer heads, e indexer head dim,
k selected tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..attention.plan import RoutePlan
from ..helpers import check_positive, exists, precise
from .base import Router, RouterCache
from .selection import dense_enough, select_top, selection_plan

# query rows scored at once: bounds the (b, rows, i, m) indexer products
SCORE_ELEMENTS = 2 ** 22


class LightningIndexer(nn.Module):
    """Indexer queries, weights and keys from the attention's queries/keys (b, h, n, d)."""

    def __init__(self, dim_in: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim_in, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim_in, dim_head, bias=False)
        self.to_w = nn.Linear(dim_in, heads, bias=False)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Indexer queries (b, n, i, e), head weights (b, n, i) and keys (b, m, e)."""
        return *self.queries(q), self.keys(k)

    def queries(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """(b, h, n, d) -> indexer queries (b, n, i, e) and their head weights (b, n, i)."""
        x = rearrange(q.detach(), 'b h n d -> b n (h d)')
        return rearrange(self.to_q(x), 'b n (i e) -> b n i e', i=self.heads), self.to_w(x) * self.heads ** -0.5

    def keys(self, k: Tensor) -> Tensor:
        return self.to_k(rearrange(k.detach(), 'b h m d -> b m (h d)'))

    def scores(self, iq: Tensor, w: Tensor, ik: Tensor) -> Tensor:
        """iq (b, n, i, e), w (b, n, i), ik (b, m, e) -> I (b, n, m)."""
        dots = torch.einsum('b n i e, b m e -> b n i m', iq, ik) * self.scale
        return torch.einsum('b n i m, b n i -> b n m', F.relu(dots), w)

    def scores_at(self, iq: Tensor, w: Tensor, ik: Tensor, index: Tensor) -> Tensor:
        """I at the tokens index (b, n, k) (clamped; mask -1 slots yourself) -> (b, n, k)."""
        if dense_enough(ik.shape[1], index.shape[-1]):
            return self.scores(iq, w, ik).gather(-1, index.clamp(min=0))
        picked = ik[torch.arange(ik.shape[0], device=ik.device)[:, None, None], index.clamp(min=0)]
        dots = torch.einsum('b n i e, b n k e -> b n i k', iq, picked) * self.scale
        return torch.einsum('b n i k, b n i -> b n k', F.relu(dots), w)


@dataclass
class IndexerCache(RouterCache):
    """The indexer keys (b, n, e) and key mask (b, n) of every position so far."""
    index_keys: Tensor
    mask: Tensor


class DSARouter(Router):
    """`heads`, `dim_head`: the routed heads this router serves; `index_n_heads`,
    `index_head_dim`, `index_topk`: the indexer's heads, their width and the tokens each query
    attends (the paper's 64, 128 and 2048); `index_loss_weight` scales the indexer's KL loss;
    `dense_warmup_steps`: training forwards with dense attention before selection starts."""

    def __init__(self, *, heads: int, dim_head: int, index_n_heads: int = 64, index_head_dim: int = 128,
                 index_topk: int = 2048, index_loss_weight: float = 1., dense_warmup_steps: int = 0):
        super().__init__()
        check_positive(heads=heads, dim_head=dim_head, index_n_heads=index_n_heads, index_head_dim=index_head_dim,
                       index_topk=index_topk)
        if dense_warmup_steps < 0 or index_loss_weight < 0:
            raise ValueError(f'dense_warmup_steps and index_loss_weight must be at least 0, got '
                             f'{dense_warmup_steps} and {index_loss_weight}')
        self.indexer = LightningIndexer(heads * dim_head, index_n_heads, index_head_dim)
        self.topk, self.loss_weight, self.warmup = index_topk, index_loss_weight, dense_warmup_steps
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))
        # the host's view of whether the warm-up is still on: while it is, each training forward reads
        # `steps` (a host sync, and a graph break when compiled); after it, nothing is read
        self.warming_up = dense_warmup_steps > 0

    def select(self, iq: Tensor, w: Tensor, ik: Tensor, mask: Tensor | None, causal: bool, offset: int = 0) -> Tensor:
        """The best `index_topk` allowed tokens of every query (b, n, k), -1 for empty slots; in
        causal mode a query at t = offset + row sees tokens s <= t."""
        b, n, i, _ = iq.shape
        m = ik.shape[1]
        keys = torch.arange(m, device=iq.device)
        rows = max(1, SCORE_ELEMENTS // (b * i * m))
        picks = []
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            allowed = torch.ones(1, stop - start, m, dtype=torch.bool, device=iq.device)
            if causal:
                allowed = allowed & (keys <= offset + torch.arange(start, stop, device=iq.device)[:, None])
            if exists(mask):
                allowed = allowed & mask[:, None, :]
            with torch.autocast(iq.device.type, enabled=False):
                scores = self.indexer.scores(precise(iq[:, start:stop]), precise(w[:, start:stop]), precise(ik))
            picks.append(select_top(scores, allowed, self.topk))
        return torch.cat(picks, dim=1)

    def index_loss(self, q: Tensor, k: Tensor, index: Tensor, iq: Tensor, w: Tensor, ik: Tensor) -> Tensor:
        """KL(p || softmax(I)) over each query's candidate tokens `index` (b, n, k), -1 empty: p is
        the main attention's distribution over them (per head, summed over heads, renormalised)."""
        valid = index >= 0
        with torch.no_grad():
            rows = self.chunk_rows(q, index)
            target = torch.cat([self.target(qs, k, part) for qs, part in
                                zip(q.split(rows, dim=-2), index.split(rows, dim=1))], dim=1)
        log_scores = precise(self.indexer.scores_at(iq, w, ik, index)).masked_fill(~valid, float('-inf'))
        log_scores = log_scores.log_softmax(dim=-1)
        kl = torch.where(valid & (target > 0), target * (target.clamp(min=1e-12).log() - log_scores), 0.)
        return kl.sum(dim=-1).mean() * self.loss_weight

    @staticmethod
    def chunk_rows(q: Tensor, index: Tensor) -> int:
        """Query rows whose gathered keys (b, h, rows, k, d) hold about SCORE_ELEMENTS values."""
        b, h, _, d = q.shape
        return max(1, SCORE_ELEMENTS // (b * h * index.shape[-1] * d))

    @staticmethod
    def target(q: Tensor, k: Tensor, index: Tensor) -> Tensor:
        """The main attention's distribution over the tokens `index` (b, n, k) of the queries q
        (b, h, n, d): softmax per head, summed over heads, renormalised; 0 at empty slots."""
        b, h, n, d = q.shape
        if dense_enough(k.shape[-2], index.shape[-1]):  # every logit, then the selected ones
            logits = torch.einsum('b h n d, b h m d -> b h n m', precise(q), precise(k))
            logits = logits.gather(-1, repeat(index.clamp(min=0), 'b n k -> b h n k', h=h)) * d ** -0.5
        else:
            picked = k[torch.arange(b, device=k.device)[:, None, None, None],
                       torch.arange(h, device=k.device)[:, None, None], index.clamp(min=0)[:, None]]  # (b, h, n, k, d)
            logits = torch.einsum('b h n d, b h n k d -> b h n k', precise(q), precise(picked)) * d ** -0.5
        target = logits.masked_fill((index < 0)[:, None], float('-inf')).softmax(dim=-1).nan_to_num(0.).sum(dim=1)
        return target / target.sum(dim=-1, keepdim=True).clamp(min=1e-12)

    def route(self, inp):
        q, k, mask, causal, cached = inp.q, inp.k, inp.mask, inp.causal, inp.cached
        iq, w, ik = self.indexer(q, k)
        if exists(cached):  # a reversible recompute: the same selection, the loss with gradients
            aux = self.index_loss(q, k, cached.router_state['index'], iq, w, ik) if self.training else None
            return replace(cached, aux_loss=aux)
        if self.training and self.warming_up:
            self.warming_up = bool(self.steps < self.warmup)
        dense = self.training and self.warming_up
        if self.training:
            self.steps += 1
        with torch.no_grad():
            index = self.every_token(q, mask, causal) if dense else self.select(iq, w, ik, mask, causal)
        plan = RoutePlan(q_index=None, kv_index=None) if dense else selection_plan(rearrange(index, 'b n k -> b 1 n k'),
                                                                                   k.shape[-2])
        plan.router_state.update(index=index, index_keys=ik.detach())
        if self.training:
            plan.aux_loss = self.index_loss(q, k, index, iq, w, ik)
        return plan

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.warming_up = bool(self.steps < self.warmup)

    @staticmethod
    def every_token(q: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """(b, n, m) every key each query may attend, -1 for the others: the dense warm-up's "selection"."""
        n = q.shape[-2]
        keys = torch.arange(n, device=q.device).expand(n, n)
        allowed = keys <= torch.arange(n, device=q.device)[:, None] if causal else torch.ones_like(keys, dtype=torch.bool)
        index = torch.where(allowed, keys, -1).expand(q.shape[0], n, n)
        return index if mask is None else index.masked_fill(~mask[:, None, :], -1)

    def prefill(self, inp, plan):
        index_keys = plan.router_state['index_keys'] if exists(plan) else self.indexer.keys(inp.k)
        return IndexerCache(index_keys=index_keys, mask=inp.key_mask())

    def decode_step(self, step, cache):
        """The new query scores the indexer keys of every position so far, padding excluded."""
        iq, w, new = self.indexer(step.q, step.k)
        cache.index_keys = torch.cat((cache.index_keys, new), dim=1)
        cache.mask = torch.cat((cache.mask, step.key_mask()), dim=-1)
        index = self.select(iq, w, cache.index_keys, cache.mask, causal=True, offset=step.offset)
        return RoutePlan(q_index=None, kv_index=rearrange(index, 'b n k -> b 1 n k'), q_offset=step.offset)

    def extra_repr(self):
        return (f'index_n_heads={self.indexer.heads}, index_head_dim={self.indexer.to_k.out_features}, '
                f'index_topk={self.topk}, dense_warmup_steps={self.warmup}')
