"""``migrate.load`` on checkpoints built by hand in each peer's layout (no peer needed).

Each format is written here the way the peer's source writes it (see the module docstring
of ``emakit._peers.checkpoints``) for a small model with BatchNorm and a frozen parameter,
loaded with ``source="auto"`` and with the explicit source, and compared with the tensors
put in. Every rejected checkpoint must leave the EMA exactly as it was. The real peers are
exercised in ``tests/test_peers_checkpoints.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import emakit
from emakit import schedules
from emakit._peers.checkpoints import SOURCES, load

FIXTURES = Path(__file__).parent / "fixtures"


class Net(nn.Module):
    """Float parameters, a frozen one (``head.bias``), BatchNorm statistics and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


PARAMS = ["fc.weight", "fc.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"]
TRAINABLE = PARAMS[:-1]
BUFFERS = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


def make(**kwargs):
    model = Net()
    model.train()
    model(torch.randn(8, 4))  # BatchNorm statistics that differ from their initial values
    return model, emakit.EMA(model, **(kwargs or {"decay": 0.9}))


def values(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors with the model's keys, shapes and dtypes (the 'peer's average')."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, v in model.state_dict().items():
        if v.is_floating_point():
            out[name] = torch.randn(v.shape, generator=gen)
        else:
            out[name] = torch.randint(1, 1000, v.shape, generator=gen, dtype=v.dtype)
    return out


def snapshot(ema) -> dict:
    sd = ema.state_dict()
    return {
        "t": sd["t"],
        "num_updates": sd["num_updates"],
        "averages": {k: v.clone() for k, v in sd["averages"][0].items()},
        "copies": {k: v.clone() for k, v in sd["copies"].items()},
    }


def assert_unchanged(ema, before: dict) -> None:
    after = snapshot(ema)
    assert (after["t"], after["num_updates"]) == (before["t"], before["num_updates"])
    for part in ("averages", "copies"):
        assert after[part].keys() == before[part].keys()
        for name, v in before[part].items():
            assert torch.equal(after[part][name], v), name


def assert_holds(ema, expected: dict[str, torch.Tensor], names) -> None:
    got = ema.averaged_state_dict(dtype="average")
    for name in names:
        assert_close(got[name], expected[name].to(got[name].dtype), rtol=0, atol=0, msg=name)


def assert_buffers_from_model(ema, model) -> None:
    got = ema.averaged_state_dict(dtype="average")
    for name in BUFFERS:
        assert torch.equal(got[name].to(model.state_dict()[name].dtype), model.state_dict()[name]), name


def quiet_load(ema, checkpoint, source):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load(ema, checkpoint, source)


def fails(ema, checkpoint, error, match, source="auto"):
    before = snapshot(ema)
    with pytest.raises(error, match=match):
        load(ema, checkpoint, source)
    assert_unchanged(ema, before)


both = pytest.mark.parametrize("how", ["auto", "explicit"])


def _source(how: str, name: str) -> str:
    return "auto" if how == "auto" else name


# --------------------------------------------------------------------------- the checkpoints


def timm_checkpoint(model, ema_values, **extra):
    return {
        "epoch": 4,
        "arch": "net",
        "version": 2,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        "state_dict": model.state_dict(),
        "state_dict_ema": ema_values,
        **extra,
    }


def diffusers_state(shadow, step=12):
    return {
        "decay": 0.9999,
        "min_decay": 0.0,
        "optimization_step": step,
        "update_after_step": 0,
        "use_ema_warmup": False,
        "inv_gamma": 1.0,
        "power": 2 / 3,
        "shadow_params": shadow,
    }


def torch_ema_state(shadow, num_updates=9):
    return {"decay": 0.99, "num_updates": num_updates, "shadow_params": shadow, "collected_params": None}


