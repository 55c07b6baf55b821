"""EMA semantics against independent float64 re-computations in the test."""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import emakit
from emakit import kernels, schedules


@pytest.fixture(autouse=True, params=["gathered", "per-tensor", "mixed"])
def update_path(request, monkeypatch):
    """Run every test with small tensors gathered (default), none gathered, and a mix."""
    limit = {"gathered": kernels.SMALL_NUMEL, "per-tensor": 0, "mixed": 20}[request.param]
    monkeypatch.setattr(kernels, "SMALL_NUMEL", limit)
    return request.param


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def perturb_(model, scale=0.1):
    """One 'optimizer step': move every trainable parameter by noise."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def train_step(model):
    """A training forward (updates BatchNorm statistics) followed by a parameter move."""
    model.train()
    model(torch.randn(8, 3, 6, 6))
    perturb_(model)


class Reference:
    """The EMA re-computed in float64 from the model's state dict after each update."""

    def __init__(self, model):
        self.values = {k: v.detach().double().clone() for k, v in model.state_dict().items()}

    def update(self, model, decay):
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.values[k] = decay * self.values[k] + (1 - decay) * v.detach().double()
            else:
                self.values[k] = v.detach().clone()


def assert_matches(ema_sd, ref, rtol=1e-6, atol=1e-7):
    assert list(ema_sd) == list(ref.values)
    for k, v in ref.values.items():
        got = ema_sd[k]
        if v.is_floating_point():
            torch.testing.assert_close(got.double(), v, rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(got, v), k


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.9),
        schedules.halflife(3.0),
        schedules.span(7),
        schedules.warmup(power=0.75, max_decay=0.95),
        schedules.power(sigma_rel=0.1),
        schedules.start_at(5, schedules.constant(0.8)),
        lambda t, dt: 0.5**dt if t > 2 else 0.0,
    ],
    ids=["constant", "halflife", "span", "warmup", "power", "start_at", "callable"],
)
def test_update_matches_float64_recomputation(schedule):
    model = Net()
    ema = emakit.EMA(model, schedule=schedule)
    ref = Reference(model)
    for _ in range(12):
        train_step(model)
        decay = ema.update()
        assert decay == schedule(ema.t, 1)
        ref.update(model, decay)
    assert_matches(ema.averaged_state_dict(), ref)
    assert ema.t == 12 and ema.num_updates == 12


def test_decay_shorthand_equals_constant_schedule():
    model = Net()
    a = emakit.EMA(model, decay=0.99)
    b = emakit.EMA(model, schedule=schedules.constant(0.99))
    for _ in range(3):
        train_step(model)
        a.update()
        b.update()
    for k, v in a.averaged_state_dict().items():
        assert torch.equal(v, b.averaged_state_dict()[k])


@pytest.mark.parametrize("schedule", [schedules.constant(0.9), schedules.halflife(4.0), schedules.warmup(power=1.0)])
def test_update_every_k_with_dt_k_equals_k_updates_of_an_unchanged_model(schedule):
    k = 4
    model = Net()
    every_step = emakit.EMA(model, schedule=schedule)
    every_k = emakit.EMA(model, schedule=schedule)
    for _ in range(5):
        train_step(model)
        for _ in range(k):
            every_step.update()  # the model does not change within the k steps
        every_k.update(dt=k)
    assert every_k.t == every_step.t == 20
    for name, v in every_step.averaged_state_dict(dtype="average").items():
        torch.testing.assert_close(every_k.averaged_state_dict(dtype="average")[name], v, rtol=1e-5, atol=1e-6)


def test_power_profile_with_irregular_dt_equals_closed_form_weights():
    gamma = 5.0
    model = nn.Linear(3, 3)
    ema = emakit.EMA(model, schedule=schedules.power(gamma=gamma), dtype=torch.float64)
    times, values = [], []
    t = 0
    for dt in [7, 1, 3, 64, 2, 2, 30, 5]:  # images seen per update with a varying batch size
        perturb_(model)
        t += dt
        ema.update(t=t)
        times.append(t)
        values.append(model.weight.detach().double().clone())
    # The value held over (t_{j-1}, t_j] weighs (t_j^(g+1) - t_{j-1}^(g+1)) / t^(g+1).
    prev = [0] + times[:-1]
    expected = sum(((b / t) ** (gamma + 1) - (a / t) ** (gamma + 1)) * v for a, b, v in zip(prev, times, values))
    torch.testing.assert_close(ema.averaged_state_dict(dtype="average")["weight"], expected, rtol=1e-12, atol=1e-12)


