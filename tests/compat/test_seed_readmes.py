"""Every fenced code block of every seed README (tests/compat/seed_readmes/*.md) runs, whatever its
fence says: the block's own text with the import changed to routeformer, `.cuda()` dropped and the
sizes shrunk by the listed keyword/literal replacements (each of which must apply, so an edited README
cannot slip out of the test). Blocks that are not Python are skipped only by the reviewed list."""

import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn

SEEDS = Path(__file__).resolve().parent / 'seed_readmes'  # verbatim copies (see SOURCE.txt there)

# (file, block number) -> why it is not run
NOT_PYTHON = {
    ('colt5-attention.md', 0): 'shell', ('reformer.md', 0): 'shell', ('routing-transformer.md', 0): 'shell',
    ('sinkhorn-transformer.md', 0): 'shell',
    **{('colt5-attention.md', i): 'citation' for i in range(7, 12)},
    **{('reformer.md', i): 'citation' for i in range(8, 11)},
    **{('routing-transformer.md', i): 'citation' for i in range(6, 18)},
    **{('sinkhorn-transformer.md', i): 'citation' for i in range(7, 15)},
}
LOOKS_LIKE = {'shell': lambda text: all(line.startswith('$ ') for line in text.strip().splitlines()),
              'citation': lambda text: text.lstrip().startswith('@')}

# (file, block number) -> (keyword arguments to set, literal replacements applied after them)
SHRINK = {
    ('routing-transformer.md', 1): (
        dict(dim=32, heads=4, depth=2, emb_dim=16, dim_head=8, window_size=16, n_local_attn_heads=2, ff_chunks=2,
             pkm_layers='(1,)', pkm_num_keys=16, moe_layers='(2,)', num_mem_kv=2),
        {'20000': '64', '8192': '128'}),
    # RoutingTransformer's local heads keep the seed's default window of 256
    ('routing-transformer.md', 2): (dict(dim=32, heads=4, depth=1, window_size=16, n_local_attn_heads=2),
                                    {'(1, 8192, 512)': '(1, 512, 32)', '8192': '512'}),
    ('routing-transformer.md', 3): (
        dict(dim=32, enc_depth=1, enc_heads=2, enc_window_size=8, dec_depth=1, dec_heads=2, dec_window_size=8),
        {'20000': '64', '4096': '32', '2048': '4'}),
    ('routing-transformer.md', 4): (dict(dim=32, heads=2, depth=1, window_size=16), {'20000': '64', '8192': '64'}),
    ('routing-transformer.md', 5): (dict(dim=32, heads=2, depth=1, window_size=16), {'20000': '64', '8192': '64'}),
    ('reformer.md', 1): (
        dict(dim=32, depth=1, heads=2, emb_dim=16, bucket_size=8, n_hashes=2, ff_chunks=2, attn_chunks=2,
             num_mem_kv=2, full_attn_thres=16),
        {'20000': '64', '8192': '128'}),
    ('reformer.md', 2): (dict(dim=32, depth=1, heads=2), {'(1, 8192, 512)': '(1, 128, 32)', '8192': '128'}),
    ('reformer.md', 3): (dict(dim=32, heads=2, bucket_size=8, n_hashes=2), {'(10, 1024, 128)': '(2, 64, 32)'}),
    ('reformer.md', 4): (dict(bucket_size=8, n_hashes=2), {'(10, 1024, 128)': '(2, 64, 16)'}),
    ('reformer.md', 5): (dict(emb_dim=16, dim=32, depth=1, heads=2), {'20000': '64', '4096': '64'}),
    ('reformer.md', 6): (dict(dim=32, depth=1, heads=2),
                         {'from torchvision import models\n': '', '4096': '64', '20000': '64',
                          '512, 512': '64, 64'}),
    ('reformer.md', 7): (dict(dim=32, depth=1, heads=2), {'(1, 8192, 512)': '(1, 128, 32)', '8192': '128'}),
    ('sinkhorn-transformer.md', 1): (
        dict(dim=32, heads=4, depth=2, max_seq_len=256, bucket_size=16, ff_chunks=2, emb_dim=16, dim_head=8,
             n_local_attn_heads=1, pkm_layers='(1,)', pkm_num_keys=16),
        {'20000': '64', '2048': '128'}),
    ('sinkhorn-transformer.md', 2): (dict(dim=32, heads=4, depth=2, bucket_size=16), {'2048, 1024': '128, 32'}),
    ('sinkhorn-transformer.md', 3): (dict(dim=32, depth=1, heads=2, bucket_size=16, context_bucket_size=16),
                                     {'20000': '64', '4096': '64'}),
    ('sinkhorn-transformer.md', 4): (dict(dim=32, heads=2, depth=1, max_seq_len=128, bucket_size=16),
                                     {'20000': '64', '1117': '77'}),
    ('sinkhorn-transformer.md', 5): (dict(dim=32, heads=2, depth=1, bucket_size=16), {'20000': '64', '8192': '128'}),
    ('sinkhorn-transformer.md', 6): (dict(dim=32, heads=2, depth=1, bucket_size=15),
                                     {'20000': '64', '8192': '100'}),
    ('colt5-attention.md', 1): (
        dict(dim=64, light_dim_head=16, light_heads=2, light_window_size=32, heavy_dim_head=16, heavy_heads=2,
             num_heavy_tokens=32, num_heavy_tokens_q=32, num_heavy_tokens_kv=32, num_heavy_ff_tokens=32,
             num_heavy_attn_tokens_q=32, num_heavy_attn_tokens_kv=32),
        {'(2, 32768, 512)': '(2, 512, 64)', '(2, 32768)': '(2, 512)'}),
    ('colt5-attention.md', 2): (
        dict(dim=64, dim_head=16, heads=2, num_tokens_q=32, num_tokens_kv=64, route_block_size=1024),
        {'(1, 1024, 512)': '(1, 64, 64)', '(1, 1024)': '(1, 64)', '(1, 1_048_576, 512)': '(1, 4096, 64)',
         '(1, 1_048_576)': '(1, 4096)'}),
    ('colt5-attention.md', 3): (
        dict(dim=64, light_dim_head=16, light_heads=2, light_window_size=32, heavy_window_size=32,
             heavy_dim_head=16, heavy_heads=2, num_heavy_tokens_q=8, num_heavy_tokens_kv=64),
        {'(2, 8192, 512)': '(2, 256, 64)'}),
    ('colt5-attention.md', 4): (
        dict(light_dim_head=16, light_heads=2, light_window_size=8, heavy_dim_head=16, heavy_heads=2,
             num_heavy_tokens_q=64, num_heavy_tokens_kv=64),
        {'(1, 32, 256, 256)': '(1, 32, 32, 32)'}),
    ('colt5-attention.md', 5): (
        dict(image_size=64, patch_size=16, num_classes=10, dim=64, depth=2, attn_num_heavy_tokens_q=4,
             attn_num_heavy_tokens_kv=4, attn_heavy_dim_head=16, attn_heavy_heads=2, attn_light_window_size=2,
             attn_light_dim_head=16, attn_light_heads=2, ff_num_heavy_tokens=4),
        {'(1, 3, 256, 256)': '(1, 3, 64, 64)'}),
    ('colt5-attention.md', 6): (dict(), {'(1024, 512)': '(64, 128)'}),
}