def ema_pytorch_state(model, ema_values, step=30, online=True):
    out = {}
    if online:
        out.update({f"online_model.{k}": v for k, v in model.state_dict().items()})
    out.update({f"ema_model.{k}": v for k, v in ema_values.items()})
    out["initted"] = torch.tensor(True)
    out["step"] = torch.tensor(step)
    return out


def averaged_model_state(ema_values, n=15):
    return {**{f"module.{k}": v for k, v in ema_values.items()}, "n_averaged": torch.tensor(n)}


def lightning_checkpoint(model, ema_values, global_step=20, latest=20):
    return {
        "epoch": 1,
        "global_step": global_step,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": ema_values,
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {
            "EMAWeightAveraging": {"latest_update_step": latest},
            "ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "/tmp"},
        },
        "optimizer_states": [],
        "lr_schedulers": [],
        "current_model_state": model.state_dict(),
        "averaging_state": {"n_averaged": torch.tensor(global_step)},
    }


# --------------------------------------------------------------------------- each format loads


def test_sources_are_the_eight_formats():
    assert SOURCES == (
        "timm", "diffusers", "ema_pytorch", "averaged_model", "torch_ema", "lightning", "composer", "nemo"
    )  # fmt: skip


@both
def test_timm_state_dict_ema_with_module_prefixes(how):
    model, ema = make()
    avg = values(model)
    ckpt = timm_checkpoint(model, {f"module.{k}": v for k, v in avg.items()})
    with pytest.warns(UserWarning, match=r"holds no step count \(only epoch=4.*t stays 0"):
        assert load(ema, ckpt, _source(how, "timm")) == "timm"
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])
    assert ema.t == 0


def test_timm_checkpoint_without_a_step_count_takes_t_from_the_caller():
    model, ema = make(schedule=schedules.warmup(power=2 / 3))
    avg = values(model)
    ckpt = timm_checkpoint(model, avg)
    before = {k: v.clone() for k, v in ema.state_dict()["averages"][0].items()}
    with pytest.raises(ValueError, match="next update has decay 0"):
        load(ema, ckpt)  # at t=0 the warm-up would copy the model over the import
    for k, v in ema.state_dict()["averages"][0].items():
        assert torch.equal(v, before[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # t given: no warning about a missing step count
        assert load(ema, ckpt, t=500) == "timm"
    assert ema.t == 500
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])


@both
def test_timm_older_model_ema_key_and_a_step_count(how):
    model, ema = make()
    avg = values(model)
    ckpt = {"model": model.state_dict(), "model_ema": avg, "epoch": 2, "step": 640}
    assert quiet_load(ema, ckpt, _source(how, "timm")) == "timm"
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])
    assert ema.t == 640


def test_frozen_parameters_stay_the_models():
    model, ema = make()
    avg = values(model)
    load(ema, {"state_dict_ema": avg, "step": 3}, "timm")
    assert torch.equal(ema.averaged_state_dict()["head.bias"], model.head.bias)
    assert not torch.equal(model.head.bias, avg["head.bias"])


@both
def test_diffusers_shadow_params_over_all_parameters(how):
    model, ema = make()
    avg = values(model)
    shadow = [avg[n] for n in PARAMS]  # EMAModel(model.parameters()): frozen ones included
    with pytest.warns(UserWarning, match=r"parameters only; took 3 buffers from the model \['bn.running_mean'"):
        assert load(ema, diffusers_state(shadow, step=12), _source(how, "diffusers")) == "diffusers"
    assert_holds(ema, avg, TRAINABLE)
    assert_buffers_from_model(ema, model)
    assert ema.t == 12


def test_diffusers_shadow_params_over_the_trainable_parameters():
    model, ema = make()
    avg = values(model)
    with pytest.warns(UserWarning, match="took 3 buffers"):
        load(ema, diffusers_state([avg[n] for n in TRAINABLE], step=5))
    assert_holds(ema, avg, TRAINABLE)
    assert ema.t == 5


