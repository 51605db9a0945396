#!/usr/bin/env python
"""Real text: every family learns byte-level text (the built-in standard-library corpus) at the
same size, steps and tokens per step, at 1,024 and 4,096 tokens, against full and local attention.

Each routed family runs twice: with the seed package's defaults (`SEED_DEFAULTS` restores them
where `routeformer train` recommends other settings) and with the settings `routeformer train
--family X` uses (the registry in routeformer/cli/families.py). One table gives validation bits
per byte at equal steps and at equal training time (each run's validation curve read at the
shortest run's training time), and tokens per second.

    python benchmarks/real_text.py                                  # the measurement (idle CPU, about 3 h on 2 cores)
    python benchmarks/real_text.py --lengths 1024 --families full,local,routing
    python benchmarks/real_text.py --tiny                           # a smoke run of the script (a minute)

Per length, variant and seed it runs `routeformer compare` (one subprocess per family) into
OUT/<length>/<variant>/seed<k>/<family>, then writes OUT/real_text.md and OUT/real_text.json.
`--resume` reuses finished runs; `--table-only` trains nothing and tabulates the stored ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_driver import fmt_seconds, run_compare, val_rows  # noqa: E402

FAMILIES = 'full,local,routing,reformer,sinkhorn,colt5,moba,dsa,nsa,mosa'
REFERENCES = ('full', 'local')  # one variant only: they have no routing settings
MODEL = dict(dim=128, depth=4, heads=4, window=128)
# the same tokens per step at every length
LENGTHS = {1024: dict(batch_size=8), 4096: dict(batch_size=2)}
TRAIN = dict(steps=200, lr=2e-3, warmup=40, eval_every=50, eval_batches=16, save_every=400, sample_length=0)
# What the seed classes do where `routeformer train` recommends otherwise: the measurements behind
# each recommendation are in benchmarks/README.md ("Real text").
SEED_DEFAULTS: dict[str, dict] = {
    'routing': dict(n_local_attn_heads=0, shared_qk=None),
    'sinkhorn': dict(pos_emb='axial'),
    'mosa': dict(n_local_attn_heads=0),
    'reformer': dict(n_local_attn_heads=0, local_qkv=False),
    'moba': dict(n_local_attn_heads=0),
}
TINY = dict(model=dict(dim=32, depth=1, heads=2, window=16), lengths={64: dict(batch_size=4)},
            train=dict(steps=10, eval_every=5, eval_batches=2, save_every=10, warmup=2))


def config(length: int, tiny: bool, steps: int | None, seed: int) -> dict:
    lengths = TINY['lengths'] if tiny else LENGTHS
    cfg = dict(model={**MODEL, **(TINY['model'] if tiny else {}), 'seq_len': length}, data=dict(task='text'),
               train={**TRAIN, **lengths[length], **(TINY['train'] if tiny else {}), 'seed': seed})
    if steps:
        cfg['train']['steps'] = steps
    return cfg


def bpb_at(rows: list[dict], time: float) -> float | None:
    """A validation curve's bits per byte at training time `time` (linear between evaluations)."""
    points = [(r['train_time'], r['bpb']) for r in rows if r.get('bpb') is not None]
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if t0 <= time <= t1:
            return b0 + (b1 - b0) * (time - t0) / (t1 - t0) if t1 > t0 else b1
    return points[-1][1] if points and abs(points[-1][0] - time) < 1e-6 else None


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    return f' ±{(max(values) - min(values)) / 2:.3f}' if len(values) > 1 else ''


