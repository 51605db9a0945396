"""The `routeformer` command: train, eval, sample, compare, families.

    routeformer train                                   # k-means routing on the Python standard library
    routeformer train --family local --task duplication --seq-len 256 --out runs/dup
    routeformer train --resume --out runs/dup           # continue exactly where it stopped
    routeformer eval runs/dup
    routeformer sample runs/routing-stdlib --prompt 'def '
    routeformer compare --families full,local --task duplication --steps 300
    torchrun --nproc_per_node=2 -m routeformer train ...

Bad input ends with one line saying what to change (exit status 2), never a trace.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import add_config_flags, fraction, nonnegative_float, positive_float, positive_int
from .errors import CLIError

__all__ = ['main', 'CLIError']

TRAIN_EXTRA = ('safetensors', 'tqdm', 'matplotlib')  # pyproject's `train` extra


class Parser(argparse.ArgumentParser):
    """Bad flags end with one line (what is wrong, and where the help is), not the whole usage."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = Parser(prog='routeformer', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'routeformer {__version__}')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    commands.required = True

    train = commands.add_parser('train', help='train a model (flags, or --config FILE)')
    train.add_argument('--out', help='run folder: checkpoints, metrics.jsonl, curves.png (default runs/FAMILY-DATA)')
    train.add_argument('--resume', action='store_true',
                       help='continue the run in --out from its newest intact checkpoint')
    train.add_argument('--resume-from', type=positive_int, metavar='STEP',
                       help='continue the run in --out from its checkpoint of this step')
    train.add_argument('--overwrite', action='store_true',
                       help='start over in an --out that already holds a run (deletes its checkpoints and metrics)')
    train.add_argument('--stop-at', type=positive_int, metavar='STEP',
                       help='checkpoint and stop at this step, keeping the schedule of --steps (continue with --resume)')
    train.add_argument('--quiet', action='store_true', help='no progress bar')
    add_config_flags(train)

    ev = commands.add_parser('eval', help='validation metric of a checkpoint')
    ev.add_argument('run', help='run folder (its newest checkpoint) or a checkpoints/step-* folder')
    ev.add_argument('--data', help='evaluate on all of this text file or folder instead of the validation split')
    ev.add_argument('--batch-size', type=positive_int, help='sequences per batch (default: the training batch size)')
    ev.add_argument('--eval-batches', type=positive_int, help='batches to score (default: the training setting)')
    ev.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (default %(default)s)')
    ev.add_argument('--bf16', action='store_true', help='bfloat16 autocast (default: float32)')
    ev.add_argument('--compile', action='store_true', help='torch.compile the model (compile time is reported apart)')
    ev.add_argument('--json', action='store_true', help='also print the result as one JSON line')

    sa = commands.add_parser('sample', help='generate from a prompt with the cached decoder')
    sa.add_argument('run', help='run folder or checkpoint folder')
    prompt = sa.add_mutually_exclusive_group()
    prompt.add_argument('--prompt', default='\n', help='text prompt (UTF-8 bytes; default a newline)')
    prompt.add_argument('--prompt-ids', help='prompt as token ids, e.g. 0,3,7 (models trained on a task)')
    sa.add_argument('--length', type=positive_int, default=200, help='tokens (bytes) to generate (default %(default)s)')
    sa.add_argument('--temperature', type=nonnegative_float, default=0.8, help='0 is greedy (default %(default)s)')
    sa.add_argument('--filter', choices=['top_k', 'top_p', 'none'], default='top_k', help='default %(default)s')
    sa.add_argument('--filter-thres', type=fraction, default=0.9,
                    help='seed convention: keep the top 1 - thres (default %(default)s)')
    sa.add_argument('--seed', type=int, default=0, help='default %(default)s')
    sa.add_argument('--no-cache', action='store_true', help='recompute the prefix at every step (for comparison)')
    sa.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (default %(default)s)')

    cmp = commands.add_parser('compare', help='train several families on the same data and budget; one table')
    cmp.add_argument('--families', default='full,local', help='comma-separated families (default full,local)')
    cmp.add_argument('--family-arg', action='append', metavar='FAMILY:KEY=VALUE',
                     help='model keyword argument for one family, repeatable')
    cmp.add_argument('--out', help='folder of the comparison (default runs/compare)')
    cmp.add_argument('--resume', action='store_true', help='reuse finished families, continue stopped ones')
    cmp.add_argument('--timeout', type=positive_float, help='seconds per family')
    cmp.add_argument('--quiet', action='store_true', help='no progress bars')
    add_config_flags(cmp, hidden=('family',))  # --families picks them

    commands.add_parser('families', help='list the model families and whether this installation has them')
    return parser


def run(args) -> int:
    if args.command == 'train':
        from .train import main as train_main
        return train_main(args)
    if args.command == 'compare':
        from .compare import main as compare_main
        return compare_main(args)
    from . import commands
    return dict(eval=commands.eval_main, sample=commands.sample_main, families=commands.families_main)[args.command](args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a flag argparse rejects (its message is printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return run(args)
    except CLIError as e:
        rank = os.environ.get('RANK')
        prefix = f'routeformer {args.command}' + (f' [process {rank}]' if rank not in (None, '0') else '')
        print(f'{prefix}: error: {e}', file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_EXTRA:
            raise
        print(f'routeformer {args.command}: error: the command line needs {e.name}: '
              f"pip install 'routeformer[train]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('routeformer: interrupted', file=sys.stderr)
        return 130
