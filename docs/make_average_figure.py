"""Draw docs/average_spacing.png: how well ordinary checkpoints support an EMA, by checkpoint spacing.

A float64 random walk (the weights, 2000 of them, 4000 steps) stands in for SGD's noisy
trajectory. For each EMA length the exact power EMA (its discrete weights at every step) is
compared with the one rebuilt from checkpoints every ``k`` steps (``posthoc``'s hat-function
weights); the error is relative to how far the EMA is from the final weights,
``||rebuilt - exact|| / ||exact - final||``. Spacing is shown in units of the EMA's width
``sigma_rel * T``, where the curves for different lengths fall together.

pip install -c constraints.txt matplotlib
python docs/make_average_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from emakit._posthoc import raw_weights  # noqa: E402

T, N = 4000, 2000
SIGMA_RELS = (0.02, 0.05, 0.10, 0.20)
SPACINGS = (2, 5, 10, 20, 50, 100, 200, 400, 800)


def table() -> dict[float, list[tuple[float, float]]]:
    gen = torch.Generator().manual_seed(0)
    walk = torch.cumsum(torch.randn(T + 1, N, generator=gen, dtype=torch.float64), 0)
    out = {}
    for s in SIGMA_RELS:
        profile = raw_weights.profile(T, sigma_rel=s)
        exact = torch.tensor(raw_weights.hat_weights(range(T + 1), profile).weights, dtype=torch.float64) @ walk
        scale = (exact - walk[-1]).norm()
        rows = []
        for k in SPACINGS:
            times = list(range(0, T + 1, k))
            w = torch.tensor(raw_weights.hat_weights(times, profile).weights, dtype=torch.float64)
            rows.append((k / (s * T), float((w @ walk[times] - exact).norm() / scale)))
        out[s] = rows
    return out


def main() -> None:
    data = table()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for s, rows in data.items():
        ax.loglog([r[0] for r in rows], [r[1] for r in rows], "o-", label=f"sigma_rel={s:g}")
    ax.axhline(0.05, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("checkpoint spacing / EMA width (sigma_rel x T)")
    ax.set_ylabel("error / distance of the EMA from the final weights")
    ax.set_title("EMA rebuilt from ordinary checkpoints (random walk)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(__file__).with_name("average_spacing.png")
    fig.savefig(out)
    for s, rows in data.items():
        print(f"sigma_rel={s:g}: " + ", ".join(f"{x:.3g}: {e:.3g}" for x, e in rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
