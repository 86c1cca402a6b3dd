"""uml.calibration: temperatures, the Learn-then-Test referral threshold, conformal quantiles and
the unusual-image rule, against analytic values, hand counts and simulations with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from uml.calibration import (
    TEMPERATURE_BOUNDS,
    binomial_p_value,
    conformal_quantile,
    fit_power_temperature,
    fit_referral_rule,
    fit_temperature,
    fit_unusual_rule,
    fit_vcdr_interval,
    mean_nll,
    referral_grid,
)


def test_the_temperature_has_the_analytic_optimum():
    """Two classes, scores +-c for the predicted class, a share a of them right: the NLL of
    sigmoid(beta * c) is smallest where sigmoid(beta * c) = a, so T = c / logit(a)."""
    c, right, wrong = 2.0, 90, 10
    scores = np.array([[c, -c]] * (right + wrong)) / 2.0  # log-scores whose difference is c
    labels = np.array([0] * right + [1] * wrong)
    fit = fit_temperature(scores, labels)
    assert fit.temperature == pytest.approx(c / logit(0.9), rel=1e-4)
    assert fit.nll_after == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), rel=1e-6)
    assert fit.nll_before == pytest.approx(-(0.9 * math.log(expit(c)) + 0.1 * math.log(expit(-c))), rel=1e-9)
    assert fit.samples == 100 and not fit.at_bound


def test_the_temperature_is_found_from_simulated_labels_and_keeps_the_order():
    rng = np.random.default_rng(3)
    scores = rng.normal(0.0, 3.0, (20000, 2))
    # Labels drawn from softmax(scores / 2): the model is overconfident by a factor 2.
    labels = (rng.random(20000) < expit((scores[:, 1] - scores[:, 0]) / 2.0)).astype(int)
    fit = fit_temperature(scores, labels)
    assert fit.temperature == pytest.approx(2.0, rel=0.05) and fit.nll_after < fit.nll_before
    tempered = np.exp(scores / fit.temperature)
    tempered /= tempered.sum(axis=1, keepdims=True)
    raw = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert roc_auc_score(labels, tempered[:, 1]) == roc_auc_score(labels, raw[:, 1])
    assert np.array_equal(tempered.argmax(1), raw.argmax(1))
    assert mean_nll(scores, labels, 1.0 / fit.temperature) == pytest.approx(fit.nll_after)


def test_the_class_power_is_found_from_simulated_labels_and_keeps_the_order():
    # Labels drawn from p1 = sigmoid(2 (|z| / 2)^1.5 sign(z) / 0.8), z the log-score difference: the
    # centred scores are -z/2 and z/2, so power 1.5 and temperature 0.8 are the truth, a shape no
    # single temperature matches.
    rng = np.random.default_rng(5)
    z = rng.normal(0.0, 2.0, 40000)
    scores = np.stack([np.zeros_like(z), z], axis=1)
    truth = expit(2.0 * np.sign(z) * (np.abs(z) / 2.0) ** 1.5 / 0.8)
    labels = (rng.random(z.size) < truth).astype(int)
    fit = fit_power_temperature(scores, labels)
    assert fit.power == pytest.approx(1.5, rel=0.05) and fit.temperature == pytest.approx(0.8, rel=0.05)
    plain = fit_temperature(scores, labels)
    assert fit.nll_after < plain.nll_after < plain.nll_before == fit.nll_before
    # The fitted probability against the true one, and the order of the raw scores kept.
    mapped = 2.0 * np.sign(z) * (np.abs(z) / 2.0) ** fit.power / fit.temperature
    assert np.abs(expit(mapped) - truth).max() < 0.02
    assert roc_auc_score(labels, expit(mapped)) == roc_auc_score(labels, z)
    assert mean_nll(scores, labels, 1.0 / fit.temperature, fit.power) == pytest.approx(fit.nll_after)


def test_the_class_power_stays_near_one_when_a_temperature_is_the_truth():
    rng = np.random.default_rng(6)
    scores = rng.normal(0.0, 3.0, (20000, 2))
    labels = (rng.random(20000) < expit((scores[:, 1] - scores[:, 0]) / 2.0)).astype(int)
    fit, plain = fit_power_temperature(scores, labels), fit_temperature(scores, labels)
    assert fit.power == pytest.approx(1.0, abs=0.05) and fit.temperature == pytest.approx(2.0, rel=0.05)
    assert fit.nll_after <= plain.nll_after


def test_a_head_without_information_stops_at_the_bound():
    scores = np.array([[0.1, -0.1], [0.1, -0.1]])
    fit = fit_temperature(scores, np.array([0, 1]))  # half right: flatter is always better
    assert fit.temperature == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-3) and fit.at_bound


def test_the_referral_threshold_by_hand():
    """100 cases at uncertainty 0.01 without errors, 100 at 0.2 with 50: from lambda = 0.1 up, every
    threshold below 0.2 accepts the 100 clean cases (p = 0.9^100 = 2.7e-5 <= 0.1); 0.2 accepts all
    200 with 50 errors (p ~ 1): the last certified threshold is 0.195."""
    uncertainty = np.array([0.01] * 100 + [0.2] * 100)
    error = np.array([False] * 100 + [True] * 50 + [False] * 50)
    rule = fit_referral_rule(uncertainty, error, num_classes=2, risk=0.1, delta=0.1)
    assert rule.threshold == pytest.approx(0.195)
    assert rule.calibration_coverage == 0.5 and rule.calibration_risk == 0.0
    assert binomial_p_value(0, 100, 0.1) == pytest.approx(0.9**100)
    assert binomial_p_value(5, 0, 0.1) == 1.0
    assert list(rule.accept(np.array([0.195, 0.196]))) == [True, False]
    # Too few clean cases to certify anything: 10 at 0.01 give p = 0.9^10 = 0.35 > 0.1.
    rule = fit_referral_rule(uncertainty[90:], error[90:], num_classes=2, risk=0.1, delta=0.1)
    assert rule.threshold is None and rule.calibration_coverage == 0.0 and not rule.accept(np.array([0.0]))[0]
    assert referral_grid(2)[[0, -1]].tolist() == [0.005, 0.5] and len(referral_grid(3)) == 133


def test_the_referral_promise_holds_in_simulation():
    """Calibrated scores (a case with uncertainty s is wrong with probability s): over 300 draws of a
    350-case calibration set, the true error rate among accepted cases exceeds epsilon in at most a
    delta share of the draws (here: seldom, the procedure is conservative)."""
    rng = np.random.default_rng(11)
    risk, delta = 0.1, 0.1
    population = rng.beta(1.0, 4.0, 200_000) * 0.5  # uncertainties in [0, 0.5]
    violations, coverages = 0, []
    for _ in range(300):
        s = rng.choice(population, 350)
        rule = fit_referral_rule(s, rng.random(350) < s, num_classes=2, risk=risk, delta=delta)
        if rule.threshold is None:
            continue
        accepted = population <= rule.threshold
        violations += population[accepted].mean() > risk  # the true risk: the mean error probability
        coverages.append(accepted.mean())
    assert violations <= delta * 300
    assert np.mean(coverages) > 0.5  # and it still accepts most cases


def test_conformal_quantiles():
    scores = np.arange(1.0, 11.0)
    assert conformal_quantile(scores, 0.9) == 10.0  # rank ceil(11 * 0.9) = 10
    assert conformal_quantile(scores, 0.5) == 6.0  # rank ceil(5.5) = 6
    assert conformal_quantile(scores, 0.95) is None  # rank 11 > 10 scores
    assert conformal_quantile(np.array([np.nan, 1.0, 2.0]), 0.5) == 2.0  # nan left out: rank ceil(1.5) = 2


def test_the_unusual_rule_standardises_by_the_reference_and_flags_at_most_alpha():
    reference = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0], [5.0, 10.0]])
    rule = fit_unusual_rule(reference, reference, ["a", "b"], alpha=0.5)
    # Median 3, MAD 1 -> scale 1.4826; the second statistic does not vary: the smallest scale.
    assert rule.center == [3.0, 10.0] and rule.scale == pytest.approx([1.4826, 1e-6])
    assert rule.score(np.array([[3.0 + 2 * 1.4826, 10.0]]))[0] == pytest.approx(2.0)
    assert rule.reason(np.array([3.0, 10.1])).startswith("unusual image: b 10.1 lies 100000.0 robust standard deviations above")
    # Every statistic beyond the threshold is named, furthest first.
    assert rule.reason(np.array([-2.0, 9.9])) == (
        "unusual image: b 9.9 lies 100000.0 robust standard deviations below the calibration images'; "
        f"a -2 lies {5 / 1.4826:.1f} robust standard deviations below the calibration images' (threshold 0.7)")
    # |z| of the five: 2/1.48, 1/1.48, 0, 1/1.48, 2/1.48; rank ceil(6 * 0.5) = 3: 1/1.4826.
    assert rule.threshold == pytest.approx(1 / 1.4826)
    rng = np.random.default_rng(5)
    flagged = []
    for _ in range(200):
        rule = fit_unusual_rule(rng.normal(size=(100, 3)), rng.normal(size=(300, 3)), ["x", "y", "z"], alpha=0.05)
        flagged.append(rule.flag(rng.normal(size=(2000, 3))).mean())
    assert np.mean(flagged) <= 0.05 + 0.005  # the conformal promise, on average over calibration draws


def test_the_vcdr_interval_is_the_conformal_quantile_of_the_errors():
    predicted = np.array([0.5, 0.6, 0.7, np.nan, 0.4])
    truth = np.array([0.45, 0.7, 0.7, 0.5, 0.1])
    interval = fit_vcdr_interval(predicted, truth, coverage=0.5)  # errors 0.05, 0.1, 0, 0.3: rank ceil(2.5) = 3
    assert interval.halfwidth == pytest.approx(0.1) and interval.calibration_images == 4
    assert interval.interval(0.95) == (pytest.approx(0.85), 1.0) and interval.interval(float("nan")) is None
    # Per predicted class: "a" has errors 0.05 and 0 (rank ceil(1.5) = 2: 0.05), "b" has 0.1 and 0.3
    # (0.3); the image without a predicted vCDR counts for neither. An unknown class gets the overall one.
    interval = fit_vcdr_interval(predicted, truth, coverage=0.5, predicted_class=np.array(["a", "b", "a", "b", "b"]))
    assert interval.by_class == {"a": pytest.approx(0.05), "b": pytest.approx(0.3)}
    assert interval.halfwidth_for("b") == pytest.approx(0.3) and interval.halfwidth_for("c") == pytest.approx(0.1)
    assert interval.interval(0.5, "a") == (pytest.approx(0.45), pytest.approx(0.55))


def test_per_class_intervals_cover_each_class_where_one_interval_would_not():
    """Class b's errors are four times class a's: one quantile for both covers b less often than
    promised; one per class covers each at the promised rate (simulation, 200 calibration draws)."""
    rng = np.random.default_rng(2)

    def draw(n):
        classes = rng.choice(np.array(["a", "b"]), n)
        errors = np.abs(rng.normal(0.0, np.where(classes == "a", 0.02, 0.08)))
        return classes, errors

    pooled, per_class = [], []
    for _ in range(200):
        classes, errors = draw(350)
        interval = fit_vcdr_interval(errors, np.zeros(350), 0.9, classes)
        test_classes, test_errors = draw(2000)
        b = test_classes == "b"
        pooled.append((test_errors[b] <= interval.halfwidth).mean())
        per_class.append((test_errors[b] <= interval.halfwidth_for("b")).mean())
    assert np.mean(pooled) < 0.85 and np.mean(per_class) >= 0.9
