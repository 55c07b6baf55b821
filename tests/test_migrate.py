"""emakit.migrate without the peers: each peer's rule re-derived here from its source, in float64.

Every reference below replays the peer's own bookkeeping (its counter, when it increments,
its first-update copy) as a tiny state machine written from the peer's code, independently of
:mod:`emakit.migrate`; ``update()`` returns the decay the peer effectively applies (0 for a
copy, 1 for a call that changes nothing). timm cannot be installed here, so this is where its
rule is checked. The averages are checked on a float64 model with BatchNorm against the
closed-form weighted sum of the trajectory.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from emakit import EMA, migrate, schedules

STEPS = 330


# --------------------------------------------------------------------------- the peers' bookkeeping, replayed


class TimmReplay:
    """ModelEmaV3.get_decay(step), with timm's train.py passing step=num_updates after incrementing it."""

    def __init__(self, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False, warmup_gamma=1.0,
                 warmup_power=2 / 3):  # fmt: skip
        self.__dict__.update(locals())
        self.num_updates = 0

    def update(self):
        self.num_updates += 1
        step = max(0, self.num_updates - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
        return max(min(decay, self.decay), self.min_decay)


class DiffusersReplay:
    """EMAModel.step: optimization_step += 1, then get_decay(optimization_step)."""

    def __init__(self, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False, inv_gamma=1.0,
                 power=2 / 3):  # fmt: skip
        self.__dict__.update(locals())
        self.optimization_step = 0

    def update(self):
        self.optimization_step += 1
        step = max(0, self.optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)


class EmaPytorchReplay:
    """ema_pytorch.EMA.update: read step, increment it, copy on the first call, update when divisible."""

    def __init__(self, beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1.0, power=2 / 3,
                 min_value=0.0):  # fmt: skip
        self.__dict__.update(locals())
        self.step = 0
        self.initted = False

    def update(self):
        step = self.step
        self.step += 1
        if not self.initted:
            self.initted = True
            return 0.0
        if step % self.update_every != 0:
            return 1.0
        if step <= self.update_after_step:
            return 0.0
        if self.beta == 1.0:  # is_frozen: update_moving_average returns at once
            return 1.0
        epoch = max(self.step - self.update_after_step - 1, 0)  # get_current_decay reads the incremented step
        if epoch <= 0:
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        return min(max(value, self.min_value), self.beta)


class KarrasReplay:
    """ema_pytorch.KarrasEMA.update: read step, increment, skip unless divisible, copy once, lerp with beta."""

    def __init__(self, gamma, update_every=100):
        self.gamma, self.update_every = gamma, update_every
        self.step = 0
        self.initted = False

    def update(self):
        step = self.step
        self.step += 1
        if step % self.update_every != 0:
            return 1.0
        copied = not self.initted
        self.initted = True
        beta = (1.0 - 1.0 / (self.step + 1.0)) ** (1.0 + self.gamma)  # the property reads the incremented step
        return 0.0 if copied else beta  # lerping a fresh copy toward the same weights leaves the copy


class AveragedModelReplay:
    """AveragedModel.update_parameters: copy while n_averaged == 0, else the EMA; then n_averaged += 1."""

    def __init__(self, decay=0.999):
        self.decay = decay
        self.n_averaged = 0

    def update(self):
        d = 0.0 if self.n_averaged == 0 else self.decay
        self.n_averaged += 1
        return d


class TorchEmaReplay:
    """torch_ema.ExponentialMovingAverage.update: num_updates += 1, then min(decay, (1 + n) / (10 + n))."""

    def __init__(self, decay, use_num_updates=True):
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None

    def update(self):
        if self.num_updates is None:
            return self.decay
        self.num_updates += 1
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))


class LightningReplay:
    """EMAWeightAveraging.on_train_batch_end after each optimizer step, around an AveragedModel."""

    def __init__(self, decay=0.999, update_every_n_steps=1, update_starting_at_step=None):
        self.decay, self.every, self.start = decay, update_every_n_steps, update_starting_at_step
        self.global_step = 0
        self.latest_update_step = 0
        self.averaged = AveragedModelReplay(decay)

    def should_update(self, step_idx):
        meets_start = self.start is None or step_idx >= self.start
        return meets_start and self.every > 0 and step_idx % self.every == 0

    def update(self):
        self.global_step += 1  # the optimizer step
        step_idx = self.global_step - 1
        if self.global_step > self.latest_update_step and self.should_update(step_idx):
            self.latest_update_step = self.global_step
            return self.averaged.update()
        return 1.0


