"""Saving, copying and editing the weights of a model while a stack (casting, offloading) is on it."""

import copy
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hookwise
from hookwise.core.hooks import list_hooks
from hookwise.errors import CompatibilityError, HookwiseError
from hookwise.memory import LayerwiseCasting, Offload, OffloadFileError, casting_state_dict, offload_report
from model_helpers import output_of, tiny_musubi

STACKS = ["cast", "ram", "disk", "cast+ram", "cast+disk"]


def stacked(kind: str, tmp_path: Path, *, frozen: bool = False):
    """A tiny musubi DiT with the stack `kind`, its inputs, and an untouched copy of it."""
    model, inputs = tiny_musubi()
    plain, _ = tiny_musubi()
    if frozen:
        model.requires_grad_(False)
    configs = []
    if "cast" in kind:
        configs.append(LayerwiseCasting(storage_dtype=torch.float8_e4m3fn, scaling="channel"))
    if "ram" in kind:
        configs.append(Offload(onload_device="cpu", granularity="block"))
    if "disk" in kind:
        configs.append(Offload(onload_device="cpu", offload_device="disk", disk_path=str(tmp_path), granularity="block"))
    hookwise.apply(model, *configs)
    return model, inputs, plain


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---- state_dict --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", STACKS)
def test_state_dict_under_a_stack_saves_plain_tensors_that_load_into_the_plain_model(kind, tmp_path):
    model, inputs, plain = stacked(kind, tmp_path)
    expected = output_of(model, inputs)
    state = casting_state_dict(model, "compute") if "cast" in kind else model.state_dict()
    for key, value in state.items():
        # A tensor of its own: not a view into a group buffer, a slot or a mapped file.
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
    loaded = torch.load(io.BytesIO(saved(state)), weights_only=True)
    plain.load_state_dict(loaded)  # strict: same keys, shapes and dtypes as the plain model
    torch.testing.assert_close(output_of(plain, inputs), expected)
    # The stacked model's own state dict saves too (with several dtypes viewing one group buffer it could not).
    torch.load(io.BytesIO(saved(model.state_dict())), weights_only=True)


def test_a_streamed_weight_saves_its_own_bytes_not_its_group_buffer(tmp_path):
    model, inputs, _ = stacked("ram", tmp_path)
    output_of(model, inputs)
    key = "single_blocks.0.linear2.weight"
    weight = model.state_dict()[key]
    group = next(g for g in offload_report(model).groups if g.name == "single_blocks.0")
    assert group.nbytes > 3 * weight.numel() * weight.element_size()
    assert len(saved(weight)) < weight.numel() * weight.element_size() + 2048


def test_state_dict_values_are_copies_and_keep_vars_gives_the_parameters(tmp_path):
    model, inputs, _ = stacked("disk", tmp_path)
    weight = model.single_blocks[0].linear2.weight
    state = model.state_dict()
    state["single_blocks.0.linear2.weight"].zero_()
    assert weight.abs().sum() > 0
    assert model.state_dict(keep_vars=True)["single_blocks.0.linear2.weight"] is weight


def test_casting_state_dict_gives_the_compute_or_the_stored_form(tmp_path):
    model, inputs, plain = stacked("cast", tmp_path)
    stored = casting_state_dict(model, "stored")
    key = "double_blocks.0.img_attn.qkv.weight"
    assert stored[key].dtype == torch.float8_e4m3fn and key + "_scale" in stored
    assert stored.keys() == model.state_dict().keys()
    compute = casting_state_dict(model, "compute")
    assert compute[key].dtype == torch.float32 and key + "_scale" not in compute
    assert compute.keys() == plain.state_dict().keys()
    expected = output_of(model, inputs)
    model.load_state_dict(compute)  # quantized again on the way in
    torch.testing.assert_close(output_of(model, inputs), expected)
    with pytest.raises(HookwiseError, match="form="):
        casting_state_dict(model, "fp8")


