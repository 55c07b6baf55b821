"""Injected faults in checkpoints and snapshots: damaged DCP directories, pickle payloads.

Each test breaks a file the way a crash, a full disk or an attacker would, and checks that
emakit fails with an ``Exception`` naming the path, leaves the average exactly as it was, and
never runs code from a pickle it was not told to trust.
"""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
from torch import nn

import emakit
import emakit.verify
from emakit import posthoc, snapshots
from emakit._files.dcp import CHECKSUMS, CheckpointError

pytest.importorskip("safetensors", reason="snapshots need the safetensors extra")


def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = emakit.EMA(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        ema.update()
    return model, ema


def snapshot_state(ema):
    sd = ema.state_dict()
    return {k: v.clone() for p in sd["averages"] for k, v in p.items()}, sd["t"], sd["num_updates"]


def assert_unchanged(ema, before):
    tensors, t, n = snapshot_state(ema)
    assert t == before[1] and n == before[2]
    for k, v in tensors.items():
        assert torch.equal(v, before[0][k]), k


def _distcp(path: pathlib.Path) -> pathlib.Path:
    (data,) = [p for p in path.iterdir() if p.suffix == ".distcp"]
    return data


def _truncate(path):
    data = _distcp(path)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])


def _flip_tail(path):
    data = _distcp(path)
    raw = bytearray(data.read_bytes())
    raw[-10] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        lambda p: _distcp(p).unlink(),
        lambda p: (p / ".metadata").write_bytes(b"not a pickle at all"),
        lambda p: (p / ".metadata").write_bytes((p / ".metadata").read_bytes()[:40]),
    ],
    ids=["truncated", "missing-data", "garbage-metadata", "truncated-metadata"],
)
def test_failed_dcp_load_leaves_the_average_as_it_was(tmp_path, damage):
    _, source = trained()
    source.save(tmp_path / "ckpt")
    damage(tmp_path / "ckpt")
    _, ema = trained()
    for _ in range(2):
        ema.update()  # other values than the checkpoint's
    before = snapshot_state(ema)
    with pytest.raises(Exception) as info:  # an Exception (DCP's own derives from BaseException)
        ema.load(tmp_path / "ckpt")
    assert isinstance(info.value, (CheckpointError, ValueError, KeyError)), type(info.value)
    assert str(tmp_path / "ckpt") in str(info.value)
    assert_unchanged(ema, before)


def test_dcp_load_of_damaged_data_is_all_or_nothing(tmp_path):
    # The data file cut after most tensors: the first ones would load, the last not. Without
    # the checksums (a directory written by dcp.save itself), the staged read must catch it.
    _, source = trained()
    source.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / CHECKSUMS).unlink()
    data = _distcp(tmp_path / "ckpt")
    data.write_bytes(data.read_bytes()[: int(data.stat().st_size * 0.9)])
    _, ema = trained()
    ema.update()
    before = snapshot_state(ema)
    with pytest.raises(CheckpointError, match="could not read"):
        ema.load(tmp_path / "ckpt")
    assert_unchanged(ema, before)


