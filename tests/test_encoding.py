"""Compact snapshots: the codec, delta chains, integrity, reconstruction error, mixed directories, inspect."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import emakit
from emakit import posthoc, snapshots
from emakit._files import compact as _encoding
from emakit.cli import main as cli_main

pytest.importorskip("safetensors")


def _walk(tmp_path, steps=200, every=10, params=4000, formats=(("fp32", {}), ("compact", {"encoding": "compact"}))):
    """A float64 random walk, its snapshots in each format, the exact EMAs of several lengths, the final weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight = torch.nn.Parameter(torch.zeros(params, 1, dtype=torch.float64))
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    targets = (0.05, 0.10, 0.04, 0.07, 0.15)
    truth = emakit.PowerEMA(model, sigma_rels=targets)
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight), alpha=1e-2)
        pema.update()
        truth.update()
        if step % every == 0:
            for name, kwargs in formats:
                pema.save_snapshot(tmp_path / name, **kwargs)
    exact = {s: truth.averaged_state_dict(s)["weight"] for s in targets}
    return pema, exact, model.weight.detach().clone()


def test_codec_round_trip_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    key = _encoding.encode_keyframe(x)
    assert torch.equal(_encoding.decode_keyframe(key, (1000,)), x.float())
    ref = x.float()
    y = x + torch.randn(1000, dtype=torch.float64) * 1e-3
    payload, scale, decoded = _encoding.encode_delta(y, ref)
    d = y - ref.double()
    want = min(float(d.abs().max()) / _encoding.LEVELS, float(d.square().mean().sqrt()) / _encoding.RMS_LEVELS)
    assert scale == pytest.approx(want, rel=1e-6)
    assert float((decoded.double() - y).abs().max()) <= scale / 2 + 2 * 2**-24 * float(y.abs().max())
    assert torch.equal(_encoding.decode_delta(payload, scale, ref), decoded)
    zero, s0, same = _encoding.encode_delta(ref, ref)  # no change: scale 0
    assert s0 == 0 and torch.equal(_encoding.decode_delta(zero, s0, ref), ref)


def test_chain_decodes_to_the_writers_values_bit_for_bit(tmp_path):
    model = torch.nn.Linear(8, 4)
    pema = emakit.PowerEMA(model)
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0 / step)
        pema.update()
        pema.save_snapshot(tmp_path, encoding="compact")
    chain = pema._delta_chain
    snapshots.clear_decoded_cache()
    info = posthoc.list_snapshots(tmp_path)[-1]
    reader = snapshots.open_tensors(info)  # decodes back to the keyframe, nothing cached
    for j in range(2):
        for name, value in chain.decoded[j].items():
            assert torch.equal(reader.get(f"avg.{j}/{name}"), value)
    reader.close()


def test_keyframe_spacing_and_new_chains(tmp_path, monkeypatch):
    defaults = list(snapshots.DeltaChain.__init__.__defaults__)
    defaults[0] = 3  # keyframe_interval
    monkeypatch.setattr(snapshots.DeltaChain.__init__, "__defaults__", tuple(defaults))
    model = torch.nn.Linear(2, 2)
    pema = emakit.PowerEMA(model)
    for _ in range(7):
        pema.update()
        pema.save_snapshot(tmp_path, encoding="compact")
    refs = [i.reference for i in posthoc.list_snapshots(tmp_path)]
    assert refs == [None, 1.0, 2.0, None, 4.0, 5.0, None]
    resumed = emakit.PowerEMA(model)
    resumed.load_state_dict(pema.state_dict())
    resumed.update()
    resumed.save_snapshot(tmp_path, encoding="compact")  # a resumed PowerEMA starts with a keyframe
    assert snapshots.read_info(tmp_path / snapshots.file_name(8.0)).reference is None


