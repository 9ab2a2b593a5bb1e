"""The shipped reference models: they load with diffusers and their samples follow the class asked for."""

import json

import pytest
import torch

from hookwise.sampling import sample_reference
from hookwise.zoo import IMAGE_CLASSES, VIDEO_CLASSES, load_reference, reference_path
from hookwise.zoo.data import make_images, make_videos

from cache_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

BACKGROUND = 0.12


@pytest.fixture(scope="module")
def flux():
    return load_reference("flux-shapes")


@pytest.fixture(scope="module")
def wan():
    return load_reference("wan-moving")


@pytest.mark.parametrize("name, cls", [("flux-shapes", "FluxTransformer2DModel"), ("wan-moving", "WanTransformer3DModel")])
def test_weights_ship_with_the_package_and_load_with_diffusers_from_pretrained(name, cls):
    import diffusers

    folder = reference_path(name)
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 8 * 2**20  # a few MB
    model = getattr(diffusers, cls).from_pretrained(folder)
    assert type(model).__name__ == cls
    meta = json.loads((folder / "hookwise_reference.json").read_text())
    assert meta["trained_by"].startswith("python -m hookwise.zoo.train") and isinstance(meta["seed"], int)


def _foreground(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels clearly off the background (any channel away from its grey)."""
    return (pixels - BACKGROUND).abs().amax(dim=1) > 0.25


def test_training_data_is_procedural_and_seeded():
    a = make_images(torch.arange(9), torch.Generator().manual_seed(1))
    b = make_images(torch.arange(9), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (9, 3, 16, 16)
    assert make_videos(torch.arange(6), torch.Generator().manual_seed(1)).shape == (6, 3, 8, 12, 12)


def test_image_samples_have_the_colour_and_shape_asked_for(flux):
    labels = torch.arange(len(IMAGE_CLASSES))
    pixels = sample_reference(flux, labels, seed=1, steps=16)
    colours, fills = [], []
    for img in pixels:
        mask = _foreground(img[None])[0]
        assert mask.sum() >= 6, "no shape drawn"
        colours.append(int(img[:, mask].mean(dim=1).argmax()))
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fills.append(float(mask.sum() / box))
    assert colours == [int(c) % 3 for c in labels]  # red, green, blue
    circle, square, triangle = (sum(fills[3 * s : 3 * s + 3]) / 3 for s in range(3))
    assert triangle < circle < square  # a triangle fills half its box, a circle ~0.8, a square all of it


def test_video_samples_have_the_colour_and_move_along_the_axis_asked_for(wan):
    labels = torch.arange(len(VIDEO_CLASSES)).repeat(2)
    videos = sample_reference(wan, labels, seed=1, steps=16)  # (N, 3, F, H, W)
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    for video, label in zip(videos, labels.tolist()):
        axis, colour = divmod(label, 3)
        centroids = []
        for f in range(video.shape[1]):
            mask = _foreground(video[:, f][None])[0].float()
            assert mask.sum() > 0, f"{VIDEO_CLASSES[label]}: frame {f} is empty"
            centroids.append(((xs * mask).sum() / mask.sum(), (ys * mask).sum() / mask.sum()))
        # path length along each axis, frame to frame (the sense of motion is not part of the class)
        dx = sum(abs(float(b[0] - a[0])) for a, b in zip(centroids, centroids[1:]))
        dy = sum(abs(float(b[1] - a[1])) for a, b in zip(centroids, centroids[1:]))
        along, across = (dx, dy) if axis == 0 else (dy, dx)
        assert along > 3.0 and along > 2 * across, f"{VIDEO_CLASSES[label]}: moved dx={dx:.1f}, dy={dy:.1f}"
        fg = _foreground(video.permute(1, 0, 2, 3))  # (F, H, W)
        assert int(video.permute(1, 2, 3, 0)[fg].mean(dim=0).argmax()) == colour


def test_the_training_script_trains_every_model_in_parallel_into_loadable_folders(tmp_path):
    import diffusers

    from hookwise.zoo.train import main

    assert main(["all", "--steps", "2", "--out", str(tmp_path)]) == 0
    for name, cls in (("flux-shapes", "FluxTransformer2DModel"), ("wan-moving", "WanTransformer3DModel")):
        meta = json.loads((tmp_path / name / "hookwise_reference.json").read_text())
        assert meta["settings"]["steps"] == 2 and meta["threads"] == 1
        getattr(diffusers, cls).from_pretrained(tmp_path / name)
