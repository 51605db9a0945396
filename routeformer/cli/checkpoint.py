"""Checkpoints: weights in safetensors, everything else in JSON, written so a crash at any moment
leaves the previous checkpoint intact.

    RUN/checkpoints/step-00000500/model.safetensors        weights (and buffers: k-means centroids)
    RUN/checkpoints/step-00000500/train_state.safetensors  optimizer moments, RNG states
    RUN/checkpoints/step-00000500/state.json               format, versions, config, step, optimizer
                                                           hyper-parameters, data fingerprint, clocks
    RUN/checkpoints/latest                                 the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed to disk, renamed into place (one atomic
rename), and only then does `latest` point to it (written to a temporary file and renamed too).
Both safetensors files carry the sha256 of their tensors in their metadata, checked on every
load; a run whose newest checkpoint is damaged resumes from the newest one that is intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CLIError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

FORMAT = 1
MODEL_FILE, TRAIN_STATE_FILE, STATE_FILE, LATEST = 'model.safetensors', 'train_state.safetensors', 'state.json', 'latest'
LOCK_FILE = '.lock'
CHECKSUM = 'sha256'  # safetensors metadata key


class DamagedCheckpoint(CLIError):
    """A checkpoint file that cannot be read or does not match its checksum."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f'{file} {reason}: the checkpoint is damaged; use an older checkpoints/step-* folder '
                         f'of the run')
        self.file, self.reason = file, reason


def package_version() -> str:
    from .. import __version__
    return __version__


