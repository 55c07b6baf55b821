"""Checksums of stored bytes (CRC-32 or CRC-32C, whichever is faster here), and reading them ahead on threads.

References are independent: CRC-32C computed bit by bit from its polynomial (and the
published check value of ``b"123456789"``), CRC-32 by ``zlib``, reconstructions against a
float64 sum of the snapshot tensors read with safetensors itself.
"""

from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("n", [0, 1, 15, 16, 63, 64, 65, 4099, 1 << 20])
def test_fast_crc32_is_zlibs_crc32(n):
    fast = checksums._fast_crc32()
    if fast is None:
        pytest.skip("neither isal nor zlib-ng is installed (the fast extra)")
    data = torch.randint(0, 256, (n + 3,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    raw = bytes(data.tolist())
    for start in (0, 3):  # aligned and not
        view = memoryview(raw)[start : start + n]
        assert fast(view, 0) == zlib.crc32(view)
        assert fast(view, 0xDEADBEEF) == zlib.crc32(view, 0xDEADBEEF)  # extending an earlier checksum
    assert checksums.extend(0, checksums.buffer_of(data[:n]), "crc32") == zlib.crc32(raw[:n])  # ctypes buffers too


@pytest.mark.parametrize(
    ("fast_crc32", "fast_crc32c", "want"),
    [(True, True, "crc32"), (True, False, "crc32"), (False, True, "crc32c"), (False, False, "crc32")],
)
def test_new_files_get_the_faster_algorithm_installed(monkeypatch, fast_crc32, fast_crc32c, want):
    monkeypatch.setattr(checksums, "_fast_crc32", lambda: zlib.crc32 if fast_crc32 else None)
    monkeypatch.setattr(checksums, "_fast_crc32c", lambda: (lambda crc, data: 0) if fast_crc32c else None)
    assert checksums.preferred() == want


def test_files_checksummed_by_isal_verify_with_zlib_alone(tmp_path, monkeypatch):
    if checksums._fast_crc32() is None:
        pytest.skip("neither isal nor zlib-ng is installed (the fast extra)")
    infos = _run(tmp_path)
    assert infos[0].checksum_algorithm == "crc32"
    assert "checksum_algorithm" not in safe_open(str(infos[0].path), framework="pt").metadata()  # any emakit reads it
    want = posthoc.reconstruct(infos, sigma_rel=0.08, progress=False)
    monkeypatch.setattr(checksums, "_fast_crc32", lambda: None)
    assert verify.verify([tmp_path]) == []
    got = posthoc.reconstruct(infos, sigma_rel=0.08, progress=False)
    for name, value in want.items():
        assert_close(got[name], value, rtol=0, atol=0)
    data = bytearray(infos[1].path.read_bytes())
    data[read_ahead.parse_layout(infos[1].path)["avg.1/0.weight"][2] + 5] ^= 0x01
    infos[1].path.write_bytes(bytes(data))
    problems = verify.verify([tmp_path])
    assert len(problems) == 1 and "'avg.1/0.weight' does not match its checksum" in problems[0], problems


@pytest.mark.parametrize("numpy_views", [True, False])
def test_buffer_of_is_the_tensors_bytes_in_place_with_or_without_numpy(monkeypatch, numpy_views):
    monkeypatch.setattr(checksums, "_numpy", lambda: numpy_views)
    x = torch.arange(7, dtype=torch.int16)
    buf = checksums.buffer_of(x)
    assert bytes(memoryview(buf).cast("B")) == b"".join(int(v).to_bytes(2, "little") for v in range(7))
    x[3] = -1  # in place: the buffer sees the change
    assert bytes(memoryview(buf).cast("B"))[6:8] == b"\xff\xff"
    assert checksums.extend(0, checksums.buffer_of(x), "crc32") == zlib.crc32(x.numpy().tobytes())
    assert checksums.buffer_of(torch.empty(0)) == b""


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
    layout = read_ahead.parse_layout(infos[1].path)
    offset = layout["avg.0/0.weight"][2]
    data[offset + 3] ^= 0x10
    infos[1].path.write_bytes(bytes(data))
    with pytest.raises(snapshots.SnapshotError, match=rf"{infos[1].path.name}: tensor 'avg.0/0.weight' does not match"):
        posthoc.reconstruct(infos, sigma_rel=0.10, progress=False)
    infos[2].path.write_bytes(infos[2].path.read_bytes()[:-7])
    problems = verify.verify([infos[2].path])
    assert len(problems) == 1 and infos[2].path.name in problems[0], problems


@pytest.mark.parametrize("chunk", [64, 96, 1 << 22])  # pieces of large tensors / groups of several names / one read
def test_reconstruct_on_the_workers_is_the_float64_sum_at_any_chunk_size(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(read_ahead, "CHUNK", chunk)  # 64 bytes: the 6x5 weight (120 bytes) comes in two pieces
    infos = _run(tmp_path)
    for sigma_rels in ([0.08], [0.06, 0.09]):  # one and two solutions summed in one pass
        sols = [posthoc.solve_coefficients(infos, s) for s in sigma_rels]
        got = posthoc.reconstruct(infos, sigma_rel=sigma_rels if len(sigma_rels) > 1 else sigma_rels[0],
                                  progress=False, dtype=torch.float64, accumulate=torch.float64)  # fmt: skip
        for sol, out in zip(sols, got if len(sigma_rels) > 1 else [got]):
            want = _float64_sum(sol.snapshots, sol.weights)
            assert [name for name in out if name in want] == list(want)
            for name, value in want.items():
                assert_close(out[name], value, rtol=1e-12, atol=1e-12)
                assert out[name].untyped_storage().nbytes() == value.numel() * 8  # memory of its own
    assert verify.verify([tmp_path]) == []


def test_reconstruct_groups_names_in_file_order_one_read_per_profile_and_group(tmp_path, monkeypatch):
    # safetensors stores keys sorted by name (params.10 before params.2): grouping the sums in the model's
    # order would scatter each group's reads over the file.
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(16)) for _ in range(12)])
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        pema.update(dt=10)
        pema.save_snapshot(tmp_path)
    infos = posthoc.list_snapshots(tmp_path)
    assert list(read_ahead.parse_layout(infos[0].path))[:3] == ["avg.0/0", "avg.0/1", "avg.0/10"]
    monkeypatch.setattr(read_ahead, "CHUNK", 4 * 16 * 4)  # groups of four names
    reads = []
    pread = read_ahead._pread
    monkeypatch.setattr(read_ahead, "_pread", lambda info, fds, view, offset: reads.append(len(view)) or
                        pread(info, fds, view, offset))  # fmt: skip
    got = posthoc.reconstruct(infos, sigma_rel=0.08, progress=False, dtype=torch.float64, accumulate=torch.float64)
    sol = posthoc.solve_coefficients(infos, 0.08)
    assert len(reads) == len(sol.snapshots) * 2 * 3 and set(reads) == {4 * 16 * 4}  # snapshots x profiles x groups
    want = _float64_sum(sol.snapshots, sol.weights)
    assert list(got) == list(want) == [str(n) for n in range(12)]  # the model's order, whatever the files'
    for name, value in want.items():
        assert_close(got[name], value, rtol=1e-12, atol=1e-12)


