"""The two-view augmentation pipeline (docs/method.md §6) and the evaluation transform, batched.

Pipeline, one random view per image: RandomResizedCrop(scale, ratio 3/4-4/3) -> horizontal flip ->
colour jitter (brightness, contrast, saturation, hue; random order) with probability jitter_p ->
grayscale -> Gaussian blur (kernel, sigma range) -> solarize at 128 (on the 0-255 scale) -> normalise with
the dataset's mean and std. Two calls on the same images give the two views.

Why batched, with per-sample parameters: torchvision's v2 transforms cost about 2 ms per 32 px RGB view
here when applied image by image (Python overhead; about 230 two-view images/s per core), and applied to a
batch they draw ONE crop for the whole batch (docs/design.md "Pitfalls we measured"). So every random
choice - crop box, flip, jitter factors and their order, grayscale, blur sigma, solarize - is drawn per sample
and applied with tensor ops over the batch: `python -m hamjepa.bench augment` measures the throughput. The
same code runs in DataLoader workers on the CPU or in the training loop on the training device
(data.augment_on, feeds.py).

Parameters first, pixels second: `Augmentation.sample` draws every random choice of a batch (a ViewParams)
on the generator's device, and `apply` applies them. On the CPU a random-applied step touches only its chosen
images (gathered by index: no work for the rest). On a GPU that gather would need the chosen count on the
host, a synchronisation per step; there every step runs on the whole batch and a per-image mask keeps or
drops its result (`sync_free`), which costs more arithmetic, cheap on a GPU, and never waits for the device.
Both modes give the same views from the same parameters (tests/test_augment.py).

Semantics are torchvision's for float images in [0, 1]: brightness scales, contrast blends with the
image's mean grey level, saturation blends with the grey image, hue rotates the HSV hue, each clamped to
[0, 1]; factors are drawn uniformly from [max(0, 1 - s), 1 + s] (hue from [-h, h]). The whole pipeline
works on floats: no rounding to uint8 between steps.

One-channel images (Fashion-MNIST): colour jitter keeps brightness and contrast, the two factors that
exist without colour, in random order; saturation and hue would be no-ops and are not drawn; random
grayscale is a no-op and is skipped. Normalisation uses the dataset's own mean and std per channel.

Resampling: the crop-flip-resize is one bilinear `grid_sample` without antialiasing. That is exact for the
up-sampling that happens here, because sources.py stores every image at the output size (`image_size`), so a
crop is never larger than the output; a crop of the whole image reproduces the image (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hamjepa.config import AugmentConfig

CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of RandomResizedCrop (torchvision's default)
CROP_ATTEMPTS = 10  # draws per sample before falling back to the whole image, as torchvision does
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None,
             device: torch.device | None = None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) on like's device and dtype, to broadcast over (B, C, H, W)."""
    return values.to(like.device, like.dtype).view(-1, 1, 1, 1)


# -- geometry -------------------------------------------------------------------------------------------

def sample_crops(n: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float] = CROP_RATIO,
                 generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop boxes for n images: (top, left, h, w), int64 (n,) each, drawn on `device`.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of CROP_ATTEMPTS draws that fits
    the image is kept, else the whole image (clipped to the ratio range), centred. The offset is uniform.
    """
    area = height * width
    draw = dict(generator=generator, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, CROP_ATTEMPTS, **draw))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, CROP_ATTEMPTS, **draw))
    w = torch.round(torch.sqrt(target * aspect)).long()  # (n, attempts)
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first fitting attempt (argmax: first maximum)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    fallback_w, fallback_h = width, height
    if width / height < ratio[0]:
        fallback_h = round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_w = round(height * ratio[1])
    none_fits = ~fits.any(dim=1)
    w = torch.where(none_fits, fallback_w, w)
    h = torch.where(none_fits, fallback_h, h)
    top = (torch.rand(n, **draw) * (height - h + 1)).long()
    left = (torch.rand(n, **draw) * (width - w + 1)).long()
    top = torch.where(none_fits, (height - h) // 2, top)
    left = torch.where(none_fits, (width - w) // 2, left)
    return top, left, h, w


def crop_flip_resize(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                     flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box (top, left, h, w) of each image, mirror where flip, resize bilinearly to size x size.

    x float (B, C, H, W) -> (B, C, size, size). One affine grid per sample: output coordinate u in [-1, 1]
    reads the input at centre + half-extent * u (negated x-extent for a flip), align_corners=False.
    """
    batch, channels, height, width = x.shape
    theta = torch.zeros(batch, 2, 3, dtype=x.dtype, device=x.device)  # (B, 2, 3)
    top, left, h, w, flip = (v.to(x.device) for v in (top, left, h, w, flip))
    sign = 1.0 - 2.0 * flip.to(x.dtype)
    theta[:, 0, 0] = sign * w.to(x.dtype) / width
    theta[:, 0, 2] = (2 * left + w).to(x.dtype) / width - 1
    theta[:, 1, 1] = h.to(x.dtype) / height
    theta[:, 1, 2] = (2 * top + h).to(x.dtype) / height - 1
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -- colour -------------------------------------------------------------------------------------------

