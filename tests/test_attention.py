"""Attention backends: every backend available on the CPU against the math reference on the tiny FLUX and
Wan and through a LoRA training step, constraint fallbacks with one warning, a corrupted backend disabled
by the numerics check, "auto" choosing by measurement, per-tower backends, no effect outside the hooked
modules, exact removal, composition with casting / offload / a step cache, odd-shaped models; the GPU
backends' constraint logic with fake availability, and their real kernels on CUDA."""

from __future__ import annotations

import importlib.util
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

import hookwise
from hookwise.core import list_hooks
from hookwise.errors import HookwiseError, MissingDependencyError, NoTargetError
from hookwise.kernels import _attn_backends as ab
from hookwise.core.outputs import sample_of
from hookwise.kernels import attention_backends, attention_summary
from model_helpers import mlp, output_of, tiny_flux, tiny_musubi, tiny_wan
from offload_helpers import add_lora, fwd_bwd
from tree_helpers import Tree, trees, x_input
from cache_helpers import one_thread  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_BACKENDS = ["sdpa", "sdpa-math", "sdpa-flash", "flex"]
MODELS = {"flux": tiny_flux, "wan": tiny_wan}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def hookwise_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "hookwise attention" in str(w.message)]


def run(model, inputs, config):
    """The output under `config` and the hookwise warnings it raised; the technique stays applied."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hookwise.apply(model, config)
        out = output_of(model, inputs)
    return out, hookwise_warnings(record)


@pytest.fixture
def registered():
    """Register test backends for one test; each is unregistered afterwards."""
    names = []

    def add(backend: ab.Backend) -> ab.Backend:
        names.append(backend.name)
        return ab.register_backend(backend)

    yield add
    for name in names:
        ab.unregister_backend(name)


def scaled(factor: float):
    """A backend call that computes the right attention times `factor` (a corrupted kernel)."""
    return lambda call: F.scaled_dot_product_attention(**call.sdpa_kwargs()) * factor


class MaskedAttention(nn.Module):
    WIDTH, HEADS = 32, 2  # head dim 16

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(self.WIDTH, self.WIDTH) for _ in range(3))
        self.dropout = dropout

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.HEADS, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        return out.transpose(1, 2).reshape(b, n, self.WIDTH)


class Masked(nn.Module):
    """One attention module called with an attention mask."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.attn = MaskedAttention(dropout)

    def forward(self, x, mask=None):
        return self.attn(x, mask)


def masked_input() -> torch.Tensor:
    return torch.randn(1, 8, MaskedAttention.WIDTH, generator=torch.Generator().manual_seed(3))


