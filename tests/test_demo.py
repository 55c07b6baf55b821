"""The demo: the metric against scipy and the data, and the quick mode end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs the demo extra (installed by .[dev])")
pytest.importorskip("matplotlib", reason="the demo needs the demo extra (installed by .[dev])")
scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy comes with scikit-learn")

from emakit._cli import demo  # noqa: E402
from emakit.recipes import diffusion  # noqa: E402


def test_frechet_distance_matches_scipy_reference():
    torch.manual_seed(0)
    a = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    b = torch.randn(400, 6, dtype=torch.float64) * 2 + 1
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    covmean = scipy_linalg.sqrtm(s_a @ s_b).real
    want = ((mu_a - mu_b) ** 2).sum() + (s_a + s_b - 2 * covmean).trace()
    assert demo.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)


@pytest.fixture(scope="module")
def classifier():
    x, y = diffusion.load_digits_tensor()
    clf, accuracy = demo.train_classifier(x, y)
    return clf, accuracy, x


def test_metric_real_vs_itself_is_zero_and_vs_noise_is_large(classifier):
    clf, accuracy, x = classifier
    assert accuracy > 0.95
    real = demo.features(clf, x)
    assert abs(demo.frechet_distance(real, real)) < 1e-6
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    halves = demo.frechet_distance(real[perm[:900]], real[perm[900:]])
    noise = demo.frechet_distance(demo.features(clf, torch.rand(2000, 64) * 2 - 1), real)
    assert halves < 5 and noise > 100 * halves


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "emakit", "demo", "--quick", "--threads", "1", "-q", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=3600,  # a hang guard, not a time limit: CI may share the machine
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("report.md", "report.json", "sweep.png", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "samples_raw.png").exists() and not (out / "samples_ema.png").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == ["report.md", "report.json", "sweep.png", "samples.png"]
    assert "search" not in report  # the search check runs in the full mode only
    rows = {r["name"]: r for r in report["results"]}
    assert report["metric_name"] and report["noise"] > 0
    assert {"raw", "ema", "sigma_rel=0.001", "sigma_rel=0.05", "sigma_rel=0.25"} <= set(rows)
    assert all(r["metric"] > 0 and r["metric"] == r["metric"] for r in rows.values())
    best = report["best"]
    assert best == min(report["results"], key=lambda r: r["metric"])
    assert best["sigma_rel"] is not None and 0.01 <= best["sigma_rel"] <= 0.25
    # EMA beats the raw weights, and the very short profile is worse than the best, both by far more than noise.
    assert rows["raw"]["metric"] - best["metric"] > 5 * report["noise"]
    assert rows["sigma_rel=0.001"]["metric"] - best["metric"] > 5 * report["noise"]
    assert report["classifier_accuracy"] > 0.95
    answer = report["answer"]
    assert answer["best"] == best["name"] and answer["raw_metric"] == rows["raw"]["metric"]
    assert answer["gain"] == pytest.approx(rows["raw"]["metric"] - best["metric"])
    assert answer["gain_over_noise"] == pytest.approx(answer["gain"] / report["noise"])
    text = (out / "report.md").read_text()
    assert text.splitlines()[2].startswith(f"**Best: power EMA {best['name']} (post hoc)**")
    assert "gain = " in text.splitlines()[2] and "noise" in text.splitlines()[2]
    # 2000 steps at decay 0.999 leave 13.5% on the initial weights: the classic EMA loses, and the report says why.
    assert rows["ema"]["metric"] > rows["raw"]["metric"]
    assert "averages mostly the untrained start of the run" in text
    assert "![samples" in text and "(samples.png)" in text
    assert str(out / "report.md") in run.stdout
    assert str(out / "samples.png") in run.stdout and "samples_raw.png" not in run.stdout  # what it wrote


def _report(rows: list[dict], noise: float) -> dict:
    best = min(rows, key=lambda r: r["metric"])
    return {
        "metric_name": "FD", "noise": noise, "noise_seeds": 5, "results": rows, "best": best,
        "answer": demo._answer(rows, best, noise), "samples": 10, "sampler": "DDIM, 5 steps",
        "classifier_accuracy": 0.98, "wall_seconds": 1.0, "train_seconds": 1.0,
    }  # fmt: skip


ROWS = [
    {"name": "raw", "sigma_rel": None, "metric": 30.0},
    {"name": "ema", "sigma_rel": None, "metric": 40.0},
    {"name": "sigma_rel=0.05", "sigma_rel": 0.05, "metric": 12.0, "fit_error": 0.0},
]


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        (2000, "it averages mostly the untrained start of the run, which is why it scores poorly"),
        (8000, "its length, sigma_rel ≈ 0.125, is longer than the best (0.05)"),
    ],
)
def test_report_leads_with_the_answer_and_explains_the_classic_ema(tmp_path, steps, why):
    cfg = diffusion.Config(steps=steps, ema_decay=0.999)
    demo._write_markdown(tmp_path / "report.md", _report(ROWS, noise=0.5), cfg)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0] == "# emakit demo report" and lines[1] == ""
    assert lines[2] == (
        "**Best: power EMA sigma_rel=0.05 (post hoc)**, metric 12.00 against 30.00 for the raw weights: 18.00 lower "
        "(60.0% better). The metric's seed-to-seed noise is 0.50 (std over 5 sampling seeds of the best), so "
        "**gain = 36x noise**: significant."
    )
    assert why in "\n".join(lines)


def test_report_says_when_the_gain_is_within_the_noise(tmp_path):
    rows = [{**r, "metric": 29.52} if r["name"] == "sigma_rel=0.05" else r for r in ROWS]
    demo._write_markdown(tmp_path / "report.md", _report(rows, noise=0.4), diffusion.Config())
    assert "**gain = 1.2x noise**: not significant (under 3x)." in (tmp_path / "report.md").read_text()


def test_search_note_compares_with_the_full_sweep(tmp_path):
    search = {"sigma_rel": 0.0256, "metric": 13.66, "evaluations": 6, "sweep_sigma_rel": 0.03, "sweep_metric": 13.68,
              "sweep_evaluations": 12, "seconds": 11.5, "within_noise": True}  # fmt: skip
    report = {**_report(ROWS, noise=0.41), "search": search}
    demo._write_markdown(tmp_path / "report.md", report, diffusion.Config())
    text = (tmp_path / "report.md").read_text()
    assert "best sigma_rel=0.0256, 13.66, in 6 evaluations against 12 for the full sweep" in text
    assert "0.02 apart, within the noise (0.41)" in text


def test_sample_tiles_have_gaps_between_digits():
    samples = torch.ones(100, 64)  # all ink
    image = demo.tile(samples, n=8)
    size = 8 + 2 * demo.GAP_PX
    assert image.shape == (8 * size, 8 * size)
    assert (image[:, :size].sum(1) > 0).all()
    gap_rows = [k * size + j for k in range(8) for j in (*range(demo.GAP_PX), *range(size - demo.GAP_PX, size))]
    assert torch.all(image[gap_rows] == demo.GAP_SHADE)
    assert torch.all(image[demo.GAP_PX : size - demo.GAP_PX, demo.GAP_PX : size - demo.GAP_PX] == 1)


def test_samples_figure_shows_raw_and_best_side_by_side(tmp_path):
    pytest.importorskip("PIL", reason="reads the figure back")
    from PIL import Image

    raw, best = torch.rand(100, 64) * 2 - 1, torch.rand(100, 64) * 2 - 1
    demo._plot_samples(tmp_path / "samples.png", raw, best, _report(ROWS, noise=0.5))
    width, height = Image.open(tmp_path / "samples.png").size
    assert width >= 900 and height >= 450  # 9 x 4.9 inches at 110 dpi
