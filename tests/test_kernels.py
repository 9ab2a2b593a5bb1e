"""Fused DiT kernels: the Triton kernels against the eager expressions (forward and gradients), and the
Kernels technique: sites found on FLUX / Wan / odd models, hooks that compute the forward, numerics
checked at apply, exact removal, clear errors.

Triton kernels run on the CPU only in Triton's interpreter, which must be switched on before triton is
imported: `test_triton_kernels_under_the_interpreter` runs the `test_interpreted_*` tests of this file in
a child pytest with `TRITON_INTERPRET=1`, so the setting never reaches the other tests of this process
(here those tests skip). On CUDA the `gpu` tests run the same checks on the device, Liger's paths too.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hookwise
from hookwise import Kernels, kernels_summary
from hookwise.errors import ConfigError, MissingDependencyError, NoTargetError
from hookwise.kernels import _patterns as patterns
from hookwise.kernels import fused
from cache_helpers import one_thread  # noqa: F401 - the fixture
from kernel_helpers import count_fused_calls, custom_dit
from model_helpers import tiny_flux, tiny_musubi, tiny_wan
from offload_helpers import add_lora, fwd_bwd

pytestmark = pytest.mark.usefixtures("one_thread")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the child process of test_triton_kernels_under_the_interpreter"
)


# ---- the kernels against the eager expressions ------------------------------------------------------
def close(fused_values, eager_values, rtol: float) -> None:
    for i, (a, b) in enumerate(zip(fused_values, eager_values)):
        assert (a is None) == (b is None), i
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        bound = rtol * max(b.float().abs().max().item(), 1e-6)
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= bound, f"value {i}: differs by {diff:.3g} > {bound:.3g}"


def against_eager(fused_fn, eager_fn, tensors, *rest, rtol=1e-5, constants=()) -> None:
    """Forward values and the gradients of every tensor argument (but those at `constants`) agree."""
    def run(fn):
        leaves = [t.detach().clone().requires_grad_(i not in constants) if t is not None else None
                  for i, t in enumerate(tensors)]
        out = fn(*leaves, *rest)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
        return [out.detach(), *torch.autograd.grad(out, wrt, cot)]

    close(run(fused_fn), run(eager_fn), rtol)


def kernel_checks(device: str, dtype: torch.dtype = torch.float32) -> None:
    from hookwise.kernels import _triton_dit as tk

    rtol = fused.TOLERANCE[dtype] if dtype != torch.float32 else 1e-5
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    b, t = 2, 5
    for width in (24, 40):  # not powers of two: masked columns
        x = rand(b, t, width)
        mods = {
            "none": (None, None),
            "per_batch": (rand(b, 1, width, scale=0.3), rand(b, 1, width, scale=0.3)),
            "per_token": (rand(b, t, width, scale=0.3), rand(b, t, width, scale=0.3)),
        }
        for rms in (True, False):
            for affine in (True, False):
                w, bias = (rand(width), rand(width)) if affine else (None, None)
                for scale, shift in mods.values():
                    against_eager(
                        tk.norm_modulate, patterns.norm_modulate, [x, w, bias, scale, shift], 1e-6, rms, rtol=rtol
                    )
        for gate in (rand(b, 1, width), rand(b, t, width)):
            against_eager(tk.gated_residual, patterns.gated_residual, [x, gate, rand(b, t, width)], rtol=rtol)
        h = rand(b, t, 2 * width, scale=3.0)
        for approximate in ("tanh", "none"):
            against_eager(tk.gelu, patterns.gelu, [h], approximate, rtol=rtol)
            against_eager(tk.geglu, patterns.geglu, [h], approximate, rtol=rtol)
        against_eager(tk.swiglu, patterns.swiglu, [h], rtol=rtol)
    # rotary: FLUX layout (batch, heads, seq, head_dim), Wan layout (batch, seq, heads, head_dim)
    seq, heads, d = 6, 3, 8
    cos_a, sin_a, cos_b, sin_b = (rand(seq, d // 2) for _ in range(4))
    against_eager(tk.rope_interleaved, patterns.rope_interleaved, [rand(b, heads, seq, d), cos_a, sin_a, cos_b, sin_b], 2, rtol=rtol,
                  constants=(1, 2, 3, 4))
    against_eager(tk.rope_interleaved, patterns.rope_interleaved, [rand(b, seq, heads, d), cos_a, sin_a, cos_b, sin_b], 1, rtol=rtol,
                  constants=(1, 2, 3, 4))
    for layout in ((b, heads, seq, d), (b, seq, heads, d)):  # rotate-half, both layouts
        against_eager(tk.rope_half, patterns.rope_half, [rand(*layout), cos_a, sin_a, cos_b, sin_b], 2 if layout[1] == heads else 1,
                      rtol=rtol, constants=(1, 2, 3, 4))
    # many short rows: several programs of ROWS rows each, the last one partly masked
    x = rand(37, 3, 24)
    against_eager(tk.norm_modulate, patterns.norm_modulate, [x, rand(24), None, rand(37, 1, 24), rand(37, 1, 24)], 1e-6, True, rtol=rtol)
    against_eager(tk.rope_interleaved, patterns.rope_interleaved, [rand(5, 37, d), *(rand(37, d // 2) for _ in range(4))], 1,
                  rtol=rtol, constants=(1, 2, 3, 4))


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_interpreted_"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) == 5 and "skipped" not in result.stdout, tail


@interpreted
def test_interpreted_kernels_match_the_eager_expressions_forward_and_backward():
    kernel_checks("cpu")


@interpreted
@pytest.mark.parametrize("build", [tiny_flux, tiny_wan], ids=["flux", "wan"])
def test_interpreted_triton_backend_trains_lora_like_eager(build):
    model, inputs = build()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(backend="triton"))
    summary = kernels_summary(model)
    assert summary["used"] and summary["rejected"] == {}, summary["rejected"]
    out, grads = fwd_bwd(model, inputs)
    close([out, *(grads[k] for k in expected[1])], [expected[0], *expected[1].values()], 1e-4)


@interpreted
def test_interpreted_structural_route_trains_lora_like_eager():
    # A custom DiT: gates, interleaved and rotate-half rope found in its blocks' traced forwards, on Triton.
    model, inputs = custom_dit()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="triton"))
    calls = count_fused_calls(model)
    out, grads = fwd_bwd(model, inputs)
    assert kernels_summary(model)["rejected"] == {} and set(kernels_summary(model)["used"].values()) == {"structural"}
    close([out, *(grads[k] for k in expected[1])], [expected[0], *expected[1].values()], 1e-4)
    assert calls["gated_residual"] and calls["rope_interleaved"] and calls["rope_half"]


def swiglu_dit() -> tuple[nn.Module, dict]:
    """Two pre-norm blocks whose feed-forward is diffusers' FeedForward(activation_fn="swiglu")."""
    from diffusers.models.attention import FeedForward

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(24)
            self.ff = FeedForward(24, mult=2, activation_fn="swiglu")

        def forward(self, x):
            return x + self.ff(self.norm(x))

    class DiT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    return DiT(), {"x": torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(1))}


