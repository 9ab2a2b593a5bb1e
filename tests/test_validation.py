"""`hookwise.validation`: switch from the training stack to an inference stack and back exactly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

import hookwise
from hookwise.core.techniques import applied_configs
from hookwise.errors import CompatibilityError, ConfigError, HookwiseError
from hookwise.memory import _disk
from hookwise.memory.offload import _offloader, offload_report
from model_helpers import output_of, tiny_flux, tiny_wan
from offload_helpers import add_lora
from test_checkpointing import _Odd
from tree_helpers import Tree, x_input


def _nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _offload(model, share: float, **kwargs) -> hookwise.Offload:
    """Offload on the CPU with a budget of `share` of the model's bytes."""
    return hookwise.Offload(onload_device="cpu", vram_budget=int(_nbytes(model) * share), **kwargs)


def _lora_model(make=tiny_flux):
    model, inputs = make()
    add_lora(model)
    model.train()
    return model, inputs


def _step(model, inputs, optimizer) -> torch.Tensor:
    """One LoRA step on noised inputs (the noise draws from the RNG, as a trainer's does)."""
    optimizer.zero_grad(set_to_none=True)
    first = next(iter(inputs))
    noisy = dict(inputs, **{first: inputs[first] + torch.randn_like(inputs[first])})
    out = model(**noisy)
    out = out.sample if hasattr(out, "sample") else out
    loss = (out.float() ** 2).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _sample(model, inputs, steps: int = 3) -> list[torch.Tensor]:
    """A few denoiser calls at falling timesteps, on fresh noise: what a validation sampler does."""
    outs = []
    first = next(iter(inputs))
    with torch.no_grad():
        hookwise.new_run(model)
        for t in torch.linspace(0.9, 0.3, steps):
            batch = inputs[first].shape[0]
            noisy = dict(inputs, **{first: torch.randn_like(inputs[first]), "timestep": torch.full((batch,), float(t))})
            outs.append(output_of(model, noisy))
    return outs