def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of (B, 3, H, W) RGB, or the image itself for one channel: (B, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    # Python-scalar weights: no small tensor copied to the device on every call
    red, green, blue = GREY_WEIGHTS
    return (x[:, 0:1] * red).add_(x[:, 1:2] * green).add_(x[:, 2:3] * blue)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _column(factor, x)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level (one scalar per image)."""
    f = _column(factor, x)
    mean = grey(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x * f).add_((1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image."""
    f = _column(factor, x)
    return (x * f).add_(grey(x) * (1 - f)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB (B, 3, H, W) by shift (in turns, [-0.5, 0.5]); value and saturation stay.

    Hue in sextants, h6, from the channel holding the maximum (red before green before blue on ties);
    back to RGB with the closed form channel_n = max - chroma * clamp(2 - |k - 2|, 0, 1),
    k = (n + h6) mod 6 for n = 5, 3, 1 (R, G, B). Selections are arithmetic masks rather than torch.where,
    which is several times slower on the CPU.
    """
    r, g, b = x.unbind(dim=1)  # (B, H, W) each
    high, low = x.amax(dim=1), x.amin(dim=1)
    chroma = high - low
    inverse = 1 / chroma.clamp_min(1e-12)  # |differences| <= chroma, so grey pixels get hue 0
    red = (high == r).to(x.dtype)
    green = (high == g).to(x.dtype) * (1 - red)
    h_red, h_green, h_blue = (g - b) * inverse, (b - r) * inverse + 2, (r - g) * inverse + 4
    h6 = h_blue + green * (h_green - h_blue) + red * (h_red - h_blue)  # in [-1, 5)
    h6 += 6 * shift.to(x.device, x.dtype).view(-1, 1, 1)
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # (5, 3, 1), made on the device
    k = n + h6.unsqueeze(1)  # (B, 3, H, W)
    k -= torch.floor(k / 6) * 6
    weight = (k - 2).abs_().neg_().add_(2).clamp_(0, 1)
    return weight.mul_(-chroma.unsqueeze(1)).add_(high.unsqueeze(1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma (> 0) per image, reflect padding; x (B, C, H, W), kernel odd.

    A weighted sum of shifted copies, `kernel` multiply-adds per direction: cheaper on the CPU than a
    grouped convolution with B * C groups.
    """
    half = kernel // 2
    if half == 0:
        return x
    offsets = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)  # (k,)
    weights = torch.exp(-0.5 * (offsets / sigma.to(x.device, x.dtype)[:, None]) ** 2)  # (B, k)
    weights = (weights / weights.sum(dim=1, keepdim=True)).view(-1, 1, 1, 1, kernel)
    height, width = x.shape[-2:]
    padded = F.pad(x, (half, half, half, half), mode="reflect")  # (B, C, H + 2 half, W + 2 half)
    rows = padded[..., 0:height, :] * weights[..., 0]
    for t in range(1, kernel):
        rows += padded[..., t:t + height, :] * weights[..., t]
    out = rows[..., 0:width] * weights[..., 0]
    for t in range(1, kernel):
        out += rows[..., t:t + width] * weights[..., t]
    return out


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert pixels at or above threshold (on the [0, 1] scale)."""
    return torch.where(x >= threshold, 1 - x, x)


def _apply_to_chosen(x: torch.Tensor, chosen: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """Apply fn(x[i], *args[i]) to the chosen images only, in place in x; chosen is bool (B,) on x's device.

    Random-applied steps touch only their images: no work, and no slow full-batch torch.where, for the rest.
    Needs the chosen count on the host (torch.nonzero), so on a GPU it would wait for the device: see _blend_chosen.
    """
    index = torch.nonzero(chosen).squeeze(1)
    if len(index):
        x[index] = fn(x[index], *(a[index] for a in args))
    return x


def _blend_chosen(x: torch.Tensor, chosen: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """fn on the whole batch, kept where chosen (bool (B,)): _apply_to_chosen's result, never waiting for the device."""
    return torch.where(chosen.view(-1, 1, 1, 1), fn(x, *args), x)


@dataclass
class ViewParams:
    """Every random choice of one view of a batch of B images; (B,) tensors on one device unless noted."""

    top: torch.Tensor  # crop box, int64 pixels
    left: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    factors: list[torch.Tensor]  # one per jitter op (Augmentation.jitters): factor, or hue shift in turns
    order: torch.Tensor  # int64 (B, ops): each image's order of the jitter ops, a permutation
    grey: torch.Tensor  # bool (all False for one channel)
    sigma: torch.Tensor  # blur sigma
    blur: torch.Tensor  # bool
    solarize: torch.Tensor  # bool


# -- the pipeline -----------------------------------------------------------------------------------------

class Augmentation:
    """One random view of every image in a batch: uint8 (B, C, H, W) -> float32 (B, C, S, S), normalised.

    S = image_size. Call it twice on the same batch for the two views. Randomness comes from `generator`
    when given (drawn on its device), else torch's global RNG of the images' device (seeded per DataLoader
    worker by torch, so runs are reproducible). `sync_free`: apply random-applied steps by mask (_blend_chosen)
    rather than by index (_apply_to_chosen); None = by mask on any device but the CPU (module docstring).
    """

    def __init__(self, cfg: AugmentConfig, image_size: int, channels: int, mean: Sequence[float],
                 std: Sequence[float], sync_free: bool | None = None):
        # The config checked the channels (encoder.in_channels) and the blur kernel against the image size.
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} value(s) each, got {len(mean)} and {len(std)}.")
        self.cfg, self.size, self.channels, self.sync_free = cfg, image_size, channels, sync_free
        self.normalise = Normalise(mean, std)
        jitters = [("brightness", adjust_brightness, cfg.brightness), ("contrast", adjust_contrast, cfg.contrast)]
        if channels == 3:
            jitters += [("saturation", adjust_saturation, cfg.saturation), ("hue", adjust_hue, cfg.hue)]
        self.jitters = [(name, fn, strength) for name, fn, strength in jitters if strength > 0]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else images.device
        return self.apply(images, self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator, device))

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> ViewParams:
        """Every random choice for n images of height x width, drawn on `device` (the generator's, if given).

        The draws come in a fixed order (crops, flip, jitter, grayscale, blur, solarize), so a seeded
        generator gives the same parameters whatever is done with them.
        """
        cfg = self.cfg
        draw = dict(generator=generator, device=device)
        top, left, h, w = sample_crops(n, height, width, (cfg.crop_scale_min, cfg.crop_scale_max), **draw)
        flip = torch.rand(n, **draw) < cfg.flip_p
        jitter = torch.rand(n, **draw) < cfg.jitter_p
        factors = [_uniform(n, -s, s, **draw) if name == "hue" else _uniform(n, max(0.0, 1 - s), 1 + s, **draw)
                   for name, _, s in self.jitters]
        order = torch.rand(n, len(self.jitters), **draw).argsort(dim=1)  # (B, ops): a permutation per image
        grey_ = (torch.rand(n, **draw) < cfg.grayscale_p if self.channels == 3
                 else torch.zeros(n, dtype=torch.bool, device=flip.device))
        sigma = _uniform(n, cfg.blur_sigma_min, cfg.blur_sigma_max, **draw)
        blur = torch.rand(n, **draw) < cfg.blur_p
        solarize_ = torch.rand(n, **draw) < cfg.solarize_p
        return ViewParams(top, left, h, w, flip, jitter, factors, order, grey_, sigma, blur, solarize_)

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The view of uint8 images (B, C, H, W) that params describe; params are moved to the images' device."""
        sync_free = images.device.type != "cpu" if self.sync_free is None else self.sync_free
        select = _blend_chosen if sync_free else _apply_to_chosen
        p = ViewParams(**{k: ([f.to(images.device) for f in v] if isinstance(v, list) else v.to(images.device))
                          for k, v in vars(params).items()})
        x = _unit_floats(images)  # (B, C, H, W) in [0, 1]
        x = crop_flip_resize(x, p.top, p.left, p.h, p.w, p.flip, self.size)  # (B, C, S, S), a fresh tensor we own
        x = self._jitter(x, p, select)
        if self.channels == 3:
            x = select(x, p.grey, lambda v: grey(v).expand_as(v))
        kernel, threshold = self.cfg.blur_kernel, self.cfg.solarize_threshold / 255
        x = select(x, p.blur, lambda v, s: gaussian_blur(v, s, kernel), p.sigma)
        x = select(x, p.solarize, lambda v: solarize(v, threshold))
        return self.normalise.floats(x)

    def _jitter(self, x: torch.Tensor, p: ViewParams, select=_apply_to_chosen) -> torch.Tensor:
        """Colour jitter where p.jitter; each jittered image applies its factors in its own order p.order."""
        for slot in range(len(self.jitters)):
            for op, (_, fn, _) in enumerate(self.jitters):
                x = select(x, p.jitter & (p.order[:, slot] == op), fn, p.factors[op])
        return x


class Normalise:
    """The evaluation transform: uint8 (B, C, H, W) -> float32 (B, C, S, S) with the dataset's mean and std.

    Deterministic. Images of another size are resized (shorter side to S, antialiased) and centre-cropped
    when `image_size` is given; sources.py already stores images at the run's size, so usually this only scales.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int | None = None):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.size = image_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _unit_floats(images)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = resize_square(x, self.size)
        return self.floats(x)

    def floats(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise float images already in [0, 1]."""
        if self.mean.device != x.device:  # moved once, not copied to the device with every batch
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean).div_(self.std)


def _unit_floats(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> a new float32 tensor in [0, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} of shape {tuple(images.shape)}.")
    return images.float().div_(255)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to size (bilinear, antialiased), then the centred size x size square; (B, C, H, W)."""
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        dtype = x.dtype
        x = F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else x
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size]
