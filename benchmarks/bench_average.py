"""Averaging ordinary checkpoints: the rebuilt EMA's error against the exact one, memory and speed.

1. **Error** (``--error``): a float32 random walk with drift (the "weights", ``--error-params``,
   ``--steps`` steps) is averaged exactly at every step by an ``EMA`` (decay 0.998) and a
   ``PowerEMA`` (sigma_rel 0.05, 0.10); raw checkpoints are saved every 5 steps. The same EMAs
   are rebuilt from checkpoints every 5 ... 500 steps (``posthoc.average_checkpoints``); the
   table gives the measured rms error per element against the exact EMA and the reported
   estimate (which should bound it), and the profile mass before the first checkpoint.
2. **Memory and speed** (``--stream``): ``--files`` checkpoints of a ``--params`` float32 model
   (distinct ``torch.save`` files) averaged as a uniform mean and as a power EMA, each in a
   fresh process: peak RSS rise against (output + one checkpoint), and time against a plain
   sequential read of the same files (``readinto`` a reused buffer), alternated, medians.

    python benchmarks/bench_average.py                          # both, small
    python benchmarks/bench_average.py --stream --params 100000000 --files 50   # the issue's case

Measured here (2 CPU cores, torch 2.13, one thread; docs/average.md has the tables):
see docs/average.md ("Measured") for the figures and the exact commands.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import emakit
from emakit import posthoc


def error_table(params: int, steps: int, every: int = 5) -> list[dict]:
    torch.manual_seed(0)
    model = torch.nn.Linear(params // 100, 100, bias=False)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    drift = torch.randn_like(theta) * 0.01
    ema = emakit.EMA(model, decay=0.998)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "ckpt_0.pt")
        for step in range(1, steps + 1):
            theta += drift * (1 - step / steps) + 0.02 * torch.randn_like(theta)
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta, model.parameters())
            ema.update()
            pema.update()
            if step % every == 0:
                torch.save(model.state_dict(), Path(tmp) / f"ckpt_{step}.pt")
        exact = {
            "decay=0.998": (dict(decay=0.998), ema.averaged_state_dict()),
            "sigma_rel=0.05": (dict(sigma_rel=0.05), pema.averaged_state_dict(sigma_rel=0.05)),
            "sigma_rel=0.10": (dict(sigma_rel=0.10), pema.averaged_state_dict(sigma_rel=0.10)),
        }
        for spacing in (5, 20, 50, 100, 200, 500):
            files = [Path(tmp) / f"ckpt_{s}.pt" for s in range(0, steps + 1, spacing)]
            for name, (kwargs, truth) in exact.items():
                got = posthoc.average_checkpoints(files, **kwargs)
                err = torch.cat([(got.state_dict[k].double() - truth[k].double()).reshape(-1) for k in truth])
                measured = float(err.square().mean().sqrt())
                rows.append(dict(target=name, spacing=spacing, measured=measured, estimate=got.error_estimate,
                                 before=got.mass_before_first))  # fmt: skip
    return rows


_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from emakit import posthoc
files, mode = json.loads(sys.argv[1]), sys.argv[2]
def status(key):  # bytes, from /proc/self/status (VmRSS: now, VmHWM: the peak so far)
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
base = status("VmRSS")  # (the imports' own peak may be higher: the rise is then overstated, never hidden)
start = time.perf_counter()
out = posthoc.average_checkpoints(files, **({} if mode == "mean" else {"sigma_rel": 0.05}))
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"seconds": seconds, "rise": peak - base}))
"""


def _plain_read(files: list[Path]) -> float:
    buffer = bytearray(max(f.stat().st_size for f in files))
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            view = memoryview(buffer)
            while fh.readinto(view):
                pass
    return time.perf_counter() - start


def stream(params: int, files: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("EMAKIT_BENCH_DIR")) as tmp:
        weights = torch.randn(params)
        paths = []
        for i in range(files):
            weights.add_(torch.randn(params) * 1e-3)
            path = Path(tmp) / f"ckpt_{(i + 1) * 100}.pt"
            torch.save({"w": weights}, path)
            paths.append(path)
        one = paths[0].stat().st_size
        out: dict = {"checkpoint_bytes": one, "output_bytes": params * 4, "read": [], "mean": [], "ema": []}
        for _ in range(reps):
            out["read"].append(_plain_read(paths))
            for mode in ("mean", "ema"):
                child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([str(p) for p in paths]), mode],
                                       capture_output=True, text=True, check=True)  # fmt: skip
                out[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--error", action="store_true", help="only the error table")
    parser.add_argument("--stream", action="store_true", help="only memory and speed")
    parser.add_argument("--error-params", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"emakit {emakit.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, one thread")
    if not args.stream:
        print(f"\nEMA rebuilt from raw checkpoints ({args.error_params} params, {args.steps} steps): rms error per element")
        print(f"{'target':<15} {'every':>6} {'measured':>10} {'estimate':>10} {'est/meas':>8} {'mass before 1st':>16}")
        for r in error_table(args.error_params, args.steps):
            print(f"{r['target']:<15} {r['spacing']:>6} {r['measured']:>10.3g} {r['estimate']:>10.3g} "
                  f"{r['estimate'] / r['measured']:>8.2f} {r['before']:>16.3g}")  # fmt: skip
    if not args.error:
        s = stream(args.params, args.files, args.reps)
        read = statistics.median(s["read"])
        budget = s["output_bytes"] + s["checkpoint_bytes"]
        print(f"\n{args.files} checkpoints of {args.params / 1e6:g}M float32 params ({s['checkpoint_bytes'] / 2**20:.0f} MiB each)")
        print(f"plain sequential read: {read:.2f} s ({args.files * s['checkpoint_bytes'] / read / 1e9:.2f} GB/s)")
        for mode in ("mean", "ema"):
            seconds = statistics.median(r["seconds"] for r in s[mode])
            rise = max(r["rise"] for r in s[mode])
            print(f"{mode:<5} {seconds:.2f} s: {read / seconds:.2f} of the read's speed; peak RSS rise "
                  f"{rise / 2**20:.0f} MiB = {rise / budget:.2f}x (output + one checkpoint)")  # fmt: skip


if __name__ == "__main__":
    main()
