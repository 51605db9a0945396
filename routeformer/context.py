"""LayerContext: everything a sublayer needs besides its input, passed explicitly.

It replaces the hidden flags the seed packages injected into kwargs (`_reverse`, `_depth`,
callbacks set from outside): a reversible recompute, the routing decisions to replay, the
key/value cache for incremental decoding and the recorder all travel here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor


@dataclass
class LayerContext:
    mask: Tensor | None = None            # (b, n) bool, True = real token
    context: Tensor | None = None         # (b, m, d) encoder output for cross-attention
    context_mask: Tensor | None = None    # (b, m) bool
    offset: int = 0                       # absolute position of the first token of x (cached decoding)
    layer: int = 0                        # index of the block being run
    recompute: bool = False               # True only inside a reversible backward recompute
    plans: dict = field(default_factory=dict)   # routing decisions of this forward, keyed by (layer, module id)
    cache: dict | None = None             # incremental decoding state, keyed by (layer, module id); None = no cache
    recordings: list | None = None        # Recorder: per-layer attention weights and routing plans

    def at_layer(self, layer: int) -> 'LayerContext':
        # shares the dicts/lists: a block writes its plans where the whole forward can see them
        return replace(self, layer=layer)

    def key(self, module) -> tuple[int, int]:
        return (self.layer, id(module))
