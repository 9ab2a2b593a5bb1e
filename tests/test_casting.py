import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import hookwise
from hookwise.core import Layer, TechniqueConfig, register_technique, unregister_technique
from hookwise.errors import CompatibilityError, ConfigError, NoTargetError
from hookwise.memory import LayerwiseCasting, casting_summary, saved_for_backward
from hookwise.memory import casting as casting_mod
from hookwise.memory import _dequant as dequant_mod
from model_helpers import TINY_DIFFUSERS, output_of, tiny_flux, tiny_musubi, tiny_wan

# Output relative error bounds per storage dtype: about 3x what the tiny models measure.
BOUNDS = {
    torch.float8_e4m3fn: 0.03,
    torch.float8_e5m2: 0.06,
    torch.bfloat16: 0.003,
    torch.float16: 0.001,
}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cast(model, **kwargs):
    hookwise.apply(model, LayerwiseCasting(**kwargs))
    return model


@pytest.mark.parametrize("arch", ["flux", "wan"])
@pytest.mark.parametrize("storage", list(BOUNDS), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("scaling", ["none", "tensor", "channel", "block"])
def test_cast_outputs_stay_close_to_the_uncast_model(arch, storage, scaling):
    model, inputs = TINY_DIFFUSERS[arch]()
    reference = output_of(model, inputs)
    cast(model, storage_dtype=storage, scaling=scaling)
    assert rel_err(output_of(model, inputs), reference) < BOUNDS[storage]


@pytest.mark.parametrize("arch", ["flux", "wan"])
def test_targeted_weight_bytes_halve_and_skipped_modules_are_untouched(arch):
    model, _ = TINY_DIFFUSERS[arch]()
    model.to(torch.bfloat16)
    params_before = dict(model.named_parameters())
    weights_before = {path: m.weight for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))}
    cast(model, scaling="none")
    summary = casting_summary(model)
    assert summary["cast"]
    assert summary["bytes_after"] * 2 == summary["bytes_before"]
    modules = dict(model.named_modules())
    for path in summary["cast"]:
        module = modules[path]
        before = weights_before[path]
        assert module.weight.dtype == torch.float8_e4m3fn
        assert module.weight.numel() * module.weight.element_size() * 2 == before.numel() * before.element_size()
        assert module.bias is params_before[f"{path}.bias"]  # biases stay in the compute dtype
    for path in summary["kept"]:
        assert modules[path].weight is weights_before[path]
        assert modules[path].weight.dtype == torch.bfloat16
    # everything that is not a cast weight is the very same parameter object
    cast_weights = {f"{p}.weight" for p in summary["cast"]}
    for name, param in model.named_parameters():
        if name not in cast_weights:
            assert param is params_before[name]


def test_scaled_modes_have_lower_weight_error_than_a_plain_cast_on_real_layer_shapes():
    # Layer shapes of Wan2.1-1.3B (width 1536, FFN 8960); weights drawn like a trained layer's.
    torch.manual_seed(0)
    shapes = {"attn.to_q": (1536, 1536), "ffn.net.0.proj": (8960, 1536), "ffn.net.2": (1536, 8960)}
    errors = {}
    for name, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f) / in_f**0.5
        w[: out_f // 32] *= 8  # some output channels with larger weights, as trained layers have
        w = w.to(torch.bfloat16)
        for scaling in ("none", "tensor", "channel", "block"):
            stored, scale, layout = dequant_mod.quantize(w, torch.float8_e4m3fn, scaling, 64, torch.bfloat16)
            back = dequant_mod.dequantize(stored, scale, torch.float32, layout)
            errors[(name, scaling)] = rel_err(back, w)
    for name in shapes:
        # Scaling lifts small weights out of fp8's subnormal range, where a plain cast loses precision.
        # (Between scaled modes fp8's error is nearly scale-invariant, so no order is asserted.)
        for scaling in ("tensor", "channel", "block"):
            assert errors[(name, scaling)] < errors[(name, "none")], (name, scaling)


def _bf16_flux():
    model, inputs = tiny_flux()
    model.to(torch.bfloat16).requires_grad_(False)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    inputs["hidden_states"].requires_grad_(True)
    return model, inputs


def _step(model, inputs):
    return lambda: model(**inputs).sample.float().pow(2).mean()


def test_training_step_saves_no_compute_dtype_copy_of_a_cast_weight():
    base, inputs = _bf16_flux()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    cast(ours, scaling="channel")
    theirs.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)

    plain = saved_for_backward(base, _step(base, inputs))
    mine = saved_for_backward(ours, _step(ours, inputs))
    diffusers = saved_for_backward(theirs, _step(theirs, inputs))

    summary = casting_summary(ours)
    modules = dict(ours.named_modules())
    cast_bytes_bf16 = summary["bytes_before"]
    # hookwise keeps exactly what the uncast model keeps: activations, no weight copy
    assert mine.new_bytes == plain.new_bytes
    for path in summary["cast"]:
        shape = tuple(modules[path].weight.shape)
        assert not mine.has_new_tensor(shape, torch.bfloat16), path
    # diffusers keeps a bf16 copy of each cast weight alive until backward
    assert diffusers.has_new_tensor(tuple(modules["transformer_blocks.0.attn.to_q"].weight.shape), torch.bfloat16)
    assert diffusers.new_bytes - mine.new_bytes >= cast_bytes_bf16 // 2
    assert mine.new_bytes + cast_bytes_bf16 // 2 <= diffusers.new_bytes