@both
def test_torch_ema(how):
    model, ema = make()
    avg = values(model)
    with pytest.warns(UserWarning, match="torch-ema state dict holds parameters only; took 3 buffers"):
        assert load(ema, torch_ema_state([avg[n] for n in TRAINABLE], 9), _source(how, "torch_ema")) == "torch_ema"
    assert_holds(ema, avg, TRAINABLE)
    assert_buffers_from_model(ema, model)
    assert ema.t == 9


def test_torch_ema_without_num_updates_keeps_t_and_says_so():
    model, ema = make()
    avg = values(model)
    with pytest.warns(UserWarning) as record:
        load(ema, torch_ema_state([avg[n] for n in PARAMS], None))
    messages = [str(w.message) for w in record]
    assert any(re.search(r"num_updates=None.*use_num_updates=False.*t stays 0", m) for m in messages), messages
    assert_holds(ema, avg, TRAINABLE)


@both
def test_ema_pytorch_ema_with_the_online_model(how):
    model, ema = make()
    avg = values(model)
    assert quiet_load(ema, ema_pytorch_state(model, avg, step=30), _source(how, "ema_pytorch")) == "ema_pytorch"
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])
    assert ema.t == 30


@both
def test_ema_pytorch_karras_ema(how):
    model, ema = make()
    avg = values(model)
    sd = ema_pytorch_state(model, avg, step=400, online=False)  # KarrasEMA keeps the online model out
    assert quiet_load(ema, sd, _source(how, "ema_pytorch")) == "ema_pytorch"
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])
    assert ema.t == 400


def test_posthoc_snapshot_file_takes_the_exact_step_from_its_name(tmp_path):
    model, ema = make()
    avg = values(model)
    # PostHocEMA.checkpoint(): the KarrasEMA state dict cast whole to fp16, saved as f"{index}.{step}.pt"
    sd = {k: v.to(torch.float16) for k, v in ema_pytorch_state(model, avg, step=3001, online=False).items()}
    assert sd["step"].item() != 3001  # fp16 cannot hold it
    torch.save(sd, tmp_path / "1.3001.pt")
    with pytest.warns(UserWarning, match="cast to this EMA's dtype"):
        load(ema, tmp_path / "1.3001.pt")
    assert ema.t == 3001
    assert_holds(ema, {k: v.to(torch.float16) for k, v in avg.items()}, TRAINABLE)


@pytest.mark.filterwarnings("ignore:EMA.load_averaged_state_dict. averages stored as torch.float16")
def test_posthoc_snapshot_elsewhere_warns_that_its_step_may_be_rounded():
    model, ema = make()
    sd = {k: v.to(torch.float16) for k, v in ema_pytorch_state(model, values(model), step=3001, online=False).items()}
    with pytest.warns(UserWarning, match=r"stored as torch.float16.*t=3000 may be rounded"):
        load(ema, sd)
    assert ema.t == 3000


@both
def test_averaged_model(how):
    model, ema = make()
    avg = values(model)
    assert quiet_load(ema, averaged_model_state(avg, 15), _source(how, "averaged_model")) == "averaged_model"
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])
    assert ema.t == 15


@both
def test_lightning_weight_averaging(how):
    model, ema = make()
    avg = values(model)
    assert quiet_load(ema, lightning_checkpoint(model, avg), _source(how, "lightning")) == "lightning"
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])
    assert ema.t == 20


def test_lightning_t_is_the_step_of_the_last_update():
    model, ema = make()
    load(ema, lightning_checkpoint(model, values(model), global_step=25, latest=21))  # update_every_n_steps=10
    assert ema.t == 21


def test_buffers_copy_mode_and_include_filter():
    model = Net()
    ema = emakit.EMA(model, decay=0.9, buffers="copy", include=lambda n: not n.startswith("fc."))
    avg = values(model)
    load(ema, averaged_model_state(avg, 3))
    assert_holds(ema, avg, ["bn.weight", "bn.bias", "head.weight", *BUFFERS])
    assert torch.equal(ema.averaged_state_dict()["fc.weight"], model.fc.weight)


