"""LSH router (Reformer): angular locality-sensitive hashing by random rotations.

Every token's key x is projected on random Gaussian directions R and hashed to
argmax([xR, -xR]) (Andoni et al. 2015): nearby directions tend to share a bucket. `n_hashes`
rounds hash with independent rotations; each round is a sort-and-chunk plan
(`bucketed.sort_and_chunk`), and a token's outputs of all rounds are merged by their log-sum-exp,
which is attention over the union of the keys it met.

Rotations are drawn afresh at every training forward, and fixed in eval mode (a function of a
per-router seed kept in the state dict), so inference is deterministic. Hashing looks only at the
token itself, so in causal mode (strictly causal by construction, see bucketed.py) a token's
bucket never depends on later tokens, and incremental decoding can hash each new token once.

Axes: b batch, h heads, r hash rounds, n sequence, d head dim, k rotation directions
(n_buckets / 2), c chunks per round, g groups (r * c), i queries per group, j keys per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from ..attention.plan import RoutePlan
from ..helpers import compiling, exists, topk_first
from .base import Router, RouterCache
from .bucketed import rank_in_bucket, sort_and_chunk

# Reformer's logit offset for attending to oneself when another round offers real keys: it keeps
# "self only when nothing else is visible" across rounds, not only inside one round (and is
# representable in half precision)
SELF_ATTN_PENALTY = -5e4

# elements of the (b, h, n, r, k) rotated tensor hashed at once: a block of a few MiB stays in cache
# between the product and the reductions over it, and bounds the memory of hashing long sequences
# into many buckets
HASH_BLOCK = 2 ** 21


# the seed of a training draw inside a compiled graph: the global RNG, which the compiler traces
TRACED_DRAW = -1


def generator(seed: int, device, offset: int = 0) -> torch.Generator | None:
    """A generator seeded with `seed + offset`, or None (the global RNG) for TRACED_DRAW."""
    return None if seed == TRACED_DRAW else torch.Generator(device=device).manual_seed(seed + offset)


@dataclass
class LSHCache(RouterCache):
    """The bucket ids (b, h, r, n) of every position so far (None: no fixed bucket count)."""
    buckets: Tensor | None


class LSHRouter(Router):
    """Groups tokens whose keys hash to the same bucket.

    `n_buckets`: fixed number of buckets (1, or even); None derives it from each input's length
    (`LSHRouter.buckets_for_length`). A fixed count makes a token's bucket independent of how long the
    sequence is, which cached decoding needs. `full_attn_thres`: sequences of at most this many
    tokens get one dense group (full attention). `attend_across_buckets=False` masks pairs from
    different buckets that share a chunk (always masked in causal mode).
    `allow_duplicate_attention=False` counts a key met in several rounds once (a bias of
    -log(rounds in which the pair is admitted)). `rehash_each_round=False` draws one rotation and
    puts each token in its `n_hashes` best buckets. `random_rotations_per_head`: independent
    rotations per head (and, while training, per sample). `drop_for_hash_rate`: dropout on the
    vectors that are hashed, while training.
    """

    def __init__(self, *, bucket_size: int = 64, n_hashes: int = 8, n_buckets: int | None = None,
                 full_attn_thres: int = 0, attend_across_buckets: bool = True,
                 allow_duplicate_attention: bool = True, rehash_each_round: bool = True,
                 random_rotations_per_head: bool = False, drop_for_hash_rate: float = 0.):
        super().__init__()
        if bucket_size < 1 or n_hashes < 1:
            raise ValueError(f'bucket_size ({bucket_size}) and n_hashes ({n_hashes}) must be positive integers')
        if exists(n_buckets) and (n_buckets < 1 or (n_buckets > 1 and n_buckets % 2 != 0)):
            raise ValueError(f'n_buckets must be 1 or an even number (angular LSH hashes into pairs of opposite '
                             f'directions), got {n_buckets}')
        if exists(n_buckets) and not rehash_each_round and n_hashes > n_buckets:
            raise ValueError(f'rehash_each_round=False puts every token in its n_hashes best buckets: n_hashes '
                             f'({n_hashes}) must be at most n_buckets ({n_buckets})')
        if not 0. <= drop_for_hash_rate < 1.:
            raise ValueError(f'drop_for_hash_rate must be in [0, 1), got {drop_for_hash_rate}')
        self.bucket_size = self.multiple_of = bucket_size
        self.n_hashes, self.n_buckets, self.full_attn_thres = n_hashes, n_buckets, full_attn_thres
        self.attend_across_buckets = attend_across_buckets
        self.allow_duplicate_attention = allow_duplicate_attention
        self.rehash_each_round = rehash_each_round
        self.random_rotations_per_head = random_rotations_per_head
        self.drop_for_hash_rate = drop_for_hash_rate
        # the eval rotations are a function of this seed; drawn from the global RNG, so
        # torch.manual_seed before building fixes them, and kept in the state dict
        self.rotation_seed = int(torch.randint(2 ** 62, ()))
        self._eval_rotations: dict = {}

    @staticmethod
    def buckets_for_length(n: int, bucket_size: int) -> int:
        """Reformer's bucket count for a sequence of n tokens: about n / bucket_size, even (angular
        LSH hashes into pairs of opposite directions), at least 2."""
        return max(2, (n // bucket_size) // 2 * 2)

    # ------------------------------------------------------------ state

    def get_extra_state(self):
        return dict(rotation_seed=self.rotation_seed)

    def set_extra_state(self, state):
        self.rotation_seed = int(state['rotation_seed'])
        self._eval_rotations = {}

    # ------------------------------------------------------------ hashing

    def uses_full_attention(self, n: int) -> bool:
        return n <= self.full_attn_thres

    def buckets_for(self, n: int) -> int:
        nb = self.n_buckets if exists(self.n_buckets) else self.buckets_for_length(n, self.bucket_size)
        if not self.rehash_each_round and self.n_hashes > nb:
            raise ValueError(f'rehash_each_round=False needs n_hashes ({self.n_hashes}) <= the number of buckets '
                             f'({nb}): use a longer sequence, a smaller bucket_size or set n_buckets')
        return nb

    def rotations(self, *, batch: int, heads: int, dim: int, n_buckets: int, device, seed: int | None) -> Tensor:
        """(b|1, h|1, d, r|1, k) float32. `seed` None: the fixed eval rotations."""
        rounds = self.n_hashes if self.rehash_each_round else 1
        per_head = self.random_rotations_per_head
        if exists(seed):
            shape = (batch if per_head else 1, heads if per_head else 1, dim, rounds, n_buckets // 2)
            return torch.randn(shape, generator=generator(seed, device), device=device)
        # eval: one rotation per head, the same for every sample (a sample's output must not depend
        # on its position in the batch)
        shape = (1, heads if per_head else 1, dim, rounds, n_buckets // 2)
        key = (shape, str(device), self.rotation_seed)
        if key not in self._eval_rotations:
            # drawn outside any compiled graph (a generator cannot be made inside one): a compiled
            # model breaks its graph at the first eval call of each shape, and not after
            torch.compiler.disable(self.draw_eval_rotations)(key)
        return self._eval_rotations[key]

    def draw_eval_rotations(self, key) -> None:
        shape, device, seed = key
        gen = torch.Generator().manual_seed(seed)
        # one entry: the cache is for repeated calls of one shape, not a growing store
        self._eval_rotations = {key: torch.randn(shape, generator=gen).to(device)}

    @torch.no_grad()
    def hash(self, k: Tensor, n_buckets: int, *, seed: int | None = None) -> Tensor:
        """k (b, h, n, d) -> buckets (b, h, r, n) long. `seed`: training draw; None: eval rotations."""
        b, h, n, d = k.shape
        if n_buckets == 1:
            return torch.zeros(b, h, self.n_hashes, n, dtype=torch.long, device=k.device)
        k = k.float()
        if exists(seed) and self.drop_for_hash_rate > 0.:
            # dropout on the hashed vectors only; argmax ignores the 1 / (1 - p) rescaling
            keep = torch.rand(k.shape, generator=generator(seed, k.device, offset=1), device=k.device)
            k = k * (keep >= self.drop_for_hash_rate)
        rot = self.rotations(batch=b, heads=h, dim=d, n_buckets=n_buckets, device=k.device, seed=seed)
        rounds, half = rot.shape[-2:]
        rot = rearrange(rot, '... d r k -> ... d (r k)')
        if compiling():  # one product; the compiler fuses the argmax into it
            return rearrange(self.buckets_of(rearrange(k @ rot, '... n (r k) -> ... n r k', r=rounds)),
                             'b h n r -> b h r n')
        step = max(1, HASH_BLOCK // max(1, b * h * rounds * half))
        # the rotated block and its magnitudes, written into one workspace by every block: a fresh
        # buffer of a few MiB per block can be new memory, page-faulted in each time
        workspace = k.new_empty(2, b * h * min(step, n) * rounds * half)
        pieces = []
        for start in range(0, n, step):
            block = k[:, :, start:start + step]
            shape = (*block.shape[:-1], rounds, half)
            rotated, magnitude = (w[:math.prod(shape)].view(shape) for w in workspace)
            torch.matmul(block, rot, out=rearrange(rotated, 'b h n r k -> b h n (r k)'))
            pieces.append(self.buckets_of(rotated, magnitude))
        return rearrange(torch.cat(pieces, dim=2), 'b h n r -> b h r n')

    def buckets_of(self, rotated: Tensor, magnitude: Tensor | None = None) -> Tensor:
        """(b, h, n, r) buckets of rotated keys (b, h, n, r|1, k); `magnitude`: a workspace of
        rotated's shape for |rotated|."""
        half = rotated.shape[-1]
        if self.rehash_each_round:
            # argmax over [xR, -xR] without building it: the direction of largest |xR|, in the
            # second half when xR is negative there (an exact tie of xR and -xR, of measure zero,
            # may resolve differently). One argmax over |xR| is about a third faster than a max
            # and a min with their indices over xR.
            best = torch.abs(rotated, out=magnitude).argmax(dim=-1, keepdim=True)
            negative = rotated.gather(-1, best) < 0
            return best.add_(negative, alpha=half).squeeze(-1)
        # one rotation; each token goes to its n_hashes best buckets, one per round
        both = torch.cat((rotated, -rotated), dim=-1)
        return topk_first(both, self.n_hashes).indices.squeeze(-2)

    def draw_seed(self) -> int | None:
        # one draw from the global RNG per training call, also when the plan is replayed, so a
        # reversible recompute sees the RNG stream (dropout) exactly as the forward pass did; a
        # compiled graph has no recompute and draws its rotations from the global RNG directly
        if not self.training:
            return None
        return TRACED_DRAW if compiling() else int(torch.randint(2 ** 62, ()))

    # ------------------------------------------------------------ plans

    def route(self, inp):
        seed = self.draw_seed()
        if exists(inp.cached):
            return inp.cached
        k, mask = inp.k, inp.mask
        n = k.shape[-2]
        if self.uses_full_attention(n):
            return RoutePlan(q_index=None, kv_index=None)
        self.check_length(n)
        buckets = self.hash_keys(k, mask, self.buckets_for(n), seed=seed)
        return self.plan(buckets, causal=inp.causal, dtype=k.dtype)

    def hash_keys(self, k: Tensor, mask: Tensor | None, n_buckets: int, *, seed: int | None) -> Tensor:
        """Bucket ids (b, h, r, n) of the keys k (b, h, n, d), padding in a bucket of its own."""
        return self.with_padding_bucket(self.hash(k, n_buckets, seed=seed), mask, n_buckets)

    @staticmethod
    def with_padding_bucket(buckets: Tensor, mask: Tensor | None, n_buckets: int) -> Tensor:
        # padding gets a bucket of its own that sorts after every real one: its content cannot
        # move real tokens between chunks, nor take the place of a real bucket-mate
        if mask is None:
            return buckets
        return buckets.masked_fill(~rearrange(mask.bool(), 'b n -> b 1 1 n'), n_buckets)

    @torch.no_grad()
    def plan(self, buckets: Tensor, *, causal: bool, dtype: torch.dtype = torch.float32) -> RoutePlan:
        """The sort-and-chunk plan of given buckets (b, h, r, n), with the LSH extras; the bias in
        at least float32 (in the keys' `dtype` when finer)."""
        w, n, r = self.bucket_size, buckets.shape[-1], buckets.shape[-2]
        plan = sort_and_chunk(buckets, w, causal=causal, same_bucket=causal or not self.attend_across_buckets)
        if not causal and n == w:
            # one chunk looking back at itself would count every key twice
            plan.kv_index = plan.kv_index.clone()
            plan.kv_index[..., :w] = -1
        bias = None
        if r > 1:
            # the query at slot i of a chunk is key slot w + i (look_one_back puts the chunk second)
            bias = torch.zeros(w, 2 * w, device=buckets.device, dtype=torch.promote_types(dtype, torch.float32))
            bias[torch.arange(w), w + torch.arange(w)] = SELF_ATTN_PENALTY
            bias = bias.view(1, 1, 1, w, 2 * w)
            if not self.allow_duplicate_attention:
                bias = bias - self.duplicate_counts(buckets, plan, causal=causal).to(bias.dtype).log()
        plan.bias = bias
        return plan

    def admitted_features(self, buckets: Tensor, *, causal: bool) -> list[Tensor]:
        """Per round, in original token order, what decides whether a pair is admitted:
        causal: (bucket, rank in bucket); non-causal: (chunk, bucket)."""
        b, h, r, n = buckets.shape
        positions = torch.arange(n, device=buckets.device)
        order = (buckets * n + positions).argsort(dim=-1)
        unsort = order.argsort(dim=-1)
        if causal:
            ranks = rank_in_bucket(buckets.gather(-1, order)).gather(-1, unsort)
            return [buckets, ranks]
        return [unsort // self.bucket_size, buckets]

    def duplicate_counts(self, buckets: Tensor, plan: RoutePlan, *, causal: bool) -> Tensor:
        """(b, h, g, i, j): in how many rounds each gathered (query, key) pair is admitted (>= 1)."""
        w, c = self.bucket_size, buckets.shape[-1] // self.bucket_size
        first, second = self.admitted_features(buckets, causal=causal)
        q_idx, kv_idx = plan.q_index, plan.kv_index.clamp(min=0)
        counts = None
        for rnd in range(buckets.shape[-2]):
            def at(feature, index):
                return feature[:, :, rnd].gather(-1, rearrange(index, 'b h g i -> b h (g i)')).view_as(index)
            qa, ka = at(first, q_idx)[..., :, None], at(first, kv_idx)[..., None, :]
            qb, kb = at(second, q_idx)[..., :, None], at(second, kv_idx)[..., None, :]
            if causal:  # same bucket, not later, fewer than w bucket-mates apart
                diff = qb - kb
                admitted = (qa == ka) & (diff >= 0) & (diff < w)
            else:  # in the query's chunk or the one before it (cyclically)
                admitted = (ka == qa) | ((c > 1) & (ka == (qa - 1) % c))
                if not self.attend_across_buckets:
                    admitted = admitted & (qb == kb)
            counts = admitted.float() if counts is None else counts + admitted
        return counts.clamp(min=1.)

    # ------------------------------------------------------------ cached decoding

    def prefill(self, inp, plan):
        """The buckets of the prefix, hashed with the fixed bucket count that decoding uses."""
        if self.n_buckets is None:
            return LSHCache(buckets=None)
        if inp.k.shape[-2] == 0:
            return LSHCache(buckets=torch.zeros(*inp.k.shape[:2], self.n_hashes, 0, dtype=torch.long,
                                                device=inp.k.device))
        if exists(plan) and 'buckets' in plan.router_state and not self.training:
            return LSHCache(buckets=plan.router_state['buckets'])  # hashed as decoding hashes: eval rotations
        return LSHCache(buckets=self.hash_keys(inp.k, inp.mask, self.n_buckets, seed=None))

    def decode_step(self, step, cache):
        """The token at `pos` attends, in every round, to the last `bucket_size` tokens of its
        bucket (itself included): exactly the keys the causal plan admits."""
        pos = step.offset
        if exists(cache.buckets):
            new = self.hash_keys(step.k, step.mask, self.n_buckets, seed=None)
            cache.buckets = torch.cat((cache.buckets, new), dim=-1)
        # as the forward pass over the tokens so far would; so past full_attn_thres a cache built
        # below it differs from a fresh forward pass (keep full_attn_thres 0 for exact decoding)
        if self.uses_full_attention(pos + 1):
            return RoutePlan(q_index=None, kv_index=torch.arange(pos + 1, device=step.q.device).view(1, 1, 1, -1),
                             q_offset=pos)
        if cache.buckets is None:
            raise ValueError('cached decoding with LSH attention needs a fixed number of buckets: build the router '
                             'with n_buckets (ReformerLM derives it from max_seq_len)')
        return self.decode_plan(cache.buckets, pos, dtype=step.k.dtype)

    @torch.no_grad()
    def decode_plan(self, buckets: Tensor, pos: int, *, dtype: torch.dtype = torch.float32) -> RoutePlan:
        """buckets (b, h, r, pos + 1) -> plan of one query (group per round) against the cache."""
        w, n, r = self.bucket_size, pos + 1, buckets.shape[-2]
        mine = buckets[..., pos:pos + 1]
        same = buckets == mine
        # the last w bucket-mates: at most w same-bucket tokens at or after each chosen one
        recent = same & (same.flip(-1).cumsum(dim=-1).flip(-1) <= w)
        positions = torch.arange(n, device=buckets.device)
        chosen = torch.where(recent, positions, torch.full_like(positions, -1))
        kv_index = chosen.topk(min(w, n), dim=-1).values  # (b, h, r, j), -1 = empty slot
        q_index = torch.zeros(1, 1, r, 1, dtype=torch.long, device=buckets.device)
        bias = None
        if r > 1:
            precise = torch.promote_types(dtype, torch.float32)
            bias = torch.where(kv_index == pos, SELF_ATTN_PENALTY, 0.).to(precise)
            if not self.allow_duplicate_attention:
                hits = kv_index[..., :, :, None, None] == kv_index[..., None, None, :, :]  # (b h r j r' j')
                counts = hits.any(dim=-1).sum(dim=-1).clamp(min=1)
                bias = bias - counts.to(precise).log()
            bias = rearrange(bias, 'b h r j -> b h r 1 j')
        return RoutePlan(q_index=q_index, kv_index=kv_index, bias=bias, q_offset=pos,
                         merge='logsumexp' if r > 1 else 'overwrite', router_state=dict(buckets=buckets[..., pos:pos + 1]))

    def extra_repr(self):
        return (f'bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, '
                f'full_attn_thres={self.full_attn_thres}, attend_across_buckets={self.attend_across_buckets}, '
                f'allow_duplicate_attention={self.allow_duplicate_attention}, '
                f'rehash_each_round={self.rehash_each_round}')
