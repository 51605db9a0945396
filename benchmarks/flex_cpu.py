"""CPU inference through the flex backend against 'auto' (the CPU flash kernel), same process, same
weights: eval forward passes of the bench.py models, alternated so that both see the same machine,
and greedy generation (prefill through the backend; decoding steps go where 'auto' puts them).

    python benchmarks/flex_cpu.py --lengths 4096,16384 --out benchmarks/results/flex_cpu

A configuration that the flex backend refuses (e.g. several hash rounds, whose log-sum-exp the
compiled CPU kernel does not return, at lengths where the uncompiled one would score every pair)
gets the refusal in its cell.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import BenchShape, resolve_builder  # noqa: E402

import routeformer  # noqa: E402
from routeformer import AutoregressiveWrapper  # noqa: E402

MODELS = ['routeformer-full', 'routeformer-local', 'routeformer-routing', 'routeformer-sinkhorn',
          'routeformer-moba', 'routeformer-reformer']


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def logits(out):
    return out[0] if isinstance(out, tuple) else out


def measure(name: str, length: int, args) -> dict:
    torch.manual_seed(0)
    model = resolve_builder(name)(BenchShape(args.vocab, args.dim, args.depth, args.heads, args.window, length)).eval()
    tokens = torch.randint(0, args.vocab, (args.batch, length))
    row = dict(model=name, length=length)

    def forward(backend):
        routeformer.use_backend(model, backend)
        with torch.no_grad():
            return logits(model(tokens))

    try:
        row['flex_first_s'] = timed(lambda: forward('flex'))  # compiles the kernel for this shape
    except ValueError as e:
        row['flex_refused'] = str(e).split(': ', 1)[-1]
    reference = forward('auto')
    if 'flex_refused' not in row:
        row['max_abs_diff'] = (forward('flex') - reference).abs().max().item()
    times = {'auto': [], 'flex': []}
    for _ in range(args.repeats):
        for backend in times:
            if backend == 'flex' and 'flex_refused' in row:
                continue
            times[backend].append(timed(lambda: forward(backend)))
    for backend, ts in times.items():
        if ts:
            row[f'{backend}_tok_s'] = tokens.numel() / statistics.median(ts)

    if length == args.generate_at:
        wrapper = AutoregressiveWrapper(model)
        prompt = tokens[:, :length - args.window]
        for backend in ('auto', 'flex'):
            if backend == 'flex' and 'flex_refused' in row:
                continue
            routeformer.use_backend(model, backend)
            with torch.no_grad():
                wrapper.generate(prompt, 2, temperature=0)  # compiles the prefill's kernel
                row[f'{backend}_generate_s'] = timed(lambda: wrapper.generate(prompt, args.new_tokens, temperature=0))
    return row


def ratio(a, b):
    return f'{a / b:.2f}x' if a and b else '-'


def table(rows: list[dict], args) -> str:
    lines = ['| model | length | auto tok/s | flex tok/s | flex / auto | flex first call s | max abs diff |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        if 'flex_refused' in r:
            lines.append(f"| {r['model']} | {r['length']:,} | {r.get('auto_tok_s', 0):,.0f} | refused | - | - | - |")
            continue
        lines.append(f"| {r['model']} | {r['length']:,} | {r['auto_tok_s']:,.0f} | {r['flex_tok_s']:,.0f} | "
                     f"{ratio(r['flex_tok_s'], r['auto_tok_s'])} | {r['flex_first_s']:.1f} | {r['max_abs_diff']:.1e} |")
    gen = [r for r in rows if 'auto_generate_s' in r]
    if gen:
        lines += ['', f'Greedy generation of {args.new_tokens} tokens after a {args.generate_at - args.window:,}-token '
                  'prompt (seconds; the prompt is the part the backend changes):', '',
                  '| model | auto s | flex s | flex speed-up |', '| --- | ---: | ---: | ---: |']
        for r in gen:
            flex_s = r.get('flex_generate_s')
            lines.append(f"| {r['model']} | {r['auto_generate_s']:.2f} | "
                         f"{'refused' if flex_s is None else f'{flex_s:.2f}'} | "
                         f"{'-' if flex_s is None else ratio(r['auto_generate_s'], flex_s)} |")
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--lengths', default='4096,16384')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--dim', type=int, default=256)
    parser.add_argument('--depth', type=int, default=2)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--vocab', type=int, default=256)
    parser.add_argument('--window', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=3, help='timed forward passes per backend; the median')
    parser.add_argument('--generate-at', type=int, default=4096, help='length whose rows also time generation')
    parser.add_argument('--new-tokens', type=int, default=32)
    parser.add_argument('--out', default=None, help='folder for results.json and results.md')
    args = parser.parse_args()

    rows = []
    for length in (int(n) for n in args.lengths.split(',')):
        for name in args.models.split(','):
            row = measure(name, length, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        machine = dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                       processor=platform.processor() or platform.machine())
        (out / 'results.json').write_text(json.dumps(dict(machine=machine, args=vars(args), rows=rows), indent=1))
        (out / 'results.md').write_text(f"torch {machine['torch']}, {machine['threads']} threads, fp32, dim "
                                        f"{args.dim}, depth {args.depth}, {args.heads} heads, batch {args.batch}, "
                                        f"eval forward medians of {args.repeats}\n\n{text}\n")


if __name__ == '__main__':
    main()
