"""Routing Transformer (Roy et al. 2020) with the API of the `routing_transformer` package:
`RoutingTransformer`, `RoutingTransformerLM` (returns `(logits, aux_loss)`),
`RoutingTransformerEncDec`, `update_kmeans`.

Routed heads use `KMeansRouter`; the first `n_local_attn_heads` heads of a layer attend locally.
Every keyword argument of the seed package has an effect (the seed ignored `ff_mult`,
`commitment_factor`, `use_absolute_pos_emb` and `context_window_size`).

Same keywords, same parameters as the seed: the local heads have their own biased q/k/v
projection, the routed heads bias-free `to_q`/`to_k`/`to_v`, the output projection no bias; a
decoder's cross-attention is a layer of its own with its own feed-forward; the final norm comes
after the factorised embedding's projection; tied layers keep their own norms. A seed checkpoint
loads with `routeformer.compat.from_seed_state_dict`. Differences from the seed, all deliberate:
- `num_mem_kv` memory key/values are one set per head, seen from every cluster and by the local
  heads too (the seed: a set per k-means cluster, routed heads only; a different parameter count);
- causal routing is strictly causal (each token's cluster comes from itself), so the seed's
  `num_mem_kv >= 1` workaround for empty rows is not needed: `num_mem_kv` is what you pass;
- every query receives output in non-causal routing (the seed left unchosen tokens at zero);
- cross-attention (`receives_context`) routes each decoder query to its nearest centroid's
  `context_window_size` keys, which keeps the decoder causal;
- `rel_pos_emb` switches rotary positions for all heads (the seed: local heads only, while its LM
  always rotated the routed heads); rotary is not applied to values, routers see the unrotated
  queries and keys, and non-causal local heads see true relative positions (the seed's were off
  by the look-forward windows);
- centroids update after every backward by default in `RoutingTransformer` too (the seed's
  default there was never), and are all-reduced under torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.autograd import Variable

from ..helpers import as_loss, cast_tuple, check_positive, compiling, default, pop_unknown_kwargs
from ..lm import LM, trunk_context
from ..routers.kmeans import KMeansRouter
from ..wrappers import Autopadder, AutoregressiveWrapper, EncoderDecoder  # noqa: F401  (seed imports them from here)
from ..transformer import Transformer
from .builder import TRANSFORMER_KWARGS, build_pos_emb, build_transformer
from .options import Options, call_arguments


# ---------------------------------------------------------------- k-means updates

def call_after_backward(tensors, fn) -> None:
    """Runs `fn()` once when the backward pass that reaches any of `tensors` has finished, i.e.
    after every gradient (and every reversible recompute, which reads the centroids) is done."""
    tensors = [t for t in tensors if isinstance(t, Tensor) and t.requires_grad]
    pending = [False]

    def run():
        pending[0] = False
        fn()

    def on_grad(grad):
        if not pending[0]:
            pending[0] = True
            Variable._execution_engine.queue_callback(run)

    for t in tensors:
        t.register_hook(on_grad)


def update_kmeans(module: nn.Module) -> None:
    """Applies the accumulated k-means statistics of every KMeansRouter inside `module` (for models
    built by hand; the model classes below have it as a method)."""
    for m in module.modules():
        if isinstance(m, KMeansRouter):
            m.update()


class KMeansUpdates:
    """Mixin for modules holding KMeansRouters: `update_kmeans()` applies the statistics of the
    training forwards since the last update; with the automatic update registered (default), an
    eager forward pass arranges for it to run after the backward pass (a compiled one cannot:
    call `update_kmeans()` after each backward)."""

    def update_kmeans(self) -> None:
        update_kmeans(self)

    def register_kmeans_update(self) -> None:
        self._kmeans_update_after_backward = True

    def cancel_kmeans_update(self) -> None:
        self._kmeans_update_after_backward = False

    def kmeans_hook(self, *outputs) -> None:
        # a compiled graph cannot register hooks on its outputs: compiled models apply the
        # statistics when `update_kmeans()` (or `routeformer.apply_statistics`) is called
        if getattr(self, '_kmeans_update_after_backward', False) and self.training and not compiling():
            call_after_backward(outputs, self.update_kmeans)


# ---------------------------------------------------------------- construction

@dataclass(frozen=True)
class RoutingOptions(Options):
    """K-means routing, under the seed's names and defaults.

    `window_size`: keys each routed query sees inside its cluster (clusters are cut into windows
    of this many tokens); `num_clusters`: centroids per layer (default `max_seq_len //
    window_size`; the paper's `sparsity_cluster_size`); `kmeans_ema_decay`: how slowly the
    centroids follow their assigned vectors; `commitment_factor`: weight of the commitment loss in
    `aux_loss`; `context_window_size`: context keys per cluster in cross-attention (default
    `window_size`); `shared_qk`: keys are the normalised queries (default: when causal, the
    paper's setting), `context_shared_qk` the same in cross-attention; `rel_pos_emb`: rotary
    positions in every head."""

    window_size: int = 64
    num_clusters: int | None = None
    kmeans_ema_decay: float = 0.999
    commitment_factor: float = 1e-4
    context_window_size: int | None = None
    shared_qk: bool | None = None
    context_shared_qk: bool = False
    rel_pos_emb: bool = True


def build_routing_transformer(options: RoutingOptions, *, dim: int, depth: int, max_seq_len: int, heads: int,
                              dim_head: int | None, causal: bool, n_local_attn_heads: int | tuple = 0,
                              local_attn_window_size: int | None = None, owner: str = 'RoutingTransformer',
                              **kwargs) -> Transformer:
    """A Transformer with k-means routed heads. The other keyword arguments go to
    `build_transformer` unchanged; unknown ones are an error."""
    o = options
    # positions come from `rel_pos_emb` (rotary) here, routers from the k-means options
    pop_unknown_kwargs({k: v for k, v in kwargs.items() if k not in TRANSFORMER_KWARGS - {'rotary'}}, owner)
    check_positive(heads=heads, window_size=o.window_size)
    if not 0. <= o.kmeans_ema_decay < 1.:
        raise ValueError(f'kmeans_ema_decay must be in [0, 1), got {o.kmeans_ema_decay}')
    num_clusters = default(o.num_clusters, max_seq_len // o.window_size)
    if num_clusters < 1:
        raise ValueError(f'max_seq_len ({max_seq_len}) // window_size ({o.window_size}) gives no cluster: '
                         f'make max_seq_len at least window_size, or pass num_clusters')
    dim_head = default(dim_head, dim // heads)
    shared_qk = default(o.shared_qk, causal)
    local_heads = cast_tuple(n_local_attn_heads, depth)
    router_kwargs = dict(dim_head=dim_head, num_clusters=num_clusters, window_size=o.window_size,
                         ema_decay=o.kmeans_ema_decay, commitment=o.commitment_factor)

    def make_router(layer):
        routed = heads - local_heads[layer]
        return KMeansRouter(heads=routed, shared_qk=shared_qk, **router_kwargs) if routed > 0 else None

    def make_context_router(layer):
        return KMeansRouter(heads=heads, context_window_size=o.context_window_size, cross_attention=True,
                            shared_qk=o.context_shared_qk, **router_kwargs)

    # the seed's parameterisation: local heads project with their own biased q/k/v, no output bias
    kwargs.setdefault('local_qkv', True)
    kwargs.setdefault('attn_out_bias', False)
    kwargs.setdefault('context_ff', True)
    return build_transformer(dim=dim, depth=depth, heads=heads, dim_head=dim_head, causal=causal,
                             make_router=make_router, make_context_router=make_context_router,
                             n_local_attn_heads=n_local_attn_heads,
                             local_attn_window_size=default(local_attn_window_size, o.window_size),
                             shared_qk=shared_qk, context_shared_qk=o.context_shared_qk, rotary=o.rel_pos_emb,
                             **kwargs)


class RoutingTransformer(KMeansUpdates, nn.Module):
    """The transformer trunk on feature vectors: `forward(x (b, n, dim), input_mask=None,
    context=None, context_mask=None)` returns `(x, aux_loss)`. The seed's keyword arguments and
    defaults (the routing ones are described in `RoutingOptions`), plus those of
    `build_transformer`; k-means updates are registered by default (the seed's trunk: never)."""

    multiple_of = LM.multiple_of  # the sequence multiple Autopadder pads to

    def __init__(self, dim: int, depth: int, max_seq_len: int, heads: int = 8, dim_head: int | None = None,
                 window_size: int = 64, local_attn_window_size: int = 256, local_attn_radius_blocks: int = 1,
                 causal: bool = False, weight_tie: bool = False, attn_dropout: float = 0., ff_dropout: float = 0.,
                 attn_layer_dropout: float = 0., layer_dropout: float = 0., n_local_attn_heads: int | tuple = 0,
                 ff_glu: bool = False, reversible: bool = False, ff_chunks: int = 1, kmeans_ema_decay: float = 0.999,
                 commitment_factor: float = 1e-4, receives_context: bool = False,
                 context_window_size: int | None = None, _register_kmeans_update: bool = True,
                 rel_pos_emb: bool = True, pkm_layers: tuple = (), pkm_num_keys: int = 128, moe_layers: tuple = (),
                 moe_num_experts: int = 4, moe_loss_coef: float = 1e-2, num_mem_kv: int = 0,
                 shared_qk: bool | None = None, context_shared_qk: bool = False, use_rezero: bool = False,
                 use_scale_norm: bool = False, ff_activation: type[nn.Module] | None = None,
                 shift_tokens: bool = False, **kwargs):
        super().__init__()
        self.dim, self.max_seq_len, self.causal = dim, max_seq_len, causal
        options, trunk = RoutingOptions.split(call_arguments(locals()))
        trunk.pop('_register_kmeans_update')
        self.transformer = build_routing_transformer(options, owner=type(self).__name__, **trunk)
        self._kmeans_update_after_backward = _register_kmeans_update

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None):
        ctx = trunk_context(x, dim=self.dim, max_seq_len=None, input_mask=input_mask, context=context,
                            context_mask=context_mask)
        x, aux = self.transformer(x, ctx)
        aux = as_loss(aux)
        self.kmeans_hook(x, aux)
        return x, aux


class RoutingTransformerLM(KMeansUpdates, LM):
    """A token model with k-means routed attention. Every keyword argument of the seed package's
    `RoutingTransformerLM`, with its defaults (the routing ones are described in
    `RoutingOptions`), plus `num_clusters`, `max_relative_position` (relative position logits, the
    paper's), `backend` and every other keyword argument of `build_transformer` (e.g.
    `use_rms_norm`). `forward(x, input_mask=None, context=None, context_mask=None)` returns
    `(logits, aux_loss)`; `aux_loss` is the commitment loss (+ MoE balance loss): add it to the
    main loss.

    On text, give about half the heads to local attention (`n_local_attn_heads=heads // 2`, as
    the paper's models and `routeformer train` do): with every head routed (the seed's default) a
    head sees nothing of its neighbourhood outside its cluster, and byte-level text is learned
    0.58 bits/byte worse than local attention at 300 steps (benchmarks/README.md, "Real text")."""

    def __init__(self, num_tokens: int, dim: int, depth: int, max_seq_len: int, heads: int = 8, dim_head: int = 64,
                 window_size: int = 64, local_attn_window_size: int | None = None,
                 local_attn_radius_blocks: int = 1, causal: bool = False, emb_dim: int | None = None,
                 weight_tie: bool = False, attn_dropout: float = 0., ff_dropout: float = 0.,
                 attn_layer_dropout: float = 0., layer_dropout: float = 0., ff_mult: float = 4,
                 ff_activation: type[nn.Module] | None = None, ff_glu: bool = False, return_embeddings: bool = False,
                 n_local_attn_heads: int | tuple = 0, reversible: bool = False, ff_chunks: int = 1,
                 kmeans_ema_decay: float = 0.999, commitment_factor: float = 1e-4, receives_context: bool = False,
                 context_window_size: int | None = None, rel_pos_emb: bool = True,
                 _register_kmeans_update: bool = True, pkm_layers: tuple = (), pkm_num_keys: int = 128,
                 moe_layers: tuple = (), moe_num_experts: int = 4, moe_loss_coef: float = 1e-2, num_mem_kv: int = 0,
                 shared_qk: bool | None = None, context_shared_qk: bool = False, use_rezero: bool = False,
                 use_scale_norm: bool = False, tie_embedding: bool = False, use_absolute_pos_emb: bool = False,
                 shift_tokens: bool = False, **kwargs):
        options, trunk = RoutingOptions.split(call_arguments(locals()))
        lm_only = ('num_tokens', 'emb_dim', 'return_embeddings', 'tie_embedding', 'use_absolute_pos_emb',
                   '_register_kmeans_update')
        transformer = build_routing_transformer(options, owner=type(self).__name__,
                                                **{k: v for k, v in trunk.items() if k not in lm_only})
        super().__init__(num_tokens=num_tokens, dim=dim, max_seq_len=max_seq_len, transformer=transformer,
                         emb_dim=emb_dim, tie_embedding=tie_embedding, return_embeddings=return_embeddings,
                         causal=causal, norm_after_project_out=True,
                         pos_emb=build_pos_emb('absolute' if use_absolute_pos_emb else None, dim=dim,
                                               max_seq_len=max_seq_len))
        self._kmeans_update_after_backward = _register_kmeans_update

    @classmethod
    def from_preset(cls, name: str, *, shrink: bool = False, **overrides) -> 'RoutingTransformerLM':
        """A model of the original paper (`enwik8_local_cluster8k`, `pg19_local_cluster8k`,
        `wikitext103_local_cluster4k`, the local-only baselines ...); `shrink=True` keeps its
        structure at a size a CPU trains in seconds. See `routeformer.models.routing_presets`."""
        from .routing_presets import preset_kwargs
        return cls(**preset_kwargs(name, shrink=shrink, **overrides))

    def forward(self, x: Tensor, input_mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, **kwargs):
        out, aux = super().forward(x, input_mask, context, context_mask, **kwargs)
        self.kmeans_hook(out, aux)
        return out, aux


class RoutingTransformerEncDec(KMeansUpdates, EncoderDecoder):
    """Encoder and decoder `RoutingTransformerLM`s: `dim` is shared, every other keyword argument
    is prefixed `enc_` or `dec_` (seed default `window_size = 256` for both; `ignore_index` defaults to
    `pad_value`, as in the seed). The decoder is causal
    and cross-attends to the encoder's output through k-means routed heads.
    `forward(src, tgt, return_loss=True, randomly_truncate_sequence=False, enc_input_mask=...,
    dec_input_mask=...)` returns `(loss, aux_loss)` with every aux loss already in `loss`;
    `generate(src, start_tokens, seq_len, eos_token=None, ...)` samples the decoder."""

    def __init__(self, dim: int, ignore_index: int | None = None, pad_value: int = 0, **kwargs):
        built = EncoderDecoder.from_kwargs(RoutingTransformerLM, dim=dim, ignore_index=ignore_index,
                                           pad_value=pad_value, enc_defaults=dict(window_size=256),
                                           dec_defaults=dict(window_size=256), **kwargs)
        super().__init__(built.encoder.net, built.decoder.net, ignore_index=ignore_index, pad_value=pad_value)

    def register_kmeans_update(self) -> None:
        for lm in (self.encoder.net, self.decoder.net):
            lm.register_kmeans_update()

    def cancel_kmeans_update(self) -> None:
        for lm in (self.encoder.net, self.decoder.net):
            lm.cancel_kmeans_update()
