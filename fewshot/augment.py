"""Batched multi-crop augmentation on uint8 image tensors: DINO's views (Caron et al. 2021, appendix; BYOL's
photometric recipe, Grill et al. 2020) without a per-image PIL pipeline.

Images are decoded once into ``(N, 3, S, S)`` uint8 canvases, each whole image (aspect ratio kept) at the
top-left of its canvas with its height and width recorded (:mod:`fewshot.decoding`); every step augments the whole
batch with tensor ops and one seeded ``torch.Generator``: random resized crops inside each image's own box (the
scale and ratio ranges relative to the image's own area, as torchvision's RandomResizedCrop on the original
image) with horizontal flips, colour jitter in a random per-image order, grayscale, Gaussian blur with a per-image
sigma, solarisation, normalisation. Every probability is drawn per image, so one call does what DINO's
``DataLoader`` does image by image.

Crops are resampled exactly as ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)`` would (bilinear
taps averaged over ``ceil(box / output)`` samples per output pixel, so downscaled crops are anti-aliased like
PIL's), but that resampling is separable: it is a ``(size, S)`` matrix per axis and a crop is ``My @ image @ Mxᵀ``,
two batched matmuls (BLAS, multi-threaded, where roi_align's CPU kernel loops over boxes on one thread); a flip
reverses the rows of ``Mx``. Normalisation is folded into the colour map, so the pipeline makes few passes over
the pixels.

Two approximations make the colour step one batched 3×3 matrix product per image: jitter and grayscale are
composed into a single affine map with one clamp at the end (torchvision clamps after each op), and the hue
shift rotates colours about the grey axis in RGB instead of shifting H in HSV (same angle, same grey axis).

The crops, the colour map and the views of one batched pipeline share their sampling and matrices: one module, a
little past the project's 300 lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.pretrain_config import IMAGENET_MEAN, IMAGENET_STD, DinoConfig

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, exactly as torchvision's rgb_to_grayscale
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of torchvision's RandomResizedCrop


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


TRIES = 10  # boxes tried per image before torchvision's fallback
CROP_DRAWS = 2 * TRIES + 2  # uniform numbers one crop box takes


def crop_boxes(sizes: Tensor, scale: Sequence[float], u: Tensor, ratio: Sequence[float] = _RATIO) -> Tensor:
    """torchvision's RandomResizedCrop boxes ``(n, 4)`` as x1, y1, x2, y2 pixels inside images of ``sizes``
    ``(n, 2)`` (height, width), from the uniform numbers ``u`` ``(n, CROP_DRAWS)``.

    Per image, up to 10 tries of an area ~ U(scale) × the image's area and a log aspect ratio ~ U(log ratio); the
    first box that fits is placed uniformly; when none fits, torchvision's fallback: the central crop with the
    image's aspect ratio clamped to ``ratio``. Boxes are not rounded to whole pixels (the resampling takes any)."""
    h, w = sizes[:, :1].to(u.dtype), sizes[:, 1:].to(u.dtype)  # (n, 1)
    area = h * w * (u[:, :TRIES] * (scale[1] - scale[0]) + scale[0])  # (n, T)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    log_r = u[:, TRIES : 2 * TRIES] * (hi - lo) + lo  # (n, T)
    bw, bh = torch.sqrt(area * torch.exp(log_r)), torch.sqrt(area * torch.exp(-log_r))
    fits = (bw <= w) & (bh <= h)
    first = fits.to(u.dtype).argmax(1, keepdim=True)  # first box that fits (0 when none does)
    found = fits.any(1, keepdim=True)  # (n, 1)
    aspect = w / h
    fw = torch.where(aspect > ratio[1], h * ratio[1], w)  # the fallback: a too-wide image keeps its height
    fh = torch.where(aspect < ratio[0], w / ratio[0], h)  # ... a too-tall one its width
    bw = torch.where(found, bw.gather(1, first), fw)
    bh = torch.where(found, bh.gather(1, first), fh)
    x1 = torch.where(found, u[:, -2:-1] * (w - bw), (w - bw) / 2)
    y1 = torch.where(found, u[:, -1:] * (h - bh), (h - bh) / 2)
    return torch.cat([x1, y1, x1 + bw, y1 + bh], 1)  # (n, 4)


