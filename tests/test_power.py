"""PowerEMA: profiles against the closed-form weights, one pass == separate EMAs, resume, snapshots."""

import io
import os

import pytest
import torch
from torch import nn

import emakit
from emakit import kernels, schedules, snapshots

pytest.importorskip("safetensors", reason="snapshots need the safetensors extra (installed by .[dev])")


@pytest.fixture(autouse=True, params=["gathered", "per-tensor"])
def update_path(request, monkeypatch):
    monkeypatch.setattr(kernels, "SMALL_NUMEL", kernels.SMALL_NUMEL if request.param == "gathered" else 0)
    monkeypatch.setitem(kernels._CHUNK, "cpu", 64)  # several chunks per tensor: the one-pass path


def make_model():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))


def step_(model, scale=0.05):
    model.train()
    model(torch.randn(8, 6, dtype=next(model.parameters()).dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_profiles_match_closed_form_weights_for_irregular_dt():
    model = nn.Linear(5, 4)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.2), dtype=torch.float64)
    times, values, t = [], [], 0
    for dt in [3, 1, 1, 17, 4, 64, 2, 9, 30, 1]:
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        t += dt
        pema.update(t=t)
        times.append(t)
        values.append(model.weight.detach().double().clone())
    prev = [0] + times[:-1]
    for sigma_rel, gamma in zip((0.05, 0.2), pema.gammas):
        expected = sum(((b / t) ** (gamma + 1) - (a / t) ** (gamma + 1)) * v for a, b, v in zip(prev, times, values))
        got = pema.averaged_state_dict(sigma_rel=sigma_rel, dtype="average")["weight"]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_one_pass_equals_separate_power_emas_and_every_k_with_dt_k():
    model = make_model().to(torch.bfloat16)  # staged: the chunks are converted once for both profiles
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    single = [emakit.EMA(model, schedule=schedules.power(sigma_rel=s)) for s in (0.05, 0.10)]
    every_k = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    for _ in range(6):
        step_(model)
        for _ in range(3):
            pema.update()
            for e in single:
                e.update()
        every_k.update(dt=3)
    for s, e in zip((0.05, 0.10), single):
        for k, v in e.averaged_state_dict(dtype="average").items():
            assert torch.equal(pema.averaged_state_dict(sigma_rel=s, dtype="average")[k], v), k
            torch.testing.assert_close(every_k.averaged_state_dict(sigma_rel=s, dtype="average")[k], v)
    assert pema.averaged_state_dict(sigma_rel=0.05)["0.weight"].dtype == torch.bfloat16


def test_resume_is_bit_identical_and_profiles_must_match():
    model = make_model()
    a = emakit.PowerEMA(model)
    for _ in range(3):
        step_(model)
        a.update()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = emakit.PowerEMA(model)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        step_(model)
        a.update()
        b.update()
    for s in a.sigma_rels:
        for k, v in a.averaged_state_dict(sigma_rel=s).items():
            assert torch.equal(b.averaged_state_dict(sigma_rel=s)[k], v)
    other = emakit.PowerEMA(model, sigma_rels=(0.05, 0.15))
    with pytest.raises(ValueError, match="gammas"):
        other.load_state_dict(a.state_dict())
    assert other.t == 0


def test_selecting_profiles_and_errors():
    model = make_model()
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    step_(model)
    pema.update()
    with pytest.raises(ValueError, match="pick one"):
        pema.averaged_state_dict()
    with pytest.raises(ValueError, match="not tracked"):
        pema.averaged_state_dict(sigma_rel=0.08)
    with pema.swapped(sigma_rel=0.10):
        assert torch.equal(model[0].weight, pema.averaged_state_dict(sigma_rel=0.10)["0.weight"])
    for kwargs, match in [
        ({"sigma_rels": ()}, "non-empty"),
        ({"sigma_rels": 0.1}, "sequence"),
        ({"sigma_rels": (0.1, 0.1)}, "distinct"),
        ({"sigma_rels": (0.3,)}, "sigma_rel"),
        ({"sigma_rels": (0.1,), "gammas": (3.0,)}, "not both"),
    ]:
        with pytest.raises(ValueError, match=match):
            emakit.PowerEMA(model, **kwargs)
    assert emakit.PowerEMA(model, gammas=(6.9372,)).sigma_rels[0] == pytest.approx(0.1, abs=1e-5)


