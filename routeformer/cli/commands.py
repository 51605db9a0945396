"""`routeformer eval`, `sample` and `families`: commands that read a checkpoint or the registry."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

from . import checkpoint
from .config import Config
from .data import make_source
from .distributed import pick_device
from .errors import CLIError
from .evaluate import evaluate, metric_line
from .families import FAMILIES, available_families, build_model
from .sample import check_prompt_length, decode_text, encode_ids, encode_text, generate


def load(path: str, device_name: str):
    """(config, model in eval mode, checkpoint folder, its state) of a run folder or checkpoint
    folder; the weights must match their checksum."""
    ckpt = checkpoint.require_checkpoint(path)
    state = checkpoint.read_state(ckpt)
    cfg = Config.from_dict(state['config'], source=str(ckpt / checkpoint.STATE_FILE))
    device = pick_device(device_name, 0)
    model = build_model(cfg.model)
    checkpoint.load_weights(model, ckpt, state)
    return cfg, model.to(device).eval(), ckpt, state


def eval_main(args) -> int:
    cfg, model, ckpt, state = load(args.run, args.device)
    data = cfg.data
    if args.data is not None:
        if data.task != 'text':
            raise CLIError(f'this model was trained on the {data.task} task: --data (text) does not apply to it')
        data = replace(data, data=args.data)
    source = make_source(data, seq_len=cfg.model.seq_len, seed=cfg.train.seed, whole=args.data is not None)
    if source.num_tokens != cfg.model.num_tokens:
        raise CLIError(f'this data has a vocabulary of {source.num_tokens} tokens but the model {cfg.model.num_tokens}: '
                       f'evaluate it on the kind of data it was trained on')
    device = next(model.parameters()).device
    net = model
    if args.compile:
        net = torch.compile(model)
        began = time.perf_counter()
        evaluate(net, source, batch_size=args.batch_size or cfg.train.batch_size, batches=1, device=device,
                 bf16=args.bf16)
        print(f'compiled in {time.perf_counter() - began:.1f} s (one batch, not counted below)')
    began = time.perf_counter()
    result = evaluate(net, source, batch_size=args.batch_size or cfg.train.batch_size,
                      batches=args.eval_batches or cfg.train.eval_batches, device=device, bf16=args.bf16)
    print(f'{ckpt} (step {state["step"]}, {cfg.model.family}) on {source.description}')
    print(metric_line(result) + f' in {time.perf_counter() - began:.1f} s')
    if args.json:
        print(json.dumps(dict(checkpoint=str(ckpt), step=state['step'], **result)))
    return 0


def sample_main(args) -> int:
    cfg, model, ckpt, state = load(args.run, args.device)
    if args.prompt_ids is not None:
        prompt = encode_ids(args.prompt_ids, cfg.model.num_tokens)
    else:
        prompt = encode_text(args.prompt, cfg.model.num_tokens)
    check_prompt_length(prompt, cfg.model.seq_len)
    torch.manual_seed(args.seed)
    ids = generate(model, prompt, args.length, temperature=args.temperature, filter_name=args.filter,
                   filter_thres=args.filter_thres, use_cache=not args.no_cache)
    if cfg.data.task == 'text' and args.prompt_ids is None:
        print(decode_text(prompt) + decode_text(ids))
    else:
        print(' '.join(map(str, ids.tolist())))
    return 0


def families_main(args) -> int:
    available = set(available_families())
    for name, fam in FAMILIES.items():
        mark = 'x' if name in available else ' '
        print(f'[{mark}] {name:9s} {fam.class_name:31s} {fam.description}')
    missing = [n for n in FAMILIES if n not in available]
    if missing:
        print(f'[ ]: not in this installation ({", ".join(missing)})')
    return 0
