"""Helpers for the step-cache tests (a denoising loop over any tiny model, block counters) and for the
tests that compile blocks one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hookwise
from hookwise.core import add_hook, remove_hook
from hookwise.bench import SampleCounter
from model_helpers import TINY_DIFFUSERS, output_of, tiny_musubi

COUNT = "test.count"


@pytest.fixture(scope="module")
def one_thread():
    """These tests make many tiny forwards: one thread, because two threads on a busy 2-core machine spin
    against each other (50x slower here); the previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_dynamo():
    """Compiled code and dynamo's counters from other tests are dropped before and after."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def no_recompiles():
    """Within it any recompilation raises, instead of silently growing the cache until dynamo gives up.
    (dynamo's own config patch: a test framework's setattr / delattr on its config module can hide the
    option for every later test.)"""
    return torch._dynamo.config.patch(error_on_recompile=True)


def compile_blocks(model: nn.Module, **options) -> None:
    """Compile every main-tower block on its own (regional compilation), with static shapes."""
    for tower in hookwise.describe(model).main_towers:
        for block in tower.blocks:
            model.get_submodule(block.path).compile(dynamic=False, **options)


def count_blocks(model: nn.Module) -> list[SampleCounter]:
    counters = []
    for b in (b for t in hookwise.describe(model).main_towers for b in t.blocks):
        c = SampleCounter()
        add_hook(model.get_submodule(b.path), c, COUNT)
        counters.append(c)
    return counters


def count_attention(model: nn.Module) -> list[SampleCounter]:
    counters = []
    for a in hookwise.describe(model).attention:
        c = SampleCounter()
        add_hook(model.get_submodule(a.path), c, COUNT)
        counters.append(c)
    return counters


def uncount(model: nn.Module) -> None:
    for path, module in model.named_modules():
        remove_hook(module, COUNT, missing_ok=True)


def tiny_ltx_two_layers(batch: int = 1):
    """LTX with two blocks (the shared tiny LTX has one, which leaves a block cache nothing to skip)."""
    from diffusers import LTXVideoTransformer3DModel

    from model_helpers import tiny_ltx

    _, inputs = tiny_ltx(batch)
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16,
    ).eval()
    return model, inputs


def tiny_sd3_small(batch: int = 1):
    """SD3 with 8x8 latents (the shared tiny SD3 has 1024 tokens, slow for many short runs)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(), qk_norm=None,
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.full((batch,), 500.0),
    )
    return model, inputs


MODELS = {**TINY_DIFFUSERS, "sd3": tiny_sd3_small, "ltx-video": tiny_ltx_two_layers, "musubi": tiny_musubi}
X_KEY = {"musubi": "img"}
T_KEY = {"musubi": "timesteps"}
T_SCALE = {"flux": 1.0, "qwen-image": 1.0, "musubi": 1.0}


def build(name: str, batch: int = 1):
    model, inputs = MODELS[name](batch)
    return model, inputs


def uncond_inputs(inputs: dict) -> dict:
    out = dict(inputs)
    for key in ("encoder_hidden_states", "txt"):
        if key in out:
            out[key] = torch.zeros_like(out[key])
    return out


def denoise(model: nn.Module, name: str, inputs: dict, *, steps: int = 8, cfg: str | None = "separate",
            start: float = 1.0, record: list | None = None) -> torch.Tensor:
    """A small Euler loop (time `start` -> 0) calling `model` directly; CFG as two calls or batched."""
    xk, tk = X_KEY.get(name, "hidden_states"), T_KEY.get(name, "timestep")
    scale = T_SCALE.get(name, 1000.0)
    x = inputs[xk]
    b = x.shape[0]
    unc = uncond_inputs(inputs)
    for i in range(steps):
        t = start * (1 - i / steps)
        kw = dict(inputs, **{xk: x, tk: torch.full((b,), t * scale)})
        if cfg == "separate":
            with hookwise.branch(model, "cond"):
                vc = output_of(model, kw)
            with hookwise.branch(model, "uncond"):
                vu = output_of(model, dict(unc, **{xk: x, tk: kw[tk]}))
            v = vu + 3.0 * (vc - vu)
        elif cfg == "batched":
            # both halves at this step's timestep and latents (as pipelines batch them)
            unc_now = dict(unc, **{xk: x, tk: kw[tk]})
            both = {k: (torch.cat([unc_now[k], v]) if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b else v)
                    for k, v in kw.items()}
            vu, vc = output_of(model, both).chunk(2)
            v = vu + 3.0 * (vc - vu)
        else:
            v = output_of(model, kw)
        if record is not None:
            record.append(v)
        x = x - (1.0 / steps) * _fit(v, x)
    return x


def _fit(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if v.shape == x.shape:
        return v
    flat = v.reshape(v.shape[0], -1)
    reps = -(-x[0].numel() // flat.shape[1])
    return flat.repeat(1, reps)[:, : x[0].numel()].reshape(x.shape)