def _flip_in_item(path: pathlib.Path, fqn: str) -> None:
    """Flip one bit in the stored bytes of ``fqn`` (located through the checksum table)."""
    record = json.loads((path / CHECKSUMS).read_text())
    (_, _, file, offset, length, _) = next(r for r in record["items"] if r[0] == fqn)
    data = bytearray((path / file).read_bytes())
    data[offset + length // 2] ^= 0x08
    (path / file).write_bytes(bytes(data))


def test_checkpoint_items_carry_checksums_and_a_flipped_bit_names_the_tensor(tmp_path):
    model, source = trained()
    source.save(tmp_path / "ckpt")
    record = json.loads((tmp_path / "ckpt" / CHECKSUMS).read_text())
    meta = emakit._files.dcp.read_metadata("test", tmp_path / "ckpt")
    assert len(record["items"]) == len(meta.storage_data)  # every stored item, small entries too
    name = "averages.0.0.weight"
    _flip_in_item(tmp_path / "ckpt", name)
    _, ema = trained()
    ema.update()
    before = snapshot_state(ema)
    with pytest.raises(CheckpointError, match=rf"__0_0.distcp: tensor '{name}' does not match its checksum"):
        ema.load(tmp_path / "ckpt")
    assert_unchanged(ema, before)
    problems = emakit.verify.verify([tmp_path / "ckpt"], trust=True)
    assert len(problems) == 1 and f"tensor '{name}' does not match its checksum" in problems[0], problems
    # Without the flip it loads, and verify agrees.
    source.save(tmp_path / "good")
    ema.load(tmp_path / "good")
    assert emakit.verify.verify([tmp_path / "good"], trust=True) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["items"].pop(), "list different items"),
        (lambda r: r.__setitem__("format", "other"), "is malformed"),
        (lambda r: r["items"][0].__setitem__(5, "00000000"), "does not match its checksum"),
    ],
)
def test_a_damaged_checksum_file_refuses_the_load(tmp_path, edit, message):
    _, source = trained()
    source.save(tmp_path / "ckpt")
    record = json.loads((tmp_path / "ckpt" / CHECKSUMS).read_text())
    edit(record)
    (tmp_path / "ckpt" / CHECKSUMS).write_text(json.dumps(record))
    _, ema = trained()
    before = snapshot_state(ema)
    with pytest.raises(CheckpointError, match=message):
        ema.load(tmp_path / "ckpt")
    assert_unchanged(ema, before)


def _sharded_snapshot(directory: pathlib.Path, ema_t: float = 3.0, container: str = "dcp") -> pathlib.Path:
    """A DCP (or ``.shards``) snapshot written in one process, as a sharded run writes it (plain tensors)."""
    torch.manual_seed(1)
    weight = torch.randn(3, 2)
    return snapshots.write_sharded_snapshot(
        directory,
        t=ema_t,
        num_updates=3,
        sigma_rels=[0.1],
        gammas=[emakit.schedules.sigma_rel_to_gamma(0.1)],
        averages=[{"w": weight}],
        copies={},
        static={},
        model_shapes={"w": (3, 2)},
        container=container,
        model_dtypes={"w": torch.float32},
        dtype=torch.float32,
        keys=["w"],
        aliases={},
    )


