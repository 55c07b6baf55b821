"""``emakit.lightning``: the callbacks under a real Lightning Trainer (one CPU process).

Every expected value comes from outside the callback: the weight trajectory recorded by the
test (a float64 EMA of it), a straight run compared with a stopped-and-resumed one, Lightning's
own ``EMAWeightAveraging`` on the same run. Two-rank DDP / FSDP2 runs: tests/lightning_scenarios.py.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

pytest.importorskip("lightning", reason="Lightning is not installed (pip install 'emakit[lightning]')")
import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

import emakit  # noqa: E402
from emakit import posthoc, schedules  # noqa: E402
from emakit.lightning import RAW_STATE_DICT_KEY, EMACallback, PowerEMACallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning's pytree use on torch 2.13
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*but have no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),  # tests that resume with other callbacks
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),  # resuming into another checkpoint directory
]

BATCH = 16


class Net(L.LightningModule):
    """A small regression model with BatchNorm (float running stats and an integer counter)."""

    def __init__(self, lr: float = 0.05, inf_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.lr = lr
        self.inf_at = inf_at  # batch indices whose loss is made infinite (fp16 overflow)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        if batch_idx in self.inf_at:
            loss = loss * math.inf
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), batch_size=len(x))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), batch_size=len(x))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(n: int, seed: int = 1, batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def trainer(tmp_path: Path | None = None, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


class Trajectory(L.Callback):
    """Records the model's state after every training batch (the test's own reference)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def float64_ema(states: list[dict[str, torch.Tensor]], decays: list[float]) -> dict[str, torch.Tensor]:
    """``ema <- d * ema + (1 - d) * w`` in float64 over ``states[1:]`` from ``states[0]``; integer tensors copied."""
    ema = {k: v.double() if v.is_floating_point() else v for k, v in states[0].items()}
    for state, d in zip(states[1:], decays):
        for k, v in state.items():
            ema[k] = d * ema[k] + (1 - d) * v.double() if v.is_floating_point() else v
    return ema


def ema_tensors(average) -> dict[str, torch.Tensor]:
    """Every tensor of an average's state, by a flat key."""
    state = average.state_dict()
    out = {f"averages.{k}.{n}": v for k, profile in enumerate(state["averages"]) for n, v in profile.items()}
    out.update({f"copies.{n}": v for n, v in state["copies"].items()})
    return out


