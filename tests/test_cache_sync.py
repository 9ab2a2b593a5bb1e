"""At most one host read per model call for a cache's decision, with the timestep on the device.

CPU tests have no device tensors, so `_host_float` is patched to treat every tensor timestep as
device-resident (as a CUDA timestep would be: reading it costs a sync) and every device-to-host read
(`tolist`, `item`, `float`, `int`, `bool` of a tensor) is counted per model call.
"""

import copy

import pytest
import torch

import hookwise
import hookwise.core.state as state_mod
from hookwise.core.outputs import sample_of
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

from cache_helpers import build, denoise, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "forecast": ("musubi", [Forecast(num_steps=8, schedule=(0, 1, 3, 6), order=2)]),
    "forecast_verify": ("wan", [Forecast(num_steps=8, schedule=(0, 3, 6), verify=0.1)]),
    "forecast_foca_input_probe": ("wan", [Forecast(num_steps=8, schedule=(0, 3, 6), verify=0.1, probe="input", predictor="foca")]),
    "first_block": ("musubi", [FirstBlockCache(threshold=0.2)]),
    "dual_block+taylorseer": ("musubi", [DualBlockCache(threshold=0.2, warmup=1), TaylorSeer(order=2)]),
    "taylorseer": ("musubi", [TaylorSeer(order=1, interval=2, warmup=1)]),
    "magcache": ("musubi", [MagCache(ratios=(1.0, 1.01, 1.0, 0.99, 1.0, 1.01, 1.0, 0.99), threshold=0.5, retention=0.1)]),
    "teacache": ("musubi", [TeaCache(threshold=0.3)]),
    "layer_skip": ("musubi", [LayerSkip(blocks=(2,), steps=(2, 5))]),
    "taylorseer_attention": ("wan", [TaylorSeer(order=2, interval=2, warmup=2, targets="attention")]),
    "pab": ("wan", [PyramidAttentionBroadcast(spatial_range=2, cross_range=3)]),
    "faster_cache": ("wan", [FasterCache(attention_range=2, uncond_range=2)]),
}


@pytest.fixture
def reads(monkeypatch):
    """Treat tensor timesteps as device-resident and count device-to-host reads."""
    real = state_mod._host_float
    monkeypatch.setattr(state_mod, "_host_float", lambda v: None if isinstance(v, torch.Tensor) else real(v))
    counter = {"n": 0}
    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            counter["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def per_call_reads(model, name, inputs, counter, steps=8):
    counts = []
    handle_pre = model.register_forward_pre_hook(lambda *_: counts.append(-counter["n"]))
    handle = model.register_forward_hook(lambda *_: counts.__setitem__(-1, counts[-1] + counter["n"]))
    try:
        out = denoise(model, name, inputs, steps=steps)
    finally:
        handle_pre.remove()
        handle.remove()
    return counts, out


@pytest.mark.parametrize("case", list(CASES))
def test_at_most_one_host_read_per_call_and_new_runs_still_detected(case, reads):
    name, configs = CASES[case]
    model, inputs = build(name)
    plain = copy.deepcopy(model)
    baseline, _ = per_call_reads(plain, name, inputs, reads)  # reads the model makes by itself
    hookwise.apply(model, *configs)
    first, out1 = per_call_reads(model, name, inputs, reads)
    second, out2 = per_call_reads(model, name, inputs, reads)
    extra = [a - b for a, b in zip(first + second, baseline + baseline)]
    # the first call of each branch may learn the blocks' stream structure once; every other call: <= 1
    assert max(extra[2:len(first)] + extra[len(first) + 2:]) <= 1, extra
    assert max(extra) <= 3, extra
    # the second run was recognised as one (its state reset) although nothing read the timestep eagerly
    assert hookwise.get_run_state(model).run >= 1
    assert torch.equal(out1, out2)


def test_a_host_timestep_costs_no_read_for_step_scheduled_caches(monkeypatch):
    """With the timestep a Python number, MagCache and TaylorSeer decide without any device read."""
    model, inputs = build("musubi")
    counter = {"n": 0}
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: counter.__setitem__("n", counter["n"] + 1) or original(self))
    hookwise.apply(model, TaylorSeer(order=1, interval=2, warmup=1))
    denoise(model, "musubi", inputs, steps=8)
    assert counter["n"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["first_block", "dual_block+taylorseer", "taylorseer", "teacache", "magcache"])
def test_on_cuda_each_call_synchronizes_at_most_once(case):
    """CUDA's sync debug mode warns at every synchronizing call; count them per model call."""
    import warnings

    name, configs = CASES[case]
    model, inputs = build(name)
    model = model.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    hookwise.apply(model, *configs)
    xk, tk = ("img", "timesteps") if name == "musubi" else ("hidden_states", "timestep")
    scale = 1.0 if name == "musubi" else 1000.0
    times = torch.linspace(1.0, 0.0, 9, device="cuda")[:-1] * scale  # the schedule lives on the device
    per_call = []
    for run in range(2):
        x = inputs[xk]
        for i in range(8):
            for branch in ("cond", "uncond"):
                kw = dict(inputs, **{xk: x, tk: times[i].expand(x.shape[0])})
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        with torch.no_grad(), hookwise.branch(model, branch):
                            out = model(**kw)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                per_call.append(sum("synchroniz" in str(w.message) for w in caught))
            x = x - 0.1 * sample_of(out, "test")
    assert max(per_call[4:]) <= 1, per_call
    assert hookwise.get_run_state(model).run >= 1