# ---- torch.save(model), pickle, deepcopy --------------------------------------------------------------
def test_a_cast_model_saved_whole_loads_and_runs_with_its_stack(tmp_path):
    model, inputs, _ = stacked("cast", tmp_path)
    expected = output_of(model, inputs)
    loaded = torch.load(io.BytesIO(saved(model)), weights_only=False)
    assert list_hooks(loaded) == list_hooks(model)
    assert torch.equal(output_of(loaded, inputs), expected)
    # (plain `pickle` cannot load fp8 storages, with or without hooks: a torch limitation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casting's lossy-removal warning
        hookwise.remove(loaded)
    assert list_hooks(loaded) == {} and "forward" not in loaded.__dict__


@pytest.mark.parametrize("kind", ["ram", "disk", "cast+disk"])
def test_an_offloaded_model_refuses_to_be_pickled_or_copied_with_a_clear_error(kind, tmp_path):
    model, inputs, _ = stacked(kind, tmp_path)
    output_of(model, inputs)
    for attempt in (lambda: saved(model), lambda: pickle.dumps(model), lambda: copy.deepcopy(model)):
        with pytest.raises(CompatibilityError, match="state_dict"):
            attempt()
    with pytest.raises(CompatibilityError, match="remove offloading first"):
        copy.deepcopy(model.single_blocks[0])
    # torch.save creates the file before pickling: the refusal must not leave one torch.load cannot read.
    for target in (tmp_path / "model.pt", str(tmp_path / "model2.pt")):
        with pytest.raises(CompatibilityError, match="state_dict"):
            torch.save(model, target)
        assert not os.path.exists(target)
    assert output_of(model, inputs).isfinite().all()  # still usable
    hookwise.remove(model)
    copy.deepcopy(model)


# ---- writes to offloaded weights ------------------------------------------------------------------------
def _write(model):
    with torch.no_grad():
        model.final_layer.linear.weight.data.add_(1)
        model.single_blocks[0].linear2.weight.data.add_(1)
        model.img_in.weight.data.mul_(2)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("kind", ["disk", "ram", "cast+disk"])
