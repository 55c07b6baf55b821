"""Checksums of stored bytes (CRC-32C for new files, CRC-32 for older ones), and reading them ahead on threads.

References are independent: CRC-32C computed bit by bit from its polynomial (and the
published check value of ``b"123456789"``), CRC-32 by ``zlib``, reconstructions against a
float64 sum of the snapshot tensors read with safetensors itself.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from torch.testing import assert_close

import emakit
from emakit import posthoc, snapshots, verify
from emakit._files import checksums, dcp, read_ahead

pytest.importorskip("safetensors", reason="snapshots need the safetensors extra")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.fixture
def no_crc32c_package(monkeypatch):
    """As if neither crc32c nor google-crc32c were installed."""
    monkeypatch.setattr(checksums, "_fast_crc32c", lambda: None)


@pytest.mark.parametrize("n", [0, 1, 7, 255, 511, 512, 4099, 70_001])
def test_crc32c_without_a_package_matches_the_definition(n):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    want = _crc32c_bitwise(bytes(data.tolist()))
    assert checksums._crc32c_torch(0, data) == want
    head = bytes(range(5))
    assert checksums._crc32c_torch(_crc32c_bitwise(head), data) == _crc32c_bitwise(head + bytes(data.tolist()))
    if checksums._fast_crc32c() is not None:
        assert checksums._fast_crc32c()(0, bytes(data.tolist())) == want
    assert _crc32c_bitwise(b"123456789") == 0xE3069283  # the published check value


def test_hex_digest_of_a_tensor_is_that_of_its_bytes():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    raw = x.numpy().tobytes()
    assert checksums.hex_digest(x, "crc32") == f"{zlib.crc32(raw):08x}"
    assert checksums.hex_digest(x, "crc32c") == f"{_crc32c_bitwise(raw):08x}"
    assert checksums.hex_digest(x.t(), "crc32c") == f"{_crc32c_bitwise(x.t().contiguous().numpy().tobytes()):08x}"


def _run(directory, count=4):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    gen = torch.Generator().manual_seed(3)
    for _ in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        pema.update(dt=10)
        pema.save_snapshot(directory)
    return posthoc.list_snapshots(directory)


def _float64_sum(infos, weights):
    """``sum_i,j w_ij * avg.j/name`` of every averaged name, read with safetensors, in float64."""
    out = {}
    for info, row in zip(infos, weights):
        with safe_open(str(info.path), framework="pt") as f:
            for j, w in enumerate(row):
                for name in info.averaged:
                    out[name] = out.get(name, 0) + w * f.get_tensor(f"avg.{j}/{name}").double()
    return out


def test_new_snapshots_name_their_algorithm_and_reconstruct_as_a_float64_sum(tmp_path):
    infos = _run(tmp_path)
    assert infos[0].checksum_algorithm == checksums.preferred()
    sol = posthoc.solve_coefficients(infos, 0.08)
    want = _float64_sum(sol.snapshots, sol.weights)
    got = posthoc.reconstruct(infos, sigma_rel=0.08, progress=False, dtype=torch.float64)
    for name, value in want.items():
        assert_close(got[name], value, rtol=1e-6, atol=1e-7)
    assert verify.verify([tmp_path]) == []


def test_without_a_crc32c_package_new_files_get_crc32_and_crc32c_files_still_verify(tmp_path, no_crc32c_package):
    infos = _run(tmp_path / "a", count=2)
    assert infos[0].checksum_algorithm == "crc32"
    meta = safe_open(str(infos[0].path), framework="pt").metadata()
    assert "checksum_algorithm" not in meta  # as files were before CRC-32C
    with safe_open(str(infos[0].path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["checksums"])["avg.0/0.weight"] == f"{zlib.crc32(tensors['avg.0/0.weight'].numpy()):08x}"
    # The same file with CRC-32C checksums (as a machine with the package writes it) verifies through torch.
    sums = {k: f"{_crc32c_bitwise(v.contiguous().numpy().tobytes()):08x}" for k, v in tensors.items()}
    out = tmp_path / "b" / infos[0].path.name
    out.parent.mkdir()
    save_file(tensors, str(out), metadata={**meta, "checksums": json.dumps(sums), "checksum_algorithm": "crc32c"})
    assert verify.verify([out]) == []
    tensors["avg.1/0.bias"][2] += 1
    save_file(tensors, str(out), metadata={**meta, "checksums": json.dumps(sums), "checksum_algorithm": "crc32c"})
    problems = verify.verify([out])
    assert len(problems) == 1 and "'avg.1/0.bias' does not match its checksum" in problems[0], problems


def test_an_unknown_checksum_algorithm_is_an_error_naming_the_file(tmp_path):
    info = _run(tmp_path, count=1)[0]
    with safe_open(str(info.path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(info.path), metadata={**meta, "checksum_algorithm": "md5"})
    with pytest.raises(snapshots.SnapshotError, match=rf"{info.path.name}.*unknown checksum algorithm 'md5'"):
        snapshots.read_info(info.path)


def test_read_ahead_names_the_corrupted_tensor_and_a_truncated_file(tmp_path):
    infos = _run(tmp_path, count=3)
    data = bytearray(infos[1].path.read_bytes())
    layout = read_ahead._layout(infos[1].path)
    offset = layout["avg.0/0.weight"][2]
    data[offset + 3] ^= 0x10
    infos[1].path.write_bytes(bytes(data))
    with pytest.raises(snapshots.SnapshotError, match=rf"{infos[1].path.name}: tensor 'avg.0/0.weight' does not match"):
        posthoc.reconstruct(infos, sigma_rel=0.10, progress=False)
    infos[2].path.write_bytes(infos[2].path.read_bytes()[:-7])
    problems = verify.verify([infos[2].path])
    assert len(problems) == 1 and infos[2].path.name in problems[0], problems


def test_read_ahead_reorders_into_blocks_but_keeps_each_key_in_file_order(tmp_path, monkeypatch):
    monkeypatch.setattr(read_ahead, "_BLOCK", 64)  # a few tensors per block
    monkeypatch.setattr(read_ahead, "AHEAD_BYTES", 100)
    infos = _run(tmp_path, count=3)
    keys = [f"avg.{j}/{n}" for j in range(2) for n in infos[0].averaged]
    seen = [(info.t, key, value.clone()) for info, key, value in
            read_ahead.read_ahead([(i, k) for i in infos for k in keys], recycle=True, reorder=True)]  # fmt: skip
    assert sorted((t, k) for t, k, _ in seen) == sorted((i.t, k) for i in infos for k in keys)
    for key in keys:
        assert [t for t, k, _ in seen if k == key] == [i.t for i in infos]
    for t, key, value in seen:
        with safe_open(str(next(i for i in infos if i.t == t).path), framework="pt") as f:
            assert torch.equal(value, f.get_tensor(key))


def test_ema_save_checksums_what_it_writes_without_reading_it_back(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    ema = emakit.EMA(model, decay=0.9)
    ema.update()

    def no_read_back(*args, **kwargs):
        raise AssertionError("EMA.save read its files back to checksum them")

    monkeypatch.setattr(dcp, "_checksum_share", no_read_back)
    ema.save(tmp_path / "ckpt")
    monkeypatch.undo()
    record = json.loads((tmp_path / "ckpt" / dcp.CHECKSUMS).read_text())
    assert record.get("algorithm", "crc32") == checksums.preferred()
    meta = dcp.read_metadata("test", tmp_path / "ckpt")
    assert len(record["items"]) == len(meta.storage_data)
    for fqn, _, file, offset, length, digest in record["items"]:  # each against the bytes on disk
        raw = (tmp_path / "ckpt" / file).read_bytes()[offset : offset + length]
        want = _crc32c_bitwise(raw) if record.get("algorithm") == "crc32c" else zlib.crc32(raw)
        assert digest == f"{want:08x}", fqn
    assert verify.verify([tmp_path / "ckpt"], trust=True) == []