def test_update_continues_from_the_loaded_average():
    model, ema = make(decay=0.5)
    avg = values(model)
    load(ema, averaged_model_state(avg, 4))
    ema.update()
    assert ema.t == 5
    assert_close(ema.averaged_state_dict()["fc.weight"], 0.5 * avg["fc.weight"] + 0.5 * model.fc.weight.detach())


# --------------------------------------------------------------------------- files and folders


def test_timm_fixture_file_loads_with_its_args_namespace():
    spec = importlib.util.spec_from_file_location("make_timm", FIXTURES / "timm" / "make_timm.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    model = maker.TimmNet()
    ema = emakit.EMA(model, decay=0.9998)
    path = FIXTURES / "timm" / maker.FILE
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # timm's args need argparse.Namespace allowed
    with pytest.warns(UserWarning, match=r"holds no step count \(only epoch=2"):
        assert load(ema, path) == "timm"
    expected = maker.ema_weights()
    assert_holds(ema, expected, list(expected))
    assert ema.t == 0


def test_torch_save_file_round_trip(tmp_path):
    model, ema = make()
    avg = values(model)
    path = tmp_path / "last.pth.tar"
    ns = argparse.Namespace(model="net", lr=0.1)
    torch.save(timm_checkpoint(model, avg, args=ns, step=77), path)
    assert quiet_load(ema, str(path), "auto") == "timm"
    assert_holds(ema, avg, TRAINABLE + BUFFERS)
    assert ema.t == 77


def test_safetensors_file_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed (optional extra)")
    model, ema = make()
    avg = values(model)
    st.save_file(averaged_model_state(avg, 11), tmp_path / "swa.safetensors")
    assert quiet_load(ema, tmp_path / "swa.safetensors", "averaged_model") == "averaged_model"
    assert_holds(ema, avg, TRAINABLE + BUFFERS)
    assert ema.t == 11


def write_diffusers_folder(folder: Path, avg: dict, step: int, sharded: bool = False) -> None:
    """What EMAModel.save_pretrained writes: the config with the EMA settings, a fresh model with the averaged parameters."""
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed (optional extra)")
    folder.mkdir()
    config = {"_class_name": "Net", "_diffusers_version": "0.42.1", **diffusers_state(None, step)}
    del config["shadow_params"]
    (folder / "config.json").write_text(json.dumps(config))
    fresh = Net().state_dict()  # model_cls.from_config(...): initial buffers
    weights = {k: (avg[k] if k in PARAMS else fresh[k]).contiguous() for k in fresh}
    if not sharded:
        st.save_file(weights, folder / "diffusion_pytorch_model.safetensors")
        return
    names = list(weights)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:4]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = names[4:]
    weight_map = {}
    for file, keys in shards.items():
        st.save_file({k: weights[k] for k in keys}, folder / file)
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_save_pretrained_folder(tmp_path, sharded):
    model, ema = make()
    avg = values(model)
    write_diffusers_folder(tmp_path / "unet_ema", avg, step=40, sharded=sharded)
    with pytest.warns(UserWarning, match=r"save_pretrained folder averages parameters only.*took 3 buffers"):
        assert load(ema, tmp_path / "unet_ema") == "diffusers"
    assert_holds(ema, avg, TRAINABLE)
    assert_buffers_from_model(ema, model)
    assert ema.t == 40


# --------------------------------------------------------------------------- errors change nothing


def test_unknown_source_lists_the_known_ones():
    model, ema = make()
    fails(ema, averaged_model_state(values(model)), ValueError, r"unknown source='nope'; known: 'auto', 'timm'", "nope")


def test_plain_state_dict_points_to_load_averaged_state_dict():
    model, ema = make()
    fails(ema, values(model), ValueError, r"plain model state dict: load it with ema.load_averaged_state_dict")


