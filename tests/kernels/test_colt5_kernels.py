"""Coordinate descent (the soft top-k under CoLT5 routing): against the seed implementation,
against the hard top-k as epsilon shrinks, its gradient, precision and masking, `topk`, and the
fused Triton kernel against the PyTorch loop (values and gradients) under Triton's interpreter."""

import os
import sys

import pytest
import torch

from routeformer import coor_descent, topk
from routeformer.kernels.coor_descent import epsilon_schedule, select_coor_descent

ROUTER_SCHEDULE = dict(n_iters=20, eps=0.03, eps_init=4., eps_decay=0.7)  # CoordinateDescentRouter defaults


def scores(*shape, seed=0, scale=3.):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def random_mask(*shape, seed=1, p=0.2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) > p


@pytest.mark.parametrize('kwargs', [ROUTER_SCHEDULE, dict(n_iters=5, eps=0.1), dict(n_iters=50, eps=1., eps_decay=0.9)],
                         ids=['router_schedule', 'plain', 'decayed'])
@pytest.mark.parametrize('masked', [False, True])
def test_equals_seed_implementation(kwargs, masked):
    seed = pytest.importorskip('colt5_attention.coor_descent')
    s = scores(3, 4, 50)
    mask = random_mask(3, 4, 50) if masked else None
    ours = coor_descent(s, k=7, mask=mask, **kwargs)
    theirs = seed.coor_descent(s, k=7, mask=mask, **kwargs)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_small_epsilon_selects_exactly_the_hard_topk():
    s = scores(4, 64, scale=1.)
    k = 9
    hard = torch.zeros_like(s).scatter(-1, s.topk(k, dim=-1).indices, 1.)
    errors = []
    for eps in (1., 0.1, 0.01, 0.001):
        # a smaller eps needs more iterations: coordinate ascent slows down as the problem sharpens
        soft = coor_descent(s, k=k, n_iters=1000, eps=eps, eps_init=1., eps_decay=0.9)
        errors.append((soft - hard).abs().max().item())
    # the soft top-k is far from binary at eps 1 and converges to the hard top-k
    assert errors[0] > 0.3
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3
    torch.testing.assert_close(soft.sum(dim=-1), torch.full((4,), float(k)), atol=1e-2, rtol=0)


def test_per_row_k_and_row_sums():
    s = scores(3, 40, scale=1.)
    k = torch.tensor([2., 5., 11.])
    soft = coor_descent(s, k=k, n_iters=100, eps=0.05, eps_init=1., eps_decay=0.9)
    torch.testing.assert_close(soft.sum(dim=-1), k, atol=0.05, rtol=0)
    assert (soft <= 1 + 1e-6).all() and (soft >= 0).all()


def test_gradient_matches_finite_differences():
    s = scores(2, 12, scale=1.).double()
    weights = scores(2, 12, seed=5)

    def loss(t):
        return (coor_descent(t, k=4, n_iters=10, eps=0.5) * weights).sum()

    s.requires_grad_()
    loss(s).backward()
    numeric = torch.zeros_like(s)
    step = 1e-3
    with torch.no_grad():
        for idx in torch.cartesian_prod(torch.arange(2), torch.arange(12)):
            plus, minus = s.clone(), s.clone()
            plus[tuple(idx)] += step
            minus[tuple(idx)] -= step
            numeric[tuple(idx)] = (loss(plus) - loss(minus)) / (2 * step)
    torch.testing.assert_close(s.grad.float(), numeric.float(), atol=2e-3, rtol=2e-2)
    assert s.grad.abs().max() > 0.1


def test_half_precision_input_is_routed_in_float32():
    # scores that overflow float16 once divided by a small eps
    s = scores(2, 30, scale=3000.).half()
    soft = coor_descent(s, k=5, **ROUTER_SCHEDULE)
    assert soft.dtype == torch.float32 and torch.isfinite(soft).all()
    torch.testing.assert_close(soft, coor_descent(s.float(), k=5, **ROUTER_SCHEDULE))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert coor_descent(s.float(), k=5, **ROUTER_SCHEDULE).dtype == torch.float32


def test_masked_entries_score_zero_and_fully_masked_rows_have_finite_gradients():
    s = scores(3, 20).requires_grad_()
    mask = random_mask(3, 20)
    mask[1] = False
    soft = coor_descent(s, k=4, mask=mask, **ROUTER_SCHEDULE)
    assert (soft[~mask] == 0).all() and (soft[1] == 0).all()
    # masked entries change nothing
    moved = s.detach().masked_fill(~mask, 100.)
    torch.testing.assert_close(coor_descent(moved, k=4, mask=mask, **ROUTER_SCHEDULE), soft.detach())
    (soft * scores(3, 20, seed=3)).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~mask] == 0).all() and s.grad[0].abs().sum() > 0


