"""The embedded default data set: generated fundus-like photographs with optic disc/cup masks.

Each image shows a coloured fundus disc (orange/red retina on a black background) with vignetting,
uneven illumination and choroidal texture, a macula, a branching vessel tree emanating from the
optic disc, and an optic disc ellipse with a paler cup ellipse inside it. Masks: 0 background,
1 disc rim, 2 cup.

The glaucoma label comes from the vertical cup-to-disc ratio (vCDR = vertical cup height /
vertical disc height) in two steps:

1. ``P(glaucoma | vCDR) = sigmoid((vCDR - vcdr_threshold) / vcdr_softness)``, a soft logistic
   boundary: the label is drawn from it, so images near the threshold go either way.
2. Label noise: with probability ``label_noise`` the drawn label is flipped (symmetric, independent
   of the image), as a grader's mistakes would be. A flipped label contradicts the image, so no
   model can predict it: even a model that knew the true vCDR and the boundary gets at most
   ``1 - label_noise`` of the labels right (less with a soft boundary), and its AUC drops too.

vCDR is drawn from ``Normal(mean, vcdr_spread)`` clipped to [0.15, 0.92]. The mean is not a free
parameter: :func:`vcdr_population_mean` solves (once per parameter set, by root finding on a
numerical integral, not per image) for the mean at which the expected share of glaucoma labels
after the flips is exactly ``positive_fraction``: with ``q = E[sigmoid((vCDR - threshold) /
softness)]`` and flip probability ``e``, ``E[label] = e + (1 - 2e) q``. Reachable shares are
``label_noise < positive_fraction < 1 - label_noise``.

The ceiling this implies (measured on 400k draws): "vCDR AUC" is the AUC of the true vCDR as a
score for the (noisy) label, "Bayes accuracy" the accuracy of predicting the more likely label from
the true vCDR; no image model can do better on average. ``evaluate`` writes the test split's value
of the first, from the ground-truth masks, as ``reference/vcdr_auc``.

==================  =====  ========  ======  ==========  ==============
positive_fraction   noise  softness  spread  vCDR AUC    Bayes accuracy
==================  =====  ========  ======  ==========  ==============
0.5                 0.05   0.04      0.10    0.86        0.78
0.5                 0.02   0.02      0.15    0.96        0.91
0.1                 0.05   0.04      0.10    0.72        0.91
0.1                 0.02   0.02      0.15    0.90        0.95
==================  =====  ========  ======  ==========  ==============

(With few positives, symmetric flips weigh heavily: at a 10 % share and 5 % noise, flipped
negatives make up almost half of the positive labels.)

What keeps the task learnable but not trivial: the cup edge is soft and its contrast against the
rim varies from faint to clear, vessels cross the disc, some images show peripapillary atrophy
(a pale crescent just outside the disc), blur and noise vary, and labels overlap near the
threshold (logistic boundary plus flips).

Every image has its own ``numpy.random.Generator`` seeded from ``(seed, index)``, so any subset or
count of the data set is reproducible on its own and generation can be split across processes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from uml.config import SyntheticParams
from uml.data.records import FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS, Record
from uml.errors import ConfigError
from uml.image_io import resize_image, resize_mask

# Drawn vCDR values are clipped to this range (a cup is never absent nor as large as the disc).
VCDR_RANGE = (0.15, 0.92)


@dataclass(frozen=True)
class SyntheticSample:
    """One generated example plus the ground truth behind its label (for tests and analysis)."""

    image: np.ndarray  # uint8 (S, S, 3) RGB
    mask: np.ndarray  # uint8 (S, S): 0 background, 1 disc rim, 2 cup
    label: int  # 0 non-glaucoma, 1 glaucoma (after label noise)
    vcdr: float  # the drawn vertical cup-to-disc ratio
    glaucoma_prob: float  # P(glaucoma | vCDR) before label noise


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, shared read-only between images of one size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smoothstep(x: np.ndarray, edge0: float, edge1: float) -> np.ndarray:
    """0 below edge0, 1 above edge1, a smooth cubic in between (edge0 > edge1 flips it)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse_radius(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    """Normalised elliptical radius: 1 on the ellipse with semi-axes a (x) and b (y), rotated."""
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return np.sqrt(u * u + v * v)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a coarse random grid upsampled with cubic interpolation."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _vessel_tree(
    rng: np.random.Generator,
    size: int,
    origin: tuple[float, float],
    temporal: float,
    field: tuple[float, float, float],
) -> np.ndarray:
    """A branching vessel map in [0, 1] (float32, (size, size)) grown from the optic disc.

    Four main trunks leave the disc up and down; the two temporal ones arc towards the macula like
    the retinal arcades, the nasal ones bend away more gently. Each trunk is a random walk that
    branches into thinner children, drawn with anti-aliased OpenCV lines.
    """
    scale = size / 256.0
    canvas = np.zeros((size, size), np.uint8)
    step = 0.018 * size
    fx, fy, fr = field
    shift = 4  # sub-pixel line end points (fixed point, 1/16 px)
    k = 1 << shift
    # (start angle, curvature per step); y points down, so "up" is -pi/2.
    tilt_t, tilt_n = math.radians(rng.uniform(15, 35)), math.radians(rng.uniform(10, 30))
    bend_t, bend_n = rng.uniform(0.035, 0.06), rng.uniform(0.01, 0.03)
    up, down = -math.pi / 2, math.pi / 2
    trunks = [
        (up + temporal * tilt_t, temporal * bend_t),
        (down - temporal * tilt_t, -temporal * bend_t),
        (up - temporal * tilt_n, -temporal * bend_n),
        (down + temporal * tilt_n, temporal * bend_n),
    ]
    # A few short, thin vessels in random directions (mostly nasal/temporal off the disc).
    for _ in range(int(rng.integers(1, 4))):
        trunks.append((rng.uniform(-math.pi, math.pi), rng.normal(0, 0.02)))

    min_width = 0.7 * scale
    stack: list[tuple[float, float, float, float, float, int, int]] = []
    for i, (angle, bend) in enumerate(trunks):
        width = (rng.uniform(2.0, 2.8) if i < 4 else rng.uniform(1.0, 1.6)) * scale
        steps = int(rng.integers(30, 45)) if i < 4 else int(rng.integers(8, 20))
        stack.append((origin[0], origin[1], angle + rng.normal(0, 0.1), bend, width, 0 if i < 4 else 1, steps))

    while stack:
        x, y, angle, bend, width, depth, steps = stack.pop()
        # The whole walk at once: heading = running sum of curvature + jitter.
        headings = angle + np.cumsum(bend + rng.normal(0.0, 0.12, steps))
        points = np.empty((steps + 1, 2))
        points[0] = (x, y)
        points[1:] = (x, y) + step * np.cumsum(np.stack([np.cos(headings), np.sin(headings)], axis=1), axis=0)
        outside = np.hypot(points[:, 0] - fx, points[:, 1] - fy) > fr * 0.97
        n = int(np.argmax(outside)) if outside.any() else steps + 1  # stop at the aperture
        if n < 2:
            continue
        points, headings = points[:n], headings[: n - 1]
        widths = np.maximum(min_width, width * 0.985 ** np.arange(n - 1))  # taper to the periphery
        thickness = np.maximum(1, np.rint(widths)).astype(int)
        fixed = np.rint(points * k).astype(np.int32)
        # One polyline per run of equal line thickness instead of one call per segment.
        cuts = np.flatnonzero(np.diff(thickness)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, n - 1], strict=True):
            cv2.polylines(canvas, [fixed[a : b + 1]], False, 255, thickness=int(thickness[a]),
                          lineType=cv2.LINE_AA, shift=shift)
        if depth < 3:
            for j in np.flatnonzero(rng.random(n - 1) < 0.07):
                sign = 1.0 if rng.random() < 0.5 else -1.0
                stack.append(
                    (points[j + 1, 0], points[j + 1, 1], headings[j] + sign * rng.uniform(0.4, 1.0),
                     bend * 0.5 + rng.normal(0, 0.01), max(min_width, widths[j] * 0.7), depth + 1,
                     int(rng.integers(6, 22)))
                )
    vessels = canvas.astype(np.float32) * (1.0 / 255.0)
    return cv2.GaussianBlur(vessels, (0, 0), sigmaX=0.6 * scale + 0.3)