def assert_bitwise_equal(a, b) -> None:
    ta, tb = ema_tensors(a), ema_tensors(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert (a.t, a.num_updates) == (b.t, b.num_updates)


# --------------------------------------------------------------------------- updates


def test_one_update_per_optimizer_step_with_accumulation_and_fp16_skips(tmp_path):
    """Accumulating 2 batches per step, fp16 with a GradScaler that skips 2 steps on overflow.

    20 batches = 10 optimizer steps by Lightning's count (``global_step``), of which 2 did not
    change the weights: the average takes 8 updates, one per step that ran, each equal to a
    float64 EMA of the recorded weights at the batches where the weights changed.
    """
    record = Trajectory()
    callback = EMACallback(decay=0.8, locate_nonfinite=True)
    scaler = torch.amp.GradScaler("cpu")
    run = trainer(
        max_steps=10,
        accumulate_grad_batches=2,
        callbacks=[callback, record],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    run.fit(Net(lr=0.01, inf_at=(7, 12)), loader(20 * BATCH))  # batch 7 ends step 4, batch 12 is in step 7
    assert run.global_step == 10  # Lightning counts the skipped steps too
    assert scaler.get_scale() == 2.0**16 / 4  # halved at each of the 2 overflows
    assert (callback.ema.t, callback.ema.num_updates) == (8, 8)
    # The overflowing steps never reached the average: nothing was marked non-finite.
    assert callback.ema.locate_nonfinite and all(m[0] < 0 for m in callback.ema._nonfinite_marks.values())
    assert callback.ema._nonfinite_marks  # (the marks exist: each update checked)

    # The reference finds the real steps on its own: the batches after which the parameters moved.
    params = [k for k in record.states[0] if not k.startswith("net.1.running") and "num_batches" not in k]
    moved = [
        i
        for i in range(1, len(record.states))
        if any(not torch.equal(record.states[i][k], record.states[i - 1][k]) for k in params)
    ]
    assert moved == [2, 4, 6, 10, 12, 16, 18, 20]  # batch numbers (1-based): steps 4 and 7 are missing
    states = [record.states[0]] + [record.states[i] for i in moved]
    want = float64_ema(states, [0.8] * len(moved))
    got = callback.ema.averaged_state_dict(dtype="average")
    for name, value in want.items():
        if value.is_floating_point():
            assert_close(got[name].double(), value, rtol=0, atol=1e-6, msg=name)
    assert got["net.1.num_batches_tracked"].item() == 20  # copied, as the model's: every batch ran forward


def test_time_in_samples_sums_the_batches_of_each_step(tmp_path):
    """``time="samples"``: dt is the number of samples of the batches accumulated into the step."""
    calls = []

    def schedule(t, dt):
        calls.append((t, dt))
        return 0.9**dt

    callback = EMACallback(schedule=schedule, time="samples")
    run = trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[callback])
    run.fit(Net(), loader(5 * BATCH + 8))  # batches of 16, 16, 16, 16, 16, 8
    assert calls == [(32, 32), (64, 32), (88, 24)]  # the last step: 16 + 8
    assert callback.ema.t == 88


def test_manual_optimization_counts_the_steps_that_ran(tmp_path):
    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            self.manual_backward(nn.functional.mse_loss(self(x), y))
            if batch_idx % 3 == 0:  # steps after batches 0, 3, 6, 9
                opt.step()
                opt.zero_grad()

    callback = EMACallback(decay=0.9)
    run = trainer(max_epochs=1, callbacks=[callback])
    run.fit(Manual(), loader(10 * BATCH))
    assert (run.global_step, callback.ema.t, callback.ema.num_updates) == (4, 4, 4)


# --------------------------------------------------------------------------- evaluation


def test_validate_test_and_predict_run_with_the_average_and_restore_the_weights(tmp_path):
    callback = EMACallback(decay=0.9)
    run = trainer(max_steps=30, callbacks=[callback])
    model = Net()
    val = loader(4 * BATCH, seed=7)
    run.fit(model, loader(10 * BATCH))
    raw = copy.deepcopy(model.state_dict())
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(callback.ema.averaged_state_dict())
    averaged.eval()
    x, y = val.dataset.tensors
    with torch.no_grad():
        want_ema, want_raw = nn.functional.mse_loss(averaged(x), y).item(), None
        model.eval()
        want_raw = nn.functional.mse_loss(model(x), y).item()

    got = run.validate(model, val, verbose=False)[0]["val_loss"]
    assert got == pytest.approx(want_ema, rel=1e-6) and got != pytest.approx(want_raw, rel=1e-3)
    assert run.test(model, val, verbose=False)[0]["test_loss"] == pytest.approx(want_ema, rel=1e-6)
    predictions = torch.cat(run.predict(model, val))
    with torch.no_grad():
        assert_close(predictions, averaged(x))
    for name, value in model.state_dict().items():  # its own weights are back
        assert torch.equal(value, raw[name]), name

    callback.averaged_in = ("test",)  # per stage
    assert run.validate(model, val, verbose=False)[0]["val_loss"] == pytest.approx(want_raw, rel=1e-6)
    assert run.test(model, val, verbose=False)[0]["test_loss"] == pytest.approx(want_ema, rel=1e-6)
    print(f"val loss raw {want_raw:.4f}, EMA {want_ema:.4f}")


def test_weights_come_back_when_validation_raises(tmp_path):
    class Failing(Net):
        def validation_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    callback = EMACallback(decay=0.5)
    model = Failing()
    run = trainer(max_steps=5, callbacks=[callback])
    run.fit(model, loader(5 * BATCH))
    raw = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        run.validate(model, loader(BATCH), verbose=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name]), name
    callback.ema.update()  # not left inside swapped()


# --------------------------------------------------------------------------- checkpoints


def _fit(tmp: Path, max_steps: int, ckpt_path=None, checkpoint_weights="raw"):
    ema = EMACallback(decay=0.9, checkpoint_weights=checkpoint_weights)
    pema = PowerEMACallback(
        sigma_rels=(0.05, 0.10), time="samples", snapshot_every=10 * BATCH, snapshot_dir=tmp / "phema"
    )
    saver = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    run = trainer(tmp, max_steps=max_steps, callbacks=[ema, pema, saver], enable_checkpointing=True)
    model = Net()
    run.fit(model, loader(20 * BATCH), loader(2 * BATCH, seed=5), ckpt_path=ckpt_path)  # 20 steps an epoch
    return model, ema, pema


