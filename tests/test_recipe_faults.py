"""The diffusion recipe under injected faults: kill -9 at any moment, a run in the way, a full disk, stale temporaries.

Each test injects the fault for real (SIGKILL of a subprocess, RLIMIT_FSIZE, files a killed
writer leaves) and compares the outcome with an uninterrupted run, bit for bit.
"""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("sklearn", reason="the recipe needs the demo extra (installed by .[dev])")

from emakit.recipes import diffusion as D  # noqa: E402

TINY = [
    "hidden=64",
    "batch_size=32",
    "accum_steps=2",
    "snapshot_every=10",
    "checkpoint_every=20",
    "log_every=5",
    "progress=false",
    "sigma_rels=0.05,0.1",
]
# 200 steps take about a second here; a checkpoint every 50 steps leaves snapshots (every 10)
# with no checkpoint yet early on, the situation of the default config (200 vs 1000).
STEPS = 200
RUN = [*TINY, "checkpoint_every=50", f"steps={STEPS}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of RUN, in this process."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    D.train(D.Config.from_overrides([*RUN, f"out_dir={out}"]))
    return out


def rows(out):
    """The log's rows; a torn last line (a kill in the middle of a write) is left out."""
    lines = (out / "log.jsonl").read_text().splitlines()
    if lines and not lines[-1].endswith("}"):
        lines = lines[:-1]
    return [json.loads(line) for line in lines]


def temporaries(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob(".*.tmp"))


def assert_equal(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(out, ref):
    """Model, optimizer, EMAs, data/RNG position, snapshots and log rows equal the reference's, bit for bit."""
    got, want = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (out, ref))
    got.pop("config"), want.pop("config")  # out_dir and resume differ
    assert_equal(got, want)
    snaps = sorted(p.name for p in (ref / "phema").iterdir())
    assert sorted(p.name for p in (out / "phema").iterdir()) == snaps
    for name in snaps:
        assert_equal(snapshot(out / "phema" / name), snapshot(ref / "phema" / name), name)
    log, ref_log = rows(out), rows(ref)
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == list(range(5, STEPS + 1, 5))
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    assert temporaries(out) == []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()  # events the lost parts logged past their checkpoint are purged (purge_step)
    assert [s.step for s in events.Scalars("loss")] == list(range(5, STEPS + 1, 5))


def snapshot(path):
    """A snapshot's metadata and tensors (its bytes vary: safetensors writes the metadata in any order)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def start(out, *extra, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "emakit.recipes.diffusion", *RUN, f"out_dir={out}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **popen,
    )


def kill_when(proc, ready, *, delay=0.0, required=True, timeout=600.0):
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds; (whether it was killed, its stderr).

    A run that ends first is not killed: a failure if ``required``, else (False, stderr).
    """
    deadline = time.monotonic() + timeout
    while not ready():  # some moments last milliseconds (writing a checkpoint: ~4 ms here)
        time.sleep(0.0005)
        if proc.poll() is not None:
            _, err = proc.communicate()
            assert proc.returncode == 0 and not required, (
                f"ended (rc={proc.returncode}) before the kill:\n{err[-3000:]}"
            )
            return False, err
        assert time.monotonic() < deadline, "kill point never reached"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)  # a no-op if it has ended meanwhile (not reaped yet)
    _, err = proc.communicate()
    assert proc.returncode in (-signal.SIGKILL, 0 if delay else None), err[-3000:]
    return proc.returncode == -signal.SIGKILL, err


def next_second():
    """Wait for the next second before a resume that follows closely (a real restart takes seconds).

    TensorBoard reads event files in name order (creation second, host, pid, a per-process
    count): a writer made in the same second as the previous one could be read first.
    """
    time.sleep(1.01 - time.time() % 1)


def finish(out, capsys):
    """Resume to the end, in this process (a subprocess start costs seconds)."""
    next_second()
    capsys.readouterr()
    assert D.main([*RUN, f"out_dir={out}", "--resume"]) == 0
    return capsys.readouterr().err


