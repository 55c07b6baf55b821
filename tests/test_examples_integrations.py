"""The integration examples run as documented (each under a minute on CPU), and the optional imports stay optional."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_example(name: str, *args: str) -> str:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard (a loaded machine is slow, not stuck)
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    print(f"{name}: {elapsed:.1f} s\n{out.stdout}")
    assert elapsed < 60, f"{name} took {elapsed:.0f} s"
    return out.stdout


def test_lightning_callback_example(tmp_path):
    pytest.importorskip("lightning", reason="Lightning is not installed (pip install 'emakit[lightning]')")
    out = run_example("lightning_callback.py", "--out", str(tmp_path))
    assert "512 optimizer steps (1024 batches); EMA t = 512" in out  # one update per optimizer step
    raw, ema = map(float, re.search(r"raw weights ([\d.]+), EMA weights ([\d.]+)", out).groups())
    assert ema < 0.5 * raw  # the noisy raw weights lose to their average
    assert (tmp_path / "model_ema.pt").is_file() and list(tmp_path.glob("*.ckpt"))


def test_accelerate_checkpointing_example(tmp_path):
    pytest.importorskip("accelerate", reason="Accelerate is not installed (pip install 'emakit[accelerate]')")
    out = run_example("accelerate_checkpointing.py", "--out", str(tmp_path))
    assert "1 process(es), EMA sharded: False, 512 optimizer steps" in out
    assert "resumed at step 256, ended at 512: resumed == uninterrupted: True" in out
    raw, ema = map(float, re.search(r"test loss raw ([\d.]+), EMA ([\d.]+)", out).groups())
    assert ema < raw
    assert (tmp_path / "state" / "custom_checkpoint_0.pkl").is_file()


def test_emakit_lightning_without_lightning_names_the_install_command():
    # Runs without Lightning installed too: the import of Lightning is made to fail.
    code = (
        "import sys\n"
        "sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "import emakit\n"
        "try:\n"
        "    import emakit.lightning\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'emakit[lightning]'" in out.stdout


def test_import_emakit_does_not_import_lightning_or_accelerate():
    code = "import sys, emakit; print(sorted(m for m in ('lightning', 'pytorch_lightning', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="Lightning is not installed")
def test_emakit_lightning_imports_lightning_only_when_asked():
    code = "import sys, emakit.lightning; print('lightning' in sys.modules, 'accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True False"
