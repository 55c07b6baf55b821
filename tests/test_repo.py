"""Repository-level checks: lint, the README's quick start runs as written, scripts run."""

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_lint_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_quick_start_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2, "README.md should hold the quick start and the post-hoc example"
    namespace: dict = {}
    for block in blocks:  # later blocks continue the first (same model and optimizer)
        code = block.replace("/tmp/ckpt.pt", str(tmp_path / "ckpt.pt")).replace("/tmp/run", str(tmp_path / "run"))
        exec(compile(code, "README.md", "exec"), namespace)
    assert len(list((tmp_path / "run" / "phema").iterdir())) == 10


def test_readme_setup_and_test_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    setup = [line for line in readme.splitlines() if line.rstrip().endswith("# setup")]
    tests = [line for line in readme.splitlines() if line.rstrip().endswith("# test")]
    assert len(setup) == 1 and len(tests) == 1
    assert "pip install torch==2.13.0" in setup[0] and "-c constraints.txt" in setup[0]
    assert setup[0].index("torch==2.13.0") < setup[0].index("-c constraints.txt")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "# setup$" in ci and "# test$" in ci
    assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]


def test_quickstart_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "power EMA" in out.stdout and "checkpoint restored at t=1500" in out.stdout


@pytest.mark.parametrize(
    "script,expect",
    [
        ("bench_update.py", ["| emakit EMA |", "bf16 model, fp32 average"]),
        ("bench_power.py", ["PowerEMA, two profiles (one pass)", "posthoc.reconstruct"]),
    ],
)
def test_benchmark_runs_at_tiny_scale(script, expect):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--scale", "0.001", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert all(e in out.stdout for e in expect), out.stdout


def test_storage_benchmark_times_a_model_of_many_tensors(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_storage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny run fits some lengths poorly
        times = bench_storage.many_tensors(tmp_path, tensors=6, numel=10, count=2, reps=1)
    assert set(times) == {"fp32", "compact"} and all(t > 0 for t in times.values())
    assert len(list((tmp_path / "compact").glob("*.safetensors"))) == 2


def test_collector_benchmark_runs_every_call_at_tiny_scale(tmp_path, capsys, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_collector
    from emakit._files import collector

    assert bench_collector.main(["--tensors", "4", "--numel", "8", "--snapshots", "2", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == 8 and all(float(row.split("|")[-2]) > 0 for row in rows), rows
    assert bench_collector.reconstruct_ratio(tmp_path, tensors=4, numel=8, snapshots=2, reps=1) > 0
    assert collector.ENABLED  # turned back on


def test_storage_benchmark_measures_a_finished_run(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import emakit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    pema = emakit.PowerEMA(model, sigma_rels=(0.01, 0.05, 0.10))
    run = tmp_path / "run"
    for step in range(1, 241):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-2)
        pema.update()
        if step % 12 == 0:
            pema.save_snapshot(run / "phema")
    torch.save({"model": model.state_dict(), "step": 240}, run / "checkpoint.pt")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_storage.py"), "--demo-run", str(run / "phema")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "| compact |" in out.stdout and "| fp16 | " in out.stdout and "held-out 0.05:" in out.stdout
    assert "fp32 pruned to fit error 0.001 over 0.03:0.2" in out.stdout
