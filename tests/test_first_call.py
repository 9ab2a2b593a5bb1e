"""The first real call of a hooked model is checked against the model map before its result returns.

A wrong map (a container taken for a block, a block or attention module the model never calls, a
tower run out of order) raises `MapMismatchError` at that call, under every technique family; a
right map, stated or found, runs and leaves no trace of the check behind. Stated maps are kept on the
model (`describe` reads them) and in a saved stack.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hookwise
from hookwise import MapMismatchError, Stack
from hookwise.core import list_hooks
from hookwise.introspect import CallRecorder, trace_calls
from hookwise.stack import FIRST_CALL_CHECK

from offload_helpers import Reordered, strict
from model_helpers import tiny_musubi


# ---- models of each shape -------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))
        self.to_out = nn.Linear(width, width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.ff(x)


class Nested(nn.Module):
    """Towers inside containers: a ModuleList of ModuleDicts (or Sequentials) that hold the block lists."""

    def __init__(self, width: int = 16, kind: str = "dict") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(width, width)
        wrap = (lambda blocks: nn.ModuleDict({"blocks": blocks})) if kind == "dict" else nn.Sequential
        self.stages = nn.ModuleList([wrap(nn.ModuleList([Block(width) for _ in range(2)])) for _ in range(2)])
        self.proj_out = nn.Linear(width, width)
        self.kind = kind

    def tower(self, i: int) -> nn.ModuleList:
        return self.stages[i]["blocks"] if self.kind == "dict" else self.stages[i][0]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x) + timestep[:, None, None]
        for i in range(len(self.stages)):
            for block in self.tower(i):
                x = block(x)
        return self.proj_out(x)

    def right_towers(self) -> list[str]:
        inner = "blocks" if self.kind == "dict" else "0"
        return [f"stages.{i}.{inner}" for i in range(len(self.stages))]


class UnusedTower(nn.Module):
    """Two towers of the same depth, one of them defined but never called (a refiner left in a checkpoint)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(width, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(3)])
        self.refiner_blocks = nn.ModuleList([Block(width) for _ in range(3)])
        self.proj_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x) + timestep[:, None, None]
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


def inputs_for(batch: int = 1, width: int = 16, t: float = 0.9) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(batch, 8, width, generator=g), timestep=torch.full((batch,), t))


def plain_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def leftover_torch_hooks(model: nn.Module) -> list[str]:
    return [
        path
        for path, m in model.named_modules()
        if m._forward_pre_hooks or m._forward_hooks or m._forward_hooks_always_called
    ]


OFFLOAD = dict(onload_device="cpu", offload_device="cpu", granularity="block")

# technique family -> a config that targets the map's blocks or attention modules
FAMILIES = {
    "block_cache": lambda: hookwise.FirstBlockCache(threshold=10.0),
    "attention_cache": lambda: hookwise.PyramidAttentionBroadcast(spatial_range=2),
    "offload": lambda: hookwise.Offload(**OFFLOAD),
    "layer_skip": lambda: hookwise.LayerSkip(blocks=(-1,)),  # the last main block
}


# ---- a wrong map raises at the first call ------------------------------------------------------------
@pytest.mark.parametrize("family", ["block_cache", "offload", "layer_skip"])
@pytest.mark.parametrize("kind", ["dict", "sequential"])
def test_containers_stated_as_the_tower_raise_at_the_first_call(family, kind):
    model = Nested(kind=kind).eval()
    hookwise.apply(model, FAMILIES[family](), towers=["stages"])  # the containers, never called
    with pytest.raises(MapMismatchError) as info:
        with torch.no_grad():
            model(**inputs_for())
    message = str(info.value)
    assert "block 'stages.1' of tower 'stages' never ran" in message
    assert repr(model.right_towers()) in message  # how to say what the map should be
    assert "towers=[...]" in message


@pytest.mark.parametrize("family", ["block_cache", "offload", "layer_skip"])
def test_a_tower_that_is_never_called_raises_at_the_first_call(family):
    model = UnusedTower().eval()
    hookwise.apply(model, FAMILIES[family]())
    with pytest.raises(MapMismatchError, match=r"refiner_blocks\.\d' of tower 'refiner_blocks' never ran"):
        with torch.no_grad():
            model(**inputs_for())