SEED_IMPORT = re.compile(r'from (routing_transformer|reformer_pytorch|sinkhorn_transformer|colt5_attention)'
                         r'(\.\w+)* import')


def fenced_blocks():
    for path in sorted(SEEDS.glob('*.md')):
        text = path.read_text()
        for number, (language, body) in enumerate(re.findall(r'^```([^\n]*)\n(.*?)^```', text, flags=re.S | re.M)):
            yield path.name, number, language, body


BLOCKS = list(fenced_blocks())


def resnet_stand_in():
    # the image-caption example's pretrained ResNet-50, untrained and small: the example keeps all but
    # its last four children, (b, 3, H, W) -> (b, 32, H/8, W/8), 32 being the shrunk model width
    trunk = [nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
             nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1)]
    return nn.Sequential(*trunk, *(nn.Identity() for _ in range(4)))


def shrunk(name, number, body):
    kwargs, literals = SHRINK[name, number]
    code = SEED_IMPORT.sub('from routeformer import', body)
    if not torch.cuda.is_available():
        code = code.replace('.cuda()', '')
    for key, value in kwargs.items():
        code, count = re.subn(rf'\b{key}\s*=\s*(\([^)]*\)|[^,\n)]+)', f'{key} = {value}', code)
        assert count, f'{name} block {number}: no {key}= to shrink'
    for old, new in literals.items():
        assert old in code, f'{name} block {number}: {old!r} is not in the block'
        code = code.replace(old, new)
    return code


def test_every_block_is_run_or_reviewed():
    assert BLOCKS, f'no seed READMEs under {SEEDS}'
    for name, number, language, body in BLOCKS:
        key = (name, number)
        assert (key in SHRINK) != (key in NOT_PYTHON), f'{name} block {number} ({language!r}) is not in the test'
        if key in NOT_PYTHON:
            assert LOOKS_LIKE[NOT_PYTHON[key]](body), f'{name} block {number} is not a {NOT_PYTHON[key]} block'
    assert set(SHRINK) | set(NOT_PYTHON) == {(name, number) for name, number, _, _ in BLOCKS}


@pytest.mark.parametrize('name, number, body', [(n, i, b) for n, i, _, b in BLOCKS if (n, i) in SHRINK],
                         ids=[f'{n}-{i}' for n, i, _, _ in BLOCKS if (n, i) in SHRINK])
def test_readme_block_runs_shrunk(name, number, body):
    torch.manual_seed(0)
    models = types.SimpleNamespace(resnet50=lambda pretrained=False: resnet_stand_in())
    exec(compile(shrunk(name, number, body), f'{name} block {number}', 'exec'), {'models': models})
