"""DeepSpeed ZeRO-3 on 2 CPU ranks: a separate, optional job.

DeepSpeed is an optional extra that CI does not install (it needs ``--no-build-isolation``
and JIT-compiles a communication op on its first run, ~1-2 minutes). Install it and run::

    DS_BUILD_OPS=0 .venv/bin/pip install --no-build-isolation -c constraints.txt deepspeed
    .venv/bin/python -m pytest -m deepspeed tests/test_deepspeed.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from torch.testing import assert_close

from emakit import posthoc

sys.path.insert(0, str(Path(__file__).parent))
os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
import dist_scenarios  # noqa: E402

pytestmark = [
    pytest.mark.deepspeed,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed is not installed (optional extra, not in CI's default install): "
        "DS_BUILD_OPS=0 pip install --no-build-isolation -c constraints.txt deepspeed",
    ),
]


def test_zero3_shard_local_average(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # The first run JIT-compiles DeepSpeed's shared-memory op (cached afterwards).
    dist_scenarios.run("deepspeed_zero3", 2, str(tmp_path), timeout=540)
    infos = posthoc.list_snapshots(tmp_path / "ds_snaps")
    assert infos and all(i.sharded and not i.pickled for i in infos)  # .shards: safetensors parts, no pickle
    assert infos[0].flat  # ZeRO-3 partitions are stored flat and reshaped on reading
    for target in (0.05, 0.08):
        got = posthoc.reconstruct(tmp_path / "ds_snaps", sigma_rel=target, progress=False)
        want = posthoc.reconstruct(tmp_path / "ds_ref_snaps", sigma_rel=target, progress=False)
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape
            assert_close(got[name], want[name], msg=name)
