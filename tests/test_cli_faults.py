"""The command line under faults: bad arguments and damaged inputs give one line and exit status 2.

Also ``--trust`` for sharded (DCP) snapshots, write failures (full disk, file-size limit)
and ``emakit verify``. Sharded snapshots are written in one process, without a process
group, by converting single-file ones with :func:`emakit.snapshots.write_sharded_snapshot`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import emakit
from emakit import cli, posthoc, snapshots, verify

safetensors_torch = pytest.importorskip("safetensors.torch", reason="the CLI needs the safetensors extra")
from safetensors import SafetensorError, safe_open  # noqa: E402

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads anything: permission tests cannot fail


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, fragment: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got:\n{err}"
    assert fragment in err, err


def to_sharded(source: Path, directory: Path, container: str = "dcp") -> None:
    """Write every single-file snapshot of ``source`` again as a ``phema-<t>.dcp`` (or ``.shards``) folder."""
    for info in posthoc.list_snapshots(source):
        reader = snapshots.open_tensors(info)
        try:
            averages = [{n: reader.get(f"avg.{j}/{n}") for n in info.averaged} for j in range(info.num_profiles)]
            copies = {n: reader.get(f"copy/{n}") for n in info.copied}
            static = {n: reader.get(f"static/{n}") for n in info.static}
        finally:
            reader.close()
        snapshots.write_sharded_snapshot(
            directory,
            averages=averages,
            copies=copies,
            static=static,
            model_shapes=dict(info.shapes),
            container=container,
            t=info.t,
            num_updates=info.num_updates,
            sigma_rels=list(info.sigma_rels),
            gammas=list(info.gammas),
            model_dtypes=dict(info.model_dtypes),
            dtype=info.dtype,
            keys=list(info.keys),
            aliases=dict(info.aliases),
        )


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def snapdir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = make_model()
    directory = tmp_path_factory.mktemp("phema")
    pema = emakit.PowerEMA(model)
    for step in range(1, 241):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        pema.update()
        if step % 40 == 0:
            pema.save_snapshot(directory)
    return directory


@pytest.fixture(scope="module")
def dcpdir(snapdir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("phema-dcp")
    to_sharded(snapdir, directory)
    return directory


@pytest.fixture(scope="module")
def places(snapdir, dcpdir, tmp_path_factory) -> dict[str, str]:
    """Good and bad inputs, by name, for the table of bad calls."""
    root = tmp_path_factory.mktemp("places")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a directory\n")
    corrupt = root / "corrupt"
    shutil.copytree(snapdir, corrupt)
    last = sorted(corrupt.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:200])  # truncated
    model = make_model()
    ema = emakit.EMA(model, decay=0.9)
    ema.update()
    ema.save(root / "ema-dcp")
    return {
        "snap": str(snapdir),
        "dcp": str(dcpdir),
        "dcp_one": str(sorted(dcpdir.iterdir())[0]),
        "empty": str(root / "empty"),
        "file": str(root / "file.txt"),
        "corrupt": str(corrupt),
        "corrupt_file": str(last),
        "missing": str(root / "missing"),
        "missing_dcp": str(root / "phema-000000000000001.dcp"),
        "ema_dcp": str(root / "ema-dcp"),
    }


# --------------------------------------------------------------------------- F8: bad calls, one line each

R = ["reconstruct", "{snap}"]
BAD_CALLS = [
    # reconstruct: values
    (R + ["--out", "{out}"], "give at least one of --sigma-rel, --decay, --halflife"),
    (R + ["--sigma-rel", "nan", "--out", "{out}"], "--sigma-rel: 'nan' is not finite"),
    (R + ["--sigma-rel", "inf", "--out", "{out}"], "--sigma-rel: 'inf' is not finite"),
    (R + ["--sigma-rel", "0.05,-inf", "--out", "{out}"], "--sigma-rel: '-inf' is not finite"),
    (R + ["--sigma-rel", "0.01:inf:0.01", "--out", "{out}"], "'0.01:inf:0.01' is not finite"),
    (R + ["--sigma-rel", "0.01:0.2:nan", "--out", "{out}"], "'0.01:0.2:nan' is not finite"),
    (R + ["--sigma-rel", "0.001:0.28:0.000000001", "--out", "{out}"], "expands to 279,000,001 values; at most 1000"),
    (R + ["--sigma-rel", "0:1e300:1e-300", "--out", "{out}"], "expands to infinitely many values; at most 1000"),
    (R + ["--sigma-rel", "0.05,0.1x", "--out", "{out}"], "--sigma-rel: cannot read '0.1x'"),
    (R + ["--sigma-rel", "0.2:0.1:0.01", "--out", "{out}"], "ranges start:stop:step (start <= stop, step > 0)"),
    (R + ["--sigma-rel", "0.1:0.2:0", "--out", "{out}"], "cannot read '0.1:0.2:0'"),
    (R + ["--sigma-rel", "0.1:0.2", "--out", "{out}"], "cannot read '0.1:0.2'"),
    (R + ["--sigma-rel", ",", "--out", "{out}"], "--sigma-rel: no values in ','"),
    (R + ["--sigma-rel", "0.5", "--out", "{out}"], "sigma_rel must be in (0, 0.2887), got sigma_rel=0.5"),
    (R + ["--sigma-rel", "-0.05", "--out", "{out}"], "sigma_rel must be in (0, 0.2887), got sigma_rel=-0.05"),
    (R + ["--decay", "nan", "--out", "{out}"], "--decay: 'nan' is not finite"),
    (R + ["--decay", "1.5", "--out", "{out}"], "decay must be in (0, 1), got decay=1.5"),
    (R + ["--halflife=-inf", "--out", "{out}"], "--halflife: '-inf' is not finite"),
    (R + ["--halflife", "0", "--out", "{out}"], "halflife must be > 0, got halflife=0"),
    (R + ["--halflife", "1:2000:1", "--out", "{out}"], "expands to 2,000 values; at most 1000"),
    # reconstruct: other options
    (
        R + ["--sigma-rel", "0.05", "--t", "nan", "--out", "{out}"],
        "argument --t: expected a finite number > 0, got 'nan'",
    ),
    (
        R + ["--sigma-rel", "0.05", "--t", "-5", "--out", "{out}"],
        "argument --t: expected a finite number > 0, got '-5'",
    ),
    (R + ["--sigma-rel", "0.05", "--t", "10", "--out", "{out}"], "before the first snapshot"),
    (
        R + ["--sigma-rel", "0.05", "--dtype", "int8", "--out", "{out}"],
        "argument --dtype: expected 'model' or a floating",
    ),
    (R + ["--sigma-rel", "0.05"], "the following arguments are required: --out"),
    (R + ["--sigma-rel", "0.05", "--out", "{out}", "--bogus"], "unrecognized arguments: --bogus"),
    (R + ["--sigma-rel", "0.05", "--out", "{file}"], "--out {file}: is a file; expected a directory"),
    # reconstruct: inputs
    (["reconstruct", "{missing}", "--sigma-rel", "0.05", "--out", "{out}"], "{missing}: no such directory"),
    (["reconstruct", "{file}", "--sigma-rel", "0.05", "--out", "{out}"], "{file}: is a file; expected a directory"),
    (["reconstruct", "{empty}", "--sigma-rel", "0.05", "--out", "{out}"], "{empty}: no snapshots"),
    (
        ["reconstruct", "{corrupt}", "--sigma-rel", "0.05", "--out", "{out}"],
        "{corrupt_file}: not a readable safetensors",
    ),
    (
        ["reconstruct", "{dcp}", "--sigma-rel", "0.05", "--out", "{out}"],
        ".dcp is a sharded (DCP) snapshot whose .metadata is a pickle: reading it can run code; pass --trust",
    ),
    # inspect
    (["inspect"], "the following arguments are required: directory"),
    (["inspect", "{missing}"], "{missing}: no such directory"),
    (["inspect", "{file}"], "{file}: is a file; expected a directory"),
    (["inspect", "{empty}"], "{empty}: no snapshots"),
    (["inspect", "{corrupt}"], "{corrupt_file}: not a readable safetensors file (truncated or corrupted?)"),
    # export
    (["export", "{dcp}"], "the following arguments are required: --out"),
    (["export", "{missing}", "--out", "{out}"], "{missing}: no such directory"),
    (["export", "{missing_dcp}", "--out", "{out}"], "{missing_dcp}: no such directory; expected a sharded snapshot"),
    (["export", "{snap}", "--out", "{out}"], "{snap}: no sharded snapshots (phema-*.shards or .dcp) to export"),
    (["export", "{dcp}", "--out", "{out}"], "is a sharded (DCP) snapshot whose .metadata is a pickle"),
    (["export", "{dcp_one}", "--out", "{out}"], "{dcp_one} is a sharded (DCP) snapshot whose .metadata is a pickle"),
    (["export", "{dcp}", "--out", "{file}", "--trust"], "--out {file}: is a file"),
    # verify
    (["verify"], "the following arguments are required: PATH"),
    (["verify", "{missing}"], "{missing}: no such file or directory"),
    (["verify", "{snap}", "{dcp}"], "{dcp_one} is a sharded (DCP) snapshot whose .metadata is a pickle"),
    (["verify", "{ema_dcp}"], "{ema_dcp} is a DCP checkpoint (EMA.save) whose .metadata is a pickle"),
    # demo (all refused before anything runs)
    (["demo", "--threads", "-3"], "argument --threads: expected an integer >= 1, got '-3'"),
    (["demo", "--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["demo", "--threads", "two"], "argument --threads: expected an integer >= 1, got 'two'"),
    (["demo", "--seed", "-1"], "argument --seed: expected an integer in [0, 2**63), got '-1'"),
    (["demo", "--seed", "1e30"], "argument --seed: expected an integer in [0, 2**63), got '1e30'"),
    (["demo", "--out", "{file}"], "--out {file}: is a file"),
    (["demo", "--out", "{out}", "lr=nan"], "override 'lr=nan': lr must be finite, got 'nan'"),
    (["demo", "--out", "{out}", "sigma_rels=0.05,inf"], "sigma_rels must be finite, got 'inf'"),
    # no command
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_CALLS, ids=[" ".join(a[:4]) for a, _ in BAD_CALLS])
def test_bad_call_is_one_line_and_status_2(argv, fragment, places, tmp_path, capsys):
    out = tmp_path / "out"
    names = {**places, "out": str(out)}
    rc, stdout, err = run([a.format(**names) for a in argv], capsys)
    assert_one_line_error(rc, err, fragment.format(**names))
    assert err.startswith("emakit")
    assert not out.exists()  # nothing written


def test_table_covers_every_command():
    assert len(BAD_CALLS) >= 30
    commands = {argv[0] for argv, _ in BAD_CALLS}
    assert commands >= {"reconstruct", "inspect", "export", "verify", "demo"}


def test_help_states_the_cap_on_values(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["reconstruct", "--help"])
    assert e.value.code == 0
    assert f"at most {cli.MAX_VALUES} values" in capsys.readouterr().out


def test_parse_values_caps_and_checks():
    assert len(cli.parse_values("0.001:1:0.001")) == 1000  # exactly at the cap
    with pytest.raises(cli.CommandError, match="at most 1000"):
        cli.parse_values("0.001:1:0.001,2")  # one more
    with pytest.raises(cli.CommandError, match="--decay: 'nan' is not finite"):
        cli.parse_values("nan", "--decay")


@pytest.mark.skipif(AS_ROOT, reason="root ignores file permissions")
def test_unreadable_directory(snapdir, tmp_path, capsys):
    locked = tmp_path / "locked"
    shutil.copytree(snapdir, locked)
    locked.chmod(0)
    try:
        for argv in (
            ["inspect", locked],
            ["reconstruct", locked, "--sigma-rel", "0.05", "--out", tmp_path / "out"],
            ["export", locked, "--out", tmp_path / "out"],
            ["verify", locked],
        ):
            rc, _, err = run(argv, capsys)
            assert_one_line_error(rc, err, f"{locked}: permission denied")
    finally:
        locked.chmod(0o755)


def test_permission_denied_message_without_chmod(snapdir, tmp_path, capsys, monkeypatch):
    # Runs as root too: the check the chmod test exercises, with os.access answering as for a locked folder.
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != snapdir and real(path, mode))
    for argv in (["inspect", snapdir], ["verify", snapdir], ["export", snapdir, "--out", tmp_path / "out"]):
        rc, _, err = run(argv, capsys)
        assert_one_line_error(rc, err, f"{snapdir}: permission denied")


# --------------------------------------------------------------------------- write failures


def test_full_disk_is_one_line_and_leaves_nothing(snapdir, tmp_path, capsys, monkeypatch):
    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_torch, "save_file", no_space)
    out = tmp_path / "ema"
    rc, _, err = run(["reconstruct", snapdir, "--sigma-rel", "0.05,0.1", "--out", out, "-q"], capsys)
    assert_one_line_error(rc, err, f"no space left on device while writing {out / 'ema-sigma_rel-0.05.safetensors'}")
    assert not out.exists()  # created for this run, left empty: removed

    out.mkdir()
    rc, _, err = run(["reconstruct", snapdir, "--sigma-rel", "0.05", "--out", out, "-q"], capsys)
    assert_one_line_error(rc, err, "no space left on device")
    assert list(out.iterdir()) == []  # no partial file, no temporary file


def test_export_write_failure_is_one_line(dcpdir, tmp_path, capsys, monkeypatch):
    def no_space(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_torch, "save_file", no_space)
    out = tmp_path / "archive"
    first = sorted(dcpdir.iterdir())[0]
    rc, _, err = run(["export", dcpdir, "--out", out, "--trust"], capsys)
    assert_one_line_error(
        rc, err, f"no space left on device while writing {out / first.name.replace('.dcp', '.safetensors')}"
    )
    assert not list(out.glob("phema-*"))


def test_file_size_limit_in_a_real_process(snapdir, tmp_path):
    resource = pytest.importorskip("resource")
    signal = pytest.importorskip("signal")
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no SIGXFSZ on this platform")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))  # smaller than one output file

    out = tmp_path / "ema"
    proc = subprocess.run(
        [sys.executable, "-m", "emakit", "reconstruct", str(snapdir), "--sigma-rel", "0.05", "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=600,  # a hang guard (a loaded machine is slow, not stuck)
    )
    assert_one_line_error(proc.returncode, proc.stderr, "file too large while writing")
    assert str(out / "ema-sigma_rel-0.05.safetensors") in proc.stderr
    assert not out.exists() or not any(out.iterdir())  # no partial file under the final name (nor a temporary one)


# --------------------------------------------------------------------------- F3: damaged sharded snapshots


def _truncate_data(snapshot: Path) -> None:
    data = next(snapshot.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])


def _remove_data(snapshot: Path) -> None:
    next(snapshot.glob("*.distcp")).unlink()


def _garbage_metadata(snapshot: Path) -> None:
    (snapshot / ".metadata").write_bytes(b"garbage\n")


def _flip_metadata_byte(snapshot: Path) -> None:
    meta = bytearray((snapshot / ".metadata").read_bytes())
    meta[0] ^= 0xFF  # the pickle's protocol opcode
    (snapshot / ".metadata").write_bytes(bytes(meta))


DAMAGES = [_truncate_data, _remove_data, _garbage_metadata, _flip_metadata_byte]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__.strip("_") for d in DAMAGES])
def test_damaged_sharded_snapshot_is_one_line(damage, dcpdir, tmp_path, capsys):
    directory = tmp_path / "phema"
    shutil.copytree(dcpdir, directory)
    victim = sorted(directory.iterdir())[-1]  # the latest: every reconstruction reads it
    damage(victim)
    # Outside pytest, DCP's warnings (with tracebacks) reach stderr through the root logger: show them here too.
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        out = tmp_path / "ema"
        rc, _, err = run(["reconstruct", directory, "--sigma-rel", "0.05", "--out", out, "-q", "--trust"], capsys)
        assert_one_line_error(rc, err, str(victim))
        assert not out.exists()
        rc, _, err = run(["export", directory, "--out", tmp_path / "archive", "-q", "--trust"], capsys)
        assert_one_line_error(rc, err, str(victim))
        rc, stdout, err = run(["verify", directory, "--trust"], capsys)
        assert rc == 1 and err == "" and f"{victim}: " in stdout, (stdout, err)
    finally:
        logging.getLogger().removeHandler(handler)


def test_damaged_sharded_snapshot_in_a_real_process(dcpdir, tmp_path):
    directory = tmp_path / "phema"
    shutil.copytree(dcpdir, directory)
    victim = sorted(directory.iterdir())[-1]
    _garbage_metadata(victim)  # DCP logs a warning with a traceback for this one
    proc = subprocess.run(
        [sys.executable, "-m", "emakit", "reconstruct", str(directory), "--sigma-rel", "0.05", "--out", str(tmp_path)]
        + ["-q", "--trust"],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard (a loaded machine is slow, not stuck)
    )
    assert_one_line_error(proc.returncode, proc.stderr, str(victim))


# --------------------------------------------------------------------------- --trust


def test_trusted_sharded_snapshots_reconstruct_and_export(snapdir, dcpdir, tmp_path, capsys):
    rc, out, _ = run(["inspect", dcpdir], capsys)  # reads emakit.json only: no trust needed
    assert rc == 0 and "6 snapshots" in out
    rc, _, _ = run(["reconstruct", dcpdir, "--sigma-rel", "0.05", "--out", tmp_path / "ema", "-q", "--trust"], capsys)
    assert rc == 0
    got = safetensors_torch.load_file(tmp_path / "ema" / "ema-sigma_rel-0.05.safetensors")
    want = posthoc.reconstruct(snapdir, sigma_rel=0.05, progress=False)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    rc, out, _ = run(["export", dcpdir, "--out", tmp_path / "archive", "--trust"], capsys)
    assert rc == 0 and out.count("->") == 6
    for path in sorted((tmp_path / "archive").iterdir()):
        a, b = safetensors_torch.load_file(path), safetensors_torch.load_file(snapdir / path.name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_trust_is_passed_only_where_the_library_takes_it():
    def new(path, *, trust=False):
        pass

    def old(path):
        pass

    assert cli._trust(new, True) == {"trust": True}
    assert cli._trust(old, True) == {}


# --------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = make_model()
    ema = emakit.EMA(model, decay=0.9)
    pema = emakit.PowerEMA(model)
    for _ in range(3):
        ema.update()
        pema.update()
    torch.save(ema.state_dict(), root / "ema.pt")
    torch.save(pema.state_dict(), root / "pema.pt")
    ema.save(root / "ema-dcp")
    return {"ema": root / "ema.pt", "pema": root / "pema.pt", "ema_dcp": root / "ema-dcp"}


def _tensor_offset(path: Path, key: str) -> int:
    """Where tensor ``key``'s bytes start in a safetensors file."""
    length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + length])
    return 8 + length + header[key]["data_offsets"][0]


