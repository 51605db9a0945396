"""`routeformer compare`: several families, the same data, settings and budget; one table and one
plot of quality, speed and memory.

Each family trains in its own `routeformer train` subprocess (into OUT/<family>), so its peak
memory is its own and a family that fails becomes one row of the table instead of ending the
comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import checkpoint
from .config import Config, parse_model_args, validate
from .errors import CLIError
from .families import FAMILIES
from .plot import plot_compare, read_metrics


@dataclass
class Result:
    family: str
    status: str                 # ok, error, timeout, stopped
    summary: dict
    wall: float
    message: str = ''


def family_overrides(items: list[str], families: list[str]) -> dict[str, dict]:
    """`--family-arg reformer:n_hashes=4` -> {'reformer': {'n_hashes': 4}}."""
    out: dict[str, dict] = {}
    for item in items:
        family, sep, rest = item.partition(':')
        if not sep or family not in families:
            raise CLIError(f'--family-arg {item!r} must look like FAMILY:KEY=VALUE with FAMILY one of '
                           f'{", ".join(families)}, e.g. reformer:n_hashes=4')
        out.setdefault(family, {}).update(parse_model_args([rest]))
    return out


def parse_families(text: str) -> list[str]:
    families = [f.strip() for f in text.split(',') if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise CLIError(f'--families {text!r}: unknown {unknown}; choose from {", ".join(FAMILIES)}')
    if len(set(families)) != len(families):
        raise CLIError(f'--families {text!r} names a family twice')
    return families


def stream(proc: subprocess.Popen, sink, keep: int = 4000) -> str:
    """Forwards the child's stderr (progress bar, errors) as it comes; returns its tail."""
    tail = b''
    while True:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        sink.buffer.write(chunk)
        sink.flush()
        tail = (tail + chunk)[-keep:]
    return tail.decode('utf-8', errors='replace')


def same_settings(a: dict | None, b: dict) -> bool:
    """Equal configurations, the vocabulary (set from the data) aside."""
    if a is None:
        return False
    strip = lambda c: {**c, 'model': {k: v for k, v in c['model'].items() if k != 'num_tokens'}}  # noqa: E731
    return strip(a) == strip(b)


def train_family(cfg: Config, family: str, out: Path, *, resume: bool, timeout: float | None, quiet: bool) -> Result:
    run_dir = out / family
    run_dir.mkdir(parents=True, exist_ok=True)
    request = run_dir / 'request.json'
    checkpoint.write_atomic(request, json.dumps(cfg.to_dict(), indent=1))
    summary_path = run_dir / 'summary.json'
    summary = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else None
    if summary is not None and summary.get('complete') and same_settings(summary.get('config'), cfg.to_dict()):
        return Result(family, 'ok', summary, 0., 'reused')
    # a run finished with other settings (changed family arguments) is replaced, not continued
    stale = summary is not None and not same_settings(summary.get('config'), cfg.to_dict())
    has_ckpt = checkpoint.find_checkpoint(run_dir) is not None and not stale
    cmd = [sys.executable, '-m', 'routeformer', 'train', '--config', str(request), '--out', str(run_dir),
           '--resume' if resume and has_ckpt else '--overwrite']
    if quiet:
        cmd.append('--quiet')
    began = time.perf_counter()
    with open(run_dir / 'train.log', 'wb') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE)
        tail: list[str] = []
        reader = threading.Thread(target=lambda: tail.append(stream(proc, sys.stderr)), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join()
            return Result(family, 'timeout', {}, time.perf_counter() - began, f'over {timeout:.0f} s')
        reader.join()
        tail = tail[0] if tail else ''
    wall = time.perf_counter() - began
    if proc.returncode != 0 or not summary_path.is_file():
        lines = [ln for ln in tail.replace('\r', '\n').splitlines() if ln.strip()]
        message = lines[-1].split(': error: ', 1)[-1] if lines else f'exit status {proc.returncode}'
        return Result(family, 'error', {}, wall, message)
    summary = json.loads(summary_path.read_text())
    return Result(family, 'ok' if summary['complete'] else 'stopped', summary, wall)


def fmt_seconds(t: float) -> str:
    return f'{t:.0f} s' if t < 120 else f'{t / 60:.1f} min'


def fmt_metric(summary: dict) -> str:
    val = summary.get('val') or {}
    if val.get('bpb') is not None:
        return f'{val["bpb"]:.3f} bpb'
    if val.get('accuracy') is not None:
        return f'{val["accuracy"]:.1%}'
    return '-'


def table(results: list[Result], reference: str | None) -> str:
    ref = next((r for r in results if r.family == reference and r.summary), None)
    ref_acc = (ref.summary['val'] or {}).get('accuracy') if ref else None
    head = ['family', 'parameters', 'validation', 'vs ' + reference if ref_acc else None, 'steps', 'train time',
            'train tok/s', 'peak memory', 'status']
    head = [h for h in head if h is not None]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in results:
        s = r.summary
        mem = s.get('peak_memory_mib')
        cells = [r.family, f'{s["params"]:,}' if s else '-', fmt_metric(s) if s else '-']
        if ref_acc:
            acc = (s.get('val') or {}).get('accuracy') if s else None
            cells.append(f'{acc / ref_acc:.0%}' if acc is not None and ref_acc else '-')
        cells += [f'{s["step"]}' if s else '-', fmt_seconds(s['train_time']) if s else '-',
                  f'{s["tok_per_s"]:,.0f}' if s else '-', f'{mem:.0f} MiB' if mem is not None else '-',
                  r.status + (f': {r.message}' if r.message and r.status != 'ok' else '')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def run_compare(cfg: Config, families: list[str], out: Path, *, family_args: dict | None = None, resume: bool = False,
                timeout: float | None = None, quiet: bool = False, title: str | None = None) -> list[Result]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for family in families:
        fam_cfg = replace(cfg, model=replace(cfg.model, family=family,
                                             kwargs={**cfg.model.kwargs, **(family_args or {}).get(family, {})}))
        print(f'== {family}', file=sys.stderr, flush=True)
        results.append(train_family(fam_cfg, family, out, resume=resume, timeout=timeout, quiet=quiet))
    reference = 'full' if 'full' in families else None
    text = table(results, reference)
    (out / 'compare.md').write_text(text + '\n')
    (out / 'compare.json').write_text(checkpoint.to_json([r.__dict__ for r in results], indent=1))
    runs = {r.family: read_metrics(out / r.family / 'metrics.jsonl') for r in results if r.summary}
    plot_compare(runs, {r.family: r.summary for r in results if r.summary}, out / 'compare.png',
                 title or f'{", ".join(families)}: same data, same budget')
    return results


def main(args) -> int:
    from .config import config_from_args
    families = parse_families(args.families)
    if 'family' in vars(args):
        raise CLIError('compare trains every family of --families: drop --family')
    cfg, _ = config_from_args(args)
    validate(cfg)
    out = Path(args.out or 'runs/compare')
    family_args = family_overrides(args.family_arg or [], families)
    with checkpoint.run_lock(out):  # each family's run folder inside is locked by its own trainer
        results = run_compare(cfg, families, out, family_args=family_args, resume=args.resume, timeout=args.timeout,
                              quiet=args.quiet)
    print(table(results, 'full' if 'full' in families else None))
    print(f'table: {out / "compare.md"}\nplot:  {out / "compare.png"}')
    return 0 if all(r.status == 'ok' for r in results) else 1
