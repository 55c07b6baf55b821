"""``emakit demo``: train the diffusion recipe, sweep EMA lengths post hoc, and report.

Runs :mod:`emakit.recipes.diffusion` on the bundled 8x8 digits, then scores the raw weights,
the classic EMA, a very short power EMA tracked directly, and a sweep of EMA lengths
reconstructed post hoc from the power-EMA snapshots. The quality metric is a Fréchet
distance (lower is better) between generated and real digits in the feature space of a
small digit classifier trained here; its seed-to-seed noise is measured and reported.
Writes ``report.md`` (the answer first: best length, gain over the raw weights, noise),
``report.json``, ``sweep.png`` and ``samples.png`` (raw weights and best EMA side by side)
into the output directory. The full mode also runs the golden-section search
(``posthoc.sweep(search=True)``) over the sweep's range and reports whether it lands within
the metric's noise of the full sweep's best, and with how many evaluations.

    emakit demo                 # about 3-5 minutes on 2 CPU cores
    emakit demo --quick         # about a minute: what the tests run
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .. import posthoc, schedules
from .._files.atomic import write_then_rename
from ..recipes import diffusion
from . import demo_raw

SWEEP = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)
FULL = {"steps": 8000, "snapshot_every": 200, "samples": 2000, "sample_steps": 50, "noise_seeds": 4}
QUICK = {"steps": 2000, "snapshot_every": 100, "samples": 1000, "sample_steps": 25, "noise_seeds": 4}
METRIC = "FD in digit-classifier features"
FILES = ("report.md", "report.json", "sweep.png", "samples.png")


# --------------------------------------------------------------------------- the metric


class DigitClassifier(nn.Module):
    """A small MLP classifier of 8x8 digits; its 128-d hidden layer is the metric's feature space."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on 80% of the digits (fixed split); returns the classifier and its held-out accuracy."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    cut = int(0.8 * len(x))
    train_idx, test_idx = perm[:cut], perm[cut:]
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(600):
        idx = train_idx[torch.randint(0, cut, (128,), generator=gen)]
        xb = x[idx] + 0.05 * torch.randn(128, 64, generator=gen)  # a little noise: smoother features
        loss = nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        accuracy = (clf(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    return clf, accuracy


@torch.no_grad()
def features(clf: DigitClassifier, x: torch.Tensor) -> torch.Tensor:
    return clf.features(x).double()


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, in float64.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a + s_b - 2 * cross))


# --------------------------------------------------------------------------- the demo