def test_writes_through_data_are_kept_under_offloading(kind, frozen, tmp_path):
    model, inputs, plain = stacked(kind, tmp_path, frozen=frozen)
    if "cast" in kind:
        hookwise.apply(plain, LayerwiseCasting(storage_dtype=torch.float8_e4m3fn, scaling="channel"))
    output_of(model, inputs)
    for m in (model, plain):
        with torch.no_grad():
            m.final_layer.linear.bias.data.add_(1)
            m.img_in.weight.data.mul_(2)
            if "cast" not in kind:
                m.single_blocks[0].linear2.weight.data.add_(1)
    for _ in range(3):
        assert torch.equal(output_of(model, inputs), output_of(plain, inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hookwise.remove(model)
        if "cast" in kind:
            hookwise.remove(plain)
    for (key, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "forward-with-grad"])
def test_data_writes_to_every_weight_between_calls_are_kept(granularity, grad):
    """`.data` writes move no version counter: no slot copy may outlive the call it was made for."""
    model, inputs = tiny_musubi()
    plain, _ = tiny_musubi()
    model.requires_grad_(False)
    plain.requires_grad_(False)
    # Four groups ahead: with a wide prefetch many groups would otherwise still sit in a slot.
    hookwise.apply(model, Offload(onload_device="cpu", granularity=granularity, prefetch=4))
    for round_ in range(3):
        with torch.set_grad_enabled(grad):
            assert torch.equal(output_of(model, inputs), output_of(plain, inputs))
        with torch.no_grad():
            for m in (model, plain):
                for p in m.parameters():
                    p.data.mul_(0.9).add_(0.01 * (round_ + 1))
    assert torch.equal(output_of(model, inputs), output_of(plain, inputs))
    hookwise.remove(model)
    for (key, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("kind", ["disk", "cast+disk"])
def test_ema_copy_to_an_offloaded_model_is_kept(kind, tmp_path):
    from diffusers.training_utils import EMAModel

    model, inputs, _ = stacked(kind, tmp_path, frozen=True)
    before = output_of(model, inputs)
    ema = EMAModel([p.detach().clone() for p in model.parameters()])
    ema.shadow_params = [s if s.dtype == torch.float8_e4m3fn else s * 0.5 for s in ema.shadow_params]
    ema.copy_to(model.parameters())
    after = [output_of(model, inputs) for _ in range(3)]
    assert not torch.equal(after[0], before)
    assert all(torch.equal(a, after[0]) for a in after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hookwise.remove(model)
    assert torch.equal(output_of(model, inputs), after[0])


# ---- group files changed while the model runs ----------------------------------------------------------------
def _files(model) -> list[str]:
    return [g.file for g in offload_report(model).groups if g.file]


def test_a_group_file_changed_in_place_raises_before_use(tmp_path):
    model, inputs, _ = stacked("disk", tmp_path)
    output_of(model, inputs)
    path = _files(model)[0]
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff" * 64)
    with pytest.raises(OffloadFileError, match="was modified"):
        output_of(model, inputs)


def test_remove_hashes_the_files_so_changed_bytes_never_become_the_weights(tmp_path):
    model, inputs, _ = stacked("disk", tmp_path)
    output_of(model, inputs)
    path = _files(model)[1]
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff" * 64)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the content tells
    with pytest.raises(OffloadFileError, match="does not hold the bytes"):
        hookwise.remove(model)
    assert list_hooks(model)  # nothing was changed: the model is still offloaded


_TRUNCATE = """
import sys, torch
sys.path.insert(0, {tests!r})
import hookwise
from hookwise.memory import Offload, OffloadFileError, offload_report
from model_helpers import output_of, tiny_musubi
model, inputs = tiny_musubi()
hookwise.apply(model, Offload(onload_device="cpu", offload_device="disk", disk_path={disk!r}, granularity="block"))
output_of(model, inputs)
for g in offload_report(model).groups:
    if g.file:
        with open(g.file, "r+b") as f:
            f.truncate(100)
for attempt in (lambda: output_of(model, inputs), model.state_dict):
    try:
        attempt()
    except OffloadFileError as exc:
        print("raised:", exc)
    else:
        print("no error")
"""


_TRUNCATE_BEFORE_BACKWARD = """
import sys, torch
sys.path.insert(0, {tests!r})
import hookwise
from hookwise.memory import Offload, OffloadFileError, offload_report
from model_helpers import sample_of, tiny_musubi
model, inputs = tiny_musubi()
model.requires_grad_(False)
model.single_blocks[1].linear2.requires_grad_(True)
hookwise.apply(model, Offload(onload_device="cpu", offload_device="disk", disk_path={disk!r},
                              granularity={granularity!r}, offload_trainable=True))
loss = sample_of(model(**inputs), "t").float().square().mean()
for g in offload_report(model).groups:
    if g.file:
        with open(g.file, "r+b") as f:
            f.truncate(100)
try:
    loss.backward()
except OffloadFileError as exc:
    print("raised:", exc)
else:
    print("no error")
"""


@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_a_group_file_truncated_between_forward_and_backward_raises(tmp_path, granularity):
    """Backward reads the mapped pages that saved tensors view, with no module call in between."""
    tests = str(Path(__file__).parent)
    script = _TRUNCATE_BEFORE_BACKWARD.format(tests=tests, disk=str(tmp_path), granularity=granularity)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(hookwise.__file__).parents[1]), tests]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.startswith("raised:") and "truncated" in done.stdout, done.stdout


def test_a_truncated_group_file_raises_instead_of_killing_the_process(tmp_path):
    tests = str(Path(__file__).parent)
    script = _TRUNCATE.format(tests=tests, disk=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(hookwise.__file__).parents[1]), tests]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("raised:") and "truncated" in line for line in lines), done.stdout