def test_verify_accepts_good_inputs(snapdir, dcpdir, checkpoints, tmp_path, capsys):
    assert cli.main(["reconstruct", str(snapdir), "--sigma-rel", "0.05", "--out", str(tmp_path), "-q"]) == 0
    good = [snapdir, sorted(snapdir.iterdir())[0], dcpdir, sorted(dcpdir.iterdir())[0], *checkpoints.values()]
    good.append(tmp_path / "ema-sigma_rel-0.05.safetensors")
    assert verify.verify(good, trust=True) == []
    capsys.readouterr()
    rc, out, err = run(["verify", *good, "--trust"], capsys)
    assert (rc, out, err) == (0, f"{len(good)} paths checked: all good\n", "")


def test_verify_needs_trust_for_dcp_folders(dcpdir, checkpoints):
    with pytest.raises(snapshots.SnapshotError, match="pickle"):
        verify.verify([dcpdir])
    with pytest.raises(snapshots.SnapshotError, match=r"DCP checkpoint \(EMA.save\)"):
        verify.verify([checkpoints["ema_dcp"]])
    assert [kind for _, kind in verify.needs_trust([dcpdir, checkpoints["ema"]])] == ["sharded (DCP) snapshot"] * 6


def test_verify_finds_damaged_snapshots(snapdir, tmp_path, capsys):
    bad = tmp_path / "phema"
    shutil.copytree(snapdir, bad)
    files = sorted(bad.iterdir())
    # 1. Flipped bits in the data region: the exponent of one element becomes all ones (inf or NaN).
    offset = _tensor_offset(files[0], "avg.0/0.weight")
    data = bytearray(files[0].read_bytes())
    data[offset + 3] |= 0x7F
    data[offset + 2] |= 0x80
    files[0].write_bytes(bytes(data))

    # 2, 3. NaN written into a snapshot: a new file with the same metadata (its checksums, where the
    # format has them, no longer match), and one without checksums (as older files are).
    def write_nan(path: Path, key: str, keep_checksums: bool) -> None:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors[key][0] = float("nan")
        if not keep_checksums:
            meta.pop("checksums", None)
        safetensors_torch.save_file(tensors, str(path), metadata=meta)

    write_nan(files[1], "avg.1/2.bias", keep_checksums=True)
    write_nan(files[2], "avg.0/0.bias", keep_checksums=False)
    # 4. A truncated file.
    files[3].write_bytes(files[3].read_bytes()[:-10])

    problems = verify.verify([bad])
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{files[0]}: ") and "'avg.0/0.weight'" in problems[0]  # checksum or NaN/inf
    assert problems[1].startswith(f"{files[1]}: ") and "'avg.1/2.bias'" in problems[1]
    assert problems[2] == f"{files[2]}: 1 tensor(s) hold NaN or inf: 'avg.0/0.bias'"
    assert problems[3].startswith(f"{files[3]}: not a readable safetensors file")
    rc, out, err = run(["verify", bad], capsys)
    assert rc == 1 and err == ""
    assert out.splitlines() == [*problems, "1 path checked: 4 problems"]


