import pytest
import torch
import torch.nn.functional as F

from routeformer import helpers
from routeformer.helpers import l2norm


@pytest.mark.parametrize('shape', [(7, 5), (2, 10, 3, 4)])
def test_l2norm_in_steps_equals_normalize(shape, monkeypatch):
    monkeypatch.setattr(helpers, 'L2NORM_STEP', 3)  # several steps, the last one short
    torch.manual_seed(0)
    t = torch.randn(*shape, dtype=torch.float64)
    t = (t.transpose(1, 2) if t.ndim == 4 else t).requires_grad_()  # a strided view as well
    assert torch.allclose(l2norm(t), F.normalize(t, dim=-1))
    assert l2norm(t).stride() == t.stride()  # in the input's memory layout
    assert torch.autograd.gradcheck(l2norm, (t,))
    # a zero row stays zero and passes its gradient through the clamped norm, as F.normalize does
    zero = t.detach().clone()
    zero[0, 0] = 0.
    zero.requires_grad_()
    grad = torch.randn(zero.shape, dtype=torch.float64)
    ours, = torch.autograd.grad(l2norm(zero), zero, grad)
    theirs, = torch.autograd.grad(F.normalize(zero, dim=-1), zero, grad)
    assert torch.allclose(l2norm(zero), F.normalize(zero, dim=-1)) and torch.allclose(ours, theirs)
