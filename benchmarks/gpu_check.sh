#!/usr/bin/env bash
# For a machine with a CUDA device: the CUDA tests, then the update and reconstruct ratios against the
# HBM roofline, written to one report (default gpu-report.md), in under 5 minutes. Without CUDA it
# says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [REPORT]        # PYTHON=... to use another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
REPORT=${1:-gpu-report.md}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here; skipped (nothing written)"
  exit 0
fi

{
  echo "# emakit GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/    /'
  echo
  echo "## CUDA tests (-k cuda: tests/test_cuda.py and the CUDA cases elsewhere)"
  echo
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_cuda.py tests/test_model_changes.py tests/test_lightning.py 2>&1 | tail -n 15 | sed 's/^/    /'
  echo "    (exit status ${PIPESTATUS[0]}; 124 = ran past 150 s)"
  echo
  echo "## Update and reconstruct against the HBM roofline"
  echo
  timeout 120 "$PY" - <<'EOF' 2>&1
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
import emakit  # noqa: E402
from bench_power import reconstruct_ratios  # noqa: E402
from bench_update import make_model  # noqa: E402


def cuda_ms(fn, reps=25):
    """Median milliseconds of ``fn`` between CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


x = torch.randn(400_000_000, device="cuda")
y = torch.randn_like(x)
copy_ms = cuda_ms(lambda: y.copy_(x))
hbm = 8 * x.numel() / copy_ms / 1e6  # GB/s: one read, one write per element
roof_ms = cuda_ms(lambda: x.lerp_(y, 1e-4))  # fp32 EMA floor: 12 bytes per parameter
x = y = None  # 3.2 GB freed for the models
print(f"device copy: {hbm:.0f} GB/s (the HBM roofline here); fp32 lerp_ of 400M: {roof_ms:.2f} ms, "
      f"{12 * 400e6 / roof_ms / 1e6:.0f} GB/s\n")
print("| case | ms / update | roofline / time | GB/s (12 B/param) |")
print("|---|---:|---:|---:|")
cases = [("fp32, 100 x 4M", 100, 4_000_000, torch.float32), ("fp32, 2000 x 1024", 2000, 1024, torch.float32),
         ("bf16 model, fp32 average, 100 x 4M", 100, 4_000_000, torch.bfloat16)]
for name, count, numel, dtype in cases:
    model = make_model(count, numel, dtype).cuda()
    ema = emakit.EMA(model, decay=0.9999)
    ms = cuda_ms(ema.update)
    roof = 12 * count * numel / hbm / 1e6  # ms at the copy bandwidth
    print(f"| {name} | {ms:.3f} | {roof / ms:.2f} | {12 * count * numel / ms / 1e6:.0f} |")
    del model, ema
    torch.cuda.empty_cache()
with tempfile.TemporaryDirectory() as tmp:
    r = reconstruct_ratios(50, 200_000, 20, 5, Path(tmp))
print(f"\nreconstruct / plain read of its files: {r['reconstruct']:.2f} (goal >= 0.7); verify / read: "
      f"{r['verify']:.2f} (goal >= 0.8); checksums {r['algorithm']}, {r['nbytes'] / 2**30:.2f} GiB page cache")
EOF
  rc=$?
  echo
  echo "(exit status of the timings: $rc; 124 = ran past 120 s)"
} > "$REPORT"
echo "gpu_check: wrote $REPORT"