def test_missing_reference_is_a_clear_error(tmp_path):
    model = torch.nn.Linear(2, 2)
    pema = emakit.PowerEMA(model)
    for _ in range(3):
        pema.update()
        pema.save_snapshot(tmp_path, encoding="compact")
    (tmp_path / snapshots.file_name(2.0)).unlink()
    snapshots.clear_decoded_cache()
    info = snapshots.read_info(tmp_path / snapshots.file_name(3.0))
    reader = snapshots.open_tensors(info)
    with pytest.raises(
        snapshots.SnapshotError, match=r"phema-000000000000003.*reference phema-000000000000002.*missing"
    ):
        reader.get("avg.0/weight")
    reader.close()


def test_checksums_are_verified_on_the_encoded_bytes(tmp_path):
    model = torch.nn.Linear(16, 16)
    pema = emakit.PowerEMA(model)
    pema.update()
    path = pema.save_snapshot(tmp_path, encoding="compact")
    info = snapshots.read_info(path)
    assert set(info.checksums) >= {"avg.0/weight", "avg.1/bias"}
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the last tensor's bytes
    path.write_bytes(bytes(data))
    snapshots.clear_decoded_cache()
    reader = snapshots.open_tensors(snapshots.read_info(path))
    with pytest.raises(snapshots.SnapshotError, match="does not match its checksum"):
        for key in info.checksums:
            reader.get(key)
    reader.close()


