import json
import subprocess
import sys

import pytest

from hookwise import __version__
from hookwise.cli import main


def test_inspect_a_spec_prints_towers_leaves_precision_and_capabilities(capsys):
    assert main(["inspect", "wan2.1-t2v-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "WanTransformer3DModel" in out and "architecture: wan" in out
    assert "1,418,996,800" in out
    assert "blocks" in out and "WanTransformerBlock" in out
    assert "Kept in high precision" in out and "blocks.*.norm2" in out
    assert "block step caches" in out


def test_inspect_json_is_machine_readable(capsys):
    assert main(["inspect", "flux.1-dev", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "flux.1-dev" and data["architecture"] == "flux"
    assert data["param_count"] == 11_901_408_320
    assert [t["name"] for t in data["towers"]] == ["transformer_blocks", "single_transformer_blocks"]
    assert [t["num_blocks"] for t in data["towers"]] == [19, 38]
    assert data["device"] == "meta"


def test_inspect_unknown_model_fails_with_the_choices(capsys):
    assert main(["inspect", "sdxl-turbo"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'sdxl-turbo'" in err and "flux.1-dev" in err and "module:factory" in err


def test_inspect_a_module_factory(capsys):
    assert main(["inspect", "model_helpers:MusubiDiT", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "musubi-double-single"


def test_inspect_a_file_factory_and_a_bad_factory(tmp_path, capsys):
    file = tmp_path / "mymodel.py"
    file.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))\n"
        "def not_a_model():\n"
        "    return 3\n"
    )
    assert main(["inspect", f"{file}:build"]) == 0
    out = capsys.readouterr().out
    assert "No towers" in out
    assert main(["inspect", f"{file}:not_a_model"]) == 2
    assert "not a torch.nn.Module" in capsys.readouterr().err
    assert main(["inspect", f"{file}:missing"]) == 2
    assert "has no attribute 'missing'" in capsys.readouterr().err


def test_inspect_a_local_diffusers_folder(tmp_path, capsys):
    from model_helpers import tiny_wan

    model, _ = tiny_wan()
    model.to(dtype=__import__("torch").bfloat16).save_pretrained(tmp_path / "wan")
    assert main(["inspect", str(tmp_path / "wan"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "wan"
    assert set(data["dtype_bytes"]) == {"bfloat16"}  # read from the safetensors header
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [(["--version"], f"hookwise {__version__}\n"), (["inspect", "--help"], "usage: hookwise inspect [-h]")],
    ids=["version", "inspect-help"],
)
def test_console_entry_point_runs(argv, expected):
    result = subprocess.run([sys.executable, "-m", "hookwise", *argv], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith(expected)
