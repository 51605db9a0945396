"""Training data: byte-level text, and two synthetic long-range tasks.

Every source yields examples of seq_len + 1 tokens: the model reads the first seq_len and
predicts the last seq_len, scored where `scored` is True (everywhere for text; the copied half or
the recall answers for tasks). Training batches are a pure function of (seed, step): resuming at
step s reproduces the data order without any saved position, and a batch of B sequences is the
same whatever the number of processes, each process taking its own contiguous slice.

Axes: b batch, n sequence.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import DataConfig
from .errors import CLIError

VAL_SEED = 0x5EED_0F_7A1  # validation sequences of the tasks: one fixed set, whatever --seed is


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed % 2 ** 31) * 2 ** 32 + step)


def shard(t: Tensor, rank: int, world: int) -> Tensor:
    """This process's contiguous part of a global batch."""
    size = t.shape[0] // world
    return t[rank * size:(rank + 1) * size]


@dataclass
class Batch:
    x: Tensor              # (b, n + 1) token ids
    scored: Tensor | None  # (b, n) bool: which targets count; None = all


# ---------------------------------------------------------------- text

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()['stdlib'])


def text_files(root: Path, *, only_python: bool = False) -> list[Path]:
    """Non-hidden regular files under `root`, sorted; binary files (a NUL byte in the first 8 KiB,
    git's test) and installed packages are skipped."""
    skip_dirs = {'site-packages', 'dist-packages', '__pycache__'}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith('.'))
        for name in sorted(filenames):
            if name.startswith('.') or (only_python and not name.endswith('.py')):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            with open(path, 'rb') as f:
                if b'\0' in f.read(8192):
                    continue
            found.append(path)
    return found


def split_by_file(paths: list[Path], root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """A file is held out when the hash of its relative path falls below val_fraction: the split of
    a file never depends on which other files exist."""
    def score(p):
        return zlib.crc32(p.relative_to(root).as_posix().encode()) / 2 ** 32
    val = [p for p in paths if score(p) < val_fraction]
    if not val:  # few files: hold out the lowest-scoring one
        val = [min(paths, key=score)]
    held = set(val)
    return [p for p in paths if p not in held], val


def read_join(paths: list[Path]) -> bytes:
    return b'\n\n'.join(p.read_bytes() for p in paths)


@dataclass
class TextCorpus:
    train: Tensor   # uint8 bytes
    val: Tensor
    description: str

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for part in (self.train, self.val):
            h.update(part.numpy())
        return h.hexdigest()[:16]


def load_corpus(path: str | None, *, val_fraction: float) -> TextCorpus:
    if path is None:
        root = stdlib_root()
        files = text_files(root, only_python=True)
        if len(files) < 2:
            raise CLIError(f'found no Python standard library sources under {root}: give --data PATH')
        train, val = split_by_file(files, root, val_fraction)
        description = f'Python {".".join(map(str, __import__("sys").version_info[:2]))} standard library ' \
                      f'({len(train)} train / {len(val)} validation files)'
        return make_corpus(read_join(train), read_join(val), description)

    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f'data path {path} does not exist: give a text file or a folder of text files, '
                       f'or leave out --data to train on the Python standard library sources')
    if p.is_file():
        data = p.read_bytes()
        if not data:
            raise CLIError(f'data file {path} is empty: give a file with text in it')
        cut = int(len(data) * (1 - val_fraction))  # one file: the last val_fraction of its bytes is held out
        return make_corpus(data[:cut], data[cut:], f'{p.name} ({len(data):,} bytes, last {val_fraction:.0%} held out)')
    files = [f for f in text_files(p) if f.stat().st_size > 0]
    if not files:
        raise CLIError(f'data folder {path} contains no text files: add some, or point --data at another folder')
    if len(files) == 1:
        return load_corpus(str(files[0]), val_fraction=val_fraction)
    train, val = split_by_file(files, p, val_fraction)
    return make_corpus(read_join(train), read_join(val),
                       f'{p.name}/ ({len(train)} train / {len(val)} validation files)')


def make_corpus(train: bytes, val: bytes, description: str) -> TextCorpus:
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.zeros(0, dtype=torch.uint8)  # noqa: E731
    return TextCorpus(as_tensor(train), as_tensor(val), description)


class TextSource:
    metric = 'bpb'
    num_tokens = 256

    def __init__(self, corpus: TextCorpus, seq_len: int, seed: int):
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        for name, part in (('training', corpus.train), ('validation', corpus.val)):
            if part.numel() < seq_len + 1:
                raise CLIError(f'{corpus.description} has {part.numel():,} bytes of {name} text, fewer than one '
                               f'sequence of --seq-len {seq_len} + 1: lower --seq-len or add text')
        self.description = corpus.description
        self.fingerprint = corpus.fingerprint

    def windows(self, stream: Tensor, starts: Tensor) -> Tensor:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        return stream[idx].long()

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        g = step_generator(self.seed, step)
        starts = torch.randint(0, self.corpus.train.numel() - self.seq_len, (batch_size,), generator=g)
        return Batch(self.windows(self.corpus.train, shard(starts, rank, world)), None)

    def val_batches(self, batch_size: int, count: int):
        """`count` batches of windows spread evenly over the validation text (fewer when it is short)."""
        n = self.corpus.val.numel() - self.seq_len
        total = min(batch_size * count, n)
        starts = torch.linspace(0, n - 1, total).long()
        for chunk in starts.split(batch_size):
            yield Batch(self.windows(self.corpus.val, chunk), None)


# ---------------------------------------------------------------- tasks

