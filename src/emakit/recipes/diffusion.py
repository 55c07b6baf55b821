"""Reference recipe: train a small denoising diffusion model with EMA and power-EMA snapshots.

One readable script, top to bottom, using only emakit's public API; copy it and edit it.
It trains the way Stable Diffusion is trained, at the size of a CPU:

- data: scikit-learn's bundled 8x8 digits (no download), scaled to [-1, 1];
- DDPM forward noising, epsilon prediction, MSE loss, AdamW;
- mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on a CPU with native
  bf16 (AVX512-BF16/AMX; elsewhere fp32, since emulated bf16 is about 10x slower);
- gradient accumulation (loss / accum_steps; the EMAs update once per optimizer step);
- a classic EMA and a PowerEMA with snapshots for post-hoc EMA;
- tqdm progress bar, a JSONL log (and TensorBoard when installed);
- atomic checkpoints (model, optimizer, scaler, EMAs, data/RNG position) and an exact resume;
- DDIM or DDPM sampling.

    python -m emakit.recipes.diffusion out_dir=runs/digits steps=8000
    python -m emakit.recipes.diffusion out_dir=runs/digits steps=8000 --resume     # or resume=true
    python -m emakit.recipes.diffusion out_dir=runs/digits steps=8000 --overwrite  # or overwrite=true

What a run leaves in ``out_dir``: ``checkpoint.pt``, ``log.jsonl`` (one row per logged step),
``phema/`` (power-EMA snapshots), ``raw/`` (ordinary checkpoints of the raw weights, with
``raw_every``) and ``tensorboard/``. Killed at any moment (even ``kill -9``,
even before its first checkpoint), a run resumes with ``--resume`` to the same bits as an
uninterrupted one: the resume goes back to the checkpoint (to step 0 when there is none) and
removes what the lost part of the run wrote after it, saying so: snapshots past the
checkpoint's time, rows of ``log.jsonl`` past its step (the kept rows are written to a
temporary file and renamed), TensorBoard events past it (``purge_step``). Without
``--resume``, an ``out_dir`` that holds a run is refused before anything is touched;
``--overwrite`` deletes that run first. A full disk (or a file size limit) while writing the
checkpoint raises an ``OSError`` that says so, and the previous checkpoint stays valid.
Checkpoints are written under a hidden temporary name, ``.checkpoint.pt.<host>.<pid>.tmp``,
that nothing lists or loads; the temporary files of killed writers are removed at the next
checkpoint write (see :func:`remove_stale_temporaries`).

Needs the ``demo`` extra: ``pip install -c constraints.txt 'emakit[demo]'``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import emakit
from emakit import schedules, snapshots

# The recipe's pieces, each in its own module next to this one (and importable from here too):
# the model and sampler, the data, and the run directory's files.
from emakit.recipes.diffusion_model import Denoiser, alpha_bars, sample, timestep_embedding  # noqa: F401
from emakit.recipes.digits import load_digits_tensor
from emakit.recipes.run_dir import (
    _HOST,  # noqa: F401 (re-exported, like sample and timestep_embedding)
    _describe,
    _remove,
    cut_log,
    raw_checkpoints,
    remove_stale_temporaries,
    run_files,
    save_atomic,
)

# --------------------------------------------------------------------------- config


@dataclass
class Config:
    """Every knob of a run. ``key=value`` overrides; unknown keys are refused."""

    out_dir: str = "runs/digits"
    seed: int = 0
    steps: int = 8000  # optimizer steps
    batch_size: int = 128  # per optimizer step (split over accum_steps micro-batches)
    accum_steps: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    hidden: int = 768  # MLP width: 768 -> ~1.3M parameters
    diffusion_steps: int = 1000  # DDPM timesteps T
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 needs CUDA; auto: cpu_has_fast_bf16)
    device: str = "auto"
    # Classic EMA: a constant decay per optimizer step (0 disables it).
    ema_decay: float = 0.999
    # Power EMA for post-hoc reconstruction: tracked profiles and the snapshot interval.
    sigma_rels: tuple[float, ...] = (0.01, 0.05, 0.10)
    snapshot_every: int = 200
    # Ordinary checkpoints of the raw weights (raw/model-<step>.pt) every this many steps, 0: none;
    # emakit.posthoc.average_checkpoints rebuilds means and EMAs from them (the demo compares).
    raw_every: int = 0
    # A very short power EMA tracked directly (post hoc cannot go below the shortest profile).
    short_sigma_rel: float = 0.001
    time_unit: str = "steps"  # steps | images: the unit of t for the averages
    checkpoint_every: int = 1000
    log_every: int = 50
    resume: bool = False  # continue the run in out_dir from its checkpoint (`--resume`)
    overwrite: bool = False  # delete the run in out_dir and start again (`--overwrite`)
    progress: bool = True

    @classmethod
    def from_overrides(cls, overrides: list[str], **defaults: Any) -> Config:
        """``Config`` from ``key=value`` strings; refuses unknown keys and bad values."""
        cfg = cls(**defaults)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected key=value, got {item!r}")
            if key not in fields:
                raise ValueError(f"unknown config key {key!r}; known: {', '.join(fields)}")
            setattr(cfg, key, _parse(value, getattr(cfg, key), key))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for key in (
            "steps",
            "batch_size",
            "accum_steps",
            "hidden",
            "diffusion_steps",
            "snapshot_every",
            "checkpoint_every",
            "log_every",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {key}={getattr(self, key)}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by accum_steps={self.accum_steps}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got precision={self.precision!r}")
        if self.time_unit not in ("steps", "images"):
            raise ValueError(f"time_unit must be steps or images, got time_unit={self.time_unit!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got ema_decay={self.ema_decay}")
        if self.raw_every < 0:
            raise ValueError(f"raw_every must be >= 0 (0: no raw checkpoints), got raw_every={self.raw_every}")
        if self.resume and self.overwrite:
            raise ValueError("resume=true continues the run in out_dir, overwrite=true deletes it: pass one of them")


def _parse(text: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, tuple):
            return tuple(float(x) for x in text.split(",") if x.strip())
        return type(current)(text)
    except ValueError:
        raise ValueError(f"cannot read {key}={text!r} as {type(current).__name__}") from None


# --------------------------------------------------------------------------- training


def cpu_threads() -> int:
    """Intra-op threads for a CPU run: ``OMP_NUM_THREADS`` if set, else the usable CPUs not already busy, >= 1.

    Usable: ``os.sched_getaffinity``; busy: the 1-minute load average, rounded. The threads of
    one op wait for each other at its end, so where other processes hold the CPUs one
    descheduled thread stalls the rest at every op. Measured with ``emakit demo --quick
    precision=fp32`` on 2 cores: idle, 2 threads 44 s and 1 thread 70 s; beside two
    CPU-bound processes, 1 thread 105 s, while 2 threads trained 4.7x slower than 1 thread
    (benchmarks/run_all.py does not cover this; the figures are in README.md, Performance).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, usable - busy)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), as ``precision=auto`` asks.

    Without it, bf16 autocast is emulated: on this project's AVX2 machine one training step of
    the recipe took about 11x as long as in fp32 (0.55 s vs 0.05 s), turning the quick demo's
    minute into 12 minutes.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: ask oneDNN, which says yes for AVX512 cores and Apple's bf16
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve(cfg: Config) -> tuple[torch.device, torch.dtype | None, bool]:
    """(device, autocast dtype or None, use GradScaler)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    precision = cfg.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else ("bf16" if cpu_has_fast_bf16() else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA device (CPU autocast uses bf16)")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return device, dtype, precision == "fp16"


def train(cfg: Config) -> dict:
    """Train (or resume) a run in ``cfg.out_dir``; returns the paths and the final state."""
    out = Path(cfg.out_dir)
    device, amp_dtype, use_scaler = resolve(cfg)
    data, _ = load_digits_tensor()
    # Never write over a run by accident: it is continued (resume) or deleted on request (overwrite).
    earlier = [] if cfg.resume else run_files(out)
    if earlier and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({_describe(earlier, out)}); nothing was changed. Pass --resume "
            f"(resume=true) to continue it, or --overwrite (overwrite=true) to delete it and start again, "
            f"or choose another out_dir"
        )
    if earlier:
        print(f"overwrite=true: deleting the run in {out}: {_describe(earlier, out)}", file=sys.stderr)
        for path in earlier:
            _remove(path)
    out.mkdir(parents=True, exist_ok=True)
    data = data.to(device)
    torch.manual_seed(cfg.seed)
    model = Denoiser(cfg.hidden).to(device)
    # Fused AdamW: one kernel for all parameters (0.6 vs 2.25 ms per step measured on this CPU).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    abar = alpha_bars(cfg.diffusion_steps).to(device)

    # The averages. Classic EMA: constant decay per optimizer step; power EMAs: post-hoc EMA.
    unit = cfg.batch_size if cfg.time_unit == "images" else 1  # time per optimizer step
    ema = emakit.EMA(model, schedule=schedules.constant(cfg.ema_decay ** (1 / unit))) if cfg.ema_decay else None
    pema = emakit.PowerEMA(model, sigma_rels=cfg.sigma_rels)
    short = emakit.EMA(model, schedule=schedules.power(sigma_rel=cfg.short_sigma_rel))
    snap_dir = out / "phema"

    # Data order and noise come from one generator whose state is checkpointed: resuming
    # replays exactly the batches an uninterrupted run would have seen.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    step = 0
    ckpt_path = out / "checkpoint.pt"
    log_path = out / "log.jsonl"
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        pema.load_state_dict(ckpt["pema"])
        short.load_state_dict(ckpt["short"])
        gen.set_state(ckpt["generator"])
        step = ckpt["step"]
    elif cfg.resume:
        print(f"resume=true but no checkpoint in {out}: starting from scratch", file=sys.stderr)
    if cfg.resume:
        # Snapshots and log rows written after the checkpoint (all of them when there is none)
        # belong to the lost part of the run; the resumed run writes them again, identically.
        lost = snapshots.snapshot_paths(snap_dir) if snap_dir.is_dir() else []
        lost = [p for p in lost if snapshots.read_info(p).t > pema.t]
        lost += [p for p in raw_checkpoints(out) if int(p.stem.split("-")[1]) > step]
        for path in lost:
            _remove(path)
        dropped = cut_log(log_path, step)
        if lost or dropped:
            print(
                f"resuming at step {step}: removed what the lost part of the run wrote after it: "
                f"{len(lost)} snapshot(s) / raw checkpoint(s), {dropped} row(s) from {log_path}",
                file=sys.stderr,
            )

    log = open(log_path, "a")
    # purge_step hides TensorBoard events the lost part of the run logged past the checkpoint.
    writer = _tensorboard(out, purge_step=step + 1 if cfg.resume else None)
    bar = _progress(cfg, step)
    micro = cfg.batch_size // cfg.accum_steps
    model.train()
    start_time, start_step = time.perf_counter(), step
    try:
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg.accum_steps):
                idx = torch.randint(0, len(data), (micro,), generator=gen).to(device)
                t = torch.randint(0, cfg.diffusion_steps, (micro,), generator=gen).to(device)
                noise = torch.randn(micro, 64, generator=gen).to(device)
                x0 = data[idx]
                a = abar[t][:, None]
                xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM forward noising
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred = model(xt, t)
                # Loss in fp32, divided by the accumulation steps so the gradient is the batch mean.
                loss = nn.functional.mse_loss(pred.float(), noise) / cfg.accum_steps
                scaler.scale(loss).backward()
                total += loss.item()  # a host sync per micro-batch: fine on CPU, costs on GPU
            scaler.step(optimizer)
            scaler.update()
            step += 1
            # The averages move once per optimizer step (not per micro-batch).
            if ema is not None:
                ema.update(dt=unit)
            pema.update(dt=unit)
            short.update(dt=unit)
            if step % cfg.snapshot_every == 0:
                pema.save_snapshot(snap_dir)
            if cfg.raw_every and step % cfg.raw_every == 0:
                (out / "raw").mkdir(exist_ok=True)
                save_atomic(model.state_dict(), out / "raw" / f"model-{step}.pt")
            if step % cfg.log_every == 0 or step == cfg.steps:
                rate = (step - start_step) / (time.perf_counter() - start_time)
                log.write(json.dumps({"step": step, "loss": total, "steps_per_s": round(rate, 2)}) + "\n")
                log.flush()
                if writer is not None:
                    writer.add_scalar("loss", total, step)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", refresh=False)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                # The rows up to this step reach the disk before the checkpoint that says they are done
                # (an fsync per checkpoint): a resume keeps the rows up to its step and drops the rest.
                log.flush()
                os.fsync(log.fileno())
                if writer is not None:
                    writer.flush()
                remove_stale_temporaries(out)
                if (out / "raw").is_dir():
                    remove_stale_temporaries(out / "raw")
                save_atomic(
                    {
                        "config": dataclasses.asdict(cfg),
                        "step": step,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "pema": pema.state_dict(),
                        "short": short.state_dict(),
                        "generator": gen.get_state(),
                    },
                    ckpt_path,
                )
    finally:
        bar.close()
        log.close()
        if writer is not None:
            writer.close()
    return {
        "model": model,
        "ema": ema,
        "pema": pema,
        "short": short,
        "snapshots": snap_dir,
        "log": log_path,
        "device": device,
    }


def _progress(cfg: Config, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not cfg.progress:

        class _Quiet:
            def update(self, n):
                pass

            def set_postfix(self, **kw):
                pass

            def close(self):
                pass

        return _Quiet()
    # Redraw at most once a second on a terminal, every 30 s into a log file (e.g. CI).
    interval = 1.0 if sys.stderr.isatty() else 30.0
    return tqdm(total=cfg.steps, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=interval)


def _tensorboard(out: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None  # TensorBoard is optional: the JSONL log is always written
    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = {"--resume": "resume=true", "--overwrite": "overwrite=true"}  # `--resume` reads as resume=true
    try:
        cfg = Config.from_overrides([flags.get(a, a) for a in args])
        torch.set_num_threads(cpu_threads())
        result = train(cfg)
    except (ValueError, OSError) as e:  # a bad config, a run in the way, a full disk: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained to step {cfg.steps}; log {result['log']}, snapshots {result['snapshots']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
