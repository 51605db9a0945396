"""Top-2 gated mixture-of-experts feed-forward (GShard), dispatched without capacity limits."""

from __future__ import annotations

import torch
from einops import einsum, rearrange, repeat
from torch import Tensor, nn

from routeformer.context import LayerContext
from routeformer.helpers import compiling, default, exists

# b batch, n sequence, d feature, f expert hidden feature, t flattened tokens (b n),
# e experts, s the two routing slots of a token (top-1, top-2)

SECOND_POLICIES = ('all', 'none', 'threshold', 'random')


class Top2Gating(nn.Module):
    """Picks two experts per token; returns (indices[t, s], gates[t, s], routed[t, s], balance_loss)."""

    def __init__(
        self,
        dim: int,
        *,
        num_experts: int,
        second_policy_train: str = 'random',
        second_policy_eval: str = 'threshold',
        second_threshold_train: float = 0.2,
        second_threshold_eval: float = 0.2,
        eps: float = 1e-9,
    ):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f'top-2 gating needs num_experts >= 2, got {num_experts}')
        for name, policy in (('second_policy_train', second_policy_train), ('second_policy_eval', second_policy_eval)):
            if policy not in SECOND_POLICIES:
                raise ValueError(f'{name} must be one of {SECOND_POLICIES}, got {policy!r}')
        self.num_experts = num_experts
        self.policy = {True: second_policy_train, False: second_policy_eval}
        self.threshold = {True: second_threshold_train, False: second_threshold_eval}
        self.eps = eps
        self.w_gating = nn.Parameter(torch.randn(dim, num_experts) * dim ** -0.5)

    def keep_second(self, gate_2: Tensor) -> Tensor:
        policy, threshold = self.policy[self.training], self.threshold[self.training]
        if policy == 'all':
            return torch.ones_like(gate_2, dtype=torch.bool)
        if policy == 'none':
            return torch.zeros_like(gate_2, dtype=torch.bool)
        if policy == 'threshold':
            return gate_2 > threshold
        # drawn from the global torch RNG, so a recompute that restores the RNG state replays it exactly
        probs = torch.rand(gate_2.shape, device=gate_2.device)
        return probs < gate_2 / max(threshold, self.eps)

    def forward(self, x: Tensor, real: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # routing decisions are discrete, so compute the probabilities in float32 to keep bf16 ties out
        raw_gates = einsum(x, self.w_gating, 't d, d e -> t e').float().softmax(dim=-1)
        top_gates, indices = raw_gates.topk(2, dim=-1)
        gates = top_gates / (top_gates.sum(dim=-1, keepdim=True) + self.eps)

        routed = torch.stack((real, real & self.keep_second(gates[:, 1])), dim=-1)
        # a dropped second expert leaves the first gate as it was (GShard): the token just gets less update
        gates = gates * routed

        # Switch/GShard balance: E * sum_e(fraction routed to e first * mean probability of e), real tokens only
        real_f = real.float()
        count = real_f.sum().clamp(min=1.)
        fraction = torch.zeros(self.num_experts, device=x.device).index_add_(0, indices[:, 0], real_f) / count
        mean_prob = einsum(raw_gates, real_f, 't e, t -> e') / count
        balance_loss = self.num_experts * (fraction * mean_prob).sum()
        return indices, gates, routed, balance_loss


class Experts(nn.Module):
    """num_experts two-layer feed-forwards held as batched weights; runs each only on its own tokens."""

    def __init__(self, dim: int, *, num_experts: int, hidden_dim: int, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim).uniform_(-1., 1.) * dim ** -0.5)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim).uniform_(-1., 1.) * hidden_dim ** -0.5)
        self.act = activation()

    def forward(self, x: Tensor, indices: Tensor, gates: Tensor, routed: Tensor) -> Tensor:
        if compiling():
            return self.dense(x, indices, gates, routed)
        tokens = repeat(torch.arange(x.shape[0], device=x.device), 't -> t s', s=indices.shape[-1])
        tokens, experts, weights = tokens[routed], indices[routed], gates[routed]

        # grouping the (token, expert) assignments by expert keeps every buffer O(tokens):
        # no (tokens, experts, capacity) one-hot and no token is dropped for lack of capacity
        order = experts.argsort(stable=True)
        tokens, weights = tokens[order], weights[order]
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()

        # accumulate in float32: under autocast the two experts' halves would otherwise add in bf16
        out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        for expert, expert_tokens, expert_weights in zip(range(self.num_experts), tokens.split(counts), weights.split(counts)):
            hidden = self.act(x[expert_tokens] @ self.w1[expert])
            y = hidden @ self.w2[expert]
            out.index_add_(0, expert_tokens, y.float() * rearrange(expert_weights, 't -> t 1'))
        return out

    def dense(self, x: Tensor, indices: Tensor, gates: Tensor, routed: Tensor) -> Tensor:
        """The same sum with static shapes, for a compiled graph: every expert runs on every token
        and a token's outputs are weighted by its gate for that expert (0 where not routed), at
        num_experts times the arithmetic of the grouped dispatch, whose group sizes are data."""
        weights = torch.zeros(x.shape[0], self.num_experts, device=x.device, dtype=torch.float32)
        weights = weights.scatter_add(1, indices, (gates * routed).float())
        hidden = self.act(einsum(x, self.w1, 't d, e d f -> e t f'))
        y = einsum(hidden, self.w2, 'e t f, e f d -> e t d').float()
        return einsum(y, weights, 'e t d, t e -> t d')


class MoE(nn.Module):
    """Top-2 gated mixture-of-experts feed-forward; returns (out, loss_coef * balance_loss)."""

    def __init__(
        self,
        dim: int,
        *,
        num_experts: int = 4,
        hidden_dim: int | None = None,
        activation: type[nn.Module] = nn.ReLU,
        second_policy_train: str = 'random',
        second_policy_eval: str = 'threshold',
        second_threshold_train: float = 0.2,
        second_threshold_eval: float = 0.2,
        loss_coef: float = 1e-2,
    ):
        super().__init__()
        self.loss_coef = loss_coef
        self.gate = Top2Gating(
            dim,
            num_experts=num_experts,
            second_policy_train=second_policy_train,
            second_policy_eval=second_policy_eval,
            second_threshold_train=second_threshold_train,
            second_threshold_eval=second_threshold_eval,
        )
        self.experts = Experts(
            dim, num_experts=num_experts, hidden_dim=default(hidden_dim, 4 * dim), activation=activation
        )

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        mask = ctx.mask if exists(ctx) else None
        if exists(mask) and tuple(mask.shape) != (b, n):
            raise ValueError(f'MoE: ctx.mask must have shape (batch, seq) = {(b, n)}, got {tuple(mask.shape)}')
        real = rearrange(mask, 'b n -> (b n)').bool() if exists(mask) else torch.ones(b * n, dtype=torch.bool, device=x.device)

        tokens = rearrange(x, 'b n d -> (b n) d')
        indices, gates, routed, balance_loss = self.gate(tokens, real)
        out = self.experts(tokens, indices, gates, routed)
        out = rearrange(out, '(b n) d -> b n d', b=b).to(x.dtype)
        return out, balance_loss * self.loss_coef