def glaucoma_probability(vcdr: float | np.ndarray, threshold: float, softness: float) -> float | np.ndarray:
    """P(glaucoma | vCDR): a logistic step of width ``softness`` centred at ``threshold``."""
    z = (np.asarray(vcdr, dtype=np.float64) - threshold) / softness
    out = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow for sharp steps
    return float(out) if out.ndim == 0 else out


def _glaucoma_share_before_noise(mean: float, threshold: float, softness: float, spread: float) -> float:
    """``E[P(glaucoma | vCDR)]`` for vCDR ~ ``Normal(mean, spread)`` clipped to :data:`VCDR_RANGE`.

    The clipped tails are point masses at the range ends; the inside is integrated numerically.
    """
    # scipy is imported here, not with the module: prepare's worker processes, which only render
    # (with the population mean computed once by SyntheticSource), start 0.6 s sooner without it.
    from scipy import integrate, stats

    lo, hi = VCDR_RANGE
    inside, _ = integrate.quad(
        lambda v: stats.norm.pdf(v, mean, spread) * glaucoma_probability(v, threshold, softness),
        lo, hi, points=[threshold] if lo < threshold < hi else None, limit=200,
    )
    below, above = stats.norm.cdf(lo, mean, spread), stats.norm.sf(hi, mean, spread)
    return below * glaucoma_probability(lo, threshold, softness) + above * glaucoma_probability(hi, threshold, softness) + inside