class ComposerReplay:
    """Composer's EMA algorithm (composer/algorithms/ema/ema.py, the EMAParameters form of 0.13 and later).

    ``match()`` at BATCH_END, where ``timestamp.batch`` already counts this batch: if not started
    and ``ema_start <= batch`` (``'0.0dur'``: from the first batch), re-create the EMA as a copy
    of the model; once started, ``apply()`` only when ``batch % update_interval == 0``, with
    ``smoothing = 2 ** (-(update_interval / half_life))``. A copy followed by an update in the
    same event is still the model: decay 0.
    """

    def __init__(self, half_life="1000ba", smoothing=None, ema_start="0.0dur", update_interval=None):
        interval = int((update_interval or "1ba")[:-2])
        self.interval = interval
        self.smoothing = 2 ** (-(interval / int(half_life[:-2]))) if smoothing is None else smoothing
        self.start = 0 if ema_start.endswith("dur") else int(ema_start[:-2])
        self.batch, self.started = 0, False

    def update(self):
        self.batch += 1
        copied = False
        if not self.started and self.start <= self.batch:
            self.started = copied = True
        if self.started and self.batch % self.interval == 0:
            return 0.0 if copied else self.smoothing
        return 0.0 if copied else 1.0


class NeMoReplay:
    """NeMo's EMAOptimizer.step (nemo/collections/common/callbacks/ema.py): the wrapped optimizer steps,
    then ``update()`` if ``current_step % every_n_steps == 0``, then ``current_step += 1``; no copy."""

    def __init__(self, decay, every_n_steps=1):
        self.decay, self.every, self.current_step = decay, every_n_steps, 0

    def update(self):
        d = self.decay if self.current_step % self.every == 0 else 1.0
        self.current_step += 1
        return d


def replay(peer_replay, steps=STEPS):
    return [peer_replay.update() for _ in range(steps)]


def sequence(s, steps=STEPS):
    return [s(t=n, dt=1) for n in range(1, steps + 1)]


def assert_same_decays(got, expected):
    assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0
    )


# Argument sets: defaults, the off-by-one regions (update_after_step 0/1/small, the first
# update, update_every boundaries), warm-up on and off, a min_decay that binds.
CASES = [
    ("timm", TimmReplay, {}),
    ("timm", TimmReplay, {"decay": 0.99, "update_after_step": 1}),
    ("timm", TimmReplay, {"decay": 0.995, "update_after_step": 7, "use_warmup": True}),
    (
        "timm",
        TimmReplay,
        {"decay": 0.9, "min_decay": 0.5, "use_warmup": True, "warmup_gamma": 3.0, "warmup_power": 0.75},
    ),
    ("timm", TimmReplay, {"decay": 0.9, "min_decay": 0.5, "update_after_step": 3}),  # min_decay unused without warm-up
    ("diffusers", DiffusersReplay, {}),
    ("diffusers", DiffusersReplay, {"decay": 0.95, "update_after_step": 1}),
    ("diffusers", DiffusersReplay, {"decay": 0.999, "update_after_step": 10, "use_ema_warmup": True, "power": 0.75}),
    ("diffusers", DiffusersReplay, {"decay": 0.9, "min_decay": 0.3, "use_ema_warmup": True, "inv_gamma": 2.0}),
    ("diffusers", DiffusersReplay, {"decay": 0.2, "min_decay": 0.6}),  # min_decay above decay wins, as in diffusers
    ("ema_pytorch", EmaPytorchReplay, {}),
    ("ema_pytorch", EmaPytorchReplay, {"update_after_step": 0, "update_every": 1}),
    ("ema_pytorch", EmaPytorchReplay, {"update_after_step": 1, "update_every": 1}),
    ("ema_pytorch", EmaPytorchReplay, {"update_after_step": 100, "update_every": 10}),
    ("ema_pytorch", EmaPytorchReplay, {"update_after_step": 95, "update_every": 10, "min_value": 0.4}),
    (
        "ema_pytorch",
        EmaPytorchReplay,
        {"beta": 0.99, "update_after_step": 7, "update_every": 3, "inv_gamma": 5.0, "power": 1.0},
    ),
    ("ema_pytorch", EmaPytorchReplay, {"beta": 1.0, "update_after_step": 20, "update_every": 4}),  # frozen
    ("ema_pytorch_karras", KarrasReplay, {"gamma": 6.94, "update_every": 1}),
    ("ema_pytorch_karras", KarrasReplay, {"gamma": 16.97}),
    ("ema_pytorch_karras", KarrasReplay, {"gamma": 0.5, "update_every": 7}),
    ("averaged_model", AveragedModelReplay, {}),
    ("averaged_model", AveragedModelReplay, {"decay": 0.9}),
    ("torch_ema", TorchEmaReplay, {"decay": 0.999}),
    ("torch_ema", TorchEmaReplay, {"decay": 0.95}),
    ("torch_ema", TorchEmaReplay, {"decay": 0.99, "use_num_updates": False}),
    ("lightning", LightningReplay, {}),
    ("lightning", LightningReplay, {"decay": 0.9, "update_every_n_steps": 3}),
    ("lightning", LightningReplay, {"decay": 0.99, "update_starting_at_step": 100}),
    ("lightning", LightningReplay, {"decay": 0.99, "update_every_n_steps": 10, "update_starting_at_step": 95}),
    ("lightning", LightningReplay, {"decay": 0.99, "update_every_n_steps": 4, "update_starting_at_step": 0}),
    ("composer", ComposerReplay, {}),
    ("composer", ComposerReplay, {"half_life": "10ba", "update_interval": "3ba"}),
    ("composer", ComposerReplay, {"half_life": "50ba", "update_interval": "4ba", "ema_start": "30ba"}),
    ("composer", ComposerReplay, {"half_life": "7ba", "update_interval": "5ba", "ema_start": "32ba"}),  # 32 % 5 != 0
    ("composer", ComposerReplay, {"half_life": None, "smoothing": 0.9, "ema_start": "1ba"}),
    ("nemo", NeMoReplay, {"decay": 0.999}),
    ("nemo", NeMoReplay, {"decay": 0.9, "every_n_steps": 4}),
]