class SyntheticTask:
    """A task makes `n` examples from a generator; training draws them per step, validation from
    one fixed generator."""
    metric = 'accuracy'

    def make(self, n: int, g: torch.Generator) -> Batch:
        raise NotImplementedError

    def train_batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        b = self.make(batch_size, step_generator(self.seed, step))
        return Batch(shard(b.x, rank, world), shard(b.scored, rank, world))

    def val_batches(self, batch_size: int, count: int):
        g = torch.Generator().manual_seed(VAL_SEED)
        for _ in range(count):
            yield self.make(batch_size, g)


class DuplicationTask(SyntheticTask):
    """`0 w 0 w 0` (Reformer paper, section 5.1): w is seq_len/2 - 1 random tokens of 1..vocab-1;
    only the second copy is scored, and predicting it means looking half a sequence back. The
    trailing 0 is only ever a target (unscored), so the model reads exactly seq_len tokens."""

    def __init__(self, seq_len: int, vocab: int, seed: int):
        if seq_len % 2 or seq_len < 4:
            raise CLIError(f'the duplication task needs an even --seq-len of at least 4, got {seq_len}')
        if vocab < 3:
            raise CLIError(f'the duplication task needs --vocab of at least 3, got {vocab}')
        self.seq_len, self.num_tokens, self.seed = seq_len, vocab, seed
        self.half = seq_len // 2
        self.description = f'duplication task: copy {self.half - 1} tokens of a {vocab}-token vocabulary ' \
                           f'from {self.half} positions back (chance {1 / (vocab - 1):.1%})'
        self.fingerprint = f'duplication-{seq_len}-{vocab}'

    def make(self, n: int, g: torch.Generator) -> Batch:
        w = torch.randint(1, self.num_tokens, (n, self.half - 1), generator=g)
        zero = torch.zeros(n, 1, dtype=torch.long)
        x = torch.cat((zero, w, zero, w, zero), dim=1)
        scored = torch.zeros(n, self.seq_len, dtype=torch.bool)
        scored[:, self.half:self.seq_len - 1] = True  # targets x[half + 1 : seq_len], the second w
        return Batch(x, scored)


class RecallTask(SyntheticTask):
    """Multi-query associative recall (Arora et al., Zoology, 2023): `pairs` key-value pairs at the
    start, zeros, then `queries` of those keys at the end, each followed by its value. Keys are
    1..K, values K+1..vocab-1; only the values after the queries are scored (chance 1 / #values).
    Keys in a sequence are distinct, so each query has one answer. The queries ask distinct keys
    (a repeated query could copy the answer of the earlier one from close by, which local
    attention can do) and by default only half of them (when every key is asked, "a value not
    answered yet" is right often enough that a model settles there instead of looking keys up)."""

    def __init__(self, seq_len: int, vocab: int, pairs: int, queries: int, seed: int):
        keys = (vocab - 1) // 2
        if pairs > keys:
            raise CLIError(f'recall with --vocab {vocab} has {keys} distinct keys, fewer than --recall-pairs {pairs}: '
                           f'raise --vocab to at least {2 * pairs + 1} or lower --recall-pairs')
        if not 1 <= queries <= pairs:
            raise CLIError(f'--recall-queries must be between 1 and --recall-pairs ({pairs}), got {queries}: '
                           f'each query asks a different key')
        if 2 * (pairs + queries) > seq_len + 1:
            raise CLIError(f'{pairs} pairs and {queries} queries take {2 * (pairs + queries)} tokens, more than '
                           f'--seq-len {seq_len} + 1: raise --seq-len or lower --recall-pairs/--recall-queries')
        self.seq_len, self.num_tokens, self.seed = seq_len, vocab, seed
        self.keys, self.pairs, self.queries = keys, pairs, queries
        self.description = f'multi-query associative recall: {pairs} pairs, {queries} queries, vocab {vocab} ' \
                           f'(chance {1 / (vocab - 1 - keys):.1%})'
        self.fingerprint = f'recall-{seq_len}-{vocab}-{pairs}-{queries}'

    def make(self, n: int, g: torch.Generator) -> Batch:
        keys = torch.rand(n, self.keys, generator=g).argsort(dim=-1)[:, :self.pairs] + 1
        values = torch.randint(self.keys + 1, self.num_tokens, (n, self.pairs), generator=g)
        order = torch.rand(n, self.pairs, generator=g).argsort(dim=-1)[:, :self.queries]
        pairs = torch.stack((keys, values), dim=-1).flatten(1)
        asked = torch.stack((keys.gather(1, order), values.gather(1, order)), dim=-1).flatten(1)
        gap = self.seq_len + 1 - pairs.shape[1] - asked.shape[1]
        x = torch.cat((pairs, torch.zeros(n, gap, dtype=torch.long), asked), dim=1)
        scored = torch.zeros(n, self.seq_len, dtype=torch.bool)
        answers = torch.arange(self.seq_len + 1 - asked.shape[1] + 1, self.seq_len + 1, 2)  # positions in x
        scored[:, answers - 1] = True
        return Batch(x, scored)


def make_source(cfg: DataConfig, *, seq_len: int, seed: int, whole: bool = False):
    """`whole`: validate on all of the text (evaluating a model on text it was not trained on)."""
    if cfg.task == 'text':
        corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction)
        if whole:
            everything = torch.cat((corpus.train, corpus.val))
            corpus = TextCorpus(everything, everything, corpus.description.split(' (')[0] + ' (all of it)')
        return TextSource(corpus, seq_len, seed)
    if cfg.task == 'duplication':
        return DuplicationTask(seq_len, cfg.vocab or 16, seed)
    if cfg.task == 'recall':
        pairs = cfg.recall_pairs or 16
        return RecallTask(seq_len, cfg.vocab or 64, pairs, cfg.recall_queries or max(1, pairs // 2), seed)
    raise CLIError(f'unknown task {cfg.task!r}')
