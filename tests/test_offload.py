"""Offloading on the CPU: exact outputs and gradients, prefetch order, training, writes, removal, errors.

Two paths run here. Disk offload with the CPU computing: parameters are views of the mapped
files, prefetch is an OS read-ahead (the "direct" path users get). Host-RAM offload with the CPU
computing: groups are copied into CPU "device" slots, so every decision of the slot scheduler
(loads, prefetch, eviction, saved-tensor packing, write-backs) runs as it does on a GPU. Strict
mode poisons every unbound slot-streamed tensor, so a weight used outside its group's hooks
corrupts the result visibly instead of silently reading the host copy.
"""

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import hookwise
from hookwise.core import list_hooks
from hookwise.core.overrides import overridden
from hookwise.core.outputs import sample_of
from hookwise.errors import CompatibilityError, ConfigError, HookError, NoTargetError
from hookwise.memory import Offload, apply_offload, offload_report, remove_offload
from offload_helpers import (
    CheckpointedDiT,
    Reordered,
    add_lora,
    assert_same,
    fwd_bwd,
    scheduler,
    strict,
    uses,
)
from model_helpers import mlp, output_of, tiny_flux, tiny_hunyuanvideo, tiny_musubi, tiny_wan

MODELS = {"flux": tiny_flux, "wan": tiny_wan, "hunyuanvideo": tiny_hunyuanvideo, "musubi": tiny_musubi}


def disk(tmp_path, **kw):
    return Offload(onload_device="cpu", offload_device="disk", disk_path=str(tmp_path), **kw)


def slots(**kw):
    """Host RAM -> CPU slots: the copy path a GPU uses, run on the CPU."""
    return Offload(onload_device="cpu", offload_device="cpu", **kw)


@pytest.mark.parametrize("offload_device", ["disk", "cpu"])
@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("name", list(MODELS))
def test_offload_outputs_and_lora_gradients_equal_the_plain_model(name, granularity, offload_device, tmp_path):
    model, inputs = MODELS[name]()
    add_lora(model)
    expected = fwd_bwd(model, inputs)
    with torch.no_grad():
        expected_eval = sample_of(model(**inputs), "test")
    config = disk(tmp_path, granularity=granularity) if offload_device == "disk" else slots(granularity=granularity)
    apply_offload(model, config)
    strict(model)
    for _ in range(2):  # the first pass records the order, the second prefetches along it
        assert_same(fwd_bwd(model, inputs), expected)
        with torch.no_grad():
            assert torch.equal(sample_of(model(**inputs), "test"), expected_eval)
    report = offload_report(model)
    assert report.granularity == granularity
    assert report.streamed and report.stats["prefetch_hits"] > 0
    # LoRA adapters are trainable: they stay on the device, beside their (streamed) layers.
    lora = [p for p in report.always_resident if "lora_" in p]
    assert lora and all(report.always_resident[p].startswith("trainable") for p in lora)


@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_equal_with_gradient_checkpointing(reentrant, granularity):
    _, inputs = tiny_musubi()
    inputs["img"].requires_grad_(True)  # a reentrant checkpoint needs an input that requires grad
    model = add_lora(CheckpointedDiT(reentrant).eval())
    expected = fwd_bwd(model, inputs)
    apply_offload(model, slots(granularity=granularity))
    strict(model)
    for _ in range(3):
        assert_same(fwd_bwd(model, inputs), expected)
    stats = offload_report(model).stats
    if granularity == "block" or reentrant:
        # One block per checkpointed region (or saved weights packed by reference): two slots suffice.
        assert stats["overflow_slots"] == 0
    else:
        # A non-reentrant checkpoint keeps the recomputed views of every leaf of its region alive:
        # extra slots are taken (and reported) rather than overwrite weights in use.
        assert stats["overflow_slots"] > 0


def test_forward_without_lora_under_grad_matches():
    model, inputs = tiny_wan()
    expected = output_of(model, inputs)
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    strict(model)
    out = sample_of(model(**inputs), "test")  # grad mode on, nothing trainable outside the streamed weights
    assert torch.equal(out.detach(), expected)


