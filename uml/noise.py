"""Input corruptions of the robustness evaluation, on float images in [0, 1].

Both functions take images with the channel axis last (``(H, W, C)`` or ``(N, H, W, C)``, the
layout of the prepared store), return a new float32 array in [0, 1] and draw every random number
from the ``numpy.random.Generator`` they are given, so a seeded generator reproduces the noise.
"""

from __future__ import annotations

import numpy as np


def _check_unit_range(images01: np.ndarray) -> np.ndarray:
    images = np.asarray(images01, dtype=np.float32)
    if images.ndim < 3:
        raise ValueError(f"expected channels-last images (H, W, C) or (N, H, W, C), got shape {images.shape}")
    return images


def gaussian_noise(images01: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add independent ``N(0, sigma)`` noise to every value (each channel separately), then clip to [0, 1]."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    images = _check_unit_range(images01)
    noisy = images + rng.normal(0.0, sigma, size=images.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0)


def salt_and_pepper(images01: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Replace a fraction ``amount`` of pixel locations by salt (1.0) or pepper (0.0).

    ``round(amount * P)`` of the ``P`` pixel locations (all channels of a pixel together, over the
    whole array) are drawn without replacement; half of them (rounded down) become salt and the
    rest pepper, at disjoint locations. (The published code wrote pepper over the salt locations,
    which left almost no salt.)
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    images = _check_unit_range(images01)
    noisy = images.copy()
    pixels = noisy.reshape(-1, noisy.shape[-1])  # a view: one row per pixel location
    count = int(round(amount * pixels.shape[0]))
    chosen = rng.choice(pixels.shape[0], size=count, replace=False)
    # choice() returns the locations in random order, so splitting it is a random split.
    num_salt = count // 2
    pixels[chosen[:num_salt]] = 1.0
    pixels[chosen[num_salt:]] = 0.0
    return noisy