# ---- every CPU backend against the math reference -------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_each_cpu_backend_matches_the_plain_model_and_is_chosen_without_warnings(model_name, backend):
    model, inputs = MODELS[model_name]()
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend=backend))
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    assert warned == []
    summary = attention_summary(model)
    assert {d["chosen"] for d in summary["decisions"]} == {backend}
    assert all(m["routed"] == m["calls"] == 1 for m in summary["modules"].values()), summary["modules"]
    checked = [d for d in summary["decisions"] if backend in d["errors"]]
    # the module's own call and the math reference itself are not checked
    assert backend in ("sdpa", "sdpa-math") or len(checked) == len(summary["decisions"])
    for decision in checked:
        assert decision["errors"][backend] < 1e-4 and decision["probe"].startswith("batch 0, query heads 0-1")


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-math", "sdpa-flash", "auto"])
def test_a_lora_training_step_gives_the_plain_gradients(backend):
    model, inputs = tiny_flux()
    add_lora(model, LORA_TARGETS)
    plain_out, plain_grads = fwd_bwd(model, inputs)
    hookwise.apply(model, hookwise.Attention(backend=backend))
    out, grads = fwd_bwd(model, inputs)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and any("lora_" in k for k in grads)
    for key in grads:
        torch.testing.assert_close(grads[key], plain_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    decisions = attention_summary(model)["decisions"]
    assert decisions and all(d["shape"].endswith("training") for d in decisions)
    if backend == "auto":
        # FlexAttention has no backward on the CPU: never chosen, never timed in training
        assert all("flex" not in d["times_ms"] and "no backward" in d["skipped"]["flex"] for d in decisions)


def test_in_training_a_backend_without_a_backward_is_never_chosen():
    model, inputs = tiny_flux()
    add_lora(model, LORA_TARGETS)
    plain_out, plain_grads = fwd_bwd(model, inputs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hookwise.apply(model, hookwise.Attention(backend="flex"))
        out, grads = fwd_bwd(model, inputs)
    warned = hookwise_warnings(record)
    assert len(warned) == 1 and "'flex'" in warned[0] and "has no backward on cpu (training)" in warned[0]
    assert torch.equal(out, plain_out) and all(torch.equal(grads[k], plain_grads[k]) for k in grads)
    assert {d["chosen"] for d in attention_summary(model)["decisions"]} == {"sdpa"}
    with torch.no_grad():  # sampling: the same module takes FlexAttention
        output_of(model, inputs)
    chosen = {d["shape"].endswith("training"): d["chosen"] for d in attention_summary(model)["decisions"]}
    assert chosen == {True: "sdpa", False: "flex"}


# ---- auto ---------------------------------------------------------------------------------------------
def test_auto_times_every_backend_that_passes_once_per_shape_and_keeps_the_fastest():
    model, inputs = tiny_wan()
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend="auto", repeats=2))
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    assert warned == []
    decisions = attention_summary(model)["decisions"]
    assert len(decisions) == 2  # Wan's self and cross attention: two shapes, each shared by both blocks
    for d in decisions:
        assert set(d["times_ms"]) == set(CPU_BACKENDS)
        assert d["chosen"] == min(d["times_ms"], key=d["times_ms"].get)
        assert d["skipped"]["sdpa-efficient"] == "runs on cuda, not cpu"
        assert len(d["modules"]) == 2
    output_of(model, inputs)  # cached: no new measurement
    summary = attention_summary(model)
    assert len(summary["decisions"]) == 2 and all(m["routed"] == 2 for m in summary["modules"].values())


# ---- fallbacks ----------------------------------------------------------------------------------------
def test_an_unsupported_head_dim_takes_the_next_backend_with_one_warning(registered):
    fake = registered(ab.fake_available(ab.backend_named("flash-attn-2"), devices=("cpu",)))
    fake = registered(ab.Backend(**{**fake.__dict__, "dtypes": ab.FLOATS}))  # fp32 too, to reach the head dim
    model, inputs = tiny_wan()  # head dim 12: not a multiple of 8
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend=[fake.name, "sdpa-math"]))
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    assert len(warned) == 1, warned  # four modules, two shapes: one warning per backend and reason
    assert f"'{fake.name}'" in warned[0] and "head dim 12 is not a multiple of 8" in warned[0] and "'sdpa-math'" in warned[0]
    assert {d["chosen"] for d in attention_summary(model)["decisions"]} == {"sdpa-math"}
    flux, flux_inputs = tiny_flux()  # head dim 16: served
    _, warned = run(flux, flux_inputs, hookwise.Attention(backend=fake.name))
    assert warned == [] and {d["chosen"] for d in attention_summary(flux)["decisions"]} == {fake.name}


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_mask_takes_the_next_backend_with_one_warning_and_flex_serves_it(kind, registered):
    fake = registered(ab.fake_available(ab.backend_named("flash-attn-2"), devices=("cpu",)))
    fake = registered(ab.Backend(**{**fake.__dict__, "dtypes": ab.FLOATS}))
    model = Masked()
    x = masked_input()
    mask = torch.rand(8, 8) > 0.3 if kind == "bool" else torch.randn(1, 1, 8, 8)
    mask[..., 0] = True if kind == "bool" else mask[..., 0]
    inputs = {"x": x, "mask": mask}
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend=fake.name))
    assert len(warned) == 1 and f"takes no {kind} attention mask" in warned[0]
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    hookwise.remove(model)
    out, warned = run(model, inputs, hookwise.Attention(backend="flex"))
    assert warned == [] and attention_summary(model)["decisions"][0]["chosen"] == "flex"
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)


