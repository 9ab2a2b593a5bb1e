"""DataParallel at apply, in one process (a gloo world of one rank): what FSDP2 cannot stand is refused in
both orders with the reason and nothing applied, DDP still composes with offloading, and a fully_shard
that fails part-way leaves the model exactly as it was (and shardable again). Also the root-only hook
lookup the parallel reports share, and the per-config order check in core."""

import dataclasses
import importlib

import pytest
import torch
import torch.distributed.fsdp as fsdp

import hookwise
from hookwise.core import check_compatible, hook_on
from hookwise.errors import CompatibilityError, ConfigError
from hookwise.parallel import cfg_parallel_report, data_parallel_report
from hookwise.parallel.data import DataParallelHook

from cache_helpers import build
from dist_helpers import world_of_one

table_module = importlib.import_module("hookwise.core.techniques")  # the module (the package re-exports a function of that name)


@pytest.fixture(scope="module", autouse=True)
def world():
    world_of_one()


def _lora_model():
    import peft

    model, inputs = build("flux", 2)
    model.requires_grad_(False)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    peft.inject_adapter_in_model(config, model)
    return model, inputs


def _state(model):
    """Everything fully_shard changes, per module: class, parameter objects and data, hooks, attributes."""
    out = {}
    for name, m in model.named_modules():
        out[name] = (
            type(m),
            {k: (id(p), p.data_ptr(), type(p)) for k, p in m._parameters.items() if p is not None},
            len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._load_state_dict_post_hooks),
            sorted(m.__dict__),
        )
    return out


def test_fsdp_refuses_offload_applied_after_it_with_the_reason_and_applies_nothing():
    model, inputs = _lora_model()
    hookwise.apply(model, hookwise.DataParallel(mode="fsdp"))
    hooks = hookwise.core.list_hooks(model)
    with pytest.raises(CompatibilityError) as info:
        hookwise.apply(model, hookwise.Offload(onload_device="cpu", offload_device="cpu"))
    message = str(info.value)
    assert "Offload cannot be applied after DataParallel" in message
    assert "fsdp" in message and "FSDP2" in message and "offloading moves the weights" in message
    assert hookwise.applied(model).names() == ["data_parallel"]
    assert hookwise.core.list_hooks(model) == hooks  # no offload hook anywhere
    model(**inputs)  # still runs as sharded


@pytest.mark.parametrize("together", [False, True], ids=["offload-first", "one-call"])
def test_fsdp_refuses_to_shard_an_offloaded_model_in_either_call_shape(together):
    model, _ = _lora_model()
    offload = hookwise.Offload(onload_device="cpu", offload_device="cpu")
    before = _state(model)
    with pytest.raises(CompatibilityError, match="DataParallel cannot be applied after Offload.*FSDP2"):
        if together:
            hookwise.apply(model, hookwise.DataParallel(mode="fsdp"), offload)
        else:
            hookwise.apply(model, offload)
            hookwise.apply(model, hookwise.DataParallel(mode="fsdp"))
    assert hookwise.applied(model).names() == ([] if together else ["offload"])
    if together:
        assert _state(model) == before


def test_ddp_still_composes_with_offload_in_both_orders():
    for first, second in ((hookwise.DataParallel(), hookwise.Offload(onload_device="cpu", offload_device="cpu")),
                          (hookwise.Offload(onload_device="cpu", offload_device="cpu"), hookwise.DataParallel())):
        model, inputs = _lora_model()
        hookwise.apply(model, first)
        hookwise.apply(model, second)
        assert sorted(hookwise.applied(model).names()) == ["data_parallel", "offload"]
        model(**inputs).sample.square().mean().backward()


def test_the_order_check_asks_each_config_and_names_the_one_applied_first():
    fsdp_dp, ddp = hookwise.DataParallel(mode="fsdp"), hookwise.DataParallel(mode="ddp")
    cast = hookwise.LayerwiseCasting(storage_dtype=torch.float8_e4m3fn)
    with pytest.raises(CompatibilityError, match=r"LayerwiseCasting cannot be applied after DataParallel \(the model has"):
        check_compatible([cast], applied=[fsdp_dp])
    with pytest.raises(CompatibilityError, match=r"DataParallel cannot be applied after LayerwiseCasting \(applied first"):
        check_compatible([fsdp_dp, cast])
    assert check_compatible([cast], applied=[ddp]) and check_compatible([ddp, cast])
    assert check_compatible([hookwise.Checkpointing()], applied=[fsdp_dp])  # what FSDP2 stands is not refused


@pytest.mark.parametrize("fail_at", [2, 3], ids=["second-block", "root"])
def test_a_fully_shard_failing_part_way_leaves_the_model_as_it_was(monkeypatch, fail_at):
    model, inputs = _lora_model()
    with torch.no_grad():
        expected = model(**inputs).sample
    before = _state(model)
    real = fsdp.fully_shard
    calls = []

    def failing(module, **kwargs):
        calls.append(type(module).__name__)
        if len(calls) == fail_at:
            raise RuntimeError("injected: this fully_shard fails")
        return real(module, **kwargs)

    monkeypatch.setattr(fsdp, "fully_shard", failing)
    with pytest.raises(RuntimeError, match="injected"):
        hookwise.apply(model, hookwise.DataParallel(mode="fsdp"))
    assert len(calls) == fail_at  # blocks were sharded before the failure
    assert _state(model) == before  # classes, the same parameter objects and storages, hooks, attributes
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    assert hookwise.applied(model).names() == [] and hookwise.core.list_hooks(model) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=0, atol=0)
    monkeypatch.setattr(fsdp, "fully_shard", real)
    hookwise.apply(model, hookwise.DataParallel(mode="fsdp"))  # shardable again: torch's state was undone too
    assert any(type(p).__name__ == "DTensor" for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-5, atol=1e-6)


def test_a_technique_failing_after_fsdp_in_the_same_apply_undoes_the_sharding(monkeypatch):
    model, _ = _lora_model()
    before = _state(model)

    def broken(model, config):
        raise RuntimeError("injected: CFGParallel fails at apply")

    # CFGParallel's layer is above DataParallel's: it is applied after the sharding, in the same transaction.
    technique = hookwise.core.technique_named("cfg_parallel")
    monkeypatch.setitem(table_module._BY_CONFIG, technique.config_cls, dataclasses.replace(technique, apply=broken))
    with pytest.raises(RuntimeError, match="injected"):
        hookwise.apply(model, hookwise.DataParallel(mode="fsdp"), hookwise.CFGParallel())
    assert _state(model) == before
    assert hookwise.applied(model).names() == []


def test_reports_find_their_hook_on_the_root_only_or_say_what_to_apply():
    model, _ = _lora_model()
    with pytest.raises(ConfigError, match="data_parallel_report: DataParallel is not applied"):
        data_parallel_report(model)
    with pytest.raises(ConfigError, match="cfg_parallel_report: CFGParallel is not applied"):
        cfg_parallel_report(model)
    hookwise.apply(model, hookwise.DataParallel())
    assert data_parallel_report(model)["mode"] == "ddp"
    hook = hook_on(model, "hookwise.data_parallel", DataParallelHook, technique="DataParallel", caller="x")
    assert isinstance(hook, DataParallelHook)
    block = model.get_submodule(hookwise.describe(model).main_towers[0].blocks[0].path)
    with pytest.raises(ConfigError, match="pass the model it was applied to"):
        data_parallel_report(block)