def test_attention_modules_the_blocks_never_call_raise_under_an_attention_cache():
    model, inputs = tiny_musubi()  # its blocks compute attention inline; `img_attn` only holds weights
    hookwise.apply(model, FAMILIES["attention_cache"]())
    with pytest.raises(MapMismatchError, match="attention module 'double_blocks.0.img_attn' never ran"):
        with torch.no_grad():
            model(**inputs)


class Projections(nn.Module):
    """Named and built like an attention module, but it only projects: its block computes attention."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.to_q(x), self.to_k(x), self.to_v(x)


class ProjectingBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Projections(width)
        self.ff = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn(self.norm(x))
        x = x + self.attn.to_out(F.scaled_dot_product_attention(q, k, v))
        return x + self.ff(x)


class ProjectingModel(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([ProjectingBlock(width) for _ in range(3)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = x + timestep[:, None, None]
        for block in self.blocks:
            x = block(x)
        return x


def test_an_attention_module_that_runs_but_computes_no_attention_raises_under_an_attention_cache():
    model = ProjectingModel().eval()
    assert "blocks.0.attn" in {a.path for a in hookwise.describe(model).attention}  # the static guess
    hookwise.apply(model, FAMILIES["attention_cache"]())
    with pytest.raises(MapMismatchError, match="'blocks.0.attn' ran, but no attention was computed inside it"):
        with torch.no_grad():
            model(**inputs_for())


def test_attention_computed_by_a_kernel_the_watch_does_not_know_is_not_judged(monkeypatch):
    """A model calling an attention kernel hookwise cannot see (flash-attn's, directly) is not refused."""
    model = Nested().eval()

    def unknown_kernel(q, k, v):  # what flash_attn_func is to the watch: no sdpa, no softmax
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).exp()
        return (weights / weights.sum(-1, keepdim=True)) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: unknown_kernel(q, k, v))
    expected = plain_output(model, inputs_for())
    hookwise.apply(model, hookwise.PyramidAttentionBroadcast(spatial_range=2), towers=model.right_towers())
    out = plain_output(model, inputs_for())
    assert torch.allclose(out, expected, atol=1e-6)


def test_a_stated_attention_module_that_never_runs_raises_under_an_attention_cache():
    model = Nested().eval()
    hookwise.apply(model, FAMILIES["attention_cache"](), attention=["stages.0", "stages.1"])
    with pytest.raises(MapMismatchError, match="attention module 'stages.0' never ran"):
        with torch.no_grad():
            model(**inputs_for())


def test_a_tower_run_out_of_order_raises_under_a_block_cache():
    model = Reordered().eval()  # `second` runs backwards
    hookwise.apply(model, hookwise.FirstBlockCache(threshold=10.0), towers=["second", "first"])
    with pytest.raises(MapMismatchError, match="ran outside its tower's order"):
        with torch.no_grad():
            model(torch.randn(1, 4, 16))


def test_a_tower_run_out_of_order_is_fine_for_offloading_which_follows_the_order_blocks_run_in():
    model = Reordered().eval()
    x = torch.randn(1, 4, 16)
    reference = plain_output(model, {"x": x})
    hookwise.apply(model, hookwise.Offload(**OFFLOAD))
    strict(model)
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    assert FIRST_CALL_CHECK not in list_hooks(model)[""]


def test_offload_with_a_wrong_map_raises_instead_of_returning_a_result_of_unloaded_weights():
    model = Nested().eval()
    inputs = inputs_for()
    hookwise.apply(model, hookwise.Offload(**OFFLOAD), towers=["stages"])
    strict(model)  # an unloaded streamed weight is empty: computing with one gives NaN, never a real value
    with pytest.raises(MapMismatchError, match="offloaded weights are never loaded"):
        with torch.no_grad():
            model(**inputs)