def test_prefetch_order_follows_execution_order_of_towers_called_out_of_definition_order():
    model = Reordered().eval()
    x = torch.randn(2, 16)
    expected = model(x)
    called = []
    for path, module in model.named_modules():
        if path.startswith(("first.", "second.")) and path.count(".") == 1:
            module.register_forward_pre_hook(lambda m, a, path=path: called.append(path))
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    strict(model)
    sched = scheduler(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # first pass: blocking, records the order
        towers_in_call_order = list(called)
        assert towers_in_call_order == ["second.2", "second.1", "second.0", "first.0", "first.1", "first.2"]
        report = offload_report(model)
        assert [n for n in report.order if n.startswith(("first", "second"))] == towers_in_call_order
        sched.trace = []
        on_demand = offload_report(model).stats["on_demand"]
        assert torch.equal(model(x), expected)
    assert offload_report(model).stats["on_demand"] == on_demand, "after the first pass every group is prefetched"
    trace = sched.trace
    order = uses(trace)
    assert order == list(report.order)
    # Each group was loaded as a prefetch while its predecessor was in use.
    for prev, name in zip(order, order[1:]):
        load = trace.index(("load", name, True))
        assert trace.index(("use", prev, False)) < load < trace.index(("use", name, False))


def test_backward_prefetches_groups_in_reverse_order():
    model = Reordered().eval()
    add_lora(model, ["lin"])
    x = torch.randn(2, 16, requires_grad=True)  # so every block's weights are needed in backward
    expected = fwd_bwd(model, {"x": x})
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    strict(model)
    sched = scheduler(model)
    assert_same(fwd_bwd(model, {"x": x}), expected)
    sched.trace = []
    on_demand = offload_report(model).stats["on_demand"]
    assert_same(fwd_bwd(model, {"x": x}), expected)
    forward, backward = uses(sched.trace, False), uses(sched.trace, True)
    blocks = [n for n in forward if n.startswith(("first", "second"))]
    assert [n for n in backward if n.startswith(("first", "second"))] == blocks[::-1]
    assert offload_report(model).stats["on_demand"] == on_demand
    backward_loads = [name for kind, name, prefetch in sched.trace if kind == "load"]
    assert all(prefetch for kind, name, prefetch in sched.trace if kind == "load")
    assert backward_loads, "the groups evicted during forward were fetched again for backward"


def test_a_group_that_was_not_predicted_loads_on_demand():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)])

        def forward(self, x, skip: bool = False):
            for i, block in enumerate(self.blocks):
                if not (skip and i == 1):
                    x = block(x)
            return x

    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(3, 8)
    with torch.no_grad():
        full, skipped = model(x), model(x, skip=True)
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    strict(model)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), full)
        assert torch.equal(model(x, skip=True), skipped)  # block 1 was prefetched but is skipped
        misses = offload_report(model).stats["mispredictions"]
        assert misses >= 1
        assert torch.equal(model(x), full)  # the order changed twice: still correct
        assert torch.equal(model(x), full)


@pytest.mark.parametrize("offload_device", ["disk", "cpu"])
def test_full_finetune_with_offload_trainable_matches_sgd_on_the_plain_model(offload_device, tmp_path):
    def train(model, inputs, steps=2, micro=2):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(micro):  # gradient accumulation across micro-batches
                loss = (sample_of(model(**inputs), "test") ** 2).mean()
                loss.backward()
                losses.append(loss.item())
            opt.step()
        return losses

    ref_model, inputs = tiny_musubi()
    model, _ = tiny_musubi()
    expected = train(ref_model, inputs)
    kw = dict(granularity="block", offload_trainable=True)
    apply_offload(model, disk(tmp_path, **kw) if offload_device == "disk" else slots(**kw))
    # Not strict: the optimizer legitimately updates the unbound weights (their host masters).
    assert train(model, inputs) == expected
    # Trainable groups are unbound at the end of each backward, so the optimizer stepped on the
    # host masters (and kept its state there); the changed groups were copied again.
    assert offload_report(model).bound == ()
    remove_offload(model)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), n


def test_trainable_parameters_stay_resident_unless_offload_trainable():
    model, _ = tiny_musubi()
    model.requires_grad_(False)
    model.final_layer.linear.requires_grad_(True)
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    reasons = offload_report(model).always_resident
    assert reasons == {
        "final_layer.linear.weight": reasons["final_layer.linear.weight"],
        "final_layer.linear.bias": reasons["final_layer.linear.bias"],
    }
    assert reasons["final_layer.linear.weight"].startswith("trainable")
    remove_offload(model)
    apply_offload(model, Offload(onload_device="cpu", granularity="block", offload_trainable=True))
    assert offload_report(model).always_resident == {}


