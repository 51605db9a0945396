#!/usr/bin/env python
"""What a model trained on the recall task (`routeformer train --task recall`) does at the scored
answers, read with the Recorder: accuracy by the block of the answer's pair, and per layer and
head, how often the routed selection holds the answer's value token (block routers: its block)
and how much attention the head puts on that token.

    python benchmarks/recall_probe.py RUN_DIR [--batch 32] [--block-size 32]

The answer to an asked key k is the value token right after k's pair at the start; with token
shift that value token also carries k, which is what a look-up head must find.
"""

from __future__ import annotations

import argparse

import torch

from routeformer import Recorder
from routeformer.cli.commands import load
from routeformer.cli.data import RecallTask


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run', help='a run folder of `routeformer train --task recall` (or one of its checkpoints)')
    parser.add_argument('--batch', type=int, default=32, help='sequences to probe')
    parser.add_argument('--block-size', type=int, default=32, help='block of the answer, for the accuracy split')
    parser.add_argument('--seed', type=int, default=123, help='seed of the probed sequences (not the training data)')
    args = parser.parse_args(argv)

    cfg, model, _, _ = load(args.run, 'cpu')
    data = cfg.data
    if data.task != 'recall':
        raise SystemExit(f'{args.run} was trained on the {data.task} task, not recall')
    pairs = data.recall_pairs or 16
    task = RecallTask(cfg.model.seq_len, data.vocab or 64, pairs, data.recall_queries or max(1, pairs // 2), args.seed)
    batch = task.make(args.batch, torch.Generator().manual_seed(args.seed))
    x, targets = batch.x[:, :-1], batch.x[:, 1:]
    recorder = Recorder(model)
    with torch.no_grad():
        logits = recorder(x)[0]
    answers = batch.scored.nonzero().tolist()                                  # (sample, query position)
    # the value token of the asked key: one after the key's place among the pairs
    source = torch.tensor([int((x[b, :2 * pairs] == x[b, t]).nonzero()[0]) + 1 for b, t in answers])
    correct = torch.stack([logits[b, t].argmax() == targets[b, t] for b, t in answers]).float()
    print(f'accuracy {correct.mean():.1%} over {len(answers)} answers')
    blocks = source // args.block_size
    for c in blocks.unique().tolist():
        print(f'  answer in block {c}: {correct[blocks == c].mean():.1%} ({int((blocks == c).sum())})')

    for layer in sorted({r.layer for r in recorder.recordings[0] if not r.cross}):
        attn = recorder.dense_attention(0, layer)                                 # (b, h, n, n)
        on_value = torch.stack([attn[b, :, t, s] for (b, t), s in zip(answers, source.tolist())])
        seen = (on_value > 0).float().mean(0).tolist()
        print(f'layer {layer}, per head: value token attendable {" ".join(f"{v:.2f}" for v in seen)}; '
              f'attention on it {" ".join(f"{v:.2f}" for v in on_value.mean(0).tolist())}')

if __name__ == '__main__':
    main()
