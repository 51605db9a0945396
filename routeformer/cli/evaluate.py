"""Loss of one batch, and the validation metric: bits per byte on text, accuracy on the scored
positions of a task.

Axes: b batch, n sequence, v vocabulary.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .data import Batch
from .distributed import Dist, all_sum


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def forward(model: nn.Module, batch: Batch, device: torch.device, bf16: bool):
    """Returns (cross entropy per target (b, n) in float32, logits, aux loss, targets, scored mask)."""
    x = batch.x.to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    with autocast(device, bf16):
        out = model(inputs)
    logits, aux = out if isinstance(out, tuple) else (out, None)
    # float32 cross entropy: a bf16 log-softmax over the vocabulary would blur the metric
    ce = F.cross_entropy(rearrange(logits.float(), 'b n v -> b v n'), targets, reduction='none')
    scored = batch.scored.to(device) if batch.scored is not None else torch.ones_like(targets, dtype=torch.bool)
    return ce, logits, aux, targets, scored


def batch_loss(model: nn.Module, batch: Batch, device: torch.device, bf16: bool) -> tuple[Tensor, Tensor]:
    """(loss to minimise: scored cross entropy + aux loss, the cross entropy alone)."""
    ce, _, aux, _, scored = forward(model, batch, device, bf16)
    ce = ce[scored].mean()
    return (ce + aux.float() if aux is not None else ce), ce.detach()


@torch.no_grad()
def evaluate(model: nn.Module, source, *, batch_size: int, batches: int, device: torch.device, bf16: bool,
             d: Dist = Dist()) -> dict:
    """Each process scores every world-th sequence of the validation set; the sums are combined."""
    was_training = model.training
    model.eval()
    total_ce = count = correct = 0.
    for batch in source.val_batches(batch_size, batches):
        mine = Batch(batch.x[d.rank::d.world], None if batch.scored is None else batch.scored[d.rank::d.world])
        if mine.x.shape[0] == 0:
            continue
        ce, logits, _, targets, scored = forward(model, mine, device, bf16)
        total_ce += ce[scored].double().sum().item()
        count += scored.sum().item()
        correct += (logits.argmax(dim=-1) == targets)[scored].sum().item()
    model.train(was_training)
    total_ce, count, correct = all_sum([total_ce, count, correct], d)
    loss = total_ce / max(count, 1)
    out = dict(loss=loss, tokens=int(count))
    if source.metric == 'bpb':
        out['bpb'] = loss / math.log(2)  # one token is one byte
    else:
        out['accuracy'] = correct / max(count, 1)
    return out


def metric_line(result: dict) -> str:
    if 'bpb' in result:
        return f'validation bits per byte {result["bpb"]:.4f} (loss {result["loss"]:.4f}, {result["tokens"]:,} bytes)'
    return f'validation accuracy {result["accuracy"]:.2%} (loss {result["loss"]:.4f}, {result["tokens"]:,} scored tokens)'
