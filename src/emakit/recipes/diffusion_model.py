"""The diffusion recipe's model and sampler: the denoising MLP, its timestep embedding, the DDPM
noise schedule and DDIM / DDPM sampling (:mod:`emakit.recipes.diffusion` trains it)."""

from __future__ import annotations

import math

import torch
from torch import nn

# --------------------------------------------------------------------------- model


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (as in DDPM / transformers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Denoiser(nn.Module):
    """An MLP that predicts the noise in a noised 8x8 image, given the timestep."""

    def __init__(self, hidden: int = 768, temb: int = 128) -> None:
        super().__init__()
        self.temb = temb
        self.net = nn.Sequential(
            nn.Linear(64 + temb, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 64),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, timestep_embedding(t, self.temb)], dim=1))


# --------------------------------------------------------------------------- diffusion


def alpha_bars(steps: int) -> torch.Tensor:
    """Cumulative signal fraction of the DDPM linear beta schedule (1e-4 .. 0.02)."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


@torch.no_grad()
def sample(
    model: nn.Module,
    n: int,
    *,
    steps: int = 50,
    method: str = "ddim",
    diffusion_steps: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch: int = 1000,
) -> torch.Tensor:
    """Draw ``n`` images in [-1, 1] with DDIM (deterministic, eta=0) or DDPM ancestral sampling."""
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method must be ddim or ddpm, got method={method!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    abar = alpha_bars(diffusion_steps).to(device)
    # Evenly spaced timesteps from T-1 down to 0.
    ts = torch.linspace(diffusion_steps - 1, 0, steps).round().long().tolist()
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = torch.randn(m, 64, generator=gen).to(device)
        for i, t in enumerate(ts):
            a_t = abar[t]
            a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
            eps = model(x, torch.full((m,), t, device=device)).float()
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            if method == "ddim":
                # The noise implied by the clipped x0: without this, the model's small gain
                # errors at high noise compound over the steps and the samples blow up.
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            else:
                # DDPM posterior q(x_prev | x_t, x0) for a (possibly strided) step.
                alpha = a_t / a_prev
                mean = (a_prev.sqrt() * (1 - alpha) * x0 + alpha.sqrt() * (1 - a_prev) * x) / (1 - a_t)
                var = (1 - alpha) * (1 - a_prev) / (1 - a_t)
                if i + 1 < len(ts):
                    x = mean + var.sqrt() * torch.randn(m, 64, generator=gen).to(device)
                else:
                    x = mean
        out.append(x.clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)
