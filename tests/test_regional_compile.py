"""Regional compile as a technique: each main-tower block compiled, one compile per block class, composing
with offloading, casting, a step cache and Kernels without recompiling from step to step (training and
sampling), and removed back to eager exactly.

Most tests compile with the `aot_eager` backend (AOTAutograd's joint graph, no code generated: results
bitwise those of eager, fast on any CPU) and count dynamo's unique graphs; one test generates code with
inductor. After the warm-up calls (each block class once with and once without gradients)
`error_on_recompile` is on: a guard failing from one call to the next raises.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import hookwise
from hookwise import Compile, FirstBlockCache, Kernels, LayerwiseCasting, Offload, compiled_blocks
from hookwise.core.outputs import sample_of
from hookwise.errors import ConfigError, NoTargetError
from cache_helpers import build, denoise, fresh_dynamo, no_recompiles, one_thread  # noqa: F401 - fixtures
from model_helpers import tiny_musubi, tiny_wan
from offload_helpers import add_lora, assert_same, fwd_bwd

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def sample(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return sample_of(model(**inputs), "test").clone()


@pytest.mark.parametrize("build_model", [tiny_musubi, tiny_wan], ids=["musubi", "wan"])
def test_blocks_compile_once_per_class_train_and_sample_exactly_and_removal_restores_eager(build_model):
    model, inputs = build_model()
    add_lora(model)
    expected_step, expected_sample = fwd_bwd(copy.deepcopy(model), inputs), sample(copy.deepcopy(model), inputs)
    before = graphs()
    paths = hookwise.apply_compile(model, Compile(backend="aot_eager"))
    blocks = [b.path for t in hookwise.describe(model).main_towers for b in t.blocks]
    assert paths == blocks
    assert_same(fwd_bwd(model, inputs), expected_step)
    assert torch.equal(sample(model, inputs), expected_sample)
    compiled = graphs() - before
    # Blocks of a class share graphs: one per grad mode and per input signature (the first block's
    # input needs no gradient in training, the next ones' do), never one per block.
    assert 0 < compiled < 2 * len(paths)
    with no_recompiles():
        for _ in range(2):
            assert_same(fwd_bwd(model, inputs), expected_step)
            assert torch.equal(sample(model, inputs), expected_sample)
    assert graphs() - before == compiled
    hookwise.remove(model)
    assert compiled_blocks(model) == []
    assert all(m._compiled_call_impl is None for m in model.modules())
    with torch.compiler.set_stance("fail_on_recompile"):  # eager again: nothing is compiled or run compiled
        assert_same(fwd_bwd(model, inputs), expected_step)


def test_training_stack_with_casting_offload_kernels_and_compile_does_not_recompile():
    model, inputs = tiny_musubi()
    add_lora(model)
    plain = copy.deepcopy(model)
    base = (LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), Offload(onload_device="cpu"))
    hookwise.apply(plain, *base)
    expected = fwd_bwd(plain, inputs)
    hookwise.apply(model, *base, Kernels(backend="eager"), Compile(backend="aot_eager"))
    for _ in range(2):  # the first call is checked against the map eagerly; the second compiles
        out, grads = fwd_bwd(model, inputs)
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
    compiled = graphs()
    with no_recompiles():
        for _ in range(2):
            out, grads = fwd_bwd(model, inputs)
            torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
            for k, v in expected[1].items():
                torch.testing.assert_close(grads[k], v, rtol=1e-5, atol=1e-6)
    assert graphs() == compiled > 0
    assert hookwise.offload_report(model).stats["loads"] > 0


def test_sampling_stack_with_a_step_cache_kernels_and_compile_does_not_recompile():
    model, inputs = build("musubi")
    configs = (LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), Offload(onload_device="cpu"),
               FirstBlockCache(threshold=0.3))
    eager = copy.deepcopy(model)
    hookwise.apply(eager, *configs)
    expected = denoise(eager, "musubi", inputs, steps=8)
    hookwise.apply(model, *configs, Kernels(backend="eager"), Compile(backend="aot_eager"))
    denoise(model, "musubi", inputs, steps=8)  # compiles each block class, takes computed and cached steps
    compiled = graphs()
    with no_recompiles():
        second = denoise(model, "musubi", inputs, steps=8)
    assert graphs() == compiled > 0
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)


def test_inductor_generated_blocks_match_eager():
    model, inputs = tiny_musubi()
    expected = sample(copy.deepcopy(model), inputs)
    hookwise.apply(model, Compile())  # inductor: C++ kernels on the CPU
    for _ in range(2):
        torch.testing.assert_close(sample(model, inputs), expected, rtol=1e-4, atol=1e-5)
    assert graphs() >= 2


def test_blocks_compiled_by_hand_are_refused_and_nothing_changes():
    model, _ = tiny_musubi()
    model.double_blocks[0].compile(backend="aot_eager")
    with pytest.raises(ConfigError, match=r"\['double_blocks.0'\] are compiled already"):
        hookwise.apply(model, Compile(backend="aot_eager"))
    assert model.double_blocks[1]._compiled_call_impl is None and compiled_blocks(model) == []


def test_a_model_without_towers_raises():
    with pytest.raises(NoTargetError, match="no tower blocks"):
        hookwise.apply(nn.Linear(4, 4), Compile(backend="aot_eager"))


def test_config_is_validated_and_round_trips():
    with pytest.raises(ConfigError, match="not a torch.compile mode"):
        Compile(mode="fastest")
    with pytest.raises(ConfigError, match="dynamic="):
        Compile(dynamic="yes")
    config = Compile(mode="max-autotune-no-cudagraphs", dynamic=None, fullgraph=True)
    assert Compile.from_dict(config.to_dict()) == config