def test_epsilon_schedule_and_bad_arguments():
    assert epsilon_schedule(3, eps=0.5, eps_init=4., eps_decay=0.5) == [4., 2., 1., 0.5]
    assert epsilon_schedule(2, eps=0.1, eps_init=None, eps_decay=1.) == [0.1] * 3
    for kwargs in (dict(n_iters=0), dict(n_iters=3, eps=0.), dict(n_iters=3, eps_decay=1.5)):
        with pytest.raises(ValueError):
            coor_descent(scores(1, 5), k=2, **kwargs)


# ---------------------------------------------------------------- topk

def test_topk_matches_torch_topk_and_is_differentiable():
    x = scores(3, 32).requires_grad_()
    values, indices, soft, gates = topk(x, k=5, eps=1.)  # a soft regime: saturated scores have no gradient
    ref = x.detach().topk(5, dim=-1)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(values, ref.values)
    assert torch.equal(gates, torch.ones_like(gates))  # straight-through: exactly 1 forward
    assert (soft <= 1).all() and (soft > 0).all()
    # the gradient goes through the soft scores too, not only through x at the chosen indices
    values.sum().backward()
    plain = torch.zeros_like(x).scatter(-1, indices, 1.)
    assert (x.grad - plain).abs().max() > 1e-3

    v2, i2, s2, g2 = topk(x.detach(), k=5, non_differentiable=True)
    assert torch.equal(i2, ref.indices) and s2 is None and g2 is None
    with pytest.raises(ValueError, match='k must be'):
        topk(x, k=40)


def test_topk_ties_go_to_the_lower_index():
    # a repeated token scores the same; torch.topk would break the tie differently on CPU and CUDA
    x = torch.tensor([[1., 3., 3., 2., 3., 3.]])
    for kwargs in (dict(), dict(non_differentiable=True)):
        assert topk(x, k=3, **kwargs).indices.tolist() == [[1, 2, 4]]


def test_topk_never_picks_masked_entries_when_enough_are_valid():
    x = scores(4, 32)
    mask = random_mask(4, 32, p=0.5)
    _, indices, _, gates = topk(x, k=3, mask=mask)
    assert mask.gather(-1, indices).all() and (gates == 1).all()
    _, indices, _, _ = topk(x, k=3, mask=mask, fused=True)  # no CUDA: the PyTorch loop
    assert mask.gather(-1, indices).all()


def test_fused_choice_falls_back_to_pytorch_on_cpu():
    assert select_coor_descent(True, torch.zeros(2, 3)) is coor_descent
    assert select_coor_descent(False, torch.zeros(2, 3)) is coor_descent


# ---------------------------------------------------------------- the fused Triton kernel

TRITON_CHECK = r"""
import torch
from routeformer.kernels.coor_descent import coor_descent
from routeformer.kernels.coor_descent_triton import MAX_BLOCK, triton_coor_descent

def scores(*shape, seed=0, scale=3.):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale

# masked rows, a fully masked row, one k per row, several checkpoint segments: values and gradients
s = scores(2, 3, 40, scale=2.)
g = torch.Generator().manual_seed(1)
mask = torch.rand(2, 3, 40, generator=g) > 0.2
mask[0, 1] = False
k = torch.tensor([[5., 7., 3.], [2., 9., 4.]])
grad = scores(2, 3, 40, seed=9)
kwargs = dict(n_iters=7, eps=0.05, eps_init=2., eps_decay=0.7, mask=mask)
for segments in (1, 3, 7):
    results = []
    for fn, extra in ((coor_descent, {}), (triton_coor_descent, dict(checkpoint_segments=segments))):
        s_in, k_in = s.clone().requires_grad_(), k.clone().requires_grad_()
        y = fn(s_in, k=k_in, **kwargs, **extra)
        (y * grad).sum().backward()
        results.append((y.detach(), s_in.grad, k_in.grad))
    (y_ref, ds_ref, dk_ref), (y, ds, dk) = results
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ds, ds_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dk, dk_ref, atol=1e-5, rtol=1e-4)
    assert ds_ref.abs().max() > 0.1 and dk_ref.abs().max() > 0.01

# the router's schedule, no mask, a row length that is not a power of two
s = scores(4, 33).requires_grad_()
schedule = dict(n_iters=20, eps=0.03, eps_init=4., eps_decay=0.7)
y = triton_coor_descent(s, k=6, **schedule)
torch.testing.assert_close(y.detach(), coor_descent(s.detach(), k=6, **schedule), atol=1e-6, rtol=1e-5)
y.sum().backward()
assert torch.isfinite(s.grad).all()
try:
    triton_coor_descent(torch.zeros(1, MAX_BLOCK + 1), k=2, n_iters=1)
except ValueError as e:
    assert 'route_block_size' in str(e)
else:
    raise AssertionError('rows over the kernel limit must be refused')
print('ok')
"""


def test_triton_kernel_equals_pytorch():
    """The fused kernel against the PyTorch loop, run by Triton's interpreter on the CPU. In a fresh
    process: TRITON_INTERPRET is read when triton and the kernels are first imported."""
    pytest.importorskip('triton', reason='triton is not installed: the fused kernel cannot be checked here')
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET='1')
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, '-c', TRITON_CHECK], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith('ok'), done.stderr[-3000:]
