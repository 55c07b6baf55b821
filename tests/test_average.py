"""Averaging ordinary checkpoints (posthoc.average_checkpoints): the uniform mean, the EMA rebuilt from raw
weights, every input format, the times, and bad input."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import emakit
from emakit import posthoc, schedules
from emakit._posthoc import raw_weights
from emakit._posthoc.raw_files import name_step

safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs safetensors")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` state dicts of the same model along a noisy trajectory (integer buffers counting up)."""
    torch.manual_seed(seed)
    model = _net()
    out = []
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            model[1].running_mean.add_(0.05)
            model[1].num_batches_tracked.fill_(10 * (i + 1))
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def _write(directory: Path, states, steps, fmt=lambda s: f"ckpt_{s}.pt", nest=None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for sd, step in zip(states, steps):
        path = directory / fmt(step)
        torch.save(sd if nest is None else {nest: sd, "step": step}, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- uniform mean


def _fairseq_mean(paths: list[Path], key: str) -> dict[str, torch.Tensor]:
    """fairseq's scripts/average_checkpoints.py, re-derived: sum each parameter (half as float), divide by N
    (integers floor-divided)."""
    sums: dict[str, torch.Tensor] = {}
    for path in paths:
        params = torch.load(path, weights_only=True)[key]
        for k, p in params.items():
            p = p.float() if p.dtype == torch.float16 else p
            sums[k] = p.clone() if k not in sums else sums[k] + p
    return {k: v / len(paths) if v.is_floating_point() else v // len(paths) for k, v in sums.items()}


def test_uniform_mean_is_fairseqs_and_a_float64_recomputation(tmp_path):
    states = _states(6)
    paths = _write(tmp_path, states, [100, 200, 300, 400, 500, 600], nest="model")
    got = posthoc.average_checkpoints(tmp_path, last=4)
    assert [t for _, t, _ in got.used] == [300, 400, 500, 600]
    fairseq = _fairseq_mean(paths[2:], "model")
    for name, value in got.state_dict.items():
        if value.is_floating_point():
            exact = sum(sd[name].double() for sd in states[2:]) / 4
            assert_close(value.double(), exact, rtol=1e-6, atol=1e-7)
            assert_close(value, fairseq[name], rtol=0, atol=0)  # same order of sums: the same bits
        else:  # integer buffers: the newest checkpoint's, not a floor-divided mean
            assert torch.equal(value, states[-1][name])
            assert not torch.equal(value, fairseq[name])
    assert got.error_estimate is None and "uniform mean of 4" in got.summary()


def test_step_range_and_all(tmp_path):
    states = _states(5)
    _write(tmp_path, states, [10, 20, 30, 40, 50])
    mid = posthoc.average_checkpoints(tmp_path, steps=(20, 40))
    assert [t for _, t, _ in mid.used] == [20, 30, 40]
    exact = sum(sd["0.weight"].double() for sd in states[1:4]) / 3
    assert_close(mid.state_dict["0.weight"].double(), exact, rtol=1e-6, atol=1e-7)
    everything = posthoc.average_checkpoints(sorted(tmp_path.iterdir()))
    assert len(everything.used) == 5


def test_half_precision_checkpoints_are_summed_in_float32_and_written_back_in_their_dtype(tmp_path):
    states = [{k: v.half() if v.is_floating_point() else v for k, v in sd.items()} for sd in _states(3)]
    _write(tmp_path, states, [1, 2, 3])
    got = posthoc.average_checkpoints(tmp_path, accumulate=torch.float64)
    exact = sum(sd["2.weight"].double() for sd in states) / 3
    assert got.state_dict["2.weight"].dtype == torch.float16
    assert_close(got.state_dict["2.weight"], exact.half())
    as_fp32 = posthoc.average_checkpoints(tmp_path, dtype=torch.float32)
    assert as_fp32.state_dict["2.weight"].dtype == torch.float32
    assert_close(as_fp32.state_dict["2.weight"].double(), exact, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the quadrature


@pytest.mark.parametrize("kind", [dict(sigma_rel=0.1), dict(sigma_rel=0.02), dict(decay=0.99), dict(halflife=30)])
def test_hat_weights_integrate_the_piecewise_linear_trajectory(kind):
    """sum_i w_i theta_i equals a brute-force integral of the profile against the interpolated trajectory."""
    times = [5.5, 12.25, 30.5, 31.0, 60.5, 95.5, 100.0]  # not whole steps: the continuous profile
    values = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5, -0.7, 0.9], dtype=torch.float64)
    p = raw_weights.profile(100.0, **kind)
    q = raw_weights.hat_weights(times, p)
    tau = torch.linspace(0, 100, 2_000_001, dtype=torch.float64)
    mass = p.mass(tau)
    dmass = mass[1:] - mass[:-1]  # the classic EMA's mass at 0 sits in F(0)
    mid = (tau[1:] + tau[:-1]) / 2
    t = torch.tensor(times, dtype=torch.float64)
    theta = torch.where(mid < t[0], values[0], torch.from_numpy(__import__("numpy").interp(mid, t, values)))
    expected = float((dmass * theta).sum() + mass[0] * values[0])
    assert math.isclose(sum(q.weights), 1.0, rel_tol=1e-12)
    assert math.isclose(float(torch.tensor(q.weights, dtype=torch.float64) @ values), expected, rel_tol=1e-6)
    assert math.isclose(q.mass_before_first, float(p.mass(torch.tensor(5.5, dtype=torch.float64))))


@pytest.mark.parametrize("kind", [dict(sigma_rel=0.1), dict(decay=0.97)])
def test_checkpoints_at_every_step_give_the_emas_exact_weights(kind):
    """Whole-step times use the EMA's discrete weights: unrolled from its schedule's decays in float64."""
    T = 200
    schedule = schedules.power(sigma_rel=0.1) if "sigma_rel" in kind else schedules.constant(0.97)
    weights = [1.0] + [0.0] * T  # the average at t=0 is the model at 0
    for step in range(1, T + 1):
        d = schedule(float(step), 1.0)
        weights = [w * d for w in weights]
        weights[step] += 1 - d
    dense = raw_weights.hat_weights(list(range(0, T + 1)), raw_weights.profile(T, **kind))
    assert_close(torch.tensor(dense.weights, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64),
                 rtol=1e-9, atol=1e-12)  # fmt: skip
    sparse = raw_weights.hat_weights(list(range(50, T + 1, 10)), raw_weights.profile(T, **kind))
    assert math.isclose(sparse.mass_before_first, sum(weights[:50]), rel_tol=1e-9)
    expected = [0.0] * len(range(50, T + 1, 10))  # each step's weight split linearly between its checkpoints
    for k in range(T + 1):
        if k <= 50:
            expected[0] += weights[k]
        else:
            i, r = divmod(k - 50, 10)
            expected[i] += weights[k] * (1 - r / 10)
            if r:
                expected[i + 1] += weights[k] * r / 10
    assert_close(torch.tensor(sparse.weights, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def test_the_profiles_are_the_emas():
    """F is the mass of the target EMA on [0, tau]: power (EDM2) and classic, checked against their definitions."""
    gamma = schedules.sigma_rel_to_gamma(0.1)
    p = raw_weights.profile(1000.0, sigma_rel=0.1)
    assert math.isclose(float(p.mass(torch.tensor(500.0, dtype=torch.float64))), 0.5 ** (gamma + 1))
    c = raw_weights.profile(1000.0, decay=0.995)
    # an EMA from t=0 keeps decay**(T - tau) of what it held at tau
    assert math.isclose(float(c.mass(torch.tensor(900.0, dtype=torch.float64))), 0.995**100, rel_tol=1e-12)
    assert math.isclose(float(c.mass(torch.tensor(0.0, dtype=torch.float64))), 0.995**1000, rel_tol=1e-12)


# --------------------------------------------------------------------------- the EMA from raw checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 600-step run where every step is known: the exact EMA and PowerEMA, and a checkpoint at every step."""
    torch.manual_seed(3)
    directory = tmp_path_factory.mktemp("run")
    model = nn.Linear(64, 64)
    ema = emakit.EMA(model, decay=0.99)
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.15))
    drift = torch.randn(64 * 64 + 64) * 0.01
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    torch.save(model.state_dict(), directory / "ckpt_0.pt")
    for step in range(1, 601):
        theta += drift * (1 - step / 600) + 0.02 * torch.randn_like(theta)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, model.parameters())
        ema.update()
        pema.update()
        torch.save(model.state_dict(), directory / f"ckpt_{step}.pt")
    exact = {
        "decay": ema.averaged_state_dict(),
        "sigma_rel": pema.averaged_state_dict(sigma_rel=0.05),
        "wide": pema.averaged_state_dict(sigma_rel=0.15),
    }
    return directory, exact


def _rms(a, b) -> float:
    return float(torch.cat([(a[k].double() - b[k].double()).reshape(-1) for k in a]).square().mean().sqrt())


@pytest.mark.parametrize("target", [("decay", dict(decay=0.99)), ("sigma_rel", dict(sigma_rel=0.05)),
                                    ("wide", dict(sigma_rel=0.15))])  # fmt: skip
def test_ema_rebuilt_from_checkpoints_converges_and_the_estimate_bounds_the_error(run, target):
    directory, exact = run
    name, kwargs = target
    errors = []
    for every in (2, 10, 50):
        files = [directory / f"ckpt_{s}.pt" for s in range(0, 601, every)]
        got = posthoc.average_checkpoints(files, **kwargs)
        error = _rms(got.state_dict, exact[name])
        assert got.error_estimate >= error, (every, got.error_estimate, error)
        assert got.error_estimate <= 3 * error, (every, got.error_estimate, error)  # an estimate, not a shrug
        errors.append(error)
    assert errors[0] < errors[1] < errors[2], errors


def test_mass_before_the_first_checkpoint_is_reported(run):
    directory, _ = run
    files = [directory / f"ckpt_{s}.pt" for s in range(300, 601, 20)]
    got = posthoc.average_checkpoints(files, sigma_rel=0.15)
    decays = [schedules.power(sigma_rel=0.15)(float(j), 1.0) for j in range(300, 601)]
    assert math.isclose(got.mass_before_first, math.prod(decays), rel_tol=1e-9)  # the average at 299, kept
    assert "before the first checkpoint" in got.summary()
    short = posthoc.average_checkpoints(files, decay=0.9)  # a short EMA: old checkpoints weigh nothing
    assert short.skipped > 0 and len(short.used) + short.skipped == len(files)


def test_sweep_on_checkpoints_finds_the_length_that_matches(run, tmp_path):
    directory, exact = run
    files = [directory / f"ckpt_{s}.pt" for s in range(0, 601, 10)]
    model = nn.Linear(64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def distance(m):  # lower is better: distance to the exact sigma_rel=0.05 EMA
        return _rms(m.state_dict(), exact["sigma_rel"])

    result = posthoc.sweep_checkpoints(files, distance, model=model, sigma_rel=[0.02, 0.05, 0.1, 0.2], out=tmp_path)
    assert result.best["sigma_rel"] == 0.05 and "error_estimate" in result.best
    assert "est. error" in (tmp_path / "report.md").read_text()
    searched = posthoc.sweep_checkpoints(files, distance, model=model, sigma_rel=[0.01, 0.2], search=True,
                                         max_evaluations=8, plot=False)  # fmt: skip
    assert abs(math.log(searched.best["sigma_rel"] / 0.05)) < 0.3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# --------------------------------------------------------------------------- formats and times


def test_step_from_names():
    assert name_step("checkpoint-1500") == 1500
    assert name_step("epoch=3-step=1500.ckpt") == 1500
    assert name_step("epoch=3-step=1500-v1.ckpt") == 1500
    assert name_step("ckpt_1500.pt") == 1500
    assert name_step("checkpoint_2_1500.pt") == 1500  # fairseq: epoch, then updates
    assert name_step("model_step1500.safetensors") == 1500
    assert name_step("last.pt") is None


def test_nested_keys_prefixes_and_a_named_key(tmp_path):
    states = _states(3)
    for i, (sd, step) in enumerate(zip(states, [1, 2, 3])):
        prefixed = {("module." if i % 2 else "_orig_mod.") + k: v for k, v in sd.items()}
        torch.save({"state_dict": prefixed, "ema": sd, "global_step": step}, tmp_path / f"run-{step}.pt")
    got = posthoc.average_checkpoints(tmp_path, step_key="global_step")
    assert set(got.state_dict) == set(states[0])
    exact = sum(sd["0.bias"].double() for sd in states) / 3
    assert_close(got.state_dict["0.bias"].double(), exact, rtol=1e-6, atol=1e-7)
    ema = posthoc.average_checkpoints(tmp_path, key="ema")
    assert_close(ema.state_dict["0.bias"], got.state_dict["0.bias"])


def test_safetensors_files_and_sharded_save_pretrained_folders(tmp_path):
    states = _states(2)
    single = tmp_path / "single"
    single.mkdir()
    for sd, step in zip(states, [100, 200]):
        safetensors_torch.save_file(sd, str(single / f"model-step{step}.safetensors"))
    got = posthoc.average_checkpoints(single)
    assert [t for _, t, _ in got.used] == [100, 200]
    # Hugging Face layout: checkpoint-N/ with model-0000k-of-00002.safetensors, an index and trainer_state.json
    trainer = tmp_path / "trainer"
    for sd, step in zip(states, [100, 200]):
        folder = trainer / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        names = sorted(sd)
        parts = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for file, keys in parts.items():
            safetensors_torch.save_file({k: sd[k] for k in keys}, str(folder / file))
        index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step + 7}))
    from_folders = posthoc.average_checkpoints(trainer)
    assert [t for _, t, _ in from_folders.used] == [107, 207]  # the Trainer's own count wins over the name
    for k, v in got.state_dict.items():
        assert torch.equal(v, from_folders.state_dict[k])


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # Lightning 2.6 on torch 2.13's pytree
def test_lightning_checkpoints_written_by_lightning(tmp_path):
    L = pytest.importorskip("lightning", reason="needs Lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 2)

        def training_step(self, batch, _):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 3)), batch_size=4)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=8, callbacks=[saver], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(Module(), data)
    files = sorted(tmp_path.glob("*.ckpt"))
    got = posthoc.average_checkpoints(tmp_path, last=3)
    assert [t for _, t, _ in got.used] == [4, 6, 8]
    weights = [torch.load(f, weights_only=True)["state_dict"]["net.weight"] for f in files]
    by_step = {int(torch.load(f, weights_only=True)["global_step"]): w for f, w in zip(files, weights)}
    exact = sum(by_step[s].double() for s in (4, 6, 8)) / 3
    assert_close(got.state_dict["net.weight"].double(), exact, rtol=1e-6, atol=1e-7)
    out = posthoc.save_average(got, tmp_path / "averaged.ckpt")  # Lightning's format, its names kept
    written = torch.load(out, weights_only=True)
    assert written["global_step"] == 8 and torch.equal(written["state_dict"]["net.weight"], got.state_dict["net.weight"])