def test_dropout_takes_the_next_backend_on_the_cpu():
    model = Masked(dropout=0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hookwise.apply(model, hookwise.Attention(backend="sdpa-flash"))
        model(masked_input())
    warned = hookwise_warnings(record)
    assert len(warned) == 1 and "takes no dropout" in warned[0]
    decision = attention_summary(model)["decisions"][0]
    assert decision["chosen"] == "sdpa" and decision["errors"] == {}  # random outputs are not compared


def test_a_backend_failing_on_the_call_takes_the_next_with_one_warning(registered):
    def broken(call):
        raise RuntimeError("no kernel image is available for execution on the device")

    registered(ab.Backend("broken", broken))
    model, inputs = tiny_flux()
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend="broken"))
    assert len(warned) == 1 and "failed on this call (RuntimeError: no kernel image" in warned[0]
    assert torch.equal(out, plain)


# ---- the numerics check -----------------------------------------------------------------------------------
def test_a_corrupted_backend_is_disabled_by_the_numerics_check(registered):
    registered(ab.Backend("corrupt", scaled(1.01)))
    model, inputs = tiny_flux()
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend="corrupt"))
    assert torch.equal(out, plain)  # the call is computed again by the next backend
    assert len(warned) == 1 and "disagrees with the math reference by 0.01" in warned[0], warned
    summary = attention_summary(model)
    assert "corrupt" in summary["disabled"] and {d["chosen"] for d in summary["decisions"]} == {"sdpa"}
    output_of(model, inputs)
    assert summary["decisions"] == attention_summary(model)["decisions"]  # decided once


def test_an_error_within_the_stated_tolerance_passes(registered):
    registered(ab.Backend("close", scaled(1 + 1e-6)))
    model, inputs = tiny_flux()
    _, warned = run(model, inputs, hookwise.Attention(backend="close"))
    assert warned == [] and {d["chosen"] for d in attention_summary(model)["decisions"]} == {"close"}


def test_auto_never_keeps_a_corrupted_backend_however_fast(registered):
    registered(ab.Backend("corrupt", lambda call: torch.zeros_like(call.query[..., : call.value.shape[-1]])))
    model, inputs = tiny_flux()
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend="auto", repeats=1))
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    summary = attention_summary(model)
    assert "corrupt" in summary["disabled"] and all(d["chosen"] != "corrupt" for d in summary["decisions"])
    assert len(warned) == 1 and "'corrupt'" in warned[0]


def test_the_check_can_be_turned_off(registered):
    registered(ab.Backend("corrupt", scaled(1.01)))
    model, inputs = tiny_flux()
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend="corrupt", check=False))
    assert warned == [] and torch.allclose(out, plain) is False


# ---- scope, targets, removal ---------------------------------------------------------------------------
def test_only_the_hooked_model_is_routed_and_removal_is_exact(registered):
    calls = []

    def counting(call):
        calls.append(call.describe())
        return F.scaled_dot_product_attention(**call.sdpa_kwargs())

    registered(ab.Backend("counting", counting))
    hooked, inputs = tiny_flux()
    other, _ = tiny_flux()
    plain = output_of(other, inputs)
    hookwise.apply(hooked, hookwise.Attention(backend="counting"))
    torch.testing.assert_close(output_of(hooked, inputs), plain, rtol=0, atol=0)
    assert len(calls) == 2  # the joint and the single block's attention
    assert torch.equal(output_of(other, inputs), plain) and len(calls) == 2
    q = torch.randn(1, 2, 5, 8)
    F.scaled_dot_product_attention(q, q, q)  # outside any hooked module
    assert len(calls) == 2
    hookwise.remove(hooked)
    assert list_hooks(hooked) == {}
    assert all("forward" not in vars(m) for m in hooked.modules())
    assert torch.equal(output_of(hooked, inputs), plain) and len(calls) == 2


