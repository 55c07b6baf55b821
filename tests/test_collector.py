"""The garbage collector paused while emakit reads or writes a model: resumed after, shared across threads."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from torch.testing import assert_close

import emakit
from emakit import planning, posthoc, verify
from emakit._files import collector

pytest.importorskip("safetensors", reason="snapshots need the safetensors extra")


@pytest.fixture(autouse=True)
def collecting():
    """Each test starts with collection on, and leaves it as it found it."""
    was = gc.isenabled()
    gc.enable()
    yield
    assert collector._depth == 0
    (gc.enable if was else gc.disable)()


def test_paused_stops_collection_and_resumes_it_also_after_an_error():
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():  # nested: one pause
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), collector.paused():
        raise KeyError("x")
    assert gc.isenabled()


def test_paused_leaves_collection_off_when_the_caller_had_turned_it_off():
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_a_pause_on_two_threads_ends_when_the_last_one_returns():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with collector.paused():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with collector.paused():
            second_in.set()
            first_out.wait(10)
            seen["while the other returned"] = gc.isenabled()
        seen["after both"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"while the other returned": False, "after both": True}


def test_turned_off_it_leaves_the_collector_alone(monkeypatch):
    monkeypatch.setattr(collector, "ENABLED", False)
    with collector.paused():
        assert gc.isenabled()


def _model(n: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(n)])


def test_reading_and_writing_run_with_collection_paused(tmp_path, monkeypatch):
    """Every entry point that reads or writes a model's tensors pauses; the results are those without a pause."""
    model = _model()
    pema = emakit.PowerEMA(model, sigma_rels=(0.05, 0.10))
    ema = emakit.EMA(model, decay=0.9)
    for _ in range(4):
        for p in model.parameters():
            p.data.add_(0.1)
        pema.update()
        ema.update()
        pema.save_snapshot(tmp_path / "phema", encoding="compact")
    ema.save(tmp_path / "ema")
    (tmp_path / "ckpts").mkdir()
    for step in (10, 20):
        torch.save({"model": model.state_dict(), "step": step}, tmp_path / "ckpts" / f"ckpt_{step}.pt")
    seen: list[bool] = []
    real = collector.gc

    class Spy:  # what the collector module sees of gc, with each disable/enable recorded
        def isenabled(self):
            return real.isenabled()

        def disable(self):
            seen.append(False)
            real.disable()

        def enable(self):
            seen.append(True)
            real.enable()

    infos = posthoc.list_snapshots(tmp_path / "phema")
    monkeypatch.setattr(collector, "gc", Spy())
    calls = {
        "list_snapshots": lambda: posthoc.list_snapshots(tmp_path / "phema"),
        "reconstruct": lambda: posthoc.reconstruct(infos, sigma_rel=0.05, progress=False),  # (no list_snapshots)
        "save_snapshot": lambda: pema.save_snapshot(tmp_path / "phema2"),
        "verify": lambda: verify.verify([tmp_path / "phema"]),
        "prune": lambda: planning.prune(tmp_path / "phema", sigma_rel=(0.05, 0.1), max_fit_error=1.0, dry_run=True),
        "EMA.save": lambda: ema.save(tmp_path / "ema2"),
        "EMA.load": lambda: ema.load(tmp_path / "ema"),
        "average_checkpoints": lambda: posthoc.average_checkpoints(tmp_path / "ckpts"),
    }
    results = {}
    for name, call in calls.items():
        seen.clear()
        results[name] = call()
        assert seen == [False, True], name  # one pause, however many paused functions it calls
    monkeypatch.setattr(collector, "ENABLED", False)
    unpaused = posthoc.reconstruct(infos, sigma_rel=0.05, progress=False)
    assert seen == [False, True]  # (from the last call above: nothing since)
    for name, value in unpaused.items():
        assert_close(results["reconstruct"][name], value, rtol=0, atol=0)
