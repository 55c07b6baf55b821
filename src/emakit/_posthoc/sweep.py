"""The parts of a post-hoc EMA-length sweep that need no snapshots: search, results, report.

Owns :class:`SweepResult` (the table: length, fit error, noise gain, metrics, best), the
golden-section search over ``log(sigma_rel)`` that :func:`emakit.posthoc.sweep` uses with
``search=True``, and writing ``report.json`` / ``report.md`` / ``sweep.png``. Reads no
snapshot and touches no model (``posthoc.sweep`` does both).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files.atomic import write_then_rename

#: The golden ratio's conjugate: each step of a golden-section search keeps this fraction.
_PHI = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class SweepResult:
    """A post-hoc sweep: one row per EMA length evaluated, and the best.

    Each row holds ``sigma_rel``, ``fit_error`` and ``noise_gain`` (from the solve, known
    before any weight is read; from raw checkpoints: ``error_estimate`` and
    ``mass_before_first`` instead, see ``posthoc.sweep_checkpoints``), ``metrics`` (what ``evaluate`` returned, as a dict) and
    ``metric`` (the value that ranks the rows). Rows are sorted by ``sigma_rel``.
    """

    rows: tuple[dict[str, Any], ...]
    metric_name: str
    lower_is_better: bool
    evaluations: int
    references: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def collect(
        cls, scored: Mapping[float, dict], names: Sequence[str], lower_is_better: bool, references
    ) -> SweepResult:
        """The result of rows scored by ``sigma_rel`` (``names``: the metric each evaluation ranked by)."""
        return cls(
            rows=tuple(scored[s] for s in sorted(scored)),
            metric_name=names[0],
            lower_is_better=lower_is_better,
            evaluations=len(scored),
            references=dict(references or {}),
        )

    @property
    def best(self) -> dict[str, Any]:
        """The row with the best metric."""
        pick = min if self.lower_is_better else max
        return pick(self.rows, key=lambda r: r["metric"])

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready values (what ``report.json`` holds)."""
        return {
            "metric_name": self.metric_name,
            "lower_is_better": self.lower_is_better,
            "evaluations": self.evaluations,
            "best": self.best,
            "references": dict(self.references),
            "rows": list(self.rows),
        }

    def to_markdown(self) -> str:
        """The report: the answer first (best length, its gain over each reference), then the table."""
        best = self.best
        lines = ["# Post-hoc EMA sweep", ""]
        answer = f"**Best: sigma_rel={best['sigma_rel']:.4g}**, {self.metric_name} {best['metric']:.4g}"
        gains = [
            f"{name} {value:.4g} ({_gain(value, best['metric'], self.lower_is_better)})"
            for name, value in self.references.items()
        ]
        if gains:
            answer += "; against " + ", ".join(gains)
        lines += [answer + f". {self.evaluations} evaluations.", ""]
        names = sorted({k for r in self.rows for k in r["metrics"]})
        raw = "fit_error" not in self.rows[0]
        heads = "| est. error | mass before first |" if raw else "| fit error | noise gain |"
        lines += ["| sigma_rel " + heads + " " + " | ".join(names) + " |"]
        lines += ["|---:|---:|---:|" + "---:|" * len(names)]
        for r in self.rows:
            mark = " (best)" if r is best else ""
            cells = " | ".join(f"{r['metrics'][n]:.4g}" if n in r["metrics"] else "" for n in names)
            quality = (
                f"{r['error_estimate']:.2e} | {r['mass_before_first']:.2g}" if raw
                else f"{r['fit_error']:.1e} | {r['noise_gain']:.2f}"
            )  # fmt: skip
            lines += [f"| {r['sigma_rel']:.4g}{mark} | {quality} | {cells} |"]
        return "\n".join(lines) + "\n"


def _gain(reference: float, best: float, lower_is_better: bool) -> str:
    if reference == 0:
        return "n/a"
    change = (reference - best) / abs(reference) if lower_is_better else (best - reference) / abs(reference)
    return f"{change:+.1%} better" if change >= 0 else f"{-change:.1%} worse"