def test_in_place_updates_to_offloaded_weights_are_kept():
    model, inputs = tiny_musubi()
    plain, _ = tiny_musubi()
    model.requires_grad_(False)  # frozen (an inference model)
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    output_of(model, inputs)
    # Between calls no tensor points into a slot: every write lands in the host master.
    assert offload_report(model).bound == ()
    with torch.no_grad():
        for m in (model, plain):
            m.final_layer.linear.weight.mul_(2)  # the last group of the pass
            m.img_in.weight.add_(1)  # the first
            m.single_blocks[0].load_state_dict({k: v * 0.5 for k, v in m.single_blocks[0].state_dict().items()})
    for _ in range(3):
        assert torch.equal(output_of(model, inputs), output_of(plain, inputs))
    remove_offload(model)
    for (n, p), q in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), n


def test_replacing_a_parameter_after_apply_raises_a_clear_error():
    model, inputs = tiny_musubi()
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    model.single_blocks[0].linear2.weight = nn.Parameter(torch.zeros_like(model.single_blocks[0].linear2.weight))
    with pytest.raises(HookError, match="single_blocks.0.linear2.weight was replaced"):
        output_of(model, inputs)


def test_model_to_warns_and_changes_nothing():
    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    apply_offload(model, Offload(onload_device="cpu", granularity="block", vram_budget=500_000))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="offloading applied"):
        assert model.to(torch.float16) is model
    with pytest.warns(UserWarning):
        model.half()
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    assert torch.equal(output_of(model, inputs), expected)
    remove_offload(model)
    assert "_apply" not in model.__dict__ and overridden(model) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.to(torch.float64)  # works again once offloading is gone
    assert next(model.parameters()).dtype == torch.float64


def test_remove_puts_every_weight_back_on_one_device_with_its_values(tmp_path):
    model, inputs = tiny_flux()
    add_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = model.__dict__.get("forward")
    apply_offload(model, disk(tmp_path, granularity="leaf", vram_budget=200_000))
    fwd_bwd(model, inputs)
    assert list_hooks(model)
    remove_offload(model)
    assert list_hooks(model) == {}
    assert model.__dict__.get("forward") is forward
    after = model.state_dict()
    storages = set()
    for k, v in after.items():
        assert torch.equal(v, before[k]), k
        assert v.device.type == "cpu"
        # Each tensor owns its storage again (no views into offload buffers or file mappings).
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
        storages.add(v.untyped_storage().data_ptr())
    assert len(storages) == len(after)


def test_hookwise_apply_and_remove_round_trip():
    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    stack = hookwise.apply(model, Offload(onload_device="cpu", vram_budget="60%"))
    assert stack.names() == ["offload"]
    assert hookwise.Stack.from_json(stack.to_json()) == stack
    assert torch.equal(output_of(model, inputs), expected)
    assert hookwise.remove(model) == ["offload"]
    assert list_hooks(model) == {}
    assert torch.equal(output_of(model, inputs), expected)


def test_a_failure_half_way_leaves_the_model_untouched(tmp_path, monkeypatch):
    from hookwise.memory import offload as offload_module

    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    ids = {n: id(p) for n, p in model.named_parameters()}
    calls = []
    real_store = offload_module.store

    def failing_store(directory, group, flat):
        calls.append(group.name)
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        return real_store(directory, group, flat)

    monkeypatch.setattr(offload_module, "store", failing_store)
    with pytest.raises(OSError, match="simulated"):
        apply_offload(model, disk(tmp_path, granularity="block", vram_budget=150_000))
    assert len(calls) == 4
    assert list_hooks(model) == {} and overridden(model) == {}
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    for n, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), n
    assert torch.equal(output_of(model, inputs), expected)