def test_dcp_directories_need_trust(tmp_path):
    import torch.distributed.checkpoint as dcp

    states = _states(2)
    for sd, step in zip(states, [5, 9]):
        dcp.save({"model": sd}, checkpoint_id=str(tmp_path / f"step_{step}"), no_dist=True)
    with pytest.raises(posthoc.CheckpointSourceError, match="DCP directory.*trust=True"):
        posthoc.average_checkpoints(tmp_path)
    got = posthoc.average_checkpoints(tmp_path, trust=True, key="model")
    exact = (states[0]["2.weight"].double() + states[1]["2.weight"].double()) / 2
    assert_close(got.state_dict["2.weight"].double(), exact, rtol=1e-6, atol=1e-7)


def test_outputs_safetensors_and_torch_files(tmp_path):
    _write(tmp_path / "in", _states(3), [1, 2, 3], nest="model")
    got = posthoc.average_checkpoints(tmp_path / "in")
    st = posthoc.save_average(got, tmp_path / "avg.safetensors")
    loaded = safetensors_torch.load_file(str(st))
    assert all(torch.equal(loaded[k], v) for k, v in got.state_dict.items())
    pt = posthoc.save_average(got, tmp_path / "avg.pt")  # the input's format: {"model": ..., "step": ...}
    written = torch.load(pt, weights_only=True)
    assert written["step"] == 3 and all(torch.equal(written["model"][k], v) for k, v in got.state_dict.items())


