"""The demo's comparison of ordinary checkpoints with power-EMA snapshots.

The recipe also saved the raw weights every ``raw_every`` steps (``raw/model-<step>.pt``),
what most runs already have. From them: the uniform mean of the last ``LAST`` checkpoints
(fairseq-style checkpoint averaging) and the EMA rebuilt at the best length a search finds
(``posthoc.sweep_checkpoints``); beside the snapshots' best reconstruction, each with the
bytes it needed on disk.
"""

from __future__ import annotations

from pathlib import Path

from .. import posthoc

#: How many of the newest raw checkpoints the uniform mean takes.
LAST = 5


def _bytes(paths) -> int:
    total = 0
    for p in paths:
        p = Path(p)
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def compare(raw_dir: Path, snapshot_dir: Path, model, score, grid: list[float], best_snapshot: dict, quick: bool) -> dict:
    """Score the raw-checkpoint averages; ``best_snapshot``: the snapshot sweep's best row (sigma_rel, metric)."""
    files = sorted(raw_dir.glob("model-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    mean = posthoc.average_checkpoints(files, last=LAST)
    mean_metric = score(mean.state_dict)[0]
    if quick:  # the snapshots' best length only
        ema = posthoc.average_checkpoints(files, sigma_rel=best_snapshot["sigma_rel"])
        ema_best = {"sigma_rel": best_snapshot["sigma_rel"], "metric": score(ema.state_dict)[0], "evaluations": 1}
        error = ema.error_estimate
    else:
        swept = posthoc.sweep_checkpoints(files, lambda m: score()[0], model=model, sigma_rel=grid, search=True,
                                          max_evaluations=6)  # fmt: skip
        ema_best = {k: swept.best[k] for k in ("sigma_rel", "metric")} | {"evaluations": swept.evaluations}
        error = swept.best["error_estimate"]
    snaps = posthoc.list_snapshots(snapshot_dir)
    return {
        "checkpoints": len(files),
        "every": int(files[1].stem.split("-")[1]) - int(files[0].stem.split("-")[1]) if len(files) > 1 else None,
        "mean_last": {"n": LAST, "metric": mean_metric, "bytes": _bytes(files[-LAST:])},
        "ema_from_raw": {**ema_best, "error_estimate": error, "bytes": _bytes(files)},
        "snapshots": {
            "sigma_rel": best_snapshot["sigma_rel"],
            "metric": best_snapshot["metric"],
            "bytes": _bytes([s.path for s in snaps]),
            "count": len(snaps),
        },
    }


def markdown(section: dict) -> list[str]:
    """The report's lines for the comparison."""
    mean, ema, snaps = section["mean_last"], section["ema_from_raw"], section["snapshots"]
    mib = 2**20
    return [
        "",
        "## From ordinary checkpoints",
        "",
        f"The run also saved its raw weights every {section['every']} steps ({section['checkpoints']} ordinary "
        f"checkpoints, `posthoc.average_checkpoints`). Lower is better.",
        "",
        "| from | what | metric | bytes on disk |",
        "|---|---|---:|---:|",
        f"| raw checkpoints | uniform mean of the last {mean['n']} | {mean['metric']:.2f} | {mean['bytes'] / mib:.1f} MiB |",
        f"| raw checkpoints | EMA rebuilt, sigma_rel={ema['sigma_rel']:.3g} (best of {ema['evaluations']}) | "
        f"{ema['metric']:.2f} | {ema['bytes'] / mib:.1f} MiB |",
        f"| {snaps['count']} power-EMA snapshots | reconstruction, sigma_rel={snaps['sigma_rel']:.3g} | "
        f"{snaps['metric']:.2f} | {snaps['bytes'] / mib:.1f} MiB |",
        "",
        f"Estimated error of the rebuilt EMA against the exact one: {ema['error_estimate']:.2g} rms per weight.",
    ]