class _Payload:
    """Unpickling this touches a marker file: proof that a pickle ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_sharded_snapshot_needs_trust_and_never_runs_a_payload_without_it(tmp_path):
    path = _sharded_snapshot(tmp_path / "phema")
    marker = tmp_path / "payload-ran"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    infos = posthoc.list_snapshots(tmp_path / "phema")  # reads emakit.json only
    assert infos[0].sharded
    with pytest.raises(snapshots.SnapshotError, match="pickle.*trust=True"):
        posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.1, progress=False)
    with pytest.raises(snapshots.SnapshotError, match="trust=True"):
        snapshots.export(path, tmp_path / "out")
    with pytest.raises(snapshots.SnapshotError, match="trust=True"):
        snapshots.open_tensors(infos[0], ["avg.0/w"])
    assert not marker.exists()


def test_trusted_sharded_snapshot_reads_and_a_damaged_one_names_the_file(tmp_path):
    path = _sharded_snapshot(tmp_path / "phema")
    sd = posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.1, progress=False, trust=True)
    torch.manual_seed(1)
    assert torch.equal(sd["w"], torch.randn(3, 2))
    _truncate(path)
    with pytest.raises(snapshots.SnapshotError, match=str(path)):
        posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.1, progress=False, trust=True)
    (path / ".metadata").write_bytes(b"\x80garbage")
    with pytest.raises(snapshots.SnapshotError, match=str(path)):
        posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.1, progress=False, trust=True)


# --------------------------------------------------------------------------- writers


def test_two_writers_of_one_snapshot_one_wins_and_its_data_stays(tmp_path):
    from emakit._files import atomic as _atomic

    final = tmp_path / "phema-000000000000001.safetensors"
    calls = []

    def writer(data: bytes):
        def write(tmp):
            calls.append(data)
            if len(calls) == 1:  # while the first writer is busy, a second one writes the same name
                _atomic.write_then_rename([(final, writer(b"second"))], replace=False)
            tmp.write_bytes(data)

        return write

    with pytest.raises(FileExistsError, match="already exists"):
        _atomic.write_then_rename([(final, writer(b"first"))], replace=False)
    assert final.read_bytes() == b"second"  # the winner's data
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary left


def test_two_dcp_saves_to_one_path_never_replace_each_other(tmp_path):
    from emakit._files import dcp as _dcp

    final = tmp_path / "ckpt"

    def other_writer_finishes_first(tmp):
        final.mkdir()
        (final / "winner").write_text("the other save")

    with pytest.raises(FileExistsError, match="another writer"):
        _dcp.save_atomic("save", {"x": torch.ones(3)}, final, extra=other_writer_finishes_first)
    assert (final / "winner").read_text() == "the other save"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the loser left nothing


def test_temporary_names_are_unique_and_never_listed(tmp_path):
    from emakit._files import atomic as _atomic

    final = tmp_path / "phema-000000000000001.safetensors"
    names = {_atomic.temporary_name(final).name for _ in range(100)}
    assert len(names) == 100
    assert all(_atomic.is_temporary(n) for n in names)
    for n in list(names)[:3]:
        (tmp_path / n).write_bytes(b"partial")
    assert snapshots.snapshot_paths(tmp_path) == []


def test_a_writer_killed_mid_write_leaves_nothing_the_next_write_keeps(tmp_path):
    """The writing library's own temporary files (safetensors writes through one) go with the writer's."""
    import subprocess
    import sys

    child = (
        "import os, pathlib, sys\n"
        "from emakit._files.atomic import write_then_rename\n"
        "def write(tmp):\n"
        "    (tmp.parent / '.tmpAbC123').write_bytes(b'half')  # what safetensors' writer leaves\n"
        "    tmp.write_bytes(b'half')\n"
        "    os._exit(9)  # killed mid-write: no cleanup runs\n"
        "write_then_rename([(pathlib.Path(sys.argv[1]) / 'report.json', write)])\n"
    )
    assert subprocess.run([sys.executable, "-c", child, str(tmp_path)]).returncode == 9
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".report.json.")  # hidden: nothing listed
    model, _ = trained()
    pema = emakit.PowerEMA(model)
    pema.update()
    written = pema.save_snapshot(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [written.name]


def test_stale_temporaries_of_dead_writers_are_reclaimed(tmp_path):
    import subprocess
    import sys

    from emakit._files import atomic as _atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".phema-1.safetensors.{_atomic._HOST}.{dead_pid}.deadbeef.tmp"
        running = tmp_path / f".phema-2.safetensors.{_atomic._HOST}.{live.pid}.deadbeef.tmp"
        stale_dir = tmp_path / f".ckpt.{_atomic._HOST}.{dead_pid}.0badcafe.tmp"
        other_host = tmp_path / f".phema-3.safetensors.elsewhere.{dead_pid}.deadbeef.tmp"
        for f in (stale, running, other_host):
            f.write_bytes(b"x" * 100)
        stale_dir.mkdir()
        (stale_dir / "__0_0.distcp").write_bytes(b"x")
        model, _ = trained()
        pema = emakit.PowerEMA(model)
        pema.update()
        pema.save_snapshot(tmp_path)  # the next write to the folder reclaims what dead writers left
        assert not stale.exists() and not stale_dir.exists()
        assert running.exists() and other_host.exists()  # a live writer's, another host's: kept
    finally:
        live.kill()
        live.wait()


def test_files_respect_the_umask(tmp_path):
    import os

    model, ema = trained()
    pema = emakit.PowerEMA(model)
    pema.update()
    old = os.umask(0o027)
    try:
        snap = pema.save_snapshot(tmp_path / "phema")
        ckpt = ema.save(tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert oct(snap.stat().st_mode & 0o777) == oct(0o640)
    assert all(oct(f.stat().st_mode & 0o777) == oct(0o640) for f in ckpt.iterdir())


# --------------------------------------------------------------------------- snapshot integrity


def _snapshot(tmp_path):
    model, _ = trained()
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # the profiles differ
        pema.update()
    return pema.save_snapshot(tmp_path / "phema"), pema


def _edit_header(path, edit):
    """Rewrite a safetensors header (JSON) in place, keeping its length (padded with spaces)."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "the edit made the header longer"
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])