def swiglu_site_matches_eager(backend: str) -> None:
    model, inputs = swiglu_dit()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("swiglu",), backend=backend))
    summary = kernels_summary(model)
    assert summary["used"] == {"blocks.0.ff.net.0": "swiglu_proj", "blocks.1.ff.net.0": "swiglu_proj"}, summary
    calls = count_fused_calls(model)
    out, grads = fwd_bwd(model, inputs)
    close([out, *(grads[k] for k in expected[1])], [expected[0], *expected[1].values()], 1e-5)
    assert calls == {"swiglu": 2}


def test_swiglu_feed_forward_is_a_site_and_matches_eager_forward_and_backward():
    swiglu_site_matches_eager("eager")


@interpreted
def test_interpreted_swiglu_kernel_trains_like_eager():
    swiglu_site_matches_eager("triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernels_on_cuda_match_the_eager_expressions(dtype):
    pytest.importorskip("triton")
    kernel_checks("cuda", dtype)


@pytest.mark.gpu
def test_liger_norms_and_gelu_mul_on_cuda_match_eager():
    liger = pytest.importorskip("liger_kernel")  # noqa: F841 - the functions below need it
    from hookwise.kernels import _triton_dit as tk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 40, generator=g).cuda()
    w, b = torch.randn(40, generator=g).cuda(), torch.randn(40, generator=g).cuda()
    norm = fused.backend_ops("triton", torch.device("cuda"))["norm_modulate"]
    for rms, bias in ((True, None), (False, b)):
        against_eager(norm, patterns.norm_modulate, [x, w, bias, None, None], 1e-6, rms, rtol=1e-4)
    gelu_mul = tk.liger_function("gelu_mul")
    a, gate = torch.randn(2, 7, 40, generator=g).cuda(), torch.randn(2, 7, 40, generator=g).cuda()
    against_eager(lambda a, gt: gelu_mul.apply(gt, a), lambda a, gt: a * F.gelu(gt, approximate="tanh"), [a, gate], rtol=1e-4)