def test_a_flipped_byte_or_a_cut_in_a_delta_read_in_batches_is_named(tmp_path):
    # Deltas read in order are read a span at a time (one pread) and decoded together: each payload is still
    # checked against its own checksum, and a short file is still a SnapshotError naming it.
    from emakit._files import read_ahead

    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(6)))
    pema = emakit.PowerEMA(model)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2)
        pema.update()
        last = pema.save_snapshot(tmp_path, encoding="compact")
    info = snapshots.read_info(last)
    assert info.reference is not None
    key = "avg.1/3.weight"
    _, _, offset, nbytes = read_ahead.layout(info, {})[key]
    whole = last.read_bytes()
    data = bytearray(whole)
    data[offset + nbytes // 2] ^= 0x10
    last.write_bytes(bytes(data))
    snapshots.clear_decoded_cache()
    with pytest.raises(snapshots.SnapshotError, match=r"tensor 'avg\.1/3\.weight' does not match its checksum"):
        posthoc.reconstruct(tmp_path, sigma_rel=0.1, progress=False)
    last.write_bytes(whole[: offset + nbytes // 2])  # cut inside that payload
    snapshots.clear_decoded_cache()
    with pytest.raises(snapshots.SnapshotError, match=last.name):
        posthoc.reconstruct(tmp_path, sigma_rel=0.1, progress=False)


def test_reconstruction_error_within_target(tmp_path):
    _, exact, final = _walk(tmp_path)
    errors = {}
    for name in ("fp32", "compact"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sds = posthoc.reconstruct(tmp_path / name, list(exact), progress=False, dtype=torch.float64)
        errors[name] = {
            s: float((sd["weight"] - exact[s]).norm() / (exact[s] - final).norm()) for s, sd in zip(exact, sds)
        }
    fp32, compact = errors["fp32"], errors["compact"]
    untracked = [s for s in exact if s not in (0.05, 0.10)]
    bound = 1.2 * min(fp32[s] for s in untracked)
    for s in untracked:
        assert compact[s] <= 1.2 * fp32[s], (s, compact[s], fp32[s])
    for s in (0.05, 0.10):
        assert compact[s] <= bound, (s, compact[s], bound)
    ratio = sum(i.nbytes for i in posthoc.list_snapshots(tmp_path / "compact")) / sum(
        i.nbytes for i in posthoc.list_snapshots(tmp_path / "fp32")
    )
    assert ratio <= 0.55  # 0.49 at 1M parameters (headers weigh more here)


def test_mixed_directory_and_inspect(tmp_path, capsys):
    formats = (("mixed", {}), ("mixed", {"encoding": "compact"}))
    model = torch.nn.Linear(32, 8)
    pema = emakit.PowerEMA(model)
    plain = emakit.PowerEMA(model)
    for step in range(1, 13):
        with torch.no_grad():
            model.weight.add_(0.01)
        pema.update()
        plain.update()
        _, kwargs = formats[step % 2]
        (pema if kwargs else plain).save_snapshot(tmp_path / "mixed", **kwargs)
        plain.save_snapshot(tmp_path / "plain")
    infos = posthoc.list_snapshots(tmp_path / "mixed")
    assert {i.encoding for i in infos} == {"fp32", "compact"}
    a = posthoc.reconstruct(tmp_path / "mixed", 0.08, progress=False)
    b = posthoc.reconstruct(tmp_path / "plain", 0.08, progress=False)
    torch.testing.assert_close(a["weight"], b["weight"], atol=1e-5, rtol=0)
    assert cli_main(["inspect", str(tmp_path / "mixed"), "-v"]) == 0
    out = capsys.readouterr().out
    assert "encoding: compact, fp32" in out and "compact keyframe" in out and "compact delta to t=1" in out
    assert cli_main(["inspect", str(tmp_path / "mixed"), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert [f["encoding"] for f in files[:2]] == ["compact", "fp32"]


def test_compact_rejects_other_dtypes(tmp_path):
    pema = emakit.PowerEMA(torch.nn.Linear(2, 2))
    pema.update()
    with pytest.raises(ValueError, match="encoding='compact' stores float32 values, got dtype=torch.float16"):
        pema.save_snapshot(tmp_path, encoding="compact", dtype=torch.float16)
    with pytest.raises(ValueError, match="encoding must be one of"):
        pema.save_snapshot(tmp_path, encoding="fp8")


def test_heavy_tailed_deltas_get_the_finer_rms_step_and_decode_within_half_a_step():
    torch.manual_seed(0)
    ref = torch.randn(10_000)
    d = torch.randn(10_000, dtype=torch.float64) * 1e-3
    d[:10] *= 50  # a few large steps: max is ~200 rms
    payload, scale, decoded = _encoding.encode_delta(ref.double() + d, ref)
    rms = float(d.square().mean().sqrt())
    assert scale == pytest.approx(rms / _encoding.RMS_LEVELS, rel=1e-6)  # not max / LEVELS, 25x coarser
    assert float((decoded.double() - (ref.double() + d)).abs().max()) <= scale / 2 + 2 * 2**-24 * 5
    assert torch.equal(_encoding.decode_delta(payload, scale, ref), decoded)  # the outliers are int32 escapes
    # Huge outliers among zeros: the steps still fit int32.
    sparse = torch.zeros(1000, dtype=torch.float64)
    sparse[0] = 1e6
    payload, scale, decoded = _encoding.encode_delta(sparse, torch.zeros(1000))
    assert float((decoded.double() - sparse).abs().max()) <= scale / 2 + 1e6 * 2**-23


def _bomb_payload(kind: str, nbytes: int) -> bytes:
    if kind.startswith("zstd"):  # a frame that states its size is refused by it, one that does not while streamed
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor(level=19, write_content_size=kind == "zstd").compress(bytes(nbytes))
    import zlib

    return zlib.compress(bytes(nbytes), 9)


@pytest.mark.parametrize("kind", ["zlib", "zstd", "zstd, size not stated"])
@pytest.mark.parametrize("profile", [0, 1])
def test_a_payload_that_inflates_past_its_tensor_is_refused_without_inflating_it(tmp_path, kind, profile):
    # A crafted file: its header checksums redone, a payload of 256 MiB of zeros for a 4000-element tensor.
    import tracemalloc

    from safetensors import safe_open
    from safetensors.torch import save_file

    from emakit._files import checksums

    _walk(tmp_path, steps=40, every=10, formats=(("compact", {"encoding": "compact"}),))
    path = snapshots.snapshot_paths(tmp_path / "compact")[-1 if profile else 0]  # a delta, the keyframe
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tensors["avg.0/weight"] = torch.frombuffer(bytearray(_bomb_payload(kind, 256 << 20)), dtype=torch.uint8)
    algorithm = meta.get("checksum_algorithm", "crc32")
    meta["checksums"] = json.dumps({k: checksums.hex_digest(v, algorithm) for k, v in tensors.items()})
    save_file(tensors, str(path), metadata=meta)
    tracemalloc.start()
    try:
        with pytest.raises(snapshots.SnapshotError, match=rf"{path.name}: compact tensor 'avg.0/weight' cannot be"):
            posthoc.reconstruct(tmp_path / "compact", sigma_rel=0.1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak  # the payload and a tensor's worth, not 256 MiB
    assert _encoding.decode_keyframe(_encoding.encode_keyframe(torch.ones(5)), (5,)).tolist() == [1.0] * 5


def test_a_predicted_delta_keeps_its_step_and_error_and_needs_fewer_bytes():
    torch.manual_seed(1)
    ref = torch.randn(20_000)
    lower = torch.randn(20_000) * 1e-3  # another profile's increment, which this one's follows
    x = ref.double() + 0.8 * lower.double() + torch.randn(20_000, dtype=torch.float64) * 2e-4
    plain, scale, decoded = _encoding.encode_delta(x, ref)
    a = _encoding.fit_prediction(x, ref, [lower])
    assert len(a) == 1 and a[0] == pytest.approx(0.8, rel=0.02)
    payload, scale_p, decoded_p = _encoding.encode_delta(x, ref, predictors=[lower], coefficients=a)
    assert scale_p == scale  # the step of x - ref: the same error bound ...
    assert float((decoded_p.double() - x).abs().max()) <= scale / 2 + 2 * 2**-24 * float(x.abs().max())
    assert payload.numel() < 0.93 * plain.numel()  # ... in fewer bytes (0.91x here: the steps are 4x smaller)
    assert torch.equal(_encoding.decode_delta(payload, scale, ref, predictors=[lower], coefficients=a), decoded_p)
    assert _encoding.fit_prediction(x, ref, [torch.randn(20_000)]) == ()  # explains nothing: no prediction
    assert _encoding.fit_prediction(ref, ref, [lower]) == ()  # nothing to predict


def test_zstd_payloads_with_and_without_a_stated_size_decode_alike_and_bad_ones_are_refused():
    # emakit's zstd frames state their size (inflated in one call, after the size is checked against the tensor's
    # bound); a frame that does not (another writer's) is streamed: both give the same bits.
    zstandard = pytest.importorskip("zstandard")
    torch.manual_seed(2)
    ref, numel = torch.randn(50_000), 50_000
    x = ref.double() + torch.randn(numel, dtype=torch.float64) * 1e-3
    x[7] += 50.0  # one step beyond int16: an escape after the steps
    payload, scale, decoded = _encoding.encode_delta(x, ref)
    raw = zstandard.ZstdDecompressor().decompress(payload.numpy().tobytes())
    assert zstandard.frame_content_size(payload.numpy().tobytes()) == len(raw)
    unstated = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(raw)
    assert zstandard.frame_content_size(unstated) == -1
    for data in (payload, torch.frombuffer(bytearray(unstated), dtype=torch.uint8)):
        assert torch.equal(_encoding.decode_delta(data, scale, ref), decoded)
    for bad in (
        zstandard.ZstdCompressor(level=1).compress(raw[:-1]),  # a step short
        zstandard.ZstdCompressor(level=1).compress(raw + bytes(1)),  # a byte more than its steps and escapes
        payload.numpy().tobytes()[:-9],  # truncated
        zstandard.ZstdCompressor(level=1).compress(bytes(10 * numel + 5)),  # states more than any delta can hold
    ):
        with pytest.raises(ValueError):
            _encoding.decode_delta(torch.frombuffer(bytearray(bad), dtype=torch.uint8), scale, ref)


def test_a_predictor_given_as_a_difference_predicts_the_same_bits_as_the_difference_itself():
    torch.manual_seed(3)
    ref, later, earlier, other = (torch.randn(30_000) for _ in range(4))
    x = ref.double() + 0.6 * (later - earlier).double() + 0.2 * other.double()
    columns = [later - earlier, other]
    a = _encoding.fit_prediction(x, ref, columns)
    payload, scale, decoded = _encoding.encode_delta(x, ref, predictors=columns, coefficients=a)
    pairs = [(later, earlier), other]  # as the reader passes them: subtracted where used
    assert torch.equal(_encoding.decode_delta(payload, scale, ref, predictors=pairs, coefficients=a), decoded)
    with pytest.raises(ValueError, match="2 coefficients need as many predictors of shape"):
        _encoding.decode_delta(payload, scale, ref, predictors=[(later[:5], earlier[:5]), other], coefficients=a)


def _deltas(seed: int):
    """Deltas of tensors of several shapes (one empty, one with escapes), with 0, 1 and 2 predictors."""
    torch.manual_seed(seed)
    shapes = [(300,), (0,), (7, 11), (1,), (2000,), (5, 4, 3), (64,)]
    out = []
    for n, shape in enumerate(shapes):
        ref, lower, before = (torch.randn(shape) for _ in range(3))
        x = ref.double() + 0.5 * lower.double() + torch.randn(shape, dtype=torch.float64) * 1e-3
        if n == 4:
            x.view(-1)[[3, 1999]] += 40.0  # steps beyond int16: escapes
        columns = [[], [lower], [lower, ref - before]][n % 3]
        a = _encoding.fit_prediction(x, ref, columns) if columns else ()
        payload, scale, decoded = _encoding.encode_delta(x, ref, predictors=columns[: len(a)], coefficients=a)
        pairs = [(lower, torch.zeros(shape)), (ref, before)][: len(a)]
        out.append((payload, scale, ref, pairs, a, decoded))
    return out


@pytest.mark.parametrize("batch", [1 << 20, 500])
def test_many_deltas_decode_together_to_the_bits_of_each_alone(monkeypatch, batch):
    monkeypatch.setattr(_encoding, "BATCH_NUMEL", batch)  # 500: batches cut between (and around) tensors
    deltas = _deltas(4)
    assert {len(d[4]) for d in deltas} == {0, 1, 2}
    payloads, scales, refs, pairs, coefficients, decoded = (list(c) for c in zip(*deltas))
    together = _encoding.decode_deltas(payloads, scales, refs, predictors=pairs, coefficients=coefficients)
    for value, want, p, scale, ref, pair, a in zip(together, decoded, payloads, scales, refs, pairs, coefficients):
        assert value.shape == want.shape and torch.equal(value, want)
        assert torch.equal(_encoding.decode_delta(p, scale, ref, predictors=pair, coefficients=a), want)
    broken = list(payloads)
    broken[5] = torch.frombuffer(bytearray(broken[5].numpy().tobytes()[:-3]), dtype=torch.uint8)
    with pytest.raises(_encoding.PayloadError) as error:
        _encoding.decode_deltas(broken, scales, refs, predictors=pairs, coefficients=coefficients)
    assert error.value.index == 5 and isinstance(error.value, ValueError)


def test_an_escape_outside_its_tensor_is_refused():
    zstandard = pytest.importorskip("zstandard")
    ref = torch.zeros(10)
    steps = torch.zeros(20, dtype=torch.uint8)  # 10 low bytes, 10 high bytes
    for where in (10, -1):  # one past the end; negative (would wrap around)
        escapes = torch.tensor([1, where, 70000], dtype=torch.int32).view(torch.uint8)
        payload = zstandard.ZstdCompressor().compress(torch.cat([steps, escapes]).numpy().tobytes())
        with pytest.raises(ValueError, match="escape outside its 10 steps"):
            _encoding.decode_delta(torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0.5, ref)


def test_a_model_of_many_tensors_reads_back_bit_for_bit_in_batches_and_one_by_one(tmp_path, monkeypatch):
    monkeypatch.setattr(_encoding, "BATCH_NUMEL", 2000)  # several batches per file and profile
    torch.manual_seed(5)
    model = torch.nn.Sequential(*(torch.nn.Linear(9, 9) for _ in range(30)))
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.1, 0.2))
    for step in range(1, 61):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-2)
        pema.update()
        if step % 10 == 0:
            pema.save_snapshot(tmp_path / "compact", encoding="compact")
            pema.save_snapshot(tmp_path / "fp32")
    chain = pema._delta_chain
    infos = posthoc.list_snapshots(tmp_path / "compact")
    assert infos[-1].predictors and len({len(a) for a in infos[-1].predictors.values()}) > 1
    for order in (True, False):  # read in order (decoded in batches), or a tensor at a time
        snapshots.clear_decoded_cache()
        for info in infos:
            keys = [f"avg.{j}/{name}" for j in range(3) for name in info.averaged]
            reader = snapshots.open_tensors(info, keys if order else None)
            values = {key: reader.get(key) for key in keys}
            reader.close()
        for j in range(3):
            for name, value in chain.decoded[j].items():
                assert torch.equal(values[f"avg.{j}/{name}"], value)
    compact = posthoc.reconstruct(tmp_path / "compact", sigma_rel=0.07, progress=False)
    fp32 = posthoc.reconstruct(tmp_path / "fp32", sigma_rel=0.07, progress=False)
    for name in fp32:
        torch.testing.assert_close(compact[name], fp32[name], rtol=0, atol=2e-4)


def _version_is_2_and_a_version_1_claim_is_refused(path, scratch):
    # A reader of version 1 would decode a predicted delta without its prediction: such files say version 2 (an
    # old reader refuses them by name), the others keep version 1.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["version"] == "2" and "predictors" in meta
    with safe_open(str(path.parent / snapshots.file_name(1.0)), framework="pt") as f:
        assert f.metadata()["version"] == "1"  # the keyframe
    scratch.mkdir()
    save_file(tensors, str(scratch / path.name), metadata={**meta, "version": "1"})
    with pytest.raises(snapshots.SnapshotError, match=r"version 1 snapshot with predicted deltas"):
        snapshots.read_info(scratch / path.name)


def test_a_delta_predicted_from_the_snapshot_before_its_reference_needs_that_file(tmp_path):
    model = torch.nn.Linear(8, 4)
    pema = emakit.PowerEMA(model)
    for _ in range(1, 5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 0.1)
        pema.update()
        pema.save_snapshot(tmp_path, encoding="compact")
    info = snapshots.read_info(tmp_path / snapshots.file_name(4.0))
    assert (info.reference, info.previous) == (3.0, 2.0) and info.predictors
    _version_is_2_and_a_version_1_claim_is_refused(tmp_path / snapshots.file_name(4.0), tmp_path / "old")
    snapshots.rewrite_as_keyframe(tmp_path / snapshots.file_name(3.0))  # as prune does, but 4 still reads 2
    (tmp_path / snapshots.file_name(2.0)).unlink()
    snapshots.clear_decoded_cache()
    key = next(k for k, a in info.predictors.items() if len(a) == int(k[4]) + 1)  # one that reads its increment
    reader = snapshots.open_tensors(info)
    with pytest.raises(snapshots.SnapshotError, match=r"phema-0+4.*reference's reference .*phema-0+2.*missing"):
        reader.get(key)
    reader.close()
    # A writer whose snapshot before the reference is gone predicts without it.
    pema.update()
    pema.save_snapshot(tmp_path, encoding="compact")
    pema.update()
    (tmp_path / snapshots.file_name(4.0)).unlink()  # 6 is written against 5, and 4 (5's reference) is gone
    pema.save_snapshot(tmp_path, encoding="compact")
    last = snapshots.read_info(tmp_path / snapshots.file_name(6.0))
    assert last.reference == 5.0 and last.previous is None
