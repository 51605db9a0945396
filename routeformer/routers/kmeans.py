"""Online spherical k-means routing (Routing Transformer, Roy et al. 2020).

Every routed head keeps `num_clusters` unit centroids. Tokens are routed by the cosine similarity
of their (unit-normalised) queries/keys to the centroids, and attend only inside their cluster.

Three plans, one per use:
- causal self-attention: every query and every key goes to its nearest centroid (similarities
  offset by the balance terms), and a query attends to the last `window_size` keys of its cluster
  up to its own position (`sort_and_chunk_pairs`). With shared QK a position has one cluster, and
  `sort_and_chunk` gives it the last `window_size` tokens of its cluster. Strictly causal by
  construction: nothing a token sees depends on a later token (the seed's top-k over the whole
  sequence leaked). Separate clusters matter: a query must meet the keys it matches, which are
  not the keys of positions whose own query resembles it.
- non-causal self-attention: balanced clusters as in the seed (each centroid takes its
  `window_size` most similar queries and keys), merged by log-sum-exp where a query is taken by
  several clusters; queries no centroid took (about a third of them in the seed, which left them
  with zeros) are routed to their nearest centroid's key set in extra groups, so every query
  receives attention output.
- cross-attention (`cross_attention=True`): each centroid takes its `context_window_size` most
  similar context keys; every query goes to its nearest centroid's key set. A query's output
  depends on nothing but itself and the context, so a causal decoder stays causal.

The centroids are trained by an exponential moving average of the per-cluster sums of the
routing vectors (`ema_decay`), accumulated in training forwards and applied by `update()` (after
backward, see `routeformer.models.routing`), all-reduced across processes under
torch.distributed. The commitment loss (weight `commitment`) pulls the vectors toward their
centroid; it is the plan's aux_loss and differentiable with respect to q and k.

Axes: b batch, h heads, n query sequence, m key sequence, d head dim, c clusters, g groups,
i queries per group, j keys per group, N tokens of a head flattened over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from ..attention.plan import RoutePlan
from ..helpers import check_positive, compiling, exists, l2norm, topk_first
from .base import Router, RouterCache
from .bucketed import rank_in_bucket, sort_and_chunk, sort_and_chunk_pairs

# rows of (tokens x clusters) similarities computed at once: bounds the memory of assignment
ASSIGN_CHUNK = 8192


def similarity(x: Tensor, means: Tensor) -> Tensor:
    """x (b, h, n, d), means (h, c, d) -> (b, h, n, c) dot products, in x's precision even under
    autocast (routing decisions are not made in half precision)."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.einsum('b h n d, h c d -> b h n c', x, means.to(x.dtype))