def stored_results(folder: Path, families: list[str]) -> dict[str, dict]:
    """What `run_compare` returns, from the runs stored in folder/<family> (missing: not run)."""
    results = {}
    for family in families:
        path = folder / family / 'summary.json'
        summary = json.loads(path.read_text()) if path.is_file() else None
        ok = bool(summary and summary.get('complete'))
        results[family] = dict(status='ok' if ok else 'missing', summary=summary if ok else None,
                               message='stored' if ok else f'no finished run in {folder / family}')
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--families', default=FAMILIES)
    parser.add_argument('--lengths', default=','.join(map(str, LENGTHS)))
    parser.add_argument('--variants', default='seed,recommended')
    parser.add_argument('--seeds', default='0', help='comma-separated seeds of the weights and data order')
    parser.add_argument('--steps', type=int, help='override the step budget')
    parser.add_argument('--tiny', action='store_true', help='tiny sizes: check that the script works')
    parser.add_argument('--out', default='benchmarks/results/real_text')
    parser.add_argument('--resume', action='store_true')
    parser.add_argument('--timeout', type=float, help='seconds per run')
    parser.add_argument('--quiet', action='store_true')
    parser.add_argument('--table-only', action='store_true',
                        help='train nothing: the table of the finished runs stored under --out')
    args = parser.parse_args(argv)

    families = [f for f in args.families.split(',') if f]
    lengths = [int(n) for n in args.lengths.split(',')] if not args.tiny else list(TINY['lengths'])
    seeds = [int(s) for s in args.seeds.split(',')]
    variants = [v for v in args.variants.split(',') if v]
    out = Path(args.out)

    runs = []  # one per (length, family, variant, seed)
    for length in lengths:
        for variant in variants:
            # a family without SEED_DEFAULTS trains with the seed's defaults in both variants: once
            names = [f for f in families if variant == 'recommended' or f in SEED_DEFAULTS]
            if not names:
                continue
            for seed in seeds:
                folder = out / str(length) / variant / f'seed{seed}'
                family_args = SEED_DEFAULTS if variant == 'seed' else {}
                if args.table_only:
                    results = stored_results(folder, names)
                else:
                    results = run_compare(config(length, args.tiny, args.steps, seed), names, folder,
                                          family_args=family_args, resume=args.resume, quiet=args.quiet,
                                          timeout=args.timeout, config_name='real_text_config.json')
                if results is None:
                    return 2
                for family in names:
                    r = results[family]
                    summary = r['summary'] or {}
                    runs.append(dict(length=length, family=family, variant=variant, seed=seed, status=r['status'],
                                     message=r['message'], bpb=(summary.get('val') or {}).get('bpb'),
                                     train_time=summary.get('train_time'), tok_per_s=summary.get('tok_per_s'),
                                     curve=val_rows(folder / family / 'metrics.jsonl')))

    rows = []
    for length in lengths:
        at_length = [r for r in runs if r['length'] == length and r['status'] == 'ok' and r['train_time']]
        budget = min((r['train_time'] for r in at_length), default=None)
        keys = dict.fromkeys((r['family'], r['variant']) for r in runs if r['length'] == length)
        for family, variant in keys:
            group = [r for r in runs if (r['length'], r['family'], r['variant']) == (length, family, variant)]
            bpb = [r['bpb'] for r in group]
            label = ('-' if family in REFERENCES else 'seed defaults' if variant == 'seed' else
                     'recommended' if family in SEED_DEFAULTS else 'seed defaults = recommended')
            rows.append(dict(length=length, family=family, variant=label,
                             seeds=[r['seed'] for r in group], bpb=mean(bpb), bpb_spread=spread(bpb),
                             bpb_at_budget=mean([bpb_at(r['curve'], budget) for r in group]) if budget else None,
                             budget=budget, tok_per_s=mean([r['tok_per_s'] for r in group]),
                             train_time=mean([r['train_time'] for r in group]),
                             status=', '.join(sorted({r['status'] for r in group})),
                             message='; '.join(r['message'] for r in group if r['status'] != 'ok' and r['message'])))
    order = {f: i for i, f in enumerate(families)}
    rows.sort(key=lambda r: (r['length'], order[r['family']], r['variant'] != 'seed defaults'))
    for row in rows:
        ref = {f: next((r['bpb'] for r in rows if r['length'] == row['length'] and r['family'] == f), None)
               for f in REFERENCES}
        row['vs_full'] = row['bpb'] / ref['full'] - 1 if row['bpb'] and ref['full'] else None
        row['vs_local'] = row['bpb'] - ref['local'] if row['bpb'] and ref['local'] else None

    lines = ['| length | model | settings | val bits/byte | vs full | vs local | bits/byte at equal time | '
             'tokens/s | train time | status |', '|---|---|---|---|---|---|---|---|---|---|']

    def num(v, fmt):
        return format(v, fmt) if v is not None else '-'
    for r in rows:
        status = r['status'] + (f': {r["message"]}' if r['status'] != 'ok' and r['message'] else '')
        budget = f'{num(r["bpb_at_budget"], ".3f")} (at {fmt_seconds(r["budget"])})' if r['budget'] else '-'
        lines.append(f'| {r["length"]} | {r["family"]} | {r["variant"]} | {num(r["bpb"], ".3f")}{r["bpb_spread"]} | '
                     f'{num(r["vs_full"], "+.1%")} | {num(r["vs_local"], "+.3f")} | {budget} | '
                     f'{num(r["tok_per_s"], ",.0f")} | {fmt_seconds(r["train_time"]) if r["train_time"] else "-"} | '
                     f'{status} |')
    table = '\n'.join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'real_text.md').write_text(table + '\n')
    (out / 'real_text.json').write_text(json.dumps(dict(rows=rows, runs=[{k: v for k, v in r.items() if k != 'curve'}
                                                                          for r in runs]), indent=1))
    print(table)
    print(f'table: {out / "real_text.md"}; curves per run: {out}/<length>/<variant>/seed<k>/compare.png')
    return 0 if all(r['status'] == 'ok' for r in runs) else 1


if __name__ == '__main__':
    raise SystemExit(main())
