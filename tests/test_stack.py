"""Stack: validation before anything is touched, canonical order, all-or-nothing apply, exact remove,
serialization. Uses small techniques registered by the tests themselves."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import hookwise
from hookwise.core import (
    Layer,
    ModelHook,
    TechniqueConfig,
    add_hook,
    current_transaction,
    ledger_of,
    list_hooks,
    run_state_hook,
    register_technique,
    remove_hooks,
    unregister_technique,
)
from hookwise.errors import CompatibilityError, ConfigError
from model_helpers import output_of, tiny_musubi

LOG: list[str] = []


class Tag(ModelHook):
    def __init__(self, tag, layer=Layer.DEFAULT):
        self.tag = tag
        self.layer = layer

    def pre_forward(self, module, args, kwargs):
        LOG.append(self.tag)
        return args, kwargs


@dataclasses.dataclass(frozen=True)
class ScaleBlocks(TechniqueConfig):
    """Multiply every main-tower block's outputs by a factor."""

    factor: float = 1.0

    def validate(self):
        if self.factor <= 0:
            raise ConfigError(f"factor must be positive, got {self.factor}")


class Scale(ModelHook):
    layer = Layer.CACHE

    def __init__(self, factor):
        self.factor = factor

    def post_forward(self, module, output):
        LOG.append("scale")
        if isinstance(output, tuple):
            return tuple(o * self.factor for o in output)
        return output * self.factor


def apply_scale(model, config):
    m = hookwise.describe(model)
    for block in m.blocks:
        add_hook(model.get_submodule(block.path), Scale(config.factor), "test.scale")


def remove_scale(model, config):
    remove_hooks(model, lambda name, hook: name == "test.scale")


@dataclasses.dataclass(frozen=True)
class Trace(TechniqueConfig):
    """Log calls of the root model (innermost layer)."""

    dtype: torch.dtype = torch.bfloat16
    names: tuple[str, ...] = ("a",)


def apply_trace(model, config):
    add_hook(model, Tag("trace", Layer.CAST), "test.trace")


def remove_trace(model, config):
    remove_hooks(model, lambda name, hook: name == "test.trace")


@dataclasses.dataclass(frozen=True)
class Explode(TechniqueConfig):
    """Attaches hooks, changes a weight (recording the undo), then fails."""

    when: str = "after"


def apply_explode(model, config):
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            add_hook(module, Tag("explode"), "test.explode")
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    old = first.weight.data.clone()
    current_transaction().on_rollback(lambda: first.weight.data.copy_(old), "weight")
    with torch.no_grad():
        first.weight.mul_(0)
    raise RuntimeError("explode: simulated failure half-way through")


@dataclasses.dataclass(frozen=True)
class Forever(TechniqueConfig):
    """An irreversible technique."""


@pytest.fixture(autouse=True)
def techniques():
    LOG.clear()
    register_technique("test.scale", ScaleBlocks, apply=apply_scale, remove=remove_scale, layer=Layer.CACHE)
    register_technique(
        "test.trace", Trace, apply=apply_trace, remove=remove_trace, layer=Layer.CAST, conflicts=("test.forever",)
    )
    register_technique("test.explode", Explode, apply=apply_explode, remove=None, layer=Layer.OFFLOAD)
    register_technique("test.forever", Forever, apply=lambda m, c: None, remove=None, layer=Layer.DEFAULT)
    yield
    for name in ("test.scale", "test.trace", "test.explode", "test.forever"):
        unregister_technique(name)


def state_of(model):
    return {path: (set(m.__dict__), m.__dict__.get("forward")) for path, m in model.named_modules()}


def test_apply_in_canonical_order_whatever_the_argument_order():
    model, inputs = tiny_musubi()
    stack = hookwise.apply(model, ScaleBlocks(2.0), Trace())
    assert stack.names() == ["test.trace", "test.scale"]
    assert hookwise.applied(model) == stack
    output_of(model, inputs)
    assert LOG[0] == "trace" and LOG.count("scale") == 5


