"""Attention backends inside regionally compiled blocks: no graph break at the attention modules, the same
numbers as eager (forward and backward), the SDPA kernels of the chain pinned inside the graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

import hookwise
from hookwise import Attention, Compile, Kernels
from hookwise.kernels.attention import _traced_kernels
from cache_helpers import fresh_dynamo, one_thread  # noqa: F401 - fixtures
from model_helpers import MusubiDiT, tiny_flux, tiny_musubi, tiny_wan
from offload_helpers import add_lora, fwd_bwd

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


def breaks() -> int:
    return sum(counters["graph_break"].values())


# A dynamo backend that records the functions each compiled graph calls, then runs the graph as traced.
GRAPH_CALLS: list[str] = []


def _recording(gm, example_inputs):
    GRAPH_CALLS.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return gm.forward


if "hookwise_test_recording" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_recording, name="hookwise_test_recording")


def close(got, expected, rtol=1e-5) -> None:
    (out, grads), (out_e, grads_e) = got, expected
    assert grads.keys() == grads_e.keys()
    for name, (a, b) in {"output": (out, out_e), **{k: (grads[k], grads_e[k]) for k in grads}}.items():
        assert (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1e-6), name


@pytest.mark.parametrize("build", [tiny_flux, tiny_wan, tiny_musubi], ids=["flux", "wan", "musubi"])
def test_a_compiled_block_with_attention_backends_has_no_graph_break(build):
    model, inputs = build()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    counters.clear()
    hookwise.apply(model, Attention(backend="sdpa-flash"), Compile(backend="aot_eager"))
    close(fwd_bwd(model, inputs), expected)
    with torch.no_grad():
        model(**inputs)
    assert counters["stats"]["unique_graphs"] > 0 and breaks() == 0, dict(counters["graph_break"])


def test_attention_kernels_and_compile_together_have_no_graph_break():
    model, inputs = tiny_flux()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    counters.clear()
    hookwise.apply(model, Attention(backend=["sdpa-math"]), Kernels(backend="eager"), Compile(backend="aot_eager"))
    close(fwd_bwd(model, inputs), expected)
    assert breaks() == 0, dict(counters["graph_break"])


def test_the_chain_becomes_sdpa_kernels_in_its_order_inside_a_graph():
    assert _traced_kernels(("auto",), {}) == []  # the module's own call: the compiler lowers it
    flash_first = _traced_kernels(("sdpa-flash", "sdpa"), {})
    assert flash_first[0] == SDPBackend.FLASH_ATTENTION and set(flash_first) >= {SDPBackend.MATH}
    assert _traced_kernels(("sdpa-math", "sdpa-flash", "sdpa"), {"sdpa-math": "disabled"})[0] == SDPBackend.FLASH_ATTENTION
    assert _traced_kernels(("flex", "sdpa"), {}) is None  # another library's kernel: traced by _TracedRoute


def test_a_chain_of_another_kernel_still_computes_right_under_compile():
    model, inputs = tiny_flux()
    with torch.no_grad():
        expected = model(**inputs).sample
    hookwise.apply(model, Attention(backend="flex"), Compile(backend="aot_eager"))
    with torch.no_grad():
        out = model(**inputs).sample
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert hookwise.attention_summary(model)["modules"]["transformer_blocks.0.attn"]["routed"] > 0


@pytest.mark.parametrize("build", [tiny_flux, tiny_musubi], ids=["flux", "musubi"])
def test_flex_attention_is_traced_into_each_compiled_block_without_a_graph_break(build):
    model, inputs = build()
    with torch.no_grad():
        expected = model(**inputs)
    hookwise.apply(model, Attention(backend="flex"), Compile(backend="hookwise_test_recording"))
    with torch.no_grad():
        model(**inputs)  # the first call of a hooked model runs eagerly (the model map's trace)
        counters.clear()
        GRAPH_CALLS.clear()
        out = model(**inputs)
    assert counters["stats"]["unique_graphs"] == 2 and breaks() == 0, dict(counters["graph_break"])
    assert GRAPH_CALLS.count("flex_attention") == 2  # one attention per compiled block class, in its graph
    out, expected = getattr(out, "sample", out), getattr(expected, "sample", expected)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_flex_chain_in_training_on_the_cpu_takes_the_module_call_inside_the_graph():
    # FlexAttention has no CPU backward: the traced route passes it over, with no graph break.
    model, inputs = tiny_flux()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Attention(backend="flex"), Compile(backend="hookwise_test_recording"))
    fwd_bwd(model, inputs)
    counters.clear()
    GRAPH_CALLS.clear()
    close(fwd_bwd(model, inputs), expected)
    assert breaks() == 0 and "flex_attention" not in GRAPH_CALLS, dict(counters["graph_break"])


def _gpu_musubi():
    model, inputs = tiny_musubi()
    torch.manual_seed(0)
    model = MusubiDiT(dim=128, heads=2).to("cuda", torch.bfloat16).eval()  # head dim 64: every backend takes it
    inputs = {k: v.to("cuda", torch.bfloat16) for k, v in inputs.items()}
    return model, inputs


@pytest.mark.gpu
@pytest.mark.parametrize("backend, package", [("flex", "torch"), ("flash-attn-2", "flash_attn"),
                                              ("sage", "sageattention"), ("xformers", "xformers")])  # fmt: skip
def test_another_librarys_kernel_on_cuda_is_traced_into_the_compiled_block(backend, package):
    pytest.importorskip(package)
    model, inputs = _gpu_musubi()
    with torch.no_grad():
        expected = model(**inputs)
    hookwise.apply(model, Attention(backend=backend), Compile(backend="hookwise_test_recording"))
    with torch.no_grad():
        model(**inputs)
        counters.clear()
        out = model(**inputs)
    assert counters["stats"]["unique_graphs"] == 2 and breaks() == 0, dict(counters["graph_break"])
    assert (out.float() - expected.float()).abs().max() <= 3e-2 * expected.float().abs().max()
