"""Image statistics that tell an unusual or degraded input from the images a model was calibrated on.

A model answers every image it is given, including a grayscale photograph, a blank frame or a
picture buried in sensor noise, often with high confidence. The ``calibrate`` stage therefore
records where a few simple statistics of the calibration images lie, and the deployment flags an
image whose statistics fall far outside that range (:mod:`uml.calibration`, "unusual image").
Each statistic is computed on the image as the model sees it: RGB at model resolution, values
scaled to [0, 1].

==================  ==================================================================
``brightness``      mean of the gray image (the mean of R, G and B)
``contrast``        standard deviation of the gray image
``colourfulness``   mean over pixels of max(R, G, B) - min(R, G, B): 0 for a grayscale image
``noise``           Immerkær's estimate of the standard deviation of additive white noise
==================  ==================================================================

Immerkær (1996, "Fast Noise Variance Estimation", Computer Vision and Image Understanding 64(2))
convolves the gray image with the difference of two Laplacians,
``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]``, which cancels any locally linear image content, and
takes ``sqrt(pi / 2) / (6 (W - 2) (H - 2)) * sum |I * N|`` over the interior pixels: for white
Gaussian noise of standard deviation sigma the expected value is sigma.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

STATISTICS: tuple[str, ...] = ("brightness", "contrast", "colourfulness", "noise")
# The unusual-image rule's extra feature for a model with a segmentation head.
MEAN_PIXEL_UNCERTAINTY = "mean_pixel_uncertainty"

_IMMERKAER_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def noise_sigmas(gray: np.ndarray) -> np.ndarray:
    """Immerkær's noise standard deviation estimate (see the module docstring) of each 2-D image of
    a stack (N, H, W) -> (N,) float64; 0.0 for images smaller than 3 x 3."""
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 3:
        raise ValueError(f"expected a stack of 2-D gray images (N, H, W), got shape {gray.shape}")
    count, height, width = gray.shape
    if height < 3 or width < 3:
        return np.zeros(count)
    # The kernel is symmetric, so correlation and convolution agree; a kernel one image deep keeps
    # the images apart, and only interior pixels count.
    response = ndimage.correlate(gray, _IMMERKAER_KERNEL[None], mode="constant")[:, 1:-1, 1:-1]
    return math.sqrt(math.pi / 2.0) * np.abs(response).sum(axis=(1, 2)) / (6.0 * (width - 2) * (height - 2))


def noise_sigma(gray: np.ndarray) -> float:
    """:func:`noise_sigmas` of one 2-D image."""
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D gray image, got shape {gray.shape}")
    return float(noise_sigmas(gray[None])[0])


def image_statistics(images: np.ndarray) -> np.ndarray:
    """The :data:`STATISTICS` of each image: float images (N, H, W, 3) in [0, 1] -> (N, 4) float64."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
    # Contiguous colour planes: reductions over the 3-long last axis, or elementwise work on strided
    # views of it, took three times as long (the same values: (R + G) + B is how numpy sums the axis).
    red, green, blue = np.moveaxis(images, -1, 0).copy()
    gray = (red + green + blue) / 3.0
    brightness = gray.mean(axis=(1, 2))
    contrast = gray.std(axis=(1, 2))
    colourfulness = (np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)).mean(axis=(1, 2))
    return np.stack([brightness, contrast, colourfulness, noise_sigmas(gray)], axis=1)


def unusual_features(images: np.ndarray, seg_uncertainty: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """The features of the unusual-image rule, the one definition the calibrate stage fits on and
    the deployment applies: :func:`image_statistics` of float images (N, H, W, 3) in [0, 1] at model
    resolution and, with ``seg_uncertainty`` (N, 1, H, W: the delivered mask's error map), the mean of
    each image's map. Returns (N, F) features and their names."""
    features, names = image_statistics(images), list(STATISTICS)
    if seg_uncertainty is not None:
        mean = np.asarray(seg_uncertainty).reshape(len(features), -1).mean(axis=1, dtype=np.float64)
        features = np.concatenate([features, mean[:, None]], axis=1)
        names.append(MEAN_PIXEL_UNCERTAINTY)
    return features, names
