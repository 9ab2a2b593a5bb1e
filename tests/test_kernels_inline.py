"""Kernels on the patterns FLUX and Wan write inline: the gated residual and Wan's modulation through a
block-forward replacement, the rotary embedding through an instance-level attention processor; forward
and backward equal to eager, exact removal, the replacement innermost on its block, the check at apply.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hookwise
from hookwise import Kernels, kernels_summary
from hookwise.core.hooks import Layer, ModelHook, add_hook
from hookwise.kernels import fused
from hookwise.errors import NoTargetError
from hookwise.kernels._inline import FusedProcessor
from cache_helpers import fresh_dynamo, one_thread  # noqa: F401 - the fixtures
from kernel_helpers import gate_off_by_one_percent, count_fused_calls
from model_helpers import tiny_flux, tiny_hunyuanvideo, tiny_ltx, tiny_musubi, tiny_wan
from offload_helpers import add_lora, fwd_bwd

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(got, expected, rtol=1e-5) -> None:
    out, grads = got
    out_e, grads_e = expected
    assert grads.keys() == grads_e.keys()
    for name, (a, b) in {"output": (out, out_e), **{k: (grads[k], grads_e[k]) for k in grads}}.items():
        bound = rtol * max(b.abs().max().item(), 1e-6)
        assert (a - b).abs().max().item() <= bound, name


@pytest.mark.parametrize("build", [tiny_flux, tiny_wan], ids=["flux", "wan"])
def test_gate_modulate_and_rope_run_fused_forward_and_backward_equal_to_eager(build):
    model, inputs = build()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert summary["rejected"] == {} and summary["unmatched"] == [] and summary["inline"] == {}
    kinds = set(summary["used"].values())
    assert kinds >= ({"flux_double", "flux_single", "flux_rope"} if build is tiny_flux else {"wan_block", "wan_rope"})
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    assert calls["gated_residual"] > 0 and calls["rope_interleaved"] > 0 and calls["norm_modulate"] > 0


def test_a_fused_qkv_attention_takes_the_fused_rope_too():
    model, inputs = tiny_flux()
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn.fused_projections
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("rope",), backend="eager"))
    assert set(kernels_summary(model)["used"].values()) == {"flux_rope"}
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    assert calls["rope_interleaved"] == 4


# HunyuanVideo: the double and single blocks, the token refiner's blocks, the rope of both attention kinds.
# LTX-Video: the block (gate and its RMS modulation) and the self-attention's rope (one table per sample).
VIDEO = {
    "hunyuanvideo": (tiny_hunyuanvideo, {"hunyuan_double", "hunyuan_single", "hunyuan_refiner", "hunyuan_rope"},
                     {"gated_residual": 7, "norm_modulate": 6, "rope_interleaved": 4}),
    "ltx": (tiny_ltx, {"ltx_block", "ltx_rope"}, {"gated_residual": 2, "norm_modulate": 2, "rope_interleaved": 2}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VIDEO))
def test_video_blocks_run_gate_modulate_and_rope_fused_forward_and_backward_equal_to_eager(name):
    build, kinds, counts = VIDEO[name]
    model, inputs = build()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert summary["rejected"] == {} and summary["unmatched"] == [] and summary["not_reached"] == {}
    assert set(summary["used"].values()) >= kinds
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    assert {k: calls.get(k, 0) for k in counts} == counts  # every inline site ran fused, once per call


@pytest.mark.parametrize("name", list(VIDEO))
def test_video_blocks_removal_gives_back_processors_forwards_and_outputs(name):
    model, inputs = VIDEO[name][0]()
    processors = {p: m.processor for p, m in model.named_modules() if hasattr(m, "processor")}
    with torch.no_grad():
        expected = model(**inputs).sample
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    assert any(isinstance(m.processor, FusedProcessor) for p, m in model.named_modules() if p in processors)
    hookwise.remove(model)
    assert all(m.processor is processors[p] for p, m in model.named_modules() if p in processors)
    assert hookwise.list_hooks(model) == {} and not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)


@pytest.mark.parametrize("name", list(VIDEO))
def test_video_blocks_with_kernels_compile_without_a_graph_break(name, fresh_dynamo):
    from torch._dynamo.utils import counters

    model, inputs = VIDEO[name][0]()
    with torch.no_grad():
        expected = model(**inputs).sample
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"), hookwise.Compile(backend="aot_eager"))
    with torch.no_grad():
        model(**inputs)  # the first call of a hooked model runs eagerly (the model map's trace)
        counters.clear()
        out = model(**inputs).sample
    assert counters["stats"]["unique_graphs"] > 0 and sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_ltx_cross_attention_keeps_its_processor():
    model, _ = tiny_ltx()
    hookwise.apply(model, Kernels(ops=("rope",), backend="eager"))
    assert kernels_summary(model)["used"] == {"transformer_blocks.0.attn1": "ltx_rope"}
    assert not isinstance(model.transformer_blocks[0].attn2.processor, FusedProcessor)


def test_a_hunyuan_processor_replacement_still_receives_the_rotary_embedding():
    # diffusers' generic Attention passes on only the keywords its processor's __call__ names.
    model, _ = tiny_hunyuanvideo()
    hookwise.apply(model, Kernels(ops=("rope",), backend="eager"))
    import inspect

    params = inspect.signature(model.transformer_blocks[0].attn.processor.__call__).parameters
    assert "image_rotary_emb" in params


def test_a_custom_dit_with_fused_qkv_takes_the_structural_route_for_its_gates_and_modulation_and_says_what_is_left():
    model, inputs = tiny_musubi()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(backend="eager"))
    summary = kernels_summary(model)
    assert set(summary["unmatched"]) == {"rope", "swiglu"}  # no rope or swiglu at all
    assert not {"flux_double", "wan_block", "flux_rope"} & set(summary["used"].values())
    blocks = [f"double_blocks.{i}" for i in range(2)] + [f"single_blocks.{i}" for i in range(3)]
    assert {p: summary["used"][p] for p in blocks} == dict.fromkeys(blocks, "structural")
    assert sorted(summary["not_reached"]) == sorted(blocks)
    why = summary["not_reached"]["double_blocks.0"]
    assert why.startswith("DoubleStreamBlock: no route reaches its rope (") and "run eagerly" in why
    assert "the structural route fuses its gate / modulate" in why
    assert_close(fwd_bwd(model, inputs), expected)


def test_only_inline_ops_a_custom_dit_has_no_route_for_is_an_error_naming_its_block_classes():
    model, _ = tiny_musubi()
    with pytest.raises(NoTargetError, match=r"no route reaches the inline rope of its tower blocks \(DoubleStreamBlock, SingleStreamBlock"):
        hookwise.apply(model, Kernels(ops=("rope",), backend="eager"))
    assert hookwise.list_hooks(model) == {}


def test_flux_blocks_are_all_reached():
    model, _ = tiny_flux()
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    assert kernels_summary(model)["not_reached"] == {}


def test_removal_puts_back_the_processor_object_and_the_block_forwards():
    model, inputs = tiny_flux()
    processors = {p: m.processor for p, m in model.named_modules() if hasattr(m, "processor")}
    forwards = {p: "forward" in m.__dict__ for p, m in model.named_modules()}
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(backend="eager"))
    attn = model.transformer_blocks[0].attn
    assert isinstance(attn.processor, FusedProcessor) and attn.processor.inner is processors["transformer_blocks.0.attn"]
    assert type(attn).__call__ is torch.nn.Module.__call__  # nothing on the class
    hookwise.remove(model)
    assert all(m.processor is processors[p] for p, m in model.named_modules() if hasattr(m, "processor"))
    assert {p: "forward" in m.__dict__ for p, m in model.named_modules()} == forwards
    out, grads = fwd_bwd(model, inputs)
    assert torch.equal(out, expected[0])


def test_an_error_during_apply_leaves_no_processor_replaced(monkeypatch):
    model, _ = tiny_flux()
    processors = {p: m.processor for p, m in model.named_modules() if hasattr(m, "processor")}
    real = fused.add_hook

    def fails_on_the_last_block(module, hook, name):
        if module is model.single_transformer_blocks[0]:  # after both attention processors were replaced
            raise RuntimeError("boom")
        return real(module, hook, name)

    monkeypatch.setattr(fused, "add_hook", fails_on_the_last_block)
    with pytest.raises(RuntimeError, match="boom"):
        hookwise.apply(model, Kernels(backend="eager"))
    assert all(m.processor is processors[p] for p, m in model.named_modules() if hasattr(m, "processor"))
    assert hookwise.list_hooks(model) == {} and kernels_summary(model) == {}


def test_the_block_replacement_sits_inside_other_hooks_on_the_block():
    class Outer(ModelHook):
        layer = Layer.OFFLOAD
        calls = 0

        def new_forward(self, module, next_fn, *args, **kwargs):
            Outer.calls += 1
            return next_fn(*args, **kwargs)

    model, inputs = tiny_flux()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    add_hook(model.transformer_blocks[0], Outer(), "test.outer")
    hookwise.apply(model, Kernels(ops=("gate",), backend="eager"))
    names = hookwise.list_hooks(model)["transformer_blocks.0"]
    assert names.index("test.outer") < names.index(fused.HOOK_NAME)  # outermost first
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    assert Outer.calls == 1 and calls["gated_residual"] == 5


def test_a_block_whose_fused_forward_differs_is_rejected_with_the_reason(monkeypatch):
    gate_off_by_one_percent(monkeypatch)
    model, inputs = tiny_wan()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert summary["rejected"]["blocks.0"].startswith("eager: output 0 differs from eager by")
    assert set(summary["used"].values()) == {"wan_rope"}
    assert_close(fwd_bwd(model, inputs), expected)


def test_bf16_flux_blocks_pass_the_check_and_stay_within_the_bound():
    model, inputs = tiny_flux()
    model = model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    expected = model(**inputs).sample
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert summary["rejected"] == {} and "flux_double" in summary["used"].values()
    out = model(**inputs).sample
    assert (out.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()
