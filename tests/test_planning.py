"""planning.plan / planning.prune and the `emakit plan` / `emakit prune` commands."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import emakit
from emakit import cli, planning, posthoc, schedules
from emakit.snapshots import SnapshotInfo


def _info(t: float, sigma_rels) -> SnapshotInfo:
    """A header-only snapshot (no file): what the solve reads."""
    gammas = tuple(schedules.sigma_rel_to_gamma(s) for s in sigma_rels)
    return SnapshotInfo(
        path=Path(f"phema-{t:g}.safetensors"), t=float(t), num_updates=int(t), sigma_rels=tuple(sigma_rels),
        gammas=gammas, dtype=torch.float32, averaged=("w",), copied=(), static=(), model_dtypes={"w": torch.float32},
        shapes={"w": (1,)}, keys=("w",), aliases={}, nbytes=4 * len(gammas),
    )  # fmt: skip


def _infos(layout, steps, at=()):
    return [_info(t, layout.sigma_rels) for t in planning._times(steps, layout.interval, at)]


def _worst_by_posthoc(infos, lo, hi, t, n=41):
    grid = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    return max(posthoc.solve_coefficients(infos, sigma_rel=s, t=t, warn=False).fit_error for s in grid)


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("at", [None, (5_000, 10_000)])
def test_plan_meets_target_rechecked_by_posthoc(at):
    steps, lo, hi = 10_000, 0.03, 0.2
    p = planning.plan(steps, sigma_rel=(lo, hi), max_fit_error=1e-3, at=at)
    assert p.best.meets and p.best.fit_error <= 1e-3
    infos = _infos(p.best, steps, at or ())
    assert len(infos) == p.best.snapshots
    assert p.best.bytes_per_parameter == 4 * p.best.snapshots * len(p.best.sigma_rels)
    for t in at or (steps,):
        # a denser grid than the plan's: between its grid points the error may rise a little
        assert _worst_by_posthoc(infos, lo, hi, t) <= 1.05e-3


def test_plan_fit_errors_equal_solve_coefficients():
    infos = [_info(t, (0.05, 0.10)) for t in range(100, 2001, 100)]
    targets = [0.03, 0.08, 0.15, 0.25]
    mine = planning.fit_errors(infos, targets, 1500.0)
    ref = [posthoc.solve_coefficients(infos, sigma_rel=s, t=1500.0, warn=False).fit_error for s in targets]
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(ref), rtol=1e-6, atol=1e-15)


def test_plan_needs_fewer_bytes_than_edm2():
    p = planning.plan(100_000, sigma_rel=(0.03, 0.2), max_fit_error=1e-3)
    assert p.edm2.sigma_rels == (0.05, 0.10) and p.edm2.meets
    assert p.best.bytes_per_parameter < p.edm2.bytes_per_parameter
    assert _worst_by_posthoc(_infos(p.edm2, 100_000), 0.03, 0.2, 100_000) <= 1.05e-3


def test_plan_edm2_reported_when_it_misses():
    # 0.01..0.02 is far shorter than 0.05: EDM2's pair cannot reach it with these few snapshots
    p = planning.plan(1000, sigma_rel=(0.01, 0.02), max_fit_error=1e-3, counts=(4, 8, 16))
    assert not p.edm2.meets and p.edm2.snapshots == 16 and p.edm2.fit_error > 1e-3
    assert p.best.meets and p.best.bytes_per_parameter < p.edm2.bytes_per_parameter


def test_plan_nothing_meets_raises():
    with pytest.raises(ValueError, match="no searched layout .* max_fit_error=1e-12"):
        planning.plan(1000, sigma_rel=(0.03, 0.2), max_fit_error=1e-12, counts=(4, 8), max_profiles=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 1}, "steps must be an integer >= 2, got steps=1"),
        ({"steps": 10.5}, "steps must be an integer"),
        ({"sigma_rel": (0.2, 0.1)}, r"sigma_rel must be a pair 0 < low <= high < 0.2887, got sigma_rel=\(0.2, 0.1\)"),
        ({"sigma_rel": (0.1, 0.3)}, "sigma_rel must be a pair"),
        ({"sigma_rel": 0.1}, "sigma_rel must be a pair"),
        ({"max_fit_error": 0}, "max_fit_error must be a finite number > 0, got max_fit_error=0"),
        ({"max_fit_error": math.nan}, "max_fit_error must be"),
        ({"at": (0,)}, r"at must be times in \(0, steps=1000\]"),
        ({"at": (2000,)}, "at must be times"),
        ({"candidates": (0.5,)}, "candidates must be sigma_rel values"),
        ({"max_profiles": 0}, "max_profiles must be an integer >= 1"),
        ({"counts": (0,)}, "counts must be integers >= 1"),
    ],
)
def test_plan_bad_arguments(kwargs, match):
    kwargs = {"steps": 1000, **kwargs}
    with pytest.raises(ValueError, match=match):
        planning.plan(**kwargs)


# --------------------------------------------------------------------------- prune


def _run(directory: Path, steps=400, every=20, sigma_rels=(0.05, 0.10)) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    pema = emakit.PowerEMA(model, sigma_rels=sigma_rels)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        pema.update()
        if step % every == 0:
            pema.save_snapshot(directory)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("run") / "phema")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("phema-*.safetensors"))


def test_prune_keeps_fit_error_and_removes_files(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "p")
    before = _names(d)
    report = planning.prune(d, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    after = _names(d)
    assert report.removed and len(after) == len(before) - len(report.removed)
    assert list(report.kept) == after and before[-1] in after  # never the last
    assert report.bytes_after < report.bytes_before
    assert report.fit_error_before <= report.fit_error_after <= 1e-3
    infos = posthoc.list_snapshots(d)
    assert _worst_by_posthoc(infos, 0.05, 0.15, infos[-1].t) <= 1.05e-3
    assert not (d / planning.JOURNAL).exists()
    again = planning.prune(d, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)  # nothing more to drop
    assert again.removed == () and _names(d) == after


def test_prune_dry_run_removes_nothing(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "p")
    before = _names(d)
    report = planning.prune(d, sigma_rel=(0.05, 0.15), max_fit_error=1e-3, dry_run=True)
    assert report.dry_run and report.removed and _names(d) == before
    assert not (d / planning.JOURNAL).exists()


def test_prune_killed_is_finished_by_rerun(run_dir, tmp_path, monkeypatch):
    d = _copy(run_dir, tmp_path / "p")
    expected = planning.prune(d, sigma_rel=(0.05, 0.15), max_fit_error=1e-3, dry_run=True)
    calls = []

    def killed(path):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(path)
        path.unlink()

    monkeypatch.setattr("emakit._planning.pruning._remove", killed)
    with pytest.raises(KeyboardInterrupt):
        planning.prune(d, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    journal = json.loads((d / planning.JOURNAL).read_text())
    assert journal["delete"] == list(expected.removed)
    assert len(_names(d)) == len(expected.kept) + len(expected.removed) - 1
    # every snapshot the decision keeps is still there, so what is left reconstructs the range
    assert set(expected.kept) <= set(_names(d))
    monkeypatch.undo()
    report = planning.prune(d, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    assert list(report.resumed) == list(reversed(expected.removed[:-1]))  # newest first
    assert _names(d) == sorted(expected.kept) and not (d / planning.JOURNAL).exists()


def test_prune_journal_missing_kept_file_stops(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "p")
    names = _names(d)
    record = {"format": "emakit.prune", "version": 1, "keep": [names[-1], "phema-999.safetensors"], "delete": names[:2]}
    (d / planning.JOURNAL).write_text(json.dumps(record))
    with pytest.raises(emakit.snapshots.SnapshotError, match="keeps .*phema-999.safetensors, which is missing"):
        planning.prune(d, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    assert _names(d) == names


def test_prune_bad_arguments(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"prune: sigma_rel must be a pair .* got sigma_rel=\(0.15, 0.05\)"):
        planning.prune(run_dir, sigma_rel=(0.15, 0.05))
    with pytest.raises(ValueError, match="prune: max_fit_error must be a finite number > 0, got max_fit_error=-1"):
        planning.prune(run_dir, sigma_rel=(0.05, 0.15), max_fit_error=-1)
    with pytest.raises(ValueError, match="already miss max_fit_error=1e-09.*nothing removed"):
        planning.prune(run_dir, sigma_rel=(0.01, 0.25), max_fit_error=1e-9)
    with pytest.raises(emakit.snapshots.SnapshotError, match="not a directory"):
        planning.prune(tmp_path / "missing", sigma_rel=(0.05, 0.15))


def test_prune_removes_sharded_snapshots_as_it_does_single_files(run_dir, tmp_path):
    """The same snapshots as ``.shards`` directories: the same decision, the directories gone whole."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli_faults import to_sharded

    single = _copy(run_dir, tmp_path / "single")
    to_sharded(run_dir, tmp_path / "sharded", container="shards")
    want = planning.prune(single, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    got = planning.prune(tmp_path / "sharded", sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    as_files = [n.replace(".shards", ".safetensors") for n in got.removed]
    assert got.removed and as_files == list(want.removed)
    assert got.fit_error_after == pytest.approx(want.fit_error_after, rel=1e-9)
    left = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert left == sorted(got.kept)  # no hidden leftovers either


# --------------------------------------------------------------------------- what a fit error costs in weights


def test_pruned_random_walk_weight_error():
    """Float64 random walk, 2000 steps, 20 snapshot times x (0.05, 0.10): prune to 1e-3 over 0.05..0.15 and
    compare reconstructions with the exact EMA. Measured: see docs/posthoc.md."""
    torch.manual_seed(0)
    steps, dim = 2000, 500
    walk = torch.randn(steps, dim, dtype=torch.float64).cumsum(0)  # value held over (k-1, k], k = 1..steps
    k = torch.arange(1, steps + 1, dtype=torch.float64)

    def ema(gamma, t):  # exact power EMA at time t (a multiple of 1 step)
        w = (k[:t] ** (gamma + 1) - (k[:t] - 1) ** (gamma + 1)) / t ** (gamma + 1)
        return w @ walk[:t]

    tracked = (0.05, 0.10)
    times = list(range(100, steps + 1, 100))
    infos = [_info(t, tracked) for t in times]
    values = {t: [ema(g, t) for g in infos[0].gammas] for t in times}
    lo, hi = 0.05, 0.15
    gone, _ = planning._greedy(infos, planning._log_grid(lo, hi, 24), float(steps), 1e-3, 0.0)
    kept = [s for j, s in enumerate(infos) if j not in gone]
    assert len(kept) < len(infos)
    final = walk[-1]
    rel = {}
    for s in (0.05, 0.08, 0.10, 0.12, 0.15):
        sol = posthoc.solve_coefficients(kept, sigma_rel=s, warn=False)
        rebuilt = sum(w * values[info.t][j] for info, ws in zip(sol.snapshots, sol.weights) for j, w in enumerate(ws))
        exact = ema(schedules.sigma_rel_to_gamma(s), steps)
        rel[s] = (float((rebuilt - exact).norm() / (exact - final).norm()), sol.fit_error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"\nkept {len(kept)} of {len(infos)}:", {s: f"{e:.2e} (fit {f:.1e})" for s, (e, f) in rel.items()})
    assert all(f <= 1.05e-3 for _, f in rel.values())
    assert max(e for e, _ in rel.values()) < 0.1


# --------------------------------------------------------------------------- CLI


def test_cli_plan(capsys):
    assert cli.main(["plan", "--steps", "10000", "--sigma-rel", "0.03:0.2", "--max-fit-error", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "plan " in out and "EDM2" in out and "bytes/parameter" in out
    assert cli.main(["plan", "--steps", "10000", "--at", "5000,10000", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["at"] == [5000.0, 10000.0] and data["best"]["meets"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["plan", "--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
        (["plan", "--steps", "100", "--sigma-rel", "0.2:0.1"], "expected a range LOW:HIGH with 0 < LOW <= HIGH"),
        (["plan", "--steps", "100", "--sigma-rel", "0.1"], "expected a range LOW:HIGH such as 0.03:0.2"),
        (["plan", "--steps", "100", "--max-fit-error", "0"], "expected a relative profile error > 0"),
        (["plan", "--steps", "100", "--at", "200"], r"--at: times must be in \(0, --steps=100\]"),
        (["plan", "--steps", "100", "--sigma-rel", "0.1:0.5"], "sigma_rel must be a pair"),
        (["prune", "/nonexistent/dir", "--sigma-rel", "0.05:0.15"], "no such directory"),
    ],
)
def test_cli_bad_arguments(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(match, err), err


def test_cli_prune(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path / "p")
    before = _names(d)
    assert cli.main(["prune", str(d), "--sigma-rel", "0.05:0.15", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and _names(d) == before
    assert cli.main(["prune", str(d), "--sigma-rel", "0.05:0.15", "--max-fit-error", "1e-3", "-v"]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "MiB" in out and len(_names(d)) < len(before)
    assert cli.main(["prune", str(d), "--sigma-rel", "0.01:0.25", "--max-fit-error", "1e-9"]) == 2
    assert "already miss" in capsys.readouterr().err


def test_prune_of_compact_snapshots_rewrites_orphaned_deltas_losslessly(tmp_path):
    import torch

    import emakit
    from emakit import posthoc, snapshots

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for step in range(1, 801):  # 40 snapshots: keyframes at the 1st and the 33rd
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        pema.update()
        if step % 20 == 0:
            pema.save_snapshot(tmp_path, encoding="compact")

    def decoded() -> dict[str, dict[str, torch.Tensor]]:
        snapshots.clear_decoded_cache()
        out = {}
        for info in posthoc.list_snapshots(tmp_path):
            reader = snapshots.open_tensors(info)
            out[info.path.name] = {k: reader.get(k) for k in (f"avg.{j}/{n}" for j in range(2) for n in info.averaged)}
            reader.close()
        return out

    values = decoded()
    dry = planning.prune(tmp_path, sigma_rel=(0.05, 0.15), max_fit_error=1e-3, dry_run=True)
    report = planning.prune(tmp_path, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    assert report.removed == dry.removed and report.rewritten == dry.rewritten
    assert len(report.removed) >= 20 and report.rewritten  # deltas no longer pin their chains
    assert report.bytes_after <= dry.bytes_after  # the dry run's estimate is an upper bound
    infos = posthoc.list_snapshots(tmp_path)
    times = {s.t for s in infos}
    assert all(s.reference is None or s.reference in times for s in infos)
    assert all(s.previous is None or s.previous in times for s in infos)  # what predicted deltas read too
    assert all(snapshots.read_info(tmp_path / n).reference is None for n in report.rewritten)
    after = decoded()
    assert list(after) == list(report.kept)
    for name, tensors in after.items():  # bit for bit what they decoded to before
        for key, value in tensors.items():
            assert torch.equal(value, values[name][key]), (name, key)
    posthoc.reconstruct(tmp_path, sigma_rel=0.08, progress=False)


def test_a_prune_killed_after_rewriting_finishes_on_the_next_call(tmp_path, monkeypatch):
    import torch

    import emakit

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for step in range(1, 401):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 0.1)
        pema.update()
        if step % 20 == 0:
            pema.save_snapshot(tmp_path, encoding="compact")
    calls = []

    def killed(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between two deletions, after every rewrite
        path.unlink()

    monkeypatch.setattr("emakit._planning.pruning._remove", killed)
    with pytest.raises(KeyboardInterrupt):
        planning.prune(tmp_path, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    monkeypatch.undo()
    assert (tmp_path / planning.JOURNAL).exists()
    emakit.posthoc.reconstruct(tmp_path, sigma_rel=0.08, progress=False)  # every listed snapshot decodes
    report = planning.prune(tmp_path, sigma_rel=(0.05, 0.15), max_fit_error=1e-3)
    assert report.resumed and not (tmp_path / planning.JOURNAL).exists()


def test_prune_benchmark_runs_at_tiny_scale():
    import subprocess

    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_prune.py"), "--params", "2000", "--steps", "200"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith(("| fp32", "| compact"))]
    assert len(rows) == 2 and "| 0 |" in rows[0], out  # fp32 rewrites nothing