def nearest_cluster(x: Tensor, means: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (b, h, n, d) unit vectors, means (h, c, d) -> (b, h, n) index of the most similar centroid,
    similarities offset by `bias` (h, c) when given (load balancing)."""
    def best(chunk):
        sim = similarity(chunk, means)
        return (sim if bias is None else sim + rearrange(bias.to(sim.dtype), 'h c -> h 1 c')).argmax(dim=-1)
    return torch.cat([best(chunk) for chunk in x.split(ASSIGN_CHUNK, dim=-2)], dim=-1)


def cluster_loads(clusters: Tensor, num_clusters: int) -> Tensor:
    """(b, h, n) cluster ids (-1 for padding) -> (h, c) number of tokens per cluster."""
    index = rearrange(clusters.clamp(min=0), 'b h n -> h (b n)')
    weight = rearrange(clusters >= 0, 'b h n -> h (b n)').float()
    return weight.new_zeros(clusters.shape[1], num_clusters).scatter_add_(1, index, weight)


def cluster_sums(x: Tensor, clusters: Tensor, valid: Tensor | None, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Per head and cluster: sum of the vectors x (b, h, n, d) assigned to it and their count.
    Returns sums (h, c, d) and counts (h, c), summed over the batch; invalid tokens count nothing."""
    b, h, n, d = x.shape
    weight = torch.ones_like(clusters, dtype=x.dtype) if valid is None else valid.to(x.dtype).expand(b, h, n)
    index = rearrange(clusters, 'b h n -> h (b n)')
    # where, not a product: an invalid token's vector may be non-finite, and 0 * nan is nan
    x = torch.where(weight[..., None] > 0, x, 0.)
    sums = x.new_zeros(h, num_clusters, d).scatter_add_(
        1, repeat(index, 'h N -> h N d', d=d), rearrange(x, 'b h n d -> h (b n) d'))
    counts = x.new_zeros(h, num_clusters).scatter_add_(1, index, rearrange(weight, 'b h n -> h (b n)'))
    return sums, counts


def lloyd_step(x: Tensor, means: Tensor, valid: Tensor | None) -> Tensor:
    """One spherical k-means iteration on x (b, h, n, d); empty clusters keep their centroid."""
    sums, counts = cluster_sums(x, nearest_cluster(x, means), valid, means.shape[1])
    return torch.where(counts[..., None] > 0, l2norm(sums), means)


def worst_served(x: Tensor, means: Tensor, clusters: Tensor, valid: Tensor | None, count: int) -> tuple[Tensor, Tensor]:
    """The `count` vectors of x (b, h, n, d) least similar to their own centroid, per head: where a
    dead centroid restarts. Returns them (h, count, d) and their dissimilarity (h, count), worst
    first; padding is never picked (dissimilarity -inf where there are fewer real tokens)."""
    b, h, n, d = x.shape
    badness = -(x * means[torch.arange(h, device=x.device).view(1, h, 1), clusters]).sum(dim=-1)
    if exists(valid):
        badness = badness.masked_fill(~valid.expand(b, h, n), float('-inf'))
    return worst_of(rearrange(x, 'b h n d -> h (b n) d'), rearrange(badness, 'b h n -> h (b n)'), count)


def worst_of(vectors: Tensor, badness: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """vectors (h, N, d), badness (h, N) -> the `count` worst (repeating when N < count), worst first."""
    top = topk_first(badness, min(count, badness.shape[-1]))
    index = top.indices.repeat(1, math.ceil(count / top.indices.shape[-1]))[:, :count]
    return vectors.gather(1, repeat(index, 'h c -> h c d', d=vectors.shape[-1])), badness.gather(1, index)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_processes(x: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """x (b, h, n, d) and valid (b|1, 1, n) of every process, concatenated along the batch in
    process order (as one process would see the global batch); unchanged outside torch.distributed."""
    if not distributed():
        return x, valid
    world = dist.get_world_size()
    xs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(xs, x.contiguous())
    mask = (valid if valid is not None else x.new_ones(1, 1, 1, dtype=torch.bool)).expand(x.shape[0], 1, x.shape[2])
    masks = [torch.empty_like(mask) for _ in range(world)]
    dist.all_gather(masks, mask.contiguous())
    return torch.cat(xs), torch.cat(masks)


def groups_by_cluster(clusters: Tensor, take: Tensor, num_clusters: int, size: int) -> tuple[Tensor, Tensor]:
    """Packs the positions where `take` (b, h, n) is True into groups of at most `size` positions
    that share a cluster (clusters (b, h, n)). Returns q_index (b, h, g, size), -1 for empty slots,
    and the cluster of every group (b, h, g); g is the largest number of groups any head needs
    (in a compiled graph, the largest any head could need)."""
    b, h, n = clusters.shape
    device = clusters.device
    key = torch.where(take, clusters, num_clusters)           # positions not taken sort last
    order = (key * n + torch.arange(n, device=device)).argsort(dim=-1)
    sorted_key = key.gather(-1, order)
    rank = rank_in_bucket(sorted_key)

    counts = torch.zeros(b, h, num_clusters + 1, dtype=torch.long, device=device)
    counts.scatter_add_(-1, key, torch.ones_like(key))
    chunks = (counts[..., :num_clusters] + size - 1) // size   # groups each cluster needs
    first_group = chunks.cumsum(dim=-1) - chunks
    # a compiled graph cannot size a tensor by data: there g is the most any split of n taken
    # positions over num_clusters clusters can need, and the groups past the need stay empty
    g = min(n, (n + num_clusters * (size - 1)) // size) if compiling() else int(chunks.sum(dim=-1).max())
    g = max(g, 1)

    taken = sorted_key < num_clusters
    safe_key = sorted_key.clamp(max=num_clusters - 1)
    group = first_group.gather(-1, safe_key) + rank // size
    slot = torch.where(taken, group * size + rank % size, g * size)  # untaken -> a dump slot
    q_index = torch.full((b, h, g * size + 1), -1, dtype=torch.long, device=device)
    q_index.scatter_(-1, slot, torch.where(taken, order, -1))
    group_cluster = torch.zeros(b, h, g + 1, dtype=torch.long, device=device)
    group_cluster.scatter_(-1, torch.where(taken, group, g), safe_key)
    return rearrange(q_index[..., :-1], 'b h (g i) -> b h g i', i=size), group_cluster[..., :-1]


def finite_tokens(x: Tensor, valid: Tensor | None) -> Tensor:
    """x (b, h, n, d), valid (b|1, 1|h, n) or None -> (b, h, n): the valid tokens whose vector is
    finite. A non-finite vector (a NaN or inf anywhere upstream) contributes to no statistic: one
    such token in a cluster's sum would make its centroid NaN, and through the similarities every
    centroid within a few updates."""
    finite = torch.isfinite(x).all(dim=-1)
    return finite if valid is None else finite & valid


def unit(t: Tensor) -> Tensor:
    """Unit vectors in at least float32: routing decisions are not made in half precision."""
    return l2norm(t.to(torch.promote_types(t.dtype, torch.float32)))


def top_members(sim: Tensor, size: int, valid: Tensor | None) -> Tensor:
    """sim (b, h, n, c) -> (b, h, c, size): each centroid's `size` most similar tokens (the seed's
    balanced assignment); -1 where fewer than `size` valid tokens exist."""
    if exists(valid):
        sim = sim.masked_fill(~valid[:, None, :, None], float('-inf'))
    values, index = topk_first(sim, size, dim=-2)
    index = index.masked_fill(torch.isinf(values) & (values < 0), -1)
    return rearrange(index, 'b h w c -> b h c w')


@dataclass
class ClusterCache(RouterCache):
    """The clusters (b, h, n) of every position so far (-1: padding), and the keys' own clusters
    when queries and keys route apart (None with shared QK)."""
    clusters: Tensor
    key_clusters: Tensor | None


class KMeansRouter(Router):
    """Routes each head's tokens by online spherical k-means.

    `heads`, `dim_head`: the routed heads this router serves (its centroids are per head).
    `window_size`: tokens a cluster attends to at a time (queries per group; in causal mode the
    number of most recent cluster-mates a token sees, itself included).
    `context_window_size`: keys each centroid takes in cross-attention (default `window_size`).
    `shared_qk`: keys are the normalised queries; cached decoding then needs no routing keys.
    """

    def __init__(self, *, heads: int, dim_head: int, num_clusters: int, window_size: int,
                 context_window_size: int | None = None, ema_decay: float = 0.999, commitment: float = 1e-4,
                 shared_qk: bool = False, cross_attention: bool = False, init_iters: int = 10,
                 restart_dead: bool = True, balance_rate: float = 1e-2):
        super().__init__()
        check_positive(heads=heads, dim_head=dim_head, num_clusters=num_clusters, window_size=window_size)
        if not 0. <= ema_decay < 1.:
            raise ValueError(f'ema_decay must be in [0, 1), got {ema_decay}')
        self.num_clusters, self.window_size = num_clusters, window_size
        self.context_window_size = window_size if context_window_size is None else context_window_size
        if self.context_window_size < 1:
            raise ValueError(f'context_window_size must be a positive integer, got {context_window_size}')
        self.ema_decay, self.commitment, self.init_iters = ema_decay, commitment, init_iters
        self.restart_dead, self.balance_rate = restart_dead, balance_rate
        self.cross_attention, self.shared_qk = cross_attention, shared_qk
        self.register_buffer('means', l2norm(torch.randn(heads, num_clusters, dim_head)))
        self.register_buffer('initted', torch.tensor(False))
        # the host's copy of `initted` once it is True, which the forward pass reads: reading the
        # buffer every step would be a host sync (and end a compiled graph); a compiled model
        # recompiles once when it flips
        self.means_ready = False
        # causal routing cannot balance clusters by a top-k over the whole sequence (that would
        # leak): each cluster's similarities get an offset instead, raised while the cluster takes
        # fewer than its share of queries (row 0) or keys (row 1) and lowered while it takes more
        # (auxiliary-loss-free load balancing, Wang et al. 2024). Without it queries and keys, two
        # different projections, drift to clusters of their own and a query meets no key.
        self.register_buffer('balance', torch.zeros(2, heads, num_clusters))
        # EMA statistics of the training forwards since the last update: plain attributes, not
        # buffers, so that DDP's buffer broadcast cannot overwrite a process's own statistics
        self._sums: Tensor | None = None
        self._counts: Tensor | None = None
        self._outliers: Tensor | None = None
        self._loads: Tensor | None = None

    # ------------------------------------------------------------------ centroids

    @torch.no_grad()
    def init_means(self, x: Tensor, valid: Tensor | None) -> None:
        """Centroids from data: `num_clusters` random token vectors per head, refined by Lloyd
        iterations on the batch (under torch.distributed, on the batches of all processes, and
        process 0's draw is everyone's). The global RNG is left as it was (a reversible recompute
        replays the RNG state of the forward pass and must see the same dropout draws)."""
        x, valid = gather_processes(x, valid)
        # a token must be finite in every head to seed the centroids (one pool for all heads)
        valid = finite_tokens(x, valid).all(dim=1, keepdim=True)
        x = torch.where(valid[..., None], x, 0.)
        h, c, d = self.means.shape
        flat = rearrange(x, 'b h n d -> h (b n) d')
        pool = torch.arange(flat.shape[1], device=x.device)[rearrange(valid, 'b 1 n -> (b n)')]
        if pool.numel() == 0:
            return
        with torch.random.fork_rng(devices=[]):
            pick = torch.randperm(pool.numel()) if pool.numel() >= c else torch.randint(pool.numel(), (c,))
        means = flat[:, pool[pick[:c].to(x.device)]]
        for _ in range(self.init_iters):
            means = lloyd_step(x, means, valid)
        if distributed():
            dist.broadcast(means, 0)
        self.means.copy_(means)
        self.initted.fill_(True)
        self.means_ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.means_ready = bool(self.initted)

    @torch.no_grad()
    def accumulate(self, x: Tensor, clusters: Tensor, valid: Tensor | None) -> None:
        valid = finite_tokens(x, valid)
        x = torch.where(valid[..., None], x, 0.)
        sums, counts = cluster_sums(x, clusters, valid, self.num_clusters)
        if self._sums is None:
            self._sums, self._counts = sums, counts
        else:
            self._sums, self._counts = self._sums + sums, self._counts + counts
        worst = worst_served(x, self.means.to(x.dtype), clusters, valid, self.num_clusters)
        if self._outliers is not None:  # several forwards before one update: the worst of all of them
            worst = worst_of(*(torch.cat(pair, dim=1) for pair in zip(self._outliers, worst)), self.num_clusters)
        self._outliers = worst

    @torch.no_grad()
    def accumulate_loads(self, clusters: tuple[Tensor, ...]) -> None:
        """Tokens per cluster of the queries (and keys) of a causal forward, for the balance offsets
        (-1: a token that counts nothing, padding or a non-finite vector)."""
        loads = torch.stack([cluster_loads(c, self.num_clusters) for c in clusters])
        loads = F.pad(loads, (0, 0, 0, 0, 0, 2 - loads.shape[0]))
        self._loads = loads if self._loads is None else self._loads + loads

    @torch.no_grad()
    def discard_statistics(self) -> None:
        """Forgets the statistics accumulated since the last update: the next update applies none
        of them."""
        self._sums = self._counts = self._outliers = self._loads = None

    def apply_statistics(self) -> None:
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        """Applies the accumulated statistics: centroid <- normalise(decay * centroid + (1 - decay) *
        mean direction of its tokens), for clusters that got tokens; a cluster that got none while
        others did restarts at a token its centroid serves worst. Under torch.distributed the
        sums and counts of every process (and process 0's centroids) are all-reduced first, in one
        call, so all processes keep identical centroids; every process must call it."""
        means = self.means.clone()
        sums = self._sums.to(means.dtype) if exists(self._sums) else torch.zeros_like(means)
        counts = self._counts.to(means.dtype) if exists(self._counts) else means.new_zeros(means.shape[:2])
        outliers, badness = self._outliers if exists(self._outliers) else (means, means.new_zeros(means.shape[:2]))
        outliers, badness = outliers.to(means.dtype), badness.to(means.dtype)
        loads = self._loads.to(means.dtype) if exists(self._loads) else means.new_zeros(self.balance.shape)
        self.discard_statistics()
        initted = self.initted.to(means.dtype).view(1)
        if distributed():
            first = float(dist.get_rank() == 0)
            # process 0's centroids travel along: a process that initialised them from its own data
            # adopts process 0's before the first step
            flat = torch.cat((sums.flatten(), counts.flatten(), loads.flatten(), means.flatten() * first, initted * first))
            dist.all_reduce(flat)
            refs = (sums, counts, loads, means, initted)
            sums, counts, loads, means, initted = (t.view_as(ref) for t, ref in zip(flat.split([r.numel() for r in refs]), refs))
            # restart points: the worst-served tokens of all processes, as one process on all the data
            mine = torch.cat((outliers, badness[..., None]), dim=-1)
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            every = torch.cat(every, dim=1)
            outliers, _ = worst_of(every[..., :-1], every[..., -1], self.num_clusters)
            # process 0's centroids, adopted (a sync that the all-reduce made anyway)
            self.means_ready = bool(initted.item())
        new = l2norm(self.ema_decay * means + (1. - self.ema_decay) * l2norm(sums))
        # a centroid no token chose would never move again, and the clusters that remain grow until
        # routing is local attention in disguise: it restarts at the worst-served token instead
        dead = (counts == 0) & (counts.sum(dim=-1, keepdim=True) > 0) & self.restart_dead
        # the first dead centroid takes the worst-served token, the second the next, ...
        slot = (dead.long().cumsum(dim=-1) - 1).clamp(min=0)
        restart = outliers.gather(1, repeat(slot, 'h c -> h c d', d=outliers.shape[-1]))
        new = torch.where(counts[..., None] > 0, new, torch.where(dead[..., None], restart, means))
        # statistics are finite by construction (accumulate drops non-finite tokens); a centroid that
        # still is not (another process's data under torch.distributed) keeps its value
        self.means.copy_(torch.where(torch.isfinite(new).all(dim=-1, keepdim=True), new, self.means))
        self.initted.copy_(initted.view(()) > 0)
        # a cluster under its share of the tokens gets a higher offset, one over it a lower one
        share = loads.sum(dim=-1, keepdim=True) / self.num_clusters
        self.balance.add_(self.balance_rate * (share - loads).sign().nan_to_num(0.).to(self.balance.dtype))

    def commitment_loss(self, v: Tensor, clusters: Tensor, valid: Tensor | None) -> Tensor:
        """Mean squared distance (per feature) of the unit directions of v (b, h, n, d) to their
        assigned centroid, times `commitment`; gradients reach v only (the centroids move by EMA).
        For a unit centroid |v/|v| - mu|^2 = 2 - 2 cos(v, mu): no normalised copy of v to backprop."""
        v = v.to(torch.promote_types(v.dtype, torch.float32))
        b, h, n, d = v.shape
        chosen = self.means.to(v.dtype)[torch.arange(h, device=v.device).view(1, h, 1), clusters]
        err = 2. - 2. * (v * chosen).sum(dim=-1) / v.norm(dim=-1).clamp(min=1e-12)
        if exists(valid):
            weight = valid.to(err.dtype).expand(b, h, n)
            return err.mul(weight).sum() / (weight.sum() * d).clamp(min=1.) * self.commitment
        return err.mean() / d * self.commitment

    # ------------------------------------------------------------------ routing

    def maybe_init(self, x: Tensor, valid: Tensor | None, cached: RoutePlan | None) -> None:
        """The first training forward (never a reversible recompute) initialises from data, outside
        any compiled graph: k-means++-style sampling and Lloyd iterations on the batch have
        data-dependent shapes, and run once."""
        if self.training and not exists(cached) and not self.means_ready:
            torch.compiler.disable(self.init_once)(x.detach(), valid)

    def init_once(self, x: Tensor, valid: Tensor | None) -> None:
        """`init_means` unless `initted` says the centroids are set (loaded, or set by hand)."""
        if not bool(self.initted):
            self.init_means(x, valid)
        self.means_ready = bool(self.initted)

    def route(self, inp):
        if self.cross_attention:
            return self.route_cross(inp.q, inp.k, mask=inp.mask, cached=inp.cached)
        if inp.causal:
            return self.route_causal(inp.q, inp.k, mask=inp.mask, cached=inp.cached)
        return self.route_balanced(inp.q, inp.k, mask=inp.mask, cached=inp.cached)

    def route_causal(self, q, k, *, mask, cached):
        """Queries and keys by their own nearest centroid (shared-QK: one cluster per position, the
        query's); a query attends to the recent keys of its cluster (`sort_and_chunk_pairs`)."""
        valid = mask[:, None, :] if exists(mask) else None
        separate = not self.shared_qk and exists(k)
        # differentiable for the commitment loss: the queries, and the keys when they route apart
        directions = torch.cat((q, k), dim=-2) if separate else q
        both_valid = torch.cat((valid, valid), dim=-1) if separate and exists(valid) else valid
        with torch.no_grad():
            x = unit(directions)
        self.maybe_init(x, both_valid, cached)
        if exists(cached):
            clusters = cached.router_state['clusters']
            if separate:
                clusters = torch.cat((clusters, cached.router_state['key_clusters']), dim=-1)
            return replace(cached, aux_loss=self.commitment_loss(directions, clusters.clamp(min=0), clusters >= 0))

        with torch.no_grad():
            n = q.shape[-2]
            means = self.means.to(x.dtype)
            clusters = torch.cat([nearest_cluster(part, means, bias)
                                  for part, bias in zip(x.split(n, dim=-2), self.balance)], dim=-1)
            if exists(both_valid):
                clusters = clusters.masked_fill(~both_valid, -1)
            if self.training:
                counted = clusters.masked_fill(~torch.isfinite(x).all(dim=-1), -1)
                self.accumulate(x, counted.clamp(min=0), counted >= 0)
                self.accumulate_loads(counted.split(n, dim=-1))
            plan = self.causal_plan(clusters[..., :n], clusters[..., n:] if separate else None)
        plan.aux_loss = self.commitment_loss(directions, clusters.clamp(min=0), clusters >= 0)
        return plan

    def causal_plan(self, clusters: Tensor, key_clusters: Tensor | None = None) -> RoutePlan:
        """sort_and_chunk over the clusters (sort_and_chunk_pairs when the keys have clusters of their
        own); padding tokens (-1) and the tail that makes the length a multiple of the window go
        to an extra bucket that matches nothing real, so any length works."""
        b, h, n = clusters.shape
        w = self.window_size
        padded = math.ceil(n / w) * w

        def buckets(c):
            return F.pad(torch.where(c >= 0, c, self.num_clusters), (0, padded - n), value=self.num_clusters)

        if key_clusters is None:
            plan = sort_and_chunk(buckets(clusters)[:, :, None], w, causal=True)
            info = dict(clusters=clusters)
        else:
            plan = sort_and_chunk_pairs(buckets(clusters), buckets(key_clusters), w)
            info = dict(clusters=clusters, key_clusters=key_clusters)
        q_index = plan.q_index.masked_fill(plan.q_index >= n, -1)
        kv_index = plan.kv_index.masked_fill(plan.kv_index >= n, -1)
        return replace(plan, q_index=q_index, kv_index=kv_index, router_state=info)

    def route_balanced(self, q, k, *, mask, cached):
        """Each centroid takes its `window_size` most similar queries and keys; queries no centroid
        took join their nearest centroid's key set in extra groups."""
        valid = mask[:, None, :] if exists(mask) else None
        with torch.no_grad():
            qn, kn = unit(q), unit(k)
            both = torch.cat((qn, kn), dim=-2)
        both_valid = torch.cat((valid, valid), dim=-1) if exists(valid) else None
        self.maybe_init(both, both_valid, cached)
        directions = torch.cat((q, k), dim=-2)  # the commitment loss pulls queries and keys alike
        if exists(cached):
            clusters = torch.cat((cached.router_state['clusters'], cached.router_state['key_clusters']), dim=-1)
            return replace(cached, aux_loss=self.commitment_loss(directions, clusters.clamp(min=0), clusters >= 0))

        with torch.no_grad():
            means = self.means.to(qn.dtype)
            n, m = q.shape[-2], k.shape[-2]
            q_sim, k_sim = similarity(qn, means), similarity(kn, means)
            q_members = top_members(q_sim, min(self.window_size, n), mask)
            k_members = top_members(k_sim, min(self.window_size, m), mask)

            q_clusters, k_clusters = q_sim.argmax(dim=-1), k_sim.argmax(dim=-1)
            if exists(valid):
                q_clusters, k_clusters = q_clusters.masked_fill(~valid, -1), k_clusters.masked_fill(~valid, -1)
            members = rearrange(q_members, 'b h c w -> b h (c w)')
            times_taken = torch.zeros_like(q_clusters).scatter_add_(-1, members.clamp(min=0), (members >= 0).long())
            covered = (times_taken > 0) | (q_clusters < 0)  # padding needs no output
            # coverage: what no centroid took goes to its nearest centroid, in groups of window size
            extra_q, extra_cluster = groups_by_cluster(q_clusters.clamp(min=0), ~covered, self.num_clusters,
                                                       q_members.shape[-1])
            extra_kv = k_members.gather(2, repeat(extra_cluster, 'b h g -> b h g j', j=k_members.shape[-1]))
            q_index = torch.cat((q_members, extra_q), dim=2)
            kv_index = torch.cat((k_members, extra_kv), dim=2)
            if self.training:
                clusters = torch.cat((q_clusters, k_clusters), dim=-1)
                self.accumulate(both, clusters.clamp(min=0), clusters >= 0)
        clusters = torch.cat((q_clusters, k_clusters), dim=-1)
        return RoutePlan(q_index=q_index, kv_index=kv_index, merge='logsumexp',
                         aux_loss=self.commitment_loss(directions, clusters.clamp(min=0), clusters >= 0),
                         router_state=dict(clusters=q_clusters, key_clusters=k_clusters))

    def route_cross(self, q, k, *, mask, cached):
        """Queries to their nearest centroid; each centroid takes its `context_window_size` most
        similar context keys."""
        with torch.no_grad():
            qn, kn = unit(q), unit(k)
            both = torch.cat((qn, kn), dim=-2)
        directions = torch.cat((q, k), dim=-2)
        both_valid = None
        if exists(mask):  # queries have no padding mask here: every query is valid
            queries = torch.ones(mask.shape[0], 1, q.shape[-2], dtype=torch.bool, device=mask.device)
            both_valid = torch.cat((queries, mask[:, None, :]), dim=-1)
        self.maybe_init(both, both_valid, cached)
        if exists(cached):
            clusters = torch.cat((cached.router_state['clusters'], cached.router_state['key_clusters']), dim=-1)
            return replace(cached, aux_loss=self.commitment_loss(directions, clusters.clamp(min=0), clusters >= 0))

        with torch.no_grad():
            means = self.means.to(qn.dtype)
            k_sim = similarity(kn, means)
            k_members = top_members(k_sim, min(self.context_window_size, k.shape[-2]), mask)
            q_clusters = nearest_cluster(qn, means)
            k_clusters = k_sim.argmax(dim=-1)
            if exists(mask):
                k_clusters = k_clusters.masked_fill(~mask[:, None, :], -1)
            q_index, group_cluster = groups_by_cluster(q_clusters, torch.ones_like(q_clusters, dtype=torch.bool),
                                                       self.num_clusters, min(self.window_size, q.shape[-2]))
            kv_index = k_members.gather(2, repeat(group_cluster, 'b h g -> b h g j', j=k_members.shape[-1]))
            if self.training:
                clusters = torch.cat((q_clusters, k_clusters), dim=-1)
                self.accumulate(both, clusters.clamp(min=0), clusters >= 0)
        clusters = torch.cat((q_clusters, k_clusters), dim=-1)
        return RoutePlan(q_index=q_index, kv_index=kv_index,
                         aux_loss=self.commitment_loss(directions, clusters.clamp(min=0), clusters >= 0),
                         router_state=dict(clusters=q_clusters, key_clusters=k_clusters))

    # ------------------------------------------------------------------ cached decoding

    def prefill(self, inp, plan):
        """The clusters of the prefix (b, h, n), the keys' too when they route apart; shared-QK keys
        are the normalised queries, so the new query alone gives a token's cluster."""
        if self.cross_attention:
            return RouterCache()  # each new query is routed as the forward pass routes it
        separate = not self.shared_qk and exists(inp.k)
        if exists(plan):
            return ClusterCache(clusters=plan.router_state['clusters'],
                                key_clusters=plan.router_state['key_clusters'] if separate else None)
        none = torch.zeros(*inp.q.shape[:2], 0, dtype=torch.long, device=inp.q.device)
        return ClusterCache(clusters=none, key_clusters=none if separate else None)

    def decode_step(self, step, cache):
        """The new token's clusters from itself; it attends to what the causal forward pass admits:
        the last `window_size` keys of its cluster (its own included when it shares the cluster).
        A padding token takes no slot of a real cluster (as in forward)."""
        if self.cross_attention:
            raise RuntimeError('cross-attention routers do not decode token by token')
        pos, separate = step.offset, exists(cache.key_clusters)
        means = self.means.to(step.q.dtype)
        real = rearrange(step.key_mask(), 'b 1 -> b 1 1')

        def cluster_of(t, bias):  # (b, h, 1)
            return nearest_cluster(unit(t), means, bias).masked_fill(~real, -1)

        new = cluster_of(step.q, self.balance[0])
        cache.clusters = torch.cat((cache.clusters, new), dim=-1)
        if separate:
            cache.key_clusters = torch.cat((cache.key_clusters, cluster_of(step.k, self.balance[1])), dim=-1)
        positions = torch.arange(pos + 1, device=step.q.device)
        # the most recent keys of its cluster, its own included
        mates = torch.where((cache.key_clusters if separate else cache.clusters) == new, positions, -1)
        kv_index = mates.topk(min(self.window_size, pos + 1), dim=-1).values
        return RoutePlan(q_index=None, kv_index=rearrange(kv_index, 'b h j -> b h 1 j'), q_offset=pos,
                         router_state=dict(clusters=new))

    def extra_repr(self):
        h, c, d = self.means.shape
        return (f'heads={h}, num_clusters={c}, dim_head={d}, window_size={self.window_size}, '
                f'context_window_size={self.context_window_size}, ema_decay={self.ema_decay}, '
                f'commitment={self.commitment}, cross_attention={self.cross_attention}')
