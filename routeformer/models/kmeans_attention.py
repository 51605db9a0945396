"""routing-transformer's stand-alone pieces: `KmeansAttention`, the k-means routed attention of
already projected heads, and `update_kmeans_on_backwards`, which keeps the centroids of any
module up to date. Both run on the shared core (KMeansRouter and the executor).

Axes: b batch, h heads, n query sequence, m key sequence, d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..attention.executor import RoutedAttention
from ..helpers import compiling, default, exists, l2norm
from ..lm import check_mask
from ..routers.kmeans import KMeansRouter
from .routing import KMeansUpdates, call_after_backward, update_kmeans


def update_kmeans_on_backwards(module: nn.Module) -> RemovableHandle:
    """Applies the k-means statistics of every KMeansRouter inside `module` after each backward pass
    through one of its training forwards (routing-transformer's helper; the Routing Transformer
    model classes do this by default). Returns the hook's handle: `handle.remove()` stops it."""
    def after_forward(mod, args, output):
        if mod.training and not compiling():  # see KMeansUpdates
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            call_after_backward(outputs, lambda: update_kmeans(mod))
    return module.register_forward_hook(after_forward)


class KmeansAttention(KMeansUpdates, nn.Module):
    """k-means routed attention with routing-transformer's API: `forward(q, k, v (b, h, n, d),
    query_mask=None, key_mask=None)` returns `(out (b, h, n, d), aux_loss)`, `aux_loss` being the
    commitment loss to add to the main loss. With `receives_context` the keys and values are a
    context (b, h, m, d) of any length, masked by `key_mask`; otherwise `key_mask` defaults to
    `query_mask`. With `shared_qk` the keys are normalised and a token sees itself only when nothing
    else is visible. `num_mem_kv` learned key/values are visible to every query. The centroids move
    when `update_kmeans()` is called (or after every backward with `update_kmeans_on_backwards`).
    Differences from the seed as in `RoutingTransformer`: causal routing is strictly causal and
    needs no memory key/value, and every query receives output."""

    def __init__(self, num_clusters: int, window_size: int, num_heads: int, head_dim: int, causal: bool = False,
                 dropout: float = 0., ema_decay: float = 0.999, commitment: float = 1e-4,
                 context_window_size: int | None = None, receives_context: bool = False, num_mem_kv: int = 0,
                 shared_qk: bool = False, backend: str = 'auto'):
        super().__init__()
        if num_mem_kv < 0:
            raise ValueError(f'num_mem_kv must be >= 0, got {num_mem_kv}')
        self.num_heads, self.head_dim = num_heads, head_dim
        self.causal, self.receives_context = causal and not receives_context, receives_context
        self.shared_qk = shared_qk and not receives_context
        self.router = KMeansRouter(heads=num_heads, dim_head=head_dim, num_clusters=num_clusters,
                                   window_size=window_size, context_window_size=context_window_size,
                                   ema_decay=ema_decay, commitment=commitment, shared_qk=self.shared_qk,
                                   cross_attention=receives_context)
        self.executor = RoutedAttention(dropout=dropout, backend=backend)
        self.mem_kv = nn.Parameter(torch.randn(2, num_heads, num_mem_kv, head_dim) * head_dim ** -0.5) \
            if num_mem_kv > 0 else None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor | None = None,
                key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if q.ndim != 4 or (q.shape[1], q.shape[3]) != (self.num_heads, self.head_dim):
            raise ValueError(f'expected q of shape (batch, num_heads={self.num_heads}, seq_len, '
                             f'head_dim={self.head_dim}), got {tuple(q.shape)}')
        b, h, n, d = q.shape
        if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[-1] != d:
            raise ValueError(f'k and v must be (batch, heads, kv_len, head_dim) like q {tuple(q.shape)}, got '
                             f'{tuple(k.shape)} and {tuple(v.shape)}')
        if not self.receives_context and k.shape[2] != n:
            raise ValueError(f'self-attention needs keys as long as the queries ({n}), got {k.shape[2]}: '
                             f'build with receives_context=True to attend to a context')
        query_mask = check_mask(query_mask, (b, n), 'query_mask', 'the queries (batch, seq_len)')
        key_mask = check_mask(key_mask, (b, k.shape[2]), 'key_mask', 'the keys (batch, kv_len)')
        if not self.receives_context:
            key_mask = default(key_mask, query_mask)
        if self.shared_qk:
            k = l2norm(k)
        plan = self.router(q, k, causal=self.causal, mask=key_mask)
        mem_kv = (self.mem_kv[0], self.mem_kv[1]) if exists(self.mem_kv) else None
        out, _ = self.executor(q, k, v, plan, causal=self.causal, key_mask=key_mask, mem_kv=mem_kv,
                               exclude_self=self.shared_qk)
        aux = plan.aux_loss if exists(plan.aux_loss) else q.new_zeros(())
        return out, aux
