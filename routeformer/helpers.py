"""The one copy of each small helper the package uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def exists(val) -> bool:
    return val is not None


def default(val, d):
    return val if exists(val) else d


class SingleOutput(Tensor):
    """The output of a model that returns one tensor, as its seed package's does (the Reformer and
    Sinkhorn families): a plain tensor (every operation on it gives one), except that it cannot be
    unpacked. `logits, aux_loss = model(x)`, right for the models that return a pair, would
    otherwise split a batch of two silently."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __iter__(self):
        raise TypeError(f'{getattr(self, "owner", "this model")} returns one tensor, as its seed package does, not '
                        f'(output, aux_loss): write `out = model(x)`, and iterate over `out.unbind(0)` to loop over '
                        f'the batch')

    def __repr__(self, **kwargs):
        return repr(self.as_subclass(Tensor))


def single_output(t: Tensor, owner: str) -> Tensor:
    """t as a SingleOutput naming `owner` (a plain tensor inside a compiled graph)."""
    if compiling():
        return t
    out = t.as_subclass(SingleOutput)
    out.owner = owner
    return out


def cast_tuple(val, length: int = 1) -> tuple:
    return tuple(val) if isinstance(val, (tuple, list)) else (val,) * length


def precise(t: Tensor) -> Tensor:
    """t in at least float32: routing decisions and their losses are not made in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def check_positive(**values) -> None:
    """A ValueError naming the first of the keyword arguments that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')


def divisible_by(num: int, den: int) -> bool:
    return den != 0 and num % den == 0


def next_multiple(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


# rows of the last axis normalised per step: the passes of a step stay in cache
L2NORM_STEP = 1024


class _L2Norm(torch.autograd.Function):
    """F.normalize over the last axis, in steps of L2NORM_STEP along the axis before it, forward
    and backward (d t = (d y - y <d y, y>) / |t|): a long sequence is read and written once per
    pass instead of once per elementwise operation."""

    @staticmethod
    def forward(fctx, t: Tensor, eps: float):
        out = torch.empty_like(t)  # in t's memory layout: heads-inner q stay heads-inner
        denom = torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_(min=eps)
        for start in range(0, t.shape[-2], L2NORM_STEP):
            rows = slice(start, start + L2NORM_STEP)
            torch.div(t[..., rows, :], denom[..., rows, :], out=out[..., rows, :])
        fctx.save_for_backward(out, denom)
        fctx.eps = eps
        return out

    @staticmethod
    def backward(fctx, grad: Tensor):
        out, denom = fctx.saved_tensors
        grad_in = torch.empty_like(out)
        for start in range(0, out.shape[-2], L2NORM_STEP):
            rows = slice(start, start + L2NORM_STEP)
            y, g, d = out[..., rows, :], grad[..., rows, :], denom[..., rows, :]
            # below eps the norm is a constant: no radial term
            radial = torch.linalg.vecdot(g, y, dim=-1).unsqueeze(-1).masked_fill_(d <= fctx.eps, 0.)
            torch.mul(y, radial, out=grad_in[..., rows, :])
            torch.sub(g, grad_in[..., rows, :], out=grad_in[..., rows, :]).div_(d)
        return grad_in, None


def compiling() -> bool:
    """Whether this code is being traced by torch.compile. Eager CPU code uses memory-lean custom
    autograd nodes (in-place steps into preallocated buffers, work recomputed in the backward
    pass); traced, the same math is written in plain operations, which the compiler fuses and
    differentiates itself, and no value is read back to the host."""
    return torch.compiler.is_compiling()


def any_true(t: Tensor) -> bool:
    """Whether any element of the bool tensor t is True, for skipping work that changes nothing
    when none is; always True in a compiled graph, which cannot read values (it does the work)."""
    return compiling() or bool(t.any())


def check_values(ok: Tensor, message: str) -> bool:
    """Whether the caller may check tensor values on the host, for a detailed error: on a CPU in
    eager mode. Elsewhere a host read would break a compiled graph or stall a GPU stream, so the
    condition `ok` (a bool tensor) becomes an asynchronous assert raising `message`, and this
    returns False."""
    if compiling() or ok.device.type != 'cpu':
        torch._assert_async(ok, message)
        return False
    return True


def l2norm(t: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """t / max(|t|, eps) along `dim` (F.normalize)."""
    if compiling() or t.ndim < 2 or dim not in (-1, t.ndim - 1) or not t.is_floating_point():
        return F.normalize(t, dim=dim, eps=eps)
    return _L2Norm.apply(t, eps)


def pad_to_multiple(t: Tensor, multiple: int, *, dim: int = -2, value=0, left: bool = False) -> tuple[Tensor, int]:
    """Pads `t` along `dim` to a multiple of `multiple`; returns the padded tensor and the pad length."""
    length = t.shape[dim]
    pad = next_multiple(length, multiple) - length
    if pad == 0:
        return t, 0
    dims_after = (-dim - 1) if dim < 0 else (t.ndim - dim - 1)
    spec = (0, 0) * dims_after + ((pad, 0) if left else (0, pad))
    return F.pad(t, spec, value=value), pad


def topk_first(t: Tensor, k: int, dim: int = -1) -> torch.return_types.topk:
    """`t.topk(k, dim)` with ties going to the lower index, on every device. Routing scores tie
    often (a repeated token scores the same; a summary of padding is zero), and torch.topk breaks
    ties differently on CPU and CUDA, and between a full pass and cached decoding."""
    values, indices = t.sort(dim=dim, descending=True, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def max_neg_value(t: Tensor) -> float:
    return -torch.finfo(t.dtype).max


def pop_unknown_kwargs(kwargs: dict, owner: str) -> None:
    """Unknown keyword arguments are an error, never silently dropped."""
    if kwargs:
        names = ', '.join(sorted(kwargs))
        raise TypeError(f'{owner} got unexpected keyword argument(s): {names}')


def as_loss(aux: Tensor) -> Tensor:
    """An aux loss that `.backward()` accepts even when no layer produced one (then a zero leaf;
    in a compiled graph, which cannot make leaves, the plain zero, to be added to another loss)."""
    if torch.is_grad_enabled() and not aux.requires_grad and not compiling():
        return aux.detach().requires_grad_()
    return aux


# ---------------------------------------------------------------- routed tokens

def valid_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """The padding mask of x (b, n, ...): `mask`, or every token valid when there is none."""
    return default(mask, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))


def batched_gather(t: Tensor, index: Tensor) -> Tensor:
    """t (b, n, ...) at index (b, ...) -> (b, ..., ...); -1 reads position 0 (mask it)."""
    batch = torch.arange(t.shape[0], device=t.device).view(-1, *((1,) * (index.ndim - 1)))
    return t[batch, index.clamp(min=0)]


def straight_through(soft: Tensor) -> Tensor:
    """Exactly 1 in the forward pass, the gradient of `soft` in the backward pass."""
    return soft + (1. - soft).detach()


def route_back(src: Tensor, routed_tokens: Tensor, indices: Tensor) -> Tensor:
    """src (b, n, d) with rows `indices` (b, k) replaced by routed_tokens (b, k, d); -1 slots dropped."""
    b, n, _ = src.shape
    # -1 slots write to one extra row that is cut off afterwards
    index = indices.masked_fill(indices < 0, n)
    out = F.pad(src, (0, 0, 0, 1))
    batch = torch.arange(b, device=src.device).view(-1, 1)
    out = out.index_put((batch, index), routed_tokens.to(out.dtype))
    return out[:, :n]
