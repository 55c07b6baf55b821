"""emakit quick start: train a small network with noisy steps, compare raw and EMA weights.

Runs in a few seconds on a CPU, with generated data (nothing is downloaded):

    python examples/quickstart.py

A regression MLP is trained with a deliberately high learning rate, so the raw weights
jitter around the optimum; the averaged weights sit near its centre and score a lower
held-out loss. The same loop shows evaluation with ``swapped()``, a checkpoint of the EMA
and an exact resume.
"""

from __future__ import annotations

import io

import torch
from torch import nn

import emakit
from emakit import schedules

torch.manual_seed(0)
torch.set_num_threads(1)

# Data: y = sin(3x) + noise, 1-D regression (generated, so the example needs no download).
x_train, x_test = torch.rand(4096, 1) * 4 - 2, torch.linspace(-2, 2, 1000).unsqueeze(1)
y_train = torch.sin(3 * x_train) + 0.3 * torch.randn_like(x_train)
y_test = torch.sin(3 * x_test)

model = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # high on purpose: noisy raw weights

# Two averages of the same run: a classic EMA that starts late, and a power-function EMA
# whose length is a fixed fraction of training (EDM2).
steps = 3000
classic = emakit.EMA(
    model, schedule=schedules.start_at(schedules.start_time(steps, decay=0.995), schedules.constant(0.995))
)
power = emakit.EMA(model, schedule=schedules.power(sigma_rel=0.1))


def test_loss() -> float:
    with torch.no_grad():
        return nn.functional.mse_loss(model(x_test), y_test).item()


for step in range(1, steps + 1):
    idx = torch.randint(0, len(x_train), (64,))
    loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    classic.update()  # after every optimizer step; t counts steps
    power.update()
    if step == steps // 2:
        # Checkpoint the EMA mid-run; a resumed EMA continues bit for bit.
        buffer = io.BytesIO()
        torch.save(power.state_dict(), buffer)

raw = test_loss()
with classic.swapped():  # the model holds the averaged weights inside the block
    ema_classic = test_loss()
with power.swapped():
    ema_power = test_loss()
assert test_loss() == raw  # the raw weights are back

print(f"held-out MSE after {steps} steps (lower is better):")
print(f"  raw weights                       {raw:.5f}")
print(f"  classic EMA 0.995 (last {steps - classic.schedule.t0:.0f} steps) {ema_classic:.5f}")
print(f"  power EMA sigma_rel=0.10          {ema_power:.5f}")

buffer.seek(0)
resumed = emakit.EMA(model, schedule=schedules.power(sigma_rel=0.1))
resumed.load_state_dict(torch.load(buffer, weights_only=True))
print(f"checkpoint restored at t={resumed.t:g} ({resumed.num_updates} updates)")