def test_verify_and_reconstruct_open_each_file_once_however_many_reads(tmp_path, monkeypatch):
    infos = _run(tmp_path)
    monkeypatch.setattr(read_ahead, "CHUNK", 64)  # a read per tensor or piece: dozens per file
    opened = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    assert verify.verify([tmp_path]) == []  # the headers read first, on the calling thread
    posthoc.reconstruct(infos, sigma_rel=0.08, progress=False)  # where the tensors lie: from the infos
    assert sorted(opened) == sorted(2 * [str(info.path) for info in infos])


def test_headers_are_parsed_once_and_again_only_for_a_file_whose_size_changed(tmp_path, monkeypatch):
    infos = _run(tmp_path)
    assert all(info.stored == read_ahead.parse_layout(info.path) for info in infos)
    parsed = []
    real = read_ahead.parse_layout
    monkeypatch.setattr(read_ahead, "parse_layout", lambda path: parsed.append(path) or real(path))
    want = posthoc.reconstruct(infos, sigma_rel=0.08, progress=False)
    assert parsed == []  # the layouts read_info parsed
    with open(infos[2].path, "ab") as f:  # a file that changed since: its header is read again
        f.write(b"\0" * 16)
    got = posthoc.reconstruct(infos, sigma_rel=0.08, progress=False)
    assert parsed == [infos[2].path]
    for name, value in want.items():
        assert_close(got[name], value, rtol=0, atol=0)
    monkeypatch.setattr(read_ahead, "parse_layout", lambda path: {})  # a changed file that holds no such tensor
    with pytest.raises(snapshots.SnapshotError, match=rf"{infos[2].path.name}: holds no tensor"):
        posthoc.reconstruct(infos, sigma_rel=0.08, progress=False)


