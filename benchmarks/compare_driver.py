"""What the training benchmarks share: write a `routeformer` config file, run `routeformer compare`
on it, read back one result per family, and format times."""

from __future__ import annotations

import json
from pathlib import Path

from routeformer.cli import main as routeformer


def run_compare(cfg: dict, families: list[str], folder: Path, *, family_args: dict[str, dict] | None = None,
                family_flags: list[str] = (), resume: bool = False, quiet: bool = False,
                timeout: float | None = None, config_name: str = 'config.json') -> dict[str, dict] | None:
    """Trains `families` on the config `cfg` ({'model', 'data', 'train'}) into folder/<family>.
    `family_args`: model keyword arguments per family; `family_flags`: more of them as the
    command's `FAMILY:KEY=VALUE` items, which win. Returns {family: compare.json row}, or None when
    the command refused a setting (it said what to change)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_name).write_text(json.dumps(cfg, indent=1))
    items = [f'{family}:{key}={value!r}' for family, args in (family_args or {}).items() if family in families
             for key, value in args.items()]
    flags = [f for item in (*items, *family_flags) for f in ('--family-arg', item)]
    argv = ['compare', '--config', str(folder / config_name), '--families', ','.join(families), '--out', str(folder),
            *flags, *(['--resume'] if resume else []), *(['--quiet'] if quiet else []),
            *(['--timeout', str(timeout)] if timeout else [])]
    if routeformer(argv) == 2:
        return None
    return {r['family']: r for r in json.loads((folder / 'compare.json').read_text())}


def val_rows(metrics: Path) -> list[dict]:
    """The validation rows of a run's metrics.jsonl (a torn last line is skipped)."""
    rows = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get('split') == 'val':
            rows.append(row)
    return rows


def fmt_seconds(t: float) -> str:
    return f'{t:.0f} s' if t < 120 else f'{t / 60:.1f} min'