def test_applying_twice_or_over_another_offloading_system_raises():
    model, _ = tiny_musubi()
    apply_offload(model, Offload(onload_device="cpu"))
    with pytest.raises(CompatibilityError, match="already applied"):
        apply_offload(model, Offload(onload_device="cpu"))

    from diffusers.hooks import apply_group_offloading

    flux, _ = tiny_flux()
    apply_group_offloading(flux, onload_device="cpu", offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(CompatibilityError, match="diffusers group offloading"):
        apply_offload(flux, Offload(onload_device="cpu"))
    assert list_hooks(flux) == {}

    from accelerate import cpu_offload

    net = mlp()
    cpu_offload(net, execution_device=torch.device("cpu"))
    with pytest.raises(CompatibilityError, match="accelerate offloading"):
        apply_offload(net, Offload(onload_device="cpu", granularity="leaf"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(offload_device="gpu"), "offload_device"),
        (dict(granularity="layer"), "granularity"),
        (dict(prefetch=-1), "prefetch"),
        (dict(pin="some"), "pin"),
        (dict(onload_device="cpu", pin="all"), "pin='all' needs a CUDA"),
        (dict(onload_device="cpu", use_streams=True), "has no streams"),
        (dict(disk_path="/tmp/x"), "disk_path is only used"),
        (dict(blocks_per_group=0), "blocks_per_group"),
        (dict(vram_budget="lots"), "not a size"),
        (dict(vram_budget="150%"), r"\(0%, 100%\]"),
        (dict(vram_budget=-5), "positive"),
        (dict(onload_device="warp9"), "not a device"),
    ],
)
def test_invalid_configs_say_what_to_do(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Offload(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_onload_without_cuda_says_how_to_proceed():
    model, _ = tiny_musubi()
    with pytest.raises(ConfigError, match="onload_device='cpu'"):
        apply_offload(model, Offload())
    assert list_hooks(model) == {}


def test_block_granularity_without_towers_points_to_leaf():
    with pytest.raises(NoTargetError, match="granularity='leaf'"):
        apply_offload(mlp(), Offload(onload_device="cpu", granularity="block"))
    report = apply_offload(mlp(), Offload(onload_device="cpu", granularity="auto"))
    assert report.granularity == "leaf"


def test_blocks_per_group_moves_consecutive_blocks_together():
    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    report = apply_offload(model, Offload(onload_device="cpu", granularity="block", blocks_per_group=2))
    strict(model)
    names = [g.name for g in report.groups if g.kind == "block"]
    assert names == ["double_blocks.0..1", "single_blocks.0..1", "single_blocks.2"]
    for _ in range(2):
        assert torch.equal(output_of(model, inputs), expected)


@pytest.mark.parametrize("together", [True, False], ids=["one-apply", "cast-then-offload"])
@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_offloading_composes_with_layerwise_casting_and_lora(where, granularity, together, tmp_path):
    """fp8-cast groups stream as they are (half the bytes) and give exactly the cast model's results."""
    casting = hookwise.LayerwiseCasting(scaling="block")
    offload = disk(tmp_path, granularity=granularity) if where == "disk" else slots(granularity=granularity)

    reference, inputs = tiny_musubi()
    add_lora(reference)
    hookwise.apply(reference, casting)
    expected = fwd_bwd(reference, inputs)

    model, _ = tiny_musubi()
    add_lora(model)
    if together:
        hookwise.apply(model, offload, casting)  # canonical order: casting first, whatever the argument order
    else:
        hookwise.apply(model, casting)
        hookwise.apply(model, offload)
    if where == "cpu":
        strict(model)
    for _ in range(2):
        assert_same(fwd_bwd(model, inputs), expected)

    cast = hookwise.casting_summary(model)
    assert cast["cast"] and all(".base_layer" in p or "lora_" not in p for p in cast["cast"])
    # Cast weights (fp8, with their block scales) move as they are: the streamed bytes shrink by
    # exactly what casting saved, against the same offloading of the uncast model.
    uncast, _ = tiny_musubi()
    add_lora(uncast)
    hookwise.apply(uncast, disk(tmp_path / "uncast", granularity=granularity) if where == "disk" else slots(granularity=granularity))
    streamed = sum(g.nbytes for g in offload_report(model).groups if not g.resident)
    uncast_streamed = sum(g.nbytes for g in offload_report(uncast).groups if not g.resident)
    assert uncast_streamed - streamed == cast["bytes_before"] - cast["bytes_after"] > 0
    hooks = list_hooks(model)[cast["cast"][0]]
    assert hooks[-1] == "hookwise.casting"  # casting stays innermost
    # Removing both gives back a plain model computing what the cast model computed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert hookwise.remove(model) == ["offload", "casting"]
    assert list_hooks(model) == {}
    torch.testing.assert_close(sample_of(model(**inputs), "test"), expected[0])


def test_inference_mode_passes_do_not_spoil_later_training():
    model, inputs = tiny_musubi()
    add_lora(model)
    expected = fwd_bwd(model, inputs)
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    with torch.inference_mode():  # device views first made here must still be usable by autograd
        model(**inputs)
    assert_same(fwd_bwd(model, inputs), expected)


def test_remove_frees_the_engine_at_once_not_at_a_later_garbage_collection():
    """The engine's objects form cycles; remove collects them, so repeated apply / remove of a large
    model does not pile up host buffers until Python's object-count-driven collector runs."""
    model, inputs = tiny_musubi()
    gc.disable()  # only remove's own collection may free the cycle
    try:
        hookwise.apply(model, Offload(onload_device="cpu", granularity="block"))
        output_of(model, inputs)
        engine = weakref.ref(scheduler(model))
        hookwise.remove(model)
        assert engine() is None
    finally:
        gc.enable()