def test_backends_per_tower():
    model, inputs = tiny_flux()
    plain = output_of(model, inputs)
    config = hookwise.Attention(backend={"single_transformer_blocks": "flex", "transformer_blocks": ["sdpa-math"]})
    out, warned = run(model, inputs, config)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    modules = attention_summary(model)["modules"]
    assert modules["transformer_blocks.0.attn"]["backends"] == ["sdpa-math", "sdpa"]
    assert modules["single_transformer_blocks.0.attn"]["backends"] == ["flex", "sdpa"]
    assert set(modules["single_transformer_blocks.0.attn"]["chosen"].values()) == {"flex"}
    hookwise.remove(model)
    hookwise.apply(model, hookwise.Attention(backend={r"^single_.*attn$": "flex"}))  # a pattern; the rest left alone
    assert list(attention_summary(model)["modules"]) == ["single_transformer_blocks.0.attn"]


def test_matching_no_attention_module_raises():
    with pytest.raises(NoTargetError, match="found no attention module"):
        hookwise.apply(mlp(), hookwise.Attention())
    model, _ = tiny_flux()
    with pytest.raises(NoTargetError, match=r"\['temporal'\] match no attention module"):
        hookwise.apply(model, hookwise.Attention(backend={"temporal": "flex"}))
    assert list_hooks(model) == {}


def test_blocks_that_compute_attention_inline_are_routed():
    model, inputs = tiny_musubi()  # fused qkv, attention computed in the blocks' own forward
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend="flex"))
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    modules = attention_summary(model)["modules"]
    assert sorted(modules) == [f"double_blocks.{i}" for i in range(2)] + [f"single_blocks.{i}" for i in range(3)]
    assert all(m["routed"] == 1 for m in modules.values())


def test_nested_containers_reused_blocks_and_softmax_attention():
    # a tower of fused-qkv blocks two containers deep, block 1 called twice; and one computing softmax(q k^T)
    model = Tree([(["holder", "dict"], "list", ["fused", "fused"], [0, 1, 1]), (["list"], "seq", ["fused-softmax"] * 2, [0, 1])])
    x = x_input()
    with torch.no_grad():
        plain = model(x)
    hookwise.apply(model, hookwise.Attention(backend="sdpa-math"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-6)
    modules = attention_summary(model)["modules"]
    sdpa_tower = {p: m for p, m in modules.items() if p.startswith("parta")}
    assert [m["routed"] for m in sdpa_tower.values()] == [1, 2]
    softmax = [m for p, m in modules.items() if p.startswith("partb")]
    assert softmax and all(m["calls"] >= 1 and m["routed"] == 0 for m in softmax)  # no SDPA call to route


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(towers=trees())
def test_on_random_trees_the_output_and_gradients_are_exact_or_hookwise_refuses(towers):
    torch.manual_seed(0)
    model = Tree(towers)
    x = x_input()
    plain = fwd_bwd(model, {"x": x})
    try:
        hookwise.apply(model, hookwise.Attention(backend="sdpa-flash"))
    except HookwiseError:
        return
    try:
        try:
            out, grads = fwd_bwd(model, {"x": x})
        except HookwiseError:  # the first call's map check: a hooked attention module never ran
            return
        torch.testing.assert_close(out, plain[0], rtol=0, atol=0)
        assert grads.keys() == plain[1].keys()
        for name in grads:
            torch.testing.assert_close(grads[name], plain[1][name], rtol=0, atol=0, msg=name)
    finally:
        hookwise.remove(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain[0], rtol=0, atol=0)


# ---- composition ----------------------------------------------------------------------------------------
def test_composes_with_casting_block_offload_and_a_step_cache():
    def stack():
        return [hookwise.LayerwiseCasting(storage_dtype=torch.bfloat16),
                hookwise.Offload(onload_device="cpu", granularity="block"), hookwise.FirstBlockCache(threshold=10.0)]  # fmt: skip

    def steps(model, inputs):
        outs = []
        for t in (1.0, 0.9, 0.85):
            outs.append(output_of(model, dict(inputs, timestep=torch.full((1,), t))))
        return torch.stack(outs)

    base, inputs = tiny_flux()
    hookwise.apply(base, *stack())
    expected = steps(base, inputs)
    for backend, atol in (("sdpa-flash", 0.0), ("flex", 1e-5)):
        model, _ = tiny_flux()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            hookwise.apply(model, *stack(), hookwise.Attention(backend=backend))
            got = steps(model, inputs)
        assert hookwise_warnings(record) == []  # no fallback
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)
        assert hookwise.applied(model).names()[-2:] == ["attention", "first_block_cache"]
        routed = sum(m["routed"] for m in attention_summary(model)["modules"].values())
        assert 0 < routed < 6  # the cache skipped the second block on a cached step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hookwise.remove(model, "attention")
        assert attention_summary(model)["modules"] == {}
        torch.testing.assert_close(steps(model, inputs), steps(base, inputs), rtol=0, atol=0)