def test_resume_from_a_checkpoint_is_bit_identical_to_never_stopping(tmp_path):
    start = time.perf_counter()
    straight, ema_c, pema_c = _fit(tmp_path / "straight", 80)
    stopped, _, _ = _fit(tmp_path / "stopped", 40)
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=1-step=40.ckpt"
    resumed, ema_b, pema_b = _fit(tmp_path / "stopped", 80, ckpt_path=ckpt)
    print(f"3 fits: {time.perf_counter() - start:.1f} s")

    assert ema_b.ema.t == 80 and pema_b.ema.t == 80 * BATCH
    assert_bitwise_equal(ema_b.ema, ema_c.ema)  # EMA, time in steps
    assert_bitwise_equal(pema_b.ema, pema_c.ema)  # PowerEMA, time in samples
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, straight.state_dict()[name]), name
    # The snapshots written after the resume are those of the straight run, to the bit.
    after = [s for s in posthoc.list_snapshots(tmp_path / "stopped" / "phema") if s.t > 40 * BATCH]
    assert [s.t for s in after] == [t * BATCH for t in (50, 60, 70, 80)]
    for t in (50, 60, 70, 80):
        a = posthoc.reconstruct(tmp_path / "stopped" / "phema", sigma_rel=0.08, t=t * BATCH, progress=False)
        b = posthoc.reconstruct(tmp_path / "straight" / "phema", sigma_rel=0.08, t=t * BATCH, progress=False)
        for name in a:
            assert torch.equal(a[name], b[name]), (t, name)

    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"]["net.0.weight"].shape == (16, 6)  # training weights under state_dict
    assert RAW_STATE_DICT_KEY not in saved
    states = saved["callbacks"]
    assert states[ema_c.state_key]["ema"]["t"] == 40 and states[pema_c.state_key]["ema"]["t"] == 40 * BATCH


def test_checkpoint_with_averaged_weights_deploys_the_average_and_still_resumes(tmp_path):
    straight, ema_c, _ = _fit(tmp_path / "straight", 40, checkpoint_weights="averaged")
    _, ema_a, _ = _fit(tmp_path / "stopped", 20, checkpoint_weights="averaged")
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=0-step=20.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    averaged = ema_a.ema.averaged_state_dict()
    assert list(saved["state_dict"]) == list(averaged)
    for name, value in averaged.items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert not torch.equal(saved[RAW_STATE_DICT_KEY]["net.0.weight"], averaged["net.0.weight"])
    deployed = Net.load_from_checkpoint(ckpt)  # what a user serving the model gets: the average
    assert torch.equal(deployed.net[0].weight, averaged["net.0.weight"])

    resumed, ema_b, _ = _fit(tmp_path / "stopped", 40, ckpt_path=ckpt, checkpoint_weights="averaged")
    assert_bitwise_equal(ema_b.ema, ema_c.ema)
    for name, value in resumed.state_dict().items():  # trained on from the raw weights, not the average
        assert torch.equal(value, straight.state_dict()[name]), name


