"""Two-view augmentation: per-sample randomness, torchvision's semantics per step, the evaluation transform."""

import collections
import dataclasses

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from hamjepa.config import AugmentConfig, Config, ConfigError
from hamjepa.data import augment as A

# Every random step switched off and crops of the whole image: the pipeline is then only normalisation.
IDENTITY = AugmentConfig(crop_scale_min=1.0, crop_scale_max=1.0, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                         blur_p=0.0, solarize_p=0.0)


def images(n=16, channels=3, size=32, seed=0):
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def unit(channels):
    """mean 0, std 1: outputs stay on the [0, 1] scale."""
    return (0.0,) * channels, (1.0,) * channels


def augment(cfg, x, seed=0, size=None):
    channels = x.shape[1]
    return A.Augmentation(cfg, size or x.shape[-1], channels, *unit(channels))(x, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_shapes_dtype_and_range(channels, size):
    x = images(channels=channels, size=size)
    out = augment(AugmentConfig(), x)
    assert out.shape == (16, channels, size, size) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    mean, std = (0.5,) * channels, (0.25,) * channels
    normalised = A.Augmentation(AugmentConfig(), size, channels, mean, std)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(normalised, (out - 0.5) / 0.25, atol=1e-5)


def test_the_two_views_differ_and_crops_differ_across_the_batch():
    same_image = images(n=1).expand(32, -1, -1, -1).contiguous()
    aug = A.Augmentation(AugmentConfig(), 32, 3, *unit(3))
    view_a, view_b = aug(same_image), aug(same_image)
    assert (view_a - view_b).abs().flatten(1).amax(dim=1).min() > 0.05  # every pair differs
    crops_only = dataclasses.replace(IDENTITY, crop_scale_min=0.3)
    rows = augment(crops_only, same_image).flatten(1)  # (32, C*H*W)
    distinct = {tuple(r.tolist()) for r in (rows * 1e4).round().long()}
    assert len(distinct) >= 30  # one crop per image, not one per batch


def test_seeded_views_are_reproducible():
    x = images()
    assert torch.equal(augment(AugmentConfig(), x, seed=5), augment(AugmentConfig(), x, seed=5))
    assert not torch.equal(augment(AugmentConfig(), x, seed=5), augment(AugmentConfig(), x, seed=6))


def test_identity_flip_solarize_and_grayscale_steps():
    x = images()
    unit_x = x.float() / 255
    assert torch.equal(augment(IDENTITY, x), unit_x)  # a whole-image crop resamples exactly (32 px)
    assert torch.equal(augment(dataclasses.replace(IDENTITY, flip_p=1.0), x), unit_x.flip(-1))
    solarized = augment(dataclasses.replace(IDENTITY, solarize_p=1.0), x)
    assert torch.allclose(solarized, torch.where(x >= 128, 255 - x, x).float() / 255, atol=1e-6)
    grey = augment(dataclasses.replace(IDENTITY, grayscale_p=1.0), x)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert torch.allclose(grey[:, :1], TF.rgb_to_grayscale(unit_x), atol=1e-3)


def test_probabilities_are_per_image():
    x = images(n=400, size=8)
    flipped = augment(dataclasses.replace(IDENTITY, flip_p=0.5), x)
    is_flipped = (flipped == x.float().flip(-1) / 255).flatten(1).all(dim=1)
    assert 150 < is_flipped.sum() < 250


def test_one_channel_jitter_is_brightness_and_contrast_only():
    aug = A.Augmentation(AugmentConfig(), 28, 1, (0.3,), (0.3,))
    assert [name for name, _, _ in aug.jitters] == ["brightness", "contrast"]
    rgb = A.Augmentation(AugmentConfig(), 32, 3, (0.3,) * 3, (0.3,) * 3)
    assert [name for name, _, _ in rgb.jitters] == ["brightness", "contrast", "saturation", "hue"]
    brightness_only = dataclasses.replace(IDENTITY, jitter_p=1.0, contrast=0.0)
    x = images(channels=1, size=28).clamp(1, 100)  # no clamping at 1.0 after a factor <= 1.4
    unit_x = x.float() / 255
    out = augment(brightness_only, x)
    factor = out.sum(dim=(1, 2, 3)) / unit_x.sum(dim=(1, 2, 3))  # one factor per image
    assert torch.allclose(out, factor.view(-1, 1, 1, 1) * unit_x, atol=1e-5)
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert factor.std() > 0.1


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_colour_factors_match_torchvision(name):
    x = torch.rand(6, 3, 16, 16)
    factors = torch.tensor([0.0, 0.6, 0.9, 1.0, 1.2, 1.4])
    ours = getattr(A, f"adjust_{name}")(x, factors)
    reference = torch.stack([getattr(TF, f"adjust_{name}")(x[i], factors[i].item()) for i in range(6)])
    assert torch.allclose(ours, reference, atol=1e-4)  # torchvision's luma weights differ in the 4th digit


def test_hue_matches_torchvision_including_grey_and_tied_pixels():
    x = torch.rand(8, 3, 16, 16)
    x[0] = 0.5  # grey: no hue
    x[1, 1] = x[1, 0]  # red and green tied at the maximum in places
    shifts = torch.tensor([0.1, -0.1, 0.5, -0.5, 0.25, 0.0, 0.01, -0.37])
    ours = A.adjust_hue(x, shifts)
    reference = torch.stack([TF.adjust_hue(x[i], shifts[i].item()) for i in range(8)])
    assert torch.allclose(ours, reference, atol=1e-5)


def test_blur_matches_torchvision():
    x = torch.rand(4, 3, 20, 20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    for kernel in (3, 5):
        ours = A.gaussian_blur(x, sigma, kernel)
        reference = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2) for i in range(4)])
        assert torch.allclose(ours, reference, atol=1e-6)


