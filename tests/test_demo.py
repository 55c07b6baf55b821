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

from emakit import demo  # noqa: E402
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
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("report.md", "report.json", "sweep.png", "samples_raw.png", "samples_ema.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
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
    assert "best" in (out / "report.md").read_text()
    assert str(out / "report.md") in run.stdout
