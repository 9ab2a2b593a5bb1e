"""Quantize over torchao and bitsandbytes: every CPU scheme on tiny Flux and Wan, stored bytes, mixed
schemes, errors before anything changes, removal, odd-shaped models, and composition with offloading,
QLoRA training, step caches and compiled blocks."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import hookwise
from hookwise import FirstBlockCache, Layer, Offload, Quantize, TechniqueConfig, register_technique
from hookwise.core.techniques import unregister_technique
from hookwise.errors import ConfigError, MissingDependencyError, NoTargetError
from hookwise.memory import saved_for_backward
from hookwise.quant import quantized_leaves
from hookwise.quant.quantize import SCHEME_COST, stored_bytes

from cache_helpers import build, compile_blocks, denoise, fresh_dynamo, no_recompiles, one_thread  # noqa: F401
from model_helpers import output_of, tiny_flux, tiny_wan
from tree_helpers import Tree, x_input

pytestmark = pytest.mark.usefixtures("one_thread")

# The bound each CPU scheme is held to: relative L2 error of the model output against the plain model.
BOUNDS = {"int8-weight": 0.005, "int8-dynamic": 0.01, "fp8-weight": 0.02, "int8": 0.005, "nf4": 0.08, "fp4": 0.08}
MODELS = {"flux": tiny_flux, "wan": tiny_wan}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def quantized(make, scheme: str, **kw):
    model, inputs = make()
    reference = output_of(model, inputs)
    hookwise.apply(model, Quantize(scheme, **kw))
    return model, inputs, reference


@pytest.mark.parametrize("scheme", list(BOUNDS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_every_cpu_scheme_stays_within_its_error_bound(arch, scheme):
    model, inputs, reference = quantized(MODELS[arch], scheme)
    error = rel_error(output_of(model, inputs), reference)
    assert 0 < error < BOUNDS[scheme], error


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_stored_bytes_are_what_the_scheme_declares_and_kept_leaves_are_untouched(scheme):
    model, inputs = tiny_flux()
    before = {n: p for n, p in model.named_parameters()}
    hookwise.apply(model, Quantize(scheme))
    leaves = quantized_leaves(model)
    modules = dict(model.named_modules())
    assert leaves
    model_map = hookwise.describe(model)
    tower_linears = {leaf.path for leaf in model_map.leaves if leaf.kind == "linear" and leaf.block is not None}
    assert set(leaves) <= tower_linears
    for path, hook in leaves.items():
        module = modules[path]
        shape = (module.out_features, module.in_features)
        stored = sum(t.numel() * t.element_size() for t in hook.tensors(module).values())
        assert stored == stored_bytes(scheme, shape), path
        assert module.weight.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
    # what the map keeps in high precision (norms, embedders, modulation, proj_out) is the same object
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in leaves:
            assert param is before[name], name
    summary = hookwise.quantize_summary(model)
    per_weight = SCHEME_COST[scheme]["bytes"]
    numel = summary["bytes_before"] // 4  # fp32 model
    assert numel * per_weight < summary["bytes_after"] < numel * (per_weight + 0.2)


def test_mixed_schemes_per_module_and_high_precision_overrides():
    model, inputs, reference = quantized(tiny_flux, "int8-weight", modules={r"\.ff\.": "nf4", r"to_out": None})
    leaves = quantized_leaves(model)
    assert {h.scheme for p, h in leaves.items() if ".ff." in p} == {"nf4"}
    assert {h.scheme for p, h in leaves.items() if ".ff." not in p} == {"int8-weight"}
    assert not any("to_out" in p for p in leaves)
    assert rel_error(output_of(model, inputs), reference) < BOUNDS["nf4"]
    # the config is data: it round-trips through a dict with its overrides
    config = hookwise.applied(model).configs[0]
    assert Quantize.from_dict(config.to_dict()) == config


def test_bad_settings_and_unmatched_patterns_raise_before_anything_changes():
    with pytest.raises(ConfigError, match="not a quantization scheme"):
        Quantize("int3")
    with pytest.raises(ConfigError, match="cannot run scheme"):
        Quantize("nf4", backend="torchao")
    with pytest.raises(ConfigError, match="group_size"):
        Quantize("int8-weight", group_size=64)
    with pytest.raises(ConfigError, match="regular expression"):
        Quantize("nf4", modules={"(": "nf4"})
    model, inputs = tiny_flux()
    params = dict(model.named_parameters())
    with pytest.raises(ConfigError, match="match no quantizable"):
        hookwise.apply(model, Quantize("nf4", modules={"no_such_module": "int8"}))
    with pytest.raises(NoTargetError, match="nothing to quantize"):
        hookwise.apply(model, Quantize("nf4", modules={".": None}))
    assert dict(model.named_parameters()) == params and hookwise.list_hooks(model) == {}


def test_nothing_to_quantize_in_a_model_without_towers_says_why_and_does_not_suggest_skip_none():
    # skip='none' was given and cannot help: the message says what Quantize targets instead.
    plain = nn.Sequential(nn.Linear(64, 64)).requires_grad_(False)
    with pytest.raises(NoTargetError, match="tower blocks") as error:
        hookwise.apply(plain, Quantize("int8-weight", skip="none"))
    assert "skip='none'" not in str(error.value) and hookwise.list_hooks(plain) == {}


@pytest.mark.parametrize("scheme", ["int4-weight", "fp8-dynamic"])
def test_schemes_without_a_cpu_kernel_are_a_clear_error_at_apply(scheme):
    model, inputs = tiny_flux()
    model.to(torch.bfloat16)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=f"{scheme}.*cannot run on cpu"):
        hookwise.apply(model, Quantize(scheme))
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert hookwise.list_hooks(model) == {}


@pytest.mark.parametrize("package,extra,scheme", [("bitsandbytes", "bnb", "nf4"), ("torchao", "torchao", "int8-weight")])
def test_a_missing_backend_names_the_extra_and_changes_nothing(monkeypatch, package, extra, scheme):
    from hookwise.quant import _formats

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_formats, "_LOADED", {})
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(_formats.importlib, "import_module", lambda name: fake_import(name))
    model, inputs = tiny_flux()
    reference = output_of(model, inputs)
    with pytest.raises(MissingDependencyError, match=rf'pip install "hookwise\[{extra}\]"'):
        hookwise.apply(model, Quantize(scheme))
    monkeypatch.undo()
    assert hookwise.list_hooks(model) == {}
    assert torch.equal(output_of(model, inputs), reference)


def test_a_failed_stack_restores_the_original_weights_exactly():
    @dataclasses.dataclass(frozen=True)
    class Boom(TechniqueConfig):
        pass

    def fail(model, config):
        raise RuntimeError("boom")

    register_technique("test.boom", Boom, apply=fail, remove=None, layer=Layer.OFFLOAD)
    try:
        model, inputs = tiny_flux()
        params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        reference = output_of(model, inputs)
        with pytest.raises(RuntimeError, match="boom"):
            hookwise.apply(model, Quantize("nf4"), Boom())
        for name, param in model.named_parameters():
            assert param is params[name][0] and torch.equal(param, params[name][1])
        assert not any(n.startswith("weight_") for m in model.modules() for n in m._buffers)
        assert hookwise.list_hooks(model) == {}
        assert torch.equal(output_of(model, inputs), reference)
    finally:
        unregister_technique("test.boom")


def test_removal_is_exact_with_keep_original_and_lossy_with_a_warning_without():
    model, inputs = tiny_flux()
    reference = output_of(model, inputs)
    params = dict(model.named_parameters())
    hookwise.apply(model, Quantize("nf4", keep_original=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hookwise.remove_quantize(model)
    assert dict(model.named_parameters()) == params
    assert torch.equal(output_of(model, inputs), reference)

    hookwise.apply(model, Quantize("nf4"))
    quantized_out = output_of(model, inputs)
    with pytest.warns(UserWarning, match="rounding stays.*keep_original=True.*save_quantized"):
        hookwise.remove(model)
    assert hookwise.list_hooks(model) == {}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(n.startswith("weight_") for m in model.modules() for n in m._buffers)
    out = output_of(model, inputs)
    torch.testing.assert_close(out, quantized_out, rtol=1e-4, atol=1e-5)  # the dequantized weights compute the same
    assert not torch.equal(out, reference)


@pytest.mark.parametrize("scheme", ["int8-weight", "nf4"])
def test_an_odd_shaped_model_nested_containers_fused_qkv_reused_and_uncalled_blocks(scheme):
    torch.manual_seed(0)
    towers = [(["holder", "dict"], "list", ["fused"] * 3, [0, 1, 1, 0]), (["list"], "seq", ["split"] * 2, [])]
    model = Tree(towers).eval()
    x = x_input()
    reference = model(x)
    hookwise.apply(model, Quantize(scheme, skip="none"))
    leaves = quantized_leaves(model)
    assert any(p.endswith("qkv") for p in leaves)  # fused qkv
    assert any(p.startswith("parta.inner.inner.2.") for p in leaves)  # a block never called
    assert any(p.startswith("partb.1.0.attn.") for p in leaves)  # under a list in a list
    # every Linear quantized (skip="none"), at width 8: looser than the bounds on the tiny DiTs
    assert rel_error(model(x), reference) < {"int8-weight": 0.01, "nf4": 0.15}[scheme]


@pytest.mark.parametrize("scheme", ["int8-weight", "nf4", "int8"])
def test_quantized_weights_are_what_offloading_streams_and_outputs_do_not_change(scheme):
    base, inputs = tiny_flux()
    base.requires_grad_(False)
    alone = copy.deepcopy(base)
    hookwise.apply(alone, Quantize(scheme))
    expected = output_of(alone, inputs)
    both, plain = copy.deepcopy(base), copy.deepcopy(base)
    hookwise.apply(both, Quantize(scheme), Offload(onload_device="cpu", granularity="block"))
    hookwise.apply(plain, Offload(onload_device="cpu", granularity="block"))
    for _ in range(2):
        assert torch.equal(output_of(both, inputs), expected)
        output_of(plain, inputs)
    quant_report, plain_report = hookwise.offload_report(both), hookwise.offload_report(plain)
    assert quant_report.always_resident == {}  # every quantized tensor is a plain tensor that streams
    assert quant_report.stats["loads"] == plain_report.stats["loads"] > 0
    assert quant_report.stats["bytes_loaded"] < 0.7 * plain_report.stats["bytes_loaded"]
    assert quant_report.host_bytes < 0.7 * plain_report.host_bytes


def _lora(model):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp"], init_lora_weights=False)
    return inject_adapter_in_model(config, model)


@pytest.mark.parametrize("scheme", ["nf4", "int8-weight"])
def test_qlora_trains_the_adapters_only_and_saves_no_full_precision_weight_for_backward(scheme):
    base, inputs = tiny_flux()
    base.requires_grad_(False)
    plain = copy.deepcopy(base)
    hookwise.apply(base, Quantize(scheme))
    model = _lora(base).train()
    _lora(plain).train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)  # same adapters
    target = torch.randn_like(output_of(model, inputs))
    loss_of = lambda m: lambda: (m(**inputs).sample - target).pow(2).mean()  # noqa: E731
    mine, reference = saved_for_backward(model, loss_of(model)), saved_for_backward(plain, loss_of(plain))
    assert mine.new_bytes == reference.new_bytes  # activations only: no weight copy kept
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = loss_of(model)()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("scheme", ["nf4", "int8-weight"])
def test_qlora_under_checkpointing_gives_the_gradients_it_gives_without(scheme):
    base, inputs = tiny_flux()
    base.requires_grad_(False)
    hookwise.apply(base, Quantize(scheme))
    model = _lora(base).train()
    checkpointed = copy.deepcopy(model)
    hookwise.apply(checkpointed, hookwise.Checkpointing())
    target = torch.randn_like(output_of(model, inputs))
    grads = []
    for m in (model, checkpointed):
        (m(**inputs).sample - target).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_input_and_bias_gradients_match_the_dequantized_weight():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Sequential(nn.Linear(64, 32)), nn.Sequential(nn.Linear(32, 32)))
    x = torch.randn(3, 64, requires_grad=True)
    layer.requires_grad_(False)
    hookwise.apply(layer, Quantize("int8-weight", skip="none"))
    leaf = layer[0][0]
    leaf.bias.requires_grad_(True)
    weight = quantized_leaves(layer)["0.0"].dequantized(leaf)
    layer[0](x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    bias = leaf.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, weight, bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(leaf.bias.grad, bias.grad, rtol=2e-2, atol=1e-3)


def test_a_step_cache_on_a_quantized_model_skips_blocks_and_computes_quantized_steps(fresh_dynamo):
    model, inputs = build("musubi")
    exact = copy.deepcopy(model)
    hookwise.apply(exact, Quantize("int8-weight"))
    expected = denoise(exact, "musubi", inputs, steps=6)
    never = copy.deepcopy(model)
    hookwise.apply(never, Quantize("int8-weight"), FirstBlockCache(threshold=0.0))
    assert torch.equal(denoise(never, "musubi", inputs, steps=6), expected)
    hookwise.apply(model, Quantize("int8-weight"), FirstBlockCache(threshold=0.5))
    out = denoise(model, "musubi", inputs, steps=6)
    stats = hookwise.cache.cache_stats(model)["first_block_cache"]["branches"]["cond"]
    assert stats["cached"] >= 1
    assert rel_error(out, expected) < 0.2


def test_compiled_blocks_of_a_quantized_model_do_not_recompile_from_step_to_step(fresh_dynamo):
    model, inputs = build("musubi")
    eager = copy.deepcopy(model)
    hookwise.apply(eager, Quantize("int8-weight"))
    expected = denoise(eager, "musubi", inputs, steps=4, cfg=None)
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    hookwise.apply(model, Quantize("int8-weight"))
    denoise(model, "musubi", inputs, steps=4, cfg=None)
    frames = counter.frame_count
    with no_recompiles():
        second = denoise(model, "musubi", inputs, steps=4, cfg=None)
    assert counter.frame_count == frames > 0
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)


# ---- cost declaration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    Quantize("nf4"), Quantize("int8-weight"), Quantize("int8", skip="none"),
    Quantize("nf4", modules={r"\.ff\.": "int8-weight", r"to_out": None}),  # per-module overrides, one leaf kept
])  # fmt: skip
def test_the_declared_footprint_is_the_bytes_quantization_really_stores(config):
    from hookwise.core.cost import CostContext, Placement
    from hookwise.plan import Hardware, Job
    from hookwise.plan.footprint import measure

    model, _ = tiny_flux()
    footprint = measure(model).denoiser.footprint
    cost = hookwise.core.technique_named("quantization").cost
    hardware = Hardware.detect(device="cpu", ram="8GB", probe=False)
    placed = cost.effect(Placement.resident(footprint), config, CostContext(hardware, Job(), 2**30, 2**33))
    hookwise.apply(model, config)
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert placed.footprint.total_bytes == stored < footprint.total_bytes
    used = sorted(set(hookwise.quantize_summary(model)["quantized"].values()))
    assert placed.compute_factor == max(SCHEME_COST[s]["compute"] for s in used) > 1
    assert placed.quality == (" + ".join(SCHEME_COST[s]["quality"] for s in used),)


def test_the_planner_offers_quantization_where_the_weights_do_not_fit():
    from hookwise.introspect import build_spec
    from hookwise.plan import Hardware, Job, make_plan

    hardware = Hardware(device="cuda", name="test GPU", vram=12 * 10**9, vram_free=12 * 10**9, ram=64 * 10**9,
                        pinned_limit=32 * 10**9, h2d=25e9, disk_read=2e9, tflops=100.0)  # fmt: skip
    plan = make_plan(build_spec("flux.1-dev"), Job(height=256, width=256), hardware, goal="memory")
    rows = [o for o in plan.ranked if any(isinstance(c, Quantize) for c in o.configs)]
    assert {c.scheme for o in rows for c in o.configs if isinstance(c, Quantize)} >= {"int8-weight", "nf4"}
    assert all(o.fits and o.quality for o in rows)


# ---- CUDA-only schemes ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("scheme,bound", [("int4-weight", 0.1), ("fp8-dynamic", 0.05), ("nf4", 0.08), ("int8-weight", 0.01)])
def test_cuda_schemes_on_tiny_flux_stay_within_their_bound(scheme, bound):
    if scheme == "fp8-dynamic" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmul needs compute capability 8.9+")
    model, inputs = tiny_flux()
    model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda") for k, v in inputs.items()}
    reference = output_of(model, inputs)
    hookwise.apply(model, Quantize(scheme, group_size=32 if scheme == "int4-weight" else None))
    leaves = quantized_leaves(model)
    assert leaves
    error = rel_error(output_of(model, inputs), reference)
    assert 0 < error < bound, error
    modules = dict(model.named_modules())
    for path, hook in leaves.items():
        module = modules[path]
        stored = sum(t.numel() * t.element_size() for t in hook.tensors(module).values())
        assert stored == stored_bytes(scheme, (module.out_features, module.in_features), 32 if scheme == "int4-weight" else None)
