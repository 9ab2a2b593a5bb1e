import json
import subprocess
import sys

import pytest

from hookwise import __version__
from hookwise.bench import HOOKWISE_METHODS
from hookwise.cli import main
from hookwise.zoo.reference import get_reference_spec


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


def test_inspect_a_missing_path_says_it_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no" / "model"
    assert main(["inspect", str(missing)]) == 2
    assert f"{missing}: no such file or folder" in capsys.readouterr().err


def test_inspect_a_file_says_it_is_not_a_model_folder(capsys, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    assert main(["inspect", str(path)]) == 2
    assert "is a file, not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--repeats"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_bench_cache_rejects_non_positive_counts(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "cache", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_bench_cache_help_lists_methods_prompt_classes_and_the_table_legend(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "cache", "--help"])
    out = capsys.readouterr().out
    for method in HOOKWISE_METHODS:
        assert method in out
    assert "0=red circle" in out and get_reference_spec("wan-moving").classes[5] in out
    assert "bold setting is the method's default" in out and "failed: ..." in out


def test_cache_info_and_clean_touch_only_offload_files(capsys, tmp_path):
    group_file = tmp_path / ("0123456789abcdef" * 2 + ".safetensors")
    temp_file = tmp_path / (group_file.name + ".tmp-12-0123abcd")
    other = tmp_path / "notes.safetensors"
    for path in (group_file, temp_file, other):
        path.write_bytes(b"\0" * 1024)
    assert main(["cache", "info", "--path", str(tmp_path)]) == 0
    assert "2 disk offload files" in capsys.readouterr().out
    assert main(["cache", "clean", "--path", str(tmp_path), "--dry-run"]) == 0
    assert "would remove 2" in capsys.readouterr().out and group_file.exists()
    assert main(["cache", "clean", "--path", str(tmp_path)]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert not group_file.exists() and not temp_file.exists() and other.exists()


def test_cache_clean_defaults_to_the_folder_disk_offload_writes_to(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "hookwise" / "offload"
    folder.mkdir(parents=True)
    (folder / ("ab" * 16 + ".safetensors")).write_bytes(b"1")
    assert main(["cache", "clean"]) == 0
    assert str(folder) in capsys.readouterr().out and not any(folder.iterdir())
