"""Quantized leaves among other techniques: offloading reads the user's freezing, not quantization's,
and hooks of a lower layer (observers) or forwards set on the instance still run inside a quantized
leaf's hook."""

from __future__ import annotations

import copy

import pytest
import torch

import hookwise
from hookwise import Layer, Offload, Quantize
from hookwise.core.hooks import ModelHook, add_hook
from hookwise.core.marks import user_trainable
from hookwise.memory import LayerwiseCasting, offload_report
from hookwise.quant import quantized_leaves
from model_helpers import output_of, tiny_flux, tiny_wan
from offload_helpers import add_lora

from cache_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = {"flux": tiny_flux, "wan": tiny_wan}


def _trainable_kept(model) -> dict[str, str]:
    return {p: r for p, r in offload_report(model).always_resident.items() if r.startswith("trainable")}


@pytest.mark.parametrize("name", list(MODELS))
def test_sampling_a_quantized_model_streams_what_it_would_stream_without_quantization(name):
    model, inputs = MODELS[name]()  # every parameter requires grad: a model as loaded
    plain = copy.deepcopy(model)
    alone = copy.deepcopy(model)
    hookwise.apply(plain, Offload(onload_device="cpu", granularity="block"))
    hookwise.apply(alone, Quantize("int8-weight"))
    hookwise.apply(model, Quantize("int8-weight"), Offload(onload_device="cpu", granularity="block"))
    assert _trainable_kept(model) == {}
    report, without = offload_report(model), offload_report(plain)
    assert [g.name for g in report.groups] == [g.name for g in without.groups]
    assert report.always_resident == without.always_resident
    assert report.host_bytes < 0.7 * without.host_bytes
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), output_of(alone, inputs))
    weight = model.get_submodule(next(iter(quantized_leaves(model)))).weight
    assert not weight.requires_grad and user_trainable(weight)  # frozen by quantization, not by the user


def test_a_lora_model_under_quantization_keeps_only_the_lora_resident_as_under_casting():
    kept = {}
    for name, storage in (("quant", Quantize("int8-weight")), ("cast", LayerwiseCasting())):
        model, inputs = tiny_flux()
        add_lora(model, ["to_q", "to_k", "to_v"])  # freezes the base: LoRA training
        hookwise.apply(model, storage, Offload(onload_device="cpu", granularity="block"))
        kept[name] = _trainable_kept(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(kept[name]) == trainable and all("lora_" in n for n in trainable), name
        assert trainable
        model.train()
        output_of(model, inputs)  # runs with the adapters resident
    assert set(kept["quant"]) == set(kept["cast"])


def test_a_user_frozen_model_stays_frozen_for_offloading_after_quantization():
    model, _ = tiny_flux()
    model.requires_grad_(False)
    hookwise.apply(model, Quantize("nf4"))
    weight = model.get_submodule(next(iter(quantized_leaves(model)))).weight
    assert not user_trainable(weight)


class Probe(ModelHook):
    layer = Layer.PROBE  # inside every technique: counts the calls that reach the leaf

    def __init__(self) -> None:
        self.n = 0

    def pre_forward(self, module, args, kwargs):
        self.n += 1
        return args, kwargs


@pytest.mark.parametrize("scheme", ["int8-weight", "nf4"])
def test_a_hook_below_quantization_runs_and_the_output_is_unchanged(scheme):
    model, inputs = tiny_flux()
    hookwise.apply(model, Quantize(scheme))
    expected = output_of(model, inputs)
    probes = {path: add_hook(model.get_submodule(path), Probe(), "test.probe") for path in quantized_leaves(model)}
    assert torch.equal(output_of(model, inputs), expected)
    assert all(p.n == 1 for p in probes.values()), {k: p.n for k, p in probes.items() if p.n != 1}
    # gradients flow through the quantized leaves with the observers inside as without them
    grads = []
    for with_probes in (True, False):
        if not with_probes:
            hookwise.core.hooks.remove_hooks(model, lambda name, hook: name == "test.probe")
        x = inputs["hidden_states"].clone().requires_grad_(True)
        model(**{**inputs, "hidden_states": x}).sample.pow(2).sum().backward()
        grads.append(x.grad)
    assert all(p.n == 2 for p in probes.values())
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_a_forward_set_on_a_quantized_leaf_is_computed_and_one_that_skips_the_layer_is_an_error():
    path = "transformer_blocks.0.attn.to_q"
    model, inputs = tiny_flux()
    reference = copy.deepcopy(model)
    hookwise.apply(reference, Quantize("int8-weight"))
    leaf = model.get_submodule(path)
    org_forward = leaf.forward
    leaf.forward = lambda x: org_forward(x) * 2  # a kohya-style adapter around the original forward
    hookwise.apply(model, Quantize("int8-weight"))
    assert path in quantized_leaves(model)
    ref_leaf = reference.get_submodule(path)
    ref_forward = ref_leaf.forward
    ref_leaf.forward = lambda x: ref_forward(x) * 2  # the same adapter over the quantized leaf's hooks
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), output_of(reference, inputs))
    other, _ = tiny_flux()
    other.get_submodule(path).forward = lambda x: x  # never computes the layer: an error, not int8 arithmetic
    hookwise.apply(other, Quantize("int8-weight"))
    with pytest.raises(hookwise.HookError, match="never computes the layer's own operation"):
        output_of(other, inputs)