def test_crop_matches_torchvision_resized_crop_inside_the_box():
    x = torch.rand(8, 3, 32, 32)
    top, left, h, w = A.sample_crops(8, 32, 32, (0.3, 1.0), generator=torch.Generator().manual_seed(0))
    ours = A.crop_flip_resize(x, top, left, h, w, torch.zeros(8, dtype=torch.bool), 32)
    for i in range(8):
        reference = TF.resized_crop(x[i], top[i].item(), left[i].item(), h[i].item(), w[i].item(), [32, 32],
                                    antialias=False)
        # the same bilinear samples, except on the outer ring, where we may read just outside the box
        assert torch.allclose(ours[i, :, 2:-2, 2:-2], reference[:, 2:-2, 2:-2], atol=1e-5)


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    top, left, h, w = A.sample_crops(2000, 32, 32, (0.3, 1.0), generator=torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).double() / 1024
    assert area.min() > 0.25 and area.max() <= 1.0
    aspect = w.double() / h.double()
    assert aspect.min() > 0.6 and aspect.max() < 1.6  # 3/4..4/3 up to rounding
    assert 0.55 < area.mean() < 0.7  # roughly U(0.3, 1) on the fitting draws
    assert len(set(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist()))) > 1000


def test_blur_is_applied_with_its_probability():
    x = images(n=200)
    out = augment(dataclasses.replace(IDENTITY, blur_p=0.5, blur_sigma_min=1.0), x)
    changed = (out != x.float() / 255).flatten(1).any(dim=1)
    assert 70 < changed.sum() < 130
    variation = (out[:, :, :, 1:] - out[:, :, :, :-1]).abs().flatten(1).mean(dim=1)
    raw = (x.float() / 255).diff(dim=-1).abs().flatten(1).mean(dim=1)
    assert (variation[changed] < 0.8 * raw[changed]).all()  # blurred images are smoother


def test_eval_transform_is_deterministic_normalisation():
    x = images()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    transform = A.Normalise(mean, std, image_size=32)
    out = transform(x)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(out, transform(x))
    resized = A.Normalise(mean, std, image_size=16)(images(size=40))
    assert resized.shape == (16, 3, 16, 16)


