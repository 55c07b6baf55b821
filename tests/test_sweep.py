"""``posthoc.sweep``: evaluate many EMA lengths from snapshots, find the best, with or without search."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import emakit
from emakit import posthoc

pytest.importorskip("safetensors", reason="snapshots need the safetensors extra")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A random walk with snapshots of (0.05, 0.10), and a directly tracked 0.08 as the target."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("sweep") / "phema"
    model = nn.Linear(16, 16)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    target = emakit.PowerEMA(model, sigma_rels=(0.08,))
    for step in range(1, 801):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        pema.update()
        target.update()
        if step % 40 == 0:
            pema.save_snapshot(directory)
    want = target.averaged_state_dict()
    return directory, model, want


def distance(want):
    def evaluate(model):
        return sum(float((v - want[k]).norm()) for k, v in model.state_dict().items())

    return evaluate


def test_full_sweep_finds_the_tracked_length_and_restores_the_model(run, tmp_path):
    directory, model, want = run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = [0.03, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16]
    result = posthoc.sweep(directory, distance(want), model=model, sigma_rel=grid, out=tmp_path / "report",
                           references={"raw weights": distance(want)(model)})  # fmt: skip
    assert [r["sigma_rel"] for r in result.rows] == grid and result.evaluations == len(grid)
    assert result.best["sigma_rel"] == 0.08
    assert result.best["metric"] < 1e-3 * result.rows[0]["metric"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the model holds its own weights again
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["best"]["sigma_rel"] == 0.08 and report["rows"][3]["fit_error"] < 1e-3
    assert (tmp_path / "report" / "report.md").read_text().splitlines()[2].startswith("**Best: sigma_rel=0.08**")
    assert (tmp_path / "report" / "sweep.png").stat().st_size > 1000


def test_batches_give_the_same_table(run):
    directory, model, want = run
    grid = [0.05, 0.08, 0.1]
    one = posthoc.sweep(directory, distance(want), model=model, sigma_rel=grid)
    tiny = posthoc.sweep(directory, distance(want), model=model, sigma_rel=grid, max_memory=1)  # one per batch
    assert [r["metric"] for r in one.rows] == [r["metric"] for r in tiny.rows]


def test_search_lands_near_the_best_with_half_the_evaluations(run):
    directory, model, want = run
    grid = [round(0.02 * 1.25**i, 4) for i in range(12)]  # 0.02 .. 0.23
    full = posthoc.sweep(directory, distance(want), model=model, sigma_rel=grid)
    found = posthoc.sweep(directory, distance(want), model=model, sigma_rel=grid, search=True)
    assert found.evaluations <= len(grid) // 2
    assert found.best["metric"] <= full.best["metric"] * 1.5 + 1e-6
    assert abs(found.best["sigma_rel"] / 0.08 - 1) < 0.2


def test_dict_metrics_higher_is_better_and_errors(run):
    directory, model, want = run

    def evaluate(m):
        d = distance(want)(m)
        return {"accuracy": -d, "loss": d}

    result = posthoc.sweep(directory, evaluate, model=model, sigma_rel=[0.05, 0.08], metric="accuracy",
                           lower_is_better=False)  # fmt: skip
    assert result.best["sigma_rel"] == 0.08 and set(result.best["metrics"]) == {"accuracy", "loss"}
    with pytest.raises(ValueError, match="metric='nope'"):
        posthoc.sweep(directory, evaluate, model=model, sigma_rel=[0.08], metric="nope")
    with pytest.raises(TypeError, match="evaluate must return a float"):
        posthoc.sweep(directory, lambda m: "good", model=model, sigma_rel=[0.08])
    with pytest.raises(ValueError, match="sigma_rel must be a number"):
        posthoc.sweep(directory, evaluate, model=model, sigma_rel=[0.5])
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(m):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        posthoc.sweep(directory, boom, model=model, sigma_rel=[0.08])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_cli_sweep_with_a_users_evaluation(run, tmp_path, monkeypatch, capsys):
    import sys

    from emakit.cli import main

    directory, _, want = run
    torch.save(want, tmp_path / "target.pt")
    (tmp_path / "sweep_task.py").write_text(
        "import torch\n"
        f"TARGET = torch.load({str(tmp_path / 'target.pt')!r}, weights_only=True)\n"
        "def make_model():\n    return torch.nn.Linear(16, 16)\n"
        "def evaluate(model):\n"
        "    return {'distance': sum(float((v - TARGET[k]).norm()) for k, v in model.state_dict().items())}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "report"
    argv = ["sweep", str(directory), "--eval", "sweep_task:evaluate", "--model", "sweep_task:make_model",
            "--sigma-rel", "0.05,0.08,0.1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "**Best: sigma_rel=0.08**" in capsys.readouterr().out
    assert (out / "report.json").exists() and (out / "report.md").exists()
    assert main([*argv[:3], "sweep_task:nope", *argv[4:]]) == 2
    assert "has no 'nope'" in capsys.readouterr().err
    assert main([*argv[:3], "no_such_module:f", *argv[4:]]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
    assert main([*argv[:3], "evaluate", *argv[4:]]) == 2
    assert "expected pkg.module:function" in capsys.readouterr().err


def test_reconstruct_can_accumulate_in_float64(run):
    directory, _, _ = run
    from emakit import snapshots

    sol = posthoc.solve_coefficients(directory, sigma_rel=0.08, warn=False)
    want = None  # the weighted sum of the fp32 snapshots, in float64, written out here
    for info, weights in zip(sol.snapshots, sol.weights):
        reader = snapshots.open_tensors(info)
        for j, w in enumerate(weights):
            x = reader.get(f"avg.{j}/weight").double() * w
            want = x if want is None else want + x
        reader.close()
    got64 = posthoc.reconstruct(directory, sigma_rel=0.08, progress=False, accumulate=torch.float64, dtype="float64")
    got32 = posthoc.reconstruct(directory, sigma_rel=0.08, progress=False, dtype="float64")
    torch.testing.assert_close(got64["weight"], want, rtol=1e-12, atol=1e-12)
    assert (got32["weight"] - want).abs().max() > 0  # fp32 accumulation rounds
    with pytest.raises(ValueError, match="accumulate must be a floating"):
        posthoc.reconstruct(directory, sigma_rel=0.08, progress=False, accumulate=torch.int64)
