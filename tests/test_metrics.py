"""uml.metrics against scikit-learn, brute force and hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import brier_score_loss, cohen_kappa_score, f1_score, log_loss, recall_score, roc_auc_score

from uml import metrics


@pytest.fixture
def binary_case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    # Informative but imperfect scores.
    p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, 200), 0.01, 0.99)
    return labels, np.stack([1 - p1, p1], axis=1)


# ------------------------------------------------------------------------ classification
def test_classification_metrics_agree_with_sklearn(binary_case):
    labels, prob = binary_case
    pred = prob.argmax(1)
    got = metrics.classification_metrics(labels, prob, positive=1, bins=10)
    assert list(got) == ["acc", "auc", "kappa", "sensitivity", "specificity", "f1", "ece", "nll", "brier",
                         "ece_debiased", "ece_equal_mass"]
    assert got["acc"] == pytest.approx(np.mean(pred == labels))
    assert got["auc"] == pytest.approx(roc_auc_score(labels, prob[:, 1]))
    assert got["kappa"] == pytest.approx(cohen_kappa_score(labels, pred))
    assert got["sensitivity"] == pytest.approx(recall_score(labels, pred, pos_label=1))
    assert got["specificity"] == pytest.approx(recall_score(labels, pred, pos_label=0))
    assert got["f1"] == pytest.approx(f1_score(labels, pred))
    assert 0.0 < got["ece"] < 1.0
    assert got["nll"] == pytest.approx(log_loss(labels, prob))
    assert got["brier"] == pytest.approx(brier_score_loss(labels, prob[:, 1], scale_by_half=False))
    assert 0.0 <= got["ece_debiased"] < 1.0 and 0.0 < got["ece_equal_mass"] < 1.0
    # Sanity of the case itself: informative, not perfect.
    assert 0.6 < got["auc"] < 0.99


def test_positive_class_index_is_honoured(binary_case):
    labels, prob = binary_case
    pred = prob.argmax(1)
    # Class 0 as "positive": sensitivity and specificity swap, AUC is computed on prob[:, 0].
    assert metrics.sensitivity(labels, pred, positive=0) == pytest.approx(metrics.specificity(labels, pred, positive=1))
    assert metrics.auc(labels, prob, positive=0) == pytest.approx(roc_auc_score(labels == 0, prob[:, 0]))
    assert metrics.f1(labels, pred, positive=0) == pytest.approx(f1_score(labels, pred, pos_label=0))


def test_hand_made_confusion():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    assert metrics.acc(labels, pred) == pytest.approx(0.7)
    assert metrics.sensitivity(labels, pred, positive=1) == pytest.approx(3 / 4)
    assert metrics.specificity(labels, pred, positive=1) == pytest.approx(4 / 6)
    assert metrics.f1(labels, pred, positive=1) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))


def test_multiclass_auc_and_f1_follow_sklearn():
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1, 2], 30)
    logits = rng.normal(size=(90, 3)) + 2.0 * np.eye(3)[labels]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metrics.auc(labels, prob, positive=0) == pytest.approx(roc_auc_score(labels, prob, multi_class="ovr"))
    pred = prob.argmax(1)
    assert metrics.f1(labels, pred, positive=0, num_classes=3) == pytest.approx(f1_score(labels, pred, average="macro"))


def test_undefined_classification_metrics_are_nan():
    labels = np.zeros(5, dtype=int)
    prob = np.tile([0.7, 0.3], (5, 1))
    assert math.isnan(metrics.auc(labels, prob, positive=1))
    assert math.isnan(metrics.sensitivity(labels, prob.argmax(1), positive=1))  # no positives
    assert metrics.specificity(labels, prob.argmax(1), positive=1) == 1.0
    assert math.isnan(metrics.kappa(labels, prob.argmax(1)))


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    # In each confidence level c, exactly a fraction c of the predictions is right.
    labels, prob = [], []
    for conf, n in ((0.65, 20), (0.75, 40), (0.85, 20), (0.95, 100)):
        right = int(round(conf * n))
        for i in range(n):
            prob.append([1 - conf, conf])  # predicts class 1
            labels.append(1 if i < right else 0)
    assert metrics.ece(np.array(labels), np.array(prob), bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_confident_mistakes_is_the_confidence():
    labels = np.zeros(10, dtype=int)
    prob = np.tile([0.1, 0.9], (10, 1))
    assert metrics.ece(labels, prob, bins=10) == pytest.approx(0.9)


def test_reliability_bins_are_equal_width_and_right_closed():
    labels = np.array([1, 1, 0, 1])
    prob = np.array([[0.3, 0.7], [0.3, 0.7], [0.35, 0.65], [0.05, 0.95]])
    stats = metrics.reliability_diagram(labels, prob, bins=10)
    np.testing.assert_allclose(stats["lower"], np.arange(10) / 10)
    # 0.7 belongs to (0.6, 0.7], so bin 6 holds 0.65 and both 0.7s.
    assert stats["count"].tolist() == [0, 0, 0, 0, 0, 0, 3, 0, 0, 1]
    assert stats["confidence"][6] == pytest.approx((0.7 + 0.7 + 0.65) / 3)
    assert stats["accuracy"][6] == pytest.approx(2 / 3)
    assert stats["accuracy"][9] == 1.0
    assert np.isnan(stats["accuracy"][0])
    expected_ece = (3 * abs(2 / 3 - 2.05 / 3) + 1 * abs(1 - 0.95)) / 4
    assert metrics.ece(labels, prob, bins=10) == pytest.approx(expected_ece)


def test_nll_and_brier_by_hand():
    labels = np.array([0, 1, 1])
    prob = np.array([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]])
    # True-class probabilities 0.8, 0.6, 0.1.
    assert metrics.nll(labels, prob) == pytest.approx(-(math.log(0.8) + math.log(0.6) + math.log(0.1)) / 3)
    # Per image sum_k (p_k - y_k)^2: 0.04 + 0.04, 0.16 + 0.16, 0.81 + 0.81.
    assert metrics.brier(labels, prob) == pytest.approx((0.08 + 0.32 + 1.62) / 3)
    # K = 2: twice the binary Brier score mean (p_1 - y)^2 = (0.04 + 0.16 + 0.81) / 3.
    assert metrics.brier(labels, prob) == pytest.approx(2 * (0.04 + 0.16 + 0.81) / 3)
    # A probability of exactly 0 on the true class costs -ln(floor), not inf.
    assert metrics.nll(np.array([0, 1]), np.array([[0.0, 1.0], [0.5, 0.5]])) == pytest.approx(
        (-math.log(metrics.NLL_PROB_FLOOR) + math.log(2)) / 2)
    assert math.isnan(metrics.nll(np.zeros(0, int), np.zeros((0, 2))))
    assert math.isnan(metrics.brier(np.zeros(0, int), np.zeros((0, 2))))


def test_multiclass_nll_and_brier_follow_sklearn():
    rng = np.random.default_rng(21)
    labels = rng.integers(0, 3, 120)
    prob = rng.dirichlet(np.ones(3), 120)
    assert metrics.nll(labels, prob) == pytest.approx(log_loss(labels, prob, labels=[0, 1, 2]))
    assert metrics.brier(labels, prob) == pytest.approx(brier_score_loss(labels, prob, labels=[0, 1, 2]))


def _top_label_case() -> tuple[np.ndarray, np.ndarray]:
    # Five images predicting class 1 with confidences 0.9, 0.6, 0.8, 0.9, 0.7; only the 0.6 is right.
    conf = np.array([0.9, 0.6, 0.8, 0.9, 0.7])
    labels = np.array([0, 1, 0, 0, 0])
    return labels, np.stack([1 - conf, conf], axis=1)


def test_equal_mass_and_debiased_ece_by_hand():
    labels, prob = _top_label_case()
    # Sorted by confidence: 0.6 (right), 0.7, 0.8, 0.9, 0.9 (wrong). bins=2 splits 3 | 2.
    # Bin 1: accuracy 1/3, confidence 0.7; bin 2: accuracy 0, confidence 0.9.
    assert metrics.ece_equal_mass(labels, prob, bins=2) == pytest.approx(3 / 5 * (0.7 - 1 / 3) + 2 / 5 * 0.9)
    # Debiased: bin 1 (11/30)^2 - (1/3)(2/3)/2 = 121/900 - 100/900; bin 2 0.81 - 0.
    assert metrics.ece_debiased(labels, prob, bins=2) == pytest.approx(math.sqrt(3 / 5 * 21 / 900 + 2 / 5 * 0.81))
    # bins=5: one image per bin, no correction: the root mean squared gap 0.4, 0.7, 0.8, 0.9, 0.9
    # (ECE: the mean absolute gap).
    assert metrics.ece_debiased(labels, prob, bins=5) == pytest.approx(math.sqrt((0.16 + 0.49 + 0.64 + 0.81 + 0.81) / 5))
    assert metrics.ece_equal_mass(labels, prob, bins=5) == pytest.approx((0.4 + 0.7 + 0.8 + 0.9 + 0.9) / 5)
    # More bins than images: the empty bins contribute nothing.
    assert metrics.ece_equal_mass(labels, prob, bins=8) == pytest.approx(3.7 / 5)
    assert math.isnan(metrics.ece_equal_mass(np.zeros(0, int), np.zeros((0, 2))))
    assert math.isnan(metrics.ece_debiased(np.zeros(0, int), np.zeros((0, 2))))


def test_equal_mass_bins_split_ties_by_position_and_debiased_can_be_zero():
    # Four predictions at 0.8, the first two right: the stable order puts them in one bin.
    labels = np.array([1, 1, 0, 0])
    prob = np.tile([0.2, 0.8], (4, 1))
    assert metrics.ece_equal_mass(labels, prob, bins=2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.8)
    assert metrics.ece(labels, prob, bins=2) == pytest.approx(0.3)  # one equal-width bin: |0.5 - 0.8|
    # Six images, bins of two: accuracies 1/2, 1, 1/2 at confidences 0.575, 0.75, 0.925. The squared
    # gaps 0.075^2, 0.25^2, 0.425^2 are smaller than the corrections 0.25, 0, 0.25 in sum: clipped to 0.
    conf = np.array([0.9, 0.6, 0.8, 0.7, 0.95, 0.55])
    labels = np.array([0, 1, 1, 1, 1, 0])
    prob = np.stack([1 - conf, conf], axis=1)
    assert metrics.ece_equal_mass(labels, prob, bins=3) == pytest.approx((0.075 + 0.25 + 0.425) / 3)
    assert metrics.ece_debiased(labels, prob, bins=3) == 0.0


def test_debiased_ece_is_unbiased_for_a_constant_gap():
    # Confidences uniform in [0.6, 0.95], correct with probability confidence - 0.1: the true binned
    # L2 calibration error is 0.1 in every bin. The plug-in estimate adds each bin's sampling variance
    # (about 0.22 / 20 here); the debiased one's square averages to 0.1^2 over many data sets.
    rng = np.random.default_rng(22)
    debiased, plug_in = [], []
    for _ in range(1000):
        conf = rng.uniform(0.6, 0.95, 200)
        labels = (rng.random(200) < conf - 0.1).astype(int)
        prob = np.stack([1 - conf, conf], axis=1)
        debiased.append(metrics.ece_debiased(labels, prob, bins=10) ** 2)
        order = np.argsort(conf, kind="stable")
        plug_in.append(np.mean([(labels[b].mean() - conf[b].mean()) ** 2 for b in np.array_split(order, 10)]))
    assert np.mean(debiased) == pytest.approx(0.01, abs=0.0015)
    assert np.mean(plug_in) > 0.018


def _debiased_l2_by_hand(correct: tuple[int, ...], conf: np.ndarray, bins: int) -> float:
    """The debiased L2 calibration error written out plainly, for the enumeration below."""
    order = sorted(range(len(conf)), key=lambda i: conf[i])
    size = len(conf) // bins
    total = 0.0
    for b in range(bins):
        members = order[b * size:(b + 1) * size]
        acc = sum(correct[i] for i in members) / size
        gap = acc - sum(conf[i] for i in members) / size
        total += size / len(conf) * (gap * gap - acc * (1 - acc) / (size - 1))
    return math.sqrt(max(total, 0.0))


def test_ece_null_and_p_value_match_the_exact_distribution_by_enumeration():
    # Six images, two bins of three. Under the null each image is right with probability equal to
    # its confidence: the 64 right/wrong patterns and their probabilities give the exact law of the
    # debiased ECE, which the Monte Carlo draws must reproduce.
    import itertools

    conf = np.array([0.55, 0.6, 0.7, 0.8, 0.9, 0.95])
    prob = np.stack([1 - conf, conf], axis=1)
    exact = []
    for pattern in itertools.product((0, 1), repeat=6):
        weight = math.prod(c if k else 1 - c for k, c in zip(pattern, conf))
        exact.append((_debiased_l2_by_hand(pattern, conf, 2), weight))
    values, weights = np.array(exact).T
    assert weights.sum() == pytest.approx(1.0)
    draws = 40_000
    null = metrics.ece_debiased_null(prob, bins=2, resamples=draws, seed=5)
    assert null.shape == (draws,)
    assert null.mean() == pytest.approx(float(values @ weights), abs=4 * null.std() / math.sqrt(draws))
    # The observed labels: the three least confident wrong, the rest right (predicted class 1).
    labels = np.array([0, 0, 0, 1, 1, 1])
    observed = _debiased_l2_by_hand((0, 0, 0, 1, 1, 1), conf, 2)
    assert metrics.ece_debiased(labels, prob, bins=2) == pytest.approx(observed)
    p_exact = float(weights[values >= observed - 1e-12].sum())
    p_value = metrics.ece_consistency_p_value(labels, prob, bins=2, resamples=draws, seed=5)
    assert p_value == pytest.approx(p_exact, abs=4 * math.sqrt(p_exact * (1 - p_exact) / draws) + 1 / draws)


def test_ece_p_value_is_uniform_for_calibrated_models_and_small_for_miscalibrated_ones():
    rng = np.random.default_rng(8)
    calibrated, overconfident = [], []
    for _ in range(300):
        conf = rng.uniform(0.5, 1.0, 350)
        prob = np.stack([1 - conf, conf], axis=1)
        right = rng.random(350) < conf
        calibrated.append(metrics.ece_consistency_p_value(np.where(right, 1, 0), prob, resamples=400, seed=1))
        right = rng.random(350) < conf - 0.1
        overconfident.append(metrics.ece_consistency_p_value(np.where(right, 1, 0), prob, resamples=400, seed=1))
    # A valid p-value: about 10 % of calibrated models fall below 0.1 (binomial sd 1.7 %).
    assert 0.05 < np.mean(np.array(calibrated) <= 0.1) < 0.16
    # A confidence 0.1 above the accuracy is found at the 5 % level in 83 % of these data sets
    # (the test's power at n = 350; binomial sd 2 %).
    assert np.mean(np.array(overconfident) <= 0.05) > 0.75
    assert math.isnan(metrics.ece_consistency_p_value(np.zeros(0, int), np.zeros((0, 2))))


# --------------------------------------------------------------------------- segmentation
def square(size: int = 64, top: int = 20, left: int = 20, side: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_dice_identical_disjoint_and_partial():
    a = square()
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, square(left=40)) == 0.0
    # Shifted by half its side: half the pixels overlap.
    assert metrics.dice(a, square(left=28)) == pytest.approx(0.5)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_hd95_of_a_shifted_square_is_the_shift(k):
    a = square()
    assert metrics.hd95(a, square(left=20 + k)) == pytest.approx(k)
    assert metrics.hd95(a, square(top=20 + k)) == pytest.approx(k)
    assert metrics.hd95(a, a) == 0.0
    assert metrics.assd(a, a) == 0.0


def _brute_force_surface(mask: np.ndarray) -> np.ndarray:
    # A foreground pixel is on the surface when a 4-neighbour (or the image border) is background.
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(mask & ~interior)


def test_surface_distances_match_brute_force():
    yy, xx = np.mgrid[:48, :48]
    a = (yy - 20) ** 2 / 120 + (xx - 24) ** 2 / 60 <= 1
    b = ((yy - 26) ** 2 + (xx - 21) ** 2 <= 81) | ((yy > 40) & (xx < 8))  # two components, one on the border
    d = cdist(_brute_force_surface(a), _brute_force_surface(b))
    a_to_b, b_to_a = d.min(axis=1), d.min(axis=0)
    assert metrics.assd(a, b) == pytest.approx((a_to_b.mean() + b_to_a.mean()) / 2)
    assert metrics.hd95(a, b) == pytest.approx(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))
    # Spacing scales distances.
    assert metrics.hd95(square(), square(left=23), spacing=(0.5, 0.5)) == pytest.approx(1.5)


def test_empty_mask_conventions():
    empty, a = np.zeros((32, 32), bool), square(32, 8, 8, 8)
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.assd(empty, empty) == 0.0 and metrics.hd95(empty, empty) == 0.0
    assert metrics.dice(a, empty) == 0.0 and metrics.dice(empty, a) == 0.0
    assert math.isnan(metrics.assd(a, empty)) and math.isnan(metrics.hd95(empty, a))


def test_fundus_structures_follow_refuge():
    mask = np.array([[0, 1, 2, 2]])
    s = metrics.structures(["background", "disc", "cup"])
    assert s["disc"](mask).tolist() == [[False, True, True, True]]  # rim ∪ cup
    assert s["cup"](mask).tolist() == [[False, False, True, True]]
    other = metrics.structures(["background", "tumour", "oedema"])
    assert list(other) == ["tumour", "oedema"]
    assert other["tumour"](mask).tolist() == [[False, True, False, False]]


# ------------------------------------------------------------------------------ clinical
def ellipse(shape: tuple[int, int], ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    return (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1


@pytest.mark.parametrize(("disc_ry", "cup_ry"), [(40, 16), (40, 28), (30, 6)])
def test_vcdr_of_an_ellipse_pair_is_the_ratio_of_vertical_radii(disc_ry, cup_ry):
    mask = np.zeros((101, 101), np.uint8)
    mask[ellipse(mask.shape, disc_ry, 35)] = 1
    mask[ellipse(mask.shape, cup_ry, 30)] = 2  # the cup is wider than tall: only rows count
    # Rasterised extents are 2r + 1 rows, hence the 1 / disc_ry tolerance.
    assert metrics.vertical_cdr(mask) == pytest.approx(cup_ry / disc_ry, abs=1 / disc_ry)


def test_vcdr_edge_cases_and_aggregates():
    disc_only = np.zeros((20, 20), np.uint8)
    disc_only[5:15, 5:15] = 1
    assert metrics.vertical_cdr(disc_only) == 0.0
    assert math.isnan(metrics.vertical_cdr(np.zeros((20, 20), np.uint8)))
    assert metrics.vcdr_mae(np.array([0.5, np.nan, 0.2]), np.array([0.4, 0.3, 0.5])) == pytest.approx(0.2)
    labels = np.array([0, 0, 1, 1, 1])
    vcdr = np.array([0.3, 0.4, 0.7, np.nan, 0.35])  # the nan case is left out
    assert metrics.vcdr_auc(labels, vcdr, positive=1) == pytest.approx(roc_auc_score([0, 0, 1, 1], [0.3, 0.4, 0.7, 0.35]))
    # A model that finds no disc in any image (an untrained one, say) has no vCDR anywhere: the AUC
    # is undefined, not a crash of the evaluate stage (it raised scikit-learn's ValueError).
    assert math.isnan(metrics.vcdr_auc(labels, np.full(5, np.nan), positive=1))
    assert math.isnan(metrics.auc(np.array([], dtype=int), np.zeros((0, 2)), positive=1))


def test_vcdr_is_measured_on_the_largest_disc_component():
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 1  # the disc: rows 10-29, 20 rows
    mask[15:25, 15:25] = 2  # its cup: rows 15-24, 10 rows
    mask[0:2, 0:2] = 1  # a spurious rim blob in the top-left corner
    mask[38:40, 36:40] = 2  # a spurious cup blob in the bottom-right corner
    assert metrics.vertical_cdr(mask) == pytest.approx(10 / 20)
    # Counting every pixel, as before, the blobs stretch the disc to rows 0-39 and the cup to 15-39.
    rows = lambda binary: np.flatnonzero(binary.any(axis=1))  # noqa: E731
    assert np.ptp(rows(mask == 2)) + 1 == 25 and np.ptp(rows(mask >= 1)) + 1 == 40 and 25 / 40 > 10 / 20
    # 8-connected: a pixel touching the disc's corner diagonally is part of it (rows 10-30: 21).
    mask[30, 30] = 1
    assert metrics.vertical_cdr(mask) == pytest.approx(10 / 21)
    # A cup outside the disc does not count: the disc has none.
    no_cup = np.zeros((40, 40), np.uint8)
    no_cup[10:30, 10:30] = 1
    no_cup[35:38, 35:38] = 2
    assert metrics.vertical_cdr(no_cup) == 0.0
    # Two discs of 16 pixels: the first in row-major order (the lower label) is measured.
    tied = np.zeros((20, 20), np.uint8)
    tied[2:6, 2:6] = 1
    tied[3:5, 3:5] = 2  # cup of 2 rows in the first
    tied[12:16, 12:16] = 1
    tied[13, 13] = 2  # cup of 1 row in the second
    assert metrics.vertical_cdr(tied) == pytest.approx(2 / 4)


# --------------------------------------------------------------------------- uncertainty
def test_error_auroc():
    error = np.array([False, False, True, False, True])
    assert metrics.error_auroc(np.array([0.1, 0.2, 0.9, 0.3, 0.8]), error) == 1.0
    assert metrics.error_auroc(np.array([0.9, 0.8, 0.1, 0.7, 0.2]), error) == 0.0
    u = np.array([0.5, 0.1, 0.4, 0.6, 0.3])
    assert metrics.error_auroc(u, error) == pytest.approx(roc_auc_score(error, u))
    assert math.isnan(metrics.error_auroc(u, np.zeros(5, bool)))


def test_pixel_samples_are_uniform_and_deterministic():
    rng = np.random.default_rng(1)
    error = rng.random((64, 64)) < 0.1
    uncertainty = np.where(error, rng.beta(4, 2, error.shape), rng.beta(2, 4, error.shape))
    def sample(count, seed, where=None):
        found = metrics.sample_pixels(count, np.random.default_rng(seed), where, uncertainty=uncertainty, error=error)
        return found["uncertainty"], found["error"]

    unc, err = sample(64 * 64, 0)
    assert np.array_equal(unc, uncertainty.ravel()) and np.array_equal(err, error.ravel())  # small: every pixel
    unc, err = sample(1000, 7)
    again = sample(1000, 7)
    assert unc.size == err.size == 1000 and np.array_equal(unc, again[0]) and np.array_equal(err, again[1])
    # Each sampled pixel keeps its own error flag, and the sample is drawn without replacement.
    where = {float(u): bool(e) for u, e in zip(uncertainty.ravel(), error.ravel())}
    assert all(where[float(u)] == bool(e) for u, e in zip(unc, err)) and len(set(unc.tolist())) == 1000
    full = roc_auc_score(error.ravel(), uncertainty.ravel())
    assert metrics.error_auroc(unc, err) == pytest.approx(full, abs=0.05)
    # Restricted to a region: only its pixels, all of them when they are fewer than the count.
    region = np.zeros((64, 64), bool)
    region[10:20, 5:15] = True
    unc, err = sample(1000, 0, where=region)
    assert np.array_equal(unc, uncertainty[region]) and np.array_equal(err, error[region])
    unc, _ = sample(30, 0, where=region)
    assert unc.size == 30 and set(unc.tolist()) <= set(uncertainty[region].tolist())
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.sample_pixels(5, np.random.default_rng(0), uncertainty=uncertainty, error=error[:10])


def test_referral_accuracy():
    correct = np.array([True, True, False, True, False])
    uncertainty = np.array([0.1, 0.2, 0.9, 0.3, 0.8])
    assert metrics.referral_acc(correct, uncertainty, 0.0) == pytest.approx(0.6)
    assert metrics.referral_acc(correct, uncertainty, 0.2) == pytest.approx(0.75)  # refers the 0.9
    assert metrics.referral_acc(correct, uncertainty, 0.4) == 1.0
    curve = metrics.referral_curve(correct, uncertainty, [0.0, 0.2, 0.4, 0.8])
    assert curve["retained"].tolist() == [5, 4, 3, 1]
    np.testing.assert_allclose(curve["accuracy"], [0.6, 0.75, 1.0, 1.0])
    # Ties are broken by position: referring 1 of two equally uncertain cases keeps the first.
    assert metrics.referral_acc(np.array([True, False]), np.array([0.5, 0.5]), 0.5) == 1.0


def test_noise_auroc_hand_computed():
    # Pairs (noisy, clean) where the noisy copy is more uncertain: 0.25 beats 0.1 and 0.2, 0.4 beats all: 5 / 6.
    assert metrics.noise_auroc(np.array([0.1, 0.2, 0.3]), np.array([0.25, 0.4])) == pytest.approx(5 / 6)
    assert metrics.noise_auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5  # ties count one half
    assert metrics.noise_auroc(np.array([0.9]), np.array([0.1, 0.2])) == 0.0
    assert math.isnan(metrics.noise_auroc(np.array([]), np.array([0.3])))


# ------------------------------------------------------------------ selective prediction
def _selective_case() -> tuple[np.ndarray, np.ndarray]:
    # Sorted by uncertainty: 0.1 right, 0.2 right, 0.4 wrong and 0.4 right (a tie), 0.9 wrong.
    return np.array([0.1, 0.4, 0.2, 0.4, 0.9]), np.array([False, True, False, False, True])


def test_risk_coverage_curve_by_hand():
    uncertainty, error = _selective_case()
    curve = metrics.risk_coverage_curve(uncertainty, error)
    np.testing.assert_allclose(curve["threshold"], [0.1, 0.2, 0.4, 0.9])
    # Accepted 1, 2, 4 (the tie together), 5 cases with 0, 0, 1, 2 errors among them.
    np.testing.assert_allclose(curve["coverage"], [0.2, 0.4, 0.8, 1.0])
    np.testing.assert_allclose(curve["risk"], [0.0, 0.0, 1 / 4, 2 / 5])
    np.testing.assert_allclose(curve["generalized_risk"], [0.0, 0.0, 1 / 5, 2 / 5])
    # Steps 0.2, 0.2, 0.4, 0.2 of coverage times the risk at each threshold.
    assert metrics.aurc(uncertainty, error) == pytest.approx(0.4 * 0.25 + 0.2 * 0.4)
    assert metrics.augrc(uncertainty, error) == pytest.approx(0.4 * 0.2 + 0.2 * 0.4)
    # Three correct of five: a perfect ranking has risks 1/4 and 2/5 at k = 4, 5: AURC* = (1/4 + 2/5) / 5.
    assert metrics.eaurc(uncertainty, error) == pytest.approx(0.18 - (1 / 4 + 2 / 5) / 5)
    assert metrics.coverage_at_risk(uncertainty, error, 0.0) == pytest.approx(0.4)
    assert metrics.coverage_at_risk(uncertainty, error, 0.3) == pytest.approx(0.8)
    assert metrics.coverage_at_risk(uncertainty, error, 0.4) == 1.0
    # The most certain case is wrong: no threshold keeps the risk at 0.4 or below.
    assert metrics.coverage_at_risk(np.array([0.1, 0.2]), np.array([True, False]), 0.4) == 0.0
    # The order of the cases does not matter, ties included.
    perm = [4, 3, 0, 2, 1]
    assert metrics.aurc(uncertainty[perm], error[perm]) == pytest.approx(metrics.aurc(uncertainty, error))
    assert metrics.augrc(uncertainty[perm], error[perm]) == pytest.approx(metrics.augrc(uncertainty, error))


def test_selective_metrics_without_ties_follow_their_definitions():
    rng = np.random.default_rng(23)
    n = 60
    error = rng.random(n) < 0.3
    uncertainty = rng.normal(error.astype(float), 1.0)  # informative, no ties
    errors_in_first_k = np.cumsum(error[np.argsort(uncertainty)])
    k = np.arange(1, n + 1)
    # AURC: the mean selective risk over the coverages k / n.
    assert metrics.aurc(uncertainty, error) == pytest.approx(np.mean(errors_in_first_k / k))
    # AUGRC: each error counts the cases ranked at or after it, over n^2: its own error pairs
    # (n_e (n_e + 1) / 2) and the (error, correct) pairs with the correct case more uncertain,
    # a share 1 - AUROC of all n_e n_c pairs (roc_auc_score of uncertainty for error).
    n_e, n_c = int(error.sum()), int((~error).sum())
    misordered = (1 - roc_auc_score(error, uncertainty)) * n_e * n_c
    assert metrics.augrc(uncertainty, error) == pytest.approx((misordered + n_e * (n_e + 1) / 2) / n**2)
    # coverage_at_risk: the largest k / n whose first k cases have at most 20 % errors.
    assert metrics.coverage_at_risk(uncertainty, error, 0.2) == pytest.approx(k[errors_in_first_k / k <= 0.2].max() / n)


def test_eaurc_of_perfect_and_large_rankings():
    rng = np.random.default_rng(24)
    error = rng.random(50) < 0.3
    perfect = error + rng.uniform(0, 0.5, 50)  # every error more uncertain than every correct case
    assert metrics.eaurc(perfect, error) == pytest.approx(0.0, abs=1e-12)
    assert metrics.eaurc(rng.random(50), error) > 0.0
    # No errors: both areas are 0.
    assert metrics.aurc(rng.random(10), np.zeros(10, bool)) == 0.0
    assert metrics.eaurc(rng.random(10), np.zeros(10, bool)) == 0.0
    # With many cases, the perfect ranking's AURC tends to r + (1 - r) ln(1 - r), r the error rate.
    n, r = 20_000, 0.2
    error = np.arange(n) >= (1 - r) * n
    assert metrics.aurc(np.arange(n, dtype=float), error) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-4)
    # The reverse ranking (errors first) gives r - r ln r in the limit; eAURC is the difference.
    worst = metrics.eaurc(-np.arange(n, dtype=float), error)
    assert worst == pytest.approx(r - r * math.log(r) - (r + (1 - r) * math.log(1 - r)), abs=1e-4)


def test_selective_metrics_of_empty_input():
    empty_u, empty_e = np.zeros(0), np.zeros(0, bool)
    curve = metrics.risk_coverage_curve(empty_u, empty_e)
    assert all(values.size == 0 for values in curve.values()) and set(curve) == {
        "threshold", "coverage", "risk", "generalized_risk"}
    for metric in (metrics.aurc, metrics.eaurc, metrics.augrc):
        assert math.isnan(metric(empty_u, empty_e))
    assert math.isnan(metrics.coverage_at_risk(empty_u, empty_e, 0.1))
    with pytest.raises(ValueError, match="sizes differ: 3 vs 2"):
        metrics.aurc(np.ones(3), np.ones(2, bool))


# ---------------------------------------------------------------------- contour band
def _brute_force_band(surfaces: list[np.ndarray], shape: tuple[int, int], width: float) -> np.ndarray:
    points = np.vstack(surfaces)
    pixels = np.argwhere(np.ones(shape, bool))
    return (cdist(pixels, points).min(axis=1) <= width).reshape(shape)


@pytest.mark.parametrize("width", [0, 1, 2.5])
def test_contour_band_is_within_width_of_the_outlines(width):
    mask = np.zeros((40, 40), np.uint8)
    yy, xx = np.mgrid[:40, :40]
    mask[(yy - 20) ** 2 + (xx - 18) ** 2 <= 144] = 1  # disc rim
    mask[(yy - 21) ** 2 + (xx - 19) ** 2 <= 25] = 2  # cup
    mask[36:, 35:] = 1  # a blob on the image border: the border is part of its outline
    band = metrics.contour_band(mask, ["background", "disc", "cup"], width)
    expected = _brute_force_band([_brute_force_surface(mask >= 1), _brute_force_surface(mask == 2)], mask.shape, width)
    assert band.dtype == bool and np.array_equal(band, expected)
    assert band[21, 19 - 5] and not band[21, 19]  # on the cup's outline; the cup's centre is not
    # Any other layout: each foreground class's outline.
    other = metrics.contour_band(mask, ["background", "lesion", "core"], width)
    expected = _brute_force_band([_brute_force_surface(mask == 1), _brute_force_surface(mask == 2)], mask.shape, width)
    assert np.array_equal(other, expected)


def test_contour_band_of_an_empty_mask_is_empty():
    band = metrics.contour_band(np.zeros((8, 9), np.uint8), ["background", "disc", "cup"], 3)
    assert band.shape == (8, 9) and band.dtype == bool and not band.any()


# ----------------------------------------------------------------------------- bootstrap
def _mean_statistic(values: np.ndarray) -> metrics.ResampledStatistic:
    return metrics.resampled_ratio(values, np.ones_like(values))


def test_bootstrap_interval_of_a_mean_is_the_normal_interval():
    rng = np.random.default_rng(11)
    x = rng.normal(3.0, 2.0, 400)
    low, high = metrics.bootstrap_ci(_mean_statistic(x), x.size, samples=4000, seed=0)
    # The bootstrap distribution of a mean is ~ Normal(mean, s / sqrt(n)) with the plug-in s (ddof=0).
    se = x.std() / math.sqrt(x.size)
    z = 1.959964
    assert low == pytest.approx(x.mean() - z * se, abs=0.15 * se)
    assert high == pytest.approx(x.mean() + z * se, abs=0.15 * se)
    # Same seed, same interval; another seed moves it only by Monte Carlo error.
    assert metrics.bootstrap_ci(_mean_statistic(x), x.size, samples=4000, seed=0) == (low, high)
    other = metrics.bootstrap_ci(_mean_statistic(x), x.size, samples=4000, seed=1)
    assert other != (low, high) and other[0] == pytest.approx(low, abs=0.2 * se)


def test_bootstrap_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(12)
    trials, n = 300, 40
    covered = 0
    for trial in range(trials):
        x = rng.normal(0.0, 1.0, n)
        low, high = metrics.bootstrap_ci(_mean_statistic(x), n, samples=1000, seed=trial)
        covered += low <= 0.0 <= high
    # Percentile intervals under-cover slightly at n = 40 (about 93-94 %); the binomial sd of the
    # observed coverage is 1.3 points. Intervals of the wrong width (e.g. off by sqrt(2)) miss this.
    assert 0.89 <= covered / trials <= 0.98, covered / trials


def test_bootstrap_auc_interval_matches_the_delong_standard_error():
    rng = np.random.default_rng(13)
    positive = rng.random(300) < 0.5
    score = rng.normal(1.2 * positive, 1.0)
    auc = roc_auc_score(positive, score)
    # DeLong's structural components: each positive's (negative's) share of pairs it wins (loses).
    wins = (score[positive][:, None] > score[~positive][None, :]).astype(float)
    se = math.sqrt(wins.mean(axis=1).var(ddof=1) / positive.sum() + wins.mean(axis=0).var(ddof=1) / (~positive).sum())
    low, high = metrics.bootstrap_ci(metrics.resampled_auc(score, positive), positive.size, samples=2000, seed=0)
    assert high - low == pytest.approx(2 * 1.959964 * se, rel=0.15)
    assert low < auc < high


def test_bootstrap_undefined_resamples_and_bad_input():
    # Two items with values 0 and 1: resampled means are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    assert metrics.bootstrap_ci(_mean_statistic(np.array([0.0, 1.0])), 2, samples=1000, seed=0) == (0.0, 1.0)
    # Undefined resamples are left out: an AUC of one positive among 20 exists only when it is drawn
    # (1 - 0.95**20 = 64 % of resamples), and then it is 1 here.
    positive = np.arange(20) == 0
    assert metrics.bootstrap_ci(metrics.resampled_auc(np.arange(20.0)[::-1], positive), 20, 500, 0) == (1.0, 1.0)
    # Of two items, the first is drawn twice in 1/4 of the resamples and at least once in 3/4: a
    # statistic defined only then has no interval (fewer than half defined), respectively one.
    drawn_twice = lambda counts: np.where(counts[:, 0] == 2, 1.0, np.nan)  # noqa: E731
    drawn = lambda counts: np.where(counts[:, 0] >= 1, 1.0, np.nan)  # noqa: E731
    assert all(math.isnan(v) for v in metrics.bootstrap_ci(drawn_twice, 2, samples=1000, seed=0))
    assert metrics.bootstrap_ci(drawn, 2, samples=1000, seed=0) == (1.0, 1.0)
    # Never defined (there are no positives): no interval.
    low, high = metrics.bootstrap_ci(metrics.resampled_auc(np.arange(20.0), np.zeros(20, bool)), 20, 500, 0)
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="n=0"):
        metrics.bootstrap_ci(_mean_statistic(np.array([])), 0)
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        metrics.bootstrap_ci(_mean_statistic(np.ones(3)), 3, samples=0)
    with pytest.raises(ValueError, match="sizes differ: 3 vs 2"):
        metrics.resampled_auc(np.ones(3), np.ones(2, bool))


def _resample(counts: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    index = np.repeat(np.arange(counts.size), counts.astype(int))
    return [np.asarray(a)[index] for a in arrays]


def test_resampled_statistics_equal_the_metrics_on_resampled_arrays(binary_case):
    labels, prob = binary_case
    pred = prob.argmax(1)
    n = labels.size
    rng = np.random.default_rng(14)
    counts = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=4)]).astype(float)
    uncertainty = np.round(rng.random(n), 2)  # ties
    vcdr = np.where(rng.random(n) < 0.1, np.nan, np.round(prob[:, 1], 1))  # ties and undefined values
    correct = pred == labels
    stats = {
        "auc": metrics.resampled_class_auc(labels, prob, 1),
        "acc": metrics.resampled_ratio(correct, np.ones(n)),
        "f1": metrics.resampled_f1(labels, pred, 1),
        "sensitivity": metrics.resampled_ratio(correct & (labels == 1), labels == 1),
        "ece": metrics.resampled_ece(labels, prob, 10),
        "error_auroc": metrics.resampled_auc(uncertainty, ~correct),
        "vcdr_auc": metrics.resampled_auc(vcdr, labels == 1),
    }
    values = {key: stat(counts) for key, stat in stats.items()}
    for b, row in enumerate(counts):
        y, p, u, v = _resample(row, labels, prob, uncertainty, vcdr)
        yhat = p.argmax(1)
        assert values["auc"][b] == pytest.approx(roc_auc_score(y, p[:, 1]))
        assert values["acc"][b] == pytest.approx(np.mean(yhat == y))
        assert values["f1"][b] == pytest.approx(f1_score(y, yhat))
        assert values["sensitivity"][b] == pytest.approx(recall_score(y, yhat))
        assert values["ece"][b] == pytest.approx(metrics.ece(y, p, 10))
        assert values["error_auroc"][b] == pytest.approx(roc_auc_score(yhat != y, u))
        keep = np.isfinite(v)
        assert values["vcdr_auc"][b] == pytest.approx(roc_auc_score(y[keep], v[keep]))


def test_resampled_multiclass_auc_and_f1_follow_sklearn():
    rng = np.random.default_rng(15)
    labels = rng.integers(0, 3, 90)
    prob = rng.dirichlet(np.ones(3), 90) + np.eye(3)[labels]
    prob /= prob.sum(axis=1, keepdims=True)
    pred = prob.argmax(1)
    counts = rng.multinomial(90, np.full(90, 1 / 90), size=3).astype(float)
    auc = metrics.resampled_class_auc(labels, prob, positive=0)(counts)
    f1 = metrics.resampled_f1(labels, pred, positive=0, num_classes=3)(counts)
    for b, row in enumerate(counts):
        y, p = _resample(row, labels, prob)
        assert auc[b] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
        assert f1[b] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    # A resample without class 2 has no one-vs-rest AUC.
    assert np.isnan(metrics.resampled_class_auc(labels, prob, positive=0)(np.where(labels == 2, 0.0, 1.0)[None]))[0]


def test_resampled_pixel_auc_pools_the_pixels_of_resampled_images():
    rng = np.random.default_rng(16)
    images, per_image = 12, 50
    error = rng.random((images, per_image)) < 0.2
    uncertainty = np.round(np.where(error, rng.beta(3, 2, error.shape), rng.beta(2, 3, error.shape)), 2)
    image_of_pixel = np.repeat(np.arange(images), per_image)
    stat = metrics.resampled_auc(uncertainty.ravel(), error.ravel(), group=image_of_pixel, n_groups=images)
    counts = np.vstack([np.ones(images), rng.multinomial(images, np.full(images, 1 / images), size=4)])
    values = stat(counts)
    for b, row in enumerate(counts):
        e, u = _resample(row, error, uncertainty)
        assert values[b] == pytest.approx(roc_auc_score(e.ravel(), u.ravel()))
    # More errors than hits swaps the roles inside; the result is the same AUC.
    flipped = metrics.resampled_auc(-uncertainty.ravel(), ~error.ravel(), group=image_of_pixel, n_groups=images)
    np.testing.assert_allclose(flipped(counts), values)


def test_resampled_selective_and_scoring_statistics_equal_the_metrics_on_resampled_arrays(binary_case):
    labels, prob = binary_case
    n = labels.size
    rng = np.random.default_rng(25)
    counts = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=4)]).astype(float)
    error = prob.argmax(1) != labels
    uncertainty = np.round(1 - prob.max(1) + rng.normal(0, 0.05, n), 2)  # informative, with ties
    stats = {
        "aurc": (metrics.resampled_aurc(uncertainty, error), metrics.aurc),
        "eaurc": (metrics.resampled_eaurc(uncertainty, error), metrics.eaurc),
        "augrc": (metrics.resampled_augrc(uncertainty, error), metrics.augrc),
    }
    nll, brier = metrics.resampled_nll(labels, prob)(counts), metrics.resampled_brier(labels, prob)(counts)
    for key, (stat, metric) in stats.items():
        values = stat(counts)
        for b, row in enumerate(counts):
            u, e = _resample(row, uncertainty, error)
            assert values[b] == pytest.approx(metric(u, e)), (key, b)
    for b, row in enumerate(counts):
        y, p = _resample(row, labels, prob)
        assert nll[b] == pytest.approx(log_loss(y, p, labels=[0, 1]))
        assert brier[b] == pytest.approx(brier_score_loss(y, p[:, 1], scale_by_half=False))
    # A resample of correct cases only: no risk at all, and nothing in excess of the perfect ranking.
    only_correct = (~error).astype(float)[None]
    assert metrics.resampled_aurc(uncertainty, error)(only_correct)[0] == 0.0
    assert metrics.resampled_eaurc(uncertainty, error)(only_correct)[0] == pytest.approx(0.0, abs=1e-12)
    # A resample of errors only: every threshold's risk is 1, the perfect ranking's too.
    only_errors = error.astype(float)[None]
    assert metrics.resampled_aurc(uncertainty, error)(only_errors)[0] == pytest.approx(1.0)
    assert metrics.resampled_eaurc(uncertainty, error)(only_errors)[0] == pytest.approx(0.0, abs=1e-12)


def _debiased_on_fixed_bins(labels: np.ndarray, prob: np.ndarray, member: np.ndarray, bins: int) -> float:
    # Kumar, Liang & Ma's estimator written out bin by bin, with each image's bin given.
    correct, conf = prob.argmax(1) == labels, prob.max(1)
    total = 0.0
    for b in range(bins):
        inside = member == b
        n_b = inside.sum()
        if n_b == 0:
            continue
        acc, mean_conf = correct[inside].mean(), conf[inside].mean()
        total += n_b * ((acc - mean_conf) ** 2 - (acc * (1 - acc) / (n_b - 1) if n_b > 1 else 0.0))
    return math.sqrt(max(0.0, total / labels.size))


def test_resampled_debiased_ece_keeps_the_full_sample_bins(binary_case):
    labels, prob = binary_case
    n, bins = labels.size, 8
    rng = np.random.default_rng(26)
    stat = metrics.resampled_ece_debiased(labels, prob, bins)
    # The full sample's equal-mass bins: 25 images each, in confidence order.
    order = np.argsort(prob.max(1), kind="stable")
    member = np.empty(n, int)
    member[order] = np.repeat(np.arange(bins), n // bins)
    assert stat(np.ones((1, n)))[0] == pytest.approx(metrics.ece_debiased(labels, prob, bins))
    # Resamples that draw each bin exactly 25 times: re-cutting equal-mass bins gives the same bins,
    # so the statistic is ece_debiased of the resampled arrays.
    balanced = np.zeros((4, n))
    for b in range(bins):
        inside = np.flatnonzero(member == b)
        balanced[:, inside] = rng.multinomial(inside.size, np.full(inside.size, 1 / inside.size), size=4)
    values = stat(balanced)
    for b, row in enumerate(balanced):
        y, p = _resample(row, labels, prob)
        assert values[b] == pytest.approx(metrics.ece_debiased(y, p, bins))
    # Any resample: the estimator on the resampled arrays, each image in its full-sample bin.
    counts = rng.multinomial(n, np.full(n, 1 / n), size=4).astype(float)
    values = stat(counts)
    for b, row in enumerate(counts):
        y, p, m = _resample(row, labels, prob, member)
        assert values[b] == pytest.approx(_debiased_on_fixed_bins(y, p, m, bins))


# ------------------------------------------------------------ shared by validation and evaluation
def test_segmentation_metrics_average_per_image_values_by_hand():
    gt = np.zeros((2, 12, 12), np.uint8)
    gt[:, 2:10, 2:10] = 1  # disc rim
    gt[:, 4:8, 4:8] = 2  # cup (16 px) inside the disc (64 px)
    pred = gt.copy()
    pred[1][pred[1] == 2] = 1  # image 1: the cup is missed, the disc (rim + cup) is still right
    got = metrics.segmentation_metrics(pred, gt, ["background", "disc", "cup"])
    assert list(got) == ["dice_disc", "dice_cup", "assd_disc", "hd95_disc", "dist_undefined_disc",
                         "assd_cup", "hd95_cup", "dist_undefined_cup"]
    assert got["dice_disc"] == 1.0 and got["dice_cup"] == pytest.approx((1.0 + 0.0) / 2)
    # Image 1 has no predicted cup: no distance to measure, so it is counted, not averaged.
    assert got["assd_cup"] == 0.0 and got["hd95_cup"] == 0.0 and got["dist_undefined_cup"] == 1.0
    assert got["dist_undefined_disc"] == 0.0
    assert list(metrics.segmentation_metrics(pred, gt, ["background", "disc", "cup"], distances=False)) == ["dice_disc", "dice_cup"]


def test_task_metrics_prefix_and_select(binary_case):
    labels, prob = binary_case
    masks = np.zeros((len(labels), 4, 4), np.uint8)
    got = metrics.task_metrics(labels, prob, None, positive=0, classification=("f1", "acc"))
    pred = prob.argmax(1)
    assert got == {"cls/f1": pytest.approx(f1_score(labels, pred, pos_label=0)),
                   "cls/acc": pytest.approx(np.mean(pred == labels))}
    seg = metrics.segmentation_per_image(masks, masks, ["background", "lesion"])
    seg_only = metrics.task_metrics(labels, None, seg, positive=0)
    assert seg_only["seg/dice_lesion"] == 1.0 and not any(k.startswith("cls/") for k in seg_only)
    with pytest.raises(ValueError, match="unknown classification metrics"):
        metrics.task_metrics(labels, prob, None, positive=0, classification=("precision",))


def test_task_metrics_mean_uncertainties_by_hand(binary_case):
    labels, prob = binary_case
    got = metrics.task_metrics(labels, None, None, positive=1, class_uncertainty=np.array([0.2, 0.4, 0.9]),
                               pixel_uncertainty=np.array([0.1, 0.3]))
    assert got == {"unc/mean_class_uncertainty": pytest.approx(0.5), "unc/mean_pixel_uncertainty": pytest.approx(0.2)}


def test_per_image_values_of_two_shares_summarise_as_the_whole():
    # Validation's ranks each compute per-image values of their share; concatenated, they must give
    # the metrics of the whole set (Dice means, distance means over defined images, the count left out).
    rng = np.random.default_rng(3)
    gt = np.zeros((5, 16, 16), np.uint8)
    gt[:, 3:13, 3:13] = 1
    gt[:, 6:10, 6:10] = 2
    pred = gt.copy()
    pred[1] = np.roll(pred[1], 2, axis=1)
    pred[2][pred[2] == 2] = 1  # no cup predicted: its cup distances are undefined
    pred[4] = rng.integers(0, 3, size=(16, 16))
    classes = ["background", "disc", "cup"]
    whole = metrics.segmentation_metrics(pred, gt, classes)
    shares = [metrics.segmentation_per_image(pred[:2], gt[:2], classes), metrics.segmentation_per_image(pred[2:], gt[2:], classes)]
    joined = metrics.summarise_segmentation({k: np.concatenate([s[k] for s in shares]) for k in shares[0]})
    assert list(joined) == list(whole)
    for key in whole:
        assert joined[key] == pytest.approx(whole[key]), key
    assert whole["dist_undefined_cup"] == 1.0
    assert whole["dice_disc"] == pytest.approx(np.mean([metrics.dice(p >= 1, g >= 1) for p, g in zip(pred, gt)]))


def test_resampled_auc_never_holds_the_whole_pair_table():
    # 6000 images: the table of ordered pairs would take 6000**2 floats (288 MB). It is built a
    # block of columns at a time, so the statistic's peak allocation stays far below that; the
    # values still follow sklearn on the resampled arrays.
    import tracemalloc

    rng = np.random.default_rng(31)
    n = 6000
    positive = rng.random(n) < 0.4
    score = np.round(rng.normal(positive * 1.0, 1.0), 1)  # ties
    counts = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n))]).astype(float)
    tracemalloc.start()
    try:
        values = metrics.resampled_auc(score, positive)(counts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6, peak
    for b, row in enumerate(counts):
        y, s = _resample(row, positive, score)
        assert values[b] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_resampled_selective_statistics_keep_their_temporaries_small():
    # 1000 resamples of 6000 cases: the risk-coverage curves take about ten temporaries of the
    # counts' size (48 MB each here); a few rows at a time they stay a fraction of that. The
    # values, rows from every block included, follow aurc on the resampled arrays.
    import tracemalloc

    rng = np.random.default_rng(32)
    n = 6000
    error = rng.random(n) < 0.2
    uncertainty = np.round(rng.normal(error * 1.0, 1.0), 1)  # ties
    counts = rng.multinomial(n, np.full(n, 1 / n), size=1000).astype(float)
    statistic = metrics.resampled_aurc(uncertainty, error)
    tracemalloc.start()
    try:
        values = statistic(counts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6, peak  # 97 MB all rows at once, 17 MB a few at a time (measured)
    for b in (0, 499, 999):
        u, e = _resample(counts[b], uncertainty, error)
        assert values[b] == pytest.approx(metrics.aurc(u, e), abs=1e-12)