def resample_matrix(
    start: Tensor, end: Tensor, size: int, side: int, flip: Tensor | None = None, limit: Tensor | None = None
) -> Tensor:
    """``(n, size, side)`` matrices taking ``side`` pixels to ``size`` samples of the spans ``[start, end)``
    (pixel edges, shape ``(n,)``) with roi_align's taps: output pixel ``p`` averages ``g = ceil(span / size)``
    bilinear samples at ``start - ½ + (p + (i + ½) / g) · span / size``, clamped to the border pixels: pixel
    ``limit - 1`` (``limit`` (n,): each image's extent inside its canvas; default the whole ``side``).
    Where ``flip`` (n,) is set the rows come in reverse order (a mirrored crop)."""
    n, dev = start.shape[0], start.device
    span = (end - start).view(n, 1, 1)
    taps = math.ceil(side / size)  # the most any span ≤ side needs: a static count, so no host sync on GPUs
    grid = torch.ceil(span / size).clamp(1, taps)  # (n, 1, 1) samples per output pixel (≤ taps despite rounding)
    p = torch.arange(size, device=dev, dtype=start.dtype).view(1, size, 1)
    if flip is not None:
        p = torch.where(flip.view(n, 1, 1), size - 1 - p, p)  # (n, size, 1)
    i = torch.arange(taps, device=dev, dtype=start.dtype).view(1, 1, taps)
    extent = torch.full((n,), float(side), device=dev) if limit is None else limit.to(start.dtype)
    last = (extent - 1).view(n, 1, 1)  # the last pixel of each image inside its canvas
    pos = torch.minimum((start.view(n, 1, 1) - 0.5 + (p + (i + 0.5) / grid) * span / size).clamp_min(0), last)
    low = pos.floor()  # (n, size, taps)
    frac = pos - low
    weight = (i < grid) / grid  # (n, 1, taps): unused taps weigh 0
    high = torch.minimum(low + 1, last).long()
    low = low.long()
    m = torch.zeros(n, size, side, device=dev, dtype=start.dtype)
    m.scatter_add_(2, low, (1 - frac) * weight)
    return m.scatter_add_(2, high, frac * weight)  # (n, size, side), rows sum to 1


def resized_crops(src: Tensor, boxes: Tensor, flip: Tensor, size: int, sizes: Tensor | None = None) -> Tensor:
    """Crops ``boxes (V, B, 4)`` (x1, y1, x2, y2) of the float canvases ``src (B, 3, S, S)``, resized to ``size``
    and mirrored where ``flip (V, B)``; returns ``(V·B, 3, size, size)``, view-major. ``sizes (B, 2)``: the height
    and width of each image in its canvas (samples never reach the padding); default the whole canvas."""
    v, b, _ = boxes.shape
    side = src.shape[-1]
    box, flips = boxes.flatten(0, 1), flip.flatten()
    hw = (sizes if sizes is not None else torch.full((b, 2), side, device=src.device)).repeat(v, 1)  # (V·B, 2)
    mx = resample_matrix(box[:, 0], box[:, 2], size, side, flips, hw[:, 1]).view(v, b, size, side)
    my = resample_matrix(box[:, 1], box[:, 3], size, side, None, hw[:, 0]).view(v, b, size, side)
    out = torch.empty(v, b, 3, size, size, device=src.device, dtype=src.dtype)
    for k in range(v):  # a loop over views (2 or a few), not images
        cols = torch.bmm(src.view(b, 3 * side, side), mx[k].transpose(1, 2)).view(b, 3, side, size)  # (B, 3, S, l)
        torch.matmul(my[k].unsqueeze(1), cols, out=out[k])  # (B, 1, l, S) @ (B, 3, S, l) -> (B, 3, l, l)
    return out.view(v * b, 3, size, size)


