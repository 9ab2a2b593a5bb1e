"""ComponentOffload: in a pipeline of several models only the ones in use sit on the device."""

import pytest
import torch
from torch import nn

import hookwise
from hookwise.core import list_hooks
from hookwise.errors import CompatibilityError, ConfigError
from hookwise.memory import (
    ComponentOffload,
    Offload,
    apply_component_offload,
    apply_offload,
    components_on_device,
    remove_component_offload,
)
from model_helpers import mlp, output_of, tiny_musubi


class Encoder(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))

    def forward(self, x):
        return self.body(self.embed(x))


class Vae(nn.Module):
    """Used through a method other than forward, as pipelines use `vae.decode`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.decoder = nn.Linear(16, 4)

    def decode(self, z):
        return self.decoder(z)


def pipeline_parts():
    return {"text_encoder": Encoder(1), "text_encoder_2": Encoder(2), "transformer": mlp(16, 3), "vae": Vae()}


def run(parts, x):
    a = parts["text_encoder"](x)
    b = parts["text_encoder_2"](x)
    return parts["vae"].decode(parts["transformer"](a + b))


def test_only_the_component_in_use_is_on_the_device():
    parts = pipeline_parts()
    x = torch.randn(2, 8)
    expected = run(parts, x)
    order = apply_component_offload(parts, ComponentOffload(onload_device="cpu"))
    assert order == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert components_on_device(parts) == []
    seen = []
    for name in order:
        first_linear = next(m for m in parts[name].modules() if isinstance(m, nn.Linear))
        first_linear.register_forward_hook(lambda m, a, out: seen.append(components_on_device(parts)))
    out = run(parts, x)
    assert torch.equal(out, expected)
    # vae.decode is not its forward: calling its child counts as using it.
    assert seen == [["text_encoder"], ["text_encoder_2"], ["transformer"], ["vae"]]
    for _ in range(2):
        assert torch.equal(run(parts, x), expected)


def test_keep_together_lets_listed_components_share_the_device():
    parts = pipeline_parts()
    x = torch.randn(2, 8)
    expected = run(parts, x)
    apply_component_offload(parts, onload_device="cpu", keep_together=(("text_encoder", "text_encoder_2"),))
    parts["text_encoder"](x)
    parts["text_encoder_2"](x)
    assert components_on_device(parts) == ["text_encoder", "text_encoder_2"]
    parts["transformer"](torch.randn(2, 16))
    assert components_on_device(parts) == ["transformer"]
    assert torch.equal(run(parts, x), expected)


def test_pipeline_order_comes_from_model_cpu_offload_seq_and_remove_restores_everything():
    class FakePipeline:
        model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

        def __init__(self):
            self.parts = pipeline_parts()
            self.tokenizer = object()

        @property
        def components(self):
            return {"vae": self.parts["vae"], "tokenizer": self.tokenizer, **{k: v for k, v in self.parts.items() if k != "vae"}}

    pipe = FakePipeline()
    x = torch.randn(2, 8)
    expected = run(pipe.parts, x)
    state = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in pipe.parts.items()}
    assert apply_component_offload(pipe, ComponentOffload(onload_device="cpu")) == [
        "text_encoder", "text_encoder_2", "transformer", "vae"
    ]
    with pytest.raises(CompatibilityError, match="already applied"):
        apply_component_offload(pipe, ComponentOffload(onload_device="cpu"))
    assert torch.equal(run(pipe.parts, x), expected)
    remove_component_offload(pipe)
    for name, module in pipe.parts.items():
        assert list_hooks(module) == {}
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[name][k])
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size()


def test_changes_made_while_a_component_is_on_the_device_are_kept():
    parts = pipeline_parts()
    plain = pipeline_parts()
    x = torch.randn(2, 8)
    apply_component_offload(parts, onload_device="cpu")
    parts["transformer"](torch.randn(2, 16))
    with torch.no_grad():
        for p in (parts, plain):
            p["transformer"][0].weight.mul_(3)
    run(parts, x)  # moves the transformer off and on again
    assert torch.equal(run(parts, x), run(plain, x))


def test_a_component_with_its_own_offload_is_left_alone_and_offload_cannot_join_later():
    parts = pipeline_parts()
    model, inputs = tiny_musubi()
    expected = output_of(model, inputs)
    apply_offload(model, Offload(onload_device="cpu", granularity="block"))
    parts["dit"] = model
    apply_component_offload(parts, onload_device="cpu")
    assert torch.equal(output_of(model, inputs), expected)
    assert "dit" not in components_on_device(parts)
    with pytest.raises(CompatibilityError, match="ComponentOffload"):
        apply_offload(parts["transformer"], Offload(onload_device="cpu", granularity="leaf"))


def test_unknown_component_names_and_bad_configs_are_clear_errors():
    parts = pipeline_parts()
    with pytest.raises(ConfigError, match=r"unknown component\(s\) \['unet'\]"):
        apply_component_offload(parts, onload_device="cpu", order=("unet",))
    assert all(list_hooks(m) == {} for m in parts.values())
    with pytest.raises(ConfigError, match="at least two"):
        ComponentOffload(keep_together=(("vae",),))
    with pytest.raises(ConfigError, match="twice"):
        ComponentOffload(order=("vae", "vae"))
    with pytest.raises(ConfigError, match="a diffusers pipeline"):
        apply_component_offload(42, onload_device="cpu")


def test_hookwise_apply_on_a_module_of_components():
    holder = nn.ModuleDict(pipeline_parts())
    x = torch.randn(2, 8)
    expected = run(holder, x)
    hookwise.apply(holder, ComponentOffload(onload_device="cpu"))
    assert torch.equal(run(holder, x), expected)
    assert components_on_device(holder) == ["vae"]
    assert hookwise.remove(holder) == ["component_offload"]
    assert list_hooks(holder) == {}
    assert torch.equal(run(holder, x), expected)