def test_a_checkpoint_without_this_callbacks_state_warns(tmp_path):
    _fit(tmp_path, 20)
    other = EMACallback(decay=0.99)
    run = trainer(tmp_path, max_steps=25, callbacks=[other])
    with pytest.warns(RuntimeWarning, match=r"holds no state for EMACallback\{'schedule': 'Constant\(decay=0.99\)'"):
        run.fit(Net(), loader(20 * BATCH), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=20.ckpt")
    assert other.ema.t == 5


def test_evaluate_from_a_checkpoint_builds_the_average(tmp_path):
    _, ema_a, _ = _fit(tmp_path, 20)
    fresh = EMACallback(decay=0.9)
    run = trainer(tmp_path, callbacks=[fresh])
    model = Net()
    run.validate(model, loader(BATCH), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=20.ckpt", verbose=False)
    assert_bitwise_equal(fresh.ema, ema_a.ema)


# --------------------------------------------------------------------------- against Lightning's own EMA


def test_side_by_side_with_lightnings_ema_weight_averaging(tmp_path):
    """Same run, both callbacks: equal float averages; the integer count right only in emakit."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    try:
        from emakit.migrate import schedule as peer_schedule

        rule = peer_schedule("lightning", decay=0.95)
    except (ImportError, AttributeError):
        rule = schedules.start_at(1, schedules.constant(0.95))  # copies at the first update, like AveragedModel
    theirs = EMAWeightAveraging(decay=0.95)
    mine = EMACallback(schedule=rule)
    record = Trajectory()
    run = trainer(max_steps=80, callbacks=[theirs, mine, record], limit_val_batches=0)
    model = Net()
    run.fit(model, loader(80 * BATCH))

    their_sd = {
        k.removeprefix("module."): v for k, v in theirs._average_model.state_dict().items() if "n_averaged" not in k
    }
    my_sd = mine.ema.averaged_state_dict()
    worst = 0.0
    for name, value in my_sd.items():
        if value.is_floating_point():
            assert_close(value, their_sd[name], rtol=1e-6, atol=1e-7, msg=name)
            worst = max(worst, (value - their_sd[name]).abs().max().item())
    # Lightning averages num_batches_tracked with decay 0.95 and truncates it to an integer.
    assert record.states[-1]["net.1.num_batches_tracked"].item() == 80  # the model's own count after step 80
    assert my_sd["net.1.num_batches_tracked"].item() == 80
    assert their_sd["net.1.num_batches_tracked"].item() == 60
    print(f"max abs difference of the float averages: {worst:.2e}; count: emakit 80, Lightning 60")


# --------------------------------------------------------------------------- switching from EMAWeightAveraging mid-run


def _lightning_run(tmp: Path, callback, max_steps: int, ckpt_path=None, record=None):
    """40 steps an epoch is 20 batches; a checkpoint at every epoch end, validation every epoch."""
    saver = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    callbacks = [callback, saver] + ([record] if record is not None else [])
    run = trainer(tmp, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True)
    model = Net()
    run.fit(model, loader(20 * BATCH), loader(2 * BATCH, seed=5), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(
    ("decay", "every", "start"),
    [(0.95, 1, None), (0.9, 7, None), (0.99, 3, 10), (0.9, 1, 50)],
    ids=["decay0.95", "every7", "every3-start10", "start-after-the-switch"],
)
def test_resume_a_lightning_ema_weight_averaging_run_with_ema_callback(tmp_path, decay, every, start):
    """A 40-step EMAWeightAveraging run, continued to 80 by Lightning's callback and by EMACallback.

    EMACallback restores the raw weights (``current_model_state``) and imports the average and
    t = 40: the weights train on bit for bit as under Lightning's callback, and the averages
    agree with Lightning's and with a float64 continuation of the checkpoint's average.
    """
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from emakit import migrate

    peer = dict(decay=decay, update_every_n_steps=every, update_starting_at_step=start)
    _lightning_run(tmp_path, EMAWeightAveraging(**peer), 40)
    ckpt = tmp_path / "ckpt" / "epoch=1-step=40.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert set(saved) >= {"current_model_state", "averaging_state"}  # the average is saved as the weights

    theirs, their_record = EMAWeightAveraging(**peer), Trajectory()
    _lightning_run(tmp_path / "theirs", theirs, 80, ckpt_path=ckpt, record=their_record)
    mine, my_record = EMACallback(schedule=migrate.schedule("lightning", **peer)), Trajectory()
    _lightning_run(tmp_path / "mine", mine, 80, ckpt_path=ckpt, record=my_record)

    # The training weights: bit for bit, from the first batch after the switch to the last.
    assert len(my_record.states) == len(their_record.states) == 41
    for name, value in saved["current_model_state"].items():
        assert torch.equal(my_record.states[0][name], value), name  # trained on from the raw weights
    for mine_state, their_state in zip(my_record.states, their_record.states):
        for name, value in mine_state.items():
            assert torch.equal(value, their_state[name]), name
    assert (mine.ema.t, mine.ema.num_updates) == (80, 40)

    # The averages: Lightning's continuation, and a float64 one from the checkpoint's average.
    rule = migrate.schedule("lightning", **peer)
    decays = [rule(t=n, dt=1) for n in range(41, 81)]
    want = float64_ema([dict(saved["state_dict"])] + my_record.states[1:], decays)
    their_sd = {k.removeprefix("module."): v for k, v in theirs._average_model.state_dict().items()}
    got = mine.ema.averaged_state_dict()
    worst = [0.0, 0.0]
    for name, value in got.items():
        if value.is_floating_point():
            assert_close(value, their_sd[name], rtol=1e-6, atol=1e-6, msg=name)
            assert_close(value.double(), want[name], rtol=0, atol=1e-6, msg=name)
            worst[0] = max(worst[0], (value - their_sd[name]).abs().max().item())
            worst[1] = max(worst[1], (value.double() - want[name]).abs().max().item())
    print(f"max |emakit - Lightning| {worst[0]:.1e}, max |emakit - float64| {worst[1]:.1e}")
    assert got["net.1.num_batches_tracked"].item() == 80  # copied from the model (Lightning truncates an average)


def test_resume_a_lightning_checkpoint_that_cannot_be_continued_raises_before_training(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    _lightning_run(tmp_path, EMAWeightAveraging(decay=0.9), 20)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=20.ckpt"
    raw = torch.load(ckpt, weights_only=True)["current_model_state"]
    found = r"written with Lightning's EMAWeightAveraging \(global_step=20: its average after 20 update\(s\)"
    cases = [
        (PowerEMACallback(), "power profiles cannot be recovered from one exponential average"),
        (EMACallback(decay=0.9, time="samples"), r"counts samples \(time='samples'\).*resume with time='steps'"),
    ]
    for callback, reason in cases:
        record = Trajectory()
        with pytest.raises(ValueError, match=f"{found}.*{reason}.*pass restart_average=True"):
            _lightning_run(tmp_path, callback, 40, ckpt_path=ckpt, record=record)
        assert record.states == []  # not one batch trained
    # restart_average=True: the training weights come back, and the average starts from them.
    restart = PowerEMACallback(restart_average=True)
    record = Trajectory()
    _lightning_run(tmp_path, restart, 21, ckpt_path=ckpt, record=record)
    for name, value in raw.items():
        assert torch.equal(record.states[0][name], value), name
    assert (restart.ema.t, restart.ema.num_updates) == (1, 1)


def test_resume_a_plain_checkpoint_keeps_warning_and_validate_uses_the_imported_average(tmp_path):
    """StochasticWeightAveraging keeps the training weights under state_dict: nothing to import."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    _lightning_run(tmp_path / "swa", StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1), 40)
    swa = torch.load(tmp_path / "swa" / "ckpt" / "epoch=1-step=40.ckpt", weights_only=True)
    assert "current_model_state" not in swa  # its average is in its own callback state
    fresh, record = EMACallback(decay=0.9), Trajectory()
    with pytest.warns(RuntimeWarning, match="the average starts from the loaded weights"):
        _lightning_run(tmp_path / "swa", fresh, 41, ckpt_path=tmp_path / "swa" / "ckpt" / "epoch=1-step=40.ckpt",
                       record=record)
    for name, value in swa["state_dict"].items():
        assert torch.equal(record.states[0][name], value), name

    # trainer.validate(ckpt_path=<EMAWeightAveraging checkpoint>): evaluated with the imported average.
    _lightning_run(tmp_path / "ema", EMAWeightAveraging(decay=0.9), 20)
    ckpt = tmp_path / "ema" / "ckpt" / "epoch=0-step=20.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    seen = EMACallback(decay=0.9)
    model = Net()
    trainer(callbacks=[seen]).validate(model, loader(BATCH), ckpt_path=ckpt, verbose=False)
    assert seen.ema.t == 20
    for name, value in seen.ema.averaged_state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, saved["state_dict"][name]), name
    for name, value in model.state_dict().items():  # after validation: the training weights
        assert torch.equal(value, saved["current_model_state"][name]), name


# --------------------------------------------------------------------------- every_n_steps


def test_every_n_steps_updates_over_the_time_of_n_steps(tmp_path):
    """every_n_steps=3, accumulation 2: updates after steps 3, 6, 9 with dt=3, against a float64 EMA."""
    record = Trajectory()
    callback = EMACallback(decay=0.8, every_n_steps=3)
    pema = PowerEMACallback(sigma_rels=(0.1,), every_n_steps=3, time="samples")
    run = trainer(max_steps=10, accumulate_grad_batches=2, callbacks=[callback, pema, record])
    run.fit(Net(), loader(20 * BATCH))
    assert (callback.ema.t, callback.ema.num_updates) == (9, 3)  # step 10 waits for the next interval
    assert (pema.ema.t, pema.ema.num_updates) == (9 * 2 * BATCH, 3)
    states = [record.states[0]] + [record.states[2 * step] for step in (3, 6, 9)]  # 2 batches a step
    want = float64_ema(states, [0.8**3] * 3)
    got = callback.ema.averaged_state_dict(dtype="average")
    for name, value in want.items():
        if value.is_floating_point():
            assert_close(got[name].double(), value, rtol=0, atol=1e-6, msg=name)


def test_resume_with_every_n_steps_mid_interval_is_bit_identical(tmp_path):
    def fit(tmp: Path, max_steps: int, ckpt_path=None):
        ema = EMACallback(decay=0.9, every_n_steps=3)
        saver = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
        run = trainer(tmp, max_steps=max_steps, callbacks=[ema, saver], enable_checkpointing=True)
        model = Net()
        run.fit(model, loader(20 * BATCH), loader(2 * BATCH, seed=5), ckpt_path=ckpt_path)
        return model, ema

    straight, ema_c = fit(tmp_path / "straight", 40)
    fit(tmp_path / "stopped", 20)  # 20 = 6 * 3 + 2: two steps wait in the interval
    ckpt = tmp_path / "stopped" / "ckpt" / "epoch=0-step=20.ckpt"
    state = next(v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items() if k.startswith("EMAC"))
    assert (state["ema"]["t"], state["interval_steps"], state["interval_dt"]) == (18, 2, 2)
    resumed, ema_b = fit(tmp_path / "stopped", 40, ckpt_path=ckpt)
    assert (ema_b.ema.t, ema_b.ema.num_updates) == (39, 13)
    assert_bitwise_equal(ema_b.ema, ema_c.ema)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, straight.state_dict()[name]), name


