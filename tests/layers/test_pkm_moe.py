import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from routeformer.context import LayerContext
from routeformer.layers.moe import MoE
from routeformer.layers.pkm import PKM


def small_pkm(**kwargs):
    return PKM(16, heads=2, num_keys=8, topk=3, dim_head=4, **kwargs)


# ---- PKM ----

def test_pkm_shape_and_aux():
    pkm = small_pkm()
    out, aux = pkm(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 16)
    assert aux.ndim == 0 and aux.item() == 0.


def test_pkm_matches_brute_force_over_all_product_keys():
    # the product-key search must find the same top-k as scoring all num_keys**2 keys
    torch.manual_seed(0)
    pkm = small_pkm()
    x = torch.randn(1, 4, 16)
    out, _ = pkm(x)

    heads, topk = 2, 3
    q = pkm.to_queries(x).view(1, 4, 2, heads, 4)
    q = pkm.norm(q)
    expected = torch.zeros_like(out)
    for t in range(4):
        for h in range(heads):
            s1 = pkm.keys[h, :, 0] @ q[0, t, 0, h]
            s2 = pkm.keys[h, :, 1] @ q[0, t, 1, h]
            full = (s1[:, None] + s2[None, :]).flatten()    # index i * num_keys + j
            best, idx = full.topk(topk)
            expected[0, t] += (best.softmax(-1)[:, None] * pkm.values.weight[idx]).sum(0)
    assert torch.allclose(out, expected, atol=1e-5)


def test_pkm_gradients_reach_keys_values_queries():
    pkm = small_pkm()
    out, _ = pkm(torch.randn(2, 5, 16))
    out.square().sum().backward()
    for param in (pkm.keys, pkm.values.weight, pkm.to_queries.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_pkm_bf16_autocast_forward_backward():
    pkm = small_pkm(input_dropout=0.1, query_dropout=0.1, value_dropout=0.1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, aux = pkm(x)
    (out.float().square().sum() + aux).backward()
    assert torch.isfinite(out.float()).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(pkm.keys.grad).all()


# ---- MoE ----

def naive_moe(moe, x, keep_second=True):
    gate, experts = moe.gate, moe.experts
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            token = x[b, n]
            probs = (token @ gate.w_gating).softmax(-1)
            first, second = probs.argsort(descending=True)[:2].tolist()
            total = probs[first] + probs[second]
            chosen = [(first, probs[first] / total)] + ([(second, probs[second] / total)] if keep_second else [])
            for e, g in chosen:
                out[b, n] += g * (F.relu(token @ experts.w1[e]) @ experts.w2[e])
    return out


@pytest.mark.parametrize('policy', ['all', 'none'])
def test_moe_matches_per_token_loop(policy):
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, hidden_dim=16, second_policy_train=policy)
    x = torch.randn(2, 6, 8)
    out, _ = moe(x)
    assert torch.allclose(out, naive_moe(moe, x, keep_second=policy == 'all'), atol=1e-5)


def test_moe_threshold_policy_keeps_only_confident_second():
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, second_policy_eval='threshold', second_threshold_eval=0.4).eval()
    tokens = torch.randn(30, 8)
    _, gates, routed, _ = moe.gate(tokens, torch.ones(30, dtype=torch.bool))
    assert torch.equal(routed[:, 1], gates[:, 1] > 0.4)
    assert routed[:, 0].all()


def test_moe_random_policy_replays_from_torch_rng():
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, second_threshold_train=1.)
    x = torch.randn(2, 50, 8)
    state = torch.get_rng_state()
    first, _ = moe(x)
    torch.set_rng_state(state)   # what a reversible recompute does
    assert torch.equal(moe(x)[0], first)
    assert not torch.equal(moe(x)[0], first)   # a fresh draw routes differently
    # a threshold below every gate keeps every second expert, as policy 'all' does
    moe.gate.threshold[True] = 1e-6
    assert torch.allclose(moe(x)[0], naive_moe(moe, x), atol=1e-5)


def hand_balance_loss(moe, x):
    tokens = x.reshape(-1, x.shape[-1])
    num_experts = moe.gate.num_experts
    firsts = [0] * num_experts
    prob_sums = [0.] * num_experts
    for token in tokens:
        probs = (token @ moe.gate.w_gating).softmax(-1).tolist()
        firsts[probs.index(max(probs))] += 1
        for e, p in enumerate(probs):
            prob_sums[e] += p
    count = len(tokens)
    return moe.loss_coef * num_experts * sum((f / count) * (p / count) for f, p in zip(firsts, prob_sums))


def test_moe_balance_loss_matches_hand_computation():
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4, loss_coef=0.5)
    x = torch.randn(2, 7, 8)
    _, loss = moe(x)
    assert loss.item() == pytest.approx(hand_balance_loss(moe, x), rel=1e-5)

    # uniform gates: whichever expert wins the tie, the loss is exactly loss_coef (its minimum)
    with torch.no_grad():
        moe.gate.w_gating.zero_()
    _, loss = moe(x)
    assert loss.item() == pytest.approx(0.5, rel=1e-6)


def test_moe_masked_tokens_excluded_from_loss():
    torch.manual_seed(0)
    moe = MoE(8, num_experts=4)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out, loss = moe(x, LayerContext(mask=mask))
    assert torch.isfinite(out).all()
    # same loss as running the real tokens alone, and the padding's values do not matter
    real_only = x[mask][None]
    assert loss.item() == pytest.approx(hand_balance_loss(moe, real_only), rel=1e-5)
    x_other = x.clone()
    x_other[1, 3:] = 100. * torch.randn(3, 8)
    _, loss_other = moe(x_other, LayerContext(mask=mask))
    assert loss_other.item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match='mask'):
        moe(x, LayerContext(mask=mask[:, :5]))


def test_moe_bf16_autocast_forward_backward():
    moe = MoE(8, num_experts=4)
    x = torch.randn(2, 6, 8, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, loss = moe(x)
    (out.float().square().sum() + loss).backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(loss)
    for grad in (x.grad, moe.gate.w_gating.grad, moe.experts.w1.grad, moe.experts.w2.grad):
        assert grad is not None and torch.isfinite(grad).all()


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return result


def test_moe_dispatch_is_linear_in_sequence_length():
    n, dim, hidden = 16384, 32, 64
    moe = MoE(dim, num_experts=4, hidden_dim=hidden, second_policy_train='all')
    x = torch.randn(1, n, dim, requires_grad=True)
    start = time.perf_counter()
    with LargestTensor() as largest:
        out, loss = moe(x)
        (out.sum() + loss).backward()
    # the biggest buffer is one expert's hidden activations; an n**2 dispatch tensor would be 268M
    assert largest.numel <= n * hidden
    assert time.perf_counter() - start < 10.