def test_a_flipped_data_bit_names_the_file_and_the_tensor(tmp_path):
    import json
    import struct

    path, _ = _snapshot(tmp_path)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start, _ = header["avg.1/2.weight"]["data_offsets"]
    raw[8 + n + start + 2] ^= 0x40  # an exponent bit of one element
    path.write_bytes(bytes(raw))
    with pytest.raises(snapshots.SnapshotError, match=r"phema-.*tensor 'avg.1/2.weight' does not match its checksum"):
        posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.05, progress=False)


def test_swapped_data_offsets_are_caught(tmp_path):
    path, _ = _snapshot(tmp_path)

    def swap(header):
        a, b = header["avg.0/0.weight"], header["avg.1/0.weight"]
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]

    _edit_header(path, swap)
    with pytest.raises(snapshots.SnapshotError, match="does not match its checksum"):
        posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.05, progress=False)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(t="7.0"), "the header says t=7, the file name t=4"),
        (lambda m: m.update(t="nan"), "inconsistent"),
        (lambda m: m.update(gammas="[6.9, 16.9]"), "does not belong to its sigma_rel"),
        (lambda m: m.update(sigma_rels="[0.05, 0.5]"), "not a power profile"),
        (lambda m: m.update(dtype="int32"), "not a floating dtype"),
        (lambda m: m.update(checksums="{}"), "checksums do not cover"),
    ],
    ids=["t-vs-name", "t-nan", "gammas", "sigma-rel", "dtype", "checksums"],
)
def test_header_fields_are_validated(tmp_path, edit, message):
    path, _ = _snapshot(tmp_path)
    _edit_header(path, lambda header: edit(header["__metadata__"]))
    with pytest.raises(snapshots.SnapshotError, match=message):
        snapshots.read_info(path)


def test_a_stored_dtype_that_contradicts_the_header_is_refused(tmp_path):
    path, _ = _snapshot(tmp_path)
    _edit_header(path, lambda header: header["avg.0/0.weight"].update(dtype="I32"))
    with pytest.raises(snapshots.SnapshotError, match="stored as I32"):
        snapshots.read_info(path)


def test_nan_in_snapshot_data_is_an_error_not_a_nan_output(tmp_path):
    path, pema = _snapshot(tmp_path)
    sd = pema.state_dict()
    averages = [{k: v.clone() for k, v in p.items()} for p in sd["averages"]]
    averages[0]["0.weight"][0, 0] = float("nan")
    info = snapshots.read_info(path)
    snapshots.write_snapshot(
        tmp_path / "nan",
        t=info.t,
        num_updates=info.num_updates,
        sigma_rels=list(info.sigma_rels),
        gammas=list(info.gammas),
        averages=averages,
        copies=dict(sd["copies"]),
        static={},
        model_dtypes=dict(info.model_dtypes),
        dtype=info.dtype,
        keys=list(info.keys),
        aliases={},
    )
    with pytest.raises(snapshots.SnapshotError, match=r"'avg.0/0.weight' holds NaN or Inf"):
        posthoc.reconstruct(tmp_path / "nan", sigma_rel=0.05, progress=False)