def test_apply_is_atomic_when_a_technique_fails_half_way():
    model, inputs = tiny_musubi()
    before_state = state_of(model)
    before_out = output_of(model, inputs)
    with pytest.raises(RuntimeError, match="simulated failure"):
        hookwise.apply(model, ScaleBlocks(2.0), Explode())
    assert state_of(model) == before_state
    assert list_hooks(model) == {}
    assert ledger_of(model) is None and hookwise.applied(model).names() == []
    assert torch.equal(output_of(model, inputs), before_out)


def test_a_failed_apply_leaves_earlier_techniques_in_place():
    model, inputs = tiny_musubi()
    hookwise.apply(model, Trace())
    hooks = list_hooks(model)
    with pytest.raises(RuntimeError):
        hookwise.apply(model, ScaleBlocks(2.0), Explode())
    assert list_hooks(model) == hooks
    assert hookwise.applied(model).names() == ["test.trace"]


def test_incompatible_stacks_are_rejected_before_anything_is_touched():
    model, _ = tiny_musubi()
    before = state_of(model)
    with pytest.raises(CompatibilityError, match="cannot be combined"):
        hookwise.apply(model, Trace(), Forever())
    with pytest.raises(CompatibilityError, match="appears twice"):
        hookwise.apply(model, ScaleBlocks(2.0), ScaleBlocks(3.0))
    assert state_of(model) == before
    hookwise.apply(model, Trace())
    with pytest.raises(CompatibilityError, match="cannot be combined"):
        hookwise.apply(model, Forever())  # conflicts with what is already applied
    with pytest.raises(CompatibilityError, match="appears twice"):
        hookwise.apply(model, Trace())


def test_remove_undoes_everything_and_restores_the_model_exactly():
    model, inputs = tiny_musubi()
    before_state = state_of(model)
    before_out = output_of(model, inputs)
    hookwise.apply(model, ScaleBlocks(2.0), Trace())
    assert not torch.equal(output_of(model, inputs), before_out)
    assert hookwise.remove(model) == ["test.scale", "test.trace"]
    assert state_of(model) == before_state
    assert torch.equal(output_of(model, inputs), before_out)
    assert hookwise.remove(model) == []


def test_the_ledger_is_its_own_object_and_goes_with_the_last_technique():
    model, _ = tiny_musubi()
    scale, trace = ScaleBlocks(2.0), Trace()
    hookwise.apply(model, scale, trace)
    assert ledger_of(model).configs == [trace, scale]
    assert not hasattr(run_state_hook(model), "applied")
    hookwise.remove(model, "test.trace")
    assert ledger_of(model).configs == [scale] and run_state_hook(model) is not None
    hookwise.remove(model)
    assert ledger_of(model) is None and run_state_hook(model) is None
    assert not [k for k in vars(model) if k.startswith("_hookwise")]


def test_techniques_are_applied_in_the_order_of_their_registered_layer():
    assert ScaleBlocks.layer == Layer.CACHE and Trace.layer == Layer.CAST
    stack = hookwise.Stack(ScaleBlocks(2.0), Explode(), Trace())
    assert stack.names() == ["test.trace", "test.explode", "test.scale"]


def test_remove_by_name_keeps_the_others_and_rejects_unknown_names():
    model, _ = tiny_musubi()
    hookwise.apply(model, ScaleBlocks(2.0), Trace())
    assert hookwise.remove(model, "test.scale") == ["test.scale"]
    assert hookwise.applied(model).names() == ["test.trace"]
    with pytest.raises(ConfigError, match="not applied"):
        hookwise.remove(model, "test.scale")


def test_irreversible_technique_warns_and_stays():
    model, _ = tiny_musubi()
    hookwise.apply(model, Forever())
    with pytest.warns(UserWarning, match="cannot be undone"):
        assert hookwise.remove(model) == []
    assert hookwise.applied(model).names() == ["test.forever"]