def test_buffers_of_every_stored_dtype_verify_and_come_back_bit_for_bit(tmp_path):
    # uint16/32/64 buffers are valid safetensors dtypes: verify once called such files unreadable.
    model = torch.nn.Linear(4, 3)
    unsigned = {"u16": torch.uint16, "u32": torch.uint32, "u64": torch.uint64}
    for name, dtype in unsigned.items():
        model.register_buffer(name, torch.tensor([0, 1, 7, 65535], dtype=torch.int64).to(dtype))
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for _ in range(4):
        pema.update(dt=10)
        pema.save_snapshot(tmp_path)
    assert verify.verify([tmp_path]) == []
    out = posthoc.reconstruct(tmp_path, sigma_rel=0.08, progress=False)
    for name, dtype in unsigned.items():
        assert out[name].dtype == dtype
        assert out[name].to(torch.int64).tolist() == [0, 1, 7, 65535]


def test_run_groups_hands_every_piece_once_in_order_and_checks_large_tensors_after_their_last_piece(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(read_ahead, "CHUNK", 64)
    infos = _run(tmp_path, count=2)
    keys = [f"avg.{j}/{n}" for j in range(2) for n in infos[0].averaged]
    seen: dict = {}

    def collect(info, pieces, data):
        for piece in pieces:
            seen.setdefault((info.t, piece.key), []).append((piece.start, piece.of(data).clone()))

    finished = []
    groups = [([(info, key) for key in keys], collect, lambda t=info.t: finished.append(t)) for info in infos]
    assert sorted(n for n, error in read_ahead.run_groups(groups) if error is None) == [0, 1]
    assert sorted(finished) == sorted(i.t for i in infos)
    for info in infos:
        with safe_open(str(info.path), framework="pt") as f:
            for key in keys:
                pieces = seen[(info.t, key)]
                assert [s for s, _ in pieces] == sorted(s for s, _ in pieces)  # in order
                assert torch.equal(torch.cat([p for _, p in pieces]), f.get_tensor(key).reshape(-1))
    assert len(seen[(infos[0].t, "avg.0/0.weight")]) == 2  # 120 bytes in pieces of 64
    # A flipped bit in the second piece of the large tensor: an error for that group only, after the pieces.
    data = bytearray(infos[1].path.read_bytes())
    data[read_ahead.parse_layout(infos[1].path)["avg.0/0.weight"][2] + 100] ^= 0x01
    infos[1].path.write_bytes(bytes(data))
    seen.clear()
    results = dict(read_ahead.run_groups(groups))
    assert results[0] is None
    assert isinstance(results[1], snapshots.SnapshotError) and "'avg.0/0.weight' does not match" in str(results[1])
    problems = verify.verify([infos[1].path])
    assert len(problems) == 1 and "'avg.0/0.weight' does not match its checksum" in problems[0], problems


def test_verify_names_nonfinite_tensors_in_any_piece_and_run_groups_a_missing_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(read_ahead, "CHUNK", 64)
    infos = _run(tmp_path)
    with safe_open(str(infos[0].path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["avg.1/0.weight"][4, 3] = float("nan")  # the second piece of a tensor read in two
    tensors["avg.0/1.bias"][0] = float("inf")  # a small tensor read beside others
    checksums_ = json.loads(meta["checksums"])
    for key in ("avg.1/0.weight", "avg.0/1.bias"):
        checksums_[key] = checksums.hex_digest(tensors[key], meta.get("checksum_algorithm", "crc32"))
    save_file(tensors, str(infos[0].path), metadata={**meta, "checksums": json.dumps(checksums_)})
    problems = verify.verify([tmp_path])
    assert problems == [f"{infos[0].path}: 2 tensor(s) hold NaN or inf: 'avg.0/1.bias', 'avg.1/0.weight'"], problems
    with pytest.raises(snapshots.SnapshotError, match="holds NaN or Inf"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.08, progress=False)
    results = list(read_ahead.run_groups([([(infos[1], "avg.0/0.bias"), (infos[1], "avg.7/0.bias")], lambda *a: None)]))
    assert len(results) == 1 and f"{infos[1].path}: holds no tensor 'avg.7/0.bias'" in str(results[0][1]), results


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