def _snapshot(model, optimizer=None) -> dict:
    """Everything the switch must give back: parameter objects and values, dtypes, devices, flags, modes,
    the stack, the RNG state and the optimizer state."""
    snap = {
        "params": [(n, p, p.dtype, p.device, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "stack": hookwise.applied(model),
        "ledger": [type(c).__name__ for c in applied_configs(model)],
        "rng": torch.get_rng_state(),
    }
    if optimizer is not None:
        snap["opt"] = {
            id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()
        }
    return snap


def _assert_restored(model, before: dict, optimizer=None) -> None:
    after = _snapshot(model, optimizer)
    assert len(after["params"]) == len(before["params"])
    for (n, p, dt, dev, rg, val), (n2, p2, dt2, dev2, rg2, val2) in zip(before["params"], after["params"]):
        assert n == n2 and p is p2, f"{n}: another parameter object"
        assert (dt, dev, rg) == (dt2, dev2, rg2), f"{n}: dtype / device / requires_grad changed"
        assert torch.equal(val, val2), f"{n}: values changed"
    assert after["modes"] == before["modes"]
    assert after["stack"] == before["stack"]
    assert after["ledger"] == before["ledger"]
    assert torch.equal(after["rng"], before["rng"])
    if optimizer is not None:
        assert after["opt"].keys() == before["opt"].keys()
        for key, state in before["opt"].items():
            for name, value in state.items():
                other = after["opt"][key][name]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other


TRAINING = {
    "ram offload": lambda m, tmp: [_offload(m, 0.4)],
    "disk offload": lambda m, tmp: [_offload(m, 0.4, offload_device="disk", disk_path=str(tmp))],
    "block offload + checkpointing": lambda m, tmp: [
        _offload(m, 0.6, granularity="block", prefetch=False),
        hookwise.Checkpointing(),
    ],
    "fp8 casting + offload": lambda m, tmp: [hookwise.LayerwiseCasting(), _offload(m, 0.6)],
}


def _inside(training: list, model) -> list:
    """The validation stack: the training one with a budget that holds the whole model, plus a step cache."""
    out = [c for c in training if not isinstance(c, (hookwise.Offload, hookwise.Checkpointing))]
    offload = next(c for c in training if isinstance(c, hookwise.Offload))
    import dataclasses

    return out + [dataclasses.replace(offload, vram_budget=int(_nbytes(model) * 3)), hookwise.FirstBlockCache(threshold=0.5)]


@pytest.mark.parametrize("name", list(TRAINING))
def test_the_next_lora_step_is_bit_identical_to_one_without_validation(name, tmp_path):
    models = [_lora_model() for _ in range(2)]
    optimizers = []
    for model, _ in models:
        hookwise.apply(model, *TRAINING[name](model, tmp_path))
        optimizers.append(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    (a, inputs), (b, _) = models
    torch.manual_seed(5)
    loss_a = _step(a, inputs, optimizers[0])
    torch.manual_seed(5)
    loss_b = _step(b, inputs, optimizers[1])
    assert torch.equal(loss_a, loss_b)
    rng = torch.get_rng_state()  # as both steps left it

    before = _snapshot(a, optimizers[0])
    inside = _inside(TRAINING[name](a, tmp_path), a)
    with hookwise.validation(a, stack=inside) as v:
        assert hookwise.applied(a) == hookwise.Stack(*inside)
        assert not a.training
        samples = _sample(a, inputs)
    _assert_restored(a, before, optimizers[0])
    assert all(torch.isfinite(s).all() for s in samples)
    assert v.report.enter.steps and v.report.exit.steps
    assert v.report.enter.files_written == v.report.enter.hashes == v.report.enter.pins == 0

    loss_a = _step(a, inputs, optimizers[0])  # on the RNG state validation gave back
    torch.set_rng_state(rng)
    loss_b = _step(b, inputs, optimizers[1])
    assert torch.equal(loss_a, loss_b)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{n} differs after the step that followed validation"
    for pa, pb in zip(optimizers[0].state.values(), optimizers[1].state.values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_samples_inside_equal_those_of_the_inference_stack_applied_fresh(tmp_path):
    model, inputs = tiny_flux()
    plain, _ = tiny_flux()
    training = [_offload(model, 0.4)]
    hookwise.apply(model, *training)
    inside = _inside(training, model)
    torch.manual_seed(3)
    with hookwise.validation(model, stack=inside):
        got = _sample(model, inputs)
    hookwise.apply(plain, *inside)
    torch.manual_seed(3)
    expected = _sample(plain, inputs)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_the_offload_switch_holds_groups_resident_in_place_and_releases_them():
    model, inputs = tiny_flux()
    hookwise.apply(model, _offload(model, 0.4))
    streamed = offload_report(model).streamed
    assert streamed
    with hookwise.validation(model, stack=[_offload(model, 3)]) as v:
        report = offload_report(model)
        assert report.streamed == ()
        loads = report.stats["loads"]
        output_of(model, inputs)
        assert offload_report(model).stats["loads"] == loads  # nothing streams: every group is resident
    assert offload_report(model).streamed == streamed
    assert "in place" in v.report.enter.steps[0]
    assert v.report.enter.bytes_copied == 0  # host copies in RAM on the CPU: computed on where they are


def _spies(stack):
    """Count what disk offloading writes and hashes, and what the transfer engines allocate and pin."""
    counts = {"store": 0, "verify": 0, "sha256": 0, "alloc_host": 0, "pin": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    stack.enter_context(mock.patch.object(_disk, "store", counting("store", _disk.store)))
    stack.enter_context(mock.patch.object(_disk.DiskFile, "verify", counting("verify", _disk.DiskFile.verify)))
    stack.enter_context(mock.patch.object(_disk.hashlib, "sha256", counting("sha256", hashlib.sha256)))
    from hookwise.memory import _transfer, offload as offload_module

    stack.enter_context(mock.patch.object(offload_module, "store", counting("store", offload_module.store)))
    for engine in (_transfer.TransferEngine, _transfer.StreamEngine):
        stack.enter_context(mock.patch.object(engine, "alloc_host", counting("alloc_host", engine.alloc_host)))
    stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", counting("pin", torch.Tensor.pin_memory)))
    return counts


def _files(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_the_switch_under_disk_offload_writes_no_file_and_hashes_nothing(tmp_path):
    import contextlib

    model, inputs = _lora_model()
    training = [_offload(model, 0.4, offload_device="disk", disk_path=str(tmp_path))]
    hookwise.apply(model, *training)
    files = _files(tmp_path)
    assert files
    torch.manual_seed(0)
    expected = _sample(model, inputs)
    with contextlib.ExitStack() as stack:
        counts = _spies(stack)
        with hookwise.validation(model, stack=_inside(training, model)[:1]) as v:
            torch.manual_seed(0)
            got = _sample(model, inputs)
            assert _files(tmp_path) == files
        assert counts["store"] == counts["verify"] == counts["sha256"] == counts["alloc_host"] == 0
    assert _files(tmp_path) == files
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    cost = v.report
    assert (cost.enter.files_written, cost.enter.hashes, cost.exit.files_written, cost.exit.hashes) == (0, 0, 0, 0)
    assert cost.enter.bytes_copied > 0  # the held groups were read from their mapped files into RAM
    assert all(g.storage == "disk" for g in offload_report(model).groups if not g.resident)


def test_a_switch_that_cannot_be_made_in_place_removes_and_applies_and_counts_it(tmp_path):
    """The contrast: another granularity inside is a new offloading, whose files are hashed (and counted)."""
    import contextlib

    model, inputs = tiny_flux()
    hookwise.apply(model, _offload(model, 0.4, offload_device="disk", disk_path=str(tmp_path), granularity="leaf"))
    before = _snapshot(model)
    inside = [_offload(model, 0.6, offload_device="disk", disk_path=str(tmp_path), granularity="block")]
    with contextlib.ExitStack() as stack:
        counts = _spies(stack)
        with hookwise.validation(model, stack=inside) as v:
            _sample(model, inputs)
        assert counts["store"] > 0 and counts["verify"] > 0
    assert v.report.enter.hashes > 0 and v.report.exit.hashes > 0
    _assert_restored(model, before)


@pytest.mark.parametrize("pin", ["auto", "none"])
def test_the_switch_under_pinned_or_ram_offload_allocates_and_pins_no_host_memory(monkeypatch, pin):
    """Through the stream engine (with the recording fake device of the engine tests): pinned host copies."""
    import contextlib

    from test_offload_engine import with_fake_streams

    backend, _ = with_fake_streams(monkeypatch)
    model, inputs = _lora_model()
    torch.manual_seed(0)
    expected = _sample(model, inputs, steps=1)
    training = [_offload(model, 0.4, pin=pin)]
    hookwise.apply(model, *training)
    report = offload_report(model)
    assert (report.pinned_host_bytes > 0) == (pin == "auto")
    offloader = _offloader(model)
    sources = [(st.source.flat.data_ptr(), st.source.kind) for st in offloader.states]
    pinned = backend.pinned_bytes
    with contextlib.ExitStack() as stack:
        counts = _spies(stack)
        with hookwise.validation(model, stack=_inside(training, model)[:1]) as v:
            assert offload_report(model).streamed == ()
            torch.manual_seed(0)
            got = _sample(model, inputs, steps=1)
        assert counts["alloc_host"] == counts["pin"] == 0
    assert backend.pinned_bytes == pinned
    assert [(st.source.flat.data_ptr(), st.source.kind) for st in _offloader(model).states] == sources
    assert v.report.enter.pins == v.report.exit.pins == 0
    assert torch.equal(got[0], expected[0])


def test_an_error_inside_the_block_restores_everything(tmp_path):
    model, inputs = _lora_model()
    training = [_offload(model, 0.4, offload_device="disk", disk_path=str(tmp_path)), hookwise.Checkpointing()]
    hookwise.apply(model, *training)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="sampler broke"):
        with hookwise.validation(model, stack=_inside(training, model)):
            _sample(model, inputs, steps=1)
            torch.randn(100)
            raise RuntimeError("sampler broke")
    _assert_restored(model, before)
    hookwise.validation(model, stack=_inside(training, model)).__enter__().__exit__(None, None, None)
    _assert_restored(model, before)


def test_the_rng_state_is_restored_so_sampling_draws_nothing_from_training():
    model, inputs = tiny_flux()
    hookwise.apply(model, _offload(model, 0.4))
    torch.manual_seed(11)
    with hookwise.validation(model, stack=[_offload(model, 3)]):
        _sample(model, inputs)
        torch.randn(1000)
    after = torch.randn(4)
    torch.manual_seed(11)
    assert torch.equal(torch.randn(4), after)


@pytest.mark.gpu
def test_the_cuda_rng_state_is_restored():
    model, inputs = tiny_flux()
    hookwise.apply(model, hookwise.Offload(onload_device="cuda", vram_budget=int(_nbytes(model) * 0.4)))
    torch.cuda.manual_seed_all(3)
    with hookwise.validation(model, stack=[hookwise.Offload(onload_device="cuda", vram_budget=int(_nbytes(model) * 3))]):
        torch.randn(100, device="cuda")
    after = torch.randn(4, device="cuda")
    torch.cuda.manual_seed_all(3)
    assert torch.equal(torch.randn(4, device="cuda"), after)


def test_validation_on_a_model_with_no_stack_is_a_clear_error():
    model, _ = tiny_flux()
    with pytest.raises(ConfigError, match="applied nothing to this model"):
        with hookwise.validation(model, stack=[hookwise.FirstBlockCache()]):
            pass  # pragma: no cover
    assert hookwise.applied(model) == hookwise.Stack()


def test_nested_validation_is_a_clear_error_and_the_outer_block_still_restores():
    model, inputs = tiny_flux()
    hookwise.apply(model, _offload(model, 0.4))
    before = _snapshot(model)
    with hookwise.validation(model, stack=[_offload(model, 3)]):
        inside = hookwise.applied(model)
        with pytest.raises(ConfigError, match="do not nest"):
            with hookwise.validation(model, stack=[_offload(model, 2)]):
                pass  # pragma: no cover
        assert hookwise.applied(model) == inside
    _assert_restored(model, before)


def test_a_stack_that_does_not_apply_leaves_nothing_half_applied():
    model, inputs = tiny_flux()
    hookwise.apply(model, _offload(model, 0.4))
    before = _snapshot(model)
    streamed = offload_report(model).streamed
    with pytest.raises(HookwiseError):
        # The offload switch comes first and succeeds; the skip names a block the model does not have.
        with hookwise.validation(model, stack=[_offload(model, 3), hookwise.LayerSkip(blocks=(99,))]):
            pass  # pragma: no cover
    _assert_restored(model, before)
    assert offload_report(model).streamed == streamed
    expected = output_of(tiny_flux()[0], inputs)
    assert torch.equal(output_of(model, inputs), expected)


def test_a_lossy_technique_is_never_swapped():
    model, _ = tiny_flux()
    hookwise.apply(model, hookwise.LayerwiseCasting(), _offload(model, 0.6))
    before = _snapshot(model)
    with pytest.raises(CompatibilityError, match="casting"):
        with hookwise.validation(model, stack=[_offload(model, 3)]):
            pass  # pragma: no cover
    _assert_restored(model, before)


def test_a_smaller_budget_inside_falls_back_to_remove_and_apply():
    model, inputs = tiny_flux()
    hookwise.apply(model, _offload(model, 0.6))
    before = _snapshot(model)
    with hookwise.validation(model, stack=[_offload(model, 0.3)]) as v:
        assert hookwise.applied(model) == hookwise.Stack(_offload(model, 0.3))
        _sample(model, inputs)
    assert not any("in place" in s for s in v.report.enter.steps)
    _assert_restored(model, before)


def test_the_default_stack_is_the_planners_fitted_to_the_training_stack():
    model, inputs = tiny_flux()
    hookwise.apply(model, _offload(model, 0.4))
    before = _snapshot(model)
    with hookwise.validation(model) as v:
        inside = hookwise.applied(model)
        _sample(model, inputs)
    assert any(isinstance(c, hookwise.Offload) for c in inside)
    assert v.report.enter.files_written == v.report.enter.hashes == 0
    _assert_restored(model, before)


# ---- models of odd shapes -----------------------------------------------------------------------------
def _odd_models():
    towers = [
        (["list", "dict"], "list", ["split", "fused", "split"], [0, 2, 2]),  # a block reused, one never called
        (["holder"], "seq", ["fused-softmax", "fused"], None),
    ]
    torch.manual_seed(0)
    tree = Tree(towers)
    yield "nested towers, fused qkv, blocks reused or never called", tree, {"x": x_input()}
    yield "a block called twice and one never called", _Odd(), {"x": torch.randn(2, 4, 8)}
    wan, inputs = tiny_wan()
    yield "wan", wan, inputs


@pytest.mark.parametrize("index", range(3))
def test_models_of_odd_shapes_switch_and_come_back_exactly(index):
    name, model, inputs = list(_odd_models())[index]
    expected = output_of(model, inputs)
    hookwise.apply(model, _offload(model, 0.5, granularity="leaf"))
    before = _snapshot(model)
    with hookwise.validation(model, stack=[_offload(model, 3, granularity="leaf")]) as v:
        assert torch.equal(output_of(model, inputs), expected), name
    assert "in place" in v.report.enter.steps[0]
    _assert_restored(model, before)
    assert torch.equal(output_of(model, inputs), expected), name