def test_no_format_shows_what_was_found_and_expected():
    model, ema = make()
    fails(ema, {"weights": [1, 2]}, ValueError, r"a mapping with 1 keys \['weights'\] is in no known format.*'timm': ")


def test_several_formats_is_an_error():
    model, ema = make()
    ckpt = {**diffusers_state([v for v in model.parameters()]), "num_updates": 3, "collected_params": None}
    fails(ema, ckpt, ValueError, r"matches several formats \('diffusers', 'torch_ema'\); pass source=")


def test_explicit_source_that_does_not_match():
    model, ema = make()
    fails(
        ema,
        averaged_model_state(values(model)),
        ValueError,
        r"source='torch_ema' expects a torch-ema .*found a mapping with 10 keys.*looks like 'averaged_model'",
        "torch_ema",
    )


def test_positional_list_of_the_wrong_length():
    model, ema = make()
    shadow = [p.detach().clone() for p in model.parameters()][:3]
    fails(
        ema,
        torch_ema_state(shadow),
        ValueError,
        r"\['shadow_params'\] holds 3 tensors, but the model has 6 parameters \(5 trainable\).*index 3 "
        r"\(parameter 'bn.bias', shape \(6,\)\)",
    )


def test_positional_list_with_a_wrong_shape_names_index_parameter_and_shapes():
    model, ema = make()
    shadow = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    shadow[0], shadow[1] = shadow[1], shadow[0]
    fails(
        ema,
        diffusers_state(shadow),
        ValueError,
        r"\['shadow_params'\]\[0\] \(parameter 'fc.weight'\) has shape \(6,\), expected \(6, 4\)",
    )


def test_positional_list_with_a_non_tensor():
    model, ema = make()
    shadow = [p.detach().clone() for p in model.parameters()]
    shadow[2] = "x"
    fails(
        ema, torch_ema_state(shadow), TypeError, r"\['shadow_params'\]\[2\] \(parameter 'bn.weight'\) must be a tensor"
    )


def test_key_mismatch_shows_the_keys_and_the_prefix_to_strip():
    model, ema = make()
    wrapped = {f"net.{k}": v for k, v in values(model).items()}  # AveragedModel built on a wrapper module
    fails(
        ema,
        averaged_model_state(wrapped),
        KeyError,
        r"\['module\.\*'\] does not fit the EMA's model: 'fc.weight' is missing.*first: \['net.fc.weight'.*"
        r"start with 'net.': strip it.*load_averaged_state_dict\(state_dict, t=15\)",
    )


def test_a_key_the_model_does_not_have():
    model, ema = make()
    avg = {**values(model), "loss.weight": torch.ones(3)}
    fails(ema, lightning_checkpoint(model, avg), KeyError, r"'loss.weight' is no tensor of the EMA's model")


def test_a_wrong_shape_by_name():
    model, ema = make()
    avg = values(model)
    avg["head.weight"] = torch.zeros(3, 7)
    fails(ema, averaged_model_state(avg), ValueError, r"head.weight.*shape \(3, 7\), expected \(3, 6\)")


def test_import_that_the_next_update_would_wipe_raises_from_the_core():
    model, ema = make(schedule=schedules.warmup(power=2 / 3))
    fails(ema, averaged_model_state(values(model), n=0), ValueError, r"next update has decay 0")


def test_negative_step_count():
    model, ema = make()
    fails(ema, averaged_model_state(values(model), n=-2), ValueError, r"\['n_averaged'\] must be a step count >= 0")


def test_posthoc_ema_state_dict_says_how_to_pick_one():
    model, ema = make()
    sd = {}
    for i in range(2):
        sd.update({f"ema_models.{i}.{k}": v for k, v in ema_pytorch_state(model, values(model), online=False).items()})
    fails(ema, sd, ValueError, r"PostHocEMA state dict holding 2 KarrasEMAs: pass one of them")


