"""CUDA paths: averages kept on the CPU for a GPU model, ``to()``, the module view, snapshots.

Skipped on machines without a CUDA device (this project's CI has none); run them where one is.
References are float64 re-computations on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import emakit
from emakit import posthoc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).cuda().to(dtype)


def train(model, average, steps, ref=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        model(torch.randn(8, 16, device="cuda", dtype=next(model.parameters()).dtype)).float().square().mean().backward()
        opt.step()
        decay = average.update()
        if ref is not None:
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    ref[k] = decay * ref[k] + (1 - decay) * v.double().cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_averages_of_a_cuda_model(dtype):
    model = make(dtype)
    ema = emakit.EMA(model, decay=0.9, device="cpu")
    ref = {k: v.double().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}
    train(model, ema, 20, ref)
    sd = ema.averaged_state_dict(dtype="average")
    for k, want in ref.items():
        assert sd[k].device.type == "cpu" and sd[k].dtype == torch.float32
        assert_close(sd[k].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(sd["1.num_batches_tracked"], model[1].num_batches_tracked.cpu())


def test_to_moves_the_averages_with_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    ema = emakit.EMA(model, decay=0.9)
    model.cuda()
    with pytest.raises(ValueError, match=r"\.to\('cuda:0'\)"):
        ema.update()
    ema.to("cuda")
    ref = {k: v.double().cpu() for k, v in ema.averaged_state_dict(dtype="average").items() if v.is_floating_point()}
    train(model, ema, 10, ref)
    sd = ema.averaged_state_dict(dtype="average")
    for k, want in ref.items():
        assert sd[k].is_cuda
        assert_close(sd[k].double().cpu(), want, rtol=1e-5, atol=1e-6)
    ema.to("cpu")  # and back: averages on the CPU, weights on the GPU
    train(model, ema, 2)
    assert ema.averaged_state_dict(dtype="average")["0.weight"].device.type == "cpu"


def test_module_view_on_cuda():
    model = make()
    ema = emakit.EMA(model, decay=0.9)
    train(model, ema, 5)
    view = ema.averaged_module()
    x = torch.randn(4, 16, device="cuda")
    model.eval()
    with torch.no_grad():
        got = view(x)
        with ema.swapped():
            want = model(x)
    assert got.is_cuda and torch.equal(got, want)


def test_power_snapshots_of_a_cuda_model_reconstruct(tmp_path):
    pytest.importorskip("safetensors")
    model = make()
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for _ in range(4):
        train(model, pema, 10)
        pema.save_snapshot(tmp_path)
    sd = posthoc.reconstruct(tmp_path, sigma_rel=0.10, progress=False)
    want = pema.averaged_state_dict(0.10)
    for k, v in want.items():
        assert_close(sd[k], v.cpu(), rtol=1e-5, atol=1e-6)