@pytest.mark.parametrize("every", [0, 1.5, True, "3"])
def test_every_n_steps_rejects_what_is_not_a_positive_int(every):
    for cls in (EMACallback, PowerEMACallback):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: every_n_steps must be an int >= 1 .*got every_n_steps="):
            cls(every_n_steps=every, **({"decay": 0.9} if cls is EMACallback else {}))


# --------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this creates the file ``marker``: what a hostile checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_prune_never_unpickles_a_checkpoint_without_trust(tmp_path):
    from emakit.lightning import prune_sharded_averages

    marker = tmp_path / "payload-ran"
    ckpt_dir = tmp_path / "ckpt"
    (ckpt_dir / "emakit" / "ema-step=000000004-0123abcd").mkdir(parents=True)  # an orphan it would delete
    (ckpt_dir / "fsdp.ckpt").mkdir()  # FSDP2 layout: a directory with meta.pt
    for path in (ckpt_dir / "evil.ckpt", ckpt_dir / "fsdp.ckpt" / "meta.pt"):
        torch.save({"callbacks": {"x": _Payload(marker)}}, path)
        with pytest.raises(ValueError, match=rf"{path.name}.* unpickling them would run code .*pass trust=True"):
            prune_sharded_averages(ckpt_dir)
        assert not marker.exists()
        assert (ckpt_dir / "emakit" / "ema-step=000000004-0123abcd").is_dir()  # nothing deleted
        path.unlink()
    with pytest.raises(TypeError, match="trust must be True or False, got trust='yes'"):
        prune_sharded_averages(ckpt_dir, trust="yes")
    torch.save({"callbacks": {"x": _Payload(marker)}}, ckpt_dir / "mine.ckpt")
    assert [p.name for p in prune_sharded_averages(ckpt_dir, trust=True)] == ["ema-step=000000004-0123abcd"]
    assert marker.exists()  # trust=True unpickles: only for files the user wrote


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 0.9, "time": "images"}, r"time must be one of \('steps', 'samples'\), got time='images'"),
        (
            {"decay": 0.9, "averaged_in": ("train",)},
            r"averaged_in must hold stages among .*got averaged_in=\('train',\)",
        ),
        (
            {"decay": 0.9, "checkpoint_weights": "ema"},
            r"checkpoint_weights must be one of .*got checkpoint_weights='ema'",
        ),
        ({"decay": 0.9, "batch_size": len}, r"batch_size= counts samples; it needs time='samples', got time='steps'"),
        ({"decay": 0.9, "schedule": schedules.constant(0.9)}, "give decay or schedule, not both"),
        ({}, r"give decay \(e.g. decay=0.999\) or schedule"),
        ({"decay": 1.5}, "decay"),
    ],
)
def test_ema_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EMACallback(**kwargs)