def colour_matrix(
    mean_rgb: Tensor, order: Tensor, factors: Sequence[Tensor], to_gray: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Compose colour jitter (in each image's own op order) and grayscale into one affine map per image.

    ``mean_rgb`` (n, 3) is each input image's mean colour (needed by contrast), ``order`` (n, 4) a permutation
    of the ops brightness, contrast, saturation, hue per image (-1 where the image is not jittered),
    ``factors`` their four (n,) factors, ``to_gray`` (n,) a mask, ``scale`` multiplies the input first.
    Returns ``A`` (n, 3, 3) and ``c`` (n, 3, 1) with ``jitter(x) = clamp(A @ x + c, 0, 1)``.
    """
    n, dev = mean_rgb.shape[0], mean_rgb.device
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    luma = torch.tensor(_GRAY, device=dev).view(1, 1, 3).expand(n, 3, 3)  # every row = luma weights
    bright, contrast, sat, hue = (f.view(n, 1, 1) for f in factors)
    theta = 2 * math.pi * hue  # hue rotation about the grey axis u = (1, 1, 1)/√3 (Rodrigues' formula)
    u = torch.full((3, 3), 1.0 / 3.0, device=dev)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=dev) / math.sqrt(3.0)
    mats = torch.stack(
        [
            bright * eye,
            contrast * eye,
            sat * eye + (1 - sat) * luma,
            torch.cos(theta) * eye + torch.sin(theta) * cross + (1 - torch.cos(theta)) * u,
        ],
        1,
    )  # (n, 4, 3, 3)
    a = eye * scale  # (n, 3, 3)
    c = torch.zeros(n, 3, 1, device=dev)
    rows = torch.arange(n, device=dev)
    for position in range(4):
        op = order[:, position]
        m = torch.where((op >= 0).view(n, 1, 1), mats[rows, op.clamp_min(0)], eye)  # (n, 3, 3)
        # contrast blends with the mean grey level of the image as transformed so far
        grey_mean = (luma[:, :1] @ (a @ mean_rgb.view(n, 3, 1) + c)).view(n, 1, 1)  # (n, 1, 1)
        offset = torch.where((op == 1).view(n, 1, 1), (1 - contrast) * grey_mean, 0.0).expand(n, 3, 1)
        a, c = m @ a, m @ c + offset
    g = torch.where(to_gray.view(n, 1, 1), luma, eye)
    return g @ a, g @ c


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float | None = None) -> Tensor:
    """Blur each image with its own sigma (pixels), separable kernel of radius ceil(3 · max sigma), reflect pad.

    ``max_sigma`` (the largest sigma that can be drawn) fixes the radius without reading ``sigma`` back to the
    host, and makes an image's kernel independent of the other images' sigmas (the extra taps weigh ~0)."""
    n, _, h, w = x.shape
    top = float(sigma.max()) if max_sigma is None else max_sigma
    radius = max(1, min(math.ceil(3.0 * top), (min(h, w) - 1)))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (k,)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)  # (n, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, 1, 1, 1, -1)  # (n, 1, 1, 1, k)
    # a weighted sum of 2·radius + 1 shifted copies per pass: for the few-pixel radii of small crops this is about
    # twice as fast on CPUs as a depthwise conv2d with one group per image and channel, and about as fast at 224 px
    y = F.pad(x, (0, 0, radius, radius), mode="reflect")  # (n, 3, h + 2r, w)
    out = y[:, :, :h] * kernel[..., 0]
    for j in range(1, 2 * radius + 1):
        out.addcmul_(y[:, :, j : j + h], kernel[..., j])  # vertical pass
    y = F.pad(out, (radius, radius, 0, 0), mode="reflect")  # (n, 3, h, w + 2r)
    out = y[..., :w] * kernel[..., 0]
    for j in range(1, 2 * radius + 1):
        out.addcmul_(y[..., j : j + w], kernel[..., j])  # horizontal pass
    return out  # (n, 3, h, w)


class _Draw:
    """Random numbers for ``n_views`` views of a batch of ``total`` images, of which this process keeps ``rows``."""

    def __init__(self, gen: torch.Generator, rows: slice, total: int, device: torch.device) -> None:
        self.gen, self.rows, self.total, self.device = gen, rows, total, device

    def keep(self, values: Tensor, n_views: int) -> Tensor:
        """``(n_views · total, ...)`` view-major values -> ``(n_views · b, ...)``: this process's rows of each view."""
        return values.view(n_views, self.total, *values.shape[1:])[:, self.rows].flatten(0, 1)

    def rand(self, n_views: int, *shape: int) -> Tensor:
        return self.keep(torch.rand(n_views * self.total, *shape, generator=self.gen, device=self.device), n_views)


class MultiCrop:
    """DINO's 2 global + ``n_local`` local views of a uint8 batch, as float tensors ready for the model.

    ``__call__(images (B, 3, S, S) uint8, generator)`` returns ``{"global": (2B, 3, G, G), "local": (LB, 3, l, l)}``
    ordered view-major: rows ``v·B .. v·B + B - 1`` are view ``v`` of images ``0 .. B - 1``.
    Global view 1 is always blurred, view 2 blurred with p 0.1 and solarised with p 0.2, locals blurred with p 0.5
    (DINO's defaults). Blur sigmas are given for 224-px crops and scaled by ``global_size / 224``.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = DinoConfig.local_crops,
        *,
        global_scale: Sequence[float] = DinoConfig.global_crop_scale,
        local_scale: Sequence[float] = DinoConfig.local_crop_scale,
        flip_prob: float = DinoConfig.flip_prob,
        jitter_prob: float = DinoConfig.jitter_prob,
        brightness: float = DinoConfig.brightness,
        contrast: float = DinoConfig.contrast,
        saturation: float = DinoConfig.saturation,
        hue: float = DinoConfig.hue,
        grayscale_prob: float = DinoConfig.grayscale_prob,
        blur_probs: Sequence[float] = DinoConfig.blur_probs,
        blur_sigma: Sequence[float] = DinoConfig.blur_sigma,
        solarize_prob: float = DinoConfig.solarize_prob,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        for name, rng in (("global", global_scale), ("local", local_scale)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1] <= 1:
                raise ValueError(f"{name} crop scale must be (min, max) with 0 < min ≤ max ≤ 1, got {tuple(rng)}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.flip_prob, self.jitter_prob, self.grayscale_prob = flip_prob, jitter_prob, grayscale_prob
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_probs, self.solarize_prob = tuple(blur_probs), solarize_prob
        self.blur_sigma = tuple(s * global_size / 224.0 for s in blur_sigma)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(
        self, images: Tensor, gen: torch.Generator, rows: slice = slice(None), total: int | None = None,
        sizes: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """``images`` are the rows ``rows`` of a batch of ``total`` (torchrun; default: the whole batch): the random
        numbers are drawn for all ``total`` images and these rows kept, so the views do not depend on the split.
        ``sizes (B, 2)``: each image's height and width at the top-left of its canvas (default: the whole canvas)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, S, S) uint8 batch, got {tuple(images.shape)} {images.dtype}")
        b = images.shape[0]
        sizes = full_sizes(images) if sizes is None else sizes
        src = images.float()  # (B, 3, S, S) in 0..255; the 1/255 is folded into the colour matrix
        ones = torch.ones(b, device=images.device)
        blur_g = torch.cat([ones * self.blur_probs[0], ones * self.blur_probs[1]])  # (2B,) per-view probabilities
        solar_g = torch.cat([ones * 0.0, ones * self.solarize_prob])
        draw = _Draw(gen, rows, total or b, images.device)
        out = {"global": self._views(src, sizes, 2, self.global_size, self.global_scale, blur_g, solar_g, draw)}
        if self.n_local > 0:
            probs = ones.repeat(self.n_local)
            out["local"] = self._views(src, sizes, self.n_local, self.local_size, self.local_scale,
                                       probs * self.blur_probs[2], probs * 0.0, draw)  # fmt: skip
        return out

    def _views(
        self, src: Tensor, sizes: Tensor, n_views: int, size: int, scale: tuple[float, ...], blur_p: Tensor,
        solar_p: Tensor, draw: _Draw,
    ) -> Tensor:  # fmt: skip
        b = src.shape[0]
        n, dev, gen, k = b * n_views, src.device, draw.gen, draw.total * n_views  # k: views of the whole batch
        boxes = crop_boxes(sizes.repeat(n_views, 1), scale, draw.rand(n_views, CROP_DRAWS)).view(n_views, b, 4)
        flip = draw.rand(n_views) < self.flip_prob
        x = resized_crops(src, boxes, flip.view(n_views, b), size, sizes)  # (n, 3, size, size) in 0..255
        # colour jitter with p jitter_prob, ops in a random order per image, then grayscale with p grayscale_prob
        jitter = draw.rand(n_views) < self.jitter_prob
        factors = [
            draw.keep(_uniform(k, 1 - self.brightness, 1 + self.brightness, gen, dev), n_views),
            draw.keep(_uniform(k, 1 - self.contrast, 1 + self.contrast, gen, dev), n_views),
            draw.keep(_uniform(k, 1 - self.saturation, 1 + self.saturation, gen, dev), n_views),
            draw.keep(_uniform(k, -self.hue, self.hue, gen, dev), n_views),
        ]
        order = draw.rand(n_views, 4).argsort(1)  # (n, 4) a permutation per image
        order = torch.where(jitter.view(-1, 1), order, -1)
        to_gray = draw.rand(n_views) < self.grayscale_prob
        a, c = colour_matrix(x.mean((2, 3)), order, factors, to_gray, scale=1 / 255)
        # normalisation is folded into the colour map (then clamp to the normalised [0, 1]); blur and solarisation
        # work on normalised values: blur has unit-sum kernels per channel so it commutes with a per-channel affine
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1)
        x = torch.baddbmm((c - mean) / std, a / std, x.view(n, 3, size * size)).view(n, 3, size, size)
        for ch, (m, s) in enumerate(zip(self.mean, self.std, strict=True)):  # scalar bounds: far faster than tensors
            x[:, ch].clamp_(-m / s, (1 - m) / s)  # the normalised 0 and 1
        # blur and solarise only the images drawn for them (index select), not all images then a mask
        blur = draw.rand(n_views) < blur_p  # (n,)
        sigma = draw.keep(_uniform(k, self.blur_sigma[0], self.blur_sigma[1], gen, dev), n_views)
        x = _where(blur, x, lambda v, i: gaussian_blur(v, sigma if i is None else sigma[i], self.blur_sigma[1]))
        solar = draw.rand(n_views) < solar_p  # (n,)
        at, turn = ((128 / 255 - mean) / std).unsqueeze(-1), ((1 - 2 * mean) / std).unsqueeze(-1)  # (1, 3, 1, 1)
        x = _where(solar, x, lambda v, i: torch.where(v >= at, turn - v, v))  # x ↦ 1 - x where x ≥ 128/255
        return x  # (n, 3, size, size) float32, normalised


def full_sizes(images: Tensor) -> Tensor:
    """``(B, 2)`` sizes saying that every image fills its whole canvas."""
    b, _, h, w = images.shape
    return torch.tensor([[h, w]], device=images.device).expand(b, 2)


def _where(
    chosen: Tensor, x: Tensor, op: Callable[[Tensor, Tensor | None], Tensor], subset: bool | None = None
) -> Tensor:
    """``op`` applied to the images ``chosen (n,)`` of ``x (n, ...)``. On the CPU (``subset``) only those images are
    computed (index select); on a GPU all of them, then a select, because finding the subset (``nonzero``) would make
    the host wait for the GPU every step. ``op(images, index)`` gets the index of its images (None: all of them)."""
    if not (x.device.type == "cpu" if subset is None else subset):
        return torch.where(chosen.view(-1, *[1] * (x.ndim - 1)), op(x, None), x)
    index = chosen.nonzero().squeeze(1)
    if index.numel():
        x.index_copy_(0, index, op(x.index_select(0, index), index))
    return x
