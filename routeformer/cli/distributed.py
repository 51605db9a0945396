"""More than one process: `torchrun --nproc_per_node=N -m routeformer train ...`.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; we start one process
group (gloo on CPU, nccl on CUDA), check that every process was started with the same settings
and data, and leave gradient averaging to DistributedDataParallel. Routers that keep statistics
outside autograd (k-means centroids) all-reduce them themselves once a process group exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import CLIError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when run alone), known before the group is joined."""
    return int(os.environ.get('RANK', '0'))


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f'--device {name!r} is not a device: use auto, cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise CLIError('--device cuda was asked for but PyTorch sees no CUDA GPU: use --device cpu')
        if device.index is None:
            device = torch.device('cuda', local_rank)
    return device


def setup(device_name: str, *, timeout_s: float = 300) -> Dist:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(device_name, local_rank)
    if world == 1:
        return Dist(device=device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    missing = [v for v in ('RANK', 'MASTER_ADDR', 'MASTER_PORT') if v not in os.environ]
    if missing:
        raise CLIError(f'WORLD_SIZE is {world} but {", ".join(missing)} is not set: start the processes with '
                       f'`torchrun --nproc_per_node={world} -m routeformer train ...`')
    if not dist.is_initialized():
        try:
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError are RuntimeErrors
            raise CLIError(f'process {os.environ["RANK"]} could not join the others at '
                           f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]} ({str(e).splitlines()[0]}): check '
                           f'that every process was started, with the same MASTER_ADDR and MASTER_PORT') from None
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def check_agreement(d: Dist, fingerprint: dict) -> None:
    """Every process must run the same configuration on the same data; otherwise each one stops
    with the same message naming what differs."""
    if not d.enabled:
        return
    mine = json.dumps(fingerprint, sort_keys=True)
    every: list = [None] * d.world
    dist.all_gather_object(every, mine)
    reference = flatten(json.loads(every[0]))
    diffs = []
    for rank, theirs in enumerate(every[1:], start=1):
        theirs = flatten(json.loads(theirs))
        for key in sorted(set(reference) | set(theirs)):
            if reference.get(key) != theirs.get(key):
                diffs.append(f'process {rank} has {key}={theirs.get(key)!r} where process 0 has {reference.get(key)!r}')
    if diffs:
        raise CLIError('the processes of this torchrun run disagree: ' + '; '.join(diffs[:4]) +
                       ': start every process with the same command, config file and data')


def flatten(d: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sums of `values` over every process (float64, for exact token counts)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == 'cuda' else 'cpu')
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