def run(
    out_dir: str | Path = "runs/demo",
    *,
    quick: bool = False,
    seed: int = 0,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Train, sweep, evaluate and write the report; returns the report dict."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("the demo draws its figures with matplotlib: pip install 'emakit[demo]'") from None
    started = time.perf_counter()
    plan = QUICK if quick else FULL
    out = Path(out_dir)
    cfg = diffusion.Config.from_overrides(
        list(overrides or []),
        out_dir=str(out / "run"),
        seed=seed,
        steps=plan["steps"],
        snapshot_every=plan["snapshot_every"],
        raw_every=plan["snapshot_every"],  # ordinary checkpoints too, for the comparison
        progress=progress,
    )
    if (out / "run" / "phema").exists() and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(
            f"{out / 'run'} holds an earlier run; choose another --out, or pass resume=true to continue it "
            f"or overwrite=true to delete it"
        )
    result = diffusion.train(cfg)
    train_s = time.perf_counter() - started
    device = result["device"]

    model = result["model"]
    score, accuracy = make_scorer(model, plan, cfg, device, seed=seed)

    raw_state = {k: v.clone() for k, v in model.state_dict().items()}
    states: dict[str, dict] = {"raw": raw_state}
    if result["ema"] is not None:
        states["ema"] = result["ema"].averaged_state_dict()
    short_name = f"sigma_rel={cfg.short_sigma_rel:g}"
    states[short_name] = result["short"].averaged_state_dict()
    rows, samples_by_name = [], {}
    for name, state in states.items():  # the references: raw weights, classic EMA, the short tracked profile
        fd, samples_by_name[name] = score(state)
        row = {"name": name, "sigma_rel": None, "metric": fd}
        if name == short_name:
            row.update(sigma_rel=cfg.short_sigma_rel, tracked=True)
        rows.append(row)
    # Post hoc: every EMA length of the sweep, rebuilt from the snapshots and scored by posthoc.sweep.
    snaps = posthoc.list_snapshots(result["snapshots"])
    grid = [s for s in SWEEP if s >= min(cfg.sigma_rels) - 1e-12]
    swept = posthoc.sweep(snaps, lambda m: score()[0], model=model, sigma_rel=grid)
    for r in swept.rows:
        rows.append({"name": f"sigma_rel={r['sigma_rel']:g}", "sigma_rel": r["sigma_rel"], "metric": r["metric"],
                     "fit_error": r["fit_error"]})  # fmt: skip
    full = {"sigma_rel": swept.best["sigma_rel"], "metric": swept.best["metric"], "evaluations": swept.evaluations}
    search = None if quick else search_against_sweep(snaps, grid, lambda m: score()[0], model, full)
    best = min(rows, key=lambda r: r["metric"])
    if best["name"] not in states:  # a post-hoc length: rebuild it for its samples and the noise
        states[best["name"]] = posthoc.reconstruct(snaps, sigma_rel=best["sigma_rel"], progress=False)
        samples_by_name[best["name"]] = score(states[best["name"]])[1]
    # Seed-to-seed noise of the metric: sample the best entry again with other seeds.
    repeats = [score(states[best["name"]], sample_seed=k)[0] for k in range(1, plan["noise_seeds"] + 1)]
    noise = float(torch.tensor([best["metric"], *repeats], dtype=torch.float64).std())
    raw_ckpts = demo_raw.compare(Path(cfg.out_dir) / "raw", result["snapshots"], model, score, grid, swept.best, quick)
    model.load_state_dict(raw_state)
    raw_samples = samples_by_name["raw"]

    report = {
        "metric_name": METRIC,
        "lower_is_better": True,
        "noise": noise,
        "noise_seeds": 1 + plan["noise_seeds"],
        "results": rows,
        "best": best,
        "answer": _answer(rows, best, noise),
        "classifier_accuracy": accuracy,
        "mode": "quick" if quick else "full",
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "samples": plan["samples"],
        "sampler": f"DDIM, {plan['sample_steps']} steps",
        "config": asdict(cfg),
        "files": list(FILES),
        "raw_checkpoints": raw_ckpts,
    }
    if search is not None:  # the golden-section search, against the full sweep
        report["search"] = {**search, "within_noise": abs(search["metric"] - full["metric"]) <= noise}
    out.mkdir(parents=True, exist_ok=True)
    best_samples = samples_by_name.get(best["name"], raw_samples)
    text = json.dumps(report, indent=2) + "\n"
    write_then_rename(
        [  # all report files appear together, or none
            (out / "report.json", lambda tmp: tmp.write_text(text)),
            (out / "report.md", lambda tmp: _write_markdown(tmp, report, cfg)),
            (out / "sweep.png", lambda tmp: _plot_sweep(tmp, rows, noise)),
            (out / "samples.png", lambda tmp: _plot_samples(tmp, raw_samples, best_samples, report)),
        ]
    )
    return report


def make_scorer(model: nn.Module, plan: dict, cfg: diffusion.Config, device, seed: int = 0):
    """``(score, classifier accuracy)``: ``score(state=None, sample_seed=0) -> (metric, samples)``.

    ``score`` loads ``state`` into ``model`` (when given), draws ``plan["samples"]`` digits
    with the recipe's DDIM sampler and returns their Fréchet distance to the real digits in
    the features of a classifier trained here (``seed``), and the samples.
    """
    x, y = diffusion.load_digits_tensor()
    clf, accuracy = train_classifier(x, y, seed=seed)
    real = features(clf, x)

    def score(state: dict | None = None, sample_seed: int = 0) -> tuple[float, torch.Tensor]:
        if state is not None:
            model.load_state_dict(state)
        samples = diffusion.sample(
            model,
            plan["samples"],
            steps=plan["sample_steps"],
            diffusion_steps=cfg.diffusion_steps,
            seed=sample_seed,
            device=device,
        )
        return frechet_distance(features(clf, samples), real), samples

    return score, accuracy


def search_against_sweep(snaps: list, grid: list[float], evaluate, model: nn.Module, full: dict) -> dict:
    """The golden-section search over ``grid``'s range, beside ``full`` (the full sweep's best row and evaluations).

    ``full`` holds ``sigma_rel``, ``metric`` and ``evaluations``; returns where the search
    lands, at which points, in how many evaluations and seconds, beside those.
    """
    started = time.perf_counter()
    found = posthoc.sweep(snaps, evaluate, model=model, sigma_rel=grid, search=True)
    return {
        "sigma_rel": found.best["sigma_rel"],
        "metric": found.best["metric"],
        "evaluations": found.evaluations,
        "points": [r["sigma_rel"] for r in found.rows],
        "sweep_sigma_rel": full["sigma_rel"],
        "sweep_metric": full["metric"],
        "sweep_evaluations": full["evaluations"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _answer(rows: list[dict], best: dict, noise: float) -> dict:
    """The headline: the best entry, its gain over the raw weights, and that gain in units of the metric's noise."""
    raw = next(r for r in rows if r["name"] == "raw")["metric"]
    gain = raw - best["metric"]
    return {
        "best": best["name"],
        "sigma_rel": best["sigma_rel"],
        "metric": best["metric"],
        "raw_metric": raw,
        "gain": gain,
        "gain_relative": gain / raw if raw else None,
        "gain_over_noise": gain / noise if noise > 0 else None,
    }


def _label(name: str, cfg: diffusion.Config) -> str:
    if name == "raw":
        return "raw weights"
    if name == "ema":
        return f"classic EMA (decay {cfg.ema_decay})"
    if name == f"sigma_rel={cfg.short_sigma_rel:g}":
        return f"power EMA {name} (tracked directly)"
    return f"power EMA {name} (post hoc)"


def _headline(report: dict, cfg: diffusion.Config) -> str:
    """The answer in one paragraph: best length, gain over the raw weights (absolute, relative), noise."""
    a = report["answer"]
    noise = f"seed-to-seed noise is {report['noise']:.2f} (std over {report['noise_seeds']} sampling seeds of the best)"
    if a["best"] == "raw":
        return f"**Best: the raw weights** ({a['metric']:.2f}): no average beat them. The metric's {noise}."
    ratio = a["gain_over_noise"]
    verdict = "n/a" if ratio is None else f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"
    significance = "" if ratio is None else ": significant" if ratio >= 3 else ": not significant (under 3x)"
    return (
        f"**Best: {_label(a['best'], cfg)}**, metric {a['metric']:.2f} against {a['raw_metric']:.2f} for the raw "
        f"weights: {a['gain']:.2f} lower ({a['gain_relative']:.1%} better). The metric's {noise}, so "
        f"**gain = {verdict} noise**{significance}."
    )


def _how(r: dict, cfg: diffusion.Config) -> str:
    how = {"raw": "the trained weights", "ema": f"classic EMA, decay {cfg.ema_decay} per step"}.get(r["name"])
    if how is not None:
        return how
    if r.get("tracked"):
        return "tracked directly (shorter than any snapshot profile)"
    if r["fit_error"] < 1e-12:
        return "post hoc; a tracked profile, reproduced exactly"
    return f"post hoc (profile fit error {r['fit_error']:.1e})"


def _classic_ema_note(cfg: diffusion.Config, best: dict) -> str:
    """Why the classic EMA scores as it does: the start of the run it still holds, or its length."""
    leftover = cfg.ema_decay**cfg.steps
    halflife = math.log(2) / -math.log(cfg.ema_decay)
    note = (
        f"The classic EMA (decay {cfg.ema_decay}, half-life {halflife:.0f} steps) still gives the initial "
        f"weights a weight of {leftover:.2%} after {cfg.steps} steps"
    )
    if leftover > 0.01:
        return note + (
            ": it averages mostly the untrained start of the run, which is why it scores poorly. Use a "
            "shorter decay, a warm-up, or start_at."
        )
    width = schedules.decay_to_sigma_rel(cfg.ema_decay, cfg.steps)
    if best["sigma_rel"] is None or best["name"] == "ema":
        return note + "."
    side = "longer" if width > best["sigma_rel"] else "shorter"
    return note + f"; its length, sigma_rel ≈ {width:.3f}, is {side} than the best ({best['sigma_rel']:g})."


def _search_note(search: dict, noise: float) -> str:
    verdict = "within" if search["within_noise"] else "**outside**"
    return (
        f"Golden-section search (`posthoc.sweep(..., search=True)`, same range): best sigma_rel="
        f"{search['sigma_rel']:.3g}, {search['metric']:.2f}, in {search['evaluations']} evaluations against "
        f"{search['sweep_evaluations']} for the full sweep (best sigma_rel={search['sweep_sigma_rel']:g}, "
        f"{search['sweep_metric']:.2f}): {abs(search['metric'] - search['sweep_metric']):.2f} apart, {verdict} "
        f"the noise ({noise:.2f}). The search took {search['seconds']:.0f} s."
    )


def _write_markdown(path: Path, report: dict, cfg: diffusion.Config) -> None:
    rows = report["results"]
    lines = [
        "# emakit demo report",
        "",
        _headline(report, cfg),
        "",
        f"Diffusion model on scikit-learn's 8x8 digits, {cfg.steps} optimizer steps (batch {cfg.batch_size}), "
        f"{report['samples']} samples per entry ({report['sampler']}). Metric: {report['metric_name']} "
        f"(lower is better); the classifier reaches {report['classifier_accuracy']:.1%} held-out accuracy. "
        f"Wall time {report['wall_seconds']:.0f} s (training {report['train_seconds']:.0f} s).",
        "",
        "| entry | sigma_rel | metric | how |",
        "|---|---:|---:|---|",
    ]
    for r in rows:
        mark = " **best**" if r == report["best"] else ""
        sr = "" if r["sigma_rel"] is None else f"{r['sigma_rel']:g}"
        lines.append(f"| {r['name']}{mark} | {sr} | {r['metric']:.2f} | {_how(r, cfg)} |")
    if any(r["name"] == "ema" for r in rows):
        lines += ["", _classic_ema_note(cfg, report["best"])]
    if "search" in report:
        lines += ["", _search_note(report["search"], report["noise"])]
    if "raw_checkpoints" in report:
        lines += demo_raw.markdown(report["raw_checkpoints"])
    lines += [
        "",
        "![sweep](sweep.png)",
        "",
        "![samples: raw weights and best EMA, same sampling seed](samples.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _plot_sweep(path: Path, rows: list[dict], noise: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    swept = [r for r in rows if r["sigma_rel"] is not None and not r.get("tracked")]
    tracked = [r for r in rows if r.get("tracked")]
    xs, ys = [r["sigma_rel"] for r in swept], [r["metric"] for r in swept]
    ax.errorbar(xs, ys, yerr=None if math.isnan(noise) else noise, marker="o", label="post-hoc EMA")
    for r in tracked:
        ax.plot(r["sigma_rel"], r["metric"], "s", label=f"tracked {r['name']}")
    styles = {"raw": ("k", "--"), "ema": ("tab:red", ":")}
    for r in rows:
        if r["name"] in styles:
            color, ls = styles[r["name"]]
            ax.axhline(r["metric"], color=color, ls=ls, label=f"{r['name']} ({r['metric']:.1f})")
    ax.set_xscale("log")
    ax.set(xlabel="sigma_rel (EMA length relative to training time)", ylabel=METRIC, title="EMA length sweep")
    top = max(r["metric"] for r in rows if r["name"] != "ema") * 1.15
    ax.set_ylim(0, top)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


#: Pixels of gap around each 8x8 digit in the sample grids, and the gap's shade (0 white, 1 black).
GAP_PX, GAP_SHADE = 2, 0.18


def tile(samples: torch.Tensor, n: int = 8) -> torch.Tensor:
    """The first ``n * n`` digits as one image in [0, 1] (1 = ink), each framed by a light-grey gap."""
    digits = ((samples[: n * n] + 1) / 2).clamp(0, 1).reshape(n * n, 8, 8)
    framed = nn.functional.pad(digits, (GAP_PX,) * 4, value=GAP_SHADE)
    size = 8 + 2 * GAP_PX
    return framed.reshape(n, n, size, size).permute(0, 2, 1, 3).reshape(n * size, n * size)


def _plot_samples(path: Path, raw: torch.Tensor, best: torch.Tensor, report: dict) -> None:
    """Raw weights and the best entry side by side, 8x8 digits each, from the same sampling seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw_metric, top = report["answer"]["raw_metric"], report["best"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.9), dpi=110)
    titles = (f"raw weights: FD {raw_metric:.2f}", f"best EMA ({top['name']}): FD {top['metric']:.2f}")
    for ax, samples, title in zip(axes, (raw, best), titles):
        ax.imshow(tile(samples).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.suptitle("64 samples each, same sampling seed (same starting noise at each position)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
