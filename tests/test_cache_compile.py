"""Regionally compiled blocks (each block compiled on its own) under every cache: no recompiles between steps.

Counted with dynamo's CompileCounter backend (it compiles nothing, so this runs on any CPU). After a
first run (which compiles each block class once and takes both the computed and the cached paths)
`error_on_recompile` is set: a guard that fails from one step to the next then raises. The cache
hooks run eagerly next to the compiled blocks; their state (steps, branches, cached tensors) never
becomes a guard. Identical blocks share one graph.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import hookwise
from hookwise import (
    DualBlockCache,
    FasterCache,
    FirstBlockCache,
    Forecast,
    LayerSkip,
    MagCache,
    PyramidAttentionBroadcast,
    TaylorSeer,
    TeaCache,
)

from hookwise.cache import cache_stats

from cache_helpers import build, compile_blocks, denoise, fresh_dynamo, no_recompiles, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")



CASES = {
    "forecast": ("musubi", [Forecast(num_steps=8, schedule=(0, 1, 3, 6), order=2)]),
    "forecast_verify": ("wan", [Forecast(num_steps=8, schedule=(0, 3, 6), verify=0.1)]),
    "forecast_foca_input_probe": ("wan", [Forecast(num_steps=8, schedule=(0, 3, 6), verify=0.1, probe="input", predictor="foca")]),
    "first_block": ("musubi", [FirstBlockCache(threshold=0.3)]),
    "dual_block+taylorseer": ("musubi", [DualBlockCache(threshold=0.3, warmup=1, max_cached=2), TaylorSeer(order=2)]),
    "taylorseer": ("musubi", [TaylorSeer(order=2, interval=2, warmup=1)]),
    "magcache": ("musubi", [MagCache(ratios=(1.0, 1.01, 1.0, 0.99, 1.0, 1.01, 1.0, 0.99), threshold=0.5, retention=0.1)]),
    "teacache": ("musubi", [TeaCache(threshold=0.5)]),
    "layer_skip": ("musubi", [LayerSkip(blocks=(1, 3))]),
    "taylorseer_attention": ("wan", [TaylorSeer(order=2, interval=2, warmup=2, targets="attention")]),
    "pab": ("wan", [PyramidAttentionBroadcast(spatial_range=2, cross_range=3, spatial_window=None, cross_window=None)]),
    "faster_cache": ("wan", [FasterCache(attention_range=2, attention_window=None, uncond_range=2, uncond_window=None)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_blocks_do_not_recompile_from_step_to_step(case):
    name, configs = CASES[case]
    model, inputs = build(name)
    eager = copy.deepcopy(model)
    hookwise.apply(eager, *configs)
    expected = denoise(eager, name, inputs, steps=8)

    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    hookwise.apply(model, *configs)
    frames = []
    denoise(model, name, inputs, steps=8, record=frames)
    after_first_run = counter.frame_count
    with no_recompiles():
        second = denoise(model, name, inputs, steps=8)  # a new run: state resets, same graphs
    assert counter.frame_count == after_first_run > 0
    if name == "musubi":  # block caches: one graph per block class (double, single), shared by its blocks
        assert counter.frame_count == 2
    # attention caches decide in the middle of a block: its graph breaks around each hooked attention
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)


def test_frames_stop_growing_after_the_first_steps_of_a_run():
    model, inputs = build("musubi")
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    hookwise.apply(model, DualBlockCache(threshold=0.3, warmup=1, max_cached=2))

    class FrameCounts(list):  # denoise() appends each step's prediction; keep the frame count instead
        def append(self, _):
            super().append(counter.frame_count)

    counts = FrameCounts()
    denoise(model, "musubi", inputs, steps=12, record=counts)
    cached = cache_stats(model)["dual_block_cache"]["branches"]["cond"]["cached"]
    assert cached >= 3  # both paths (computed and cached steps) were taken
    assert len(set(counts[2:])) == 1, counts
