"""Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys")."""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from routeformer.context import LayerContext

# b batch, n sequence, d feature (dim), h heads, p the two query halves, c keys per half (num_keys),
# e per-head query feature (dim_head), k top-k candidates


class PKM(nn.Module):
    """Product-key memory sublayer: a sparse lookup into num_keys**2 learned values; returns (out, aux)."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 4,
        num_keys: int = 128,
        topk: int = 32,
        dim_head: int = 128,
        input_dropout: float = 0.,
        query_dropout: float = 0.,
        value_dropout: float = 0.,
    ):
        super().__init__()
        if not 1 <= topk <= num_keys:
            raise ValueError(f'PKM topk must be between 1 and num_keys={num_keys}, got topk={topk}')
        self.heads = heads
        self.num_keys = num_keys
        self.topk = topk

        self.input_dropout = nn.Dropout(input_dropout)
        self.to_queries = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        # one norm for both query halves, as in product-key-memory (the seeds' PKM), so its weights load
        self.norm = nn.LayerNorm(dim_head)
        self.query_dropout = nn.Dropout(query_dropout)

        self.keys = nn.Parameter(torch.randn(heads, num_keys, 2, dim_head) * dim_head ** -0.5)
        self.values = nn.EmbeddingBag(num_keys ** 2, dim, mode='sum')
        nn.init.normal_(self.values.weight, std=dim ** -0.5)
        self.value_dropout = nn.Dropout(value_dropout)

    def forward(self, x: Tensor, ctx: LayerContext | None = None) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        x = self.input_dropout(x)

        queries = rearrange(self.to_queries(x), 'b n (p h e) -> p b n h e', p=2, h=self.heads)
        queries = self.norm(queries)
        queries = self.query_dropout(queries)

        dots = einsum(queries, self.keys, 'p b n h e, h c p e -> b n h p c')
        scores, indices = dots.topk(self.topk, dim=-1)
        (scores_1, scores_2), (indices_1, indices_2) = scores.unbind(dim=-2), indices.unbind(dim=-2)

        # the best topk of the num_keys**2 product keys are always among these topk**2 pairs,
        # so the search over the full memory costs 2 * num_keys + topk**2 comparisons
        all_scores = rearrange(scores_1, '... k -> ... k 1') + rearrange(scores_2, '... k -> ... 1 k')
        all_indices = rearrange(indices_1, '... k -> ... k 1') * self.num_keys + rearrange(indices_2, '... k -> ... 1 k')
        all_scores, all_indices = (rearrange(t, '... i j -> ... (i j)') for t in (all_scores, all_indices))

        final_scores, pair_positions = all_scores.topk(self.topk, dim=-1)
        value_indices = all_indices.gather(-1, pair_positions)
        attn = final_scores.float().softmax(dim=-1)

        # one bag per token over all heads' picks, so the EmbeddingBag sum is also the sum over heads
        value_indices = rearrange(value_indices, 'b n h k -> (b n) (h k)')
        attn = rearrange(attn, 'b n h k -> (b n) (h k)')
        # per_sample_weights must match the table dtype exactly, which autocast does not arrange
        out = self.values(value_indices, per_sample_weights=attn.to(self.values.weight.dtype))
        out = self.value_dropout(out)
        out = rearrange(out, '(b n) d -> b n d', b=b, n=n)
        return out, torch.zeros((), device=x.device)
