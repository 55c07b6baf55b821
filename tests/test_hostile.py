"""Hostile and unusual files: bounded reads, one-line errors, the right update named (issue 21).

The cases are built by ``benchmarks/bench_faults.py`` (its hostile-file campaign runs every
command on each in a fresh process, with its time and peak memory): special files (FIFO,
``/dev/zero``, 8 GiB sparse files) where an index, a prune journal or a snapshot belongs,
JSON nested 100000 deep, and headers that claim terabyte tensors. Here every command runs
on every case in this process (the FIFO cases in a child process with a timeout, so a
regression fails instead of hanging), and the library-level guarantees are checked directly.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import emakit
from emakit import cli, planning, posthoc, snapshots, verify
from emakit._planning.fit import _worst

pytest.importorskip("safetensors.torch", reason="snapshots need the safetensors extra")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_faults  # noqa: E402

FIFO_CASES = ("index is a FIFO", "prune journal is a FIFO", "snapshot file is a FIFO")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    return bench_faults.hostile_cases(tmp_path_factory.mktemp("hostile"))


def _calls(fifo: bool) -> list[tuple[str, str]]:
    names = [n for n in bench_faults.HOSTILE_NAMES if (n in FIFO_CASES) == fifo]
    return [(n, c) for n in names for c in bench_faults.COMMANDS if "journal" not in n or c == "prune"]


@pytest.mark.parametrize(("case", "command"), _calls(fifo=False), ids=lambda x: x.replace(" ", "-"))
def test_every_command_gives_one_line_on_a_hostile_file(case, command, cases, tmp_path, capsys):
    argv = bench_faults.COMMANDS[command](str(cases[case]), str(tmp_path / "out"))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    want = bench_faults._expected(case, command)
    assert rc == want, (out, err)
    if want == 2:
        assert err.count("\n") == 1 and "Traceback" not in err and str(cases[case].name) in err, err
    else:  # verify: the problem on one line of stdout, then the summary
        assert not err and out.count("\n") == 2 and str(cases[case].name) in out, out


@pytest.mark.parametrize(("case", "command"), [c for c in _calls(fifo=True) if c[1] in ("inspect", "verify", "prune")])
def test_a_fifo_never_blocks_a_command(case, command, cases, tmp_path):
    argv = bench_faults.COMMANDS[command](str(cases[case]), str(tmp_path / "out"))
    rc, lines, seconds, _ = bench_faults.run_cli(argv, timeout=60)
    want = bench_faults._expected(case, command)
    assert rc == want and len(lines) == (want == 2) and not any("Traceback" in line for line in lines), lines
    assert seconds < 30


def test_hostile_json_is_a_snapshot_error_naming_the_file(cases):
    for case in ("index is a FIFO", "index is /dev/zero", "index is an 8 GiB sparse file", "index nested 100000 deep"):
        last = snapshots.snapshot_paths(cases[case])[-1]
        with pytest.raises(snapshots.SnapshotError, match=str(last)):
            snapshots.read_info(last)
    with pytest.raises(snapshots.SnapshotError, match="not a regular file"):
        snapshots.read_info(snapshots.snapshot_paths(cases["index is a FIFO"])[-1])
    with pytest.raises(snapshots.SnapshotError, match="8589934592 bytes, more than the"):
        snapshots.read_info(snapshots.snapshot_paths(cases["index is an 8 GiB sparse file"])[-1])
    with pytest.raises(snapshots.SnapshotError, match="nested too deeply"):
        snapshots.read_info(snapshots.snapshot_paths(cases["index nested 100000 deep"])[-1])
    with pytest.raises(snapshots.SnapshotError, match="not a readable prune journal.*not a regular file"):
        planning.prune(cases["prune journal is a FIFO"], sigma_rel=(0.05, 0.1))
    assert verify.verify([cases["snapshot file is /dev/zero"]]) == [
        f"{cases['snapshot file is /dev/zero']}: not a regular file (a FIFO, device or socket?); nothing read"
    ]


def test_claimed_shapes_must_be_backed_by_bytes(cases):
    with pytest.raises(
        snapshots.SnapshotError,
        match=r"rank-00000.safetensors: not a readable part: the index says it holds \d+ bytes of tensors, it has",
    ):
        posthoc.list_snapshots(cases["index claims a 16 TiB tensor"])
    with pytest.raises(snapshots.SnapshotError, match=r"shape \[2147483648, 2147483648\], more than its"):
        posthoc.list_snapshots(cases["compact header claims [2**31, 2**31]"])


def test_a_dcp_index_must_not_claim_more_than_its_directory_holds(tmp_path):
    fields = dict(
        t=1.0, num_updates=1, sigma_rels=[0.1], gammas=[emakit.schedules.sigma_rel_to_gamma(0.1)],
        averages=[{"w": torch.ones(4)}], copies={}, static={}, model_shapes={"w": (4,)},
        model_dtypes={"w": torch.float32}, dtype=torch.float32, keys=["w"], aliases={},
    )  # fmt: skip
    path = snapshots.write_sharded_snapshot(tmp_path, container="dcp", **fields)
    index = json.loads((path / snapshots._DCP_INFO).read_text())
    index["tensors"] = json.dumps({"avg.0/w": ["float32", [2**42], [2**42]]})
    (path / snapshots._DCP_INFO).write_text(json.dumps(index))
    with pytest.raises(snapshots.SnapshotError, match="its index claims 17592186044416 bytes of tensors"):
        snapshots.read_info(path)


def test_verify_never_reads_a_header_length_past_safetensors_cap(tmp_path):
    import tracemalloc

    path = tmp_path / "phema-000000000000001.safetensors"
    length = 200_000_000  # twice safetensors' cap, within the (sparse) file: a naive reader allocates it
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little") + b"{")
        f.truncate(length + 16)
    tracemalloc.start()
    try:
        (problem,) = verify.verify([path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problem.startswith(str(path)) and "not a readable safetensors file" in problem
    assert peak < 50 << 20


def test_the_json_cap_is_stated_and_can_be_raised(cases, tmp_path, monkeypatch):
    directory, last = bench_faults._sharded(cases["index is a FIFO"].parent, "capped")
    index_bytes = (last / snapshots._DCP_INFO).stat().st_size
    try:
        snapshots.set_read_limits(json_bytes=index_bytes - 1)
        with pytest.raises(snapshots.SnapshotError, match=f"{index_bytes} bytes, more than the {index_bytes - 1}"):
            snapshots.read_info(last)
        snapshots.set_read_limits(json_bytes=index_bytes)
        assert snapshots.read_info(last).t == 60.0
    finally:
        snapshots.set_read_limits()
    monkeypatch.setenv("EMAKIT_MAX_JSON_BYTES", str(index_bytes - 1))
    with pytest.raises(snapshots.SnapshotError, match="EMAKIT_MAX_JSON_BYTES"):
        snapshots.read_info(last)
    monkeypatch.delenv("EMAKIT_MAX_JSON_BYTES")
    assert snapshots.read_info(last).t == 60.0
    with pytest.raises(ValueError, match="json_bytes must be an integer > 0, got json_bytes=0"):
        snapshots.set_read_limits(json_bytes=0)


# --------------------------------------------------------------------------- NaN in copied / frozen tensors


def _frozen_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    return model


def test_save_snapshot_refuses_nan_in_a_frozen_tensor(tmp_path):
    model = _frozen_model()
    pema = emakit.PowerEMA(model)
    pema.update()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    pema.update()
    with pytest.raises(emakit.NonFiniteError, match=r"frozen \(static\) tensor '0.weight' holds NaN or Inf"):
        pema.save_snapshot(tmp_path)
    assert not list(tmp_path.iterdir())
    pema.save_snapshot(tmp_path, static=False)  # not stored: nothing to refuse


def test_reconstruct_refuses_nan_in_a_stored_frozen_tensor(tmp_path):
    pema = emakit.PowerEMA(_frozen_model())
    pema.update()
    info = snapshots.read_info(pema.save_snapshot(tmp_path))
    reader = snapshots.open_tensors(info)
    static = {n: reader.get(f"static/{n}").clone() for n in info.static}
    averages = [{n: reader.get(f"avg.{j}/{n}") for n in info.averaged} for j in range(info.num_profiles)]
    reader.close()
    static["0.weight"][0, 0] = float("inf")
    fields = dict(
        t=2.0, num_updates=2, sigma_rels=list(info.sigma_rels), gammas=list(info.gammas), averages=averages,
        copies={}, static=static, model_dtypes=dict(info.model_dtypes), dtype=info.dtype, keys=list(info.keys),
        aliases=dict(info.aliases),
    )  # fmt: skip
    path = snapshots.write_snapshot(tmp_path, **fields)  # the writer itself does not check (a hostile file)
    with pytest.raises(snapshots.SnapshotError, match=f"{path}: tensor 'static/0.weight' holds NaN or Inf"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.1, progress=False)


# --------------------------------------------------------------------------- locate_nonfinite names the update


def _located(model: nn.Module, poison, averager=emakit.EMA, **kwargs) -> int | None:
    ema = averager(model, locate_nonfinite=True, **kwargs)
    for update in range(1, 9):
        with torch.no_grad():
            poison(model, update)
        ema.update()
    try:
        ema.averaged_state_dict(**({"sigma_rel": 0.05} if averager is emakit.PowerEMA else {}))
    except emakit.NonFiniteError as e:
        return int(str(e).split("at update ")[1].split(" ")[0])
    return None


def test_finite_weights_that_overflow_a_sum_do_not_move_the_mark():
    def poison(model, update):
        if update == 1:
            model.weight.fill_(1e33)  # finite, but 1e6 of them sum past fp32's range
        if update == 7:
            model.weight[3, 3] = float("nan")

    assert _located(nn.Linear(1000, 1000), poison, decay=0.9) == 7


def test_an_fp16_average_of_many_ones_is_finite_until_the_nan():
    def poison(model, update):
        if update == 4:
            model.weight[5] = float("nan")

    assert _located(nn.LayerNorm(70000).half(), poison, decay=0.9, dtype=torch.float16) == 4


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_nan_in_any_tensor_of_a_checked_chunk_names_the_update(which):
    # Three large tensors back to back in one chunk: checked as one span, each of them covered.
    def poison(model, update):
        if update == 6:
            model[which].weight.view(-1)[which * 1000] = float("nan")

    model = nn.Sequential(*[nn.Linear(300, 250, bias=False) for _ in range(3)])
    assert _located(model, poison, emakit.PowerEMA, sigma_rels=(0.05, 0.1)) == 6


@pytest.mark.parametrize("path", ["chunked profiles", "flat region", "small tensors", "staged bf16"])
def test_every_update_path_names_the_update(path):
    def poison(model, update):
        if update == 5:
            next(iter(model.parameters())).view(-1)[-1] = float("-inf")

    if path == "small tensors":
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
        assert _located(model, poison, decay=0.9) == 5
    elif path == "flat region":
        model = nn.Sequential(nn.Linear(600, 600), nn.Linear(600, 600))
        emakit.contiguous_parameters_(model)
        assert _located(model, poison, decay=0.9) == 5
    elif path == "staged bf16":
        assert _located(nn.Linear(2000, 700).bfloat16(), poison, decay=0.9) == 5
    else:  # two profiles, tensors larger than a chunk
        assert _located(nn.Linear(3000, 700), poison, emakit.PowerEMA, sigma_rels=(0.05, 0.1)) == 5


def test_locate_nonfinite_leaves_the_update_exact():
    torch.manual_seed(0)
    models = [nn.Linear(1500, 900), nn.Linear(1500, 900)]
    models[1].load_state_dict(models[0].state_dict())
    emas = [emakit.EMA(m, decay=0.9, locate_nonfinite=flag) for m, flag in zip(models, (False, True))]
    for _ in range(3):
        for m in models:
            with torch.no_grad():
                torch.manual_seed(1)
                m.weight.add_(torch.randn_like(m.weight))
        for e in emas:
            e.update()
    plain, located = (e.averaged_state_dict() for e in emas)
    for k in plain:
        torch.testing.assert_close(located[k], plain[k], rtol=0, atol=0)


# --------------------------------------------------------------------------- prune scales


def test_prune_of_many_snapshots_keeps_the_fit_and_is_stable():
    """200 synthetic snapshot times x 2 profiles: the forward selection meets the target as the exact greedy
    over the same first 32 would, and pruning what it keeps again removes nothing."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_planning import _info

    infos = [_info(t, (0.05, 0.10)) for t in range(10, 2001, 10)]
    grid = planning._log_grid(0.05, 0.15, 24)
    gone, after = planning._greedy(infos, grid, 2000.0, 1e-3, 0.0)
    kept = [s for j, s in enumerate(infos) if j not in gone]
    assert infos[-1] in kept and len(kept) <= 12
    assert after <= 1e-3
    for s in (0.05, 0.08, 0.12, 0.15):
        assert posthoc.solve_coefficients(kept, sigma_rel=s, warn=False).fit_error <= 1.05e-3
    again, _ = planning._greedy(kept, grid, 2000.0, 1e-3, after)
    assert not again
    assert math.isclose(_worst(kept, grid, [2000.0])[0], after, rel_tol=1e-9)


def test_prune_scale_benchmark_runs_at_tiny_scale():
    import subprocess

    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_prune_scale.py"), "--counts", "40", "80"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith(("| 40 ", "| 80 "))]
    assert len(rows) == 2 and all(float(r.split("|")[3]) <= 1e-3 for r in rows), out