def test_gradients_flow_to_inputs_and_trainable_biases():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(5, 64, requires_grad=True)
    reference = copy.deepcopy(layer)
    reference.weight.data = reference.weight.data.to(torch.float8_e4m3fn).float()  # same rounding, no scales
    reference(x).sum().backward()
    grads = (x.grad.clone(), reference.bias.grad.clone())
    x.grad = None
    layer.weight.requires_grad_(False)
    model = nn.Sequential(nn.Sequential(layer))  # a tower of one block, so the leaf is castable
    cast(model, scaling="none", skip="none")
    model(x).sum().backward()
    torch.testing.assert_close(x.grad, grads[0])
    torch.testing.assert_close(layer.bias.grad, grads[1])
    assert layer.weight.grad is None


@pytest.mark.parametrize(
    "scaling,padding,mode", [("none", 1, "zeros"), ("channel", "same", "zeros"), ("block", 1, "reflect")]
)
def test_conv_leaves_compute_exactly_with_their_dequantized_weights(scaling, padding, mode):
    torch.manual_seed(0)

    def conv():
        return nn.Conv2d(8, 8, 3, padding=padding, padding_mode=mode)

    blocks = nn.Sequential(*[nn.Sequential(conv(), nn.GELU()) for _ in range(2)])
    blocks.requires_grad_(False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    cast(blocks, scaling=scaling, skip="none")
    assert blocks[0][0].weight.dtype == torch.float8_e4m3fn
    y = blocks(x)
    y.square().mean().backward()
    grad, x.grad = x.grad.clone(), None
    # the same network with the dequantized weights as plain fp32 parameters (what removal leaves)
    with pytest.warns(UserWarning, match="storage rounding stays"):
        hookwise.remove(blocks)
    assert blocks[0][0].weight.dtype == torch.float32
    y_ref = blocks(x)
    y_ref.square().mean().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad, x.grad)


def test_compiled_cast_model_matches_eager():
    model, inputs = tiny_musubi()
    cast(model)
    eager = output_of(model, inputs)
    compiled = torch.compile(model)
    torch.testing.assert_close(output_of(compiled, inputs), eager, rtol=1e-4, atol=1e-5)


def test_a_forward_that_reads_a_weight_dtype_keeps_that_module_in_high_precision():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, x):
            return self.out(self.proj(x.to(self.proj.weight.dtype)))

    torch.manual_seed(0)
    model = nn.Sequential(Head(), Head()).eval()
    x = torch.randn(3, 8)
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cast(model, skip="none")
    summary = casting_summary(model)
    assert sorted(summary["cast"]) == ["0.out", "1.out"]
    assert summary["kept"]["0.proj"].startswith("dtype read")
    assert model[0].proj.weight.dtype == torch.float32
    assert rel_err(model(x), reference) < BOUNDS[torch.float8_e4m3fn]


