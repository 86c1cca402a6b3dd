"""Post-hoc calibration and referral: what the ``calibrate`` stage fits on the calibration split,
and the rules the deployment applies with it.

Everything here is fitted on the store's ``calib`` split, which no other stage reads, so the
guarantees below hold for new images drawn like that split (exchangeable with it):

- **Temperatures** (:func:`fit_temperature`). The class output is ``softmax(log_score / T)``
  with ``log_score = log alpha`` (a tempered Dirichlet, ``alpha ** (1 / T)``) or the logits of a
  softmax head; the segmentation output is ``softmax(S_0 / T)``. Each ``T`` minimises the negative
  log-likelihood on the calibration split (Guo et al. 2017, "On Calibration of Modern Neural
  Networks"). Dividing by ``T > 0`` keeps every argmax and, for two classes, the order of the
  positive-class probability, so accuracy, F1, Dice and AUC are unchanged.
- **Class power** (:func:`fit_power_temperature`, ``calibrate.class_power``). One temperature
  stretches every log-evidence ratio by the same factor; on the synthetic set that left a
  calibration error of 0.035-0.05 on fresh images in two of five seeds even at the temperature
  fitted on those images, a shape one factor cannot fix (confident cases underconfident,
  uncertain ones overconfident). The class output is then ``softmax(power_map(log_score, c) /
  T)``: the log-scores centred on their mean over the classes, each raised to the power ``c``
  with its sign kept. ``c = 1`` is the plain temperature. The map is odd and strictly increasing,
  so it keeps every argmax and, for two classes, the order of the positive-class probability;
  ``T`` and ``c`` together minimise the calibration split's NLL, starting from the temperature's
  fit, so that NLL is never above the temperature's.
- **Error map** (:class:`ErrorMapFit`): the delivered mask's error map is the entropy of its
  calibrated probability, smoothed by a Gaussian; the calibrate stage picks the width from a fixed
  grid by the pixel-error AUROC on the calibration split (0: no smoothing).
- **Referral** (:func:`fit_referral_rule`): accept a case when its calibrated class uncertainty
  (``1 - max p``, the estimated probability of an error) is at most a threshold ``lambda``; refer
  it to a human otherwise. ``lambda`` is chosen by Learn-then-Test (Angelopoulos, Bates, Candès,
  Jordan & Lei 2021, "Learn then Test: Calibrating Predictive Algorithms to Achieve Risk
  Control"): for each ``lambda`` of a fixed grid, the null hypothesis "the error rate among
  accepted cases exceeds ``epsilon``" has the exact binomial p-value ``P(Binomial(n_lambda,
  epsilon) <= k_lambda)`` (``k_lambda`` errors among the ``n_lambda`` accepted calibration
  cases); the hypotheses are tested in one fixed sequence at level ``delta``, from ``lambda =
  epsilon`` upwards, stopping at the first one not rejected. The order is fixed before the data
  is seen, so the family-wise error is at most ``delta``: with probability at least ``1 - delta``
  over the draw of the calibration split, the chosen threshold's error rate among accepted cases
  is at most ``epsilon``. The sequence starts at ``epsilon`` because a calibrated score accepts
  there the cases whose estimated error probability is at most ``epsilon``: their error rate is
  well below it and they are numerous enough for the test to have power (a smaller threshold
  accepts too few cases to certify anything). When even that first threshold cannot be certified,
  every case is referred.
- **Unusual images** (:func:`fit_unusual_rule`): the :mod:`uml.quality` statistics of an image
  (and, with a segmentation head, the mean uncertainty of its delivered mask), each standardised
  by the median and the scaled median absolute deviation of the validation split, give the
  score ``max_j |z_j|``. The threshold is the split-conformal quantile of that score on the
  calibration split (Vovk et al. 2005; Angelopoulos & Bates 2021, "A Gentle Introduction to
  Conformal Prediction"): an image exchangeable with the calibration images is flagged with
  probability at most ``alpha``. Noise, a grayscale or blank picture or an image the model finds
  confusing lies far outside.
- **vCDR interval** (:func:`fit_vcdr_interval`): split conformal on the absolute error of the
  predicted vertical cup-to-disc ratio, per predicted class (Mondrian conformal, Vovk et al.
  2005): ``vCDR +- q_c``, with ``q_c`` the conformal quantile of the errors of the calibration
  images the classifier assigns to class ``c``, covers the true vCDR with probability at least the
  chosen coverage among the images assigned to ``c``. Glaucomatous discs are measured with larger
  errors than healthy ones, and one quantile for all would cover them less often. Per true class
  the coverage can still differ, which evaluate reports.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import optimize, special, stats

CALIBRATION_FORMAT = "uml-calibration/1"
# The referral threshold is searched on this grid of calibrated error probabilities.
REFERRAL_GRID_STEP = 0.005
# |z| needs a positive scale even when a statistic does not vary on the reference images.
_MIN_SCALE = 1e-6
# 1.4826 * MAD estimates the standard deviation of normally distributed values.
_MAD_TO_SD = 1.4826
# The temperature is searched in [1/20, 20] (T = 1 / beta; the NLL is convex in beta). Outside,
# the float32 outputs would lose the order they must keep: at T = 1000 (a class head no better than
# chance flattened to 0.5) probabilities of different images round to the same float32 value, at
# T = 0.01 confident ones round to 1. A fit at a bound means the head carries almost no
# information, or is wildly overconfident; the stage logs it.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# The class power is searched in this range: beyond it the map would all but binarise the
# probabilities (a large power) or flatten them (a small one).
POWER_BOUNDS = (0.25, 4.0)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TemperatureFit(_Part):
    """A fitted temperature and the calibration split's mean negative log-likelihood before
    (``T = 1``) and after."""

    temperature: float = Field(gt=0.0)
    # The exponent of the centred log-scores before the temperature (1: the plain temperature);
    # see the module docstring.
    power: float = Field(1.0, gt=0.0)

    @property
    def at_bound(self) -> bool:
        """Whether the fit stopped at a bound of :data:`TEMPERATURE_BOUNDS`."""
        return any(math.isclose(self.temperature, bound, rel_tol=1e-3) for bound in TEMPERATURE_BOUNDS)
    nll_before: float
    nll_after: float
    samples: int = Field(ge=1, description="images (class) or pixels (segmentation) it was fitted on")


class ErrorMapFit(_Part):
    """The smoothing of the delivered mask's error map: the Gaussian width, in pixels, that ranked
    the calibration split's wrong pixels best, and each width's pixel-error AUROC there."""

    sigma: float = Field(ge=0.0)
    auroc_by_sigma: dict[str, float]
    pixels: int = Field(ge=1, description="calibration pixels the AUROCs were measured on")


class ReferralRule(_Part):
    """Accept a case when ``class_uncertainty <= threshold``; ``threshold`` None: refer every case."""

    score: Literal["class_uncertainty"] = "class_uncertainty"
    threshold: float | None
    risk: float = Field(gt=0.0, lt=1.0, description="epsilon: the promised largest error rate among accepted cases")
    delta: float = Field(gt=0.0, lt=1.0, description="the promise fails with probability at most delta")
    method: str = "Learn-then-Test: exact binomial p-values, one fixed sequence of thresholds from epsilon upwards at level delta"
    calibration_images: int
    calibration_coverage: float
    calibration_risk: float | None

    def accept(self, class_uncertainty: np.ndarray) -> np.ndarray:
        """Which cases the rule accepts (True) rather than refers."""
        uncertainty = np.asarray(class_uncertainty, dtype=np.float64)
        if self.threshold is None:
            return np.zeros(uncertainty.shape, dtype=bool)
        return uncertainty <= self.threshold


class UnusualRule(_Part):
    """Flag an image whose standardised statistics lie beyond the calibration split's conformal
    quantile of ``max_j |z_j|``."""

    statistics: list[str]
    center: list[float]
    scale: list[float]
    threshold: float | None = Field(description="None: the calibration split is too small to flag at this alpha")
    alpha: float = Field(gt=0.0, lt=1.0)
    reference_split: str = "val"
    threshold_split: str = "calib"
    calibration_images: int

    def z_scores(self, features: np.ndarray) -> np.ndarray:
        """(n, F) features in :attr:`statistics` order -> (n, F) standardised values."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.statistics):
            raise ValueError(f"expected (n, {len(self.statistics)}) features {self.statistics}, got shape {features.shape}")
        return (features - np.asarray(self.center)) / np.asarray(self.scale)

    def score(self, features: np.ndarray) -> np.ndarray:
        """``max_j |z_j|`` per image: how far the most unusual statistic lies from the reference."""
        return np.abs(self.z_scores(features)).max(axis=1)

    def flag(self, features: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            return np.zeros(len(features), dtype=bool)
        return self.score(features) > self.threshold

    def reason(self, features: np.ndarray) -> str:
        """Which statistics make one flagged image (features (F,)) unusual, in words: every one
        beyond the threshold, furthest first."""
        z = self.z_scores(np.asarray(features, dtype=np.float64)[None])[0]
        beyond = [j for j in np.argsort(-np.abs(z)) if abs(z[j]) > self.threshold] or [int(np.abs(z).argmax())]
        parts = [f"{self.statistics[j]} {features[j]:.3g} lies {abs(z[j]):.1f} robust standard deviations "
                 f"{'above' if z[j] > 0 else 'below'} the calibration images'" for j in beyond]
        return f"unusual image: {'; '.join(parts)} (threshold {self.threshold:.1f})"


class VcdrInterval(_Part):
    coverage: float = Field(gt=0.0, lt=1.0)
    halfwidth: float | None = Field(description="over all calibration images; None: too few for this coverage")
    by_class: dict[str, float | None] = Field(
        default_factory=dict, description="per predicted class (used when the image's class is here); None: too few")
    calibration_images: int

    def halfwidth_for(self, predicted_class: str | None = None) -> float | None:
        """The half-width for an image the classifier assigns to ``predicted_class`` (the one fitted
        on all calibration images for a model without a classifier)."""
        if predicted_class is not None and predicted_class in self.by_class:
            return self.by_class[predicted_class]
        return self.halfwidth

    def interval(self, vcdr: float, predicted_class: str | None = None) -> tuple[float, float] | None:
        half = self.halfwidth_for(predicted_class)
        if half is None or not math.isfinite(vcdr):
            return None
        return max(0.0, vcdr - half), min(1.0, vcdr + half)


class Calibration(_Part):
    """The content of ``data/models/calibration.json``, which the export copies into ``metadata.json``."""

    format: Literal["uml-calibration/1"] = CALIBRATION_FORMAT
    split: str = "calib"
    num_images: int
    model_sha256: str = Field(description="the model.pt these values were fitted for")
    class_temperature: TemperatureFit | None = None
    seg_temperature: TemperatureFit | None = None
    seg_error_map: ErrorMapFit | None = None
    referral: ReferralRule | None = None
    unusual: UnusualRule
    vcdr_interval: VcdrInterval | None = None
    min_image_side: int = Field(ge=1, description="shorter sides below this are refused (too small to hold a fundus)")

    @property
    def deployment_settings(self) -> tuple[float, float, float, float]:
        """The post-hoc settings in the positional order of
        :func:`uml.models.uml_net.deployment_outputs`: class temperature, segmentation temperature,
        error-map width, class power (the identity where nothing was fitted)."""
        return deployment_settings(self.class_temperature, self.seg_temperature, self.seg_error_map)


def deployment_settings(class_fit: TemperatureFit | None, seg_fit: TemperatureFit | None,
                        error_map: ErrorMapFit | None) -> tuple[float, float, float, float]:
    """See :attr:`Calibration.deployment_settings`."""
    return (class_fit.temperature if class_fit else 1.0, seg_fit.temperature if seg_fit else 1.0,
            error_map.sigma if error_map else 0.0, class_fit.power if class_fit else 1.0)


# ---------------------------------------------------------------------------- temperature
def power_map(log_scores: np.ndarray, power: float) -> np.ndarray:
    """(n, K) log-scores centred on their mean over the classes, each raised to ``power`` with its
    sign kept; ``power == 1`` returns them as they are (the softmax ignores the centring). The
    torch twin in the exported graph is :func:`uml.models.uml_net.class_power_map`."""
    log_scores = np.asarray(log_scores, dtype=np.float64)
    if power == 1.0:
        return log_scores
    centred = log_scores - log_scores.mean(axis=1, keepdims=True)
    return np.sign(centred) * np.abs(centred) ** power


def mean_nll(log_scores: np.ndarray, labels: np.ndarray, beta: float = 1.0, power: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(beta * power_map(log_scores, power))`` ((n, K)
    scores, (n,) labels)."""
    scaled = beta * power_map(log_scores, power)
    picked = np.take_along_axis(scaled, np.asarray(labels, dtype=np.int64)[:, None], axis=1)[:, 0]
    return float(np.mean(special.logsumexp(scaled, axis=1) - picked))


def fit_temperature(log_scores: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """The temperature ``T`` minimising the NLL of ``softmax(log_scores / T)``.

    The NLL is convex in ``beta = 1 / T`` (a log-sum-exp of linear functions minus a linear one),
    so a bounded scalar search on ``log beta`` finds its minimum."""
    log_scores = np.asarray(log_scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if log_scores.ndim != 2 or len(labels) != len(log_scores) or len(labels) == 0:
        raise ValueError(f"expected (n, K) scores and (n,) labels with n > 0, got {log_scores.shape} and {labels.shape}")
    low, high = TEMPERATURE_BOUNDS
    found = optimize.minimize_scalar(lambda log_beta: mean_nll(log_scores, labels, math.exp(log_beta)),
                                     bounds=(math.log(1.0 / high), math.log(1.0 / low)), method="bounded",
                                     options={"xatol": 1e-5})
    beta = math.exp(found.x)
    return TemperatureFit(temperature=1.0 / beta, nll_before=mean_nll(log_scores, labels),
                          nll_after=mean_nll(log_scores, labels, beta), samples=len(labels))


def fit_power_temperature(log_scores: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """The temperature ``T`` and power ``c`` minimising the NLL of ``softmax(power_map(log_scores,
    c) / T)``: a bounded quasi-Newton search over ``(log beta, log c)`` that starts at
    :func:`fit_temperature`'s optimum with ``c = 1``, keeping that fit when the search does not
    improve on it. ``c`` stays within :data:`POWER_BOUNDS`."""
    start = fit_temperature(log_scores, labels)
    log_scores = np.asarray(log_scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    low, high = TEMPERATURE_BOUNDS
    found = optimize.minimize(lambda x: mean_nll(log_scores, labels, math.exp(x[0]), math.exp(x[1])),
                              x0=[math.log(1.0 / start.temperature), 0.0], method="L-BFGS-B",
                              bounds=[(math.log(1.0 / high), math.log(1.0 / low)),
                                      (math.log(POWER_BOUNDS[0]), math.log(POWER_BOUNDS[1]))])
    if not found.fun < start.nll_after:
        return start
    beta, power = math.exp(found.x[0]), math.exp(found.x[1])
    return TemperatureFit(temperature=1.0 / beta, power=power, nll_before=start.nll_before,
                          nll_after=mean_nll(log_scores, labels, beta, power), samples=len(labels))


# ------------------------------------------------------------------------------- referral
def referral_grid(num_classes: int, step: float = REFERRAL_GRID_STEP) -> np.ndarray:
    """The thresholds tried, fixed before any data is seen: ``step, 2 step, ...`` up to the
    largest possible ``1 - max p``, ``1 - 1 / K``."""
    top = 1.0 - 1.0 / num_classes
    return np.round(np.arange(1, math.floor(top / step + 1e-9) + 1) * step, 10)


def binomial_p_value(errors: int, accepted: int, risk: float) -> float:
    """P-value of "error rate among accepted cases > risk" given ``errors`` of ``accepted``:
    ``P(Binomial(accepted, risk) <= errors)`` (1.0 when nothing is accepted)."""
    if accepted == 0:
        return 1.0
    return float(stats.binom.cdf(errors, accepted, risk))


def fit_referral_rule(uncertainty: np.ndarray, error: np.ndarray, num_classes: int, risk: float,
                      delta: float) -> ReferralRule:
    """Learn-then-Test threshold on the calibrated class uncertainty (see the module docstring)."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64).ravel()
    error = np.asarray(error, dtype=bool).ravel()
    if uncertainty.shape != error.shape or uncertainty.size == 0:
        raise ValueError(f"uncertainty and error must be equal-length and non-empty, got {uncertainty.size} and {error.size}")
    grid = referral_grid(num_classes)
    start = int(np.searchsorted(grid, risk + 1e-12, side="right")) - 1  # the largest grid point <= risk
    start = min(max(start, 0), len(grid) - 1)

    threshold = None
    for lam in grid[start:]:
        accepted = uncertainty <= lam
        if binomial_p_value(int(error[accepted].sum()), int(accepted.sum()), risk) > delta:
            break
        threshold = float(lam)
    accepted = uncertainty <= threshold if threshold is not None else np.zeros(uncertainty.shape, dtype=bool)
    return ReferralRule(threshold=threshold, risk=risk, delta=delta, calibration_images=int(uncertainty.size),
                        calibration_coverage=float(accepted.mean()),
                        calibration_risk=float(error[accepted].mean()) if accepted.any() else None)


# -------------------------------------------------------------------------------- conformal
def conformal_quantile(scores: np.ndarray, coverage: float) -> float | None:
    """The split-conformal quantile: the ``ceil((n + 1) coverage)``-th smallest of ``n`` scores, so
    that a new exchangeable score is at most it with probability at least ``coverage``. None when
    ``n`` is too small for that coverage (the rank would exceed ``n``)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    scores = scores[np.isfinite(scores)]
    rank = math.ceil((scores.size + 1) * coverage)
    if scores.size == 0 or rank > scores.size:
        return None
    return float(scores[rank - 1])


def fit_unusual_rule(reference: np.ndarray, calibration: np.ndarray, names: list[str], alpha: float) -> UnusualRule:
    """Standardise by the ``reference`` images' (n_r, F) median and scaled MAD; threshold at the
    conformal ``1 - alpha`` quantile of the ``calibration`` images' (n_c, F) scores."""
    reference = np.asarray(reference, dtype=np.float64)
    center = np.median(reference, axis=0)
    scale = np.maximum(_MAD_TO_SD * np.median(np.abs(reference - center), axis=0), _MIN_SCALE)
    rule = UnusualRule(statistics=list(names), center=center.tolist(), scale=scale.tolist(), threshold=None, alpha=alpha,
                       calibration_images=len(calibration))
    rule.threshold = conformal_quantile(rule.score(calibration), 1.0 - alpha)
    return rule


def fit_vcdr_interval(predicted: np.ndarray, truth: np.ndarray, coverage: float,
                      predicted_class: np.ndarray | None = None) -> VcdrInterval:
    """Split-conformal half-widths of ``|predicted - truth|`` over the images where both are
    defined: over all of them, and per predicted class name (``predicted_class``, one per image)."""
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    residual = np.abs(predicted - truth)
    defined = np.isfinite(residual)
    by_class = {}
    if predicted_class is not None:
        predicted_class = np.asarray(predicted_class)
        by_class = {str(name): conformal_quantile(residual[defined & (predicted_class == name)], coverage)
                    for name in np.unique(predicted_class)}
    return VcdrInterval(coverage=coverage, halfwidth=conformal_quantile(residual[defined], coverage), by_class=by_class,
                        calibration_images=int(defined.sum()))
