"""The episode optimiser and fine-tuning loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruneshot.training import SGD, finetune_episode


@pytest.mark.parametrize(("momentum", "wd"), [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-2)])
def test_sgd_matches_torch_optim_sgd(momentum, wd):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    b = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    a[0].bias.requires_grad_(False)  # a frozen parameter is skipped by both
    b[0].bias.requires_grad_(False)
    ours = SGD(list(a.parameters()), lr=0.05, momentum=momentum, weight_decay=wd)
    ref = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.05, momentum=momentum,
                          weight_decay=wd)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-7)
    assert not torch.equal(a[2].weight, nn.Sequential(nn.Linear(5, 3))[0].weight)


def test_finetune_linear_probe_trains_only_the_head():
    from pruneshot.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(1, 8, [4, 8], 3).eval()
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    head = model.classifier.weight.clone()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    finetune_episode(model, x, y, arm="linear_probe", steps=3, lr=0.1, momentum=0.9, weight_decay=0.0,
                     batch_size=25, seed=0)
    for k, v in model.state_dict().items():
        if k in body:
            assert torch.equal(v, body[k]), k
    assert not torch.equal(model.classifier.weight, head)
    with pytest.raises(ValueError, match="unknown transfer arm"):
        finetune_episode(model, x, y, arm="reinit", steps=1, lr=0.1, momentum=0.0, weight_decay=0.0,
                         batch_size=25, seed=0)
