"""Evaluation metrics on numpy arrays; every scalar metric returns a Python float.

Function names follow the metric keys of ``data/reports/metrics.json`` (``cls/acc`` -> :func:`acc`,
``seg/hd95_cup`` -> :func:`hd95`, ...). Conventions shared by all of them:

- ``labels`` are int class indices (n,); ``prob`` is (n, K) class probabilities (rows sum to 1);
  ``positive`` is the index of the positive class (glaucoma) for the binary-style metrics
  (sensitivity, specificity, F1 and AUC with K = 2). With K > 2 these are "positive vs rest".
  It has no default: every caller passes the data set's declared positive class (the prepared
  store's ``positive_class``, which the export copies into the model's metadata).
- Calibration metrics (:func:`ece`, :func:`ece_equal_mass`, :func:`ece_debiased`) look at the
  top-label confidence ``max_k prob[k]`` and whether its argmax is the label; the proper scores
  (:func:`nll`, :func:`brier`) at the whole probability vector. :func:`ece_debiased_null` and
  :func:`ece_consistency_p_value` say how large a debiased ECE sampling alone produces.
- ``uncertainty`` is a per-case score where higher means less confident (the evidential
  ``u = K / S``, an entropy); ``error`` is bool, True where the case is misclassified (or, for
  pixels, mislabelled). The selective-prediction metrics (:func:`risk_coverage_curve`,
  :func:`aurc`, ...) take the uncertainty itself as the score: a case is accepted when its
  uncertainty is at most a threshold, and cases of equal uncertainty are accepted or referred
  together.
- One function per metric; :func:`classification_metrics` and :func:`segmentation_per_image` are
  the sets of them that both validation (``uml.train.worker.validate``) and evaluation
  (``uml.evaluate``) compute, through :func:`task_metrics` (with the mean uncertainties). A new
  metric added there reaches both.
- A metric that is undefined on its input (an AUC with a single class present, a sensitivity
  without positives, a distance to an empty mask) is ``nan``, never an exception:
  the evaluation stage writes it as ``null``.
- Segmentation metrics take one binary mask pair per call, at model resolution; distances are in
  pixels (unit spacing unless ``spacing`` is given).

Empty masks (segmentation):

==========================  ======  ===================
prediction / ground truth   dice    assd, hd95
==========================  ======  ===================
both empty                  1.0     0.0
one empty                   0.0     nan (no surface to measure to)
==========================  ======  ===================

The evaluation averages distances with ``nanmean`` and reports how many images were left out
(``seg/dist_undefined_<structure>``), rather than inventing a penalty distance.

Confidence intervals: :func:`bootstrap_ci` is a percentile bootstrap over the test images. Its
statistics are vectorised over resamples: a resample is given as how often each image was drawn
(a row of counts), and the ``resampled_*`` functions build, from per-image data, the statistic that
computes a metric on every row at once (an AUC from a table of ordered positive/negative pairs, a
ratio from count-weighted sums), equal to the metric function applied to the resampled arrays.
The one exception is :func:`resampled_ece_debiased`, whose equal-mass bins are those of the full
sample rather than re-cut in every resample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage, special
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from uml.fundus import FUNDUS_MASK_CLASSES

# Pixel-level AUROC above this many pixels is computed on a deterministic random subset:
# roc_auc_score sorts its input, and a full REFUGE test split has ~26M pixels at 256².
PIXEL_AUROC_MAX_PIXELS = 1_000_000


# ------------------------------------------------------------------------------ helpers
def _as_prob(prob: np.ndarray) -> np.ndarray:
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"class probabilities must be (n, K), got shape {prob.shape}")
    return prob


def _binary(labels: np.ndarray, positive: int) -> np.ndarray:
    return (np.asarray(labels) == positive).astype(np.int64)


def predicted_class(prob: np.ndarray) -> np.ndarray:
    """The predicted class index of each row: the argmax of the expected probability."""
    return _as_prob(prob).argmax(axis=1)


def _binary_confusion(labels: np.ndarray, pred: np.ndarray, positive: int) -> tuple[int, int, int, int]:
    """``(tn, fp, fn, tp)`` of "positive vs rest"; fixed ``labels=[0, 1]`` keeps it 2x2 when a class is absent."""
    tn, fp, fn, tp = confusion_matrix(_binary(labels, positive), _binary(pred, positive), labels=[0, 1]).ravel()
    return int(tn), int(fp), int(fn), int(tp)


def _safe_ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


# ---------------------------------------------------------------------- classification
def acc(labels: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of correct predictions (``pred`` are class indices)."""
    return float(accuracy_score(labels, pred))


def auc(labels: np.ndarray, prob: np.ndarray, positive: int) -> float:
    """ROC AUC: of ``prob[:, positive]`` for K = 2, one-vs-rest macro AUC for K > 2.

    ``prob`` may also be a 1-D score for the positive class. ``nan`` when ``labels`` hold a
    single class or are empty (AUC is undefined).
    """
    labels = np.asarray(labels)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim == 1:
        score, multiclass = prob, False
    else:
        multiclass = prob.shape[1] > 2
        score = prob if multiclass else prob[:, positive]
    if multiclass:
        # sklearn's ovr AUC needs every class present in the labels.
        if len(np.unique(labels)) != prob.shape[1]:
            return math.nan
        return float(roc_auc_score(labels, prob, multi_class="ovr", labels=list(range(prob.shape[1]))))
    target = _binary(labels, positive)
    # An empty target (e.g. vcdr_auc when no image has a predicted disc) is undefined too; the
    # initial values alone would let it through to scikit-learn, which raises.
    if target.size == 0 or target.min() == target.max():
        return math.nan
    return float(roc_auc_score(target, score))


def kappa(labels: np.ndarray, pred: np.ndarray) -> float:
    """Cohen's kappa between labels and predicted classes (``nan`` when it is undefined: one class only)."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    if len(np.unique(np.concatenate([labels, pred]))) < 2:
        return math.nan
    return float(cohen_kappa_score(labels, pred))


def sensitivity(labels: np.ndarray, pred: np.ndarray, positive: int) -> float:
    """True positive rate TP / (TP + FN) of the positive class (``nan`` without positives)."""
    _, _, fn, tp = _binary_confusion(labels, pred, positive)
    return _safe_ratio(tp, tp + fn)


def specificity(labels: np.ndarray, pred: np.ndarray, positive: int) -> float:
    """True negative rate TN / (TN + FP) (``nan`` without negatives)."""
    tn, fp, _, _ = _binary_confusion(labels, pred, positive)
    return _safe_ratio(tn, tn + fp)


def f1(labels: np.ndarray, pred: np.ndarray, positive: int, num_classes: int = 2) -> float:
    """F1 of the positive class for K = 2; macro F1 over all classes for K > 2.

    0.0 (not ``nan``) when there are neither positive labels nor positive predictions, as
    scikit-learn's ``zero_division=0``.
    """
    if num_classes > 2:
        return float(f1_score(labels, pred, average="macro", labels=list(range(num_classes)), zero_division=0))
    return float(f1_score(_binary(labels, positive), _binary(pred, positive), zero_division=0))


def _calibration_bins(labels: np.ndarray, prob: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: its bin index (see :func:`reliability_diagram`), confidence and correctness (0/1)."""
    prob = _as_prob(prob)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    # searchsorted(side="left") on the inner edges makes bins right-closed.
    index = np.clip(np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], confidence, side="left"), 0, bins - 1)
    return index, confidence, correct


