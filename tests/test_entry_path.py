"""One entry path: every technique's own `apply_<name>` goes through `hookwise.apply`, so the ledger lists
it and `hookwise.remove` (or its `remove_<name>`) takes everything it attached off the model again."""

import functools
import os
import tempfile
import warnings

import pytest
import torch

import hookwise
from hookwise import cache, kernels, memory, parallel, quant, train
from hookwise.core import list_hooks, techniques

from cache_helpers import build, denoise, one_thread  # noqa: F401
from dist_helpers import world_of_one

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "musubi"  # has main blocks and attention modules, so every technique finds targets
# musubi blocks compute attention inline and never call their attention modules: the attention
# caches run on a model that does (their first call checks it)
MODEL_OF = {"pab": "wan", "faster_cache": "wan"}
RATIOS = (1.0, 1.05, 1.02, 1.01, 0.99, 0.98, 0.97, 0.95)


@functools.cache
def _gguf_file() -> str:
    """A GGUF file of the musubi model's own weights (Q8_0 where rows hold whole blocks, else F32)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize
    from model_helpers import tiny_musubi

    path = os.path.join(tempfile.mkdtemp(prefix="hookwise-entry-"), "musubi.gguf")
    writer = gguf.GGUFWriter(path, "musubi")
    for key, value in tiny_musubi()[0].state_dict().items():
        value = value.numpy()
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            writer.add_tensor(key, quantize(value, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# technique name -> (its module, the suffix of its apply_<name> / remove_<name>, a config that applies)
CASES = {
    "casting": (memory, "casting", lambda: hookwise.LayerwiseCasting(storage_dtype=torch.bfloat16)),
    "offload": (memory, "offload", lambda: hookwise.Offload(onload_device="cpu", offload_device="cpu")),
    "component_offload": (memory, "component_offload", lambda: hookwise.ComponentOffload(onload_device="cpu")),
    "first_block_cache": (cache, "first_block_cache", lambda: hookwise.FirstBlockCache(threshold=10.0)),
    "dual_block_cache": (cache, "dual_block_cache", lambda: hookwise.DualBlockCache(threshold=10.0, warmup=1)),
    "magcache": (cache, "magcache", lambda: hookwise.MagCache(ratios=RATIOS, threshold=1.0)),
    "teacache": (cache, "teacache", lambda: hookwise.TeaCache(threshold=10.0)),
    "forecast": (cache, "forecast", lambda: hookwise.Forecast(budget=7)),
    "taylorseer": (cache, "taylorseer", lambda: hookwise.TaylorSeer(order=1, interval=2, warmup=1)),
    "pab": (cache, "pab", lambda: hookwise.PyramidAttentionBroadcast(spatial_range=2, cross_range=2)),
    "faster_cache": (cache, "faster_cache", lambda: hookwise.FasterCache(attention_range=2)),
    "layer_skip": (cache, "layer_skip", lambda: hookwise.LayerSkip(blocks=(1,))),
    "checkpointing": (train, "checkpointing", lambda: hookwise.Checkpointing()),
    "quantization": (quant, "quantize", lambda: hookwise.Quantize("int8-weight")),
    "kernels": (kernels, "kernels", lambda: hookwise.Kernels(backend="eager")),
    "compile": (kernels, "compile", lambda: hookwise.Compile(backend="aot_eager")),
    "gguf": (quant, "gguf", lambda: hookwise.GGUFFile(path=_gguf_file())),
    "attention": (kernels, "attention", lambda: hookwise.Attention(backend="sdpa-flash")),
    # parallel techniques on a gloo world of one rank (this process): the identity, hooks and all
    "cfg_parallel": (parallel, "cfg_parallel", lambda: world_of_one() or hookwise.CFGParallel()),
    "data_parallel": (parallel, "data_parallel", lambda: world_of_one() or hookwise.DataParallel()),
    "context_parallel": (parallel, "context_parallel", lambda: world_of_one() or hookwise.ContextParallel()),
}

REGISTERED = [t.name for t in techniques()]


def footprint(model: torch.nn.Module) -> dict[str, set[str]]:
    """The instance attribute names of every module: a hook, an instance `forward`, a `_hookwise*`
    attribute or an overridden method left behind shows up here."""
    return {path: set(vars(m)) for path, m in model.named_modules(remove_duplicate=False)}


def leftovers(model: torch.nn.Module) -> list[str]:
    found = [f"hooks {hooks}" for hooks in [list_hooks(model)] if hooks]
    for path, module in model.named_modules(remove_duplicate=False):
        if "forward" in vars(module):
            found.append(f"{path or 'model'}: instance forward")
        found += [f"{path or 'model'}: {k}" for k in vars(module) if k.startswith("_hookwise")]
    return found


def apply_own(name: str, model: torch.nn.Module):
    module, suffix, make = CASES[name]
    config = make()
    getattr(module, f"apply_{suffix}")(model, config)
    return config


def test_every_registered_technique_has_a_case_here():
    assert sorted(REGISTERED) == sorted(CASES)


@pytest.mark.parametrize("name", REGISTERED)
def test_apply_name_is_recorded_and_hookwise_remove_leaves_nothing(name):
    model_name = MODEL_OF.get(name, MODEL)
    model, inputs = build(model_name)
    before = footprint(model)
    config = apply_own(name, model)
    assert hookwise.applied(model).configs == (config,)
    assert list_hooks(model), f"{name}: apply_<name> attached no hook"
    denoise(model, model_name, inputs, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # removing casting warns that the storage rounding stays
        assert hookwise.remove(model) == [name]
    assert leftovers(model) == []
    assert footprint(model) == before
    assert len(hookwise.applied(model)) == 0


@pytest.mark.parametrize("name", REGISTERED)
def test_remove_name_undoes_its_technique_through_the_ledger(name):
    model, inputs = build(MODEL)
    before = footprint(model)
    module, suffix, _ = CASES[name]
    apply_own(name, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(module, f"remove_{suffix}")(model)
    assert leftovers(model) == []
    assert footprint(model) == before
    with pytest.raises(hookwise.ConfigError, match="applied nothing"):
        getattr(module, f"remove_{suffix}")(model)


def test_apply_name_and_hookwise_apply_share_one_ledger():
    model, inputs = build(MODEL)
    cache.apply_first_block_cache(model, hookwise.FirstBlockCache(threshold=10.0))
    with pytest.raises(hookwise.CompatibilityError, match="cannot be combined"):
        hookwise.apply(model, hookwise.TeaCache())
    hookwise.apply(model, hookwise.TaylorSeer(order=1))
    assert hookwise.applied(model).names() == ["first_block_cache", "taylorseer"]
    assert hookwise.remove(model) == ["taylorseer", "first_block_cache"]
    assert leftovers(model) == []


def test_apply_offload_still_returns_its_report():
    model, _ = build(MODEL)
    report = memory.apply_offload(model, onload_device="cpu", offload_device="cpu")
    assert report == memory.offload_report(model)
    memory.remove_offload(model, "cpu")
    assert leftovers(model) == []