def test_an_emakit_state_dict_points_to_load_state_dict():
    model, ema = make()
    fails(ema, emakit.EMA(Net(), decay=0.9).state_dict(), ValueError, r"emakit state dict: use ema.load_state_dict")


def test_a_checkpoint_without_averaged_weights():
    model, ema = make()
    fails(ema, {"state_dict": values(model), "epoch": 1}, ValueError, r"holds a 'state_dict' but no averaged weights")


def test_a_peer_object_instead_of_its_state_dict():
    class Peer:
        def state_dict(self):
            return {}

    model, ema = make()
    fails(ema, Peer(), TypeError, r"checkpoint must be a mapping .* got Peer; pass its .state_dict\(\)")


def test_ema_must_be_an_emakit_ema():
    with pytest.raises(TypeError, match="ema must be an emakit.EMA, got Net"):
        load(Net(), {})


def test_missing_path(tmp_path):
    model, ema = make()
    fails(ema, tmp_path / "nope.pt", FileNotFoundError, r"no file or folder at")


def test_a_file_that_needs_unpickling_is_refused(tmp_path):
    model, ema = make()
    torch.save({"state_dict_ema": values(model), "obj": Net()}, tmp_path / "full.pt")
    fails(ema, tmp_path / "full.pt", ValueError, r"holds objects beyond tensors.*weights_only=True")


def test_folders_that_are_not_ema_folders(tmp_path):
    model, ema = make()
    (tmp_path / "empty").mkdir()
    fails(ema, tmp_path / "empty", ValueError, r"this one has no config.json")
    write_diffusers_folder(tmp_path / "unet", values(model), step=3)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({k: config[k] for k in ("_class_name",)}))
    fails(ema, tmp_path / "unet", ValueError, r"no EMA settings \('optimization_step', 'decay'\): a plain model folder")
    fails(ema, tmp_path / "unet", ValueError, r"source='diffusers' expects", "diffusers")


def test_load_inside_swapped_is_refused():
    model, ema = make()
    with ema.swapped():
        before = snapshot(ema)
        with pytest.raises(RuntimeError, match="inside swapped"):
            load(ema, averaged_model_state(values(model)))
    assert_unchanged(ema, before)


# --------------------------------------------------------------------------- Composer and NeMo