def _ids(case):
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[2].items()) or 'defaults'}"


@pytest.mark.parametrize(("peer", "replay_cls", "kwargs"), CASES, ids=[_ids(c) for c in CASES])
def test_schedule_gives_the_peers_decay_at_every_step(peer, replay_cls, kwargs):
    s = migrate.schedule(peer, **kwargs)
    assert_same_decays(sequence(s), replay(replay_cls(**kwargs)))


@pytest.mark.parametrize(("peer", "replay_cls", "kwargs"), CASES, ids=[_ids(c) for c in CASES])
def test_an_update_over_several_steps_multiplies_the_peers_decays(peer, replay_cls, kwargs):
    s = migrate.schedule(peer, **kwargs)
    per_step = replay(replay_cls(**kwargs))
    for k in (2, 3, 10):
        for t in range(k, STEPS + 1, k):
            assert s(t=t, dt=k) == pytest.approx(math.prod(per_step[t - k : t]), rel=1e-13, abs=0)


def test_karras_given_sigma_rel_uses_the_edm2_gamma():
    np = pytest.importorskip("numpy")
    # gamma as KarrasEMA computes it: the largest real root of EDM2's cubic, by numpy.
    k = 0.05**-2
    gamma = float(np.roots([1, 7, 16 - k, 12 - k]).real.max())
    assert gamma == pytest.approx(16.9722, abs=1e-4)  # the paper's value
    s = migrate.schedule("ema_pytorch_karras", sigma_rel=0.05, update_every=10)
    expected = replay(KarrasReplay(gamma, update_every=10))
    assert_close(
        torch.tensor(sequence(s), dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_peer_quirks_with_their_numbers():
    # diffusers ramps without warm-up: 0.917 at step 100, 0.999 only from step 8991.
    s = migrate.schedule("diffusers", decay=0.9999, use_ema_warmup=False)
    assert s(t=100, dt=1) == pytest.approx(100 / 109)
    assert s(t=8990, dt=1) < 0.999 <= s(t=8991, dt=1)
    # ema-pytorch applies one step's decay once per update_every: a 10x longer memory.
    s = migrate.schedule("ema_pytorch", beta=0.99, update_after_step=0, update_every=10)
    assert s(t=20001, dt=10) == 0.99  # past the warm-up: 0.99 for ten steps, not 0.99**10
    # KarrasEMA at update_every=100 (20k steps, sigma_rel 0.05): the average is centred on step
    # 3037, where a power profile (and KarrasEMA at update_every=1) is centred on 18946.
    for every, centre in ((100, 3036.7), (1, 18946.3)):
        s = migrate.schedule("ema_pytorch_karras", sigma_rel=0.05, update_every=every)
        weights, keep = [], 1.0
        for n in range(20000, 0, -1):
            d = s(t=n, dt=1)
            weights.append((n, (1 - d) * keep))
            keep *= d
        assert sum(w for _, w in weights) == pytest.approx(1.0)
        assert sum(n * w for n, w in weights) == pytest.approx(centre, abs=0.1)
    gamma = schedules.sigma_rel_to_gamma(0.05)
    assert 20000 * (gamma + 1) / (gamma + 2) == pytest.approx(18945.8, abs=0.1)


# --------------------------------------------------------------------------- the dt-correct alternatives in the docs


@pytest.mark.parametrize("k", [1, 3, 10])
def test_dt_correct_alternatives_are_the_emakit_schedules_the_docs_name(k):
    def same(a, b, times):
        for t in times:
            dt = t - times[times.index(t) - 1] if times.index(t) else t
            assert a(t=t, dt=dt) == pytest.approx(b(t=t, dt=dt), rel=1e-13, abs=1e-300), (t, dt)

    times = list(range(k, STEPS + 1, k))
    # ema-pytorch's rule per step, updated every k steps with dt=k.
    for uas in (0, 5, 100):
        same(
            migrate.schedule("ema_pytorch", beta=0.999, update_after_step=uas, update_every=1, power=0.75),
            schedules.start_at(uas, schedules.warmup(inv_gamma=1.0, power=0.75, max_decay=0.999)),
            times,
        )
    # diffusers and timm with warm-up (min_decay 0) are warm-up schedules started at update_after_step.
    same(
        migrate.schedule("diffusers", decay=0.999, update_after_step=4, use_ema_warmup=True, inv_gamma=2.0),
        schedules.start_at(4, schedules.warmup(inv_gamma=2.0, max_decay=0.999)),
        times,
    )
    same(
        migrate.schedule("timm", decay=0.999, update_after_step=4, use_warmup=True, warmup_power=0.75),
        schedules.start_at(4, schedules.warmup(power=0.75, max_decay=0.999)),
        times,
    )
    # AveragedModel: the copy, then the constant per step.
    same(
        migrate.schedule("averaged_model", decay=0.99), schedules.start_at(1, schedules.constant(0.99)), [1, *times[1:]]
    )
    # Lightning, updated every k steps from its first update s0 on: start_at(s0 + 1, constant(decay)).
    s0 = 30
    lightning_times = list(range(s0 + 1, STEPS + 1, k))
    same(
        migrate.schedule("lightning", decay=0.99, update_starting_at_step=s0),
        schedules.start_at(s0 + 1, schedules.constant(0.99)),
        lightning_times,
    )


def test_diffusers_without_warmup_as_its_name_says():
    s = schedules.start_at(6, schedules.constant(0.999))  # update_after_step=5: copies through step 6
    peer = migrate.schedule("diffusers", decay=0.999, update_after_step=5)
    assert [s(t=n, dt=1) == 0 for n in range(1, 9)] == [peer(t=n, dt=1) == 0 for n in range(1, 9)]


# --------------------------------------------------------------------------- the averages of ema_like


def small_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


def train_step(model):
    """Moves every parameter and the BatchNorm statistics (num_batches_tracked += 1)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3, dtype=torch.float64))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unrolled(start, trajectory, decays):
    """``decay_N ... decay_1 * start + sum_i (1 - decay_i) * decay_N ... decay_{i+1} * x_i``, per name."""
    out = {}
    for name in start:
        total = torch.zeros_like(start[name], dtype=torch.float64)
        keep = 1.0
        for x, d in zip(reversed(trajectory), reversed(decays)):
            total += keep * (1 - d) * x[name].double()
            keep *= d
        out[name] = total + keep * start[name].double()
    return out


FLOAT_BUFFERS = ("1.running_mean", "1.running_var")
PARAMS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")

# (peer, ema_like kwargs, replay, names the peer averages, float buffers the peer copies at each update)
EMA_CASES = [
    ("timm", {"decay": 0.95, "update_after_step": 3}, TimmReplay(0.95, update_after_step=3), PARAMS + FLOAT_BUFFERS, ()),
    ("timm", {"decay": 0.97, "use_warmup": True, "exclude_buffers": True},
     TimmReplay(0.97, use_warmup=True), PARAMS, FLOAT_BUFFERS),
    ("diffusers", {"decay": 0.99, "update_after_step": 2}, DiffusersReplay(0.99, update_after_step=2), PARAMS, ()),
    ("diffusers", {"decay": 0.99, "use_ema_warmup": True, "power": 0.75},
     DiffusersReplay(0.99, use_ema_warmup=True, power=0.75), PARAMS, ()),
    ("ema_pytorch", {"beta": 0.99, "update_after_step": 20, "update_every": 3},
     EmaPytorchReplay(0.99, update_after_step=20, update_every=3), PARAMS + FLOAT_BUFFERS, ()),
    ("ema_pytorch_karras", {"gamma": 3.0, "update_every": 5}, KarrasReplay(3.0, update_every=5), PARAMS + FLOAT_BUFFERS, ()),
    ("averaged_model", {"decay": 0.95}, AveragedModelReplay(0.95), PARAMS, FLOAT_BUFFERS),
    ("averaged_model", {"decay": 0.95, "use_buffers": True}, AveragedModelReplay(0.95), PARAMS + FLOAT_BUFFERS, ()),
    ("torch_ema", {"decay": 0.97}, TorchEmaReplay(0.97), PARAMS, ()),
    ("torch_ema", {"decay": 0.97, "use_num_updates": False}, TorchEmaReplay(0.97, use_num_updates=False), PARAMS, ()),
    ("lightning", {"decay": 0.95, "update_every_n_steps": 4, "update_starting_at_step": 30},
     LightningReplay(0.95, 4, 30), PARAMS + FLOAT_BUFFERS, ()),
    ("lightning", {"decay": 0.95, "use_buffers": False}, LightningReplay(0.95), PARAMS, FLOAT_BUFFERS),
    ("composer", {"half_life": "10ba", "update_interval": "3ba", "ema_start": "20ba"},
     ComposerReplay("10ba", update_interval="3ba", ema_start="20ba"), PARAMS + FLOAT_BUFFERS, ()),
    ("nemo", {"decay": 0.95, "every_n_steps": 3}, NeMoReplay(0.95, 3), PARAMS, ()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("peer", "kwargs", "peer_replay", "averaged", "copied"),
    EMA_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(EMA_CASES)],
)
def test_ema_like_averages_like_the_peer(peer, kwargs, peer_replay, averaged, copied):
    model = small_model()
    ema = migrate.ema_like(peer, model, **kwargs)
    start, trajectory, decays, last_update = snapshot(model), [], [], None
    for _ in range(STEPS):
        train_step(model)
        trajectory.append(snapshot(model))
        decays.append(peer_replay.update())
        ema.update()
        if decays[-1] != 1.0:
            last_update = trajectory[-1]
    expected = unrolled(start, trajectory, decays)
    got = ema.averaged_state_dict()
    for name in averaged:
        assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    for name in copied:  # the peer copies these at each of its updates
        assert_close(got[name], last_update[name], rtol=0, atol=0, msg=name)
    for name in set(FLOAT_BUFFERS) - set(averaged) - set(copied):  # left in the model by the peer
        assert_close(got[name], model.state_dict()[name], rtol=0, atol=0, msg=name)
    # Integer buffers: copied at every update (the model's count), never averaged.
    assert got["1.num_batches_tracked"].item() == STEPS == model[1].num_batches_tracked.item()


@pytest.mark.parametrize("peer", ["ema_pytorch", "lightning"])
def test_updating_only_where_the_peer_updates_gives_the_same_average(peer):
    kwargs = (
        {"beta": 0.99, "update_after_step": 20, "update_every": 7}
        if peer == "ema_pytorch"
        else {"decay": 0.95, "update_every_n_steps": 7, "update_starting_at_step": 30}
    )
    model = small_model()
    every_step = migrate.ema_like(peer, model, **kwargs)
    at_updates = migrate.ema_like(peer, model, **kwargs)
    s = every_step.schedule
    for n in range(1, STEPS + 1):
        train_step(model)
        every_step.update()
        if s(t=n, dt=1) != 1.0:  # a step where the peer updates
            at_updates.update(t=n)
            a, b = every_step.averaged_state_dict(), at_updates.averaged_state_dict()
            for name in PARAMS + FLOAT_BUFFERS:
                assert_close(a[name], b[name], rtol=0, atol=0)
    assert at_updates.num_updates < every_step.num_updates == STEPS


def test_ema_pytorch_excluded_names_are_read_from_the_model():
    model = small_model()
    ema = migrate.ema_like(
        "ema_pytorch",
        model,
        update_after_step=0,
        update_every=1,
        ignore_names={"0.bias"},
        ignore_startswith_names={"3."},
        param_or_buffer_names_no_ema=["1.running_var"],
    )
    for _ in range(5):
        train_step(model)
        ema.update()
    live = ("0.bias", "3.weight", "3.bias", "1.running_var")
    assert set(ema._spec.live) == set(live)
    got = ema.averaged_state_dict()
    for name in live:
        assert torch.equal(got[name], model.state_dict()[name])


def test_ema_like_maps_device_dtype_and_buffers():
    model = small_model().float()
    ema = migrate.ema_like("timm", model, device="cpu", dtype=torch.float64, exclude_buffers=True, foreach=False)
    assert ema._buffers_mode == "copy"
    assert ema.averaged_state_dict(dtype="average")["0.weight"].dtype == torch.float64
    bf16 = small_model().to(torch.bfloat16)
    ema = migrate.ema_like("timm", bf16)  # stochastic_rounding=True by default: emakit keeps fp32 instead
    assert ema.averaged_state_dict(dtype="average")["0.weight"].dtype == torch.float32
    assert migrate.ema_like("timm", bf16, dtype=torch.bfloat16, stochastic_rounding=False) is not None
    assert migrate.ema_like("averaged_model", model)._buffers_mode == "copy"
    assert migrate.ema_like("averaged_model", model, use_buffers=True)._buffers_mode == "average"
    assert migrate.ema_like("lightning", model)._buffers_mode == "average"
    assert migrate.ema_like("lightning", model, use_buffers=False)._buffers_mode == "copy"
    ema = migrate.ema_like("diffusers", model, foreach=True, model_cls=object, model_config={}, device="cpu")
    assert set(ema._spec.live) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    ema = migrate.ema_like("torch_ema", model, decay=0.9)
    assert set(ema._spec.average) == set(PARAMS)
    ema = migrate.ema_like(
        "ema_pytorch",
        model,
        include_online_model=False,
        allow_different_devices=True,
        use_foreach=True,
        move_ema_to_online_device=True,
        coerce_dtype=True,
        update_model_with_ema_beta=0.5,
    )
    assert set(ema._spec.average) == set(PARAMS + FLOAT_BUFFERS)
    assert isinstance(ema, EMA)


def test_ema_like_normalises_wrapper_prefixes_in_names():
    model = small_model()
    ema = migrate.ema_like("ema_pytorch", model, ignore_names={"module.0.bias", "_orig_mod.3.bias"})
    assert set(ema._spec.live) == {"0.bias", "3.bias"}


def test_hyphenated_peer_names_are_accepted():
    assert migrate.schedule("ema-pytorch") == migrate.schedule("ema_pytorch")
    assert migrate.schedule("torch-ema", decay=0.9) == migrate.schedule("torch_ema", decay=0.9)


@pytest.mark.parametrize(("peer", "kwargs"), [(c[0], c[2]) for c in CASES])
def test_repr_reads_as_the_call_that_builds_it(peer, kwargs):
    s = migrate.schedule(peer, **kwargs)
    assert repr(s).startswith(f"migrate.schedule({peer!r}, ")
    assert eval(repr(s), {"migrate": migrate}) == s


def test_peers_lists_every_known_peer():
    assert migrate.PEERS == (
        "timm",
        "diffusers",
        "ema_pytorch",
        "ema_pytorch_karras",
        "averaged_model",
        "torch_ema",
        "lightning",
        "composer",
        "nemo",
    )
    assert "load" in migrate.__all__


# --------------------------------------------------------------------------- refusals


def test_unknown_peer_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown peer 'timm_v2'; known peers: timm, diffusers, ema_pytorch, "):
        migrate.schedule("timm_v2")
    with pytest.raises(ValueError, match=r"migrate.ema_like\('swa'\): unknown peer 'swa'; known peers: .*lightning"):
        migrate.ema_like("swa", small_model())
    with pytest.raises(TypeError, match=r"peer must be a str.*got peer=3"):
        migrate.schedule(3)


def test_unknown_argument_is_named_with_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unexpected argument 'max_decay'; timm's ModelEmaV3 takes decay, min_decay, "
                       r"update_after_step, use_warmup, warmup_gamma, warmup_power"):  # fmt: skip
        migrate.schedule("timm", max_decay=0.9)
    with pytest.raises(TypeError, match=r"unexpected argument 'decay'; ema-pytorch's EMA takes beta, "):
        migrate.schedule("ema_pytorch", decay=0.9)
    with pytest.raises(
        TypeError,
        match=r"unexpected argument 'device'; torch-ema's ExponentialMovingAverage takes decay, use_num_updates \(",
    ):
        migrate.ema_like("torch_ema", small_model(), decay=0.9, device="cpu")
    with pytest.raises(TypeError, match=r"'use_warmup'; diffusers' EMAModel takes .*foreach, model_cls"):
        migrate.ema_like("diffusers", small_model(), use_warmup=True)


def test_constructor_arguments_given_to_schedule_point_to_ema_like():
    with pytest.raises(TypeError, match=r"device is not part of the decay rule; give it to migrate.ema_like\('timm'"):
        migrate.schedule("timm", device="cpu")
    with pytest.raises(TypeError, match=r"use_buffers is not part of the decay rule"):
        migrate.schedule("averaged_model", use_buffers=True)


@pytest.mark.parametrize(
    ("peer", "kwargs", "error", "match"),
    [
        ("timm", {"decay": 1.5}, ValueError, r"decay must be in \[0, 1\], got decay=1.5"),
        ("timm", {"min_decay": -0.1}, ValueError, r"min_decay must be in \[0, 1\], got min_decay=-0.1"),
        ("timm", {"update_after_step": -1}, ValueError, r"update_after_step must be >= 0, got update_after_step=-1"),
        ("timm", {"update_after_step": 2.5}, TypeError, r"update_after_step must be an int .*got update_after_step=2.5"),
        ("timm", {"use_warmup": 1}, TypeError, r"use_warmup must be True or False, got use_warmup=1"),
        ("timm", {"warmup_gamma": 0.0}, ValueError, r"warmup_gamma must be a finite number > 0, got warmup_gamma=0.0"),
        ("diffusers", {"decay": -0.5}, ValueError, r"peer 'diffusers': decay must be in \[0, 1\], got decay=-0.5"),
        ("diffusers", {"power": -1}, ValueError, r"power must be a finite number > 0, got power=-1"),
        ("diffusers", {"decay": "0.9"}, TypeError, r"decay must be a real number, got decay='0.9'"),
        ("ema_pytorch", {"beta": 2}, ValueError, r"beta must be in \[0, 1\], got beta=2"),
        ("ema_pytorch", {"update_every": 0}, ValueError, r"update_every must be >= 1, got update_every=0"),
        ("ema_pytorch", {"min_value": 1.1}, ValueError, r"min_value must be in \[0, 1\], got min_value=1.1"),
        ("ema_pytorch_karras", {}, ValueError, r"give exactly one of sigma_rel or gamma, got sigma_rel=None, gamma=None"),
        ("ema_pytorch_karras", {"sigma_rel": 0.1, "gamma": 7.0}, ValueError, r"give exactly one of sigma_rel or gamma"),
        ("ema_pytorch_karras", {"sigma_rel": 0.3}, ValueError, r"sigma_rel must be in \(0, 0.2887\), got sigma_rel=0.3"),
        ("ema_pytorch_karras", {"gamma": -2.0}, ValueError, r"gamma must be > -1, got gamma=-2.0"),
        ("ema_pytorch_karras", {"gamma": 1.0, "update_every": -5}, ValueError, r"update_every must be >= 1"),
        ("averaged_model", {"decay": 1.01}, ValueError, r"decay must be in \[0, 1\], got decay=1.01"),
        ("torch_ema", {}, TypeError, r"decay is required \(torch-ema's ExponentialMovingAverage has no default\)"),
        ("torch_ema", {"decay": 0.9, "use_num_updates": None}, TypeError, r"use_num_updates must be True or False"),
        ("lightning", {"decay": -1}, ValueError, r"decay must be in \[0, 1\], got decay=-1"),
        ("lightning", {"update_every_n_steps": 0}, ValueError, r"update_every_n_steps must be >= 1, got .*=0"),
        ("lightning", {"update_starting_at_step": -3}, ValueError, r"update_starting_at_step must be >= 0, got .*=-3"),
        ("lightning", {"update_starting_at_epoch": 2}, ValueError, r"update_starting_at_epoch=2 is not supported: .*"
                                                                   r"update_starting_at_step="),
    ],
)  # fmt: skip
def test_bad_values_are_refused_by_name(peer, kwargs, error, match):
    with pytest.raises(error, match=match):
        migrate.schedule(peer, **kwargs)
    with pytest.raises(error, match=match):
        migrate.ema_like(peer, small_model(), **kwargs)


@pytest.mark.parametrize(
    ("peer", "kwargs", "error", "match"),
    [
        ("ema_pytorch", {"ema_model": nn.Linear(1, 1)}, ValueError, r"ema_model='Linear' is not supported: emakit never copies"),
        ("ema_pytorch", {"update_model_with_ema_every": 100}, ValueError,
         r"update_model_with_ema_every=100 is not supported: .*ema.copy_to\(model\)"),
        ("ema_pytorch", {"forward_method_names": ("sample",)}, ValueError, r"forward_method_names=\('sample',\) .*swapped"),
        ("ema_pytorch", {"lazy_init_ema": True}, ValueError, r"lazy_init_ema=True is not supported: emakit allocates"),
        ("ema_pytorch", {"ignore_names": "0.bias"}, TypeError, r"ignore_names must be a set or list of names"),
        ("ema_pytorch", {"ignore_names": {"0.bais"}}, ValueError,
         r"ignore_names holds '0.bais', which is no name of a parameter or buffer of the model"),
        ("ema_pytorch", {"ignore_startswith_names": {"encoder."}}, ValueError,
         r"ignore_startswith_names holds 'encoder.', which is no prefix of a parameter or buffer"),
        ("ema_pytorch", {"param_or_buffer_names_no_ema": [3]}, TypeError, r"must hold names \(str\), got 3"),
        ("ema_pytorch_karras", {"gamma": 1.0, "frozen": True}, ValueError, r"frozen=True is not supported"),
        ("ema_pytorch_karras", {"gamma": 1.0, "ema_model": nn.Linear(1, 1)}, ValueError, r"ema_model='Linear'"),
        ("averaged_model", {"multi_avg_fn": torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)}, ValueError,
         r"multi_avg_fn='get_ema_multi_avg_fn.<locals>.ema_update' is not supported: .*pass decay=d"),
        ("averaged_model", {"avg_fn": torch.optim.swa_utils.get_swa_avg_fn()}, ValueError, r"avg_fn=.* is not supported"),
        ("averaged_model", {"use_buffers": "yes"}, TypeError, r"use_buffers must be True or False"),
        ("lightning", {"avg_fn": lambda a, b, n: a}, ValueError, r"avg_fn=.*EMAWeightAveraging sets its own"),
        ("timm", {"dtype": torch.bfloat16}, ValueError,
         r"dtype=torch.bfloat16 is not supported: with stochastic_rounding=True timm rounds"),
        ("diffusers", {"max_value": 0.99}, TypeError, r"max_value is diffusers' deprecated name of decay; pass decay=0.99"),
        ("diffusers", {"min_value": 0.1}, TypeError, r"min_value is diffusers' deprecated name of min_decay"),
    ],
)  # fmt: skip
def test_ema_like_refuses_what_it_cannot_honour(peer, kwargs, error, match):
    with pytest.raises(error, match=match):
        migrate.ema_like(peer, small_model(), **kwargs)


def test_ema_like_needs_a_module():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got dict"):
        migrate.ema_like("timm", {})


def test_peer_time_counts_whole_steps():
    s = migrate.schedule("timm")
    with pytest.raises(ValueError, match=r"t and dt must be whole numbers, got t=2.5, dt=1"):
        s(t=2.5, dt=1)
    with pytest.raises(ValueError, match=r"need dt > 0 and t >= dt"):
        s(t=2, dt=3)
    assert s(t=3.0, dt=1.0) == s(t=3, dt=1)
    ema = EMA(small_model(), schedule=s)
    with pytest.raises(ValueError, match="whole numbers"):
        ema.update(dt=0.5)


# --------------------------------------------------------------------------- Composer and NeMo, tensor for tensor


def _composer_step(ema_values, model, smoothing):
    """composer.algorithms.ema.compute_ema on EMAParameters: ``ema.copy_(ema * s + param * (1 - s))``."""
    for name, value in model.state_dict().items():
        if name in ema_values:
            ema_values[name].copy_(ema_values[name] * smoothing + value * (1.0 - smoothing))


def _nemo_step(ema_values, model, decay):
    """NeMo's ema_update: ``torch._foreach_mul_(ema, decay)``, ``torch._foreach_add_(ema, params, alpha=1 - decay)``."""
    names = [n for n, _ in model.named_parameters()]
    ema = [ema_values[n] for n in names]
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, [p.detach() for p in model.parameters()], alpha=1.0 - decay)


@pytest.mark.parametrize("peer", ["composer", "nemo"])
def test_float32_averages_match_the_peers_arithmetic(peer):
    """The peer's own update (float32, as it runs) against emakit's: equal to float32 rounding (<= 1e-6)."""
    model = small_model().float()
    if peer == "composer":
        kwargs = {"half_life": "6ba", "update_interval": "2ba", "ema_start": "9ba"}
        decays = ComposerReplay(**kwargs)
        averaged = PARAMS + FLOAT_BUFFERS
    else:
        kwargs = {"decay": 0.9, "every_n_steps": 2}
        decays = NeMoReplay(**kwargs)
        averaged = PARAMS
    ema = migrate.ema_like(peer, model, **kwargs)
    peer_avg = {n: v.detach().clone() for n, v in model.state_dict().items() if n in averaged}
    for _ in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            model.train()
            model(torch.randn(8, 3))
        d = decays.update()
        if d == 0.0:  # Composer's start: a fresh copy (then an update of a copy by itself)
            peer_avg = {n: v.detach().clone() for n, v in model.state_dict().items() if n in averaged}
        elif d != 1.0:
            (_composer_step if peer == "composer" else _nemo_step)(peer_avg, model, d)
        ema.update()
    got = ema.averaged_state_dict()
    for name in averaged:
        assert_close(got[name], peer_avg[name], rtol=0, atol=1e-6, msg=name)


def test_composer_and_nemo_arguments_are_checked_by_name():
    cases = [
        ({"half_life": "10ba", "smoothing": 0.9}, ValueError, "exactly one of half_life or smoothing"),
        ({"smoothing": 0.9}, ValueError, "pass half_life=None with smoothing"),
        ({"half_life": "10ba", "update_interval": "1ep"}, ValueError, "in half_life's unit"),
        ({"half_life": "10"}, ValueError, r"half_life must be a Composer time string .* got half_life='10'"),
        ({"half_life": "10ba", "ema_start": "0.5dur"}, ValueError, "needs the run's length"),
        ({"half_life": None, "smoothing": 1.5}, ValueError, r"smoothing must be in \[0, 1\]"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            migrate.schedule("composer", **kwargs)
    with pytest.raises(TypeError, match=r"decay is required \(NeMo's EMA callback has no default\)"):
        migrate.schedule("nemo")
    with pytest.raises(TypeError, match="every_n_steps must be an int"):
        migrate.schedule("nemo", decay=0.9, every_n_steps=1.5)
    epochs = migrate.schedule("composer", half_life="2ep")  # epochs: t counts epochs, the same rule
    assert [epochs(t=n, dt=1) for n in (1, 2, 3)] == [0.0, 2**-0.5, 2**-0.5]
    model = small_model()
    assert migrate.ema_like("nemo", model, decay=0.9, cpu_offload=True)._device == torch.device("cpu")
    assert set(FLOAT_BUFFERS) <= set(migrate.ema_like("nemo", model, decay=0.9)._spec.live)  # parameters only
