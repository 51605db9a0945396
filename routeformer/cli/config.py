"""Run configuration: three dataclasses (model, data, training), read from defaults, then a size
preset, then a JSON/TOML file, then command-line flags, each overriding the one before.

The flags are generated from the fields, so a field, its flag and its config-file key share one
name (`seq_len` <-> `--seq-len`), and a file key that is not a field is an error.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import CLIError


def option(default, help: str, *, type=None, choices=None, flag: bool = True):
    return field(default=default, metadata=dict(help=help, type=type, choices=choices, flag=flag))


TASKS = ('text', 'duplication', 'recall')

# dim, depth, heads; a preset is overridden by explicit flags or file keys
SIZES = {
    'tiny': dict(dim=64, depth=2, heads=4),
    'small': dict(dim=128, depth=4, heads=4),
    'base': dict(dim=256, depth=6, heads=8),
    'large': dict(dim=512, depth=8, heads=8),
}


@dataclass
class ModelConfig:
    family: str = option('routing', 'model family (see `routeformer families`)', type=str)
    dim: int = option(128, 'model width', type=int)
    depth: int = option(4, 'number of layers', type=int)
    heads: int = option(4, 'attention heads per layer', type=int)
    dim_head: int | None = option(None, 'width of each head (default dim / heads)', type=int)
    window: int = option(64, 'local window, cluster window or bucket size, whichever the family has', type=int)
    local_heads: int | None = option(None, 'heads on local attention beside the routed ones (family default)', type=int)
    seq_len: int = option(256, 'training sequence length (the model\'s max_seq_len)', type=int)
    num_tokens: int = option(256, 'vocabulary size; set from the data', flag=False)
    # extra keyword arguments of the family's model class (--model-arg KEY=VALUE, or [model.kwargs])
    kwargs: dict = field(default_factory=dict, metadata=dict(flag=False))


@dataclass
class DataConfig:
    data: str | None = option(None, 'text file or folder of text files (byte-level); default: the Python '
                                    'standard library sources of this interpreter', type=str)
    task: str = option('text', 'text, or a synthetic long-range task: duplication (0 w 0 w) or recall '
                               '(multi-query associative recall)', type=str, choices=TASKS)
    vocab: int | None = option(None, 'task vocabulary size (duplication 16, recall 64)', type=int)
    recall_pairs: int | None = option(None, 'recall: key-value pairs at the start (default 16)', type=int)
    recall_queries: int | None = option(None, 'recall: queries at the end, distinct keys (default: half of recall_pairs)', type=int)
    val_fraction: float = option(0.05, 'share of text files (or of a single file\'s bytes) held out', type=float)


@dataclass
class TrainConfig:
    steps: int = option(500, 'optimizer steps of the whole run (the learning-rate schedule spans them)', type=int)
    batch_size: int = option(16, 'sequences per step, over all processes', type=int)
    lr: float = option(2e-3, 'peak learning rate (AdamW)', type=float)
    min_lr_ratio: float = option(0.1, 'cosine decay ends at lr * this', type=float)
    warmup: int = option(50, 'linear warm-up steps', type=int)
    weight_decay: float = option(0.01, 'AdamW weight decay', type=float)
    grad_clip: float = option(1.0, 'clip the gradient norm to this (0: no clipping)', type=float)
    max_bad_steps: int = option(5, 'steps in a row with a non-finite loss or gradient to skip before the run '
                                   'stops as diverged (0: stop at the first)', type=int)
    eval_every: int = option(100, 'validate every N steps', type=int)
    eval_batches: int = option(8, 'validation batches (of batch_size sequences)', type=int)
    save_every: int = option(100, 'checkpoint every N steps (and at the end)', type=int)
    keep: int = option(2, 'checkpoints kept on disk', type=int)
    seed: int = option(0, 'seed of the initial weights and of the data order', type=int)
    bf16: bool = option(False, 'bfloat16 autocast', type=bool)
    compile: bool = option(False, 'torch.compile the model', type=bool)
    compile_backend: str = option('inductor', 'torch.compile backend', type=str)
    device: str = option('auto', 'auto, cpu, cuda or cuda:N', type=str)
    sample_length: int = option(200, 'bytes to generate after training on text (0: none)', type=int)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = 'config') -> 'Config':
        return merge(cls(), d, source=source)


SECTIONS = {'model': ModelConfig, 'data': DataConfig, 'train': TrainConfig}


def section_of(name: str) -> str:
    for section, kind in SECTIONS.items():
        if name in {f.name for f in fields(kind)}:
            return section
    raise KeyError(name)


def merge(cfg: Config, overrides: dict, *, source: str) -> Config:
    """`overrides` is {section: {key: value}} (a config file) ; unknown sections or keys are errors."""
    unknown = set(overrides) - set(SECTIONS)
    if unknown:
        raise CLIError(f'{source}: unknown section(s) {sorted(unknown)}; a config has the sections '
                       f'{list(SECTIONS)} (e.g. [model] dim = 256)')
    parts = {}
    for section, kind in SECTIONS.items():
        values = dict(overrides.get(section) or {})
        current = getattr(cfg, section)
        if section == 'model' and 'size' in values:
            current = replace(current, **size_preset(values.pop('size'), source))
        kinds = {f.name: f for f in fields(kind)}
        bad = set(values) - set(kinds)
        if bad:
            raise CLIError(f'{source}: unknown key(s) {sorted(bad)} in [{section}]; valid keys: {sorted(kinds)}')
        for name, value in values.items():
            check_type(kinds[name], value, f'{source}: [{section}] {name}')
        parts[section] = replace(current, **values)
    return Config(**parts)


def check_type(f, value, where: str) -> None:
    expected = f.metadata.get('type') or (dict if f.name == 'kwargs' else None)
    if expected is None or (value is None and f.default is None):
        return
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise CLIError(f'{where} must be {"a table" if expected is dict else "a " + expected.__name__}, got {value!r}')
    choices = f.metadata.get('choices')
    if choices and value not in choices:
        raise CLIError(f'{where} must be one of {", ".join(choices)}, got {value!r}')


def size_preset(name: str, source: str) -> dict:
    if name not in SIZES:
        raise CLIError(f'{source}: unknown size {name!r}; choose one of {", ".join(SIZES)} '
                       f'(or set dim, depth and heads)')
    return SIZES[name]


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f'config file {path} does not exist: give the path of a .json or .toml file')
    try:
        if p.suffix == '.toml':
            return tomllib.loads(p.read_text())
        if p.suffix == '.json':
            return json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f'config file {path} cannot be parsed: {e}') from None
    raise CLIError(f'config file {path} must end in .json or .toml')


# ---------------------------------------------------------------- flags

def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a number, got {text!r}') from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f'must be a finite number, 0 or more, got {text}')
    return value


def positive_float(text: str) -> float:
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f'must be more than 0, got {text}')
    return value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f'must be between 0 and 1, got {text}')
    return value


def add_config_flags(parser: argparse.ArgumentParser, *, hidden: tuple[str, ...] = ()) -> None:
    """One flag per field; flags not given stay out of the namespace (argparse.SUPPRESS), so that
    only what the user typed overrides the file and the defaults. `hidden` fields keep their flag
    (so that a command can say why it rejects it) but stay out of --help."""
    parser.add_argument('--config', default=argparse.SUPPRESS, help='JSON or TOML file with [model], [data], [train] '
                        'sections; flags override it')
    parser.add_argument('--size', default=argparse.SUPPRESS, choices=list(SIZES),
                        help='preset of dim, depth and heads: ' + ', '.join(f'{k} {tuple(v.values())}' for k, v in SIZES.items()))
    parser.add_argument('--model-arg', action='append', default=argparse.SUPPRESS, metavar='KEY=VALUE',
                        help='extra keyword argument of the model class (Python literal value), repeatable')
    for section, kind in SECTIONS.items():
        group = parser.add_argument_group(f'{section} options')
        for f in fields(kind):
            meta = f.metadata
            if not meta.get('flag', True):
                continue
            name = '--' + f.name.replace('_', '-')
            text = meta['help'] + (f' (default {f.default})' if f.default is not None and meta['type'] is not bool else '')
            text = argparse.SUPPRESS if f.name in hidden else text
            if meta['type'] is bool:
                group.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(name, type=meta['type'], choices=meta['choices'], default=argparse.SUPPRESS, help=text)


def parse_model_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise CLIError(f'--model-arg {item!r} must look like KEY=VALUE, e.g. --model-arg n_hashes=4')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word is a string
    return out


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> tuple[Config, dict]:
    """The resolved Config and the overrides the user gave explicitly ({section: {key: value}})."""
    cfg = base or Config()
    given = vars(args)
    if 'config' in given:
        cfg = merge(cfg, load_file(given['config']), source=given['config'])
    explicit: dict = {s: {} for s in SECTIONS}
    if 'size' in given:
        explicit['model'].update(size_preset(given['size'], '--size'))
    for name, value in given.items():
        try:
            explicit[section_of(name)][name] = value
        except KeyError:
            pass
    if 'model_arg' in given:
        explicit['model']['kwargs'] = {**cfg.model.kwargs, **parse_model_args(given['model_arg'])}
    cfg = merge(cfg, explicit, source='command line')
    return cfg, {s: v for s, v in explicit.items() if v}


def validate(cfg: Config) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    positive = dict(dim=m.dim, depth=m.depth, heads=m.heads, window=m.window, seq_len=m.seq_len, steps=t.steps,
                    batch_size=t.batch_size, eval_every=t.eval_every, eval_batches=t.eval_batches,
                    save_every=t.save_every, keep=t.keep, dim_head=m.dim_head, vocab=d.vocab,
                    recall_pairs=d.recall_pairs, recall_queries=d.recall_queries)
    for name, value in positive.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise CLIError(f'--{name.replace("_", "-")} must be a positive integer, got {value!r}')
    for name, value in dict(warmup=t.warmup, sample_length=t.sample_length, max_bad_steps=t.max_bad_steps).items():
        if value < 0:
            raise CLIError(f'--{name.replace("_", "-")} must be 0 or more, got {value}')
    for name, value in dict(weight_decay=t.weight_decay, grad_clip=t.grad_clip).items():
        if not (math.isfinite(value) and value >= 0):
            raise CLIError(f'--{name.replace("_", "-")} must be a finite number, 0 or more, got {value}')
    if m.dim_head is None and m.dim % m.heads:
        raise CLIError(f'--dim {m.dim} is not divisible by --heads {m.heads}: change one, or set --dim-head')
    if m.local_heads is not None and not 0 <= m.local_heads <= m.heads:
        raise CLIError(f'--local-heads {m.local_heads} must be between 0 and --heads ({m.heads})')
    if not 0 < d.val_fraction < 1:
        raise CLIError(f'--val-fraction must be between 0 and 1, got {d.val_fraction}')
    if d.task != 'text' and d.data is not None:
        raise CLIError(f'--data is for text; the {d.task} task generates its own sequences: drop --data or use --task text')
    if not (math.isfinite(t.lr) and t.lr > 0) or not 0 <= t.min_lr_ratio <= 1:
        raise CLIError(f'--lr must be a positive number (got {t.lr}) and --min-lr-ratio between 0 and 1 '
                       f'(got {t.min_lr_ratio})')