# --------------------------------------------------------------------------- non-finite weights


def test_nan_weights_never_enter_an_average_silently(tmp_path):
    model, ema = trained()
    good = {k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}
    saved = {
        **ema.state_dict(),
        "averages": [good],
        "copies": {k: v.clone() for k, v in ema.state_dict()["copies"].items()},
    }
    ema.update()  # update 4: finite
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ema.update()  # update 5: the NaN enters; no host synchronisation here, no error yet
    for use in (
        ema.state_dict,
        ema.averaged_state_dict,
        ema.averaged_module,
        lambda: ema.save(tmp_path / "ckpt"),
        lambda: ema.swapped().__enter__(),
        lambda: ema.copy_to(model),
    ):
        with pytest.raises(emakit.NonFiniteError, match=r"'0.weight' holds NaN or Inf.*by update 5"):
            use()
    assert not (tmp_path / "ckpt").exists()
    ema.load_state_dict(saved)  # loading a good state recovers
    assert ema.state_dict()["t"] == 3


def test_nonfinite_error_brackets_the_update():
    model, ema = trained()
    ema.state_dict()  # checked at update 3: finite
    ema.update()
    with torch.no_grad():
        model[2].bias.fill_(float("inf"))
    ema.update()
    ema.update()
    with pytest.raises(emakit.NonFiniteError, match=r"'2.bias'.*after update 3 .*by update 6"):
        ema.averaged_state_dict()


@pytest.mark.parametrize("cls", [emakit.EMA, emakit.PowerEMA])
def test_locate_nonfinite_names_the_exact_update(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(torch.bfloat16)  # fp32 averages: 2 groups
    model.register_buffer("scale", torch.ones(3, dtype=torch.float64))
    kwargs = {"decay": 0.9} if cls is emakit.EMA else {"sigma_rels": (0.1,)}
    ema = cls(model, locate_nonfinite=True, **kwargs)
    for step in range(1, 10):
        if step == 4:
            with torch.no_grad():
                model.scale[1] = float("nan")  # enters the float64 group at update 4
        if step == 7:
            with torch.no_grad():
                model[1].bias.fill_(float("inf"))  # the fp32 group later: the first one is named
        ema.update(t=2.0 * step)
    with pytest.raises(
        emakit.NonFiniteError, match=r"holds NaN or Inf: a non-finite weight entered it at update 4 \(t=8;"
    ):
        ema.averaged_state_dict()
    # Recovered by a load: the mark goes with the non-finite average.
    with torch.no_grad():
        model.scale[1] = 1.0
        model[1].bias.zero_()
    fresh = cls(model, locate_nonfinite=True, **kwargs)
    fresh.update()
    ema.load_state_dict(fresh.state_dict())
    ema.averaged_state_dict()
    ema.update()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ema.update()
    with pytest.raises(emakit.NonFiniteError, match=r"at update 3 \("):
        ema.averaged_state_dict()


def test_nan_snapshot_is_refused_at_save(tmp_path):
    model, _ = trained()
    pema = emakit.PowerEMA(model)
    pema.update()
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    pema.update()
    with pytest.raises(emakit.NonFiniteError):
        pema.save_snapshot(tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_full_disk_while_writing_a_snapshot_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = trained()
    pema = emakit.PowerEMA(model)
    pema.update()

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull }) os error 28")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=r"no space left on device while writing .*phema-000000000000001"):
        pema.save_snapshot(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temporary left


def test_the_file_size_limit_while_writing_a_snapshot_says_so(tmp_path):
    import subprocess
    import sys

    code = (
        "import resource, signal, sys, torch, emakit\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "m = torch.nn.Linear(512, 512); p = emakit.PowerEMA(m); p.update()\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n    p.save_snapshot(sys.argv[1])\nexcept OSError as e:\n    print('OSError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert "file-size limit" in out.stdout, out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []
