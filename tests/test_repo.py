"""Repository-level checks: lint, the README's quick start runs as written, scripts run."""

import re
import shutil
import subprocess
import sys
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