def reliability_diagram(labels: np.ndarray, prob: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Per-bin calibration statistics on the predicted-class confidence.

    The confidence of an image is ``max_k prob[k]`` and it is "correct" when the argmax is the
    label. Confidences are put into ``bins`` equal-width bins over [0, 1], right-closed
    ((0, 0.1], (0.1, 0.2], ...; a confidence of exactly 0 goes to the first bin).

    Returns arrays of length ``bins``: ``lower``, ``upper`` (bin edges), ``count``,
    ``confidence`` (mean confidence in the bin) and ``accuracy`` (fraction correct); the last two
    are ``nan`` for empty bins.
    """
    index, confidence, correct = _calibration_bins(labels, prob, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    count = np.bincount(index, minlength=bins).astype(np.int64)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, correct_sum / count, np.nan)
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "confidence": mean_conf, "accuracy": accuracy}


def ece(labels: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error on the predicted-class confidence.

    ``ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|`` over the equal-width bins of
    :func:`reliability_diagram` (empty bins contribute nothing). 0 for a perfectly calibrated
    model; ``nan`` for an empty input.
    """
    stats = reliability_diagram(labels, prob, bins)
    n = stats["count"].sum()
    if n == 0:
        return math.nan
    filled = stats["count"] > 0
    gap = np.abs(stats["accuracy"][filled] - stats["confidence"][filled])
    return float((stats["count"][filled] * gap).sum() / n)


def _labels_and_prob(labels: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, prob = np.asarray(labels).ravel(), _as_prob(prob)
    if labels.size != prob.shape[0]:
        raise ValueError(f"labels and prob sizes differ: {labels.size} vs {prob.shape[0]}")
    return labels.astype(np.int64), prob


# The probability of the true class is clipped to at least this before its log is taken. A
# confident mistake can give the true class a probability of exactly 0.0: the exported model runs
# in float32, whose exp underflows to 0 for logits ~100 below the largest (the softmax baseline;
# the evidential head's Dirichlet mean alpha / S is never 0). One such image would make the mean,
# and every bootstrap resample that draws it, infinite. At 1e-12 an image costs at most
# -ln(1e-12) = 27.6 nats; every true-class probability above the floor is scored as it is.
NLL_PROB_FLOOR = 1e-12


def _true_class_nll(labels: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Per image: ``-ln max(prob[label], NLL_PROB_FLOOR)``."""
    labels, prob = _labels_and_prob(labels, prob)
    true_prob = np.take_along_axis(prob, labels[:, None], axis=1)[:, 0]
    return -np.log(np.maximum(true_prob, NLL_PROB_FLOOR))


def nll(labels: np.ndarray, prob: np.ndarray) -> float:
    """Mean negative log-likelihood (log loss, in nats) of the true class: ``-mean_i ln p_i[y_i]``.

    A proper scoring rule: lower is better, 0 only for probability 1 on every true class. The
    probability is clipped below at :data:`NLL_PROB_FLOOR` (see there) so that a probability of 0
    gives a large finite loss rather than ``inf``. ``nan`` for an empty input.
    """
    per_image = _true_class_nll(labels, prob)
    return float(per_image.mean()) if per_image.size else math.nan


def _brier_per_image(labels: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Per image: ``sum_k (prob[k] - onehot(label)[k])**2``."""
    labels, prob = _labels_and_prob(labels, prob)
    onehot = np.eye(prob.shape[1])[labels]
    return ((prob - onehot) ** 2).sum(axis=1)


def brier(labels: np.ndarray, prob: np.ndarray) -> float:
    """Multiclass Brier score: ``mean_i sum_k (p_ik - y_ik)**2`` with ``y_i`` the one-hot label.

    A proper scoring rule in [0, 2]: 0 for probability 1 on every true class, 2 for probability 1
    on a wrong class each time. For K = 2 it is twice the binary Brier score
    ``mean_i (p_i1 - y_i1)**2`` (both classes' squared errors are equal). ``nan`` for an empty input.
    """
    per_image = _brier_per_image(labels, prob)
    return float(per_image.mean()) if per_image.size else math.nan


def _equal_mass_bins(labels: np.ndarray, prob: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: its equal-mass bin index, confidence and correctness (0/1).

    Images are sorted by top-label confidence (stable: equal confidences keep their order) and
    the sorted order is cut into ``bins`` groups of near-equal size as ``np.array_split`` cuts it
    (the first ``n % bins`` groups have one image more); with ``bins > n`` some bins are empty.
    """
    labels, prob = _labels_and_prob(labels, prob)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(confidence, kind="stable")
    sizes = [part.size for part in np.array_split(order, bins)]
    index = np.empty(confidence.size, dtype=np.int64)
    index[order] = np.repeat(np.arange(bins), sizes)
    return index, confidence, correct


def _bin_means(index: np.ndarray, confidence: np.ndarray, correct: np.ndarray,
               bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: count, accuracy and mean confidence (``nan`` for empty bins)."""
    count = np.bincount(index, minlength=bins).astype(np.float64)
    accuracy = _divide_where_positive(np.bincount(index, weights=correct, minlength=bins), count, math.nan)
    mean_conf = _divide_where_positive(np.bincount(index, weights=confidence, minlength=bins), count, math.nan)
    return count, accuracy, mean_conf


def ece_equal_mass(labels: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error (L1) on the top-label confidence with equal-mass bins.

    ``sum_b (n_b / n) * |accuracy_b - confidence_b|``, as :func:`ece`, but the bins are
    :func:`_equal_mass_bins`: each holds (nearly) the same number of images, so a model whose
    confidences crowd near 1 is not measured on one or two populated bins. ``nan`` for an empty
    input.
    """
    index, confidence, correct = _equal_mass_bins(labels, prob, bins)
    if index.size == 0:
        return math.nan
    count, accuracy, mean_conf = _bin_means(index, confidence, correct, bins)
    filled = count > 0
    return float((count[filled] * np.abs(accuracy[filled] - mean_conf[filled])).sum() / index.size)


def _debiased_l2(count: np.ndarray, accuracy: np.ndarray, mean_conf: np.ndarray) -> np.ndarray:
    """The debiased L2 calibration error from per-bin statistics (bins on the last axis).

    ``sqrt(max(0, sum_b (n_b / n) * [(acc_b - conf_b)**2 - acc_b (1 - acc_b) / (n_b - 1)]))``;
    bins with ``n_b = 1`` keep their squared gap uncorrected, empty bins contribute nothing,
    ``nan`` where ``n = 0``.
    """
    filled = count > 0
    gap = np.where(filled, accuracy - mean_conf, 0.0) ** 2
    spread = np.where(filled, accuracy * (1.0 - accuracy), 0.0)
    correction = _divide_where_positive(spread, count - 1.0, 0.0)
    total = count.sum(axis=-1)
    squared = _divide_where_positive((count * (gap - correction)).sum(axis=-1), total, math.nan)
    return np.sqrt(np.maximum(squared, 0.0))  # maximum keeps a nan (no images) a nan


def ece_debiased(labels: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Debiased L2 calibration error on the top-label confidence (Kumar, Liang & Ma, 2019,
    "Verified Uncertainty Calibration"), with the equal-mass bins of :func:`ece_equal_mass`.

    The plug-in squared gap ``(acc_b - conf_b)**2`` of a bin overestimates the true one by the
    variance of its accuracy, ``acc_b (1 - acc_b) / n_b`` for a bin of ``n_b`` Bernoulli
    outcomes; subtracting the unbiased estimate of that variance gives

        ``sqrt(max(0, sum_b (n_b / n) * [(acc_b - conf_b)**2 - acc_b (1 - acc_b) / (n_b - 1)]))``.

    A bin of one image has no variance estimate and contributes its squared gap uncorrected.
    On the scale of :func:`ece` (a root mean squared gap rather than a mean absolute one), and it
    can be exactly 0 when the estimated miscalibration is below the sampling noise. ``nan`` for
    an empty input.
    """
    index, confidence, correct = _equal_mass_bins(labels, prob, bins)
    if index.size == 0:
        return math.nan
    return float(_debiased_l2(*_bin_means(index, confidence, correct, bins)))


def ece_debiased_null(prob: np.ndarray, bins: int = 10, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """:func:`ece_debiased` of ``resamples`` label sets drawn from ``prob`` itself: what a
    perfectly calibrated model with exactly these confidences would measure on this many images
    (consistency resampling, Bröcker & Smith 2007, "Increasing the Reliability of Reliability
    Diagrams").

    Under that null each image's top-label prediction is right with probability equal to its
    confidence, independently; the confidences, and hence the equal-mass bins, stay as they are.
    Its spread is the measurement noise of the debiased ECE at this sample size: on a few hundred
    images it is far from negligible (see :func:`ece_consistency_p_value`). Returns ``(resamples,)``
    values (empty for an empty input)."""
    prob = _as_prob(prob)
    if prob.shape[0] == 0 or resamples < 1:
        return np.zeros(0)
    index, confidence, _ = _equal_mass_bins(np.zeros(prob.shape[0], dtype=np.int64), prob, bins)
    one_hot = np.zeros((confidence.size, bins))
    one_hot[np.arange(confidence.size), index] = 1.0
    count = one_hot.sum(axis=0)
    mean_conf = _divide_where_positive(confidence @ one_hot, count, math.nan)
    correct = (np.random.default_rng(seed).random((resamples, confidence.size)) < confidence).astype(np.float64)
    accuracy = _divide_where_positive(correct @ one_hot, count, math.nan)
    return _debiased_l2(np.broadcast_to(count, accuracy.shape), accuracy, np.broadcast_to(mean_conf, accuracy.shape))


def ece_consistency_p_value(labels: np.ndarray, prob: np.ndarray, bins: int = 10, resamples: int = 1000,
                            seed: int = 0, null: np.ndarray | None = None) -> float:
    """How often a perfectly calibrated model with these confidences measures a debiased ECE at
    least as large as this one: ``(1 + #{null >= observed}) / (1 + resamples)`` over
    :func:`ece_debiased_null` (a Monte Carlo p-value, never 0). Small: the miscalibration is real;
    large: the measured ECE is within what sampling alone produces on this many images. ``null``:
    that null distribution when the caller has drawn it already (``resamples`` and ``seed`` are
    then unused). ``nan`` for an empty input."""
    observed = ece_debiased(labels, prob, bins)
    if math.isnan(observed):
        return math.nan
    if null is None:
        null = ece_debiased_null(prob, bins, resamples, seed)
    return float((1 + np.count_nonzero(null >= observed)) / (1 + null.size))


# The image-level metrics every evaluation reports, in metrics.json's order: name -> a function of
# (labels, prob, pred, positive, bins), where pred is the argmax of prob. One entry here (and the
# metric's function above) is all a new image-level metric needs to reach metrics.json.
ClassificationMetric = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int], float]
CLASSIFICATION_METRICS: dict[str, ClassificationMetric] = {
    "acc": lambda labels, prob, pred, positive, bins: acc(labels, pred),
    "auc": lambda labels, prob, pred, positive, bins: auc(labels, prob, positive),
    "kappa": lambda labels, prob, pred, positive, bins: kappa(labels, pred),
    "sensitivity": lambda labels, prob, pred, positive, bins: sensitivity(labels, pred, positive),
    "specificity": lambda labels, prob, pred, positive, bins: specificity(labels, pred, positive),
    "f1": lambda labels, prob, pred, positive, bins: f1(labels, pred, positive, num_classes=prob.shape[1]),
    "ece": lambda labels, prob, pred, positive, bins: ece(labels, prob, bins),
    "nll": lambda labels, prob, pred, positive, bins: nll(labels, prob),
    "brier": lambda labels, prob, pred, positive, bins: brier(labels, prob),
    "ece_debiased": lambda labels, prob, pred, positive, bins: ece_debiased(labels, prob, bins),
    "ece_equal_mass": lambda labels, prob, pred, positive, bins: ece_equal_mass(labels, prob, bins),
}


def classification_metrics(labels: np.ndarray, prob: np.ndarray, positive: int, bins: int = 10,
                           names: Sequence[str] | None = None) -> dict[str, float]:
    """The image-level metrics ``names`` (all of :data:`CLASSIFICATION_METRICS` by default, in its
    order), keyed as in metrics.json without the ``cls/`` prefix; the predicted class is the argmax
    of ``prob``."""
    prob = _as_prob(prob)
    labels = np.asarray(labels)
    pred = predicted_class(prob)
    names = list(CLASSIFICATION_METRICS) if names is None else list(names)
    unknown = [name for name in names if name not in CLASSIFICATION_METRICS]
    if unknown:
        raise ValueError(f"unknown classification metrics {unknown}; known: {list(CLASSIFICATION_METRICS)}")
    return {name: CLASSIFICATION_METRICS[name](labels, prob, pred, positive, bins) for name in names}


# ------------------------------------------------------------------------- segmentation
def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice ``2|P ∩ G| / (|P| + |G|)`` of two binary masks; 1.0 when both are empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, gt).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    # Surface = the mask minus its erosion with the cross (face-connected) structuring element,
    # as MedPy does. border_value=0 makes pixels on the image border part of the surface.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances ``(pred -> gt, gt -> pred)``.

    For every surface pixel of one mask, the Euclidean distance to the nearest surface pixel of
    the other (from ``scipy.ndimage.distance_transform_edt``). ``None`` when either mask is empty
    (there is no surface to measure to); two empty masks give two empty arrays.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return np.zeros(0), np.zeros(0)
    if has_pred != has_gt:
        return None
    surface_pred, surface_gt = _surface(pred), _surface(gt)
    # EDT of the complement: each pixel's distance to the nearest surface pixel.
    to_gt = ndimage.distance_transform_edt(~surface_gt, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)
    return to_gt[surface_pred], to_pred[surface_gt]


def _symmetric_distance(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None,
                        combine: Callable[[np.ndarray, np.ndarray], float]) -> float:
    # The empty-mask conventions of the module docstring, shared by every surface-distance metric.
    dists = surface_distances(pred, gt, spacing)
    if dists is None:
        return math.nan
    a, b = dists
    if a.size == 0:
        return 0.0
    return float(combine(a, b))


def assd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance: the mean of the two directed mean surface distances.

    (MedPy's definition.) 0.0 when both masks are empty, ``nan`` when only one is.
    """
    return _symmetric_distance(pred, gt, spacing, lambda a, b: (a.mean() + b.mean()) / 2.0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance: the larger of the two directed 95th percentiles.

    0.0 when both masks are empty, ``nan`` when only one is.
    """
    return _symmetric_distance(pred, gt, spacing, lambda a, b: max(np.percentile(a, 95), np.percentile(b, 95)))


def structures(mask_classes: Sequence[str]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The evaluated structures of a label mask: name -> ``label mask -> binary mask``.

    Fundus masks (``background, disc, cup``: 1 is the disc rim, 2 the cup) give ``disc`` = rim ∪
    cup (``mask >= 1``) and ``cup`` (``mask == 2``), as REFUGE evaluates them. Any other mask
    layout gives one structure per foreground class (``mask == c``), named after the class.
    """
    if tuple(mask_classes) == FUNDUS_MASK_CLASSES:
        return {"disc": lambda m: m >= 1, "cup": lambda m: m == 2}
    return {name: (lambda m, c=c: m == c) for c, name in enumerate(mask_classes) if c > 0}


def contour_band(label_mask: np.ndarray, mask_classes: Sequence[str], width: float) -> np.ndarray:
    """The pixels near a structure's outline: bool (H, W), True within ``width`` pixels of the
    surface of any evaluated structure (:func:`structures`) of the label mask.

    The surface of a structure is its outermost pixels (those with a face neighbour outside it or
    on the image border, as the surface distances use). A pixel is in the band when its Euclidean
    distance to the nearest surface pixel of any structure is at most ``width`` (inclusive), on
    either side of the outline; ``width = 0`` gives the surfaces themselves. For fundus masks the
    band follows both the disc and the cup outline. A mask without any structure gives an
    all-False band.
    """
    label_mask = np.asarray(label_mask)
    if label_mask.ndim != 2:
        raise ValueError(f"a label mask must be 2-D (H, W), got shape {label_mask.shape}")
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    surface = np.zeros(label_mask.shape, dtype=bool)
    for select in structures(mask_classes).values():
        surface |= _surface(np.asarray(select(label_mask), dtype=bool))
    if not surface.any():
        return surface
    # EDT of the complement: each pixel's distance to the nearest surface pixel (0 on it).
    return ndimage.distance_transform_edt(~surface) <= width


def dice_per_image(pred_masks: np.ndarray, gt_masks: np.ndarray, mask_classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Structure name (:func:`structures`) -> the Dice of each image, for label-mask stacks (n, H, W)."""
    pred_masks, gt_masks = np.asarray(pred_masks), np.asarray(gt_masks)
    return {name: np.array([dice(p, g) for p, g in zip(select(pred_masks), select(gt_masks))], dtype=np.float64)
            for name, select in structures(mask_classes).items()}


def segmentation_per_image(pred_masks: np.ndarray, gt_masks: np.ndarray, mask_classes: Sequence[str],
                           distances: bool = True) -> dict[str, np.ndarray]:
    """The per-image segmentation metrics of label-mask stacks (n, H, W), keyed as in metrics.json
    without the ``seg/`` prefix: ``dice_<s>`` for every structure ``<s>``, then, with
    ``distances``, ``assd_<s>`` and ``hd95_<s>`` (``nan`` where exactly one mask is empty).

    One value per image, so that shares of a split computed apart (validation's ranks) are
    concatenated, not re-computed, before :func:`summarise_segmentation`."""
    result = {f"dice_{name}": values for name, values in dice_per_image(pred_masks, gt_masks, mask_classes).items()}
    if distances:
        pred_masks, gt_masks = np.asarray(pred_masks), np.asarray(gt_masks)
        for name, select in structures(mask_classes).items():
            pairs = list(zip(select(pred_masks), select(gt_masks)))
            result[f"assd_{name}"] = np.array([assd(p, g) for p, g in pairs], dtype=np.float64)
            result[f"hd95_{name}"] = np.array([hd95(p, g) for p, g in pairs], dtype=np.float64)
    return result


def summarise_segmentation(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-image values (:func:`segmentation_per_image`) averaged over the images: Dice means, and
    distance means over the images where they are defined, each structure's followed by
    ``dist_undefined_<s>`` (how many images were left out: exactly one mask empty)."""
    result = {key: float(np.mean(values)) for key, values in per_image.items() if key.startswith("dice_")}
    for key, values in per_image.items():
        if key.startswith("dice_"):
            continue
        defined = np.isfinite(values)
        result[key] = float(values[defined].mean()) if defined.any() else math.nan
        if key.startswith("hd95_"):
            result[f"dist_undefined_{key.removeprefix('hd95_')}"] = float((~defined).sum())
    return result


def segmentation_metrics(pred_masks: np.ndarray, gt_masks: np.ndarray, mask_classes: Sequence[str],
                         distances: bool = True) -> dict[str, float]:
    """:func:`summarise_segmentation` of :func:`segmentation_per_image`: the averaged metrics of
    one set of label masks, keyed as in metrics.json without the ``seg/`` prefix."""
    return summarise_segmentation(segmentation_per_image(pred_masks, gt_masks, mask_classes, distances))


def task_metrics(
    labels: np.ndarray,
    prob: np.ndarray | None,
    seg_per_image: dict[str, np.ndarray] | None,
    *,
    positive: int,
    bins: int = 10,
    classification: Sequence[str] | None = None,
    class_uncertainty: np.ndarray | None = None,
    pixel_uncertainty: np.ndarray | None = None,
) -> dict[str, float]:
    """The metrics of one set of predictions: the one path by which validation and evaluation
    compute them.

    - ``cls/<name>`` from :func:`classification_metrics` of ``prob`` (the names in
      ``classification``, all of :data:`CLASSIFICATION_METRICS` by default);
    - ``seg/<name>`` from :func:`summarise_segmentation` of ``seg_per_image``
      (:func:`segmentation_per_image`);
    - ``unc/mean_class_uncertainty`` and ``unc/mean_pixel_uncertainty``: the means of the
      per-image class uncertainty ``u`` and of the per-image mean pixel uncertainty ``U``.

    An input that is ``None`` (a model without that task or head) leaves its keys out."""
    result: dict[str, float] = {}
    if prob is not None:
        values = classification_metrics(labels, prob, positive, bins, classification)
        result.update({f"cls/{k}": v for k, v in values.items()})
    if seg_per_image is not None:
        result.update({f"seg/{k}": v for k, v in summarise_segmentation(seg_per_image).items()})
    if class_uncertainty is not None:
        result["unc/mean_class_uncertainty"] = float(np.mean(class_uncertainty))
    if pixel_uncertainty is not None:
        result["unc/mean_pixel_uncertainty"] = float(np.mean(pixel_uncertainty))
    return result


# ----------------------------------------------------------------------------- clinical
def vertical_cdr(mask: np.ndarray) -> float:
    """Vertical cup-to-disc ratio of a fundus label mask (0 background, 1 rim, 2 cup), measured on
    the optic disc.

    The disc is the largest 8-connected component of rim ∪ cup (``mask >= 1``; of equally large
    components, the one ``scipy.ndimage.label`` numbers first, i.e. the first in row-major order),
    and the cup is the cup pixels (``mask == 2``) inside it. A predicted mask can hold small
    spurious blobs elsewhere in the image; measuring every foreground pixel would stretch the
    extents to them.

    The vertical extent of a structure is the number of rows from its top-most to its
    bottom-most pixel (``max_row - min_row + 1``); vCDR = extent(cup) / extent(disc). 0.0 when
    there is a disc but no cup in it, ``nan`` without a disc. As the cup is part of the disc, the
    ratio is in [0, 1].
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a label mask must be 2-D (H, W), got shape {mask.shape}")

    def extent(binary: np.ndarray) -> int:
        rows = np.flatnonzero(binary.any(axis=1))
        return int(rows[-1] - rows[0] + 1) if rows.size else 0

    components, count = ndimage.label(mask >= 1, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return math.nan
    # argmax takes the first of equal sizes: the lowest label.
    disc = components == 1 + int(np.bincount(components.ravel())[1:].argmax())
    return extent(disc & (mask == 2)) / extent(disc)


def vcdr_mae(pred_vcdr: np.ndarray, gt_vcdr: np.ndarray) -> float:
    """Mean absolute vCDR error over the images where both values are defined (``nan`` if none)."""
    pred_vcdr, gt_vcdr = np.asarray(pred_vcdr, dtype=np.float64), np.asarray(gt_vcdr, dtype=np.float64)
    valid = np.isfinite(pred_vcdr) & np.isfinite(gt_vcdr)
    if not valid.any():
        return math.nan
    return float(np.abs(pred_vcdr[valid] - gt_vcdr[valid]).mean())


def vcdr_auc(labels: np.ndarray, pred_vcdr: np.ndarray, positive: int) -> float:
    """AUC of the predicted vCDR as a glaucoma score; images without a predicted disc are left out
    (``nan`` when that leaves a single class or none)."""
    labels, pred_vcdr = np.asarray(labels), np.asarray(pred_vcdr, dtype=np.float64)
    valid = np.isfinite(pred_vcdr)
    return auc(labels[valid], pred_vcdr[valid], positive)


# -------------------------------------------------------------------------- uncertainty
def error_auroc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """AUROC of uncertainty as a detector of errors (1 = every error is more uncertain than every hit).

    ``error`` is boolean (True = misclassified). ``nan`` when all or none are errors.
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64).ravel()
    error = np.asarray(error, dtype=bool).ravel()
    if error.all() or not error.any():
        return math.nan
    return float(roc_auc_score(error, uncertainty))


def noise_auroc(clean_uncertainty: np.ndarray, noisy_uncertainty: np.ndarray) -> float:
    """AUROC of uncertainty as a detector of corrupted inputs (1 = every corrupted copy is more
    uncertain than every clean image; 0.5 = uncertainty does not react to the noise).

    The two arrays are per-image uncertainties of the clean images and of their corrupted copies
    (any lengths; ``nan`` when either is empty).
    """
    clean = np.asarray(clean_uncertainty, dtype=np.float64).ravel()
    noisy = np.asarray(noisy_uncertainty, dtype=np.float64).ravel()
    if clean.size == 0 or noisy.size == 0:
        return math.nan
    is_noisy = np.concatenate([np.zeros(clean.size, bool), np.ones(noisy.size, bool)])
    return float(roc_auc_score(is_noisy, np.concatenate([clean, noisy])))


def sample_pixels(count: int, rng: np.random.Generator, where: np.ndarray | None = None,
                  **maps: np.ndarray) -> dict[str, np.ndarray]:
    """One image's pixels for the pixel-error AUROC (:func:`error_auroc` over pixels): the pixels
    of each of ``maps`` (same-shaped arrays, e.g. ``uncertainty=..., error=...``), restricted to
    the True pixels of ``where`` when given, or ``count`` positions of them drawn uniformly
    without replacement by ``rng`` when there are more; the same positions in every map, as flat
    arrays under the same names. roc_auc_score sorts its input, so a test split's pixels are
    sampled (:data:`PIXEL_AUROC_MAX_PIXELS` in all) rather than all ranked."""
    flat = {name: np.asarray(values).ravel() for name, values in maps.items()}
    sizes = {name: values.size for name, values in flat.items()}
    if len(set(sizes.values())) > 1 or (where is not None and np.asarray(where).size not in sizes.values()):
        raise ValueError(f"the maps' sizes differ: {sizes}" + (f", where {np.asarray(where).size}" if where is not None else ""))
    positions = np.flatnonzero(np.asarray(where, dtype=bool).ravel()) if where is not None else None
    total = positions.size if positions is not None else next(iter(sizes.values()), 0)
    keep = rng.choice(total, size=count, replace=False) if total > count else np.arange(total)
    if positions is not None:
        keep = positions[keep]
    return {name: values[keep] for name, values in flat.items()}


def referral_acc(correct: np.ndarray, uncertainty: np.ndarray, fraction: float) -> float:
    """Accuracy on the cases kept after referring the ``fraction`` most uncertain ones to a doctor.

    ``round(fraction * n)`` cases are referred (at least one case is always kept); ties in
    uncertainty are broken by position (stable sort), so the result is deterministic.
    """
    correct = np.asarray(correct, dtype=bool).ravel()
    uncertainty = np.asarray(uncertainty, dtype=np.float64).ravel()
    if correct.shape != uncertainty.shape:
        raise ValueError(f"correct and uncertainty sizes differ: {correct.size} vs {uncertainty.size}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = correct.size
    if n == 0:
        return math.nan
    kept = max(1, n - int(round(fraction * n)))
    order = np.argsort(uncertainty, kind="stable")
    return float(correct[order[:kept]].mean())


def referral_curve(correct: np.ndarray, uncertainty: np.ndarray, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """:func:`referral_acc` at each referred fraction: arrays ``fraction``, ``accuracy``, ``retained`` (count)."""
    n = np.asarray(correct).size
    fractions = np.asarray(list(fractions), dtype=np.float64)
    accuracy = np.array([referral_acc(correct, uncertainty, f) for f in fractions])
    retained = np.array([max(1, n - int(round(f * n))) if n else 0 for f in fractions], dtype=np.int64)
    return {"fraction": fractions, "accuracy": accuracy, "retained": retained}


# ------------------------------------------------------------------- selective prediction
# A selective classifier accepts a case when its uncertainty is at most a threshold t and refers
# it otherwise; sweeping t over the observed uncertainties traces the risk-coverage curve. Cases
# with equal uncertainty are accepted or referred together (one point of the curve per distinct
# value), so the curves do not depend on the order of the cases.
def _selective_inputs(uncertainty: np.ndarray, error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uncertainty = np.asarray(uncertainty, dtype=np.float64).ravel()
    error = np.asarray(error, dtype=bool).ravel()
    if uncertainty.shape != error.shape:
        raise ValueError(f"uncertainty and error sizes differ: {uncertainty.size} vs {error.size}")
    return uncertainty, error


def _tie_groups(uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, threshold)``: the ascending (stable) order of the cases, where each group
    of equal uncertainty starts in that order, and the group's uncertainty."""
    order = np.argsort(uncertainty, kind="stable")
    threshold, starts = np.unique(uncertainty[order], return_index=True)
    return order, starts, threshold


def risk_coverage_curve(uncertainty: np.ndarray, error: np.ndarray) -> dict[str, np.ndarray]:
    """The risk-coverage curve of uncertainty-based referral, one point per distinct uncertainty.

    At threshold ``t`` (the distinct values of ``uncertainty``, ascending) the cases with
    uncertainty ``<= t`` are accepted. Returns arrays ``threshold``, ``coverage`` (accepted / n),
    ``risk`` (errors among the accepted / accepted: the selective risk) and ``generalized_risk``
    (errors among the accepted / n: the share of all cases that are accepted and wrong). The last
    point accepts everything (coverage 1, risk = error rate). Empty arrays for an empty input.
    """
    uncertainty, error = _selective_inputs(uncertainty, error)
    n = uncertainty.size
    if n == 0:
        return {key: np.zeros(0) for key in ("threshold", "coverage", "risk", "generalized_risk")}
    order, starts, threshold = _tie_groups(uncertainty)
    accepted = np.append(starts[1:], n)  # cases accepted up to the end of each group
    errors = np.cumsum(error[order])[accepted - 1]
    return {"threshold": threshold, "coverage": accepted / n, "risk": errors / accepted, "generalized_risk": errors / n}


def aurc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Area under the risk-coverage curve (Geifman, Uziel & El-Yaniv, 2019, "Bias-Reduced
    Uncertainty Estimation for Deep Neural Classifiers"): lower is better.

    The step area ``sum_g (coverage_g - coverage_{g-1}) * risk_g`` over the points ``g`` of
    :func:`risk_coverage_curve` (``coverage_0 = 0``). Without ties it is the mean selective risk
    over the n coverages ``k / n``, ``(1/n) sum_k risk@k``; a tie group counts at the risk of
    accepting it whole. It mixes the ranking quality of the uncertainty with the error rate
    itself (see :func:`eaurc`). ``nan`` for an empty input.
    """
    curve = risk_coverage_curve(uncertainty, error)
    if curve["coverage"].size == 0:
        return math.nan
    return float(np.diff(curve["coverage"], prepend=0.0) @ curve["risk"])


def _optimal_aurc(correct: np.ndarray | float, n: np.ndarray | float) -> np.ndarray:
    """AURC of a perfect ranking (every correct case before every error) of ``n`` cases of which
    ``correct`` are right: ``(1/n) sum_{k=correct+1}^{n} (k - correct) / k``
    ``= (n - correct - correct * (H_n - H_correct)) / n`` with the harmonic numbers
    ``H_m = digamma(m + 1) + euler_gamma`` (elementwise; ``nan`` where ``n = 0``)."""
    correct, n = np.asarray(correct, dtype=np.float64), np.asarray(n, dtype=np.float64)
    harmonic_gap = special.digamma(n + 1.0) - special.digamma(correct + 1.0)
    return _divide_where_positive(n - correct - correct * harmonic_gap, n, math.nan)


def eaurc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Excess AURC: :func:`aurc` minus the AURC of a perfect ranking of the same errors (Geifman,
    Uziel & El-Yaniv, 2019), so that only the ranking, not the error rate, is measured.

    With ``n_c`` correct cases of ``n``, the perfect ranking accepts every correct case first:
    ``AURC* = (1/n) sum_{k=n_c+1}^{n} (k - n_c) / k``, the discrete form of
    ``r + (1 - r) ln(1 - r)`` for an error rate ``r``. 0 for a perfect ranking and when there are
    no errors (both areas are 0); ``nan`` for an empty input.
    """
    uncertainty, error = _selective_inputs(uncertainty, error)
    n = error.size
    if n == 0:
        return math.nan
    n_correct = n - int(error.sum())
    k = np.arange(n_correct + 1, n + 1, dtype=np.float64)
    return aurc(uncertainty, error) - float(((k - n_correct) / k).sum() / n)


def augrc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Area under the generalized risk-coverage curve (Traub et al., 2024, "Overcoming Common
    Flaws in the Evaluation of Selective Classification Systems"): lower is better.

    The step area ``sum_g (coverage_g - coverage_{g-1}) * generalized_risk_g`` over the points of
    :func:`risk_coverage_curve`: the average, over the coverages, of the share of all cases that
    are accepted and wrong (silent failures). Unlike :func:`aurc` it does not weight the few
    most confident cases heavily. ``nan`` for an empty input.
    """
    curve = risk_coverage_curve(uncertainty, error)
    if curve["coverage"].size == 0:
        return math.nan
    return float(np.diff(curve["coverage"], prepend=0.0) @ curve["generalized_risk"])


def coverage_at_risk(uncertainty: np.ndarray, error: np.ndarray, target: float) -> float:
    """The largest coverage of :func:`risk_coverage_curve` whose selective risk is at most
    ``target``: the most cases that can be accepted, at some threshold, with an error rate among
    them of at most ``target``. 0.0 when no threshold achieves it, ``nan`` for an empty input.
    """
    curve = risk_coverage_curve(uncertainty, error)
    if curve["coverage"].size == 0:
        return math.nan
    feasible = curve["risk"] <= target
    return float(curve["coverage"][feasible].max()) if feasible.any() else 0.0


# ---------------------------------------------------------------------------- bootstrap
# A statistic for bootstrap_ci: (resamples, n) counts -> (resamples,) values.
ResampledStatistic = Callable[[np.ndarray], np.ndarray]
# Resamples are drawn and evaluated in blocks of at most this many counts (memory stays ~32 MB).
_BOOTSTRAP_BLOCK = 1 << 22
# Counts the selective statistics handle at once (they keep several temporaries of that size).
_SELECTIVE_BLOCK = 1 << 20


def bootstrap_ci(
    statistic: ResampledStatistic, n: int, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of ``n`` items (images) resampled with replacement.

    ``samples`` resamples are drawn from ``numpy.random.default_rng(seed)`` as multinomial counts:
    ``statistic`` gets a float array ``counts`` of shape (resamples, n) whose row ``b`` says how
    often each item is in resample ``b`` (rows sum to ``n``), and returns one value per row (see
    the ``resampled_*`` functions). Equal ``n``, ``samples`` and ``seed`` give the same resamples,
    so intervals of different metrics of one evaluation are paired.

    The interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the
    resampled values. Resamples where the statistic is undefined (``nan``: an AUC of a resample
    without positives) are left out; ``(nan, nan)`` when fewer than half of them are defined.
    """
    if n < 1:
        raise ValueError(f"bootstrap needs at least one item, got n={n}")
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    blocks = ([_shared_resamples(n, samples, seed)] if samples <= _resample_block(n)
              else _resample_counts(n, samples, seed))
    values = [np.asarray(statistic(counts), dtype=np.float64).reshape(len(counts)) for counts in blocks]
    resampled = np.concatenate(values)
    defined = resampled[np.isfinite(resampled)]
    if defined.size < 0.5 * samples:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(defined, [tail, 100.0 - tail])
    return float(low), float(high)


def _resample_counts(n: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """The resamples of :func:`bootstrap_ci`: blocks of multinomial counts, each of at most
    ``_BOOTSTRAP_BLOCK`` floats."""
    rng = np.random.default_rng(seed)
    block = _resample_block(n)
    for start in range(0, samples, block):
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=min(block, samples - start)).astype(np.float64)


def _resample_block(n: int) -> int:
    return max(1, _BOOTSTRAP_BLOCK // n)


@lru_cache(maxsize=1)
def _shared_resamples(n: int, samples: int, seed: int) -> np.ndarray:
    """:func:`_resample_counts` when they fit one block, drawn once and kept read-only: an evaluation
    asks for the same ``(n, samples, seed)`` once per interval (33 of them: 1.3 s of drawing at
    n = 693)."""
    (counts,) = _resample_counts(n, samples, seed)
    counts.flags.writeable = False
    return counts


def _divide_where_positive(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """``num / den`` elementwise, ``empty`` where ``den`` is 0."""
    return np.divide(num, den, out=np.full(np.shape(num), empty, dtype=np.float64), where=den > 0)


def _macro_average(per_class: Sequence[ResampledStatistic]) -> ResampledStatistic:
    """The unweighted mean of per-class statistics, per resample (``nan`` if any class's is)."""
    return lambda counts: np.mean([stat(counts) for stat in per_class], axis=0)


def resampled_ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float = math.nan) -> ResampledStatistic:
    """``sum(counts * numerator) / sum(counts * denominator)`` per resample; ``empty`` where the
    denominator sums to 0.

    With per-image 0/1 indicators this is accuracy (correct / 1), sensitivity (TP / positive) or a
    per-image mean (value / 1, e.g. Dice).
    """
    numerator = np.asarray(numerator, dtype=np.float64).ravel()
    denominator = np.asarray(denominator, dtype=np.float64).ravel()
    if numerator.shape != denominator.shape:
        raise ValueError(f"numerator and denominator sizes differ: {numerator.size} vs {denominator.size}")

    def statistic(counts: np.ndarray) -> np.ndarray:
        return _divide_where_positive(counts @ numerator, counts @ denominator, empty)

    return statistic


def resampled_f1(labels: np.ndarray, pred: np.ndarray, positive: int, num_classes: int = 2) -> ResampledStatistic:
    """:func:`f1` per resample: ``2TP / (2TP + FP + FN)`` of the positive class (macro over all
    classes for K > 2), 0.0 where a class has neither labels nor predictions."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    classes = range(num_classes) if num_classes > 2 else [positive]
    per_class = []
    for k in classes:
        tp = (labels == k) & (pred == k)
        wrong = (labels == k) ^ (pred == k)  # a false positive or a false negative of class k
        per_class.append(resampled_ratio(2.0 * tp, 2.0 * tp + wrong, empty=0.0))
    return _macro_average(per_class)


def resampled_ece(labels: np.ndarray, prob: np.ndarray, bins: int = 10) -> ResampledStatistic:
    """:func:`ece` per resample: ``sum_b |sum_{i in b} (correct_i - confidence_i)| / n`` weighted by counts."""
    index, confidence, correct = _calibration_bins(labels, prob, bins)
    gap_per_bin = np.zeros((index.size, bins))
    gap_per_bin[np.arange(index.size), index] = correct - confidence

    def statistic(counts: np.ndarray) -> np.ndarray:
        return np.abs(counts @ gap_per_bin).sum(axis=1) / counts.sum(axis=1)

    return statistic


def resampled_nll(labels: np.ndarray, prob: np.ndarray) -> ResampledStatistic:
    """:func:`nll` per resample: the count-weighted mean of the per-image losses."""
    per_image = _true_class_nll(labels, prob)
    return resampled_ratio(per_image, np.ones_like(per_image))


def resampled_brier(labels: np.ndarray, prob: np.ndarray) -> ResampledStatistic:
    """:func:`brier` per resample: the count-weighted mean of the per-image squared errors."""
    per_image = _brier_per_image(labels, prob)
    return resampled_ratio(per_image, np.ones_like(per_image))


def resampled_ece_debiased(labels: np.ndarray, prob: np.ndarray, bins: int = 10) -> ResampledStatistic:
    """:func:`ece_debiased` per resample, on the equal-mass bins of the full sample.

    Bin membership is fixed once, from all images (re-binning every resample would add the bin
    edges' noise to the interval); in a resample, each image counts as often as it is drawn in
    its bin's count ``n_b``, accuracy and mean confidence, and ``n_b`` is what the variance
    correction divides by. With a row of ones this is :func:`ece_debiased` itself; in general it
    equals it on the resampled arrays only where those arrays' own equal-mass bins are the fixed
    ones (e.g. when every bin's images are drawn, in all, as often as the bin holds images).
    """
    index, confidence, correct = _equal_mass_bins(labels, prob, bins)
    member = np.zeros((index.size, bins))
    member[np.arange(index.size), index] = 1.0
    correct_in_bin, confidence_in_bin = member * correct[:, None], member * confidence[:, None]

    def statistic(counts: np.ndarray) -> np.ndarray:
        count = counts @ member
        accuracy = _divide_where_positive(counts @ correct_in_bin, count, math.nan)
        mean_conf = _divide_where_positive(counts @ confidence_in_bin, count, math.nan)
        return _debiased_l2(count, accuracy, mean_conf)

    return statistic


# (count-weighted tie-group sizes, accepted cases, accepted errors, cases) -> one value per resample
_SelectiveArea = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _resampled_selective(uncertainty: np.ndarray, error: np.ndarray, area: _SelectiveArea) -> ResampledStatistic:
    """A statistic of the risk-coverage curve per resample. The cases are sorted and grouped by
    uncertainty once; per resample, ``area(accepted_in_group, accepted, errors, total)`` gets the
    count-weighted size of every tie group, the cumulative accepted cases and errors at each
    group's threshold (resamples on the first axis, groups on the second) and each resample's
    number of cases. A group a resample does not draw adds no step to its curve."""
    uncertainty, error = _selective_inputs(uncertainty, error)
    order, starts, _ = _tie_groups(uncertainty)
    error_sorted = error[order].astype(np.float64)

    def rows(counts: np.ndarray) -> np.ndarray:
        drawn = counts[:, order]
        in_group = np.add.reduceat(drawn, starts, axis=1)
        errors = np.cumsum(np.add.reduceat(drawn * error_sorted, starts, axis=1), axis=1)
        return area(in_group, np.cumsum(in_group, axis=1), errors, counts.sum(axis=1))

    def statistic(counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.float64)
        if uncertainty.size == 0:
            return np.full(len(counts), math.nan)
        # About ten temporaries the size of the rows: a few rows at a time keep them to
        # _SELECTIVE_BLOCK floats each (235 MB at once for 1000 resamples of 5280 images).
        step = max(1, _SELECTIVE_BLOCK // counts.shape[1])
        return np.concatenate([rows(counts[first : first + step]) for first in range(0, len(counts), step)])

    return statistic


def resampled_aurc(uncertainty: np.ndarray, error: np.ndarray) -> ResampledStatistic:
    """:func:`aurc` per resample (``nan`` for a resample without cases)."""
    def area(in_group: np.ndarray, accepted: np.ndarray, errors: np.ndarray, total: np.ndarray) -> np.ndarray:
        risk = _divide_where_positive(errors, accepted, 0.0)  # 0 only where the step is 0 too
        return _divide_where_positive((in_group * risk).sum(axis=1), total, math.nan)

    return _resampled_selective(uncertainty, error, area)


def resampled_eaurc(uncertainty: np.ndarray, error: np.ndarray) -> ResampledStatistic:
    """:func:`eaurc` per resample: its AURC minus that of a perfect ranking of its own errors."""
    def area(in_group: np.ndarray, accepted: np.ndarray, errors: np.ndarray, total: np.ndarray) -> np.ndarray:
        risk = _divide_where_positive(errors, accepted, 0.0)
        observed = _divide_where_positive((in_group * risk).sum(axis=1), total, math.nan)
        return observed - _optimal_aurc(total - errors[:, -1], total)

    return _resampled_selective(uncertainty, error, area)


def resampled_augrc(uncertainty: np.ndarray, error: np.ndarray) -> ResampledStatistic:
    """:func:`augrc` per resample (``nan`` for a resample without cases)."""
    def area(in_group: np.ndarray, accepted: np.ndarray, errors: np.ndarray, total: np.ndarray) -> np.ndarray:
        return _divide_where_positive((in_group * errors).sum(axis=1), total**2, math.nan)

    return _resampled_selective(uncertainty, error, area)


class _OrderedPairColumns:
    """The Mann-Whitney count of an AUC split by groups, built a block of columns at a time:
    ``T[i, j]`` is the number of pairs (a positive element of group i, a negative element of group
    j) that the score orders right, ties counting one half. The whole table takes ``n_groups**2``
    floats (223 MB at 5280 groups); a block of ``columns`` of them takes ``n_groups * columns``."""

    def __init__(self, score: np.ndarray, positive: np.ndarray, group: np.ndarray, n_groups: int):
        if positive.sum() > (~positive).sum():
            # Loop over the smaller side: the roles swapped give the transposed table, and the AUC's
            # quadratic form c T c is the same for a table and its transpose.
            score, positive = -score, ~positive
        self.n_groups = n_groups
        # Sorted queries make searchsorted several times faster (each search starts where the last ended).
        pos_order = np.argsort(score[positive], kind="stable")
        self.pos_score, self.pos_group = score[positive][pos_order], group[positive][pos_order]
        neg_score, neg_group = score[~positive], group[~positive]
        order = np.lexsort((neg_score, neg_group))
        self.neg_score = neg_score[order]
        self.starts = np.searchsorted(neg_group[order], np.arange(n_groups + 1))

    def block(self, first: int, stop: int) -> np.ndarray:
        """Columns ``first:stop`` of the table, shape (n_groups, stop - first)."""
        columns = np.zeros((self.n_groups, stop - first))
        for j in range(first, stop):
            negatives = self.neg_score[self.starts[j] : self.starts[j + 1]]
            if negatives.size == 0:
                continue
            below = np.searchsorted(negatives, self.pos_score, side="left")
            tied = np.searchsorted(negatives, self.pos_score, side="right") - below
            columns[:, j - first] = np.bincount(self.pos_group, weights=below + 0.5 * tied, minlength=self.n_groups)
        return columns


def resampled_auc(
    score: np.ndarray, positive: np.ndarray, group: np.ndarray | None = None, n_groups: int | None = None
) -> ResampledStatistic:
    """The binary ROC AUC of ``score`` for ``positive`` per resample (``nan`` without both classes).

    Without ``group`` every element is an item of the bootstrap (an image). With ``group`` (the
    item index of each element, e.g. the image of each sampled pixel, ``n_groups`` items) whole
    items are resampled and their elements pooled, as the pixel-level AUROC needs. Elements with a
    ``nan`` score are left out (as :func:`vcdr_auc` does). Exact: each resample's count of ordered
    pairs is a quadratic form of its counts in a table of ordered pairs between items. The table
    is built a block of columns at a time in every call (memory about ``_BOOTSTRAP_BLOCK`` floats,
    whatever ``n_groups``), so :func:`bootstrap_ci` builds it once per block of resamples: once
    up to 4194 items at 1000 resamples.
    """
    score = np.asarray(score, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    if score.shape != positive.shape:
        raise ValueError(f"score and positive sizes differ: {score.size} vs {positive.size}")
    if group is None:
        group, n_groups = np.arange(score.size), score.size
    else:
        group = np.asarray(group, dtype=np.int64).ravel()
        if group.shape != score.shape:
            raise ValueError(f"score and group sizes differ: {score.size} vs {group.size}")
        n_groups = int(group.max(initial=-1)) + 1 if n_groups is None else n_groups
    valid = np.isfinite(score)
    score, positive, group = score[valid], positive[valid], group[valid]
    pairs = _OrderedPairColumns(score, positive, group, n_groups)
    positives = np.bincount(group[positive], minlength=n_groups).astype(np.float64)
    negatives = np.bincount(group[~positive], minlength=n_groups).astype(np.float64)
    width = max(1, _BOOTSTRAP_BLOCK // max(n_groups, 1))

    def statistic(counts: np.ndarray) -> np.ndarray:
        ordered = np.zeros(len(counts))
        for first in range(0, n_groups, width):
            stop = min(first + width, n_groups)
            ordered += ((counts @ pairs.block(first, stop)) * counts[:, first:stop]).sum(axis=1)
        return _divide_where_positive(ordered, (counts @ positives) * (counts @ negatives), math.nan)

    return statistic


def resampled_class_auc(labels: np.ndarray, prob: np.ndarray, positive: int) -> ResampledStatistic:
    """:func:`auc` per resample: of ``prob[:, positive]`` for K = 2, the one-vs-rest macro AUC for
    K > 2 (``nan`` when a resample lacks a class, as there)."""
    prob, labels = _as_prob(prob), np.asarray(labels)
    classes = range(prob.shape[1]) if prob.shape[1] > 2 else [positive]
    per_class = [resampled_auc(prob[:, k], labels == k) for k in classes]
    return _macro_average(per_class)
