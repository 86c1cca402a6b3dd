"""The synthetic fundus generator: determinism, geometry, labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uml.config import SyntheticParams, parse_params
from uml.data.synthetic import SyntheticSource, generate_sample, glaucoma_probability
from uml.errors import ConfigError

SMALL = SyntheticParams(render_size=64)


@pytest.fixture(scope="module")
def population() -> list:
    """300 small images (labels do not depend on the render size)."""
    params = SyntheticParams(render_size=48)
    return [generate_sample(i, params, 32, seed=0) for i in range(300)]


def test_deterministic_per_index_and_seed() -> None:
    a, b = generate_sample(7, SMALL, 48, seed=3), generate_sample(7, SMALL, 48, seed=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert (a.label, a.vcdr) == (b.label, b.vcdr)
    other = generate_sample(7, SMALL, 48, seed=4)
    assert not np.array_equal(a.image, other.image)
    # Any subset is reproducible on its own: image 5 of a 6-image set equals image 5 of a 40-image set.
    short, long = SyntheticSource(SMALL, 48, seed=3, num_images=6), SyntheticSource(SMALL, 48, seed=3, num_images=40)
    assert len(short) == 6 and len(long) == 40
    assert np.array_equal(list(short)[5].image, long.record(5).image)
    assert [r.id for r in short] == [f"synthetic-{i:06d}" for i in range(6)]


def test_shapes_dtypes_and_mask_classes() -> None:
    sample = generate_sample(0, SMALL, 40, seed=0)
    assert sample.image.shape == (40, 40, 3) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (40, 40) and sample.mask.dtype == np.uint8
    assert set(np.unique(sample.mask)) == {0, 1, 2}
    # Upsampling (render smaller than the output) works too.
    assert generate_sample(0, SyntheticParams(render_size=32), 48).image.shape == (48, 48, 3)
    src = SyntheticSource(SMALL, 40, num_images=3)
    assert src.class_names == ["non-glaucoma", "glaucoma"] and src.mask_classes == ["background", "disc", "cup"]


def test_fundus_appearance() -> None:
    """Black outside the aperture; the disc is brighter than the retina and the cup paler than the rim."""
    brighter_cup = 0
    for i in range(12):
        s = generate_sample(i, SyntheticParams(render_size=128), 128, seed=1)
        grey = s.image.astype(float).mean(axis=2)
        assert grey[:4, :4].max() < 10 and grey[-4:, -4:].max() < 10  # corners: outside the fundus
        inside = np.hypot(*np.meshgrid(np.arange(128) - 64, np.arange(128) - 64)) < 40
        retina = grey[inside & (s.mask == 0)].mean()
        rim, cup = grey[s.mask == 1].mean(), grey[s.mask == 2].mean()
        assert rim > retina
        brighter_cup += cup > rim
    assert brighter_cup >= 9  # low contrast, vessels on top: most but not necessarily all


def test_cup_inside_disc_and_vcdr_matches_mask() -> None:
    errors = []
    for i in range(20):
        # vcdr_spread 0.10 keeps these 20 draws below the vCDR where a 128 px rendering's rim gets
        # thinner than a pixel (see below); the default run renders at 256 px.
        s = generate_sample(i, SyntheticParams(render_size=128, vcdr_spread=0.10), 128, seed=2)
        disc_rows = np.flatnonzero((s.mask > 0).any(axis=1))
        cup_rows = np.flatnonzero((s.mask == 2).any(axis=1))
        cup_cols = np.flatnonzero((s.mask == 2).any(axis=0))
        disc_cols = np.flatnonzero((s.mask > 0).any(axis=0))
        assert disc_rows[0] <= cup_rows[0] and cup_rows[-1] <= disc_rows[-1]
        assert disc_cols[0] <= cup_cols[0] and cup_cols[-1] <= disc_cols[-1]
        # Every cup pixel has only disc (rim or cup) pixels as 4-neighbours: the cup never touches
        # background. Above a vCDR of 0.85 the rim of a 25-30 px disc can be thinner than a pixel.
        cup = s.mask == 2
        padded = np.pad(s.mask, 1)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            assert s.vcdr > 0.85 or (padded[dy : dy + 128, dx : dx + 128][cup] > 0).all()
        errors.append(abs(len(cup_rows) / len(disc_rows) - s.vcdr))
    # The label's vCDR is the vCDR of the mask (up to pixelisation and the small disc tilt).
    assert np.mean(errors) < 0.05, errors


def test_vcdr_overlaps_between_classes(population: list) -> None:
    labels = np.array([s.label for s in population])
    vcdr = np.array([s.vcdr for s in population])
    pos, neg = vcdr[labels == 1], vcdr[labels == 0]
    assert pos.mean() > neg.mean() + 0.1  # learnable
    assert pos.min() < neg.max()  # but not separable by a threshold
    assert ((vcdr > 0.6) != (labels == 1)).mean() > 0.03


@pytest.mark.parametrize(
    "overrides",
    [
        {"positive_fraction": 0.5},  # the default: balanced, 5 % flips
        # REFUGE-like share, with a wide population (a tenth of it clipped at the low end) and
        # a sharper boundary: the offset must account for the clipped mass and the flips.
        {"positive_fraction": 0.1, "label_noise": 0.02, "vcdr_spread": 0.15, "vcdr_softness": 0.02},
    ],
)
def test_positive_share_matches_positive_fraction(overrides: dict) -> None:
    params = SyntheticParams(render_size=32, **overrides)
    n = 1000
    labels = np.array([generate_sample(i, params, 32, seed=5).label for i in range(n)])
    fraction = params.positive_fraction
    # A binomial share: 4 standard errors wide (the old fixed offset, ~15 % positives, fails both).
    assert abs(labels.mean() - fraction) < 4.0 * math.sqrt(fraction * (1 - fraction) / n), labels.mean()


def test_unreachable_positive_fraction_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.synthetic.*positive_fraction \(0\.03\).*label_noise"):
        parse_params({"data": {"synthetic": {"positive_fraction": 0.03, "label_noise": 0.05}}})
    # A threshold above the largest drawn vCDR caps the share below 0.5.
    with pytest.raises(ConfigError, match=r"data\.synthetic\.positive_fraction: 0\.5 is out of reach"):
        SyntheticSource(SyntheticParams(vcdr_threshold=0.97), 32)


def test_label_follows_threshold_without_noise() -> None:
    sharp = SyntheticParams(render_size=32, label_noise=0.0, vcdr_softness=1e-4)
    samples = [generate_sample(i, sharp, 32) for i in range(150)]
    assert all(s.label == int(s.vcdr > sharp.vcdr_threshold) for s in samples)
    noisy = SyntheticParams(render_size=32, label_noise=0.3, vcdr_softness=1e-4)
    flipped = np.mean([generate_sample(i, noisy, 32).label != s.label for i, s in enumerate(samples)])
    assert 0.2 < flipped < 0.4


def test_glaucoma_probability() -> None:
    assert glaucoma_probability(0.6, 0.6, 0.04) == pytest.approx(0.5)
    assert glaucoma_probability(0.72, 0.6, 0.04) == pytest.approx(1 / (1 + np.exp(-3)))
    assert glaucoma_probability(0.3, 0.6, 0.04) < 1e-3


def test_a_source_renders_in_a_fresh_process_without_importing_scipy(tmp_path) -> None:
    """prepare's worker processes get the source pickled, with its population mean: rendering
    there imports no scipy (0.6 s of each pool's start), and gives the images the parent renders."""
    import pickle
    import subprocess
    import sys

    source = SyntheticSource(SyntheticParams(num_images=4, render_size=64), image_size=32, seed=3)
    (tmp_path / "source.pkl").write_bytes(pickle.dumps(source))
    script = (
        "import pickle, sys\n"
        "import uml.data.prepare\n"  # what the fork server imports
        f"source = pickle.loads(open({str(tmp_path / 'source.pkl')!r}, 'rb').read())\n"
        "record = source.record(2)\n"
        "assert 'scipy' not in sys.modules, sorted(m for m in sys.modules if m.startswith('scipy'))[:5]\n"
        f"open({str(tmp_path / 'image.npy')!r}, 'wb').write(record.image.tobytes())\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    # The same image as generate_sample computes with the mean solved afresh here.
    expected = generate_sample(2, source.params, 32, seed=3).image
    assert (tmp_path / "image.npy").read_bytes() == expected.tobytes()
