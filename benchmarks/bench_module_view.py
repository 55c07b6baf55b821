"""A teacher forward with the average: ``averaged_module()`` vs ``swapped()`` vs ema-pytorch's ``ema(x)``.

Self-distillation and EMA-teacher methods run a forward of the averaged model at every step.
Three ways, on the same MLP with BatchNorm, medians of process CPU time with one thread,
timed round-robin:

- ``ema.averaged_module()(x)``: a module whose tensors are the averages (built once);
- ``with ema.swapped(): model(x)``: copies the averages in and the weights back (2 copies);
- ema-pytorch ``EMA(model)(x)``: its own deep copy of the model (when installed).

Memory: what building the module view adds (Python objects only, measured with
tracemalloc; no tensor is allocated) against the model's parameter bytes.

    python benchmarks/bench_module_view.py
    python benchmarks/bench_module_view.py --layers 2 --width 64 --reps 3   # smoke run
"""

from __future__ import annotations

import argparse
import platform
import sys
import tracemalloc

import torch
from torch import nn

import emakit
from bench_update import cpu_ms_medians


def make_model(layers: int, width: int) -> nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*blocks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_model(args.layers, args.width).eval()
    params = sum(p.numel() for p in model.parameters())
    ema = emakit.EMA(model, decay=0.999)
    x = torch.randn(args.batch, args.width)

    tracemalloc.start()
    view = ema.averaged_module()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    def swapped():
        with ema.swapped():
            model(x)

    contenders = {
        "emakit averaged_module()(x)": lambda: view(x),
        "emakit swapped(): model(x)": swapped,
        "plain forward of the model (reference)": lambda: model(x),
    }
    note = ""
    try:
        from ema_pytorch import EMA

        peer = EMA(model, beta=0.999, update_after_step=0, update_every=1)
        contenders["ema-pytorch ema(x)"] = lambda: peer(x)
    except ImportError:
        note = "ema-pytorch not installed: pip install -c constraints.txt ema-pytorch"
    with torch.no_grad():
        for run in contenders.values():
            run()
        medians = cpu_ms_medians(contenders, args.reps)
    print(f"command: python benchmarks/{' '.join(['bench_module_view.py', *sys.argv[1:]])}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, emakit {emakit.__version__}")
    print(f"model: {args.layers} x (Linear({args.width}, {args.width}) + BatchNorm1d), {params / 1e6:.1f}M params, "
          f"batch {args.batch}; 1 thread, CPU time medians of {args.reps}\n")
    base = medians["plain forward of the model (reference)"]
    print("| teacher forward | ms | vs plain forward |")
    print("|---|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")
    if note:
        print(f"\n{note}")
    print(
        f"\nmodule view: {peak / 1024:.1f} KiB of Python objects to build (tracemalloc peak), no tensor; "
        f"the model's parameters are {params * 4 / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