def test_power_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"averaged_in=\('validate',\) needs evaluate_sigma_rel="):
        PowerEMACallback(averaged_in=("validate",))
    with pytest.raises(ValueError, match=r"evaluate_sigma_rel must be one of sigma_rels=\(0.05, 0.1\), got .*0.2"):
        PowerEMACallback(sigma_rels=(0.05, 0.1), evaluate_sigma_rel=0.2)
    with pytest.raises(ValueError, match="checkpoint_weights='averaged' needs evaluate_sigma_rel="):
        PowerEMACallback(checkpoint_weights="averaged")
    with pytest.raises(ValueError, match="snapshot_every must be a finite number > 0, got 0"):
        PowerEMACallback(snapshot_every=0)
    assert PowerEMACallback().averaged_in == ()
    assert PowerEMACallback(evaluate_sigma_rel=0.1).averaged_in == ("validate", "test", "predict")


def test_power_callback_evaluates_the_chosen_profile(tmp_path):
    callback = PowerEMACallback(sigma_rels=(0.05, 0.10), evaluate_sigma_rel=0.10)
    run = trainer(max_steps=20, callbacks=[callback])
    model = Net()
    val = loader(BATCH, seed=3)
    run.fit(model, loader(20 * BATCH))
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(callback.ema.averaged_state_dict(0.10))
    averaged.eval()
    x, y = val.dataset.tensors
    with torch.no_grad():
        want = nn.functional.mse_loss(averaged(x), y).item()
    assert run.validate(model, val, verbose=False)[0]["val_loss"] == pytest.approx(want, rel=1e-6)
    assert isinstance(callback.ema, emakit.PowerEMA)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))


