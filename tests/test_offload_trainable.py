"""Which trainable parameters offloading keeps resident with `offload_trainable=None`: those of a
model the user froze part of (LoRA training), not those merely left `requires_grad=True` (every
module's default) in a model that casting froze the weights of."""

from __future__ import annotations

import pytest
import torch

import hookwise
from hookwise.memory import LayerwiseCasting, Offload, offload_report
from model_helpers import output_of, tiny_flux, tiny_wan
from offload_helpers import add_lora

MODELS = {"flux": tiny_flux, "wan": tiny_wan}


def _trainable_kept(model) -> dict[str, str]:
    return {p: r for p, r in offload_report(model).always_resident.items() if r.startswith("trainable")}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_sampling_a_cast_model_streams_what_it_would_stream_without_casting(name, granularity):
    model, inputs = MODELS[name]()  # eval mode, every parameter requires grad: a model as loaded
    assert all(p.requires_grad for p in model.parameters())
    plain, _ = MODELS[name]()
    hookwise.apply(plain, Offload(onload_device="cpu", granularity=granularity))
    cast_only, _ = MODELS[name]()
    hookwise.apply(cast_only, LayerwiseCasting())
    hookwise.apply(model, LayerwiseCasting(), Offload(onload_device="cpu", granularity=granularity))

    assert _trainable_kept(model) == {}
    # The same groups as without casting, each streamed; only the cast weights' bytes differ.
    report, without = offload_report(model), offload_report(plain)
    assert [g.name for g in report.groups] == [g.name for g in without.groups]
    assert report.always_resident == without.always_resident
    assert report.resident == () and report.host_bytes < without.host_bytes
    with torch.no_grad():
        assert torch.equal(output_of(model, inputs), output_of(cast_only, inputs))
    # The parameters casting left trainable are still trainable (offloading changed no flag).
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in cast_only.named_parameters() if p.requires_grad
    }


def test_a_lora_model_under_casting_keeps_its_trainable_parameters_resident():
    model, inputs = tiny_flux()
    add_lora(model, ["to_q", "to_k", "to_v"])  # freezes the base: LoRA training
    norm = "transformer_blocks.0.attn.norm_q.weight"
    model.get_parameter(norm).requires_grad_(True)  # and one more trainable parameter
    hookwise.apply(model, LayerwiseCasting(), Offload(onload_device="cpu", granularity="block"))
    kept = _trainable_kept(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(kept) == trainable and norm in kept and any("lora_A" in n for n in kept)


@pytest.mark.filterwarnings("ignore:hookwise. removing layerwise casting")
def test_a_cast_weight_remembers_the_flag_it_had_and_removal_forgets_it():
    model, _ = tiny_flux()
    model.requires_grad_(False)  # frozen by the user before casting: stays "frozen by the user"
    hookwise.apply(model, LayerwiseCasting())
    weight = model.get_submodule("transformer_blocks.0.attn.to_q").weight
    from hookwise.core.marks import user_trainable

    assert weight.dtype == torch.float8_e4m3fn and not user_trainable(weight)
    hookwise.remove(model)
    model2, _ = tiny_flux()
    hookwise.apply(model2, LayerwiseCasting())
    weight2 = model2.get_submodule("transformer_blocks.0.attn.to_q").weight
    assert not weight2.requires_grad and user_trainable(weight2)
    hookwise.remove(model2)
    restored = model2.get_submodule("transformer_blocks.0.attn.to_q").weight
    assert restored.requires_grad and user_trainable(restored)