def test_eager_rope_expression_is_diffusers_interleaved_layout():
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(0)
    b, heads, seq, d = 2, 3, 6, 8
    x = torch.randn(b, heads, seq, d, generator=g)
    angles = torch.randn(seq, d // 2, generator=g)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    flux = apply_rotary_emb(x, (cos, sin))  # FLUX: (S, D) tables, pairs (x[2i], x[2i+1])
    ours = patterns.rope_interleaved(x, cos[:, 0::2], sin[:, 0::2], cos[:, 1::2], sin[:, 1::2], 2)
    torch.testing.assert_close(ours, flux)
    # Wan's processor: x (B, S, H, D), cos from even, sin from odd columns
    xw = x.transpose(1, 2)
    x1, x2 = xw.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
    wan = torch.empty_like(xw)
    wan[..., 0::2], wan[..., 1::2] = x1 * c - x2 * s, x1 * s + x2 * c
    ours = patterns.rope_interleaved(xw, cos[:, 0::2], sin[:, 1::2], cos[:, 0::2], sin[:, 1::2], 1)
    torch.testing.assert_close(ours, wan)


# ---- the Kernels technique -------------------------------------------------------------------------------
def test_flux_sites_come_from_its_entry_and_its_blocks_and_processors():
    model, inputs = tiny_flux()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(backend="eager"))
    summary = kernels_summary(model)
    used = summary["used"]
    assert used["transformer_blocks.0.norm1"] == "adaln_zero"
    assert used["single_transformer_blocks.0.norm"] == "adaln_single"
    assert used["norm_out"] == "adaln_continuous"
    assert used["transformer_blocks.0.attn.norm_q"] == "rms_norm"
    assert used["transformer_blocks.0.ff.net.0"] == "gelu_proj"
    assert "transformer_blocks.0.norm1.norm" not in used  # computed by its adaptive norm's fused op
    assert used["transformer_blocks.0"] == "flux_double" and used["transformer_blocks.0.attn"] == "flux_rope"
    assert summary["inline"] == {} and summary["rejected"] == {} and summary["unmatched"] == ["swiglu"]  # FLUX has none
    calls = count_fused_calls(model)
    out, grads = fwd_bwd(model, inputs)
    assert calls["norm_modulate"] >= 9 and calls["gelu"] >= 3  # the hooks computed those forwards
    assert calls["gated_residual"] == 5 and calls["rope_interleaved"] == 4  # 4 gates + 1, q and k twice
    close([out, *(grads[k] for k in expected[1])], [expected[0], *expected[1].values()], 1e-5)


def test_wan_norms_and_gelu_are_replaced_and_modulation_goes_through_its_block():
    model, inputs = tiny_wan()
    hookwise.apply(model, Kernels(backend="eager", ops=("norm", "modulate", "geglu")))
    summary = kernels_summary(model)
    kinds = set(summary["used"].values())
    assert {"layer_norm", "rms_norm", "gelu_proj", "wan_block"} <= kinds and "wan_rope" not in kinds
    assert summary["inline"] == {} and summary["unmatched"] == []
    calls = count_fused_calls(model)
    model(**inputs)
    assert calls["norm_modulate"] > 0
    assert all(set(h.ops) == {"norm_modulate"} for h in hookwise.core.hooks.hooks_named(model, fused.HOOK_NAME, fused.BlockHook).values())


def test_removal_gives_every_module_its_own_forward_back():
    model, inputs = tiny_flux()
    before = {p: ("forward" in m.__dict__) for p, m in model.named_modules()}
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(backend="eager"))
    assert any("forward" in m.__dict__ for m in model.modules())
    hookwise.remove(model)
    assert {p: ("forward" in m.__dict__) for p, m in model.named_modules()} == before
    assert kernels_summary(model) == {}
    out, grads = fwd_bwd(model, inputs)
    assert torch.equal(out, expected[0]) and all(torch.equal(grads[k], v) for k, v in expected[1].items())


def test_a_site_failing_the_numerics_check_keeps_its_forward_and_the_summary_says_why(monkeypatch, caplog):
    def off_by_a_bit(backend, device):
        ops = dict(patterns.EXPRESSIONS)
        ops["norm_modulate"] = lambda *args: patterns.norm_modulate(*args) * 1.01
        return ops

    monkeypatch.setattr(fused, "backend_ops", off_by_a_bit)
    model, inputs = tiny_musubi()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    with caplog.at_level(logging.WARNING, logger="hookwise.kernels"):
        hookwise.apply(model, Kernels(backend="eager"))
    summary = kernels_summary(model)
    assert set(summary["used"].values()) == {"gelu", "structural"}  # the GELUs pass, every norm is refused
    assert summary["rejected"]["double_blocks.0.img_norm1"].startswith("eager: output 0 differs from eager by")
    assert any("keep their eager forward" in r.getMessage() for r in caplog.records)
    out, grads = fwd_bwd(model, inputs)
    assert torch.equal(out, expected[0])


