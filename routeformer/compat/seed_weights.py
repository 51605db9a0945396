"""Seed checkpoints -> our models: a model of the seed packages (routing_transformer,
reformer_pytorch, sinkhorn_transformer, colt5_attention), trained, loads into ours built with the
same keyword arguments.

    model = from_seed_state_dict(RoutingTransformerLM, 'seed.pt', num_tokens=256, dim=512, ...)
    save_converted(model, 'model.safetensors')     # the CLI's weights format

The name mappings are data: each family is a list of (pattern, replacement) rewrites applied in
order to every seed key (the replacement may list candidates; the first that names one of our
keys wins), shared rewrites for the pieces every seed wrote alike (the layer stack, feed-forward),
and a few tensor conversions where the layouts differ; an encoder-decoder's keys are its
encoder's and decoder's under a prefix. Seed keys that are derived (rotary tables)
or empty are skipped; our own bookkeeping (k-means balance counters, LSH rotation seeds) keeps its
initial value. Anything else unmatched is an error that lists it.

Same weights give the same outputs where both implementations compute the same function
(float32, eval mode, to ~1e-5; see tests/compat/test_seed_weights.py). They differ where the seed has a
known defect or routes differently by design:
- Routing: the seed's causal clusters leak (each cluster takes its top-w tokens over the whole
  sequence) and tokens chosen by no cluster get zeros; ours routes each token by itself. Outputs
  agree when every token is in the one cluster (`max_seq_len == window_size`). The seed LM also
  rotates the routed heads' values, and its non-causal local heads place query positions
  `look_forward` windows off; ours does neither. Memory key/values are per cluster in the seed
  (not loadable unless `num_mem_kv=0`).
- Reformer: the seed draws fresh random rotations at every call, ours fixed ones; a sequence of
  2 * bucket_size (two chunks that see each other) makes hashing irrelevant. The seed's memory
  key/values are hashed with the sequence; ours are seen by every query. ReformerEncDec does not
  load: our decoder cross-attends with weights the seed's (keys put into its LSH buckets) lacks.
- Sinkhorn: the seed's default non-causal path uses keys as values, and its soft top-k weights
  differ from ours, so outputs agree with local heads and with sortcut over one bucket; its causal
  null bucket (`null_keys`/`null_values`) has no counterpart here. Its cross-attention takes the
  raw context as keys and values: ours loads identity projections there.
- Mixture of experts (`moe_layers`): the weights load, but the seed picks second experts at random
  in eval too and drops tokens beyond each expert's capacity; ours is deterministic and drops none.
- CoLT5: the seed ranks by saturated coordinate-descent scores (ties at 1); ours by raw score, so
  outputs agree where both pick the same tokens (e.g. `fetch_k_ratio=1`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from einops import rearrange
from torch import Tensor, nn

Rewrite = tuple[str, str | tuple[str, ...]]

# ---------------------------------------------------------------- the tables

# the seeds' layer stacks: layers.L.0 / layers.L.1 (sequential), blocks.L.f / .g (reversible, with
# `irrev_blocks` holding the same modules again) -> our block L's mixer and feed-forward
STACK: list[Rewrite] = [
    (r'^transformer\.(?:layers|blocks)\.(\d+)\.(?:0\.|f\.net\.)', r'transformer.blocks.\1.mixers.0.'),
    (r'^transformer\.(?:layers|blocks)\.(\d+)\.(?:1\.|g\.net\.)', r'transformer.blocks.\1.ff.'),
    (r'^transformer\.irrev_blocks\.(\d+)\.f\.', r'transformer.blocks.\1.mixers.0.'),
    (r'^transformer\.irrev_blocks\.(\d+)\.g\.', r'transformer.blocks.\1.ff.'),
    # wrappers without weights (token shift, feed-forward chunks): up to two levels of `fn.`
    (r'\.(mixers\.0|ff)\.fn\.fn\.', r'.\1.fn.'),
    (r'\.(mixers\.0|ff)\.fn\.fn\.', r'.\1.fn.'),
    (r'\.ff\.fn\.w1\.', '.ff.fn.proj_in.'),
    (r'\.ff\.fn\.w2\.', '.ff.fn.proj_out.'),
]

ROUTING: list[Rewrite] = [
    (r'^routing_transformer\.(project_in|project_out)\.', r'\1.'),
    (r'^(?:routing_transformer\.(?:fn\.)?)?layers\.', 'transformer.'),
    *STACK,
    # k-means centroids: the routed heads' router comes after the local heads' one, if any
    (r'\.fn\.global_attn\.kmeans\.', ('.fn.routers.1.', '.fn.routers.0.')),
    (r'^out\.tensor$', 'token_emb.weight'),  # tied logits: the embedding again
    (r'^out\.', 'to_logits.'),
]

REFORMER: list[Rewrite] = [
    (r'^(?:reformer\.)?layers\.', 'transformer.'),
    *STACK,
    (r'\.fn\.toqk\.', '.fn.to_q.'),
    (r'\.fn\.tov\.', '.fn.to_v.'),
    (r'\.fn\.mem_kv$', '.fn.mem_inputs'),
    (r'^to_model_dim\.', 'project_in.'),
    (r'^out\.0\.', 'project_out.'),  # out = (projection to emb_dim or identity, logits)
    (r'^out\.1\.', 'to_logits.'),
    (r'^pos_emb\.weights\.(\d+)$', r'pos_emb.embs.\1'),
    # LSHSelfAttention on its own
    (r'^toqk\.', 'attn.to_q.'),
    (r'^tov\.', 'attn.to_v.'),
    (r'^to_out\.', 'attn.to_out.'),
    (r'^mem_kv$', 'attn.mem_inputs'),
]

SINKHORN: list[Rewrite] = [
    (r'^sinkhorn_transformer\.(project_in|project_out)\.', r'\1.'),
    (r'^(?:sinkhorn_transformer\.(?:fn\.)?)?layers\.', 'transformer.'),
    *STACK,
    (r'^to_token_emb\.', 'token_emb.'),
    (r'^axial_pos_emb\.weights\.(\d+)$', r'pos_emb.embs.\1'),
]

COLT5: list[Rewrite] = [
    # the light branch: the seed's LocalMHA carries its own norm and one q/k/v projection
    (r'(^|\.)light_attn\.norm\.', r'\1light_norm.'),
    # feed-forward branches: Sequential(RMSNorm, Linear, GELU, Linear)
    (r'(^|\.)(light|heavy)_ff\.0\.gamma$', r'\1\2_ff.norm.g'),
    (r'(^|\.)(light|heavy)_ff\.1\.', r'\1\2_ff.ff.proj_in.'),
    (r'(^|\.)(light|heavy)_ff\.3\.', r'\1\2_ff.ff.proj_out.'),
    # the routed branch lives in one submodule of our self-attention variants
    (r'(^|\.)(q_router|kv_router|null_q_token|heavy_attn)\b', (r'\1routed.\2', r'\1\2')),
    (r'\.norm\.gamma$', '.norm.g'),
]

FAMILIES: dict[str, list[Rewrite]] = dict(routing=ROUTING, reformer=REFORMER, sinkhorn=SINKHORN, colt5=COLT5)

# encoder-decoders: the seeds' encoder and decoder LMs (bare, or inside their wrappers, which the
# state dict lists again) -> ours; the family's rewrites apply to the rest of the key
ENC_DEC: list[tuple[str, str]] = [
    (r'^enc\.(?:net\.net\.)?', 'encoder.net.'),
    (r'^dec\.(?:base_net\.|net\.net\.)', 'decoder.net.'),
]

# seed keys that are functions of the constructor arguments (ours recompute them)
DERIVED = (r'(^|\.)inv_freq$', r'(^|\.)sinu_pos_emb\.emb$')

# seed keys that hold weights with no counterpart here, and why
NO_COUNTERPART = {
    r'global_attn\.mem_(key|value)$': 'the Routing seed learns memory key/values per k-means cluster, ours one '
                                      'set per head: only checkpoints with num_mem_kv=0 (non-causal or shared-QK) load',
    r'sinkhorn_attention\.null_(keys|values)$': 'the causal Sinkhorn seed\'s null bucket has no counterpart here',
}

# our state that the seeds do not have: it keeps its initial value
OURS_ONLY = (r'\.balance$', r'_extra_state$')

# our weights that a seed checkpoint cannot provide, and why
NOT_IN_SEED = {
    r'^decoder\.net\..*\.mixers\.1\.': 'ReformerEncDec\'s decoder cross-attends with weights of its own; the seed '
                                       'put the encoder output into its LSH self-attention and has none to load',
}


# ---------------------------------------------------------------- tensor conversions

def split_parts(names: tuple[str, ...]) -> Callable:
    """A fused projection (parts stacked along the output features) -> one tensor per part."""
    def convert(t, model, key):
        return dict(zip(names, t.chunk(len(names), dim=0)))
    return convert


def one_null_slot(t, model, key):
    """CoLT5 null key/value (2, h, e) -> (2, h, 1, e)."""
    return {'': rearrange(t, 't h e -> t h 1 e')}


def colt5_kv(t, model, key):
    """CoLT5 heavy key/value projection: the seed stacks per route and head keys then values,
    ours keys of every head, then values."""
    heavy = model.get_submodule(key.rsplit('.', 2)[0])
    routes = model.get_submodule(key.replace('heavy_attn.to_kv.weight', 'kv_router')).routing_token.shape[0]
    return {'': rearrange(t, '(r h t e) i -> (t r h e) i', r=routes, t=2, e=heavy.dim_head)}


def axial_table(t, model, key):
    """Axial position table (1, n, 1, d) or (1, 1, n, d) -> (n, d)."""
    return {'': t.reshape(-1, t.shape[-1])}


def rotary_layout(t: Tensor, d: int, dim: int) -> Tensor:
    """The Routing and Reformer seeds rotate features (2i, 2i + 1) together, ours (i, i + d / 2):
    reordering each head's features [0, 2, 4, ..., 1, 3, 5, ...] makes the rotations agree; the
    same order on queries and keys (and centroids, which live beside them) leaves every dot product
    as it was."""
    order = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))
    heads = t.shape[dim] // d
    index = (torch.arange(heads)[:, None] * d + order).flatten()
    return t.index_select(dim, index)


def attention_of(model, key):
    return model.get_submodule(key.split('.to_')[0])


def rotary_rows(t, model, key):
    return {'': rotary_layout(t, attention_of(model, key).dim_head, 0)}


def rotary_centroids(t, model, key):
    return {'': rotary_layout(t, t.shape[-1], -1)}


# per family, (pattern over our key after the rewrites, template, conversion): a conversion
# returns its parts by name, '' for the key itself, other names fill the template's `{}`
AXIAL = (r'pos_emb\.embs\.\d+$', None, axial_table)
CONVERSIONS: dict[str, list[tuple[str, str | None, Callable]]] = dict(
    routing=[(r'\.fn\.to_[qk]\.weight$', None, rotary_rows),
             (r'\.routers\.\d+\.means$', None, rotary_centroids)],
    reformer=[(r'(\.fn|^attn)\.to_q\.weight$', None, rotary_rows), AXIAL],
    sinkhorn=[(r'\.fn\.to_kv\.weight$', '.fn.{}.weight', split_parts(('to_k', 'to_v'))), AXIAL],
    colt5=[(r'light_attn\.to_qkv\.weight$', 'light_attn.{}.weight', split_parts(('to_q', 'to_k', 'to_v'))),
           (r'heavy_attn\.null_kv$', None, one_null_slot),
           (r'heavy_attn\.to_kv\.weight$', None, colt5_kv)],
)


def identity_context_projection(model, key):
    """The Sinkhorn seed's cross-attention uses the raw context as keys and values: identity
    projections compute the same (where the heads span `dim`)."""
    attn = attention_of(model, key)
    weight = getattr(attn, key.split('.')[-2]).weight
    square = weight.shape[0] == weight.shape[1]
    return torch.eye(weight.shape[0]) if attn.cross_attend and square else None


# our weights the seeds have no tensor for, computed from the ones they do: (pattern, family, fn)
FILLS = [(r'\.fn\.to_[kv]\.weight$', 'sinkhorn', identity_context_projection)]


# ---------------------------------------------------------------- conversion

def family_of(model: nn.Module) -> str:
    from ..models import colt5, colt5_decoder, colt5_vit, reformer, routing, sinkhorn
    for name, module in (('routing', routing), ('reformer', reformer), ('sinkhorn', sinkhorn), ('colt5', colt5),
                         ('colt5', colt5_decoder), ('colt5', colt5_vit)):
        if type(model).__module__ == module.__name__:
            return name
    raise TypeError(f'{type(model).__name__} is not a model of a seed family: give a RoutingTransformer(LM), '
                    f'Reformer(LM), LSHSelfAttention, SinkhornTransformer(LM) or ConditionalRouted* module')


def read_seed_state_dict(state_dict: Mapping[str, Tensor] | str | Path) -> Mapping[str, Tensor]:
    """A state dict, or the path of one saved with torch.save. Read with weights_only=True: a
    checkpoint from elsewhere can hold tensors and plain containers, never code."""
    if isinstance(state_dict, (str, Path)):
        state_dict = torch.load(state_dict, weights_only=True, map_location='cpu')
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError('expected a state dict (names -> tensors), e.g. torch.save(seed_model.state_dict(), path); '
                         'for a checkpoint that nests it, pass checkpoint["model"] (or wherever it is)')
    return state_dict


def rename(key: str, rewrites: list[Rewrite], ours: Mapping) -> str:
    for pattern, replacement in rewrites:
        if not re.search(pattern, key):
            continue
        candidates = [re.sub(pattern, c, key, count=1) for c in
                      ((replacement,) if isinstance(replacement, str) else replacement)]
        # a candidate names a module of ours (later rewrites may still rename the leaf)
        key = next((c for c in candidates if any(o.startswith(c.rsplit('.', 1)[0] + '.') for o in ours)),
                   candidates[0])
    return key


def convert(key: str, t: Tensor, model: nn.Module, family: str) -> dict[str, Tensor]:
    for pattern, template, fn in CONVERSIONS[family]:
        if re.search(pattern, key):
            return {key if name == '' else re.sub(pattern, template.format(name), key): part
                    for name, part in fn(t, model, key).items()}
    return {key: t}


def listing(names, limit: int = 6) -> str:
    names = sorted(names)
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def convert_seed_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor] | str | Path) -> dict[str, Tensor]:
    """The seed state dict as ours for `model` (built with the seed's keyword arguments). Raises a
    ValueError listing every seed weight without a place here, every weight of ours the seed does
    not provide and every shape that differs."""
    from ..wrappers import EncoderDecoder
    state_dict = read_seed_state_dict(state_dict)
    family = family_of(model)
    rewrites = FAMILIES[family]
    ours = model.state_dict()
    prefixes = ENC_DEC if isinstance(model, EncoderDecoder) else [('', '')]
    # our keys under each prefix, without it: what the family's rewrites name
    below = {ours_prefix: {k[len(ours_prefix):]: v for k, v in ours.items() if k.startswith(ours_prefix)}
             for _, ours_prefix in prefixes}
    converted, sources, unexpected, mismatched, reasons = {}, {}, [], [], set()
    for seed_key, t in state_dict.items():
        if t.numel() == 0 or any(re.search(p, seed_key) for p in DERIVED):
            continue
        why = next((r for p, r in NO_COUNTERPART.items() if re.search(p, seed_key)), None)
        if why:
            unexpected.append(seed_key)
            reasons.add(why)
            continue
        seed_prefix, ours_prefix = next(((p, o) for p, o in prefixes if re.match(p, seed_key)), ('', None))
        if ours_prefix is None:
            unexpected.append(seed_key)
            continue
        rest = seed_key[re.match(seed_prefix, seed_key).end():]
        key = ours_prefix + rename(rest, rewrites, below[ours_prefix])
        for key, value in convert(key, t, model, family).items():
            if key not in ours:
                unexpected.append(seed_key)
            elif tuple(ours[key].shape) != tuple(value.shape):
                mismatched.append(f'{seed_key} {tuple(value.shape)} -> {key} {tuple(ours[key].shape)}')
            elif key in converted and not torch.equal(converted[key], value):
                raise ValueError(f'seed weights {sources[key]} and {seed_key} both map to {key} with different values')
            else:
                converted[key], sources[key] = value, seed_key

    filled = {storage_view(ours[k]) for k in converted}
    missing = [k for k, v in ours.items() if k not in converted and torch.is_tensor(v)
               and storage_view(v) not in filled and not any(re.search(p, k) for p in OURS_ONLY)]
    for key in list(missing):
        fill = next((fn for p, f, fn in FILLS if f == family and re.search(p, key)), None)
        value = fill(model, key) if fill else None
        if value is not None:
            converted[key] = value
            missing.remove(key)
    reasons |= {r for p, r in NOT_IN_SEED.items() if any(re.search(p, k) for k in missing)}
    problems = []
    if unexpected:
        problems.append(f'seed weights with no place in {type(model).__name__}: {listing(unexpected)}')
    if missing:
        problems.append(f'weights the seed checkpoint does not provide: {listing(missing)}')
    if mismatched:
        problems.append(f'shapes that differ: {listing(mismatched)}')
    if problems:
        hint = '; '.join(sorted(reasons)) or 'build the model with the keyword arguments the seed model was built with'
        raise ValueError(f'{"; ".join(problems)} ({hint})')
    return converted


def storage_view(t: Tensor) -> tuple:
    """Tied weights (the same tensor under several names) are filled once."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def load_seed_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor] | str | Path) -> nn.Module:
    """Loads a seed package's state dict (or the path of one) into `model`, in place; returns it."""
    converted = convert_seed_state_dict(model, state_dict)
    model.load_state_dict({**model.state_dict(), **converted})
    return model


def from_seed_state_dict(cls: type[nn.Module], state_dict: Mapping[str, Tensor] | str | Path,
                         **seed_kwargs) -> nn.Module:
    """`cls(**seed_kwargs)` with the weights of a seed model built with the same keyword arguments,
    e.g. `from_seed_state_dict(ReformerLM, 'reformer.pt', num_tokens=256, dim=512, depth=6, ...)`."""
    return load_seed_state_dict(cls(**seed_kwargs), state_dict)


def save_converted(model: nn.Module, path: str | Path) -> None:
    """Writes the model's weights as the CLI writes them (safetensors, tied weights once)."""
    from ..cli.checkpoint import save_weights
    save_weights(model, Path(path))
