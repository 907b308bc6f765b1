"""Batched multi-crop augmentation: shapes, ranges, seeding, how often each op fires, and crops (inside each image's
box of its canvas), colour ops and blur against torchvision."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from fewshot.augment import (
    CROP_DRAWS,
    MultiCrop,
    colour_matrix,
    crop_boxes,
    gaussian_blur,
    resample_matrix,
    resized_crops,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n: int = 6, side: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_views_have_the_right_shapes_dtype_and_range() -> None:
    images = _images()
    out = MultiCrop(32, 16, 3)(images, torch.Generator().manual_seed(0))
    assert set(out) == {"global", "local"}
    assert out["global"].shape == (12, 3, 32, 32) and out["local"].shape == (18, 3, 16, 16)
    for x in out.values():
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        pixels = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # normalised [0, 1] images
    assert "local" not in MultiCrop(32, 16, 0)(images, torch.Generator().manual_seed(0))


def test_same_seed_same_views_other_seed_other_views() -> None:
    images, crop = _images(), MultiCrop(32, 16, 2)
    a = crop(images, torch.Generator().manual_seed(3))
    b = crop(images, torch.Generator().manual_seed(3))
    c = crop(images, torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global"], c["global"])


def test_views_come_from_their_own_image() -> None:
    # constant-colour images survive cropping, flipping and blurring; view v·B + i must show image i
    colours = torch.tensor([[250, 10, 10], [10, 250, 10], [10, 10, 250]], dtype=torch.uint8)
    images = colours.view(3, 3, 1, 1).expand(3, 3, 24, 24).contiguous()
    crop = MultiCrop(16, 8, 2, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0)
    out = crop(images, torch.Generator().manual_seed(0))
    for key, n_views in (("global", 2), ("local", 2)):
        x = out[key] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        dominant = x.mean((2, 3)).argmax(1).view(n_views, 3)
        assert torch.equal(dominant, torch.arange(3).expand(n_views, 3))


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised views back to [0, 1] pixels."""
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _whole_image_crops(**kwargs: Any) -> MultiCrop:
    # scale (1, 1) never fits a box of another aspect ratio, so every crop falls back to the whole image, and at the
    # image's own size the resampling is the identity: each op can be seen by comparing views with their image
    options: dict[str, Any] = dict(global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                                   grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0)  # fmt: skip
    return MultiCrop(16, 16, 4, **(options | kwargs))