# ---- config -----------------------------------------------------------------------------------------------
def test_the_config_round_trips_through_a_saved_stack():
    for backend in ("auto", "flex", ("flex", "sdpa-math"), {"transformer_blocks": "auto", "single": ["flex"]}):
        config = hookwise.Attention(backend=backend, repeats=2)
        again = hookwise.Stack.from_json(hookwise.Stack(config).to_json()).configs[0]
        assert again == config and hash(again) == hash(config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="flash"), "no attention backend named 'flash'"),
        (dict(backend=["auto", "flex"]), "'auto' stands alone"),
        (dict(backend=["flex", "flex"]), "names a backend twice"),
        (dict(backend={}), "at least one tower"),
        (dict(backend={"(": "flex"}), "not a valid regular expression"),
        (dict(backend=3), "use 'auto', a backend name"),
        (dict(repeats=0), "repeats must be an integer >= 1"),
        (dict(check="yes"), "use True or False"),
    ],
)
def test_bad_configs_say_what_to_do(kwargs, message):
    with pytest.raises(hookwise.ConfigError, match=message):
        hookwise.Attention(**kwargs)


# ---- GPU backends: constraints on the CPU with fake availability, missing packages -------------------------
def _call(dtype=torch.float16, heads=2, kv_heads=2, q_len=16, kv_len=16, dim=64, mask=None, causal=False,
          grad=False) -> ab.AttnCall:  # fmt: skip
    q = torch.randn(1, heads, q_len, dim, dtype=dtype, requires_grad=grad)
    k = torch.randn(1, kv_heads, kv_len, dim, dtype=dtype)
    return ab.AttnCall(q, k, k.clone(), attn_mask=mask, is_causal=causal, enable_gqa=kv_heads != heads)


@pytest.mark.parametrize(
    "name, call, reason",
    [
        ("flash-attn-2", dict(dtype=torch.float32), "takes float16, bfloat16 inputs, not float32"),
        ("flash-attn-2", dict(dim=264), "head dim 264 is over its limit of 256"),
        ("flash-attn-2", dict(dim=12), "head dim 12 is not a multiple of 8"),
        ("flash-attn-2", dict(mask=torch.ones(16, 16, dtype=torch.bool)), "takes no bool attention mask"),
        ("flash-attn-2", dict(causal=True, q_len=8), "aligns causal attention bottom-right: query and key lengths differ"),
        ("flash-attn-2", dict(causal=True, heads=4, kv_heads=2, grad=True), None),
        ("flash-attn-3", dict(dtype=torch.bfloat16, dim=128, grad=True), None),
        ("sage", dict(dim=80), "head dim 80 is not one of [64, 96, 128]"),
        ("sage", dict(grad=True), "has no backward on cpu (training)"),
        ("sage", dict(heads=4, kv_heads=2), "takes no grouped-query attention (4 query heads, 2 key/value heads)"),
        ("sage", dict(dtype=torch.bfloat16, causal=True), None),
        ("xformers", dict(heads=4, kv_heads=1), "takes no grouped-query attention (4 query heads, 1 key/value heads)"),
        ("xformers", dict(dtype=torch.float32, causal=True, grad=True), None),
        ("sdpa-cudnn", dict(dim=256), "head dim 256 is over its limit of 128"),
    ],
)
def test_gpu_backend_constraints_checked_on_the_real_arguments(name, call, reason):
    fake = ab.fake_available(ab.backend_named(name), devices=("cpu",))
    assert fake.refuse(_call(**call)) == reason
    on_cuda_only = ab.fake_available(ab.backend_named(name), devices=("cuda",))
    assert on_cuda_only.refuse(_call(**call)) == "runs on cuda, not cpu"


