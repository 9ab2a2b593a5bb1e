"""hookwise stacks through real diffusers pipelines (FluxPipeline, WanPipeline), built offline from tiny configs.

The pipelines mark their CFG calls with `transformer.cache_context("cond" / "uncond")`; the caches must
see those branches with no user code. Every cache runs through `pipe(...)` and is compared with the same
pipeline uncached (within a quality bound, after skipping work); offloading and casting stacks are exact
or within casting tolerance. Prompt embeddings are given, so no text encoder is needed.
"""

import pytest
import torch

import hookwise
from hookwise import (
    DualBlockCache,
    FasterCache,
    FirstBlockCache,
    LayerwiseCasting,
    MagCache,
    Offload,
    PyramidAttentionBroadcast,
    TaylorSeer,
    TeaCache,
)
from hookwise.cache import cache_stats

from cache_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
RATIOS = (1.0, 1.02, 1.01, 1.0, 0.99, 0.98, 0.97, 0.95)
CACHES = {
    "first_block": FirstBlockCache(threshold=0.5),
    "dual_block": DualBlockCache(threshold=0.5),
    "taylorseer": TaylorSeer(order=1, interval=2, warmup=2),
    "taylorseer_attention": TaylorSeer(order=1, interval=2, warmup=2, targets="attention"),
    "teacache": TeaCache(threshold=0.5),
    "magcache": MagCache(ratios=RATIOS, threshold=0.1),
    "pab": PyramidAttentionBroadcast(spatial_range=2, temporal_range=2, cross_range=2, spatial_window=None,
                                     temporal_window=None, cross_window=None),
    "faster_cache": FasterCache(attention_range=2, attention_window=None, uncond_range=2, uncond_window=None),
}
BLOCK_CACHES = ("first_block", "dual_block", "taylorseer", "teacache", "magcache")
# Relative L2 error of the final latents against the uncached pipeline that each cache keeps here
# (measured at these settings: at most 0.03 on both pipelines).
MAX_ERROR = 0.08


def _flux_pipe():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)

    def run(output_type: str = "latent") -> torch.Tensor:
        out = pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
            negative_pooled_prompt_embeds=torch.zeros_like(pooled), true_cfg_scale=3.0, height=16, width=16,
            num_inference_steps=STEPS, max_sequence_length=8, generator=torch.Generator().manual_seed(0),
            output_type=output_type,
        )
        return out.images

    return transformer, run


def _wan_pipe():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))

    def run(output_type: str = "latent") -> torch.Tensor:
        out = pipe(
            prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=3.0,
            height=16, width=16, num_frames=5, num_inference_steps=STEPS, max_sequence_length=8,
            generator=torch.Generator().manual_seed(0), output_type=output_type,
        )
        return out.frames

    return transformer, run


BUILD = {"flux": _flux_pipe, "wan": _wan_pipe}


@pytest.fixture(scope="module", params=sorted(BUILD))
def pipeline(request):
    """(name, transformer, run, uncached latents); tests that leave the weights changed build their own."""
    transformer, run = BUILD[request.param]()
    return request.param, transformer, run, run()


def _error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).norm() / reference.float().norm())


def _skipped(stats: dict) -> int:
    if "branches" in stats:
        return sum(b["cached"] for b in stats["branches"].values())
    return stats.get("reused", 0) + stats.get("uncond_skipped", 0)


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_every_cache_through_the_pipeline_skips_work_within_quality_and_sees_its_cfg_branches(pipeline, cache):
    name, transformer, run, reference = pipeline
    config = CACHES[cache]
    hookwise.apply(transformer, config)
    try:
        out = run()
        again = run()  # a second pipe(...) call is a new run: the same result
        stats = cache_stats(transformer)[config.technique]
        state = hookwise.get_run_state(transformer)
    finally:
        hookwise.remove(transformer)
    assert torch.equal(out, again) and state.run == 1
    assert _skipped(stats) > 0, stats
    assert _error(out, reference) < MAX_ERROR
    if cache in BLOCK_CACHES:  # the branches came from the pipeline's cache_context, with no user code
        assert sorted(stats["branches"]) == ["cond", "uncond"]
    assert "cache_context" not in transformer.__dict__  # diffusers' own method again


def test_offload_through_the_pipeline_is_exact(pipeline):
    name, transformer, run, reference = pipeline
    hookwise.apply(transformer, Offload(onload_device="cpu", granularity="block"))
    try:
        out = run()
    finally:
        hookwise.remove(transformer)
    assert torch.equal(out, reference)


def test_casting_and_offload_through_the_pipeline_within_casting_tolerance(pipeline):
    name, _, _, reference = pipeline
    transformer, run = BUILD[name]()  # removing casting keeps the rounded weights: a pipeline of its own
    hookwise.apply(transformer, LayerwiseCasting(storage_dtype=torch.bfloat16), Offload(onload_device="cpu", granularity="block"))
    try:
        out = run()
    finally:
        with pytest.warns(UserWarning, match="rounding stays"):
            hookwise.remove(transformer)
    assert not torch.equal(out, reference) and _error(out, reference) < 0.05


def test_a_full_stack_with_a_cache_through_the_pipeline_decodes_images(pipeline):
    name, _, _, _ = pipeline
    transformer, run = BUILD[name]()
    images_reference = run("pt")
    hookwise.apply(
        transformer, LayerwiseCasting(storage_dtype=torch.bfloat16), Offload(onload_device="cpu", granularity="block"),
        FirstBlockCache(threshold=0.5),
    )
    try:
        images = run("pt")
        stats = cache_stats(transformer)["first_block_cache"]
    finally:
        with pytest.warns(UserWarning, match="rounding stays"):
            hookwise.remove(transformer)
    assert images.shape == images_reference.shape and torch.isfinite(images).all()
    assert sorted(stats["branches"]) == ["cond", "uncond"] and _skipped(stats) > 0
    assert _error(images, images_reference) < MAX_ERROR
