"""The diffusion recipe: config overrides, exact resume, atomic checkpoints, the sampler."""

import dataclasses
import json
import os

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
    "precision=bf16",  # pinned: RECORDED_LOSSES are bf16 autocast whatever this CPU's auto picks
]


def losses(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_config_overrides_are_typed_and_unknown_keys_refused():
    cfg = D.Config.from_overrides(["steps=10", "lr=0.01", "resume=true", "sigma_rels=0.02,0.2"])
    assert cfg.steps == 10 and cfg.lr == 0.01 and cfg.resume is True and cfg.sigma_rels == (0.02, 0.2)
    with pytest.raises(ValueError, match="unknown config key 'stpes'"):
        D.Config.from_overrides(["stpes=10"])
    with pytest.raises(ValueError, match="steps"):
        D.Config.from_overrides(["steps=ten"])
    with pytest.raises(ValueError, match="divisible"):
        D.Config.from_overrides(["batch_size=10", "accum_steps=3"])
    with pytest.raises(ValueError, match="key=value"):
        D.Config.from_overrides(["steps"])


def test_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    a = D.train(D.Config.from_overrides([*TINY, "steps=40", f"out_dir={straight}"]))
    D.train(D.Config.from_overrides([*TINY, "steps=20", f"out_dir={split}"]))
    b = D.train(D.Config.from_overrides([*TINY, "steps=40", f"out_dir={split}", "resume=true"]))
    la, lb = losses(straight), losses(split)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(5, 41, 5))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # bit-identical, not just close
    # Recorded values (this machine, torch 2.13 CPU, bf16 autocast): catch silent changes to the recipe.
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in la[:3]]), torch.tensor(RECORDED_LOSSES), rtol=2e-3, atol=0
    )
    for k, v in a["model"].state_dict().items():
        assert torch.equal(v, b["model"].state_dict()[k]), k
    for s in (0.05, 0.1):
        for k, v in a["pema"].averaged_state_dict(sigma_rel=s).items():
            assert torch.equal(v, b["pema"].averaged_state_dict(sigma_rel=s)[k]), k
    assert sorted(p.name for p in (straight / "phema").iterdir()) == sorted(p.name for p in (split / "phema").iterdir())


RECORDED_LOSSES = [0.971962034702301, 0.9686286747455597, 0.9867613911628723]  # steps 5, 10, 15


def test_auto_precision_uses_bf16_only_where_the_cpu_computes_it(monkeypatch):
    cpu, real = D.Config(device="cpu"), D.cpu_has_fast_bf16
    monkeypatch.setattr(D, "cpu_has_fast_bf16", lambda: False)
    assert D.resolve(cpu) == (torch.device("cpu"), None, False)
    assert D.resolve(dataclasses.replace(cpu, precision="bf16"))[1] is torch.bfloat16  # asked for: given
    monkeypatch.setattr(D, "cpu_has_fast_bf16", lambda: True)
    assert D.resolve(cpu) == (torch.device("cpu"), torch.bfloat16, False)
    with pytest.raises(ValueError, match="precision=fp16 needs a CUDA device"):
        D.resolve(dataclasses.replace(cpu, precision="fp16"))
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
        assert real() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_interrupted_checkpoint_never_loads(tmp_path, monkeypatch):
    good = {"step": 1, "weights": torch.ones(3)}
    path = tmp_path / "checkpoint.pt"
    D.save_atomic(good, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        D.save_atomic({"step": 2, "weights": torch.zeros(10**6)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    # What a hard kill in the middle of torch.save leaves is a truncated temporary file under
    # another name; the recipe never looks at it, and it would not load anyway.
    torch.save({"step": 3, "weights": torch.zeros(10**5)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    partial = tmp_path / ".checkpoint.pt.999.tmp"
    partial.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError):
        torch.load(partial, weights_only=True)
    assert torch.load(path, weights_only=True)["step"] == 1


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_is_seeded_and_bounded(method):
    torch.manual_seed(0)
    model = D.Denoiser(hidden=32)
    a = D.sample(model, 7, steps=5, method=method, seed=3, batch=4)
    b = D.sample(model, 7, steps=5, method=method, seed=3, batch=4)
    assert a.shape == (7, 64) and torch.equal(a, b)
    assert a.abs().max() <= 1 and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="method"):
        D.sample(model, 1, method="euler")


def test_data_is_bundled_and_scaled():
    x, y = D.load_digits_tensor()
    assert x.shape == (1797, 64) and x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))


def test_command_line_resume_flag(tmp_path, capsys):
    common = [*TINY, f"out_dir={tmp_path}", "steps=10"]
    assert D.main(common) == 0
    assert D.main([*common[:-1], "steps=20", "--resume"]) == 0
    assert [r["step"] for r in losses(tmp_path)] == [5, 10, 15, 20]
    assert "trained to step 20" in capsys.readouterr().out


def test_tensorboard_log_reads_back(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard logging needs the tensorboard package (in .[dev])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    out = tmp_path / "run"
    D.train(D.Config.from_overrides([*TINY, "steps=20", f"out_dir={out}"]))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    logged = losses(out)
    assert [s.step for s in scalars] == [r["step"] for r in logged] == [5, 10, 15, 20]
    torch.testing.assert_close(
        torch.tensor([s.value for s in scalars]), torch.tensor([r["loss"] for r in logged]), rtol=1e-6, atol=0
    )
