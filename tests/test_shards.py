"""Pickle-free sharded snapshots (``phema-<t>.shards``): parts per rank, a JSON index, checked reads.

The 2-rank FSDP2 run in tests/test_distributed.py writes real ones; here, directories built
part by part (as ranks would write them) test the reader against the whole tensor, and
damaged ones test that every fault is an error naming the file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from emakit import posthoc, schedules, snapshots, verify
from emakit._files import shards as _shard_files
from emakit._files.header import _metadata, checksum
from emakit.cli import main

WEIGHT_SHAPE = (5, 4)


def _values(t: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(t))
    return {"w": torch.randn(WEIGHT_SHAPE, generator=g), "b": torch.randn(3, generator=g)}


def _write_parts(directory: Path, t: float) -> Path:
    """A ``.shards`` snapshot as 3 ranks write it: w split 2 + 2 + 1 rows and b on rank 0 (by hand)."""
    values = _values(t)
    final = directory / snapshots.file_name(t, ".shards")
    final.mkdir(parents=True)
    layout = {0: {"avg.0/w": (0, 2), "avg.0/b": (0, 3)}, 1: {"avg.0/w": (2, 4)}, 2: {"avg.0/w": (4, 5)}}
    files = {}
    for rank, pieces in layout.items():
        tensors = {key: values[key.split("/")[1]][a:b].clone() for key, (a, b) in pieces.items()}
        table = {key: [[a] + [0] * (values[key.split("/")[1]].dim() - 1), list(tensors[key].shape), checksum(tensors[key])]
                 for key, (a, _) in pieces.items()}  # fmt: skip
        save_file(tensors, str(final / f"rank-{rank:05d}.safetensors"), metadata={"parts": json.dumps(table)})
        files[f"rank-{rank:05d}.safetensors"] = table
    index = _metadata(
        t=t, num_updates=int(t), sigma_rels=[0.1], gammas=[schedules.sigma_rel_to_gamma(0.1)], averaged=["w", "b"],
        copied=[], static=[], model_dtypes={"w": torch.float32, "b": torch.float32}, dtype=torch.float32,
        keys=["w", "b"], aliases={},
    )  # fmt: skip
    index["tensors"] = json.dumps({"avg.0/w": ["float32", list(WEIGHT_SHAPE), list(WEIGHT_SHAPE)],
                                   "avg.0/b": ["float32", [3], [3]]})  # fmt: skip
    index["parts"] = json.dumps(files)
    (final / "emakit.json").write_text(json.dumps(index))
    return final


def _index(path: Path) -> dict:
    return json.loads((path / "emakit.json").read_text())


def _edit_index(path: Path, edit) -> None:
    index = _index(path)
    parts = json.loads(index["parts"])
    edit(parts)
    index["parts"] = json.dumps(parts)
    (path / "emakit.json").write_text(json.dumps(index))


def _edit_tensors(path: Path, key: str, field: int, value) -> None:
    index = _index(path)
    tensors = json.loads(index["tensors"])
    tensors[key][field] = value
    index["tensors"] = json.dumps(tensors)
    (path / "emakit.json").write_text(json.dumps(index))


def test_parts_assemble_whole_tensors_and_any_box(tmp_path):
    path = _write_parts(tmp_path / "phema", 4.0)
    info = snapshots.read_info(path)
    assert info.sharded and not info.pickled and info.shapes == {"w": WEIGHT_SHAPE, "b": (3,)}
    reader = snapshots.open_tensors(info)  # no trust needed
    want = _values(4.0)
    assert torch.equal(reader.get("avg.0/w"), want["w"]) and torch.equal(reader.get("avg.0/b"), want["b"])
    reader.close()
    parts = snapshots.shard_parts(info)
    for offset, shape in [((1, 1), (3, 2)), ((3, 0), (2, 4)), ((4, 3), (1, 1)), ((0, 0), (0, 4))]:
        box = parts.read("avg.0/w", offset, shape)
        assert torch.equal(box, want["w"][offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]])
    parts.close()


def test_written_in_one_process_reads_like_a_single_file_snapshot(tmp_path):
    """``write_sharded_snapshot`` without a process group: rank 0 writes every (plain) tensor."""
    values = _values(7.0)
    fields = dict(
        t=7.0, num_updates=7, sigma_rels=[0.1], gammas=[schedules.sigma_rel_to_gamma(0.1)],
        copies={"n": torch.tensor(7)}, static={}, model_dtypes={"w": torch.float32, "b": torch.float32},
        dtype=torch.float32, keys=["w", "b", "n"], aliases={},
    )  # fmt: skip
    path = snapshots.write_sharded_snapshot(
        tmp_path / "shards", averages=[values], model_shapes={"w": WEIGHT_SHAPE, "b": (3,), "n": ()}, **fields
    )
    snapshots.write_snapshot(tmp_path / "single", averages=[values], **fields)
    assert path.name == "phema-000000000000007.shards"
    assert sorted(p.name for p in path.iterdir()) == ["emakit.json", "rank-00000.safetensors"]
    got = posthoc.reconstruct(tmp_path / "shards", sigma_rel=0.1, progress=False)
    want = posthoc.reconstruct(tmp_path / "single", sigma_rel=0.1, progress=False)
    assert list(got) == list(want)
    for name in want:
        assert_close(got[name], want[name], rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        snapshots.write_sharded_snapshot(tmp_path / "shards", averages=[values], model_shapes={}, **fields)
    with pytest.raises(FileExistsError):  # one snapshot per t, whatever the form
        snapshots.write_snapshot(tmp_path / "shards", averages=[values], **fields)
    out = snapshots.export(path, tmp_path / "exported")
    assert not snapshots.read_info(out).sharded and verify.verify([tmp_path / "shards", out]) == []


def test_nothing_is_unpickled_on_the_post_hoc_path(tmp_path, capsys):
    path = _write_parts(tmp_path / "phema", 4.0)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (path / ".metadata").write_bytes(pickle.dumps(Payload()))  # a planted DCP-style pickle is never read
    posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.1, progress=False)
    assert verify.verify([tmp_path / "phema"]) == []
    assert main(["inspect", str(tmp_path / "phema")]) == 0
    assert "encoding: fp32; 1 sharded (safetensors parts)" in capsys.readouterr().out
    for command in (["inspect", "{d}"], ["reconstruct", "{d}", "--sigma-rel", "0.1", "--out", "{o}"],
                    ["export", "{d}", "--out", "{o}2"], ["verify", "{d}"]):  # fmt: skip
        args = [a.format(d=tmp_path / "phema", o=tmp_path / "out") for a in command]
        assert main(args) == 0, capsys.readouterr().err
    assert not marker.exists()


def _flip_data_byte(path: Path) -> None:
    file = path / "rank-00001.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_flip_data_byte, r"rank-00001.safetensors: tensor 'avg.0/w' does not match its checksum"),
        (lambda p: (p / "rank-00002.safetensors").unlink(), r"names part 'rank-00002.safetensors', which is missing"),
        (lambda p: (p / "rank-00001.safetensors").write_bytes(b"\x10"), r"rank-00001.safetensors: not a readable"),
        (lambda p: _edit_index(p, lambda parts: parts.pop("rank-00002.safetensors")), r"cover 16 of its 20 elements"),
        (
            lambda p: _edit_index(p, lambda parts: parts["rank-00001.safetensors"]["avg.0/w"][0].__setitem__(0, 4)),
            r"lies outside its shape",
        ),
        (lambda p: _edit_index(p, lambda parts: parts.__setitem__("../x.safetensors", {})), r"names part '../x"),
        (lambda p: (p / "emakit.json").write_text("{not json"), r"not a readable sharded snapshot"),
        (lambda p: _edit_tensors(p, "avg.0/w", 0, "int32"), r"averages stored as \['float32', 'int32'\]"),
        (
            lambda p: _edit_tensors(p, "avg.0/w", 1, [4, 5]),
            r"part of 'avg.0/w' in rank-0000[0-2].safetensors lies outside its shape \(4, 5\)",
        ),
    ],
)
def test_a_damaged_sharded_snapshot_is_an_error_naming_it(tmp_path, damage, message, capsys):
    path = _write_parts(tmp_path / "phema", 4.0)
    damage(path)
    with pytest.raises(snapshots.SnapshotError, match=message) as raised:
        posthoc.reconstruct(tmp_path / "phema", sigma_rel=0.1, progress=False)
    assert str(path) in str(raised.value)
    problems = verify.verify([tmp_path / "phema"])
    assert len(problems) == 1 and str(path) in problems[0], problems
    assert main(["reconstruct", str(tmp_path / "phema"), "--sigma-rel", "0.1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_container_is_checked(tmp_path):
    with pytest.raises(ValueError, match="container must be 'shards' or 'dcp', got container='zip'"):
        snapshots.write_sharded_snapshot(
            tmp_path, averages=[], copies={}, static={}, model_shapes={}, container="zip", t=1.0
        )
    assert not any(tmp_path.iterdir())


def test_a_failed_rank_write_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_shard_files, "_safetensors", lambda: (type("S", (), {"save_file": staticmethod(full)}), None))
    with pytest.raises(OSError, match="no space left on device while writing .*phema-000000000000002.shards"):
        snapshots.write_sharded_snapshot(
            tmp_path, averages=[{"w": torch.ones(2)}], copies={}, static={}, model_shapes={"w": (2,)}, t=2.0,
            num_updates=2, sigma_rels=[0.1], gammas=[schedules.sigma_rel_to_gamma(0.1)],
            model_dtypes={"w": torch.float32}, dtype=torch.float32, keys=["w"], aliases={},
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []
