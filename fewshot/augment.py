"""Batched multi-crop augmentation on uint8 image tensors: DINO's views (Caron et al. 2021, appendix; BYOL's
photometric recipe, Grill et al. 2020) without a per-image PIL pipeline.

Images are decoded once into a ``(N, 3, S, S)`` uint8 tensor; every step augments the whole batch with tensor
ops and one seeded ``torch.Generator``: random resized crops through ``torchvision.ops.roi_align`` (adaptive
sampling averages several bilinear taps per output pixel, so downscaled crops are anti-aliased like PIL's),
horizontal flips, colour jitter in a random per-image order, grayscale, Gaussian blur with a per-image sigma,
solarisation, normalisation. Every probability is drawn per image, so one call does what DINO's ``DataLoader``
does image by image.

Two approximations make the colour step one batched 3×3 matrix product per image: jitter and grayscale are
composed into a single affine map with one clamp at the end (torchvision clamps after each op), and the hue
shift rotates colours about the grey axis in RGB instead of shifting H in HSV (same angle, same grey axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, exactly as torchvision's rgb_to_grayscale
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of torchvision's RandomResizedCrop


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def crop_boxes(n: int, side: int, scale: Sequence[float], gen: torch.Generator, device: torch.device) -> Tensor:
    """RandomResizedCrop boxes ``(n, 4)`` as x1, y1, x2, y2 pixels of a ``side``-pixel square image.

    Area fraction ~ U(scale), log aspect ratio ~ U(log 3/4, log 4/3); like torchvision, up to 10 tries per image
    for a box that fits, else the whole image.
    """
    tries = 10
    area = _uniform(n * tries, scale[0], scale[1], gen, device).view(n, tries)
    log_r = _uniform(n * tries, math.log(_RATIO[0]), math.log(_RATIO[1]), gen, device).view(n, tries)
    w = torch.sqrt(area * torch.exp(log_r))  # fractions of the side
    h = torch.sqrt(area * torch.exp(-log_r))
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)  # first box that fits (0 when none does)
    any_fits = fits.any(1)
    w = torch.where(any_fits, w.gather(1, first).squeeze(1), torch.ones_like(any_fits, dtype=w.dtype))
    h = torch.where(any_fits, h.gather(1, first).squeeze(1), torch.ones_like(any_fits, dtype=h.dtype))
    x1 = torch.rand(n, generator=gen, device=device) * (1 - w)
    y1 = torch.rand(n, generator=gen, device=device) * (1 - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1) * side  # (n, 4)


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


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image with its own sigma (pixels), separable kernel of radius ceil(3 · max sigma), reflect pad."""
    n, c, h, w = x.shape
    radius = max(1, min(math.ceil(3.0 * float(sigma.max())), (min(h, w) - 1)))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (k,)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)  # (n, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n·c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)  # vertical pass
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)  # horizontal pass
    return y.view(n, c, h, w)


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
        n_local: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        blur_probs: Sequence[float] = (1.0, 0.1, 0.5),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_prob: float = 0.2,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
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

    def __call__(self, images: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, S, S) uint8 batch, got {tuple(images.shape)} {images.dtype}")
        b = images.shape[0]
        src = images.float()  # (B, 3, S, S) in 0..255; the 1/255 is folded into the colour matrix
        ones = torch.ones(b, device=images.device)
        blur_g = torch.cat([ones * self.blur_probs[0], ones * self.blur_probs[1]])  # (2B,) per-view probabilities
        solar_g = torch.cat([ones * 0.0, ones * self.solarize_prob])
        out = {"global": self._views(src, 2, self.global_size, self.global_scale, blur_g, solar_g, gen)}
        if self.n_local > 0:
            probs = ones.repeat(self.n_local)
            out["local"] = self._views(src, self.n_local, self.local_size, self.local_scale, probs * self.blur_probs[2],
                                       probs * 0.0, gen)  # fmt: skip
        return out

    def _views(
        self, src: Tensor, n_views: int, size: int, scale: tuple[float, ...], blur_p: Tensor, solar_p: Tensor,
        gen: torch.Generator,
    ) -> Tensor:  # fmt: skip
        b, _, side, _ = src.shape
        n, dev = b * n_views, src.device
        idx = torch.arange(b, device=dev, dtype=src.dtype).repeat(n_views)  # (n,) source image of each view
        boxes = torch.cat([idx[:, None], crop_boxes(n, side, scale, gen, dev)], 1)  # (n, 5)
        x = roi_align(src, boxes, (size, size), sampling_ratio=-1, aligned=True)  # (n, 3, size, size) in 0..255
        flip = (torch.rand(n, generator=gen, device=dev) < self.flip_prob).nonzero().squeeze(1)
        x[flip] = x[flip].flip(-1)
        # colour jitter with p jitter_prob, ops in a random order per image, then grayscale with p grayscale_prob
        jitter = torch.rand(n, generator=gen, device=dev) < self.jitter_prob
        factors = [
            _uniform(n, 1 - self.brightness, 1 + self.brightness, gen, dev),
            _uniform(n, 1 - self.contrast, 1 + self.contrast, gen, dev),
            _uniform(n, 1 - self.saturation, 1 + self.saturation, gen, dev),
            _uniform(n, -self.hue, self.hue, gen, dev),
        ]
        order = torch.rand(n, 4, generator=gen, device=dev).argsort(1)  # (n, 4) a permutation per image
        order = torch.where(jitter.view(-1, 1), order, -1)
        to_gray = torch.rand(n, generator=gen, device=dev) < self.grayscale_prob
        a, c = colour_matrix(x.mean((2, 3)), order, factors, to_gray, scale=1 / 255)
        x = torch.baddbmm(c, a, x.view(n, 3, size * size)).clamp_(0, 1).view(n, 3, size, size)
        blur = (torch.rand(n, generator=gen, device=dev) < blur_p).nonzero().squeeze(1)
        sigma = _uniform(n, self.blur_sigma[0], self.blur_sigma[1], gen, dev)
        if blur.numel():
            x[blur] = gaussian_blur(x[blur], sigma[blur])
        solar = (torch.rand(n, generator=gen, device=dev) < solar_p).nonzero().squeeze(1)
        if solar.numel():
            xs = x[solar]
            x[solar] = torch.where(xs >= 128 / 255, 1.0 - xs, xs)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        shift = -torch.tensor(self.mean, device=dev).view(1, 3, 1, 1) / std
        return torch.addcmul(shift, x, 1 / std)  # (n, 3, size, size) float32, normalised
