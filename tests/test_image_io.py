"""uml.image_io: the readers of the importers and of uml predict, and the resizing they share."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.data.helpers import rgb, save
from uml import image_io
from uml.errors import DataError
from uml.image_io import read_image, read_mask_values, read_rgb


def test_both_readers_scale_16_bit_grey_to_8_bit_instead_of_clipping(tmp_path: Path) -> None:
    grey = rgb(32, 32, 5)[..., 0]
    path = tmp_path / "wide.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 8-bit grey g stored as 16-bit 257 g
    assert Image.open(path).mode.startswith("I;16")
    expected = np.dstack([grey] * 3)
    assert np.array_equal(read_rgb(path), expected)
    image, original = read_image(path, 32)
    assert original == (32, 32) and np.array_equal(image, expected)


def test_large_jpeg_uses_reduced_decoding_and_area_resize(tmp_path: Path) -> None:
    big = cv2.resize(rgb(64, 64, 3), (256, 256), interpolation=cv2.INTER_CUBIC)
    path = save(tmp_path / "big.jpg", big, quality=95)
    image, original = read_image(path, 32)
    assert original == (256, 256) and image.shape == (32, 32, 3)
    reference = cv2.resize(np.asarray(Image.open(path).convert("RGB")), (32, 32), interpolation=cv2.INTER_AREA)
    assert np.abs(image.astype(int) - reference).mean() < 3


def test_colour_mask_is_rejected_and_palette_mask_gives_indices(tmp_path: Path) -> None:
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[2:4, 2:4] = (255, 0, 0)
    with pytest.raises(DataError, match="colour mask"):
        read_mask_values(save(tmp_path / "c.png", colour), grey=False)
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
    pal.save(tmp_path / "p.png")
    assert read_mask_values(tmp_path / "p.png", grey=False).tolist() == [[0, 1], [2, 1]]


def test_the_importers_raise_pillows_pixel_limit_only_while_they_open_a_file(tmp_path):
    """Large medical images up to 400 M pixels are accepted by the importers, but Pillow's limit is
    process-wide: it must stay at the default for every other reader (e.g. ``uml predict``)."""
    from tests.test_predict import _png_claiming

    default = Image.MAX_IMAGE_PIXELS
    big = _png_claiming(tmp_path / "big.png", 15000, 15000)  # 225 M pixels: over 2 x the default 89 M
    with pytest.raises(Image.DecompressionBombError):
        Image.open(big)
    with pytest.raises(DataError, match="big.png") as err:  # opens, then fails to decode the fake pixels
        read_image(big, 64)
    assert "too large" not in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == default
    bomb = _png_claiming(tmp_path / "bomb.png", 30000, 30000)  # 900 M pixels: over 2 x 400 M
    with pytest.raises(DataError, match="bomb.png.*too large"):
        read_image(bomb, 64)
    assert Image.MAX_IMAGE_PIXELS == default and image_io.MAX_IMAGE_PIXELS == 400_000_000
