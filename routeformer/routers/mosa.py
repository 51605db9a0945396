"""Mixture of Sparse Attention (MoSA; Piękos, Csordás and Schmidhuber 2025, arXiv 2505.00315,
reference code github.com/piotrpiekos/MoSA).

Every routed head is an expert that chooses its own tokens: a learned router scores each token
once per head (sigmoid), the head attends only among the tokens it chose (causally by original
position in a decoder), and its output at a chosen token is scaled by that token's score, which
is how the router gets its gradient; tokens a head did not choose get nothing from it.

What we changed:
- the router sees the routed heads' queries (pre-rotary), not the layer input: the score of head
  e is a linear map of all routed heads' queries of the token, concatenated (one weight per head,
  query head and feature), then a sigmoid. The queries are a linear map of the layer input, so
  this is the paper's `sigmoid(W_r x)` restricted to what the query projection keeps.
- causal routing is causal. The reference's top-k over the whole sequence is not (which tokens a
  head takes depends on later tokens), so in causal mode each token is admitted by its own score
  against the head's threshold `tau`, an exponential moving average (bias-corrected) of the
  per-batch score quantile that keeps 1 / sparsity of the tokens. It is updated by training
  forwards after they routed, from finite scores of real tokens only, and undone by
  `discard_statistics`. Before any training forward `tau` is 0.5 (logit 0). A head takes at most
  `capacity` tokens; when more pass, the earliest ones are kept. So the set up to position t
  depends on nothing after t, and cached decoding admits the new token by its own score.
- `threshold_gate` (off by default, the paper's gate): in causal mode a chosen token's gate is
  its score relative to its head's threshold, sigmoid(logit(s) - logit(tau)), in [0.5, 1). The
  threshold follows the scores, so a fall of all of a head's logits changes none of its
  selections; with the score as the gate it shrinks all of the head's outputs instead, and on
  associative recall a layer's scores fell to about 1e-4, where the sigmoid passes almost no
  gradient.
- `value_gate` (off by default): a chosen token's value is scaled by its gate too. The paper gates
  a head's outputs only, so a token's score learns from what its own output does for the loss and
  never from the queries that read it. On associative recall, where only the answers are scored,
  nothing kept the key-value pairs in the heads' sets: accuracy reached 81% and fell to 41% as
  training went on (94% and 77% with `threshold_gate`). With the values gated, every query that
  reads a token pulls its score: 99.9% at step 200, 100% after (benchmarks/README.md, "Long-range
  tasks: the runs").
- the encoder (`causal=False`) form is the paper's expert-choice top-k: each head takes its
  max(2, n // sparsity) best tokens (padding never, unless fewer real tokens exist).
- every head computes its queries, keys and values for all tokens (the executor gathers them);
  the paper's saving of projecting only the chosen tokens is left out.

Axes: b batch, h heads (the router's routed heads), e heads scored, n sequence, d head dim,
j selected tokens (slots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from ..attention.plan import RoutePlan
from ..helpers import check_positive, compiling, exists, topk_first
from .base import Router, RouterCache

NEG_INF = float('-inf')
# the threshold before any training forward: score 0.5, a logit of 0
INITIAL_THRESHOLD = 0.5


def pack_positions(chosen: Tensor, most: int | None = None) -> Tensor:
    """(b, h, n) bool -> (b, h, j) the chosen positions in order, -1 in the slots after them;
    j is the most any head chose (at least 1); in a compiled graph, which cannot size a tensor by
    data, the most any head may choose (`most`, or n)."""
    rank = chosen.long().cumsum(dim=-1)
    if compiling():
        width = max(min(chosen.shape[-1], most or chosen.shape[-1]), 1)
    else:
        width = max(int(rank[..., -1].max()) if chosen.shape[-1] else 0, 1)
    slot = torch.where(chosen, rank - 1, width)  # the rest go to a dump slot, cut below
    positions = torch.arange(chosen.shape[-1], device=chosen.device).expand_as(rank)
    index = torch.full((*chosen.shape[:-1], width + 1), -1, dtype=torch.long, device=chosen.device)
    return index.scatter(-1, slot, torch.where(chosen, positions, -1))[..., :width]


@dataclass
class SelectionCache(RouterCache):
    """Every head's selected positions (b, h, j) (-1: empty slot), their gates (b, h, j) and how
    many it holds (b, h)."""
    selected: Tensor
    gates: Tensor
    count: Tensor


class MoSARouter(Router):
    """Expert-choice token selection per head (MoSA).

    `heads`, `dim_head`: the routed heads this router serves. `sparsity`: a head takes about
    n / sparsity of n tokens. `capacity`: the most tokens a head takes in causal mode (None: no
    bound). `include_first`: every head also takes position 0 (the reference's option).
    `threshold_decay`: EMA decay of the causal thresholds. `threshold_gate`: in causal mode, gate a
    chosen token by its score relative to its head's threshold (False: by the score, as the
    expert-choice form does). `value_gate`: scale a chosen token's value by its gate too.
    """

    def __init__(self, *, heads: int, dim_head: int, sparsity: float = 16, capacity: int | None = None,
                 include_first: bool = False, threshold_decay: float = 0.99, threshold_gate: bool = False,
                 value_gate: bool = False):
        super().__init__()
        check_positive(heads=heads, dim_head=dim_head, **({} if capacity is None else dict(capacity=capacity)))
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not sparsity >= 1:
            raise ValueError(f'sparsity must be a number >= 1 (a head takes n / sparsity tokens), got {sparsity!r}')
        if not 0. <= threshold_decay < 1.:
            raise ValueError(f'threshold_decay must be in [0, 1), got {threshold_decay}')
        self.sparsity, self.capacity, self.include_first = sparsity, capacity, include_first
        self.threshold_decay, self.threshold_gate, self.value_gate = threshold_decay, threshold_gate, value_gate
        fan_in = heads * dim_head
        self.weight = nn.Parameter(torch.empty(heads, heads, dim_head).uniform_(-fan_in ** -0.5, fan_in ** -0.5))
        # bias-corrected EMA of the per-batch quantiles: tau = ema / weight (weight 0: none seen yet)
        self.register_buffer('threshold_ema', torch.zeros(heads))
        self.register_buffer('threshold_weight', torch.zeros(heads))
        # the thresholds before the training forwards of the current step, for discard_statistics; a
        # step ends with its backward pass (a weight-tied router routes several layers in one step)
        self._saved: tuple[Tensor, Tensor] | None = None
        self._backward_ran = False

    # ------------------------------------------------------------------ scores and thresholds

    def logits(self, q: Tensor) -> Tensor:
        """q (b, h, n, d) -> router logits (b, e, n) in at least float32. Products in float64,
        rounded to q's precision: a token gets the same score in a batch of n as alone while
        decoding, so its admission against the threshold is the same in both."""
        with torch.autocast(q.device.type, enabled=False):
            logits = torch.einsum('b h n d, e h d -> b e n', q.double(), self.weight.double())
        return logits.to(torch.promote_types(q.dtype, torch.float32))

    def scores(self, q: Tensor) -> Tensor:
        """q (b, h, n, d) -> sigmoid scores (b, e, n)."""
        return torch.sigmoid(self.logits(q))

    def gate_values(self, logits: Tensor, tau: Tensor | None, s: Tensor | None = None) -> Tensor:
        """The gates (b, e, n) of tokens with these logits, were they chosen: the score (`s` when
        the caller has it), or with a threshold tau (e,) the score relative to it (tau 0: every
        gate 1)."""
        if tau is None:
            return torch.sigmoid(logits) if s is None else s
        return torch.sigmoid(logits - rearrange(torch.logit(tau.to(logits.dtype)), 'e -> e 1'))

    def threshold(self) -> Tensor:
        """(h,) the causal admission thresholds."""
        seen = self.threshold_weight > 0
        return torch.where(seen, self.threshold_ema / self.threshold_weight.clamp(min=1e-30), INITIAL_THRESHOLD)

    @torch.no_grad()
    def accumulate(self, s: Tensor, ok: Tensor) -> None:
        """Moves the thresholds toward this batch's: per head, the score of its (count / sparsity)-th
        best token among those where `ok` (b, h, n) (real tokens with a finite score). A head with
        no such token keeps its threshold."""
        if self._saved is None and not compiling():
            self._saved = (self.threshold_ema.clone(), self.threshold_weight.clone())
        flat = rearrange(torch.where(ok, s, NEG_INF), 'b h n -> h (b n)')
        count = rearrange(ok, 'b h n -> h (b n)').sum(dim=-1)
        kth = (count / self.sparsity).ceil().long().clamp(min=1) - 1
        quantile = flat.sort(dim=-1, descending=True).values.gather(-1, kth[:, None]).squeeze(-1)
        seen = count > 0
        decay = self.threshold_decay
        ema = decay * self.threshold_ema + (1. - decay) * quantile.to(self.threshold_ema.dtype)
        weight = decay * self.threshold_weight + (1. - decay)
        self.threshold_ema.copy_(torch.where(seen, ema, self.threshold_ema))
        self.threshold_weight.copy_(torch.where(seen, weight, self.threshold_weight))

    @torch.no_grad()
    def discard_statistics(self) -> None:
        """Undoes the threshold updates of the training forwards of the current step: those since
        the last training forward that followed a backward pass (a skipped step's)."""
        if self._saved is not None:
            self.threshold_ema.copy_(self._saved[0])
            self.threshold_weight.copy_(self._saved[1])
            self._saved = None

    # ------------------------------------------------------------------ routing

    def route(self, inp):
        q, mask, causal, cached = inp.q, inp.mask, inp.causal, inp.cached
        logits = self.logits(q)
        s = torch.sigmoid(logits)
        # the step bookkeeping of discard_statistics needs a hook, which a compiled graph cannot
        # register: compiled, a skipped step's threshold updates are undone by restoring the buffers
        if self.training and logits.requires_grad and not compiling():
            logits.register_hook(self._mark_backward)
        if exists(cached):  # a reversible recompute: the same tokens and thresholds, the gates recomputed
            tau = cached.router_state['gate_threshold']
            gate = self.gates(self.gate_values(logits, tau, s), cached.q_index[:, :, 0])
            return replace(cached, **self.gate_fields(gate[:, :, None]))
        if self.training and self._backward_ran:  # a new step: the updates of the last one stay
            self._saved, self._backward_ran = None, False
        b, h, n = s.shape
        valid = torch.ones(b, 1, n, dtype=torch.bool, device=q.device) if mask is None else mask[:, None]
        ok = valid & torch.isfinite(s)
        # the thresholds this forward admits by, before it moves them
        tau = self.threshold() if causal and self.threshold_gate else None
        index = self.admit_causal(s, ok, valid) if causal else self.top_tokens(s, ok, valid)
        if self.training and causal:
            self.accumulate(s.detach(), ok.expand(b, h, n))
        slots = rearrange(index, 'b h j -> b h 1 j')
        gate = self.gates(self.gate_values(logits, tau, s), index)
        return RoutePlan(q_index=slots, kv_index=slots, **self.gate_fields(gate[:, :, None]),
                         router_state=dict(selected=index, gate_threshold=tau))

    def gate_fields(self, gate: Tensor) -> dict:
        """The plan's gates from the chosen tokens' gates (b, h, 1, j): their outputs', and with
        `value_gate` their values' too."""
        return dict(q_gate=gate, kv_gate=gate if self.value_gate else None)

    def _mark_backward(self, grad: Tensor) -> None:
        self._backward_ran = True

    @staticmethod
    def gates(s: Tensor, index: Tensor) -> Tensor:
        """(b, h, j) the gates s (b, h, n) of the selected tokens, 0 in empty slots."""
        return torch.where(index >= 0, s.gather(-1, index.clamp(min=0)), 0.)

    def admit_causal(self, s: Tensor, ok: Tensor, valid: Tensor) -> Tensor:
        """Tokens whose score reaches their head's threshold, the earliest `capacity` of them."""
        with torch.no_grad():
            chosen = ok & (s >= rearrange(self.threshold(), 'h -> h 1'))
            if self.include_first:
                chosen[..., 0] |= valid[..., 0]
            if exists(self.capacity):
                chosen &= chosen.long().cumsum(dim=-1) <= self.capacity
            return pack_positions(chosen, self.capacity)

    def top_tokens(self, s: Tensor, ok: Tensor, valid: Tensor) -> Tensor:
        """Each head's max(2, n // sparsity) best-scoring real tokens (expert choice), in order."""
        with torch.no_grad():
            n = s.shape[-1]
            k = min(max(int(n // self.sparsity), 2), n)
            ranking = torch.where(ok, s, NEG_INF)
            if self.include_first:
                ranking[..., 0] = torch.where(valid[..., 0], math.inf, ranking[..., 0])
            top = topk_first(ranking, k)
            index = torch.where(top.values > NEG_INF, top.indices, n).sort(dim=-1).values
            return index.masked_fill(index == n, -1)

    # ------------------------------------------------------------------ cached decoding

    def prefill(self, inp, plan):
        if exists(plan):
            selected, gates = plan.router_state['selected'], plan.q_gate[:, :, 0]
        else:
            selected = torch.full((*inp.q.shape[:2], 1), -1, dtype=torch.long, device=inp.q.device)
            gates = torch.zeros(selected.shape, dtype=torch.promote_types(inp.q.dtype, torch.float32),
                                device=inp.q.device)
        return SelectionCache(selected=selected, gates=gates, count=(selected >= 0).sum(dim=-1))

    def decode_step(self, step, cache):
        """The new token joins its heads' sets when its own score reaches the threshold and the
        head is under capacity; it attends to its head's set, and gets nothing from a head it did
        not join. With `value_gate` the set's values are scaled by the gates they joined with."""
        pos, q = step.offset, step.q
        logits = self.logits(q)
        scores = torch.sigmoid(logits)
        s = scores[..., 0]  # (b, h)
        tau = self.threshold()
        valid = step.key_mask()
        joins = valid & torch.isfinite(s) & (s >= tau)
        if self.include_first and pos == 0:
            joins = valid.expand_as(joins)
        if exists(self.capacity):
            joins = joins & (cache.count < self.capacity)
        gate = torch.where(joins, self.gate_values(logits, tau if self.threshold_gate else None, scores)[..., 0], 0.)
        selected, gates, count = cache.selected, cache.gates, cache.count
        if int((count + joins.long()).max()) > selected.shape[-1]:
            selected = torch.cat((selected, selected.new_full((*selected.shape[:-1], 1), -1)), dim=-1)
            gates = torch.cat((gates, gates.new_zeros((*gates.shape[:-1], 1))), dim=-1)
        slot = torch.where(joins, count, selected.shape[-1] - 1)[..., None]
        # a head the token did not join rewrites its last slot with what that slot holds
        cache.selected = selected.scatter(-1, slot, torch.where(joins[..., None], pos, selected.gather(-1, slot)))
        cache.gates = gates.scatter(-1, slot, torch.where(joins[..., None], gate[..., None].to(gates.dtype),
                                                          gates.gather(-1, slot)))
        cache.count = count + joins.long()
        return RoutePlan(q_index=None, kv_index=rearrange(cache.selected, 'b h j -> b h 1 j'), q_offset=pos,
                         q_gate=rearrange(gate, 'b h -> b h 1 1'),
                         kv_gate=rearrange(cache.gates, 'b h j -> b h 1 j') if self.value_gate else None,
                         router_state=dict(joins=joins))

    def extra_repr(self):
        return (f'heads={self.weight.shape[0]}, sparsity={self.sparsity}, capacity={self.capacity}, '
                f'include_first={self.include_first}, threshold_decay={self.threshold_decay}, '
                f'threshold_gate={self.threshold_gate}, value_gate={self.value_gate}')