def test_time_arguments():
    model = nn.Linear(2, 2)
    ema = emakit.EMA(model, decay=0.9)
    ema.update()
    ema.update(dt=3)
    ema.update(t=10)
    ema.update(t=12, dt=2)
    assert ema.t == 12
    for kwargs, match in [
        ({"dt": 0}, "dt"),
        ({"dt": -1}, "dt"),
        ({"t": 12}, "t must be"),
        ({"t": 5}, "t must be"),
        ({"t": 20, "dt": 3}, "disagree"),
        ({"dt": "1"}, "dt"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            ema.update(**kwargs)
    assert ema.t == 12 and ema.num_updates == 4


def test_start_at_copies_until_t0():
    model = Net()
    ema = emakit.EMA(model, schedule=schedules.start_at(3, schedules.constant(0.5)))
    ref = Reference(model)
    for step in range(1, 7):
        train_step(model)
        decay = ema.update()
        ref.update(model, decay)
        if step <= 3:
            for k, v in model.state_dict().items():
                assert torch.equal(ema.averaged_state_dict()[k], v), (step, k)
    assert_matches(ema.averaged_state_dict(), ref)


def test_batchnorm_buffers_averaged_and_num_batches_tracked_copied():
    model = Net()
    ema = emakit.EMA(model, decay=0.9)
    ref = Reference(model)
    for _ in range(100):
        train_step(model)
        ref.update(model, ema.update())
    sd = ema.averaged_state_dict()
    assert sd["bn.num_batches_tracked"].item() == 100 == model.bn.num_batches_tracked.item()
    assert sd["bn.num_batches_tracked"].dtype == torch.int64
    assert_matches(sd, ref)


def test_buffers_copy_mode_copies_float_buffers():
    model = Net()
    ema = emakit.EMA(model, decay=0.9, buffers="copy")
    for _ in range(5):
        train_step(model)
        ema.update()
    sd = ema.averaged_state_dict()
    assert torch.equal(sd["bn.running_mean"], model.bn.running_mean)
    assert not torch.equal(sd["conv.weight"], model.conv.weight)


def test_bf16_model_with_fp32_average_reaches_float64_answer():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    ema = emakit.EMA(model, decay=0.999)
    assert ema.averaged_state_dict(dtype="average")["weight"].dtype == torch.float32
    ref = Reference(model)
    for _ in range(200):
        perturb_(model, 0.01)
        ref.update(model, ema.update())
    got = ema.averaged_state_dict(dtype="average")
    for k in ("weight", "bias"):
        torch.testing.assert_close(got[k].double(), ref.values[k], rtol=1e-5, atol=1e-6)
    assert ema.averaged_state_dict()["weight"].dtype == torch.bfloat16  # model dtype by default
    # Why fp32: a bf16 average at 0.9999 does not move (the increment is below bf16's
    # resolution) except on the few elements that are near zero.
    stuck = emakit.EMA(model, decay=0.9999, dtype=torch.bfloat16)
    tracked = emakit.EMA(model, decay=0.9999)
    before = stuck.averaged_state_dict()["weight"].clone()
    for _ in range(20):
        perturb_(model, 0.01)
        stuck.update()
        tracked.update()
    moved = stuck.averaged_state_dict()["weight"] != before
    truly_moved = tracked.averaged_state_dict(dtype="average")["weight"] != before.float()
    assert moved.float().mean() < 0.05 and truly_moved.all()


def test_staged_update_split_into_many_chunks(monkeypatch):
    """Mixed precision with a tiny chunk: tensors split across batches, batches mixing tensors."""
    monkeypatch.setitem(kernels._CHUNK, "cpu", 50)
    model = nn.Sequential(nn.Linear(13, 11), nn.Linear(11, 3), nn.Conv2d(2, 3, 3)).to(torch.bfloat16)
    model[2].to(memory_format=torch.channels_last)
    ema = emakit.EMA(model, decay=0.7)
    ref = Reference(model)
    for _ in range(6):
        perturb_(model)
        ref.update(model, ema.update())
    assert_matches(ema.averaged_state_dict(dtype="average"), ref, rtol=1e-5, atol=1e-6)


def test_swapped_holds_average_inside_and_restores_after_an_exception():
    model = Net()
    ema = emakit.EMA(model, decay=0.5)
    for _ in range(3):
        train_step(model)
        ema.update()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    avg = {k: v.clone() for k, v in ema.averaged_state_dict().items()}
    with pytest.raises(KeyError):
        with ema.swapped():
            for k, v in model.state_dict().items():
                assert torch.equal(v, avg[k]), k
            with pytest.raises(RuntimeError, match="swapped"):
                ema.update()
            raise KeyError("body failed")
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k
    ema.update()  # allowed again


def test_copy_to_other_model():
    model = Net()
    ema = emakit.EMA(model, decay=0.5)
    train_step(model)
    ema.update()
    other = Net()
    ema.copy_to(other)
    for k, v in ema.averaged_state_dict().items():
        assert torch.equal(other.state_dict()[k], v)


def test_resume_is_bit_identical_through_torch_save():
    def run(model, ema, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
            ema.update()

    torch.manual_seed(1)
    model = Net().to(torch.bfloat16)
    straight = emakit.EMA(model, schedule=schedules.power(sigma_rel=0.1))
    start = copy.deepcopy(model)
    run(model, straight, 10, 0)
    run(model, straight, 10, 1)

    model2 = start
    first = emakit.EMA(model2, schedule=schedules.power(sigma_rel=0.1))
    run(model2, first, 10, 0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = emakit.EMA(model2, schedule=schedules.power(sigma_rel=0.1))
    resumed.load_state_dict(state)
    assert resumed.t == 10 and resumed.num_updates == 10
    run(model2, resumed, 10, 1)
    for k, v in straight.averaged_state_dict(dtype="average").items():
        assert torch.equal(resumed.averaged_state_dict(dtype="average")[k], v), k
    assert resumed.state_dict()["averages"][0]["conv.weight"].dtype == torch.float32


def test_dtype_and_device_survive_state_dict():
    model = nn.Linear(3, 3)
    ema = emakit.EMA(model, decay=0.9, dtype=torch.float64, device="cpu")
    state = ema.state_dict()
    assert state["averages"][0]["weight"].dtype == torch.float64
    fresh = emakit.EMA(model, decay=0.9, dtype=torch.float64)
    fresh.load_state_dict(state)
    assert fresh.averaged_state_dict(dtype="average")["weight"].dtype == torch.float64
    fp32 = emakit.EMA(model, decay=0.9)
    with pytest.warns(UserWarning) as record:
        fp32.load_state_dict(state)
    messages = " ".join(str(w.message) for w in record)
    assert "cast" in messages and "dtypes: stored 'torch.float64'" in messages
    assert fp32.averaged_state_dict(dtype="average")["weight"].dtype == torch.float32


def test_load_state_dict_keeps_own_settings_and_warns():
    model = nn.Linear(3, 3)
    saved = emakit.EMA(model, decay=0.9).state_dict()
    ema = emakit.EMA(model, decay=0.99)
    with pytest.warns(UserWarning, match="other settings"):
        ema.load_state_dict(saved)
    assert ema.schedule == schedules.constant(0.99)


def test_errors_leave_the_state_unchanged():
    model = Net()
    ema = emakit.EMA(model, decay=0.9)
    train_step(model)
    ema.update()
    before = {k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}

    def unchanged():
        assert ema.t == 1 and ema.num_updates == 1
        for k, v in ema.state_dict()["averages"][0].items():
            assert torch.equal(v, before[k]), k

    good = ema.state_dict()
    bad_shape = {**good, "averages": [{**good["averages"][0], "head.weight": torch.zeros(2, 2)}]}
    with pytest.raises(ValueError, match="head.weight"):
        ema.load_state_dict(bad_shape)
    unchanged()
    missing = {**good, "averages": [{k: v for k, v in good["averages"][0].items() if k != "bn.weight"}]}
    with pytest.raises(KeyError, match="bn.weight"):
        ema.load_state_dict(missing)
    unchanged()
    extra = {**good, "averages": [{**good["averages"][0], "other.weight": torch.zeros(1)}]}
    with pytest.raises(KeyError, match="other.weight"):
        ema.load_state_dict(extra)
    unchanged()
    with pytest.raises(ValueError, match="format"):
        ema.load_state_dict(Net().state_dict())
    with pytest.raises(ValueError, match="t must be"):
        ema.load_state_dict({**good, "t": -3})
    unchanged()
    with pytest.raises(ValueError, match="conv.weight"):
        ema.update(nn.Sequential())  # no tensors at all: the first name is reported
    other = Net()
    other.head = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="head.weight.*shape"):
        ema.update(other)
    unchanged()
    with pytest.raises(ValueError, match="decay"):
        emakit.EMA(Net(), schedule=lambda t, dt: 1.5).update()
    bad = emakit.EMA(model, schedule=lambda t, dt: float("nan"))
    with pytest.raises(ValueError, match="nan"):
        bad.update()
    assert bad.t == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"decay": 1.2}, "decay"),
        ({"decay": 0.9, "schedule": schedules.constant(0.9)}, "not both"),
        ({}, "decay"),
        ({"decay": 0.9, "buffers": "skip"}, "buffers"),
        ({"schedule": 0.9}, "callable"),
        ({"decay": 0.9, "dtype": torch.int32}, "dtype"),
        ({"decay": 0.9, "include": "bn"}, "include"),
    ],
)
def test_constructor_errors_name_the_parameter(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        emakit.EMA(Net(), **kwargs)


def test_wrapper_prefixes_are_normalised():
    model = Net()
    ema = emakit.EMA(model, decay=0.5)
    ref = Reference(model)
    wrapped = nn.DataParallel(model)  # 'module.' prefix (runs the module itself on CPU)
    compiled = torch.compile(model)  # '_orig_mod.' prefix; never called, so nothing compiles
    assert next(iter(wrapped.state_dict())).startswith("module.")
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    for view in (wrapped, compiled, model):
        train_step(model)
        ref.update(model, ema.update(view))
    assert_matches(ema.averaged_state_dict(), ref)
    # Built on the wrapper, the keys are the plain model's.
    on_wrapper = emakit.EMA(nn.DataParallel(model), decay=0.5)
    assert list(on_wrapper.averaged_state_dict()) == list(model.state_dict())
    on_wrapper.update(model)
    model.load_state_dict(on_wrapper.averaged_state_dict())


def test_module_that_cannot_be_deep_copied():
    class NoCopy(Net):
        def __deepcopy__(self, memo):
            raise RuntimeError("this module does not support deepcopy")

    model = NoCopy()
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    ema = emakit.EMA(model, decay=0.9)
    ref = Reference(model)
    train_step(model)
    ref.update(model, ema.update())
    assert_matches(ema.averaged_state_dict(), ref)


def test_frozen_parameters_take_no_memory_and_are_read_from_the_model():
    model = Net()
    model.conv.requires_grad_(False)  # e.g. a frozen backbone; only the rest trains
    ema = emakit.EMA(model, decay=0.9)
    stored = sum(v.numel() for v in ema.state_dict()["averages"][0].values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    floating_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert stored == trainable + floating_buffers
    assert "conv.weight" not in ema.state_dict()["averages"][0]
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # changes to frozen tensors show through
    assert torch.equal(ema.averaged_state_dict()["conv.weight"], model.conv.weight)


def test_include_filter():
    model = Net()
    ema = emakit.EMA(model, decay=0.5, include=lambda name: not name.startswith("head."))
    assert "head.weight" not in ema.state_dict()["averages"][0]
    train_step(model)
    ema.update()
    assert torch.equal(ema.averaged_state_dict()["head.weight"], model.head.weight)
    assert not torch.equal(ema.averaged_state_dict()["conv.weight"], model.conv.weight)


def test_tied_weights_are_stored_once_and_emitted_under_both_names():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    model = Tied()
    ema = emakit.EMA(model, decay=0.5)
    assert list(ema.state_dict()["averages"][0]) == ["embed.weight"]
    perturb_(model)
    ema.update()
    sd = ema.averaged_state_dict()
    assert list(sd) == list(model.state_dict())
    assert torch.equal(sd["out.weight"], sd["embed.weight"])


def test_load_timm_style_checkpoint():
    model = Net()
    source = emakit.EMA(model, decay=0.5)
    train_step(model)
    source.update()
    checkpoint = {
        "state_dict": model.state_dict(),
        "state_dict_ema": {"module." + k: v for k, v in source.averaged_state_dict().items()},
    }
    ema = emakit.EMA(Net(), decay=0.5)
    ema.load_averaged_state_dict(checkpoint, t=100)
    assert ema.t == 100
    for k, v in source.averaged_state_dict().items():
        assert torch.equal(ema.averaged_state_dict()[k], v)
    with pytest.raises(KeyError, match="conv.weight"):
        ema.load_averaged_state_dict({"head.weight": torch.zeros(5, 4)})


def test_skip_nonfinite_guard():
    model = nn.Linear(3, 3)
    ema = emakit.EMA(model, decay=0.5, skip_nonfinite=True)
    before = ema.averaged_state_dict()["weight"].clone()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN"):
        ema.update()
    assert torch.equal(ema.averaged_state_dict()["weight"], before)
    assert ema.num_skipped == 1 and ema.num_updates == 0 and ema.t == 1
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.update()
    assert ema.num_updates == 1


def test_contiguous_parameters_single_array_update_and_optimizer_still_works():
    model = Net().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = emakit.contiguous_parameters_(model)
    assert len(buffers) == 1
    (flat,) = buffers.values()
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ema = emakit.EMA(model, decay=0.8)
    binding = ema._bind(model)
    assert any(r is not None for r in binding.regions)  # the parameters form one array
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = Reference(model)
    for _ in range(4):
        model.train()
        opt.zero_grad()
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
        assert model.conv.weight.data_ptr() == flat.data_ptr() or flat.data_ptr() <= model.head.bias.data_ptr()
        ref.update(model, ema.update())
    assert_matches(ema.averaged_state_dict(), ref)
    # Re-allocated parameters (model.to() etc.) are noticed: the per-tensor path takes over.
    model.head.weight.data = model.head.weight.data.clone()
    model.conv.weight.data = model.conv.weight.data.clone()
    perturb_(model)
    ref.update(model, ema.update())
    assert_matches(ema.averaged_state_dict(), ref)


def test_averaged_state_dict_loads_into_the_model():
    model = Net()
    ema = emakit.EMA(model, decay=0.9)
    train_step(model)
    ema.update()
    fresh = Net()
    fresh.load_state_dict(ema.averaged_state_dict())
    with pytest.raises(ValueError, match="dtype"):
        ema.averaged_state_dict(dtype="float16")


def test_cast_model_after_creation_gives_a_clear_error():
    model = nn.Linear(3, 3)
    ema = emakit.EMA(model, decay=0.9)
    model.to(torch.float64)
    with pytest.raises(ValueError, match="weight.*dtype"):
        ema.update()
    assert math.isclose(ema.t, 0)


def test_reallocated_parameters_are_noticed():
    model = Net()
    ema = emakit.EMA(model, decay=0.6)
    ref = Reference(model)
    train_step(model)
    ref.update(model, ema.update())
    model.head.weight.data = model.head.weight.data.clone()  # same values, new storage
    model.bn.bias.data = model.bn.bias.data.clone()
    train_step(model)
    ref.update(model, ema.update())
    assert_matches(ema.averaged_state_dict(), ref)
    before = {k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}
    model.head.weight.data = torch.zeros(7, 4)
    with pytest.raises(ValueError, match="head.weight.*shape"):
        ema.update()
    assert ema.t == 2
    for k, v in ema.state_dict()["averages"][0].items():
        assert torch.equal(v, before[k]), k


def test_the_averager_options_are_said_once_and_documented():
    """EMA, PowerEMA (and the Lightning callbacks) take the options of one definition; EMA documents each."""
    import inspect

    from emakit._engine.options import Options

    for cls in (emakit.EMA, emakit.PowerEMA):
        params = inspect.signature(cls).parameters
        for name in Options.names():
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (cls, name)
            assert params[name].default == getattr(Options(), name), (cls, name)
    doc = inspect.getdoc(emakit.EMA)
    missing = [n for n in Options.names() if f"\n    {n}:" not in doc]
    assert not missing, f"EMA's docstring does not document {missing}"
    with pytest.raises(TypeError, match=r"EMA\(\) got unexpected keyword argument\(s\) 'bufers'.*buffers, include"):
        emakit.EMA(torch.nn.Linear(2, 2), 0.9, bufers="copy")
    with pytest.raises(ValueError, match=r"PowerEMA: buffers must be one of \('average', 'copy'\), got buffers='x'"):
        emakit.PowerEMA(torch.nn.Linear(2, 2), buffers="x")


# --------------------------------------------------------------------------- the last decay, reset, resume


def test_decay_is_the_last_updates_decay_and_none_before():
    model = Net()
    ema = emakit.EMA(model, schedule=schedules.warmup(power=2 / 3, max_decay=0.999))
    assert ema.decay is None
    t = 0
    for dt in (1, 1, 3, 2):  # gradient accumulation: updates every few steps
        perturb_(model)
        t += dt
        returned = ema.update(dt=dt)
        expected = math.prod(min(0.999, 1 - (1 + s) ** (-2 / 3)) for s in range(t - dt, t))
        assert ema.decay == returned
        assert ema.decay == pytest.approx(expected, rel=1e-12)
    pema = emakit.PowerEMA(model, gammas=(1.0, 5.0))
    assert pema.decay is None
    pema.update()
    pema.update()
    assert pema.decay == pytest.approx(((1 - 1 / 2) ** 2, (1 - 1 / 2) ** 6), rel=1e-12)


def test_reset_recopies_the_model_and_restarts_time():
    torch.manual_seed(0)
    model = Net()
    ema = emakit.EMA(model, schedule=schedules.warmup(power=3 / 4))
    for _ in range(4):
        perturb_(model)
        ema.update()
    perturb_(model)
    ema.reset()
    assert (ema.t, ema.num_updates, ema.num_skipped, ema.decay) == (0, 0, 0, None)
    for name, value in ema.averaged_state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    fresh = emakit.EMA(model, schedule=schedules.warmup(power=3 / 4))  # what reset() must equal
    for _ in range(3):
        perturb_(model)
        assert ema.update() == fresh.update()
    for name, value in fresh.state_dict()["averages"][0].items():
        assert torch.equal(ema.state_dict()["averages"][0][name], value), name
    pema = emakit.PowerEMA(model, gammas=(1.0, 5.0))
    pema.update()
    perturb_(model)
    pema.reset()
    for sigma_rel in pema.sigma_rels:
        for name, value in pema.averaged_state_dict(sigma_rel).items():
            assert torch.equal(value, model.state_dict()[name]), name
    with pema.swapped(pema.sigma_rels[0]), pytest.raises(RuntimeError, match="inside swapped"):
        pema.reset()


def test_resume_inference_loads_the_models_own_weights_at_t0_under_warmup():
    # k-diffusion's --resume-inference: one file into the model and into its EMA, time 0, warm-up restarts.
    torch.manual_seed(0)
    model = Net()
    ckpt = {k: v + 0.5 if v.is_floating_point() else v for k, v in Net().state_dict().items()}
    model.load_state_dict(ckpt)
    ema = emakit.EMA(model, schedule=schedules.warmup(power=2 / 3, max_decay=0.9999))
    ema.load_averaged_state_dict(ckpt)
    assert ema.t == 0
    ref = {k: v.double() for k, v in ckpt.items() if v.is_floating_point()}
    for step in range(3):
        perturb_(model)
        ema.update()
        d = min(0.9999, 1 - (1 + step) ** (-2 / 3))  # k-diffusion's EMAWarmup at its step count
        ref = {k: d * ref[k] + (1 - d) * v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    got = ema.averaged_state_dict(dtype="average")
    for name, value in ref.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-7)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt.items()}  # not the model's weights
    with pytest.raises(ValueError, match="next update has decay 0"):
        emakit.EMA(model, schedule=schedules.warmup()).load_averaged_state_dict(other)


# --------------------------------------------------------------------------- settings and precision


def my_schedule(t, dt):  # a hand-written schedule, as a training script defines it
    return 0.9


def test_a_hand_written_schedule_reloads_without_a_settings_warning_across_processes(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "ema.pt"
    code = (
        "import torch, emakit\n"
        "def my_schedule(t, dt):\n    return 0.9\n"
        "m = torch.nn.Linear(2, 2)\n"
        "e = emakit.EMA(m, schedule=my_schedule); e.update()\n"
        f"torch.save(e.state_dict(), {str(path)!r})\n"
        "print(e._config()['schedule'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "0x" not in out.stdout
    ema = emakit.EMA(nn.Linear(2, 2), schedule=my_schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.load_state_dict(torch.load(path, weights_only=True))
        old = torch.load(path, weights_only=True)
        old["config"]["schedule"] = "<function my_schedule at 0x7f3a2b1c9d30>"  # as emakit 0.1 wrote it
        ema.load_state_dict(old)
    with pytest.warns(UserWarning, match="saved with other settings"):  # a real difference still warns
        emakit.EMA(nn.Linear(2, 2), decay=0.5).load_state_dict(torch.load(path, weights_only=True))


def test_averaged_state_dict_casts_to_a_given_dtype():
    model = Net().half()
    ema = emakit.EMA(model, decay=0.5)
    perturb_(model)
    ema.update()
    average = ema.averaged_state_dict(dtype="average")
    as64 = ema.averaged_state_dict(dtype=torch.float64)
    for name, value in average.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32 and as64[name].dtype == torch.float64
            assert torch.equal(as64[name], value.double())
    assert ema.averaged_state_dict()["head.weight"].dtype == torch.float16
    with pytest.raises(ValueError, match=r"'model', 'average' or a floating torch.dtype, got torch.int32"):
        ema.averaged_state_dict(dtype=torch.int32)


def test_fp16_model_with_fp32_master_weights_averages_the_masters():
    # guided-diffusion style: the optimizer steps fp32 master weights, the fp16 model gets a rounded copy.
    torch.manual_seed(0)
    master = Net()
    model = copy.deepcopy(master).half()
    ema_master = emakit.EMA(master, decay=0.99)
    ema_fp16 = emakit.EMA(model, decay=0.99)
    ref = {k: v.double() for k, v in master.state_dict().items() if v.is_floating_point()}
    for _ in range(50):
        perturb_(master, scale=1e-3)  # steps below fp16's resolution near 1 partly vanish in the model
        model.load_state_dict(master.state_dict())
        ema_master.update()
        ema_fp16.update()
        ref = {k: 0.99 * ref[k] + 0.01 * v.double() for k, v in master.state_dict().items() if v.is_floating_point()}
    from_master = ema_master.averaged_state_dict(dtype="average")
    from_fp16 = ema_fp16.averaged_state_dict(dtype="average")
    err_master = max((from_master[k].double() - v).abs().max().item() for k, v in ref.items())
    err_fp16 = max((from_fp16[k].double() - v).abs().max().item() for k, v in ref.items())
    assert err_master < 1e-6 < err_fp16 and err_fp16 > 20 * err_master
    # Resume without loss: the fp32 averages round-trip exactly; dtype="model" of the fp16 model would round.
    resumed = emakit.EMA(master, decay=0.99)
    resumed.load_averaged_state_dict(from_master, t=ema_master.t)
    for name, value in resumed.averaged_state_dict(dtype="average").items():
        assert torch.equal(value, from_master[name]), name
    assert ema_fp16.averaged_state_dict()["head.weight"].dtype == torch.float16
