"""Hooks and torch.compile: hooks applied before or after compiling give the eager result."""

import torch
from torch import nn

from hookwise.core import Layer, ModelHook, add_hook, list_hooks, remove_hook


class ScaleOutput(ModelHook):
    def __init__(self, c):
        self.c = c

    def post_forward(self, module, output):
        return output * self.c


class AddInput(ModelHook):
    layer = Layer.CAST

    def pre_forward(self, module, args, kwargs):
        return (args[0] + 1.0,), kwargs


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))


def eager_expected(model, x):
    h = nn.functional.linear(x + 1.0, model[0].weight, model[0].bias)
    return 2.0 * model[2](model[1](h))


def test_compiled_hooked_module_matches_eager_with_inductor():
    model = make()
    add_hook(model, ScaleOutput(2.0), "scale")
    add_hook(model[0], AddInput(), "add")
    x = torch.randn(4, 8)
    eager = model(x)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), eager)
    torch.testing.assert_close(eager, eager_expected(model, x))


def test_hooks_added_after_compile_take_effect_and_removal_restores():
    model = make()
    x = torch.randn(4, 8)
    plain = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), plain)
    add_hook(compiled, ScaleOutput(2.0), "scale")  # through the compile wrapper, onto the model
    add_hook(model[0], AddInput(), "add")
    assert list_hooks(model) == {"": ["scale"], "0": ["add"]}
    torch.testing.assert_close(compiled(x), eager_expected(model, x))
    remove_hook(compiled, "scale")
    remove_hook(model[0], "add")
    torch.testing.assert_close(compiled(x), plain)


def test_in_place_module_compile_with_hooks_on_children():
    model = make()
    x = torch.randn(4, 8)
    add_hook(model[0], AddInput(), "add")
    expected = model[2](model[1](nn.functional.linear(x + 1.0, model[0].weight, model[0].bias)))
    model.compile(backend="aot_eager")
    torch.testing.assert_close(model(x), expected)
    remove_hook(model[0], "add")
    torch.testing.assert_close(model(x), model[2](model[1](nn.Linear.forward(model[0], x))))


def test_regionally_compiled_blocks_keep_their_hooks():
    model = make()
    x = torch.randn(4, 8)
    add_hook(model, ScaleOutput(2.0), "scale")
    add_hook(model[0], AddInput(), "add")
    expected = eager_expected(model, x)
    for block in (model[0], model[2]):
        block.compile(backend="aot_eager")
    torch.testing.assert_close(model(x), expected)