def test_stack_round_trips_through_dict_and_json():
    stack = hookwise.Stack(ScaleBlocks(2.5), Trace(dtype=torch.float8_e4m3fn, names=("x", "y")))
    data = stack.to_dict()
    assert data["techniques"][0] == {"technique": "test.trace", "dtype": "float8_e4m3fn", "names": ["x", "y"]}
    assert hookwise.Stack.from_dict(data) == stack
    again = hookwise.Stack.from_json(stack.to_json())
    assert again == stack
    assert again.configs[0].dtype is torch.float8_e4m3fn and again.configs[0].names == ("x", "y")
    json.loads(stack.to_json())


def test_bad_configs_and_bad_stack_data_raise_clear_errors():
    with pytest.raises(ConfigError, match="factor must be positive"):
        ScaleBlocks(-1.0)
    with pytest.raises(ConfigError, match="no field"):
        ScaleBlocks.from_dict({"technique": "test.scale", "factr": 2})
    with pytest.raises(ConfigError, match="no technique named"):
        hookwise.Stack.from_dict({"format": "hookwise.stack", "version": 1, "techniques": [{"technique": "nope"}]})
    with pytest.raises(ConfigError, match="not a hookwise stack"):
        hookwise.Stack.from_dict({"techniques": []})
    with pytest.raises(ConfigError, match="not a torch dtype"):
        Trace.from_dict({"dtype": "float9"})
    with pytest.raises(ConfigError, match="not a technique config"):
        hookwise.Stack("casting")
    with pytest.raises(ConfigError, match="no technique config"):
        hookwise.apply(nn.Linear(2, 2))

    @dataclasses.dataclass(frozen=True)
    class Unregistered(TechniqueConfig):
        pass

    with pytest.raises(ConfigError, match="not a registered hookwise technique"):
        hookwise.apply(nn.Linear(2, 2), Unregistered())


def test_configs_are_frozen():
    config = ScaleBlocks(2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.factor = 3.0
    assert config.replace(factor=3.0).factor == 3.0
    with pytest.raises(ConfigError):
        config.replace(factor=0.0)


def test_apply_through_a_compiled_wrapper_and_run_state_is_attached():
    model, inputs = tiny_musubi()
    compiled = torch.compile(model, backend="eager")
    hookwise.apply(compiled, ScaleBlocks(1.0))
    state = hookwise.get_run_state(model)
    output_of(compiled, inputs)
    assert state.calls == 1 and state.timestep_value() == pytest.approx(0.7)
    hookwise.remove(compiled)
    assert hookwise.get_run_state(model) is None


@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_removing_casting_under_offloading_applies_offloading_again(granularity):
    """Offloading holds the weights as casting stored them: taking casting away alone must not break it."""
    from hookwise.memory import LayerwiseCasting, Offload

    model, inputs = tiny_musubi()
    offload = Offload(onload_device="cpu", granularity=granularity)
    hookwise.apply(model, offload, LayerwiseCasting(storage_dtype=torch.float8_e4m3fn))
    cast_out = output_of(model, inputs)
    with pytest.warns(UserWarning, match="storage rounding"):
        assert hookwise.remove(model, "casting") == ["casting"]
    assert list(hookwise.applied(model)) == [offload]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(output_of(model, inputs), cast_out, rtol=0, atol=0)


def test_a_ledger_entry_replaced_in_place_keeps_its_position_and_an_unknown_one_is_refused():
    model, _ = tiny_musubi()
    scale, trace, other = ScaleBlocks(2.0), Trace(), ScaleBlocks(3.0)
    hookwise.apply(model, scale, trace)
    ledger_of(model).replace(trace, other)
    assert ledger_of(model).configs == [other, scale]
    with pytest.raises(ConfigError, match="not in this model's ledger"):
        ledger_of(model).replace(trace, scale)
    assert ledger_of(model).configs == [other, scale]
    ledger_of(model).replace(other, trace)
    hookwise.remove(model)
    assert ledger_of(model) is None
