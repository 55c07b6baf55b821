"""The emakit command line: inspect and reconstruct round trips, errors with exit status 2."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import emakit
from emakit import cli, posthoc

safetensors_torch = pytest.importorskip("safetensors.torch", reason="the CLI needs the safetensors extra")


@pytest.fixture(scope="module")
def snapdir(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).to(torch.bfloat16)
    directory = tmp_path_factory.mktemp("phema")
    pema = emakit.PowerEMA(model)
    for step in range(1, 401):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        pema.update()
        if step % 40 == 0:
            pema.save_snapshot(directory)
    return directory


def test_parse_values():
    assert cli.parse_values("0.05, 0.1") == [0.05, 0.1]
    assert cli.parse_values("0.03:0.05:0.01") == [0.03, 0.04, 0.05]
    with pytest.raises(cli.CommandError, match="0.1x"):
        cli.parse_values("0.1x")
    with pytest.raises(cli.CommandError, match="ranges"):
        cli.parse_values("0.2:0.1:0.01")


def test_reconstruct_round_trip(snapdir, tmp_path, capsys):
    out = tmp_path / "ema"
    assert (
        cli.main(["reconstruct", str(snapdir), "--sigma-rel", "0.05,0.08", "--halflife", "30", "--out", str(out), "-q"])
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ema-halflife-30.safetensors", "ema-sigma_rel-0.05.safetensors", "ema-sigma_rel-0.08.safetensors"]
    printed = capsys.readouterr().out
    assert "fit_error" in printed and "sigma_rel=0.08" in printed
    for sigma_rel in (0.05, 0.08):
        got = safetensors_torch.load_file(out / f"ema-sigma_rel-{sigma_rel:g}.safetensors")
        want = posthoc.reconstruct(snapdir, sigma_rel=sigma_rel, progress=False)
        assert sorted(got) == sorted(want)  # safetensors stores keys in its own order
        for k, v in want.items():
            assert got[k].dtype == v.dtype  # the model's dtypes (bf16) by default
            assert torch.equal(got[k], v), k
    # Existing outputs are not replaced silently.
    assert cli.main(["reconstruct", str(snapdir), "--sigma-rel", "0.05", "--out", str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "reconstruct",
                str(snapdir),
                "--sigma-rel",
                "0.05",
                "--out",
                str(out),
                "-q",
                "--overwrite",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    assert safetensors_torch.load_file(out / "ema-sigma_rel-0.05.safetensors")["0.weight"].dtype == torch.float32


def test_errors_write_nothing(snapdir, tmp_path, capsys):
    out = tmp_path / "none"
    assert cli.main(["reconstruct", str(snapdir), "--sigma-rel", "0.05,0.4", "--out", str(out), "-q"]) == 2
    assert "sigma_rel" in capsys.readouterr().err
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["reconstruct", str(empty), "--sigma-rel", "0.05", "--out", str(out), "-q"]) == 2
    assert "no snapshots" in capsys.readouterr().err
    assert cli.main(["reconstruct", str(snapdir), "--sigma-rel", "0.1", "--t", "10", "--out", str(out), "-q"]) == 2
    assert "before the first snapshot" in capsys.readouterr().err
    assert not out.exists()


def test_inspect(snapdir, capsys):
    assert cli.main(["inspect", str(snapdir)]) == 0
    text = capsys.readouterr().out
    assert "10 snapshots, t = 40 … 400" in text and "sigma_rel=0.0500" in text and "reliable sigma_rel range" in text
    assert cli.main(["inspect", str(snapdir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["snapshots"] == 10 and summary["dtype"] == "float32"
    lo, hi = summary["reliable_sigma_rel"]
    assert lo < 0.05 < 0.1 < hi


def test_module_entry_point(snapdir):
    out = subprocess.run([sys.executable, "-m", "emakit", "inspect", str(snapdir)], capture_output=True, text=True)
    assert out.returncode == 0 and "10 snapshots" in out.stdout
