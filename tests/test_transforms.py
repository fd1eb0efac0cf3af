"""Preprocess: torchvision's geometry (computed here from its documented rules, since
torchvision cannot be installed), one resampling implementation, and exact composition of a
stored working square with the final crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from googlenet.errors import UserError
from googlenet.transforms import Preprocess, center_offset, resized_size, working_size

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def torchvision_box(h: int, w: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """torchvision's Resize(resize) + CenterCrop(crop), from its documented rules:
    Resize(int) on h <= w gives (resize, int(resize * w / h)) (and symmetrically);
    CenterCrop: top = int(round((H - crop) / 2)), left = int(round((W - crop) / 2))."""
    if h <= w:
        rh, rw = resize, int(resize * w / h)
    else:
        rh, rw = int(resize * h / w), resize
    return rh, rw, int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))  # noqa: RUF046


@pytest.mark.parametrize(
    ("h", "w"),
    [(500, 741), (741, 500), (375, 500), (333, 499), (257, 1023), (224, 225), (256, 256)],
)
def test_geometry_is_torchvisions_rounding(h, w):
    pp = Preprocess(224, ZERO, ONE, resize=256)
    assert pp.crop_box(h, w) == torchvision_box(h, w, 256, 224)


def test_the_issue_photo_and_the_rounding_that_differs():
    # 741 x 500 (w x h): resized to 256 x 379, the crop's left edge is round(77.5) = 78 (half to
    # even), one pixel right of the (379 - 224) // 2 = 77 a floor division gives.
    assert resized_size(500, 741, 256) == (256, 379)
    assert center_offset(379, 224) == 78
    assert center_offset(381, 224) == 78  # round(78.5) = 78 as well: halves go to even
    assert resized_size(500, 743, 256) == (256, 380)  # int(380.4): truncated, not rounded


def test_pixels_are_a_resize_then_crop_rounded_to_8_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 50, 74), dtype=torch.uint8, generator=g)
    pp = Preprocess(24, ZERO, ONE, resize=32)
    rh, rw, top, left = pp.crop_box(50, 74)
    full = F.interpolate(x.float(), (rh, rw), mode="bilinear", antialias=True)
    want = full[..., top : top + 24, left : left + 24].round().clamp(0, 255)
    got = pp.pixels(x)
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 24, 24)
    assert (got.float() - want).abs().max() <= 1  # float rounding at .5 boundaries only
    assert (got.float() != want).float().mean() < 0.01
    # float input 0..1 gives the same pixels as uint8, and normalisation is (x/255 - m) / s
    assert torch.equal(pp.pixels(x.float() / 255), got)
    norm = Preprocess(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), resize=32)
    assert torch.allclose(norm(x), (got.float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("size", [32, 96, 224])
def test_working_square_then_crop_equals_the_direct_crop(size):
    """Training stores each image as the working square; cropping input_size from it must
    give the pixels evaluate gets by resizing and cropping the original file."""
    side = working_size(size)
    assert (side - size) % 4 == 0 and side > size
    g = torch.Generator().manual_seed(size)
    pp = Preprocess(size, ZERO, ONE, resize=side)
    for h, w in [(side + 37, side * 2 + 3), (side * 3 + 1, side + 5), (side, side + 1)]:
        x = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g)
        stored = pp.working().pixels(x)
        assert stored.shape[-2:] == (side, side)
        again = Preprocess(size, ZERO, ONE, resize=None).pixels(stored)
        direct = pp.pixels(x)
        assert (again.int() - direct.int()).abs().max() <= 1
        assert (again != direct).float().mean() < 0.01


def test_bad_preprocess_values_are_one_line_errors():
    with pytest.raises(UserError, match="resize 16 is smaller than the 32"):
        Preprocess(32, ZERO, ONE, resize=16)
    with pytest.raises(UserError, match="std > 0"):
        Preprocess(32, ZERO, (1.0, 0.0, 1.0))
    with pytest.raises(UserError, match="smaller than the 32-pixel crop"):
        Preprocess(32, ZERO, ONE).pixels(torch.zeros(1, 3, 20, 40, dtype=torch.uint8))
    with pytest.raises(UserError, match="no field 'mean'"):
        Preprocess.from_dict({"input_size": 32, "std": [1, 1, 1]}, "x.safetensors")


def test_the_unnormalised_square_is_one_preprocessing(tmp_path):
    from PIL import Image

    from googlenet.transforms import read_image, read_image_resized

    square = Preprocess.square(24)
    assert square == Preprocess(24, ZERO, ONE, resize=24)
    assert Preprocess(16, (0.5,) * 3, (0.2,) * 3, resize=24).working() == square
    arr = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    shown = read_image_resized(tmp_path / "a.png", 24)
    assert torch.equal(shown, square.pixels(read_image(tmp_path / "a.png")[None])[0])