def checkpoint_step(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["step"] if (out / "checkpoint.pt").exists() else 0


def snapshot_written(out, step, since):
    """A kill point: the snapshot of ``step`` was written after ``since`` (by the run started then)."""
    path = out / "phema" / f"phema-{step:015d}.safetensors"

    def ready():
        try:
            return path.stat().st_mtime >= since
        except FileNotFoundError:
            return False

    return ready


def logged(out, n):
    """A kill point: the log holds ``n`` rows or more."""
    path = out / "log.jsonl"
    return lambda: path.exists() and path.read_text().count("\n") >= n


def assert_one_row_per_logged_step(out):
    """What a kill leaves: log rows 5, 10, ..., no repeats (the resume cut the lost part's rows)."""
    steps = [r["step"] for r in rows(out)]
    assert steps == list(range(5, 5 * len(steps) + 1, 5)), steps
    snaps = len(list((out / "phema").glob("phema-*"))) if (out / "phema").exists() else 0
    print(
        f"killed: checkpoint at {checkpoint_step(out)}, {snaps} snapshots, log to {steps[-1] if steps else 0}, "
        f"temporaries {temporaries(out)}",
        file=sys.__stderr__,  # past capsys: shown with pytest -s, or on a failure
    )


def test_kill9_at_chosen_moments_then_resume_is_bit_exact(tmp_path, reference, capsys):
    out = tmp_path / "run"
    # 1. After the first snapshot, before the first checkpoint (F1: the resume crashed on the snapshots).
    t0 = time.time()
    assert kill_when(start(out), snapshot_written(out, 10, t0))[0]
    assert checkpoint_step(out) == 0 and any((out / "phema").iterdir())
    assert_one_row_per_logged_step(out)
    # 2. Resumed from scratch (removing the snapshots), killed past its second checkpoint.
    t0 = time.time()
    err = kill_when(start(out, "--resume"), snapshot_written(out, 110, t0))[1]
    assert "no checkpoint" in err and "starting from scratch" in err and "removed" in err, err
    assert "1 snapshot(s)" in err  # phema-...10, written before the kill
    assert checkpoint_step(out) >= 100
    assert_one_row_per_logged_step(out)
    # 3. Resumed, killed while it writes a checkpoint (step 150 or 200): it leaves a temporary file.
    # The write lasts ~4 ms: on a busy machine the poll can miss it, or the kill land after it.
    proc = start(out, "--resume")
    if kill_when(proc, lambda: any(out.glob(f".checkpoint.pt.*.{proc.pid}.tmp")), required=False)[0]:
        assert_one_row_per_logged_step(out)
    # 4. Resumed, killed a moment after its first snapshot.
    step, t0 = checkpoint_step(out), time.time()
    if step < STEPS - 10:
        kill_when(start(out, "--resume"), snapshot_written(out, step + 10, t0), delay=0.05)
        assert_one_row_per_logged_step(out)
    finish(out, capsys)
    assert_same_run(out, reference)


def test_kill9_at_random_moments_then_resume_is_bit_exact(tmp_path, reference, capsys):
    out = tmp_path / "run"
    rng = random.Random(0)
    for k in range(3):
        # A random step past the checkpoint, plus up to 20 ms: anywhere in the training,
        # snapshot and checkpoint writes included.
        step, t0 = checkpoint_step(out), time.time()
        target = rng.randrange(step + 10, STEPS, 5)
        started, rows_to_target = snapshot_written(out, step + 10, t0), logged(out, target // 5)
        kill_when(
            start(out, *(["--resume"] if k else [])),
            lambda a=started, b=rows_to_target: a() and b(),  # this run's rows: the resume has cut the old ones
            delay=rng.uniform(0, 0.02),
        )
        assert_one_row_per_logged_step(out)
    finish(out, capsys)
    assert_same_run(out, reference)


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    D.train(D.Config.from_overrides([*RUN, "steps=100", f"out_dir={out}"]))
    # What a killed run and an earlier version of the recipe left: rows past the checkpoint
    # (step 100), rows repeated by a restart, a line torn by the kill.
    lost = (reference / "log.jsonl").read_text().splitlines(keepends=True)[20:25]  # steps 105..125
    with open(out / "log.jsonl", "a") as f:
        f.writelines([*lost, *lost[2:], '{"step": 13'])
    next_second()
    D.train(D.Config.from_overrides([*RUN, f"out_dir={out}", "resume=true"]))
    assert_same_run(out, reference)


def test_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path, reference, capsys):
    out = tmp_path / "run"
    D.train(D.Config.from_overrides([*RUN, "steps=50", f"out_dir={out}"]))
    size = (out / "checkpoint.pt").stat().st_size  # ~0.7 MB; a snapshot is ~0.2 MB
    limit = size // 2

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = start(out, "--resume", preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=600)  # a hang guard
    assert proc.returncode == 1, err[-3000:]
    assert f"no space left on device (or file size limit) while writing {out / 'checkpoint.pt'}" in err, err
    assert "--resume" in err and "Traceback" not in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # the last good one still loads
    assert ckpt["step"] == 50 and (out / "checkpoint.pt").stat().st_size == size
    assert temporaries(out) == []
    assert max(r["step"] for r in rows(out)) == 100  # the run went on to its next checkpoint
    finish(out, capsys)  # with space again, the resume gives the uninterrupted run's bits
    assert_same_run(out, reference)


def tree(out):
    """Every file under ``out`` with its bytes and mtime: what "untouched" means."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_run_in_out_dir_is_refused_untouched_or_overwritten(tmp_path, capsys):
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    common = [*TINY, "steps=20"]
    assert D.main([*common, f"out_dir={out}"]) == 0
    D.main([*common, f"out_dir={fresh}"])
    capsys.readouterr()
    # A finished run, then what is left of it after each removal: snapshots alone, the log alone.
    for remove in ([], ["checkpoint.pt", "log.jsonl"], ["phema", "tensorboard"]):
        for name in remove:
            D._remove(out / name)
        if remove == ["phema", "tensorboard"]:
            (out / "log.jsonl").write_text('{"step": 5}\n')
        before = tree(out)
        assert D.main([*common, f"out_dir={out}"]) == 1
        err = capsys.readouterr().err
        assert f"{out} already holds a run" in err and "nothing was changed" in err, err
        assert "--resume" in err and "--overwrite" in err
        assert tree(out) == before  # refused before touching anything
        with pytest.raises(FileExistsError, match="already holds a run"):
            D.train(D.Config.from_overrides([*common, f"out_dir={out}"]))
    assert D.main([*common, f"out_dir={out}", "--overwrite"]) == 0
    assert "overwrite=true: deleting the run" in capsys.readouterr().err
    assert [(r["step"], r["loss"]) for r in rows(out)] == [(r["step"], r["loss"]) for r in rows(fresh)]
    assert sorted(p.name for p in (out / "phema").iterdir()) == sorted(p.name for p in (fresh / "phema").iterdir())
    assert len(list((out / "tensorboard").iterdir())) == 1  # the old event files went with the run
    with pytest.raises(ValueError, match="pass one of them"):
        D.Config.from_overrides(["resume=true", "overwrite=true"])


def test_stale_temporaries_are_removed_at_the_next_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = D._HOST
    names = {
        f".checkpoint.pt.{host}.{dead.pid}.tmp": "stale",  # a killed writer on this host
        f".log.jsonl.{host}.{dead.pid}.tmp": "stale",
        f".checkpoint.pt.{host}.{os.getpid()}.tmp": "stale",  # our pid, but we are not writing: reused
        f".checkpoint.pt.{host}.{live.pid}.tmp": "kept",  # a live writer
        ".checkpoint.pt.otherhost.1.tmp": "kept",  # another host, recently written
        ".checkpoint.pt.otherhost.2.tmp": "old",  # another host, untouched for two hours
        ".checkpoint.pt.1234.tmp": "old",  # an older name without a host
        ".notes.tmp": "old",  # not the recipe's: never removed
    }
    try:
        for name, kind in names.items():
            (out / name).write_bytes(b"partial")
            if kind == "old":
                os.utime(out / name, (time.time() - 7200,) * 2)
        # Temporaries are not a run: a fresh run in this directory is not refused.
        D.train(D.Config.from_overrides([*TINY, "steps=10", f"out_dir={out}"]))
        left = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
        assert left == sorted([n for n, kind in names.items() if kind == "kept"] + [".notes.tmp"])
    finally:
        live.kill()
        live.wait()