def test_the_check_stays_after_a_wrong_first_call_so_no_later_call_returns_a_wrong_result():
    model = Nested().eval()
    hookwise.apply(model, hookwise.Offload(**OFFLOAD), towers=["stages"])
    for _ in range(2):
        with pytest.raises(MapMismatchError):
            with torch.no_grad():
                model(**inputs_for())
    assert FIRST_CALL_CHECK in list_hooks(model)[""]
    hookwise.remove(model)
    assert list_hooks(model) == {} and "forward" not in vars(model)


# ---- a right map runs, and the check is gone after the first call -------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_stated_right_map_runs_and_the_check_leaves_after_the_first_call(family):
    model = Nested().eval()
    inputs = inputs_for()
    reference = plain_output(model, inputs)
    hookwise.apply(model, FAMILIES[family](), towers=model.right_towers())
    assert list_hooks(model)[""][0] == FIRST_CALL_CHECK  # outermost
    if family == "offload":
        strict(model)
    with torch.no_grad():
        first = model(**inputs)
    after_first = list_hooks(model)
    assert FIRST_CALL_CHECK not in after_first[""]
    assert leftover_torch_hooks(model) == []  # the recorder is gone
    with torch.no_grad():
        model(**inputs)
    assert list_hooks(model) == after_first  # later calls add no hook
    if family in ("offload", "block_cache", "attention_cache"):  # exact on a run's first step
        assert torch.equal(first, reference)


def test_offload_with_a_right_towers_override_equals_the_plain_model_forward_and_backward():
    model = Nested().eval()
    inputs = inputs_for()
    reference = model(**inputs)
    (reference**2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    hookwise.apply(model, hookwise.Offload(**OFFLOAD), towers=model.right_towers())
    strict(model)
    out = model(**inputs)  # the first call, checked, with autograd on
    (out**2).mean().backward()
    assert torch.equal(out, reference)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_models_the_map_finds_right_are_checked_and_pass():
    model = Nested().eval()
    inputs = inputs_for()
    reference = plain_output(model, inputs)
    hookwise.apply(model, hookwise.Offload(**OFFLOAD), hookwise.FirstBlockCache(threshold=10.0))
    strict(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), reference)
    assert FIRST_CALL_CHECK not in list_hooks(model)[""]


def test_techniques_on_leaves_only_install_no_check():
    model = Nested().eval()
    hookwise.apply(model, hookwise.LayerwiseCasting(storage_dtype=torch.bfloat16))
    assert FIRST_CALL_CHECK not in list_hooks(model).get("", [])


def test_a_later_apply_checks_the_next_call_again():
    model = Nested().eval()
    hookwise.apply(model, hookwise.Offload(**OFFLOAD))
    with torch.no_grad():
        model(**inputs_for())
    hookwise.apply(model, hookwise.LayerSkip(blocks=(1,)))
    assert list_hooks(model)[""][0] == FIRST_CALL_CHECK
    with torch.no_grad():
        model(**inputs_for())
    assert FIRST_CALL_CHECK not in list_hooks(model)[""]


def test_a_cache_applied_in_the_middle_of_a_run_computes_its_checked_first_call():
    # The first call a cache sees need not be a run's first step; it has stored nothing yet, so it
    # computes every block, and the checked call returns the exact result.
    model = Nested().eval()
    hookwise.apply(model, hookwise.Offload(**OFFLOAD))
    with torch.no_grad():
        for t in (0.9, 0.8, 0.7):
            model(**inputs_for(t=t))
    assert hookwise.get_run_state(model).step > 0
    hookwise.apply(model, hookwise.FirstBlockCache(threshold=1e9))  # would reuse anything it had stored
    inputs = inputs_for(t=0.6)
    with torch.no_grad():
        out = model(**inputs)
    hookwise.remove(model)
    assert torch.equal(out, plain_output(model, inputs))