# --------------------------------------------------------------------------- two ranks: DDP and FSDP2


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One spawn of 2 CPU ranks (gloo) runs tests/lightning_scenarios.py; the tests below read what it left."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without torch.distributed / gloo")
    import os

    here = str(Path(__file__).parent)
    sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])  # for the spawned ranks
    import lightning_scenarios

    tmp = tmp_path_factory.mktemp("lightning_dist")
    start = time.perf_counter()
    lightning_scenarios.run(2, str(tmp))
    print(f"2-rank Lightning scenario: {time.perf_counter() - start:.1f} s")
    return tmp


def test_two_ranks_resume_bit_identical_and_match_the_replicated_average(two_ranks):
    # Inside the ranks (tests/lightning_scenarios.py): for DDP with shard=True and for FSDP2, the
    # run stopped at step 4 and resumed from its Lightning checkpoint equals the straight run on
    # every rank's shards (torch.equal), for EMACallback and PowerEMACallback (time in samples);
    # checkpoint_weights='averaged' is refused on FSDP2. Here: the numbers they left.
    results = torch.load(two_ranks / "results.pt", weights_only=True)
    print(
        f"max |full average - replicated DDP average|: DDP shard=True {results['ddp_max_diff']:.1e}, "
        f"FSDP2 {results['fsdp2_max_diff']:.1e}"
    )
    assert results["ddp_max_diff"] < 1e-6 and results["fsdp2_max_diff"] < 1e-6


def _callback_states(checkpoint: Path) -> dict:
    meta = checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint  # FSDP2: a DCP directory
    return torch.load(meta, weights_only=False)["callbacks"]


def test_sharded_averages_are_dcp_directories_named_by_the_checkpoint(two_ranks):
    import lightning_scenarios

    reference = torch.load(two_ranks / "results.pt", weights_only=True)["reference"]
    for engine in ("ddp", "fsdp2"):
        ckpt = two_ranks / f"{engine}_straight" / "ckpt" / "epoch=1-step=8.ckpt"
        assert ckpt.is_dir() == (engine == "fsdp2")  # Lightning's own format: a file for DDP, DCP for FSDP2
        states = _callback_states(ckpt)
        state = next(s for k, s in states.items() if k.startswith("EMACallback"))
        assert "ema" not in state and Path(state["dcp"]).parent == ckpt.parent / "emakit"
        # Written by 2 ranks, loaded in one process without a process group (resharded by DCP).
        ema = emakit.EMA(lightning_scenarios._module_class()(), decay=0.9)
        ema.load(state["dcp"])
        assert ema.t == 8
        for name, value in ema.averaged_state_dict().items():
            assert_close(value, reference[name], rtol=0, atol=1e-6, msg=f"{engine} {name}")


def test_sharded_power_snapshots_reconstruct_like_replicated_ones(two_ranks):
    sharded = posthoc.list_snapshots(two_ranks / "fsdp2_straight" / "phema")
    single = posthoc.list_snapshots(two_ranks / "ddp_ref" / "phema")
    assert [s.t for s in sharded] == [s.t for s in single] == [16.0, 32.0, 48.0, 64.0]  # 8 samples a step
    assert all(s.sharded for s in sharded) and not any(s.sharded for s in single)
    # trust=True: DCP metadata is a pickle; these are our own snapshots.
    got = posthoc.reconstruct(two_ranks / "fsdp2_straight" / "phema", sigma_rel=0.08, progress=False, trust=True)
    want = posthoc.reconstruct(two_ranks / "ddp_ref" / "phema", sigma_rel=0.08, progress=False)
    for name in want:
        assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_prune_removes_only_the_averages_no_checkpoint_names(two_ranks, tmp_path):
    import shutil

    from emakit.lightning import prune_sharded_averages

    for engine in ("ddp", "fsdp2"):
        ckpt_dir = tmp_path / engine
        shutil.copytree(two_ranks / f"{engine}_stopped" / "ckpt", ckpt_dir)
        named = set()
        for ckpt in ckpt_dir.glob("*.ckpt"):
            named |= {Path(s["dcp"]).name for s in _callback_states(ckpt).values() if "dcp" in s}
        some = sorted(named)[0]
        shutil.copytree(ckpt_dir / "emakit" / some, ckpt_dir / "emakit" / "ema-step=000000099-0123abcd")  # orphan
        (ckpt_dir / "emakit" / "notes").mkdir()  # not named like an average: never touched
        before = {p.name for p in (ckpt_dir / "emakit").iterdir()}
        # (The resumed run also saved step 4 again: Lightning overwrote epoch=0-step=4.ckpt, so the
        # first run's averages at step 4 are named by no checkpoint any more.)
        assert len(named) == 4 and named < before
        orphans = before - named - {"notes"}
        assert "ema-step=000000099-0123abcd" in orphans
        assert {p.name for p in prune_sharded_averages(ckpt_dir, dry_run=True)} == orphans
        assert {p.name for p in prune_sharded_averages(ckpt_dir)} == orphans
        assert {p.name for p in (ckpt_dir / "emakit").iterdir()} == named | {"notes"}
        assert prune_sharded_averages(ckpt_dir) == []


