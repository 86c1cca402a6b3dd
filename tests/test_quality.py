"""uml.quality: the image statistics of the unusual-image rule, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uml.quality import STATISTICS, image_statistics, noise_sigma, noise_sigmas, unusual_features


def test_a_flat_gray_image():
    image = np.full((1, 32, 32, 3), 0.4)
    assert dict(zip(STATISTICS, image_statistics(image)[0])) == pytest.approx(
        {"brightness": 0.4, "contrast": 0.0, "colourfulness": 0.0, "noise": 0.0})


def test_colourfulness_is_the_mean_channel_spread():
    # Left half pure red (spread 1), right half gray (spread 0): mean 0.5. Brightness: (1/3 + 0.5) / 2.
    image = np.zeros((1, 8, 8, 3))
    image[0, :, :4] = (1.0, 0.0, 0.0)
    image[0, :, 4:] = 0.5
    brightness, contrast, colourfulness, _ = image_statistics(image)[0]
    assert colourfulness == pytest.approx(0.5)
    assert brightness == pytest.approx((1 / 3 + 0.5) / 2)
    assert contrast == pytest.approx(abs(0.5 - 1 / 3) / 2)  # two equal halves: half their difference
    # A grayscale copy (every channel the mean) keeps the brightness and loses all colour.
    gray = np.repeat(image.mean(axis=3, keepdims=True), 3, axis=3)
    assert image_statistics(gray)[0, 2] == 0.0 and image_statistics(gray)[0, 0] == pytest.approx(brightness)


def test_the_noise_estimate_ignores_smooth_content_and_finds_white_noise():
    yy, xx = np.mgrid[:64, :64] / 64.0
    assert noise_sigma(0.2 + 0.5 * xx + 0.3 * yy) == pytest.approx(0.0, abs=1e-12)  # a plane: no noise
    assert noise_sigma(np.zeros((2, 10))) == 0.0  # too small for a 3 x 3 window
    # One interior pixel raised by 1: |response| 4 there, 2 at its four edge neighbours and 1 at its
    # four corners: sum 16 over (10 - 2)^2 interior pixels.
    spike = np.zeros((10, 10))
    spike[5, 5] = 1.0
    assert noise_sigma(spike) == pytest.approx(math.sqrt(math.pi / 2) * 16 / (6 * 8 * 8))
    rng = np.random.default_rng(0)
    for sigma in (0.05, 0.2):
        noisy = 0.5 + 0.3 * xx + rng.normal(0.0, sigma, xx.shape)
        # The estimator is unbiased for white Gaussian noise; 62^2 pixels give it ~2 % spread.
        assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.06)


def test_images_of_a_stack_are_estimated_apart():
    # The spike of the test above, in the first image of a stack of three: the flat and the plane
    # images beside it stay at 0, so nothing of one image leaks into its neighbours' windows.
    yy, xx = np.mgrid[:10, :10] / 10.0
    spike = np.zeros((10, 10))
    spike[5, 5] = 1.0
    stack = np.stack([spike, np.full((10, 10), 0.7), 0.2 + 0.5 * xx + 0.3 * yy])
    assert noise_sigmas(stack) == pytest.approx([math.sqrt(math.pi / 2) * 16 / (6 * 8 * 8), 0.0, 0.0], abs=1e-12)
    # The same through image_statistics: the spike as the red channel of the first RGB image.
    rgb = np.zeros((2, 10, 10, 3))
    rgb[0, 5, 5] = 1.0  # every channel: the gray image is the spike
    assert image_statistics(rgb)[:, 3] == pytest.approx([math.sqrt(math.pi / 2) * 16 / (6 * 8 * 8), 0.0])
    assert noise_sigmas(np.zeros((4, 2, 10))).tolist() == [0.0] * 4  # too small for a 3 x 3 window


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="RGB images"):
        image_statistics(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="2-D gray image"):
        noise_sigma(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="stack of 2-D gray images"):
        noise_sigmas(np.zeros((8, 8)))


def test_the_unusual_image_features_add_the_mean_of_the_error_map():
    images = np.full((2, 4, 4, 3), 0.5)
    maps = np.stack([np.zeros((1, 4, 4)), np.full((1, 4, 4), 0.25)])
    features, names = unusual_features(images, maps)
    assert names == [*STATISTICS, "mean_pixel_uncertainty"] and features[:, -1].tolist() == [0.0, 0.25]
    features, names = unusual_features(images, None)
    assert names == list(STATISTICS) and features.shape == (2, 4)