def test_wan_embedder_whose_parameter_dtype_is_read_is_detected_even_with_skip_none():
    model, inputs = tiny_wan()
    reference = output_of(model, inputs)
    cast(model, skip="none")
    kept = casting_summary(model)["kept"]
    assert kept["condition_embedder.time_embedder.linear_1"].startswith("dtype read")
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    # next(iter(....parameters())).dtype reads the first parameter only: the second layer is cast
    assert "condition_embedder.time_embedder.linear_2" in casting_summary(model)["cast"]
    assert rel_err(output_of(model, inputs), reference) < BOUNDS[torch.float8_e4m3fn]


def test_model_dtype_property_keeps_reporting_the_compute_dtype():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

        @property
        def dtype(self):
            return next(self.parameters()).dtype

        def forward(self, x):
            x = x.to(self.dtype)
            for block in self.blocks:
                x = block(x)
            return x

    model = Model().eval()
    cast(model, skip="none")
    assert model.dtype == torch.float32
    assert casting_summary(model)["cast"] == ["blocks.1.0"]


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-cast", "cast-then-lora"])
def test_peft_lora_on_a_cast_model_trains_and_matches_uncast_gradients(lora_first):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, inputs = tiny_flux()
    base.requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    reference = peft.inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(base))
    if lora_first:
        model = peft.inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(base))
        cast(model, scaling="block")
    else:
        model = cast(copy.deepcopy(base), scaling="block")
        model = peft.inject_adapter_in_model(copy.deepcopy(config), model)
    # make the adapters identical to the reference's
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if "lora_" in k}, strict=False)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    assert any(".base_layer" in path for path in casting_summary(model)["cast"])

    target = torch.randn_like(output_of(base, inputs))

    def loss_of(m):
        return (m(**inputs).sample - target).pow(2).mean()

    loss_of(reference).backward()
    loss_of(model).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if "lora_" in n}
    for name, param in lora.items():
        cosine = nn.functional.cosine_similarity(param.grad.flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name
        assert rel_err(param.grad, ref_grads[name]) < 0.1, name

    def train(m, steps=20):
        params = [p for n, p in m.named_parameters() if "lora_" in n]
        optimizer = torch.optim.Adam(params, lr=1e-2)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_of(m)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    cast_losses, ref_losses = train(model), train(reference)
    assert cast_losses[-1] < 0.75 * cast_losses[0]
    assert abs(cast_losses[-1] - ref_losses[-1]) < 0.15 * ref_losses[-1]


def test_remove_restores_compute_dtype_weights_warns_and_leaves_nothing_behind():
    model, inputs = tiny_musubi()
    names_before = {p for p, _ in model.named_modules()}
    dict_before = {p: set(m.__dict__) for p, m in model.named_modules()}
    cast(model, scaling="channel")
    cast_out = output_of(model, inputs)
    with pytest.warns(UserWarning, match="rounding"):
        assert hookwise.remove(model) == ["casting"]
    assert {p: set(m.__dict__) for p, m in model.named_modules()} == dict_before
    assert {p for p, _ in model.named_modules()} == names_before
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any("weight_scale" in name for name, _ in model.named_buffers())
    torch.testing.assert_close(output_of(model, inputs), cast_out)


def test_a_failed_stack_restores_the_original_weights_exactly():
    @dataclasses.dataclass(frozen=True)
    class Boom(TechniqueConfig):
        pass

    def fail(model, config):
        raise RuntimeError("boom")

    register_technique("test.boom", Boom, apply=fail, remove=None, layer=Layer.OFFLOAD)
    try:
        model, inputs = tiny_musubi()
        params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
        reference = output_of(model, inputs)
        with pytest.raises(RuntimeError, match="boom"):
            hookwise.apply(model, LayerwiseCasting(), Boom())
        for name, param in model.named_parameters():
            assert param is params[name][0] and torch.equal(param, params[name][1])
        assert hookwise.list_hooks(model) == {}
        assert not any("weight_scale" in n for n, _ in model.named_buffers())
        assert torch.equal(output_of(model, inputs), reference)
    finally:
        unregister_technique("test.boom")


def test_loading_a_full_precision_state_dict_quantizes_it_with_fresh_scales():
    model, inputs = tiny_musubi()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    cast(model, scaling="channel")
    expected = output_of(model, inputs)
    sd = model.state_dict()
    assert sd["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert "double_blocks.0.img_attn.qkv.weight_scale" in sd
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(full)
    torch.testing.assert_close(output_of(model, inputs), expected)
    model.load_state_dict(sd)  # its own (stored) state dict round-trips too
    torch.testing.assert_close(output_of(model, inputs), expected)


def test_a_deep_copy_of_a_cast_model_is_independent():
    model, inputs = tiny_musubi()
    cast(model)
    expected = output_of(model, inputs)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(output_of(twin, inputs), expected)
    with torch.no_grad():
        twin.double_blocks[0].img_attn.qkv.weight_scale.zero_()
    assert not torch.equal(output_of(twin, inputs), expected)
    torch.testing.assert_close(output_of(model, inputs), expected)


def test_cast_modulation_casts_block_modulation_only():
    model, _ = tiny_musubi()
    cast(model, cast_modulation=True)
    cast_paths = set(casting_summary(model)["cast"])
    assert "double_blocks.0.img_mod.lin" in cast_paths and "single_blocks.0.modulation.lin" in cast_paths
    assert "final_layer.adaLN_modulation.1" not in cast_paths  # outside the towers
    assert "img_in" not in cast_paths


def test_bad_settings_raise_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="cannot store weights"):
        LayerwiseCasting(storage_dtype=torch.int8)
    with pytest.raises(ConfigError, match="smaller than storage_dtype"):
        LayerwiseCasting(storage_dtype=torch.float16, compute_dtype=torch.float8_e5m2)
    with pytest.raises(ConfigError, match="cannot compute"):
        LayerwiseCasting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float8_e5m2)
    with pytest.raises(ConfigError, match="save nothing"):
        LayerwiseCasting(storage_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="scaling"):
        LayerwiseCasting(scaling="row")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        LayerwiseCasting(skip_patterns=("(",))
    with pytest.raises(ConfigError, match=r"skip_patterns='attn' must be a list or tuple.*\('attn',\)"):
        LayerwiseCasting(skip_patterns="attn")  # a string would be split into one-letter patterns
    with pytest.raises(ConfigError, match="skip_classes"):
        LayerwiseCasting(skip_classes="SelfAttention")
    for bad in (2.5, 0, True):
        with pytest.raises(ConfigError, match="block_size"):
            LayerwiseCasting(scaling="block", block_size=bad)
    model, _ = tiny_musubi()
    with pytest.raises(ConfigError, match=r"attn_typo.*match no castable"):
        cast(model, skip_patterns=("attn_typo",))
    with pytest.raises(ConfigError, match="NoSuchBlock"):
        cast(model, skip_classes=("NoSuchBlock",))
    monkeypatch.setattr(casting_mod, "_device_can_hold", lambda device, dtype: False)
    with pytest.raises(ConfigError, match="cannot hold"):
        cast(model)
    monkeypatch.undo()
    assert hookwise.list_hooks(model) == {}
    cast(model)
    with pytest.raises(CompatibilityError, match="appears twice"):
        cast(model)
    with pytest.raises(NoTargetError):
        cast(nn.Sequential(nn.LayerNorm(4)))
    trainable, _ = tiny_musubi()
    trainable.train()
    with pytest.raises(ConfigError, match=r"cannot be trained.*model.eval\(\)"):
        cast(trainable)
    trainable.requires_grad_(False)
    cast(trainable)  # frozen: fine in training mode (LoRA training)


def test_skip_patterns_and_classes_add_to_auto():
    model, _ = tiny_musubi()
    cast(model, skip_patterns=(r"single_blocks\.0\.",), skip_classes=("SelfAttention",))
    summary = casting_summary(model)
    assert not any(p.startswith("single_blocks.0.") for p in summary["cast"])
    assert not any(".img_attn." in p or ".txt_attn." in p for p in summary["cast"])
    assert "single_blocks.1.linear1" in summary["cast"]
    assert summary["kept"]["double_blocks.0.img_attn.qkv"] == "skip class 'SelfAttention'"


@pytest.mark.gpu
def test_cast_model_on_cuda_matches_and_saves_memory():
    model, inputs = tiny_flux()
    model = model.cuda().to(torch.bfloat16)
    inputs = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
              for k, v in inputs.items()}
    reference = output_of(model, inputs)
    cast(model)
    assert rel_err(output_of(model, inputs), reference) < 2 * BOUNDS[torch.float8_e4m3fn]
    summary = casting_summary(model)
    assert summary["bytes_after"] < 0.6 * summary["bytes_before"]