@functools.lru_cache(maxsize=32)
def _solve_population_mean(fraction: float, noise: float, threshold: float, softness: float, spread: float) -> float:
    target = (fraction - noise) / (1.0 - 2.0 * noise)  # the share needed before the flips
    lo, hi = VCDR_RANGE

    def excess(mean: float) -> float:
        return _glaucoma_share_before_noise(mean, threshold, softness, spread) - target

    # Far outside the range all draws clip to one end: the share is the boundary's value there.
    left, right = lo - 10.0 * spread, hi + 10.0 * spread
    if not excess(left) < 0.0 < excess(right):
        raise ConfigError(
            f"data.synthetic.positive_fraction: {fraction} is out of reach with vcdr_threshold {threshold}, "
            f"vcdr_softness {softness} and label_noise {noise}: vCDR values in {list(VCDR_RANGE)} give shares "
            f"between {noise + (1 - 2 * noise) * (target + excess(left)):.4f} and "
            f"{noise + (1 - 2 * noise) * (target + excess(right)):.4f}"
        )
    from scipy import optimize

    return float(optimize.brentq(excess, left, right, xtol=1e-10))


def vcdr_population_mean(params: SyntheticParams) -> float:
    """The mean of the drawn vCDR population at which ``E[label] = params.positive_fraction``.

    See the module docstring; computed once per parameter set (cached). Raises
    :class:`~uml.errors.ConfigError` when the share cannot be reached inside :data:`VCDR_RANGE`.
    """
    return _solve_population_mean(params.positive_fraction, params.label_noise, params.vcdr_threshold,
                                  params.vcdr_softness, params.vcdr_spread)