def to_json(obj, **kwargs) -> str:
    """JSON with null for every non-finite float (a bare NaN or Infinity is not JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), allow_nan=False, **kwargs)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Holds RUN/.lock (flock) while a process writes the run: a second one refuses at once, and a
    killed process leaves no stale lock (the kernel drops it with the process)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, 'a') as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CLIError(f'{run_dir} is in use by another routeformer process (it holds {run_dir / LOCK_FILE}): '
                               f'wait for it to finish, or choose another --out') from None
        yield


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


# ---------------------------------------------------------------- weights

def save_weights(model: nn.Module, path: Path) -> None:
    """The state dict in safetensors. Tied weights are stored once (the others listed as aliases)
    and modules' extra state (an LSH router's rotation seed) goes into the file's metadata as JSON,
    so the file alone restores the model."""
    tensors, aliases, extra, seen, storages = {}, {}, {}, {}, set()
    for name, value in model.state_dict().items():
        if not torch.is_tensor(value):
            extra[name] = value
            continue
        view = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()),
                value.dtype)
        if view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        ptr = value.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory: a view of stored memory is copied
        tensors[name] = value.detach().cpu().clone() if ptr in storages else value.detach().cpu().contiguous()
        storages.add(ptr)
    try:
        meta = json.dumps(dict(aliases=aliases, extra_state=extra))
    except TypeError as e:
        raise CLIError(f'the model\'s extra state cannot be written as JSON ({e})') from None
    save_file(tensors, str(path), metadata={'routeformer': meta, CHECKSUM: digest(tensors)})


def digest(tensors: dict) -> str:
    """sha256 of the names, dtypes, shapes and bytes of `tensors` (independent of the file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_checked(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file whose tensors match the checksum in its metadata
    (files written before checksums are taken as they are); DamagedCheckpoint otherwise."""
    if not path.is_file():
        raise DamagedCheckpoint(path, 'is missing')
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DamagedCheckpoint(path, f'cannot be read ({e})') from None
    if CHECKSUM in meta and digest(tensors) != meta[CHECKSUM]:
        raise DamagedCheckpoint(path, 'does not match its checksum')
    return tensors, meta


def read_weights(path: Path) -> dict:
    tensors, meta = read_checked(path)
    try:
        meta = json.loads(meta.get('routeformer', '{}'))
    except json.JSONDecodeError as e:
        raise DamagedCheckpoint(path, f'has unreadable metadata ({e})') from None
    state = dict(tensors)
    state.update({name: tensors[target] for name, target in meta.get('aliases', {}).items()})
    state.update(meta.get('extra_state', {}))
    return state


# ---------------------------------------------------------------- save

def split_optimizer_state(sd: dict) -> tuple[dict, dict]:
    """Optimizer state_dict -> (tensors for safetensors, the JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, entry in sd['state'].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f'optimizer.{idx}.{key}'] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, dict(param_groups=sd['param_groups'], scalars=scalars)


def rng_tensors() -> dict:
    out = {'rng.torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f'rng.cuda.{i}': s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def save(run_dir: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int) -> Path:
    root = Path(run_dir) / 'checkpoints'
    root.mkdir(parents=True, exist_ok=True)
    name = f'step-{step:08d}'
    for stale in [*root.glob('.tmp-*'), *root.glob('.old-*')]:  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f'.tmp-{name}-{os.getpid()}'
    tmp.mkdir()

    save_weights(model, tmp / MODEL_FILE)
    opt_tensors, opt_rest = split_optimizer_state(optimizer.state_dict())
    train_tensors = {**opt_tensors, **rng_tensors()}
    save_file(train_tensors, str(tmp / TRAIN_STATE_FILE), metadata={CHECKSUM: digest(train_tensors)})
    full_state = dict(format=FORMAT, routeformer=package_version(), torch=torch.__version__, step=step,
                      optimizer=opt_rest, **state)
    (tmp / STATE_FILE).write_text(to_json(full_state, indent=1))
    for f in (MODEL_FILE, TRAIN_STATE_FILE, STATE_FILE):
        fsync_path(tmp / f)
    fsync_path(tmp)

    final = root / name
    old = root / f'.old-{name}-{os.getpid()}'
    if final.exists():  # left by an earlier run that went further before it was resumed from an older step
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    write_atomic(root / LATEST, name)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keeps the newest `keep` checkpoints up to the current one. Later ones (from before a resume
    at an older step) are left for the run to replace when it gets there."""
    current = (root / LATEST).read_text().strip()
    done = sorted(p for p in root.glob('step-*') if p.is_dir() and p.name <= current)
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- load

def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / 'checkpoints' / f'step-{step:08d}'


def candidates(run_dir: str | Path) -> list[Path]:
    """A run's checkpoint folders, newest first: the one `latest` names and those before it (or,
    when `latest` is unreadable or names a folder that is gone, every step-* folder)."""
    root = Path(run_dir) / 'checkpoints'
    every = sorted((p for p in root.glob('step-*') if p.is_dir()), reverse=True)
    try:
        current = root / (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return every
    return every[every.index(current):] if current in every else every


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint folder, or the newest checkpoint of a run folder; None when there is none."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    return next((c for c in candidates(p) if (c / STATE_FILE).is_file()), None)


def holds_run(run_dir: Path) -> bool:
    """Whether a run was started here (a checkpoint folder or metrics), whether or not it is intact."""
    return any((run_dir / 'checkpoints').glob('step-*')) or (run_dir / 'metrics.jsonl').is_file()


def verify(ckpt: Path) -> dict:
    """The state of a checkpoint whose every file reads and matches its checksum."""
    state = read_state(ckpt)
    read_weights(ckpt / MODEL_FILE)
    read_checked(ckpt / TRAIN_STATE_FILE)
    return state


def skip_note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def find_resumable(run_dir: Path, step: int | None = None,
                   note: Callable[[str], None] = skip_note) -> tuple[Path, dict] | None:
    """(checkpoint, state) to resume: the one at `step`, or the newest intact one, each damaged
    newer one skipped with one line to `note`; None when the run has no intact checkpoint."""
    if step is not None:
        ckpt = step_folder(run_dir, step)
        if not ckpt.is_dir():
            have = ', '.join(str(int(c.name[5:])) for c in sorted(ckpt.parent.glob('step-*')) if c.name[5:].isdigit()) or 'none'
            raise CLIError(f'{run_dir} has no checkpoint at step {step} (it has steps: {have}): give one of those '
                           f'to --resume-from')
        return ckpt, verify(ckpt)
    for ckpt in candidates(run_dir):
        try:
            return ckpt, verify(ckpt)
        except DamagedCheckpoint as e:
            note(f'routeformer train: skipping {ckpt}: {e.file.name} {e.reason}')
    return None


def require_checkpoint(path: str | Path) -> Path:
    ckpt = find_checkpoint(path)
    if ckpt is None:
        what = 'does not exist' if not Path(path).exists() else 'holds no checkpoint'
        raise CLIError(f'{path} {what}: give a run folder written by `routeformer train --out` '
                       f'(or one of its checkpoints/step-* folders)')
    return ckpt


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(ckpt / STATE_FILE, f'cannot be read ({e})') from None
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        found = state.get('format') if isinstance(state, dict) else None
        version = state.get('routeformer', 'an unknown version') if isinstance(state, dict) else 'an unknown version'
        raise CLIError(f'{ckpt} is in checkpoint format {found!r} (written by routeformer {version}); this '
                       f'routeformer {package_version()} reads format {FORMAT}: use the routeformer version that '
                       f'wrote it')
    return state


def load_weights(model: nn.Module, ckpt: Path, state: dict) -> None:
    """Loads the weights, or says how the checkpoint's model differs from `model`."""
    path = ckpt / MODEL_FILE
    origin = f'it was saved from a {state["config"]["model"]["family"]} model by routeformer {state["routeformer"]}'
    saved = read_weights(path)
    own = model.state_dict()
    shape = lambda v: tuple(v.shape) if torch.is_tensor(v) else None  # noqa: E731
    wrong = [f'{k} {shape(saved[k])} vs {shape(own[k])}' for k in saved if k in own and shape(saved[k]) != shape(own[k])]
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if wrong or missing or unexpected:
        details = '; '.join(filter(None, [
            f'shapes differ: {", ".join(wrong[:3])}' if wrong else '',
            f'missing: {", ".join(missing[:3])}' if missing else '',
            f'unexpected: {", ".join(unexpected[:3])}' if unexpected else '']))
        raise CLIError(f'the checkpoint {ckpt} does not fit this model ({details}); {origin}: load it with the '
                       f'model settings of its state.json')
    model.load_state_dict(saved)


def load_train_state(optimizer: torch.optim.Optimizer, ckpt: Path, state: dict) -> None:
    """Restores the optimizer and the RNG states saved with the checkpoint."""
    tensors, _ = read_checked(ckpt / TRAIN_STATE_FILE)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith('optimizer.'):
            _, idx, name = key.split('.', 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, entry in state['optimizer']['scalars'].items():
        opt_state.setdefault(int(idx), {}).update(entry)
    try:
        optimizer.load_state_dict(dict(state=opt_state, param_groups=state['optimizer']['param_groups']))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CLIError(f'the optimizer state in {ckpt} does not fit this model ({e}); it was saved by routeformer '
                       f'{state["routeformer"]}: resume with the version and settings that wrote it') from None
    torch.set_rng_state(tensors['rng.torch'])
    cuda = [tensors[f'rng.cuda.{i}'] for i in range(len(tensors)) if f'rng.cuda.{i}' in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