def test_gradients_are_part_of_the_check(monkeypatch):
    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, dy):
            return dy * 2

    def wrong_grad(backend, device):
        ops = dict(patterns.EXPRESSIONS)
        ops["gelu"] = lambda x, approximate: WrongBackward.apply(patterns.gelu(x, approximate))
        return ops

    monkeypatch.setattr(fused, "backend_ops", wrong_grad)
    model, _ = tiny_musubi()
    hookwise.apply(model, Kernels(backend="eager", ops=("norm", "geglu")))
    rejected = kernels_summary(model)["rejected"]
    assert rejected["double_blocks.0.img_mlp.1"].startswith("eager: gradient 0 differs")


def test_matching_nothing_raises_and_attaches_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(NoTargetError, match=r"found no module to replace in Sequential"):
        hookwise.apply(model, Kernels(ops=("norm",), backend="eager"))
    assert not any("forward" in m.__dict__ for m in model.modules())
    musubi, _ = tiny_musubi()  # its blocks have no rotary embedding: the structural route finds none
    with pytest.raises(NoTargetError, match=r"found no module to replace in MusubiDiT"):
        hookwise.apply(musubi, Kernels(ops=("rope",), backend="eager"))
    assert hookwise.list_hooks(musubi) == {}


def test_missing_triton_names_the_extra_and_applies_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails
    model, _ = tiny_musubi()
    with pytest.raises(MissingDependencyError, match=r"hookwise\[triton\]"):
        hookwise.apply(model, Kernels(backend="triton"))
    assert hookwise.list_hooks(model) == {} and kernels_summary(model) == {}


def test_config_is_validated_and_round_trips():
    with pytest.raises(ConfigError, match="unknown or no ops"):
        Kernels(ops=("norm", "softmax"))
    with pytest.raises(ConfigError, match="must be a list or tuple"):
        Kernels(ops="norm")
    with pytest.raises(ConfigError, match="not a backend"):
        Kernels(backend="cuda")
    config = Kernels(ops=["norm", "geglu"], backend="compile")
    assert Kernels.from_dict(config.to_dict()) == config


def test_a_norm_shared_by_two_blocks_and_one_never_called_are_hooked_once():
    class Block(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm, self.lin, self.unused = norm, nn.Linear(12, 12), nn.LayerNorm(12)

        def forward(self, x):
            return x + self.lin(self.norm(x))

    shared = nn.LayerNorm(12)
    model = nn.Sequential(Block(shared), Block(shared))
    x = torch.randn(2, 5, 12)
    expected = model(x)
    hookwise.apply(model, Kernels(ops=("norm",), backend="eager"))
    used = kernels_summary(model)["used"]
    assert "0.norm" in used and "1.norm" not in used and "0.unused" in used
    calls = count_fused_calls(model)
    torch.testing.assert_close(model(x), expected)
    assert calls["norm_modulate"] == 2  # the shared norm, called by both blocks


def test_bf16_flux_sites_pass_the_check_within_the_stated_bound():
    model, inputs = tiny_flux()
    model = model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    expected = model(**inputs).sample
    hookwise.apply(model, Kernels(backend="eager"))
    assert kernels_summary(model)["rejected"] == {}
    out = model(**inputs).sample
    # The fused ops round once, in fp32; the eager chain rounds to bf16 after every op.
    assert (out.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()


def test_compile_backend_trains_lora_within_the_bound():
    torch._dynamo.reset()
    model, inputs = tiny_musubi()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("geglu",), backend="compile"))
    summary = kernels_summary(model)
    assert set(summary["used"].values()) == {"gelu"} and summary["rejected"] == {}
    out, grads = fwd_bwd(model, inputs)
    close([out, *(grads[k] for k in expected[1])], [expected[0], *expected[1].values()], 1e-5)
    assert fused._GENERATED  # the generated functions ran
    torch._dynamo.reset()


def test_kernels_under_casting_and_offload_match_the_same_stack_without_them():
    from hookwise import LayerwiseCasting, Offload

    model, inputs = tiny_flux()
    add_lora(model)
    plain = copy.deepcopy(model)
    hookwise.apply(plain, LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), Offload(onload_device="cpu"))
    expected = fwd_bwd(plain, inputs)
    hookwise.apply(model, LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), Offload(onload_device="cpu"),
                   Kernels(backend="eager"))
    assert kernels_summary(model)["rejected"] == {}
    for _ in range(2):
        out, grads = fwd_bwd(model, inputs)
        close([out, *(grads[k] for k in expected[1])], [expected[0], *expected[1].values()], 1e-5)
    assert hookwise.offload_report(model).stats["loads"] > 0