def test_verify_finds_other_problems(snapdir, checkpoints, tmp_path):
    model = make_model()
    (tmp_path / "notes.txt").write_text("hello\n")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    state = torch.load(checkpoints["pema"], weights_only=True)
    state["averages"][1]["0.weight"] = state["averages"][1]["0.weight"].clone().fill_(float("inf"))
    state["averages"][0]["0.bias"] = torch.zeros(8, dtype=torch.int64)
    state["t"] = -1.0
    state["config"]["gammas"] = [1.0]
    torch.save(state, tmp_path / "pema-bad.pt")
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"  # snapshots of two different models in one directory
    shutil.copytree(snapdir, mixed)
    other = emakit.PowerEMA(nn.Linear(3, 3))
    other.update(t=1000)
    other.save_snapshot(mixed)

    def problems(path):
        return verify.verify([tmp_path / path if isinstance(path, str) else path])

    assert problems("notes.txt") == [
        f"{tmp_path / 'notes.txt'}: not an emakit snapshot or checkpoint (neither a safetensors file nor a torch.save file)"
    ]
    assert "not an emakit checkpoint: format=None" in problems("model.pt")[0]
    assert "not an emakit file: a safetensors file with format=None" in problems("plain.safetensors")[0]
    assert problems("empty") == [
        f"{tmp_path / 'empty'}: no snapshots (phema-*.safetensors files, phema-*.shards or .dcp directories) in this directory"
    ]
    found = problems("pema-bad.pt")
    assert any("t must be a finite number >= 0, got t=-1.0" in p for p in found), found
    assert any("config gammas=[1.0] do not match the 2 profiles" in p for p in found), found
    assert any("averages must be floating, got \"averages[0]['0.bias'] (int64)\"" in p for p in found), found
    assert any("1 tensor(s) hold NaN or inf: \"averages[1]['0.weight']\"" in p for p in found), found
    assert all(p.startswith(str(tmp_path / "pema-bad.pt") + ": ") for p in found)
    assert "holds other tensors than" in problems(mixed)[0]


def test_verify_finds_a_damaged_dcp_checkpoint(checkpoints, tmp_path):
    bad = tmp_path / "ema-dcp"
    shutil.copytree(checkpoints["ema_dcp"], bad)
    _truncate_data(bad)
    found = verify.verify([bad], trust=True)
    assert len(found) == 1 and found[0].startswith(f"{bad}/__0_0.distcp: truncated: tensor "), found