def composer_checkpoint(model, ema_values, batch=40, weights_active=False, algorithms_as="list"):
    """A Composer Trainer checkpoint with the EMA algorithm (EMAParameters form, Composer >= 0.13).

    At a checkpoint event Composer swaps the average into the model (ema_weights_active=True):
    then ``state.model`` holds the average and ``ema_model`` the training weights.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    training = {k: v.clone() for k, v in model.state_dict().items()}
    held, in_model = (training, ema_values) if weights_active else (ema_values, training)
    ema_state = {
        "repr": "EMA(half_life='1000ba')",
        "ema_model": {
            "named_parameters_dict": {n: held[n] for n in trainable},
            "named_buffers_dict": {n: held[n] for n in BUFFERS},
        },
        "ema_weights_active": weights_active,
        "ema_started": True,
    }
    pairs = [("SomeOtherAlgorithm", {"repr": "x"}), ("EMA", ema_state)]
    import datetime

    state = {
        "model": in_model,
        "algorithms": pairs if algorithms_as == "list" else dict(pairs),
        "timestamp": {"epoch": 1, "batch": batch, "sample": 8 * batch, "batch_in_epoch": 3,
                      "total_wct": datetime.timedelta(seconds=12.5)},
        "optimizers": {"SGD": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()},
    }  # fmt: skip
    return {"state": state, "rng": [{"torch": torch.get_rng_state()}]}


@pytest.mark.parametrize("weights_active", [False, True], ids=["ema_model", "swapped-into-model"])
@pytest.mark.parametrize("how", ["auto", "explicit"])
def test_composer_trainer_checkpoint(how, weights_active):
    model, ema = make()
    avg = values(model)
    ckpt = composer_checkpoint(model, avg, weights_active=weights_active)
    assert quiet_load(ema, ckpt, _source(how, "composer")) == "composer"
    assert_holds(ema, avg, [n for n in avg if n != "head.bias"])
    assert ema.t == 40


def test_composer_older_state_layouts_and_the_algorithm_alone(tmp_path):
    model, ema = make()
    avg = values(model)
    ckpt = composer_checkpoint(model, avg, batch=7, algorithms_as="dict")  # algorithms as a dict (older Composer)
    path = tmp_path / "ep1-ba7-rank0.pt"
    torch.save(ckpt, path)  # the timestamp's timedelta reads back under weights_only
    assert quiet_load(ema, path, "auto") == "composer" and ema.t == 7
    assert_holds(ema, avg, TRAINABLE)
    # Before 0.13 ema_model was the EMA model's state dict, next to training_model.
    old = values(model, seed=3)
    algo = {"ema_model": old, "training_model": model.state_dict(), "ema_weights_active": False, "ema_started": True}
    assert quiet_load(ema, {"state": {"algorithms": [("EMA", algo)], "timestamp": {"batch": 9}}}, "auto") == "composer"
    assert_holds(ema, old, TRAINABLE)
    assert ema.t == 9
    # The algorithm's own state dict holds no time: kept, with a warning.
    alone = composer_checkpoint(model, avg)["state"]["algorithms"][1][1]
    with pytest.warns(UserWarning, match="holds no timestamp"):
        load(ema, alone)
    assert_holds(ema, avg, TRAINABLE)
    assert ema.t == 9


def test_composer_swapped_in_average_needs_the_model_state():
    model, ema = make()
    alone = composer_checkpoint(model, values(model), weights_active=True)["state"]["algorithms"][1][1]
    fails(ema, alone, ValueError, r"ema_weights_active=True .* pass the whole Trainer checkpoint")


def nemo_checkpoint(params: list, current_step=30, every=1, n_optimizers=1):
    """A Lightning checkpoint written with NeMo's EMA callback: one EMAOptimizer state per optimizer."""
    chunks = [params[i::n_optimizers] for i in range(n_optimizers)] if n_optimizers == 1 else [params[:2], params[2:]]
    return {
        "epoch": 0,
        "global_step": current_step,
        "state_dict": {},
        "optimizer_states": [
            {"opt": {"state": {}, "param_groups": []}, "ema": tuple(chunk), "current_step": current_step,
             "decay": 0.999, "every_n_steps": every}
            for chunk in chunks
        ],
    }  # fmt: skip


@both
def test_nemo_ema_optimizer_states(how):
    model, ema = make()
    avg = values(model)
    ckpt = nemo_checkpoint([avg[n] for n in TRAINABLE])
    with pytest.warns(UserWarning, match="optimizer's parameters only; took 3 buffers from the model"):
        assert load(ema, ckpt, _source(how, "nemo")) == "nemo"
    assert_holds(ema, avg, TRAINABLE)
    assert_buffers_from_model(ema, model)
    assert ema.t == 30


def test_nemo_two_optimizers_in_order_and_steps_that_disagree():
    model, ema = make()
    avg = values(model)
    ckpt = nemo_checkpoint([avg[n] for n in TRAINABLE], current_step=12, n_optimizers=2)  # e.g. a GAN's two
    with pytest.warns(UserWarning, match="took 3 buffers"):
        load(ema, ckpt)
    assert_holds(ema, avg, TRAINABLE)
    assert ema.t == 12
    ckpt["optimizer_states"][1]["current_step"] = 11
    fails(ema, ckpt, ValueError, r"different steps \[11, 12\]")
    wrong = nemo_checkpoint([avg[n] for n in TRAINABLE][::-1])
    fails(ema, wrong, ValueError, r"\['optimizer_states'\]\[i\]\['ema'\]\[0\] \(parameter 'fc.weight'\) has shape")
