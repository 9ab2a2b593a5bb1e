"""Disk offloading: one safetensors file per group, named by content, written atomically, verified."""

import hashlib
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hookwise.errors import ConfigError
from hookwise.memory import Offload, apply_offload, offload_report, remove_offload
from offload_helpers import strict
from model_helpers import output_of, tiny_musubi


def files_of(model):
    return {g.name: g.file for g in offload_report(model).groups if g.file}


def offload_to(path, **kw):
    return Offload(onload_device="cpu", offload_device="disk", disk_path=str(path), granularity="block", **kw)


def test_each_group_is_a_valid_safetensors_file_holding_its_weights(tmp_path):
    model, inputs = tiny_musubi()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_offload(model, offload_to(tmp_path))
    files = files_of(model)
    assert len(files) == len(offload_report(model).groups) == len(set(files.values()))
    seen = set()
    for group, path in files.items():
        tensors = load_file(path)  # the reference reader accepts it (pads are uint8 entries)
        with safe_open(path, "pt") as f:
            assert f.metadata()["group"] == group
        for key, value in tensors.items():
            if key.startswith("__pad_"):
                assert value.dtype == torch.uint8 and not value.any()
                continue
            assert torch.equal(value, state[key]), key
            seen.add(key)
        # Named by the SHA-256 of its bytes: header and data.
        with open(path, "rb") as f:
            assert os.path.basename(path) == hashlib.sha256(f.read()[8:]).hexdigest()[:32] + ".safetensors"
    assert seen == set(state)
    report = offload_report(model)
    assert report.host_bytes == 0 and report.disk_bytes == sum(os.path.getsize(p) for p in files.values())


def test_streamed_weights_are_views_of_the_mapped_files_not_copies_in_ram(tmp_path):
    model, _ = tiny_musubi()
    report = apply_offload(model, offload_to(tmp_path))
    assert report.streamed and report.host_bytes == 0
    for group in report.groups:
        # Every tensor of the group views one buffer exactly the size of its file (header included):
        # the mapping of the file, not a copy of its layout.
        modules = [model.get_submodule(path) for path in group.modules]
        tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storages) == 1, group.name
        assert tensors[0].untyped_storage().nbytes() == os.path.getsize(group.file), group.name


def test_identical_weights_reuse_their_files_and_changed_weights_never_do(tmp_path):
    a, inputs = tiny_musubi()
    apply_offload(a, offload_to(tmp_path))
    first = files_of(a)
    mtimes = {p: os.stat(p).st_mtime_ns for p in first.values()}

    b, _ = tiny_musubi()
    apply_offload(b, offload_to(tmp_path))
    assert files_of(b) == first
    assert all(g.file_reused for g in offload_report(b).groups)
    assert {p: os.stat(p).st_mtime_ns for p in first.values()} == mtimes

    c, _ = tiny_musubi()
    with torch.no_grad():
        c.single_blocks[1].linear1.weight.add_(1.0)
    expected = output_of(c, inputs)
    apply_offload(c, offload_to(tmp_path))
    changed = files_of(c)
    assert changed["single_blocks.1"] != first["single_blocks.1"]
    assert {k: v for k, v in changed.items() if k != "single_blocks.1"} == {
        k: v for k, v in first.items() if k != "single_blocks.1"
    }
    strict(c)
    assert torch.equal(output_of(c, inputs), expected)
    assert torch.equal(output_of(a, inputs), output_of(b, inputs))  # the old file still serves a and b


@pytest.mark.parametrize("damage", ["flip a data byte", "truncate", "wrong header"])
def test_a_corrupt_or_truncated_file_is_detected_and_rewritten_never_loaded(tmp_path, damage, caplog):
    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    apply_offload(model, offload_to(tmp_path))
    path = files_of(model)["double_blocks.1"]
    good = open(path, "rb").read()
    remove_offload(model)

    data = bytearray(good)
    if damage == "flip a data byte":
        data[-200] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[20:30] = b"x" * 10
    with open(path, "wb") as f:
        f.write(bytes(data))

    fresh, _ = tiny_musubi()
    with caplog.at_level(logging.WARNING, logger="hookwise.memory.disk"):
        apply_offload(fresh, offload_to(tmp_path))
    assert any("rewriting" in r.message for r in caplog.records)
    assert files_of(fresh)["double_blocks.1"] == path
    assert [g.file_reused for g in offload_report(fresh).groups if g.name == "double_blocks.1"] == [False]
    assert open(path, "rb").read() == good
    strict(fresh)
    assert torch.equal(output_of(fresh, inputs), expected)


def test_writes_are_atomic_no_partial_file_survives_a_failure(tmp_path, monkeypatch):
    model, _ = tiny_musubi()
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ConfigError, match="check free space"):
        apply_offload(model, offload_to(tmp_path))
    assert calls
    assert list(tmp_path.iterdir()) == []  # neither a final file nor a temporary one
    monkeypatch.undo()
    apply_offload(model, offload_to(tmp_path))
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_a_disk_path_that_cannot_be_written_is_a_config_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    with pytest.raises(ConfigError, match="not writable"):
        apply_offload(model, offload_to(blocker / "offload"))
    assert torch.equal(output_of(model, inputs), expected)


def test_default_disk_folder_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, _ = tiny_musubi()
    apply_offload(model, Offload(onload_device="cpu", offload_device="disk", granularity="block"))
    assert all(p.startswith(str(tmp_path / "hookwise" / "offload")) for p in files_of(model).values())