@pytest.mark.parametrize(
    "backend, package, extra",
    [("xformers", "xformers", "xformers"), ("flash-attn-2", "flash_attn", "flash-attn"), ("sage", "sageattention", "sage")],
)
def test_each_missing_backend_package_names_its_hookwise_extra(monkeypatch, backend, package, extra):
    import tomllib

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    model, _ = tiny_flux()
    with pytest.raises(MissingDependencyError, match=re.escape(f"needs the '{package}' package") + r".*" + re.escape(f"`pip install 'hookwise[{extra}]'`")):
        hookwise.apply(model, hookwise.Attention(backend=backend))
    assert list_hooks(model) == {}
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.replace("-", "_").startswith(package) for req in extras[extra])  # the extra the message names exists
    assert not any(req.replace("-", "_").startswith(package) for req in extras["test"])  # CUDA builds: not in the test extra


def test_a_missing_package_is_an_error_naming_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    model, inputs = tiny_flux()
    with pytest.raises(MissingDependencyError, match="needs the 'xformers' package.*`pip install 'hookwise\\[xformers\\]'`"):
        hookwise.apply(model, hookwise.Attention(backend="xformers"))
    assert list_hooks(model) == {}
    assert "not installed" in attention_backends()["xformers"]
    hookwise.apply(model, hookwise.Attention(backend=["xformers", "sdpa-math"]))  # another one installed: fine
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        output_of(model, inputs)
    assert any("the 'xformers' package is not installed" in w for w in hookwise_warnings(record))


# ---- CUDA ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_installed_backend_on_cuda_matches_math(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=dtype) for _ in range(3))
    call = ab.AttnCall(q, k, v)
    index, _ = ab.probe_slice(call, heads=4, rows=256)
    ref = ab.reference(call, index)
    served = []
    for name in ab.backend_names():
        backend = ab.backend_named(name)
        if backend.refuse(call) is None:
            out = backend.call(call)
            assert ab.relative_error(out[index], ref) <= backend.tolerance_for(dtype), name
            served.append(name)
    assert {"sdpa", "sdpa-math", "sdpa-flash", "sdpa-efficient", "flex"} <= set(served)


@pytest.mark.gpu
def test_auto_on_cuda_picks_a_checked_backend_and_trains():
    model, inputs = tiny_flux()
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    plain = output_of(model, inputs)
    out, warned = run(model, inputs, hookwise.Attention(backend="auto"))
    torch.testing.assert_close(out.float(), plain.float(), rtol=0, atol=3e-2)
    decisions = attention_summary(model)["decisions"]
    assert all(d["chosen"] in d["times_ms"] for d in decisions)


def test_the_readme_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Attention backends") :], re.S).group(1)
    model, inputs = tiny_flux()
    plain = output_of(model, inputs)
    namespace = {"transformer": model, "inputs": inputs, "print": lambda *a: None}
    with torch.no_grad():
        exec(code, namespace)
    torch.testing.assert_close(sample_of(namespace["out"], "readme"), plain, rtol=0, atol=1e-5)
    assert list_hooks(model) == {}


def test_blocks_compiled_whole_trace_their_sdpa_kernel_chain_without_recompiling():
    import torch._dynamo

    model, inputs = tiny_flux()
    plain = output_of(model, inputs)
    hookwise.apply(model, hookwise.Attention(backend="sdpa-math"))
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile()
    torch._dynamo.reset()
    try:
        output_of(model, inputs)  # the first call runs eagerly (the model map's first-call check)
        output_of(model, inputs)  # compiles each block once, the pinned SDPA kernel traced into its graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in (0.9, 0.8):
                out = output_of(model, dict(inputs, timestep=torch.full((1,), t)))
        torch.testing.assert_close(output_of(model, inputs), plain, rtol=0, atol=1e-5)
        # only the eager first call went through the routing mode; the compiled calls ran in the graphs
        assert all(m["routed"] == 1 for m in attention_summary(model)["modules"].values())
    finally:
        torch._dynamo.reset()
