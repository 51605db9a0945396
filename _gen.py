import torch
from routeformer import AutoregressiveWrapper
def check(m, pad, n_b=5, cache=True, steps=12):
    w = AutoregressiveWrapper(m)
    torch.manual_seed(5)
    b = torch.randint(1, 20, (n_b,))
    a = torch.randint(1, 20, (n_b + pad,))
    batch = torch.zeros(2, n_b + pad, dtype=torch.long); batch[0] = a; batch[1, pad:] = b
    mask = torch.ones_like(batch, dtype=torch.bool); mask[1, :pad] = False
    out = w.generate(batch, steps, temperature=0, input_mask=mask, use_cache=cache)
    single = w.generate(b[None], steps, temperature=0, use_cache=cache)[0]
    return torch.equal(out[1], single)
