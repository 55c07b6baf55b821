"""emakit under Hugging Face Accelerate: ``register_for_checkpointing``, and a 2-process DDP run.

The checks compare a run stopped at step 40 and resumed with ``accelerator.load_state`` with
the same run never stopped, tensor by tensor (``torch.equal``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate", reason="Accelerate is not installed (pip install 'emakit[accelerate]')")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import emakit  # noqa: E402

ROOT = Path(__file__).parents[1]
STEPS = 80


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # the next test may configure it otherwise


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g)
    return x, x.sin().sum(dim=1, keepdim=True)


def build(seed: int):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = emakit.EMA(model, decay=0.9)
    accelerator.register_for_checkpointing(ema)
    return accelerator, model, optimizer, ema


def train(accelerator, model, optimizer, ema, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        ema.update()


def tensors(ema) -> dict[str, torch.Tensor]:
    state = ema.state_dict()
    return {
        **{f"avg.{k}": v for k, v in state["averages"][0].items()},
        **{f"copy.{k}": v for k, v in state["copies"].items()},
    }


def test_register_for_checkpointing_resumes_bit_identical(tmp_path):
    accelerator, model, optimizer, ema = build(seed=0)
    train(accelerator, model, optimizer, ema, range(1, 41))
    accelerator.save_state(tmp_path / "state")
    train(accelerator, model, optimizer, ema, range(41, STEPS + 1))
    want = {k: v.clone() for k, v in tensors(ema).items()}
    want_weights = {k: v.clone() for k, v in model.state_dict().items()}

    # What save_state wrote for the EMA: its own state_dict, at step 40.
    saved = torch.load(tmp_path / "state" / "custom_checkpoint_0.pkl", weights_only=True)
    assert (saved["format"], saved["t"], saved["num_updates"]) == ("emakit.EMA", 40, 40)

    AcceleratorState._reset_state(reset_partial_state=True)  # a new process, as far as Accelerate knows
    accelerator, model, optimizer, ema = build(seed=1)  # another init: everything must come from the state
    assert not torch.equal(tensors(ema)["avg.0.weight"], saved["averages"][0]["0.weight"])
    accelerator.load_state(tmp_path / "state")
    assert ema.t == 40
    train(accelerator, model, optimizer, ema, range(41, STEPS + 1))
    got = tensors(ema)
    assert list(got) == list(want) and ema.t == STEPS
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, want_weights[name]), name
    assert got["copy.1.num_batches_tracked"].item() == STEPS  # copied, not averaged


def test_ema_built_before_prepare_reads_the_prepared_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    ema = emakit.EMA(model, decay=0.5)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    ema.to()  # plans again against the prepared model (after a device move it would read it there)
    with torch.no_grad():
        for p in prepared.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.averaged_state_dict().items()}
    ema.update(prepared)
    for name, value in ema.averaged_state_dict().items():
        torch.testing.assert_close(value, before[name] + 0.5, msg=name)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
def test_two_processes_ddp_resume_bit_identical(shard, tmp_path):
    """``torchrun`` 2 CPU processes running examples/accelerate_checkpointing.py (Accelerate's DDP, gloo).

    Replicated: the EMA goes through ``register_for_checkpointing``. ``shard=True``: each rank
    holds half of it, saved by every rank with DCP from ``save_state``/``load_state`` pre-hooks.
    Each process checks its own part of the resumed EMA and its weights against the run never stopped.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without torch.distributed / gloo")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "examples" / "accelerate_checkpointing.py"),
    ]
    cmd += ["--out", str(tmp_path)] + (["--shard"] if shard else [])
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    print(f"{time.perf_counter() - start:.1f} s: " + " | ".join(out.stdout.strip().splitlines()))
    assert f"2 process(es), EMA sharded: {shard}, 256 optimizer steps" in out.stdout
    assert "resumed at step 128, ended at 256: resumed == uninterrupted: True" in out.stdout
    state = tmp_path / "state"
    if shard:
        assert (state / "ema" / ".metadata").is_file() and not (state / "custom_checkpoint_0.pkl").exists()
        ema = emakit.EMA(nn.Sequential(nn.Linear(1, 64), nn.LayerNorm(64), nn.SiLU(), nn.Linear(64, 1)), decay=0.98)
        ema.load(state / "ema")  # written by 2 ranks, loaded in one process
        assert ema.t == 128
    else:
        assert torch.load(state / "custom_checkpoint_0.pkl", weights_only=True)["t"] == 128