# ---- the stated map is kept on the model and in a saved stack -----------------------------------------
def test_describe_returns_the_map_stated_at_apply_until_everything_is_removed():
    model = Nested(kind="sequential").eval()
    towers = model.right_towers()
    hookwise.apply(model, hookwise.FirstBlockCache(threshold=10.0), towers=towers)
    stated = hookwise.describe(model)
    assert stated.overrides == {"towers": tuple(towers)}
    assert [t.container for t in stated.towers] == towers
    assert hookwise.applied(model).map == {"towers": tuple(towers)}
    hookwise.remove(model)
    assert hookwise.describe(model).overrides == {}


def test_a_stack_saved_with_its_map_reapplies_with_it():
    model = Nested().eval()
    inputs = inputs_for()
    reference = plain_output(model, inputs)
    stack = hookwise.apply(model, hookwise.Offload(**OFFLOAD), towers=model.right_towers())
    text = stack.to_json()
    assert '"map"' in text
    loaded = Stack.from_json(text)
    assert loaded == stack and loaded.map == {"towers": tuple(model.right_towers())}

    fresh = Nested().eval()
    loaded.apply(fresh)
    assert hookwise.describe(fresh).overrides == {"towers": tuple(fresh.right_towers())}
    strict(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs), reference)
    assert FIRST_CALL_CHECK not in list_hooks(fresh)[""]


def test_a_stack_without_a_map_saves_as_before():
    stack = Stack(hookwise.FirstBlockCache(threshold=10.0))
    assert "map" not in stack.to_dict()
    assert Stack.from_dict(stack.to_dict()) == stack


def test_a_second_map_on_a_model_with_techniques_is_refused():
    model = Nested().eval()
    hookwise.apply(model, hookwise.FirstBlockCache(threshold=10.0), towers=model.right_towers())
    with pytest.raises(hookwise.ConfigError, match="a model has one map"):
        hookwise.apply(model, hookwise.LayerSkip(blocks=(1,)), towers=["stages"])
    hookwise.apply(model, hookwise.LayerSkip(blocks=(1,)), towers=model.right_towers())  # the same map
    assert len(hookwise.applied(model)) == 2


def test_a_failed_apply_keeps_no_stated_map():
    model = Nested().eval()
    with pytest.raises(hookwise.HookwiseError):
        hookwise.apply(model, hookwise.LayerSkip(blocks=(99,)), towers=model.right_towers())
    assert hookwise.describe(model).overrides == {}
    assert list_hooks(model) == {} and "forward" not in vars(model)


def test_stated_paths_are_checked_and_stacks_with_two_maps_refused():
    model = Nested().eval()
    with pytest.raises(hookwise.ConfigError, match="no module 'stagez'"):
        hookwise.apply(model, hookwise.FirstBlockCache(), towers=["stagez"])
    with pytest.raises(hookwise.ConfigError, match="list of module paths"):
        hookwise.apply(model, hookwise.FirstBlockCache(), towers="stages")
    a = Stack(hookwise.FirstBlockCache(), towers=["a"])
    with pytest.raises(hookwise.ConfigError, match="one map"):
        Stack(a, hookwise.LayerSkip(blocks=(1,)), towers=["b"])


# ---- the recorder ----------------------------------------------------------------------------------
def test_the_recorder_watches_a_real_call_and_leaves_no_hook():
    model = Nested().eval()
    inputs = inputs_for()
    recorder = CallRecorder(model)
    with recorder:
        out = model(**inputs)  # with autograd on, as the caller has it
    assert out.requires_grad
    assert leftover_torch_hooks(model) == []
    traced = trace_calls(model, inputs)
    assert recorder.trace.order == traced.order
    assert recorder.trace.attention == traced.attention
    assert "stages.0.blocks.1.attn" in recorder.trace.attention


def test_the_recorder_closes_when_the_call_raises_and_reports_a_misuse():
    model = Nested().eval()
    recorder = CallRecorder(model, attention=False)
    with pytest.raises(RuntimeError):
        with recorder:
            model(torch.randn(1, 8, 3), torch.zeros(1))
    assert leftover_torch_hooks(model) == []
    assert recorder.trace.ran("proj_in") and not recorder.trace.watched_attention
    with pytest.raises(hookwise.ConfigError, match="never opened"):
        CallRecorder(model).trace
