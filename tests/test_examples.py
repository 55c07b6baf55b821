"""Examples run as written (those needing optional integrations: tests/test_examples_integrations.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_timm_style_example_keeps_best_checkpoints_and_resumes_exactly(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "timm_style.py"), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard (a loaded machine is slow, not stuck)
    )
    assert out.returncode == 0, out.stderr
    assert "EMA identical to one run: True" in out.stdout
    assert "loaded with migrate.load as timm" in out.stdout
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "last.pth.tar" in names and "model_best.pth.tar" in names
    assert len([n for n in names if n.startswith("checkpoint-")]) == 2  # max_history
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
