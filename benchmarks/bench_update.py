"""EMA update cost: emakit vs installed peers vs the memory-bandwidth roofline, in one process.

The roofline is one contiguous fp32 ``ema.lerp_(weights, w)`` over the same number of
parameters: it reads two arrays and writes one, the least any EMA update can do. Times are
medians of process CPU time with one thread (this machine is shared; wall time is noisy).
Contenders are timed round-robin (one update each, repeated), so machine noise hits them
alike. Peak extra memory is the rise of the resident set's high-water mark during two updates
(after a first one) over what was resident before them: the temporaries an update
allocates, not the EMA tensors themselves. Peers are optional (``pip install -c constraints.txt ema-pytorch
torch-ema diffusers``); missing ones are listed as such.

    python benchmarks/bench_update.py                 # all scenarios (a few minutes)
    python benchmarks/bench_update.py --scenario small --reps 21
    python benchmarks/bench_update.py --scale 0.01    # tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import emakit

DECAY = 0.9999


# ------------------------------------------------------------------ measurement


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def peak_extra_mib(update: Callable[[], object], reps: int = 2) -> float | None:
    """Rise of the resident high-water mark over the resident size during ``reps`` updates.

    One update runs first, unmeasured: it binds the model (Python bookkeeping, once per run).
    """
    update()
    gc.collect()
    if not _reset_peak():
        return None
    rss_before = _status_kib("VmRSS")
    for _ in range(reps):
        update()
    return max(0.0, (_status_kib("VmHWM") - rss_before) / 1024)


def cpu_ms_medians(updates: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median CPU ms per update, timed round-robin so that machine noise hits every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in updates}
    for _ in range(reps):
        for name, update in updates.items():
            start = time.process_time()
            update()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


# ------------------------------------------------------------------ models


def make_model(num_tensors: int, numel: int, dtype: torch.dtype) -> nn.Module:
    """``num_tensors`` trainable parameters of ``numel`` elements each, in a plain module."""
    model = nn.Module()
    model.params = nn.ParameterList(nn.Parameter(torch.randn(numel, dtype=dtype)) for _ in range(num_tensors))
    return model


# ------------------------------------------------------------------ contenders


def emakit_contender(model: nn.Module, contiguous: bool = False, locate_nonfinite: bool = False):
    if contiguous:
        emakit.contiguous_parameters_(model)
    ema = emakit.EMA(model, decay=DECAY, locate_nonfinite=locate_nonfinite)
    return ema.update


def emakit_with_frozen(model: nn.Module):
    """emakit EMA on a model that also holds as many frozen parameters, watched for unfreezing.

    No optimizer step runs between the timed updates, so every update checks them itself
    (with an optimizer, its step pre-hook does that once per step instead): the cost of the
    check is this row minus the plain one.
    """
    params = list(model.parameters())
    model.frozen = nn.ParameterList(nn.Parameter(torch.empty_like(p), requires_grad=False) for p in params)
    ema = emakit.EMA(model, decay=DECAY)
    return ema.update


def peers() -> dict[str, Callable[[nn.Module], Callable[[], object]]]:
    out: dict[str, Callable[[nn.Module], Callable[[], object]]] = {}

    def averaged_model(model):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
        return lambda: avg.update_parameters(model)

    out["torch AveragedModel (multi_avg_fn)"] = averaged_model

    def ema_pytorch(model):
        from ema_pytorch import EMA

        ema = EMA(model, beta=DECAY, update_after_step=0, update_every=1)
        return ema.update

    out["ema-pytorch EMA"] = ema_pytorch

    def torch_ema(model):
        from torch_ema import ExponentialMovingAverage

        ema = ExponentialMovingAverage(model.parameters(), decay=DECAY)
        return ema.update

    out["torch-ema"] = torch_ema

    for foreach in (False, True):

        def diffusers_ema(model, foreach=foreach):
            from diffusers.training_utils import EMAModel

            ema = EMAModel(model.parameters(), decay=DECAY, foreach=foreach)
            return lambda: ema.step(model.parameters())

        out[f"diffusers EMAModel (foreach={foreach})"] = diffusers_ema

    def timm_v3(model):
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=DECAY)
        return lambda: ema.update(model)

    out["timm ModelEmaV3"] = timm_v3
    return out


PEER_PACKAGES = {"ema-pytorch": "ema_pytorch", "torch-ema": "torch_ema", "diffusers": "diffusers", "timm": "timm"}


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"emakit {emakit.__version__}"]
    for dist in PEER_PACKAGES:
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


# ------------------------------------------------------------------ scenarios


def run_scenario(title: str, num_tensors: int, numel: int, dtype: torch.dtype, reps: int, with_peers: bool) -> None:
    total = num_tensors * numel
    print(f"\n### {title}: {num_tensors} tensors x {numel} = {total / 1e6:.1f}M params, model {dtype}\n")
    roof_name = "roofline: one fp32 lerp_ of all params"
    ema32, w32 = torch.randn(total), torch.randn(total)
    updates: dict[str, Callable[[], object]] = {roof_name: lambda: ema32.lerp_(w32, 1 - DECAY)}
    if dtype != torch.float32:
        ema_low, w_low = ema32.to(dtype), w32.to(dtype)
        updates[f"(one {dtype} lerp_ of all params)"] = lambda: ema_low.lerp_(w_low, 1 - DECAY)

    contenders: dict[str, Callable] = {"emakit EMA": emakit_contender}
    contenders["emakit EMA, locate_nonfinite=True"] = lambda m: emakit_contender(m, locate_nonfinite=True)
    if dtype == torch.float32:
        contenders["emakit EMA + contiguous_parameters_"] = lambda m: emakit_contender(m, contiguous=True)
    if num_tensors > 100:
        contenders[f"emakit EMA, + {num_tensors} frozen params watched"] = emakit_with_frozen
    if with_peers:
        contenders.update(peers())
    errors: dict[str, str] = {}
    peaks: dict[str, float | None] = {name: 0.0 for name in updates}
    models = []  # kept alive: some peers hold only weak references to the parameters
    for name, build in contenders.items():
        model = make_model(num_tensors, numel, dtype)
        models.append(model)
        try:
            update = build(model)
            peaks[name] = peak_extra_mib(update)  # also the warm-up
            updates[name] = update
        except ImportError as e:
            errors[name] = f"not installed ({e.name})"
        except Exception as e:  # a peer that cannot run this case: report, do not hide
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"
    medians = cpu_ms_medians(updates, reps)
    roof_ms = medians[roof_name]

    print("| contender | ms / update | roofline / time | peak extra MiB |")
    print("|---|---:|---:|---:|")
    for name in [*updates, *errors]:
        if name in errors:
            print(f"| {name} | — | — | {errors[name]} |")
            continue
        peak = "n/a" if peaks[name] is None else f"{peaks[name]:.1f}"
        print(f"| {name} | {medians[name]:.2f} | {roof_ms / medians[name]:.2f} | {peak} |")
    if dtype != torch.float32:
        print(
            f"\nPeers keep their average in the model's {dtype} (a copy of the model): at decay {DECAY} it "
            "does not move. emakit keeps it in fp32."
        )
    sys.stdout.flush()
    updates.clear()
    models.clear()
    gc.collect()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["all", "large", "small", "bf16"], default="all")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the parameter counts (0.01 for a smoke run)")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: python benchmarks/{' '.join(['bench_update.py', *sys.argv[1:]])}")
    print(f"versions: {versions()}")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} thread, CPU time medians of {args.reps}")
    s = args.scale
    peers_on = not args.no_peers
    if args.scenario in ("all", "large"):
        run_scenario("fp32, large tensors", 100, max(1, int(1_000_000 * s)), torch.float32, args.reps, peers_on)
    if args.scenario in ("all", "small"):
        run_scenario(
            "fp32, many small tensors", max(2, int(2000 * min(1.0, s * 10))), 1024, torch.float32, args.reps, peers_on
        )
    if args.scenario in ("all", "bf16"):
        run_scenario("bf16 model, fp32 average", 100, max(1, int(1_000_000 * s)), torch.bfloat16, args.reps, peers_on)


if __name__ == "__main__":
    main()