@pytest.mark.parametrize("name", ["avg.safetensors", "avg.pt"])
def test_a_save_average_that_fails_midway_leaves_the_earlier_file_whole_and_no_temporary(tmp_path, monkeypatch, name):
    _write(tmp_path / "in", _states(3), [1, 2, 3], nest="model")
    got = posthoc.average_checkpoints(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    before = posthoc.save_average(got, out / name).read_bytes()

    def dies_halfway(obj, where, *args, **kwargs):  # the writer of either format, cut off after some bytes
        with open(where, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    monkeypatch.setattr(safetensors_torch, "save_file", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        posthoc.save_average(got, out / name)
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == before
    with pytest.raises(OSError, match="disk full"):
        posthoc.save_average(got, out / f"new-{name}")  # nothing there before: nothing there after
    assert [p.name for p in out.iterdir()] == [name]


# --------------------------------------------------------------------------- bad input


class _Payload:
    def __reduce__(self):
        return (os.makedirs, (os.path.join(os.environ["EMAKIT_TEST_MARKER"], "ran"),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_malicious_pickle_runs_no_code(tmp_path, monkeypatch, writer):
    monkeypatch.setenv("EMAKIT_TEST_MARKER", str(tmp_path))
    _write(tmp_path / "in", _states(1), [1], nest="state_dict")
    payload = {"state_dict": _states(1)[0], "step": 2, "x": _Payload()}
    if writer == "torch.save":
        torch.save(payload, tmp_path / "in" / "ckpt_2.pt")
    else:
        with open(tmp_path / "in" / "ckpt_2.pt", "wb") as f:
            pickle.dump(payload, f)
    for step_key in (None, "step"):  # reading the step from the file must not run it either
        with pytest.raises(posthoc.CheckpointSourceError, match=r"weights_only=True.*trust=True"):
            posthoc.average_checkpoints(tmp_path / "in", step_key=step_key)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing_key", r"holds other tensors than .*missing \['2.bias'\]"),
        ("shape", r"'0.weight' is torch.float32 \(5, 4\) in .* but torch.float32 \(8, 4\)"),
        ("nan", r"'2.weight' in .*ckpt_3.pt.*holds NaN or Inf"),
        ("duplicate", r"both have t=3"),
        ("no_step", r"cannot tell the training step of .*last.pt"),
    ],
)
def test_bad_checkpoints_raise_one_clear_error(tmp_path, damage, match):
    states = _states(3)
    if damage == "missing_key":
        del states[2]["2.bias"]
    elif damage == "shape":
        states[2]["0.weight"] = torch.zeros(5, 4)
    elif damage == "nan":
        states[2]["2.weight"][0, 0] = float("nan")
    _write(tmp_path, states, [1, 2, 3])
    if damage == "duplicate":
        torch.save(states[0], tmp_path / "run-3.pt")
    if damage == "no_step":
        torch.save(states[0], tmp_path / "last.pt")
    with pytest.raises(posthoc.CheckpointSourceError, match=match):
        posthoc.average_checkpoints(tmp_path)


def test_arguments_are_checked_before_anything_is_read(tmp_path):
    with pytest.raises(posthoc.CheckpointSourceError, match="no file or folder"):
        posthoc.average_checkpoints(tmp_path / "nowhere")
    _write(tmp_path, _states(2), [1, 2])
    with pytest.raises(ValueError, match=r"at most one of .*\['last', 'sigma_rel'\]"):
        posthoc.average_checkpoints(tmp_path, last=2, sigma_rel=0.1)
    with pytest.raises(ValueError, match="last must be an int >= 1, got last=0"):
        posthoc.average_checkpoints(tmp_path, last=0)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\), got decay=1.5"):
        posthoc.average_checkpoints(tmp_path, decay=1.5)
    with pytest.raises(posthoc.CheckpointSourceError, match="times must give one t per checkpoint"):
        posthoc.average_checkpoints(tmp_path, times=[1])
    with pytest.raises(posthoc.CheckpointSourceError, match="t=7 is no checkpoint's time"):
        posthoc.average_checkpoints(tmp_path, sigma_rel=0.1, t=7)


# --------------------------------------------------------------------------- the command line


def test_cli_average_writes_the_mean_and_the_ema(tmp_path, capsys):
    from emakit.cli import main

    states = _states(4)
    _write(tmp_path / "in", states, [10, 20, 30, 40], nest="model")
    assert main(["average", str(tmp_path / "in"), "--last", "2", "--out", str(tmp_path / "mean.safetensors")]) == 0
    mean = safetensors_torch.load_file(str(tmp_path / "mean.safetensors"))
    assert_close(mean["0.weight"].double(), (states[2]["0.weight"].double() + states[3]["0.weight"].double()) / 2)
    assert "uniform mean of 2 checkpoints" in capsys.readouterr().out
    files = [str(p) for p in sorted((tmp_path / "in").iterdir())]
    assert main(["average", *files, "--sigma-rel", "0.1", "--out", str(tmp_path / "ema.pt"), "-q"]) == 0
    expected = posthoc.average_checkpoints(files, sigma_rel=0.1).state_dict
    written = torch.load(tmp_path / "ema.pt", weights_only=True)["model"]
    assert all(torch.equal(written[k], v) for k, v in expected.items())


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "no file or folder at"),
        ("mixed", "holds other tensors than"),
        ("nan", "holds NaN or Inf"),
        ("no_step", "cannot tell the training step"),
        ("pickle", "weights_only=True"),
        ("junk", r"cannot read .* with torch.load\(weights_only=True\)"),
    ],
)
def test_cli_average_bad_input_is_one_line_rc_2_and_nothing_written(tmp_path, capsys, case, match):
    from emakit.cli import main

    states = _states(3)
    if case == "mixed":
        states[1] = {"other.weight": torch.zeros(2)}
    if case == "nan":
        states[1]["0.bias"][0] = float("inf")
    _write(tmp_path / "in", states, [1, 2, 3])
    if case == "no_step":
        torch.save(states[0], tmp_path / "in" / "final.pt")
    if case == "pickle":
        with open(tmp_path / "in" / "ckpt_4.pt", "wb") as f:
            pickle.dump({"state_dict": states[0], "args": argparse_like()}, f)
    if case == "junk":
        (tmp_path / "in" / "ckpt_9.pt").write_bytes(b"not a checkpoint")
    source = str(tmp_path / ("nowhere" if case == "missing" else "in"))
    out = tmp_path / "avg.pt"
    assert main(["average", source, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("emakit average: error:"), err
    assert __import__("re").search(match, err), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def argparse_like():
    import collections

    return collections.OrderedDict  # a class: beyond what weights_only unpickles