def test_snapshot_is_self_describing(tmp_path):
    model = make_model()
    model[0].weight.requires_grad_(False)  # frozen: stored as static
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    with pytest.raises(ValueError, match="t=0"):
        pema.save_snapshot(tmp_path)
    for _ in range(4):
        step_(model)
        pema.update(dt=8)
    path = pema.save_snapshot(tmp_path)
    assert path.name == "phema-000000000000032.safetensors"
    info = snapshots.read_info(path)
    assert info.t == 32 and info.num_updates == 4
    assert info.sigma_rels == pytest.approx((0.05, 0.10)) and info.gammas == pema.gammas
    assert info.static == ("0.weight",) and info.copied == ("1.num_batches_tracked",)
    assert info.keys == tuple(model.state_dict())
    assert info.dtype == torch.float32
    with pytest.raises(FileExistsError):
        pema.save_snapshot(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.warns(UserWarning, match="amplifies"):
        half = pema.save_snapshot(tmp_path / "half", dtype=torch.float16)
    assert snapshots.read_info(half).dtype == torch.float16


def test_crash_while_writing_leaves_no_snapshot(tmp_path, monkeypatch):
    model = make_model()
    pema = emakit.PowerEMA(model)
    step_(model)
    pema.update()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during the rename")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "link", crash)  # snapshots move into place with link (never replacing)
    with pytest.raises(KeyboardInterrupt):
        pema.save_snapshot(tmp_path)
    assert list(tmp_path.iterdir()) == []
    # A temporary file left by a hard kill is not a snapshot.
    (tmp_path / ".phema-000000000000001.safetensors.123.tmp").write_bytes(b"partial")
    assert snapshots.snapshot_paths(tmp_path) == []


def test_a_complex_average_is_refused_by_save_snapshot_before_anything_is_written(tmp_path):
    # Snapshots store averages as real numbers: writing a complex one would drop its imaginary part.
    model = nn.Linear(4, 3)
    model.register_buffer("phase", torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64))
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    pema.update(dt=10)
    with pytest.raises(ValueError, match=r"complex tensor 'phase' would lose its imaginary part.*include="):
        pema.save_snapshot(tmp_path)
    assert list(tmp_path.iterdir()) == []
    kept = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10), include=lambda name: name != "phase")
    kept.update(dt=10)
    info = snapshots.read_info(kept.save_snapshot(tmp_path))
    assert "phase" not in info.averaged and "weight" in info.averaged


def test_float8_tensors_are_averaged_in_fp32_and_come_back_as_float8(tmp_path):
    # torch has no float8 arithmetic: such an average used to fail in lerp_ (EMA) or in the finiteness check
    # (save_snapshot). The fp32 average of the float8 values is the reference: a model holding them as fp32.
    values = [torch.tensor([0.5, 1.0, 2.0, -3.0]), torch.tensor([0.75, -1.5, 2.5, 4.0])]
    models = {}
    for dtype in (torch.float8_e4m3fn, torch.float32):
        model = nn.Linear(4, 3)
        model.register_buffer("scale", values[0].to(torch.float8_e4m3fn).to(dtype))
        models[dtype] = model
    emas = {dtype: emakit.EMA(model, decay=0.9) for dtype, model in models.items()}
    for step in range(4):
        for dtype, model in models.items():
            model.scale.copy_(values[step % 2].to(torch.float8_e4m3fn).to(dtype))
            emas[dtype].update()
    got = emas[torch.float8_e4m3fn].averaged_state_dict()["scale"]
    want = emas[torch.float32].averaged_state_dict()["scale"]
    assert got.dtype == torch.float8_e4m3fn and not bool((want == want.to(torch.float8_e4m3fn).float()).all())
    assert torch.equal(got.float(), want.to(torch.float8_e4m3fn).float())
    pema = emakit.PowerEMA(models[torch.float8_e4m3fn], sigma_rels=(0.05, 0.10))
    for _ in range(4):
        pema.update(dt=10)
        pema.save_snapshot(tmp_path)
    from emakit import posthoc, verify

    assert verify.verify([tmp_path]) == []
    out = posthoc.reconstruct(tmp_path, sigma_rel=0.08, progress=False)
    assert out["scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(out["scale"].float(), values[1].to(torch.float8_e4m3fn).float())  # constant since the EMA began