def generate_sample(index: int, params: SyntheticParams, image_size: int, seed: int = 0,
                    vcdr_mean: float | None = None) -> SyntheticSample:
    """Render image ``index`` of the synthetic data set (deterministic in ``(seed, index)``).
    ``vcdr_mean``: :func:`vcdr_population_mean` of ``params`` if the caller has it (computed here
    otherwise)."""
    rng = np.random.default_rng((seed, index))
    size = params.render_size
    scale = size / 256.0
    yy, xx = _grid(size)

    # Label first, so that the label stream does not depend on rendering details.
    mean = vcdr_population_mean(params) if vcdr_mean is None else vcdr_mean
    vcdr = float(np.clip(rng.normal(mean, params.vcdr_spread), *VCDR_RANGE))
    prob = float(glaucoma_probability(vcdr, params.vcdr_threshold, params.vcdr_softness))
    label = int(rng.random() < prob)
    if rng.random() < params.label_noise:
        label = 1 - label

    # Fundus field: the camera's circular aperture, slightly off-centre.
    fx, fy = size / 2 + rng.normal(0, 0.01 * size, 2)
    fr = size * rng.uniform(0.44, 0.49)
    r_field = np.hypot(xx - fx, yy - fy) / fr
    field = _smoothstep(r_field, 1.0, 1.0 - 2.0 / fr)

    # Optic disc: left or right eye, nasal of the centre; the macula lies temporal (towards the centre).
    side = 1.0 if rng.random() < 0.5 else -1.0
    temporal = -side
    dcx = fx + side * size * rng.uniform(0.12, 0.22)
    dcy = fy + rng.normal(0, 0.04 * size)
    disc_b = size * rng.uniform(0.08, 0.12)  # vertical semi-axis (REFUGE discs are a bit smaller)
    disc_a = disc_b * rng.uniform(0.82, 1.0)  # discs are slightly taller than wide
    disc_angle = math.radians(rng.normal(0, 8))
    cup_b = vcdr * disc_b
    cup_a = min(cup_b * rng.uniform(0.85, 1.1), 0.95 * disc_a)
    # Cups sit slightly temporal in the disc; offsets keep them inside the rim.
    cos_d, sin_d = math.cos(disc_angle), math.sin(disc_angle)
    off_u = temporal * rng.uniform(0.0, 0.5) * (disc_a - cup_a)
    off_v = rng.normal(0, 0.15) * (disc_b - cup_b)
    ccx = dcx + off_u * cos_d - off_v * sin_d
    ccy = dcy + off_u * sin_d + off_v * cos_d
    mcx = dcx + temporal * disc_b * rng.uniform(4.5, 5.5)
    mcy = dcy + rng.normal(0, 0.3) * disc_b

    # Retina: base colour x smooth choroidal texture x vignetting x uneven illumination x macula.
    retina = np.array([rng.uniform(0.72, 0.92), rng.uniform(0.28, 0.42), rng.uniform(0.08, 0.18)], np.float32)
    texture = 1.0 + 0.07 * _smooth_noise(rng, size, 6) + 0.035 * _smooth_noise(rng, size, max(4, size // 10))
    vignette = 1.0 - rng.uniform(0.25, 0.5) * r_field**2
    tilt = rng.uniform(0, 2 * math.pi)
    ramp = 1.0 + rng.uniform(0.0, 0.25) * (((xx - fx) * math.cos(tilt) + (yy - fy) * math.sin(tilt)) / fr)
    macula_sigma = disc_b * rng.uniform(1.2, 1.8)
    macula = 1.0 - rng.uniform(0.15, 0.35) * np.exp(-((xx - mcx) ** 2 + (yy - mcy) ** 2) / (2 * macula_sigma**2))
    shade = texture * vignette * ramp * macula
    img = shade[..., None] * retina

    # Disc and cup are blended in a box around the disc only (they are small; this keeps it fast).
    half = int(math.ceil(disc_b * 1.6)) + 2
    y0, y1 = max(0, int(dcy) - half), min(size, int(dcy) + half + 1)
    x0, x1 = max(0, int(dcx) - half), min(size, int(dcx) + half + 1)
    bx, by = xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]
    r_disc = _ellipse_radius(bx, by, dcx, dcy, disc_a, disc_b, disc_angle)
    r_cup = _ellipse_radius(bx, by, ccx, ccy, cup_a, cup_b, disc_angle)
    box = img[y0:y1, x0:x1]
    box_shade = shade[y0:y1, x0:x1, None]

    # Peripapillary atrophy: a pale crescent on the temporal side of some discs (a distractor).
    if rng.random() < 0.35:
        du = ((bx - dcx) * cos_d + (by - dcy) * sin_d) * temporal / disc_a  # >0 on the temporal side
        band = _smoothstep(r_disc, 1.0, 1.05) * _smoothstep(r_disc, 1.35, 1.15) * np.clip(du, 0, 1)
        ppa = np.array([0.9, 0.7, 0.5], np.float32) * box_shade
        box += (ppa - box) * (rng.uniform(0.2, 0.5) * band)[..., None]

    disc_edge = rng.uniform(0.8, 2.0) * scale / disc_b  # edge width in normalised radius units
    disc_alpha = _smoothstep(r_disc, 1.0 + disc_edge, 1.0 - disc_edge)
    rim = np.clip(retina * np.array([1.1, 1.55, 1.9], np.float32) + 0.05, 0, 1) * box_shade
    rim = rim * (1.0 - 0.12 * np.clip(r_disc, 0, 1) ** 2)[..., None]  # rim darkens towards the margin
    box += (rim - box) * disc_alpha[..., None]

    cup_color = np.array([rng.uniform(0.95, 1.0), rng.uniform(0.80, 0.92), rng.uniform(0.55, 0.75)], np.float32)
    cup_edge = rng.uniform(0.12, 0.4)  # soft: a blurry, partly invisible cup margin
    cup_contrast = rng.uniform(0.3, 0.85)
    cup_alpha = _smoothstep(r_cup, 1.0 + cup_edge, 1.0 - cup_edge) * disc_alpha
    pallor = cup_color * box_shade * (1.0 + 0.08 * (1.0 - np.clip(r_cup, 0, 1)))[..., None]
    box += (pallor - box) * (cup_contrast * cup_alpha)[..., None]

    # Vessels darken the retina (blue/green absorb more than red) and cross the disc.
    vessels = _vessel_tree(rng, size, (ccx, ccy), temporal, (fx, fy, fr))
    darken = rng.uniform(0.45, 0.75) * np.array([0.55, 0.8, 0.8], np.float32)
    img *= 1.0 - vessels[..., None] * darken

    # Acquisition: blur, global gain, sensor noise, black outside the aperture, then gamma.
    sigma = rng.uniform(0.0, 1.3) * scale
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)
    img *= rng.uniform(0.8, 1.15) * 255.0
    # Mostly luminance noise: one plane shared by the channels costs a third of per-channel noise.
    noise = rng.standard_normal((size, size), dtype=np.float32) * (rng.uniform(0.004, 0.025) * 255.0)
    img += noise[..., None]
    img *= field[..., None]
    image = np.clip(img + 0.5, 0.0, 255.0).astype(np.uint8)
    gamma = rng.uniform(0.85, 1.2)
    image = cv2.LUT(image, ((np.arange(256) / 255.0) ** gamma * 255.0 + 0.5).astype(np.uint8))

    mask = np.zeros((size, size), np.uint8)
    disc_in = r_disc <= 1.0
    mask_box = mask[y0:y1, x0:x1]
    mask_box[disc_in] = 1
    # Intersect with the disc so the cup never leaks out of it, whatever the ellipse shapes.
    mask_box[disc_in & (r_cup <= 1.0)] = 2

    return SyntheticSample(
        image=resize_image(image, image_size),
        mask=resize_mask(mask, image_size),
        label=label,
        vcdr=vcdr,
        glaucoma_prob=prob,
    )