def as_metrics(value: Any, metric: str | None) -> tuple[dict[str, float], str]:
    """``evaluate``'s return value as ``(metrics, name of the ranking metric)``."""
    if isinstance(value, Mapping):
        metrics = {str(k): float(v) for k, v in value.items()}
        if not metrics:
            raise ValueError("sweep: evaluate returned an empty dict; expected a float or a dict of floats")
        name = metric if metric is not None else next(iter(metrics))
        if name not in metrics:
            raise ValueError(f"sweep: metric={name!r} is not among evaluate's results {sorted(metrics)}")
        return metrics, name
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"sweep: evaluate must return a float or a dict of floats, got {type(value).__name__}"
        ) from None
    name = metric or "metric"
    return {name: number}, name


def golden_section(
    score: Callable[[float], float], lo: float, hi: float, evaluations: int, lower_is_better: bool
) -> list[float]:
    """The points a golden-section search over ``log(sigma_rel)`` in ``[lo, hi]`` evaluates.

    ``score(sigma_rel)`` is called ``evaluations`` times at most (at least 2); each step
    keeps the 0.618 of the interval around the better of two inner points, which finds the
    optimum of a unimodal metric (the EMA-length U) to ``0.618**(evaluations - 1)`` of the
    log range.
    """
    sign = 1.0 if lower_is_better else -1.0
    a, b = math.log(lo), math.log(hi)
    c, d = b - _PHI * (b - a), a + _PHI * (b - a)
    fc, fd = sign * score(math.exp(c)), sign * score(math.exp(d))
    points = [math.exp(c), math.exp(d)]
    while len(points) < evaluations:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _PHI * (b - a)
            fc = sign * score(math.exp(c))
            points.append(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _PHI * (b - a)
            fd = sign * score(math.exp(d))
            points.append(math.exp(d))
    return points


def write_report(out: Path, result: SweepResult, *, plot: bool = True) -> list[Path]:
    """``report.json``, ``report.md`` and (with matplotlib) ``sweep.png`` in ``out``, all or none."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    writes = [
        (out / "report.json", lambda tmp: tmp.write_text(text)),
        (out / "report.md", lambda tmp: tmp.write_text(result.to_markdown())),
    ]
    if plot:
        writes.append((out / "sweep.png", lambda tmp: plot_sweep(tmp, result)))
    write_then_rename(writes)
    return [final for final, _ in writes]


def plot_sweep(path: Path, result: SweepResult) -> None:
    """The metric against sigma_rel on a log axis, the best marked, references as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the sweep plot needs matplotlib: pip install 'emakit[demo]' (or plot=False)") from None
    rows = result.rows
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot([r["sigma_rel"] for r in rows], [r["metric"] for r in rows], "o-", label="post-hoc EMA")
    best = result.best
    ax.plot([best["sigma_rel"]], [best["metric"]], "*", markersize=14, label=f"best: {best['sigma_rel']:.3g}")
    for k, (name, value) in enumerate(result.references.items()):
        ax.axhline(value, linestyle="--", color=f"C{k + 2}", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("sigma_rel (EMA length, relative)")
    ax.set_ylabel(result.metric_name + (" (lower is better)" if result.lower_is_better else " (higher is better)"))
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def search_budget(max_evaluations: int | None, grid: Sequence[float]) -> int:
    """Evaluations a golden-section search may spend: ``max_evaluations``, or half the grid (at least 4)."""
    budget = max_evaluations if max_evaluations is not None else max(4, len(grid) // 2)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(f"sweep: max_evaluations must be an int >= 2, got max_evaluations={max_evaluations!r}")
    return budget


def check_grid(values: Sequence[float] | float) -> list[float]:
    """``sigma_rel`` values for a sweep: a non-empty list of distinct numbers in ``(0, 0.2887)``."""
    from ..schedules import SIGMA_REL_MAX

    grid = [values] if isinstance(values, (int, float)) else list(values)
    if not grid:
        raise ValueError("sweep: sigma_rel must list at least one value")
    for s in grid:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < SIGMA_REL_MAX:
            raise ValueError(f"sweep: every sigma_rel must be a number in (0, {SIGMA_REL_MAX:.4f}), got {s!r}")
    return sorted(set(float(s) for s in grid))