def test_two_ranks_checkpoint_with_averaged_weights(two_ranks):
    """DDP, shard=True, checkpoint_weights='averaged': the file's state_dict is the gathered average."""
    import lightning_scenarios

    checkpoint = torch.load(two_ranks / "ddp_averaged" / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    state = next(s for k, s in checkpoint["callbacks"].items() if k.startswith("EMACallback"))
    ema = emakit.EMA(lightning_scenarios._module_class()(), decay=0.9)
    ema.load(state["dcp"])
    averaged = ema.averaged_state_dict()
    assert list(checkpoint["state_dict"]) == list(averaged)
    for name, value in averaged.items():
        assert torch.equal(checkpoint["state_dict"][name], value), name
    assert not torch.equal(checkpoint[RAW_STATE_DICT_KEY]["inp.weight"], averaged["inp.weight"])


def test_power_callback_refuses_snapshots_from_another_trajectory(tmp_path):
    _fit(tmp_path, 40)  # snapshots every 10 steps up to step 40
    with pytest.raises(ValueError, match=r"already holds 2 snapshot\(s\) after t=320 .*move or delete them"):
        _fit(tmp_path, 40, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=20.ckpt")  # resumes at 20 * 16 samples


def test_only_one_callback_writes_its_average_as_the_state_dict(tmp_path):
    a = EMACallback(decay=0.9, checkpoint_weights="averaged")
    b = PowerEMACallback(evaluate_sigma_rel=0.1, checkpoint_weights="averaged")
    with pytest.raises(ValueError, match="only one callback may write its average as the checkpoint's state_dict"):
        trainer(max_steps=1, callbacks=[a, b]).fit(Net(), loader(BATCH))


def test_state_keys_are_stable_across_processes():
    def my_schedule(t, dt):
        return 0.9**dt

    key = EMACallback(schedule=my_schedule).state_key  # the checkpoint entry is found by this key on resume
    assert "0x" not in key and "my_schedule" in key
    assert EMACallback(decay=0.99).state_key == "EMACallback{'schedule': 'Constant(decay=0.99)', 'time': 'steps'}"
    assert (
        PowerEMACallback(time="samples").state_key == "PowerEMACallback{'sigma_rels': (0.05, 0.1), 'time': 'samples'}"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device", [None, "cpu"], ids=["on-gpu", "averages-on-cpu"])
def test_callback_on_cuda(tmp_path, device):
    """The callback on a GPU: averages beside the weights, or kept on the CPU (``device="cpu"``)."""
    record = Trajectory()
    callback = EMACallback(decay=0.8, device=device)
    run = trainer(accelerator="gpu", max_steps=12, callbacks=[callback, record])
    run.fit(Net(), loader(12 * BATCH))
    assert callback.ema.num_updates == 12
    want = float64_ema([{k: v.cpu() for k, v in s.items()} for s in record.states], [0.8] * 12)
    got = callback.ema.averaged_state_dict(dtype="average")
    assert got["net.0.weight"].device.type == ("cpu" if device == "cpu" else "cuda")
    for name, value in want.items():
        if value.is_floating_point():
            assert_close(got[name].double().cpu(), value, rtol=0, atol=1e-5, msg=name)


def test_callbacks_take_the_averagers_options_from_the_one_definition():
    import inspect

    from emakit._engine.options import Options

    for cls in (EMACallback, PowerEMACallback):
        params = inspect.signature(cls).parameters
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in Options.names()), cls
    with pytest.raises(TypeError, match=r"EMACallback: dtype must be a floating torch.dtype or None, got dtype=torch.int8"):
        EMACallback(0.9, dtype=torch.int8)  # checked at construction, not when fitting starts
    with pytest.raises(TypeError, match=r"PowerEMACallback\(\) got unexpected keyword argument\(s\) 'decay'"):
        PowerEMACallback(decay=0.9)