class SyntheticSource:
    """The synthetic data set as a :class:`~uml.data.records.RecordSource` (lazy, re-iterable)."""

    name = "synthetic"

    def __init__(self, params: SyntheticParams, image_size: int, seed: int = 0, num_images: int | None = None):
        # An unreachable positive_fraction fails here, before any image; the processes that render
        # the images get the value with the source.
        self.vcdr_mean = vcdr_population_mean(params)
        self.params = params
        self.image_size = image_size
        self.seed = seed
        self.num_images = params.num_images if num_images is None else num_images
        self.class_names = list(FUNDUS_CLASS_NAMES)
        self.mask_classes = list(FUNDUS_MASK_CLASSES)
        self.positive_class = FUNDUS_POSITIVE_CLASS

    def __len__(self) -> int:
        return self.num_images

    def record(self, index: int) -> Record:
        """Record ``index`` (deterministic in ``(seed, index)``)."""
        sample = generate_sample(index, self.params, self.image_size, self.seed, vcdr_mean=self.vcdr_mean)
        return Record(
            id=f"synthetic-{index:06d}",
            image=sample.image,
            mask=sample.mask,
            label=sample.label,
            origin=f"synthetic image {index} (seed {self.seed})",
        )

    def __iter__(self) -> Iterator[Record]:
        for index in range(self.num_images):
            yield self.record(index)
