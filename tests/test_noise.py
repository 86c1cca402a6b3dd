"""uml.noise: the corruptions hit their stated rates and values, deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from uml.noise import gaussian_noise, salt_and_pepper


def gray(shape=(4, 64, 64, 3), value=0.5) -> np.ndarray:
    return np.full(shape, value, dtype=np.float32)


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_gaussian_residual_has_the_stated_std(sigma):
    images = gray()
    noisy = gaussian_noise(images, sigma, np.random.default_rng(0))
    residual = noisy - images
    # Mid-gray and sigma <= 0.1: clipping at 0 / 1 (5 sigma away) practically never happens.
    assert residual.std() == pytest.approx(sigma, rel=0.03)
    assert abs(residual.mean()) < 0.05 * sigma
    # Channels get independent noise.
    assert not np.allclose(residual[..., 0], residual[..., 1])
    assert noisy.dtype == np.float32 and noisy.shape == images.shape
    np.testing.assert_array_equal(images, gray())  # the input is left alone


def test_gaussian_clips_to_unit_range_and_is_deterministic():
    images = gray(value=0.9)
    noisy = gaussian_noise(images, 0.5, np.random.default_rng(1))
    assert noisy.min() == 0.0 and noisy.max() == 1.0
    again = gaussian_noise(images, 0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(noisy, again)
    assert not np.array_equal(noisy, gaussian_noise(images, 0.5, np.random.default_rng(2)))


@pytest.mark.parametrize("amount", [0.02, 0.05, 0.1, 0.5])
def test_salt_and_pepper_hits_its_rates_and_values(amount):
    images = gray(shape=(3, 50, 40, 3))
    noisy = salt_and_pepper(images, amount, np.random.default_rng(0))
    pixels = noisy.reshape(-1, 3)
    locations = pixels.shape[0]
    changed = np.any(pixels != 0.5, axis=1)
    salt = np.all(pixels == 1.0, axis=1)
    pepper = np.all(pixels == 0.0, axis=1)
    expected = round(amount * locations)
    # Exactly the stated fraction of pixel locations, all channels together, half salt half pepper.
    assert changed.sum() == expected
    assert salt.sum() == expected // 2
    assert pepper.sum() == expected - expected // 2
    assert np.array_equal(changed, salt | pepper)  # every changed pixel is exactly 0 or exactly 1
    np.testing.assert_array_equal(pixels[~changed], 0.5)
    np.testing.assert_array_equal(images, gray(shape=(3, 50, 40, 3)))


def test_salt_and_pepper_is_deterministic_and_spread_out():
    images = gray(shape=(128, 128, 3))
    a = salt_and_pepper(images, 0.1, np.random.default_rng(5))
    np.testing.assert_array_equal(a, salt_and_pepper(images, 0.1, np.random.default_rng(5)))
    assert not np.array_equal(a, salt_and_pepper(images, 0.1, np.random.default_rng(6)))
    # Locations are spread over the image, not clustered in one corner.
    changed = np.any(a != 0.5, axis=-1)
    assert 0.07 < changed[:64].mean() < 0.13 and 0.07 < changed[:, 64:].mean() < 0.13


def test_zero_noise_is_identity_and_bad_arguments_fail():
    images = gray(shape=(8, 8, 3))
    np.testing.assert_array_equal(salt_and_pepper(images, 0.0, np.random.default_rng(0)), images)
    np.testing.assert_array_equal(gaussian_noise(images, 0.0, np.random.default_rng(0)), images)
    with pytest.raises(ValueError):
        salt_and_pepper(images, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError):
        gaussian_noise(images, -0.1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        gaussian_noise(np.zeros((8, 8)), 0.1, np.random.default_rng(0))
