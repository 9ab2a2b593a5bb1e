"""Offloading under torch.compile: blocks compiled one by one run on streamed weights, exactly, without
recompiling from step to step, in training (LoRA, forward + backward) and in sampling.

The backend is dynamo's counting wrapper around `aot_eager`: AOTAutograd builds the same joint graph
and saved-tensor set as inductor would (so the offload's saved-tensor packing is exercised on a
compiled region), but no code is generated, so the results are bitwise those of eager and this runs
on any CPU. After the first calls (which compile each block class once, with and without gradients)
`error_on_recompile` is set: a guard that fails from one call to the next then raises.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import hookwise
from hookwise import LayerwiseCasting, Offload
from hookwise.core.outputs import sample_of
from hookwise.memory import offload_report
from cache_helpers import compile_blocks, fresh_dynamo, no_recompiles, one_thread  # noqa: F401 - fixtures
from offload_helpers import add_lora, assert_same, fwd_bwd
from model_helpers import tiny_musubi, tiny_wan


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


def sample(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return sample_of(model(**inputs), "test").clone()


def offload(tmp_path, where: str, granularity: str = "block") -> Offload:
    disk = dict(offload_device="disk", disk_path=str(tmp_path)) if where == "disk" else dict(offload_device="cpu")
    return Offload(onload_device="cpu", granularity=granularity, **disk)


@pytest.mark.parametrize("build", [tiny_musubi, tiny_wan], ids=["musubi", "wan"])
@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_compiled_blocks_on_streamed_weights_train_and_sample_exactly_without_recompiling(build, where, tmp_path):
    model, inputs = build()
    add_lora(model)
    plain = copy.deepcopy(model)
    expected_step, expected_sample = fwd_bwd(plain, inputs), sample(plain, inputs)

    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(model, backend=counter)
    hookwise.apply(model, offload(tmp_path, where))
    assert_same(fwd_bwd(model, inputs), expected_step)  # the first call is checked against the map, eagerly
    assert_same(fwd_bwd(model, inputs), expected_step)  # compiles (with gradients) and records the order
    assert torch.equal(sample(model, inputs), expected_sample)  # compiles without gradients
    compiled = counter.frame_count
    assert compiled > 0
    with no_recompiles():
        for _ in range(2):
            assert_same(fwd_bwd(model, inputs), expected_step)
            assert torch.equal(sample(model, inputs), expected_sample)
    assert counter.frame_count == compiled
    stats = offload_report(model).stats
    assert stats["prefetch_hits"] > 0  # the weights really streamed, along the recorded order
    if where == "cpu":
        assert stats["loads"] > stats["passes"]  # groups took turns in the slots


def test_fp8_casting_offload_lora_and_compiled_blocks_stack(tmp_path):
    model, inputs = tiny_musubi()
    add_lora(model)
    eager = copy.deepcopy(model)
    hookwise.apply(eager, LayerwiseCasting(storage_dtype=torch.float8_e4m3fn))
    expected = fwd_bwd(eager, inputs)

    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(model, backend=counter)
    hookwise.apply(model, LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), Offload(onload_device="cpu"))
    for _ in range(2):  # the first call is checked against the map, eagerly; the second compiles
        assert_same(fwd_bwd(model, inputs), expected)
    compiled = counter.frame_count
    with no_recompiles():
        assert_same(fwd_bwd(model, inputs), expected)
    assert counter.frame_count == compiled > 0
    hookwise.remove(model)
    assert_same(fwd_bwd(model, inputs), expected)  # the fp8 rounding stays (documented), values intact


def test_leaf_offload_under_compiled_blocks_is_exact(tmp_path):
    # Leaf hooks run between the leaves of a compiled block, so its graph breaks at every leaf; the
    # values stay exact (with block granularity the block is one graph).
    model, inputs = tiny_musubi()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    compile_blocks(model, backend=CompileCounterWithBackend("aot_eager"))
    hookwise.apply(model, offload(tmp_path, "cpu", "leaf"))
    for _ in range(2):
        assert_same(fwd_bwd(model, inputs), expected)
