"""Swapping, adding and removing a pipeline's components while hookwise stacks are on.

`hookwise.set_component` / `hookwise.pop_component` on a tiny diffusers FluxPipeline (built offline
from small configs) and on a dict of odd-shaped modules: the new module gets the stack of its role,
component offloading re-plans, the module that leaves comes back plain, and an error changes nothing.
"""

import warnings

import pytest
import torch
from torch import nn

import hookwise
from hookwise import ComponentOffload, LayerwiseCasting, Offload, Stack
from hookwise.errors import CompatibilityError, ConfigError, NoTargetError
from hookwise.memory import apply_component_offload, components_on_device
from hookwise import component_offload_report
from hookwise.core import ModelHook, add_hook

from cache_helpers import one_thread  # noqa: F401
from tree_helpers import Tree, x_input

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = Stack(LayerwiseCasting(storage_dtype=torch.bfloat16))
ON_CPU = ComponentOffload(onload_device="cpu")


# ---- a tiny FluxPipeline -----------------------------------------------------------------------------
def flux_transformer(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()  # fmt: skip


def flux_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(5)  # four levels: the pipeline's latent scale is 8 with this VAE or without one
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()  # fmt: skip


def text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(7)
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
        projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()  # fmt: skip
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=100)).eval()
    return clip, t5


def flux_pipe(transformer, *, vae=True, encoders=False):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    clip, t5 = text_encoders() if encoders else (None, None)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux_vae() if vae is True else vae, text_encoder=clip,
        tokenizer=None, text_encoder_2=t5, tokenizer_2=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, output_type: str = "pt") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    return pipe(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=32, width=32, num_inference_steps=3,
        max_sequence_length=8, generator=torch.Generator().manual_seed(0), output_type=output_type,
    ).images


# ---- what "plain" means -------------------------------------------------------------------------------
def snapshot(module: nn.Module) -> dict:
    """What a module looks like to its user: forward, parameter objects, state values, dtypes and devices."""
    return {
        "forward": module.__dict__.get("forward"),
        "params": [id(p) for p in module.parameters()],
        "state": {k: (v.detach().clone(), v.dtype, v.device) for k, v in module.state_dict().items()},
    }


def assert_plain(module: nn.Module, before: dict, *, same_params: bool = True) -> None:
    assert hookwise.list_hooks(module) == {}
    assert len(hookwise.applied(module)) == 0
    assert module.__dict__.get("forward") is before["forward"]
    if same_params:
        assert [id(p) for p in module.parameters()] == before["params"]
    state = module.state_dict()
    assert state.keys() == before["state"].keys()
    for key, (value, dtype, device) in before["state"].items():
        now = state[key]
        assert now.dtype == dtype and now.device == device and torch.equal(now, value), key
        assert now.untyped_storage().nbytes() == now.numel() * now.element_size(), f"{key} is a view of a shared buffer"


def cast_then_removed(module: nn.Module, stack: Stack) -> nn.Module:
    """`module` after `stack` was applied and removed with hookwise.remove (casting keeps its rounding)."""
    hookwise.apply(module, stack)
    with pytest.warns(UserWarning, match="rounding stays"):
        hookwise.remove(module)
    return module


def placement(pipe) -> dict:
    report = component_offload_report(pipe)
    return {k: report[k] for k in ("order", "config", "components")}


# ---- a diffusers pipeline -----------------------------------------------------------------------------
def test_swapping_the_transformer_under_casting_and_component_offload_equals_a_fresh_pipeline():
    pipe = flux_pipe(flux_transformer(0))
    old = pipe.transformer
    hookwise.apply(old, BF16)
    apply_component_offload(pipe, ON_CPU)
    before = run(pipe)
    new = flux_transformer(1)

    with pytest.warns(UserWarning, match="rounding stays") as caught:
        returned = hookwise.set_component(pipe, "transformer", new)
    assert all(w.filename == __file__ for w in caught)  # said where set_component was called
    assert returned is old and pipe.transformer is new and pipe.config.transformer[1] == "FluxTransformer2DModel"
    assert hookwise.applied(new) == BF16  # the stack the old transformer had

    fresh = flux_pipe(flux_transformer(1))
    hookwise.apply(fresh.transformer, BF16)
    apply_component_offload(fresh, ON_CPU)
    assert placement(pipe) == placement(fresh)
    after = run(pipe)
    assert torch.equal(after, run(fresh)) and not torch.equal(after, before)
    assert components_on_device(pipe) == ["vae"]

    # The old transformer is as hookwise.remove leaves it: plain, with casting's rounding in its weights.
    reference = cast_then_removed(flux_transformer(0), BF16)
    assert_plain(old, snapshot(reference), same_params=False)


