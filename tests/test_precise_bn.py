import torch
from torch import nn

from largebatch.distributed import SINGLE, Communicator
from largebatch.engine.precise_bn import recompute_batchnorm


def test_running_stats_become_mean_of_batch_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    comm = Communicator(SINGLE, "gloo", torch.device("cpu"), bucket_mb=25)
    batches = [(torch.randn(8, 2, 6, 6) * (i + 1) + i, torch.zeros(8)) for i in range(5)]
    model.eval()
    recompute_batchnorm(model, batches, torch.device("cpu"), comm)
    with torch.no_grad():
        feats = [model[0](x) for x, _ in batches]
    want_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, want_var, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # restored


def test_model_without_batchnorm_is_untouched():
    model = nn.Linear(4, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comm = Communicator(SINGLE, "gloo", torch.device("cpu"), bucket_mb=25)
    assert recompute_batchnorm(model, [(torch.randn(3, 4), None)], torch.device("cpu"), comm) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
