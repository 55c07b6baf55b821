"""Draw docs/profiles.png: power-EMA profiles, and a post-hoc fit from snapshots.

pip install -c constraints.txt matplotlib
python docs/make_figures.py
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from emakit import posthoc, schedules  # noqa: E402
from emakit.snapshots import SnapshotInfo  # noqa: E402


def power_profile(tau: torch.Tensor, t: float, gamma: float) -> torch.Tensor:
    return torch.where(tau <= t, (gamma + 1) * tau.clamp(min=0) ** gamma / t ** (gamma + 1), torch.zeros_like(tau))


def fake_snapshot(t: float, gammas: tuple[float, ...]) -> SnapshotInfo:
    """Only times and profiles matter for the solve: no file is needed."""
    return SnapshotInfo(
        Path(f"t{t}"),
        t,
        0,
        tuple(schedules.gamma_to_sigma_rel(g) for g in gammas),
        gammas,
        torch.float32,
        (),
        (),
        (),
        {},
        {},
        (),
        {},
        0,
    )


def main() -> None:
    tau = torch.linspace(0, 1, 4001, dtype=torch.float64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for s in (0.05, 0.10, 0.20):
        g = schedules.sigma_rel_to_gamma(s)
        left.plot(tau, power_profile(tau, 1.0, g), label=f"power, sigma_rel={s} (gamma={g:.2f})")
    rate = 1 / (0.05 * 1.0)  # a classic EMA with the same width at t = 1
    left.plot(
        tau, rate * torch.exp(-rate * (1 - tau)) / -math.expm1(-rate), "--", label="classic EMA, sigma_rel=0.05 at t"
    )
    left.set(title="How an average weighs the training trajectory", xlabel="tau / t", ylabel="weight density")
    left.legend(fontsize=8)

    gammas = (schedules.sigma_rel_to_gamma(0.05), schedules.sigma_rel_to_gamma(0.10))
    snaps = [fake_snapshot(i / 20, gammas) for i in range(1, 21)]
    target = 0.08
    sol = posthoc.solve_coefficients(snaps, sigma_rel=target, warn=False)
    fitted = sum(
        w * power_profile(tau, s.t, g) for s, ws in zip(sol.snapshots, sol.weights) for g, w in zip(s.gammas, ws)
    )
    right.plot(
        tau,
        power_profile(tau, 1.0, schedules.sigma_rel_to_gamma(target)),
        lw=3,
        alpha=0.5,
        label=f"target sigma_rel={target}",
    )
    right.plot(tau, fitted, "k", lw=1, label=f"from 20 snapshots x (0.05, 0.10); fit error {sol.fit_error:.1e}")
    right.set(title="Post-hoc: any length from two tracked profiles", xlabel="tau / t")
    right.legend(fontsize=8)
    fig.tight_layout()
    out = Path(__file__).with_name("profiles.png")
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