def test_a_vae_added_for_validation_only_joins_component_offload_and_leaves_plain():
    pipe = flux_pipe(flux_transformer(0), vae=None)
    hookwise.apply(pipe.transformer, BF16)
    apply_component_offload(pipe, ON_CPU)
    latents = run(pipe, "latent")
    assert component_offload_report(pipe)["order"] == ["transformer"]

    vae = flux_vae()
    plain = snapshot(vae)
    assert hookwise.set_component(pipe, "vae", vae) is None
    assert len(hookwise.applied(vae)) == 0  # no component of its kind carries a stack
    assert component_offload_report(pipe)["order"] == ["transformer", "vae"]  # model_cpu_offload_seq
    images = run(pipe, "pt")
    assert components_on_device(pipe) == ["vae"]

    fresh = flux_pipe(flux_transformer(0))
    hookwise.apply(fresh.transformer, BF16)
    apply_component_offload(fresh, ON_CPU)
    assert placement(pipe) == placement(fresh)
    assert torch.equal(images, run(fresh, "pt"))

    assert hookwise.pop_component(pipe, "vae") is vae
    assert pipe.vae is None and pipe.config.vae == (None, None)
    assert component_offload_report(pipe)["order"] == ["transformer"]
    assert_plain(vae, plain)
    assert torch.equal(run(pipe, "latent"), latents)