def test_resize_square_keeps_the_centre():
    wide = torch.zeros(1, 1, 10, 20, dtype=torch.uint8)
    wide[..., 5:15] = 200  # the central 10 columns
    assert torch.equal(A.resize_square(wide, 10), torch.full((1, 1, 10, 10), 200, dtype=torch.uint8))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        A.Augmentation(AugmentConfig(), 32, 3, *unit(3))(torch.rand(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="augment.blur_kernel"):  # the config refuses it, once
        Config().override({"data.image_size": 8, "augment.blur_kernel": 23})
    with pytest.raises(ValueError, match="3 value"):
        A.Augmentation(AugmentConfig(), 32, 3, (0.5,), (0.5,))


def test_jitter_order_is_a_random_permutation_per_image():
    aug = A.Augmentation(dataclasses.replace(IDENTITY, jitter_p=1.0), 4, 3, *unit(3))
    # Stand-in ops that write their own index as the next decimal digit: the value spells the order.
    aug.jitters = [(name, lambda x, factor, op=op: x * 10 + op, s) for op, (name, _, s) in enumerate(aug.jitters)]
    params = aug.sample(2400, 1, 1, torch.Generator().manual_seed(0))
    spelled = aug._jitter(torch.zeros(2400, 1, 1, 1), params).flatten().long()
    orders = [tuple(int(d) for d in f"{v:04d}") for v in spelled.tolist()]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    counts = torch.tensor(list(collections.Counter(orders).values()))
    assert len(counts) == 24 and counts.min() > 60 and counts.max() < 140  # uniform: 100 each


# -- on the device: parameters drawn there, random-applied steps by mask (data.augment_on = device) ------------

def test_mask_and_index_modes_give_the_same_views_from_the_same_parameters():
    """sync_free (the GPU mode: whole batch, then a per-image mask) is the index mode's result, image for image."""
    for channels in (3, 1):
        x = images(n=64, channels=channels, size=16, seed=channels)
        by_index = A.Augmentation(AugmentConfig(), 16, channels, (0.4,) * channels, (0.2,) * channels, sync_free=False)
        by_mask = A.Augmentation(AugmentConfig(), 16, channels, (0.4,) * channels, (0.2,) * channels, sync_free=True)
        params = by_index.sample(64, 16, 16, torch.Generator().manual_seed(3))
        assert params.blur.any() and not params.blur.all() and params.jitter.any() and not params.jitter.all()
        assert torch.allclose(by_index.apply(x, params), by_mask.apply(x, params), atol=1e-5)


def test_a_seeded_generator_gives_the_same_parameters_and_views_in_both_modes():
    x = images(n=32)
    views = [A.Augmentation(AugmentConfig(), 32, 3, *unit(3), sync_free=mode)(x, torch.Generator().manual_seed(9))
             for mode in (False, True)]
    assert torch.allclose(views[0], views[1], atol=1e-5)


class _Recording(A.Augmentation):
    """An Augmentation that keeps every ViewParams it draws, to read the parameter distribution of a path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn = []

    def sample(self, *args, **kwargs):
        params = super().sample(*args, **kwargs)
        self.drawn.append(params)
        return params


def _statistics(drawn, size):
    """Per-parameter means over every drawn view: the quantities whose distribution the two paths must share."""
    def cat(name):
        return torch.cat([getattr(p, name) for p in drawn]).double()

    area = cat("h") * cat("w") / size ** 2
    stats = {"area": area.mean(), "aspect": (cat("w") / cat("h")).log().mean(), "sigma": cat("sigma").mean()}
    stats.update({name: cat(name).mean() for name in ("flip", "jitter", "grey", "blur", "solarize")})
    for op in range(4):
        stats[f"factor{op}"] = torch.cat([p.factors[op] for p in drawn]).double().mean()
        stats[f"first_op{op}"] = (torch.cat([p.order[:, 0] for p in drawn]) == op).double().mean()
    return stats


def test_device_and_loader_paths_draw_views_from_the_same_distribution():
    """The same images through the device-resident feed (mask mode, its own generator) and the loader feed
    (DataLoader, torch's global RNG): every parameter's mean agrees with the other path and with its law."""
    from hamjepa.data.feeds import LoaderFeed, ResidentFeed
    from hamjepa.data.sources import ImageSet

    n, size = 4096, 8
    x = images(n=n, size=size, seed=1)
    image_set = ImageSet(torch.zeros(n, dtype=torch.long), images=x)
    stats, pixels = {}, {}
    for name in ("device", "loader"):
        aug = _Recording(AugmentConfig(), size, 3, *unit(3), sync_free=name == "device")
        feed = (ResidentFeed(image_set, aug, 512, 1, 0, seed=0, device=torch.device("cpu")) if name == "device" else
                LoaderFeed(image_set, aug, 512, 1, 0, seed=0, num_workers=0, device=torch.device("cpu")))
        torch.manual_seed(123)
        feed.set_epoch(1, augment_seed=77)
        views = [v for pair in feed for v in pair]  # (512, 3, S, S) each
        stats[name] = _statistics(aug.drawn, size)
        pixels[name] = torch.cat([v.mean(dim=(1, 2, 3)) for v in views]).double()  # per-view mean intensity
    views_drawn = 2 * n
    law = {"flip": 0.5, "jitter": 0.8, "grey": 0.2, "blur": 0.5, "solarize": 0.2, "sigma": 1.05, "aspect": 0.0,
           "factor0": 1.0, "factor1": 1.0, "factor2": 1.0, "factor3": 0.0}
    law.update({f"first_op{op}": 0.25 for op in range(4)})
    for key, expected in law.items():
        for name in ("device", "loader"):
            assert stats[name][key].item() == pytest.approx(expected, abs=0.03), (name, key)
    for key in stats["device"]:  # and the two paths agree with each other within sampling noise
        assert abs(stats["device"][key] - stats["loader"][key]).item() < 0.03, key
    assert 0.55 < stats["device"]["area"] < 0.75
    assert len(pixels["device"]) == len(pixels["loader"]) == views_drawn
    for q in (0.1, 0.5, 0.9):
        assert pixels["device"].quantile(q).item() == pytest.approx(pixels["loader"].quantile(q).item(), abs=0.01)
