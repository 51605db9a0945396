"""PNG plots of training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that does not parse (torn by a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors='replace').splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get('step'), int) and 'split' in row:
            rows.append(row)
    return rows


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def smooth(values: list[float], span: int) -> list[float]:
    out, acc = [], None
    alpha = 2 / (span + 1)
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def val_key(rows: list[dict]) -> str:
    return 'bpb' if any('bpb' in r for r in rows) else 'accuracy'


def plot_run(metrics: list[dict], path: Path, title: str) -> Path:
    """Training loss (raw and smoothed) and the validation metric against the step."""
    plt = pyplot()
    # skipped steps (a non-finite loss) have no loss to draw
    train = [r for r in metrics if r['split'] == 'train' and r.get('loss') is not None]
    val = [r for r in metrics if r['split'] == 'val' and r.get('loss') is not None]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps, losses = [r['step'] for r in train], [r['loss'] for r in train]
        ax_loss.plot(steps, losses, alpha=0.3, color='C0', label='train (per step)')
        ax_loss.plot(steps, smooth(losses, max(1, len(losses) // 50)), color='C0', label='train (smoothed)')
    if val:
        ax_loss.plot([r['step'] for r in val], [r['loss'] for r in val], 'o-', color='C1', label='validation')
        key = val_key(val)
        ax_val.plot([r['step'] for r in val], [r[key] for r in val], 'o-', color='C1')
        ax_val.set_ylabel('bits per byte' if key == 'bpb' else 'accuracy on scored tokens')
    ax_loss.set(xlabel='step', ylabel='cross entropy (nats)', title='loss')
    ax_loss.legend()
    ax_val.set(xlabel='step', title='validation')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(runs: dict[str, list[dict]], summaries: dict[str, dict], path: Path, title: str) -> Path:
    """Validation metric against step and against training time, one line per family, and the
    throughput and memory of each."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    key = None
    for name, rows in runs.items():
        val = [r for r in rows if r['split'] == 'val' and r.get('loss') is not None]
        if not val:
            continue
        key = key or val_key(val)
        axes[0].plot([r['step'] for r in val], [r[key] for r in val], 'o-', label=name)
        axes[1].plot([r['train_time'] for r in val], [r[key] for r in val], 'o-', label=name)
    ylabel = 'bits per byte' if key == 'bpb' else 'accuracy'
    axes[0].set(xlabel='step', ylabel=ylabel, title='quality per step')
    axes[1].set(xlabel='training time (s)', ylabel=ylabel, title='quality per second')
    for ax in axes[:2]:
        if ax.lines:
            ax.legend()
    names = [n for n in summaries if summaries[n].get('tok_per_s')]
    axes[2].bar(names, [summaries[n]['tok_per_s'] for n in names], color='C2')
    axes[2].set(ylabel='training tokens / s', title='speed (peak memory above bars)')
    for i, n in enumerate(names):
        mem = summaries[n].get('peak_memory_mib')
        if mem is not None:
            axes[2].annotate(f'{mem:.0f} MiB', (i, summaries[n]['tok_per_s']), ha='center', va='bottom')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
