"""Typed options: each family's own keywords as one frozen dataclass, with the seed package's names.

A family's model classes keep the seed's signatures (positional order and defaults, which differ
between a seed's classes: `SinkhornTransformer` and `SinkhornTransformerLM` disagree on three) and
hand every argument over in one line, `Options.split(call_arguments(locals()))`: the family's
options go to its builder as one object, the rest to `build_transformer`. A keyword is then named
in the signature that users see and in the dataclass that documents it, never forwarded by hand.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar('T', bound='Options')


def call_arguments(frame: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its `locals()`, taken before it binds anything else: every
    parameter by name, with the catch-all `**kwargs` merged in."""
    named = {k: v for k, v in frame.items() if k not in ('self', '__class__', 'kwargs')}
    return {**named, **frame.get('kwargs', {})}


class Options:
    """Base of the families' option dataclasses."""

    @classmethod
    def split(cls: type[T], arguments: dict[str, Any]) -> tuple[T, dict[str, Any]]:
        """(these options, every other argument)."""
        names = {f.name for f in fields(cls)}
        mine = {k: v for k, v in arguments.items() if k in names}
        return cls(**mine), {k: v for k, v in arguments.items() if k not in names}