def test_a_removed_text_encoder_comes_back_plain_and_leaves_the_offload_plan():
    pipe = flux_pipe(flux_transformer(0), encoders=True)
    clip, t5 = pipe.text_encoder, pipe.text_encoder_2
    ids = torch.randint(2, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = {"clip": clip(ids).last_hidden_state, "t5": t5(ids).last_hidden_state}
    plain = {"clip": snapshot(clip), "t5": snapshot(t5)}
    hookwise.apply(clip, Offload(onload_device="cpu", granularity="leaf"))
    hookwise.apply(pipe.transformer, BF16)
    together = ComponentOffload(onload_device="cpu", keep_together=(("text_encoder", "text_encoder_2"),))
    apply_component_offload(pipe, together)
    latents = run(pipe, "latent")
    with torch.no_grad():
        assert torch.equal(t5(ids).last_hidden_state, expected["t5"])
    assert components_on_device(pipe) == ["text_encoder_2"]
    assert component_offload_report(pipe)["components"]["text_encoder"]["managed"] == "own offload"

    # T5 is managed by component offloading, and on the device now.
    assert hookwise.pop_component(pipe, "text_encoder_2") is t5
    assert pipe.text_encoder_2 is None
    report = component_offload_report(pipe)
    assert report["order"] == ["text_encoder", "transformer", "vae"] and report["on_device"] == []
    assert report["config"] == ComponentOffload(onload_device="cpu")  # the group of two is gone with it
    assert_plain(t5, plain["t5"])

    # CLIP has its own Offload: it comes back without it.
    assert hookwise.pop_component(pipe, "text_encoder") is clip
    assert component_offload_report(pipe)["order"] == ["transformer", "vae"]
    assert_plain(clip, plain["clip"])
    with torch.no_grad():
        assert torch.equal(clip(ids).last_hidden_state, expected["clip"])
        assert torch.equal(t5(ids).last_hidden_state, expected["t5"])
    assert torch.equal(run(pipe, "latent"), latents)


def test_errors_leave_the_pipeline_and_the_modules_as_they_were():
    pipe = flux_pipe(flux_transformer(0))
    old = pipe.transformer
    hookwise.apply(old, BF16)
    apply_component_offload(pipe, ON_CPU)
    latents = run(pipe, "latent")
    plan = component_offload_report(pipe)
    new = flux_transformer(1)
    plain = snapshot(new)
    used = flux_transformer(2)
    hookwise.apply(used, Offload(onload_device="cpu", granularity="leaf"))
    other = {"a": flux_vae(), "b": flux_transformer(3)}
    apply_component_offload(other, ON_CPU)

    def boom(**kwargs):
        raise RuntimeError("register_modules failed")

    failures = [
        (lambda: hookwise.set_component(pipe, "unet", new), ConfigError, "has no component 'unet'"),
        (lambda: hookwise.set_component(pipe, "transformer", "ckpt.safetensors"), ConfigError, "torch.nn.Module"),
        (lambda: hookwise.set_component(pipe, "scheduler", new), ConfigError, "not a model"),
        (lambda: hookwise.set_component(pipe, "transformer", old), ConfigError, "already the pipeline's"),
        (lambda: hookwise.set_component(pipe, "transformer", pipe.vae), ConfigError, "the pipeline's 'vae'"),
        (lambda: hookwise.set_component(pipe, "vae", old.transformer_blocks[0]), ConfigError, "'transformer'"),
        (lambda: hookwise.set_component(pipe, "transformer", used), CompatibilityError, r"stack \['offload'\]"),
        (lambda: hookwise.set_component(pipe, "transformer", other["b"]), CompatibilityError, "component_offload"),
        (lambda: hookwise.set_component(pipe, "transformer", new, stack=[Offload()]), ConfigError, "hookwise.Stack"),
        (lambda: hookwise.pop_component(pipe, "text_encoder"), ConfigError, "holds nothing"),
        (lambda: hookwise.pop_component(pipe, "unet"), ConfigError, "has no component"),
        (lambda: hookwise.set_component(object(), "transformer", new), ConfigError, "a diffusers pipeline or a dict"),
        # The stack of the role fails on the new module: the stack is applied first, all-or-nothing.
        (lambda: hookwise.set_component(
            pipe, "transformer", new, stack=Stack(LayerwiseCasting(storage_dtype=torch.bfloat16, skip_patterns=("nowhere",)))
        ), ConfigError, "nowhere"),  # fmt: skip
        # The last step fails after the stack and the re-plan took the new module on: both are undone.
        (lambda: (pipe.__dict__.__setitem__("register_modules", boom), hookwise.set_component(pipe, "transformer", new)),
         RuntimeError, "register_modules failed"),  # fmt: skip
        (lambda: hookwise.pop_component(pipe, "vae"), RuntimeError, "register_modules failed"),
    ]
    for call, error, match in failures:
        with pytest.raises(error, match=match):
            call()
        assert pipe.transformer is old and isinstance(pipe.vae, nn.Module)
        assert hookwise.applied(old) == BF16 and component_offload_report(pipe) == plan
        assert_plain(new, plain)
    del pipe.__dict__["register_modules"]
    assert torch.equal(run(pipe, "latent"), latents)
    assert hookwise.applied(used).names() == ["offload"] and component_offload_report(other)["order"] == ["a", "b"]


# ---- a dict of odd-shaped modules ---------------------------------------------------------------------
def odd(seed: int) -> Tree:
    """Fused-qkv blocks (one called twice, one never) under nested containers, and a plain tower."""
    torch.manual_seed(seed)
    return Tree([
        (["dict", "holder"], "list", ["fused", "fused-softmax", "fused"], [0, 0, 2]),
        (["list"], "seq", ["split", "split"], None),
    ]).eval()  # fmt: skip


def odd_parts(denoiser_seed: int = 3) -> dict:
    parts = {"encoder": odd(1), "scheduler": "not a module", "denoiser": odd(denoiser_seed)}
    torch.manual_seed(9)
    parts["head"] = nn.Linear(8, 8)
    return parts


def odd_run(parts: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        e = sum(m(x) for name, m in parts.items() if name.startswith("encoder"))
        return parts["head"](parts["denoiser"](e))


def apply_odd_stacks(parts: dict) -> None:
    for name in parts:
        if name.startswith("encoder"):
            hookwise.apply(parts[name], BF16)
    hookwise.apply(parts["denoiser"], Offload(onload_device="cpu", granularity="leaf"))
    apply_component_offload(parts, ON_CPU)


def test_a_dict_of_odd_shaped_modules_swaps_adds_and_removes_under_its_stacks():
    parts = odd_parts()
    old_denoiser, head = parts["denoiser"], parts["head"]
    plain_denoiser, plain_head = snapshot(old_denoiser), snapshot(head)
    apply_odd_stacks(parts)
    x = x_input()
    odd_run(parts, x)

    # swap: the new denoiser gets the old one's Offload, and component offload leaves it alone as before
    new_denoiser = odd(4)
    assert hookwise.set_component(parts, "denoiser", new_denoiser) is old_denoiser
    assert hookwise.applied(new_denoiser).names() == ["offload"]
    assert_plain(old_denoiser, plain_denoiser)
    # add: encoder_2 is an encoder, so it gets the encoders' casting; it joins the plan at the end
    assert hookwise.set_component(parts, "encoder_2", odd(5)) is None
    assert hookwise.applied(parts["encoder_2"]) == BF16
    report = component_offload_report(parts)
    assert report["order"] == ["encoder", "denoiser", "head", "encoder_2"]
    assert report["components"]["denoiser"]["managed"] == "own offload"

    fresh = odd_parts(4)
    fresh["encoder_2"] = odd(5)
    apply_odd_stacks(fresh)
    assert torch.equal(odd_run(parts, x), odd_run(fresh, x))
    assert placement(parts) == placement(fresh)

    # remove: the head is managed by component offload only, and comes back exactly as it was
    assert hookwise.pop_component(parts, "head") is head and "head" not in parts
    assert_plain(head, plain_head)
    assert component_offload_report(parts)["order"] == ["encoder", "denoiser", "encoder_2"]
    parts["head"], fresh["head"] = nn.Identity(), nn.Identity()  # a module without weights: nothing to manage
    assert torch.equal(odd_run(parts, x), odd_run(fresh, x))


def test_a_new_name_whose_kind_has_different_stacks_asks_for_one_and_the_last_managed_component_stays():
    parts = {"encoder": odd(1), "encoder_2": odd(2), "denoiser": odd(3)}
    hookwise.apply(parts["encoder"], BF16)
    hookwise.apply(parts["denoiser"], Offload(onload_device="cpu", granularity="leaf"))
    apply_component_offload(parts, ON_CPU)
    plan = component_offload_report(parts)
    extra = odd(4)
    with pytest.raises(ConfigError, match=r"encoder: \['casting'\]; encoder_2: none.*pass stack="):
        hookwise.set_component(parts, "encoder_3", extra)
    assert "encoder_3" not in parts and component_offload_report(parts) == plan
    hookwise.set_component(parts, "encoder_3", extra, stack=Stack())
    assert len(hookwise.applied(extra)) == 0 and component_offload_report(parts)["order"][-1] == "encoder_3"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casting's rounding stays in the popped encoder
        hookwise.pop_component(parts, "encoder")
    hookwise.pop_component(parts, "encoder_2")
    before = component_offload_report(parts)
    with pytest.raises(NoTargetError, match="'encoder_3'.*remove it first"):
        hookwise.pop_component(parts, "encoder_3")  # the denoiser has its own Offload: nothing would be left
    assert parts["encoder_3"] is extra and component_offload_report(parts) == before
    assert hookwise.list_hooks(extra)  # still managed


def test_a_hook_outside_the_stack_left_on_the_module_taken_out_is_reported():
    parts = {"encoder": odd(1), "denoiser": odd(2)}
    hookwise.apply(parts["denoiser"], Offload(onload_device="cpu", granularity="leaf"))
    apply_component_offload(parts, ON_CPU)
    add_hook(parts["denoiser"], ModelHook(), "hookwise.plan.first_step")  # as a plan's check before its first step
    with pytest.warns(UserWarning, match=r"still has hooks that are not part of its stack \(<root>: hookwise.plan"):
        old = hookwise.pop_component(parts, "denoiser")
    assert len(hookwise.applied(old)) == 0 and hookwise.list_hooks(old) == {"": ["hookwise.plan.first_step"]}


def test_a_component_set_under_inference_mode_gets_no_inference_tensors():
    parts = {"encoder": odd(1), "denoiser": odd(2)}
    apply_component_offload(parts, ON_CPU)
    new = odd(3).train()
    with torch.inference_mode():
        hookwise.set_component(parts, "denoiser", new)
    # as apply_component_offload: its host copies are plain tensors, so the component can train later
    assert not any(t.is_inference() for t in [*new.parameters(), *new.buffers()])
    new(x_input()).sum().backward()
    assert all(p.grad is not None for p in new.partb[1].parameters())  # the tower (partb[0] is never called)