def _views(crop: MultiCrop, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(6, B, 3, 16, 16) pixels of global views 1, 2 then the 4 locals."""
    out = crop(images, torch.Generator().manual_seed(seed))
    return _pixels(torch.cat([out["global"], out["local"]])).view(6, images.shape[0], 3, 16, 16)


def test_whole_image_crops_without_photometric_ops_are_the_images() -> None:
    images = _images(8, 16)
    torch.testing.assert_close(_views(_whole_image_crops(), images), (images / 255).expand(6, -1, -1, -1, -1))


def test_flip_grayscale_and_jitter_fire_with_their_probabilities() -> None:
    b = 64
    ramp = (torch.arange(16) * 15).to(torch.uint8).expand(b, 3, 16, 16)  # brighter to the right
    x = _views(_whole_image_crops(flip_prob=0.5), ramp)
    flipped = x[..., 0, 0, 0] > x[..., 0, 0, -1]  # (6, B)
    assert 0.4 < flipped.float().mean() < 0.6
    torch.testing.assert_close(x[flipped], (ramp[0] / 255).flip(-1).expand_as(x[flipped]))
    images = _images(b, 16)
    x = _views(_whole_image_crops(grayscale_prob=0.2), images)
    gray = (x - x[:, :, :1]).abs().amax((2, 3, 4)) < 1e-5  # (6, B) all channels equal
    assert 0.12 < gray.float().mean() < 0.28
    x = _views(_whole_image_crops(jitter_prob=0.8), images)
    untouched = (x - images / 255).abs().amax((2, 3, 4)) < 1e-5
    assert 0.12 < untouched.float().mean() < 0.28


def test_blur_and_solarise_fire_per_view_with_dinos_probabilities() -> None:
    b = 64
    images = _images(b, 16)
    # sigmas of 1–2 px at 16 px (given for 224-px crops) leave no blurred view close to its image
    x = _views(_whole_image_crops(blur_probs=(1.0, 0.1, 0.5), blur_sigma=(14.0, 28.0)), images)
    blurred = (x - images / 255).abs().amax((2, 3, 4)) > 0.05  # (6, B)
    assert blurred[0].all() and blurred[1].float().mean() < 0.25 and 0.38 < blurred[2:].float().mean() < 0.62
    grey = torch.full((b, 3, 16, 16), 200, dtype=torch.uint8)  # solarised: 255 - 200 = 55
    x = _views(_whole_image_crops(solarize_prob=0.2), grey)
    solarised = (x - 55 / 255).abs().amax((2, 3, 4)) < 1e-4
    assert ((x - 200 / 255).abs().amax((2, 3, 4)) < 1e-4).logical_or(solarised).all()
    assert not solarised[0].any() and not solarised[2:].any() and 0.05 < solarised[1].float().mean() < 0.4


def _boxes(sizes: torch.Tensor, scale: tuple[float, float], seed: int = 0) -> torch.Tensor:
    u = torch.rand(len(sizes), CROP_DRAWS, generator=torch.Generator().manual_seed(seed))
    return crop_boxes(sizes, scale, u)


@pytest.mark.parametrize("size,scale", [(24, (0.05, 0.4)), (32, (0.4, 1.0)), (80, (0.1, 1.0))])
def test_crops_match_torchvision_roi_align(size: int, scale: tuple[float, float]) -> None:
    # the separable matmul resampling must give roi_align's (aligned, adaptive sampling) pixels, flips included
    images, g = _images(5, 40).float(), torch.Generator().manual_seed(1)
    boxes = _boxes(torch.full((15, 2), 40), scale, seed=1)
    flip = torch.rand(15, generator=g) < 0.5
    ours = resized_crops(images, boxes.view(3, 5, 4), flip.view(3, 5), size)
    rois = torch.cat([torch.arange(5.0).repeat(3)[:, None], boxes], 1)
    theirs = roi_align(images, rois, (size, size), sampling_ratio=-1, aligned=True)
    theirs = torch.where(flip.view(-1, 1, 1, 1), theirs.flip(-1), theirs)
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=0)  # in 0..255


@pytest.mark.parametrize("hw", [(40, 23), (17, 40), (31, 31)])
def test_crops_of_an_image_in_a_canvas_are_roi_align_of_the_image_alone(hw: tuple[int, int]) -> None:
    # the padding around an image is never sampled: at the image's own border the taps clamp, as roi_align's do
    h, w = hw
    image = _images(1, 40)[..., :h, :w].float()  # (1, 3, h, w)
    canvases = torch.full((1, 3, 40, 40), 255.0)  # a bright padding that would show if sampled
    canvases[..., :h, :w] = image
    sizes = torch.tensor([[h, w]])
    boxes = _boxes(sizes.expand(6, 2), (0.3, 1.0), seed=2)  # (6, 4) inside the h x w image
    ours = resized_crops(canvases, boxes.view(6, 1, 4), torch.zeros(6, 1, dtype=torch.bool), 24, sizes)
    rois = torch.cat([torch.zeros(6, 1), boxes], 1)
    theirs = roi_align(image, rois, (24, 24), sampling_ratio=-1, aligned=True)
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=0)


def test_resampling_keeps_brightness_when_rounding_pushes_a_box_past_the_edge() -> None:
    # 72 px to 24: 3 taps per pixel; a span of 72 + ε must not ask for a 4th tap (rows would sum to 3/4)
    m = resample_matrix(torch.tensor([0.0, 0.0]), torch.tensor([72.0, 72.00001]), 24, 72)
    torch.testing.assert_close(m.sum(-1), torch.ones(2, 24))


def test_crop_boxes_lie_inside_each_image_with_the_asked_area_of_that_image() -> None:
    sizes = torch.tensor([[50, 50], [30, 70], [64, 20]]).repeat(700, 1)  # (2100, 2) height, width
    boxes = _boxes(sizes, (0.05, 0.4))
    h, w = sizes[:, 0].float(), sizes[:, 1].float()
    assert boxes.min() >= 0 and (boxes[:, 2] <= w + 1e-4).all() and (boxes[:, 3] <= h + 1e-4).all()
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = bw * bh / (h * w)
    assert area.min() >= 0.05 - 1e-5 and area.max() <= 0.4 + 1e-5
    assert (bw / bh).min() >= 3 / 4 - 1e-4 and (bw / bh).max() <= 4 / 3 + 1e-4


# large images, so that torchvision's integer boxes are close to our fractional ones; the tall one mostly falls back
# to the central crop for scales (0.4, 1), where no 3:4..4:3 box of that area fits
@pytest.mark.parametrize("hw", [(900, 1200), (1800, 600), (1024, 1024)])
@pytest.mark.parametrize("scale", [(0.05, 0.4), (0.4, 1.0), (0.2, 1.0)])
def test_crop_box_statistics_match_torchvisions_random_resized_crop(hw: tuple[int, int], scale: tuple[float, float]):
    # the same image sizes through torchvision's own sampler (integer boxes, a loop per image) and ours (batched,
    # fractional boxes): area share, aspect ratio and position follow the same distributions, fallbacks included
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    n, (h, w) = 20_000, hw
    torch.manual_seed(0)
    image = torch.zeros(1, h, w)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    ty, tx, th, tw = theirs.float().unbind(1)  # top, left, height, width
    ours = _boxes(torch.tensor([[h, w]]).expand(n, 2), scale, seed=1)
    ox, oy, ow, oh = ours[:, 0], ours[:, 1], ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1]
    stats = {
        "area": (tw * th / (h * w), ow * oh / (h * w)),
        "aspect": (tw / th, ow / oh),
        "centre x": ((tx + tw / 2) / w, (ox + ow / 2) / w),
        "centre y": ((ty + th / 2) / h, (oy + oh / 2) / h),
    }
    for name, (a, b) in stats.items():
        distance = ks_2samp(a.numpy(), b.numpy()).statistic
        assert distance < 0.025, f"{name}: Kolmogorov-Smirnov distance {distance:.3f}"  # ≈0.014 by chance at 95%


def test_a_marker_outside_the_centre_square_appears_in_some_crops() -> None:
    # a 64 x 32 landscape photo with a red marker in its left corner, outside the centre 32 x 32 square that the old
    # centre-square store kept: whole-image crops must reach it
    image = torch.full((1, 3, 32, 64), 128, dtype=torch.uint8)
    image[0, :, :6, :6] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    canvas = torch.zeros(16, 3, 64, 64, dtype=torch.uint8)
    canvas[..., :32, :] = image
    sizes = torch.tensor([[32, 64]]).expand(16, 2)
    crop = MultiCrop(16, 8, 2, flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0)
    views = crop(canvas, torch.Generator().manual_seed(0), sizes=sizes)
    for key in ("global", "local"):
        x = _pixels(views[key])
        red = (x[:, 0] > 0.7) & (x[:, 1] < 0.3)  # (V, l, l)
        shows = red.flatten(1).any(1)
        assert 0 < shows.float().mean() < 1, key  # in some crops, not all
        assert not ((x < 0.05).all(1)).any(), key  # never the canvas's black padding


def test_views_of_a_split_batch_are_the_rows_of_the_whole_batch_views() -> None:
    # torchrun: a process holding rows 2..3 of a 4-image batch makes exactly those rows of the 1-process views
    images = _images(4, 40)
    sizes = torch.tensor([[40, 30], [20, 40], [40, 40], [33, 40]])
    for i, (h, w) in enumerate(sizes.tolist()):
        images[i, :, h:], images[i, :, :, w:] = 0, 0
    crop = MultiCrop(16, 8, 2)
    whole = crop(images, torch.Generator().manual_seed(5), sizes=sizes)
    part = crop(images[2:], torch.Generator().manual_seed(5), slice(2, 4), 4, sizes[2:])
    for key, n_views in (("global", 2), ("local", 2)):
        expected = whole[key].view(n_views, 4, *whole[key].shape[1:])[:, 2:].flatten(0, 1)
        torch.testing.assert_close(part[key], expected)


@pytest.mark.parametrize("op,f,reference", [(0, 1.3, TF.adjust_brightness), (1, 0.7, TF.adjust_contrast),
                                             (2, 1.2, TF.adjust_saturation)])  # fmt: skip
def test_each_jitter_op_matches_torchvision(op: int, f: float, reference) -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.7
    order = torch.full((4, 4), -1)
    order[:, 0] = op
    factors = [torch.full((4,), f)] * 4
    a, c = colour_matrix(x.mean((2, 3)), order, factors, torch.zeros(4, dtype=torch.bool))
    ours = (a @ x.view(4, 3, -1) + c).clamp(0, 1).view_as(x)
    theirs = torch.stack([reference(xi, f) for xi in x])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_hue_rotation_keeps_grey_and_turns_red_towards_green() -> None:
    grey = torch.full((1, 3), 0.5)
    red = torch.tensor([[0.9, 0.1, 0.1]])
    order = torch.tensor([[3, -1, -1, -1]])
    for colour in (grey, red):
        a, c = colour_matrix(
            colour, order, [torch.ones(1)] * 3 + [torch.tensor([0.1])], torch.zeros(1, dtype=torch.bool)
        )
        out = (a @ colour.view(1, 3, 1) + c).view(3)
        if colour is grey:
            torch.testing.assert_close(out, grey.view(3))
        else:
            assert out[1] > colour[0, 1] and out[0] < colour[0, 0]  # hue +36°: red moves towards yellow/green


def test_grayscale_gives_equal_channels() -> None:
    x = torch.rand(2, 3, 1, 1)
    a, c = colour_matrix(x.mean((2, 3)), torch.full((2, 4), -1), [torch.ones(2)] * 4, torch.ones(2, dtype=torch.bool))
    out = (a @ x.view(2, 3, 1) + c).view(2, 3)
    torch.testing.assert_close(out, out[:, :1].expand(2, 3))


def test_blur_matches_torchvision_per_image_and_ignores_the_other_images() -> None:
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.9, 1.6])
    ours = gaussian_blur(x, sigma, max_sigma=2.0)  # radius 6
    for xi, si, oi in zip(x, sigma.tolist(), ours, strict=True):
        torch.testing.assert_close(oi, TF.gaussian_blur(xi, [13, 13], [si, si]), atol=1e-5, rtol=0)
    torch.testing.assert_close(gaussian_blur(x[:1], sigma[:1], max_sigma=2.0), ours[:1])


def test_blur_keeps_constants_and_smooths_noise() -> None:
    x = torch.full((2, 3, 12, 12), 0.3)
    torch.testing.assert_close(gaussian_blur(x, torch.tensor([0.5, 2.0])), x)
    noise = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, torch.tensor([0.1, 2.0]))
    torch.testing.assert_close(blurred[0], noise[0], atol=1e-4, rtol=0)  # sigma 0.1 ≈ identity
    assert blurred[1].std() < 0.5 * noise[1].std()


def test_the_gpu_way_of_picking_images_gives_the_cpu_result() -> None:
    from fewshot.augment import _where

    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    chosen = torch.tensor([True, False, False, True, True, False])
    sigma = torch.linspace(0.5, 1.5, 6)

    def blur(v: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return gaussian_blur(v, sigma if index is None else sigma[index], 2.0)

    subset = _where(chosen, x.clone(), blur, subset=True)  # the CPU path: only the chosen images are computed
    masked = _where(chosen, x.clone(), blur, subset=False)  # the GPU path: all computed, no host sync
    torch.testing.assert_close(subset, masked)
    torch.testing.assert_close(subset[~chosen], x[~chosen])
    assert not torch.allclose(subset[chosen], x[chosen])
