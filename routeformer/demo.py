"""A two-minute CPU demo: train a small model on the duplication task (`0 w 0 w`, Reformer paper)
and watch the loss on the copied half fall, then let it copy a new sequence.

    python -m routeformer.demo [--steps 300] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from .models import TransformerLM
from .wrappers import AutoregressiveWrapper


def duplication_batch(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """`0 w 0 w` with w uniform over tokens 1..vocab-1; the second half is predictable only by
    looking half a sequence back."""
    half = seq_len // 2
    w = torch.randint(1, vocab, (batch, half - 1), generator=generator)
    zero = torch.zeros(batch, 1, dtype=torch.long)
    return torch.cat((zero, w, zero, w), dim=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--vocab', type=int, default=16)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    # two local heads (window 32) and two full heads: only the full heads can reach the first copy
    model = TransformerLM(num_tokens=args.vocab, dim=64, depth=2, heads=4, dim_head=16, max_seq_len=args.seq_len,
                          causal=True, n_local_attn_heads=2, local_attn_window_size=32)
    wrapper = AutoregressiveWrapper(model)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    half = args.seq_len // 2
    print(f'model: {sum(p.numel() for p in model.parameters()):,} parameters; '
          f'task: copy {half - 1} random tokens of a {args.vocab}-token vocabulary, seq_len {args.seq_len}')

    start = time.perf_counter()
    progress = tqdm(range(1, args.steps + 1), desc='train', unit='step')
    for step in progress:
        x = duplication_batch(args.batch, args.seq_len, args.vocab, gen)
        logits, aux = wrapper.padded(x[:, :-1])  # pads to the local window and strips the padding
        # loss on the second copy only: the first half is noise by construction
        targets = x[:, 1:].clone()
        targets[:, :half] = -100
        loss = F.cross_entropy(rearrange(logits, 'b n v -> b v n'), targets, ignore_index=-100) + aux
        optim.zero_grad()
        loss.backward()
        optim.step()
        progress.set_postfix(loss=f'{loss.item():.3f}')
        if step == 1 or step % 50 == 0:
            progress.write(f'step {step:4d}  loss on the copy {loss.item():.3f}')

    x = duplication_batch(1, args.seq_len, args.vocab, gen)
    copied = wrapper.generate(x[:, :half + 1], half - 1, temperature=0)
    accuracy = (copied == x[:, half + 1:]).float().mean().item()
    print(f'trained in {time.perf_counter() - start:.0f}s; copy accuracy of greedy cached decoding: {accuracy:.0%}')
    print('first copy :', x[0, 1:half][:24].tolist())
    print('generated  :', copied[0][:24].tolist())


if __name__ == '__main__':
    main()
