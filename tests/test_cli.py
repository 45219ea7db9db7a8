"""The command line's shared vocabulary: its enums spell what the library accepts, --device
goes through dynlab.devices.resolve_device, comma lists parse one way, and every command
takes -o/--out for its output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from dynlab_cli import options as O
from dynlab_cli.main import app


def values(enum) -> tuple[str, ...]:
    return tuple(e.value for e in enum)


def test_enums_equal_the_library_choices():
    from dynlab.analysis import components, export, run
    from dynlab.analysis.conventions import CONVENTIONS
    from dynlab.devices import DEVICE_HELP
    from dynlab.model.pico_decoder import PRESETS
    from dynlab.model.relora import PRUNE_METHODS
    from dynlab.sources import FORMATS
    from dynlab.training import costs

    assert values(O.Precision) == tuple(run.PRECISIONS)
    assert values(O.Convention) == CONVENTIONS
    assert values(O.SourceFormat) == FORMATS
    assert values(O.ExportFormat) == tuple(export.FORMATS)
    assert values(O.Kind) == tuple(components.KINDS)
    assert values(O.Preset) == tuple(PRESETS)
    assert values(O.PruneMethod) == PRUNE_METHODS
    assert values(O.Gpu) == tuple(costs.GPUS)
    assert O.DEVICE_HELP == DEVICE_HELP


def test_comma_lists():
    check = O.comma_list("--kinds", O.Kind)
    assert check(None) is None
    assert check(" weights, updates ,") == "weights,updates"
    assert check("all") == "all"
    with pytest.raises(typer.BadParameter, match="nope: expected a comma list of weights"):
        check("weights,nope")
    with pytest.raises(typer.BadParameter, match="expected a comma list"):
        check(" , ")
    assert O.comma_list("--metrics")("per,cn_nz") == "per,cn_nz"
    assert O.split("per, cn") == ["per", "cn"] and O.split(None) == []


def test_device_resolves_through_dynlab_devices():
    import torch

    assert O.resolve("cpu") == "cpu"
    assert O.resolve("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'gpu0': not a device"):
        O.resolve("gpu0")


def test_bad_device_is_exit_2_with_the_message(tmp_path):
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "--device", "gpu0"])
    assert res.exit_code == 2
    assert "analyze error: --device 'gpu0': not a device" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("command", [["analyze"], ["eval"], ["plot"], ["report"], ["export"],
                                     ["train", "decoder"], ["train", "relora"]])
def test_every_output_is_dash_o_out(command):
    res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "--out" in res.output and "-o" in res.output
    assert "--output" not in res.output and "--json" not in res.output


@pytest.mark.parametrize("command", [["analyze"], ["eval"], ["train", "decoder"]])
def test_device_help_is_the_shared_one(command):
    res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert "auto (CUDA when available, else CPU), cpu, cuda or cuda:N." in res.output


def test_relora_flags():
    res = CliRunner().invoke(app, ["train", "relora", "--help"], env={"COLUMNS": "200"})
    assert "--lora-rank" in res.output and "--lora-alpha" in res.output
    assert "--rank " not in res.output and "--alpha " not in res.output
    res = CliRunner().invoke(app, ["train", "decoder", "--help"], env={"COLUMNS": "200"})
    assert "--lora-rank" not in res.output


def test_train_options_map_to_config_keys():
    from dynlab_cli import train as T

    opts = T.config_options(dict(preset=O.Preset.tiny, hidden_dim=48, resume=False,
                                 progress=True, prune_method=O.PruneMethod.magnitude,
                                 lora_rank=4, lora_alpha=8.0))
    assert opts == dict(preset="tiny", activation_hidden_dim=48, resume=None, progress=None,
                        prune_method="magnitude", lora_rank=4, lora_alpha=8.0)
    argv = T.argv("relora", None, dict(activation_hidden_dim=48, lora_rank=4, compile=True,
                                        progress=False, steps=None))
    assert argv == ["relora", "--hidden-dim=48", "--lora-rank=4", "--compile", "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("module", ["dynlab", "dynlab_cli"])
def test_python_dash_m(module):
    res = subprocess.run([sys.executable, "-m", module, "version"], capture_output=True,
                         text=True, timeout=120)
    import dynlab

    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == dynlab.__version__
