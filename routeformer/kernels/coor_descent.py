"""Coordinate descent for the entropic soft top-k (Wright et al. 2015; ε-scaling from Schmitzer 2016,
as used by CoDA/CoLT5), in plain PyTorch.

It solves, for every row of scores s,  max_x <s, x> + ε H(x)  subject to  Σx = k, 0 <= x <= 1,
by coordinate ascent on the dual: a (one number per row) and b (one per entry),

    a <- ε (log k - logsumexp((s + b) / ε)),    b <- -relu(s + a),

with ε shrinking from `eps_init` to `eps` by `eps_decay` per iteration. The soft scores are
x = exp((s + a + b) / ε) = min(1, exp((s + a) / ε)): monotone in s within a row, so ranking by x
and ranking by s agree; x matters for its gradient.

Axes: r rows (any leading shape), n entries per row.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..helpers import default, exists, topk_first

TopkReturn = namedtuple('TopkReturn', ['values', 'indices', 'coor_descent_values', 'gates'])


def epsilon_schedule(n_iters: int, *, eps: float, eps_init: float | None, eps_decay: float) -> list[float]:
    """The ε of each iteration, then the ε of the final scores (one more decay step): n_iters + 1 values.
    Computed once on the host so the PyTorch and Triton paths use the very same numbers."""
    if n_iters < 1:
        raise ValueError(f'coordinate descent needs n_iters >= 1, got {n_iters}')
    if eps <= 0 or (exists(eps_init) and eps_init <= 0):
        raise ValueError(f'eps and eps_init must be positive, got eps={eps}, eps_init={eps_init}')
    if not 0 < eps_decay <= 1:
        raise ValueError(f'eps_decay must be in (0, 1], got {eps_decay}')
    current = max(default(eps_init, eps), eps)
    schedule = []
    for _ in range(n_iters + 1):
        schedule.append(current)
        current = max(current * eps_decay, eps)
    return schedule


def row_k(k, s: Tensor) -> Tensor:
    """k as a float32 tensor of shape (..., 1) matching the rows of s: a number or one per row."""
    k = torch.as_tensor(k, dtype=torch.float32, device=s.device)
    if k.ndim > 0:
        k = k.reshape(*k.shape, 1)
    return k.expand(*s.shape[:-1], 1)


def coor_descent(s: Tensor, *, n_iters: int, k, eps: float = 0.1, eps_init: float | None = None,
                 eps_decay: float = 1., mask: Tensor | None = None) -> Tensor:
    """Soft top-k scores in [0, 1] of s (..., n), about k per row (k a number or a tensor of the
    leading shape). Runs in float32 whatever the input dtype (half-precision logits overflow
    once divided by a small ε) and returns float32. Masked entries (mask False) take no part and
    score 0; a fully masked row scores 0 everywhere."""
    schedule = epsilon_schedule(n_iters, eps=eps, eps_init=eps_init, eps_decay=eps_decay)
    with torch.autocast(s.device.type, enabled=False):
        s = s.float()
        logk = row_k(k, s).clamp(min=1e-20).log()
        exclude = None
        if exists(mask):
            s = s.masked_fill(~mask, 0.)  # finite: masked entries are left out of every sum below
            # rows with nothing valid keep their entries in the sums (and are zeroed at the end),
            # so no logsumexp ever sees only -inf, whose backward is NaN
            exclude = ~mask & mask.any(dim=-1, keepdim=True)

        a, b = s.new_zeros(*s.shape[:-1], 1), -s
        for current in schedule[:-1]:
            sb = (s + b) / current
            if exists(exclude):
                sb = sb.masked_fill(exclude, float('-inf'))
            a = current * (logk - sb.logsumexp(dim=-1, keepdim=True))
            b = -F.relu(s + a)

        scores = ((s + a + b) / schedule[-1]).exp()
        if exists(mask):
            scores = scores.masked_fill(~mask, 0.)
    return scores


def select_coor_descent(fused: bool, s: Tensor):
    """The fused Triton kernel on CUDA when asked for and installed, else the PyTorch loop."""
    if fused and s.is_cuda:
        try:
            from .coor_descent_triton import triton_coor_descent
        except ImportError:
            return coor_descent
        return triton_coor_descent
    return coor_descent


def topk(x: Tensor, k: int, coor_descent_k_ratio: float = 9 / 8, n_iters: int = 20, eps: float = 0.1,
         eps_init: float | None = None, eps_decay: float = 1., mask: Tensor | None = None, fused: bool = False,
         non_differentiable: bool = False) -> TopkReturn:
    """Differentiable top-k along the last axis: `(values, indices, coor_descent_values, gates)`.

    Coordinate descent runs with k * coor_descent_k_ratio (CoLT5 fetches a few more than it keeps,
    for a better gradient); the hard top-k is then taken. `gates` are straight-through: exactly 1
    in the forward pass, the gradient of the soft scores in the backward pass; `values` are
    x * gates at the chosen indices. `fused` uses the Triton kernel on CUDA.
    `non_differentiable` is a plain top-k (gates and soft values None)."""
    if non_differentiable:
        values, indices = topk_first(x, k)
        return TopkReturn(values, indices, None, None)
    if coor_descent_k_ratio < 1:
        raise ValueError(f'coor_descent_k_ratio must be >= 1, got {coor_descent_k_ratio}')
    if not 0 < k <= x.shape[-1]:
        raise ValueError(f'k must be between 1 and the last dimension ({x.shape[-1]}), got {k}')

    fn = select_coor_descent(fused, x)
    soft = fn(x, k=min(k * coor_descent_k_ratio, x.shape[-1]), mask=mask, n_iters=n_iters, eps=eps,
              eps_init=eps_init, eps_decay=eps_decay)
    gates = soft + (1. - soft).detach()
    # soft scores are monotone in x, so ranking by x is the same top-k with a deterministic tie-break
    ranked = x.float() if mask is None else x.float().masked_fill(~mask, float('-inf'))
    indices = topk_first(ranked, k).indices
    gates = gates.gather(-1, indices)
    if exists(mask):
        gates = gates * mask.gather(-1, indices)
    values = (x.gather(-1, indices) * gates).to(x.dtype)
    return TopkReturn(values, indices, soft.gather(-1, indices), gates)
