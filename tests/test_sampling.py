"""The flow-matching sampler and the float quality metrics."""

import math

import pytest
import torch

import hookwise
from hookwise.errors import ConfigError
from hookwise.sampling import flow_timesteps, psnr, sample, ssim

from cache_helpers import build, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_timesteps_run_from_one_to_zero_and_shift_spends_more_time_at_high_noise():
    t = flow_timesteps(4)
    assert t.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flow_timesteps(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and bool((shifted[1:-1] > t[1:-1]).all())
    with pytest.raises(ConfigError):
        flow_timesteps(0)


def _flux():
    model, inputs = build("flux")
    x = inputs.pop("hidden_states")
    inputs.pop("timestep")
    uncond = dict(inputs, encoder_hidden_states=torch.zeros_like(inputs["encoder_hidden_states"]))
    return model, x, inputs, uncond


def test_batched_and_separate_cfg_agree_and_guidance_changes_the_result():
    model, x, cond, uncond = _flux()
    separate = sample(model, x, cond, uncond, steps=4, guidance_scale=3.0, cfg="separate")
    batched = sample(model, x, cond, uncond, steps=4, guidance_scale=3.0, cfg="batched")
    torch.testing.assert_close(separate, batched, rtol=1e-4, atol=1e-5)
    unguided = sample(model, x, cond, uncond, steps=4, guidance_scale=1.0)
    assert not torch.allclose(unguided, separate)


def test_separate_cfg_calls_run_on_their_branches():
    model, x, cond, uncond = _flux()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(hookwise.get_run_state(model).branch))
    hookwise.apply(model, hookwise.FirstBlockCache(threshold=0.0))
    sample(model, x, cond, uncond, steps=2, guidance_scale=2.0)
    assert seen == ["cond", "uncond", "cond", "uncond"]
    with pytest.raises(ConfigError, match="cfg must be"):
        sample(model, x, cond, uncond, steps=2, guidance_scale=2.0, cfg="both")


def test_psnr_is_computed_in_float_even_for_uint8_images():
    a = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    b = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    # a uint8 difference 0 - 255 wraps to 1: PSNR would be 48 dB; in float it is 0 dB (max error)
    assert psnr(a, b, data_range=255.0) == pytest.approx(0.0)
    c = torch.rand(2, 3, 8, 8)
    assert psnr(c, c) == math.inf
    assert psnr(c + 0.01, c) == pytest.approx(40.0, abs=1e-4)


def test_unrelated_images_score_low_and_ssim_orders_similarity():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    assert psnr(a, b) < 10
    assert ssim(a, a) == pytest.approx(1.0)
    near = (a + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert ssim(a, b) < 0.2 < ssim(near, a) < 1.0
    video = torch.rand(1, 3, 4, 8, 8, generator=g)
    assert ssim(video, video) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        ssim(a, b[:1])


@pytest.mark.gpu
def test_metrics_of_cuda_images_equal_those_of_the_same_images_on_the_cpu():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    assert ssim(a.cuda(), b.cuda()) == pytest.approx(ssim(a, b), rel=1e-6)
    assert psnr(a.cuda(), b.cuda()) == pytest.approx(psnr(a, b), rel=1e-6)
