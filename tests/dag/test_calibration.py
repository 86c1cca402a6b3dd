"""The miniature DAG's calibrate stage and what the evaluate stage reports of it, recomputed from
the exported model's raw outputs on the store's calibration and test splits with the independent
references of tests/dag/reference.py (never through uml.calibration or uml.metrics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import log_loss, roc_auc_score

from tests.dag import reference as ref
from tests.dag.miniature import TINY_DAG, MiniDag

TINY = dict(item.split("=", 1) for item in TINY_DAG)


@pytest.fixture(scope="module")
def models(miniature_dag: MiniDag) -> Path:
    return miniature_dag.data / "models"


@pytest.fixture(scope="module")
def calibration(models: Path) -> dict:
    return json.loads((models / "calibration.json").read_text())


@pytest.fixture(scope="module")
def written(miniature_dag: MiniDag) -> dict:
    return json.loads((miniature_dag.data / "reports" / "metrics.json").read_text())


def _split(miniature_dag: MiniDag, models: Path, name: str) -> tuple[ref.Split, dict[str, np.ndarray]]:
    split = ref.read_split(miniature_dag.data / "prepared" / "dataset.zarr", name)
    return split, ref.onnx_outputs(models / "model.onnx", split.images)


def test_the_graph_returns_the_tempered_raw_outputs(miniature_dag, models, calibration):
    """class_prob = softmax(log(alpha/S) / T) (a per-image constant does not change a softmax),
    class_uncertainty = 1 - max class_prob, seg_uncertainty = the normalised entropy of seg_prob
    smoothed by a Gaussian of the fitted width (scipy's filter, mirrored borders)."""
    _, out = _split(miniature_dag, models, "test")
    t_class = calibration["class_temperature"]["temperature"]
    expected = ref.softmax(np.log(out["class_prob_raw"].astype(np.float64)) / t_class)
    np.testing.assert_allclose(out["class_prob"], expected, atol=1e-5)
    np.testing.assert_allclose(out["class_uncertainty"][:, 0], 1.0 - out["class_prob"].max(1), atol=1e-6)
    seg = out["seg_prob"].astype(np.float64)
    entropy = -(seg * np.log(seg)).sum(1) / math.log(3)
    sigma = calibration["seg_error_map"]["sigma"]
    smoothed = np.stack([ndimage.gaussian_filter(e, sigma, mode="mirror", truncate=3.0) for e in entropy]) if sigma else entropy
    np.testing.assert_allclose(out["seg_uncertainty"][:, 0], smoothed, atol=1e-4)
    assert t_class != 1.0 and calibration["seg_temperature"]["temperature"] != 1.0  # something was fitted


def test_the_temperatures_minimise_the_calibration_split_nll(miniature_dag, models, calibration):
    calib, out = _split(miniature_dag, models, "calib")
    assert calibration["num_images"] == len(calib.labels) == 12
    log_raw = np.log(out["class_prob_raw"].astype(np.float64))
    t_class = calibration["class_temperature"]["temperature"]

    def class_nll(t: float) -> float:
        return log_loss(calib.labels, ref.softmax(log_raw / t), labels=[0, 1])

    assert class_nll(t_class) == pytest.approx(calibration["class_temperature"]["nll_after"], abs=1e-5)
    assert class_nll(1.0) == pytest.approx(calibration["class_temperature"]["nll_before"], abs=1e-5)
    # A minimum inside the search range [0.05, 20], or at its bound (a tiny model's class head can be
    # no better than chance on 12 images, and the flattest output wins).
    neighbours = [t for t in (t_class * 1.05, t_class / 1.05) if 0.05 <= t <= 20.0]
    assert class_nll(t_class) <= min([class_nll(t) for t in neighbours] + [class_nll(1.0)]) + 1e-7
    # log seg_prob = S_0 / T_seg - c per pixel, so softmax(log seg_prob * T_seg / t) is the
    # segmentation output at temperature t.
    t_seg = calibration["seg_temperature"]["temperature"]
    log_seg = np.log(out["seg_prob"].astype(np.float64)) * t_seg
    masks = calib.masks.astype(np.int64)

    def seg_nll(t: float) -> float:
        prob = ref.softmax(log_seg / t)
        return float(-np.mean(np.log(np.take_along_axis(prob, masks[:, None], axis=1))))

    assert seg_nll(t_seg) == pytest.approx(calibration["seg_temperature"]["nll_after"], abs=1e-4)
    assert seg_nll(t_seg) <= min(seg_nll(t_seg * 1.05), seg_nll(t_seg / 1.05), seg_nll(1.0)) + 1e-6

    # The error map's width: the one of the grid whose smoothed entropy ranks the calibration
    # split's wrong pixels best (all 12 x 64 x 64 pixels: fewer than the stage's sample).
    fit = calibration["seg_error_map"]
    prob = out["seg_prob"].astype(np.float64)
    entropy = -(prob * np.log(prob)).sum(1) / math.log(3)
    wrong = (prob.argmax(1) != masks).ravel()
    for key, measured in fit["auroc_by_sigma"].items():
        sigma = float(key)
        smoothed = np.stack([ndimage.gaussian_filter(e, sigma, mode="mirror", truncate=3.0) for e in entropy]) if sigma else entropy
        assert measured == pytest.approx(roc_auc_score(wrong, smoothed.ravel()), abs=2e-3), key
    assert fit["auroc_by_sigma"][f"{fit['sigma']:g}"] == max(fit["auroc_by_sigma"].values())


def test_the_referral_threshold_is_learn_then_test_on_the_calibration_split(miniature_dag, models, calibration):
    calib, out = _split(miniature_dag, models, "calib")
    error = out["class_prob"].argmax(1) != calib.labels
    rule = calibration["referral"]
    assert (rule["risk"], rule["delta"]) == (float(TINY["calibrate.risk"]), float(TINY["calibrate.delta"]))
    # The ONNX outputs differ from the stage's torch outputs by up to export.parity_atol.
    expected = ref.referral_threshold(out["class_uncertainty"][:, 0].astype(np.float64), error, rule["risk"], rule["delta"])
    assert rule["threshold"] == (pytest.approx(expected) if expected is not None else None)
    accepted = out["class_uncertainty"][:, 0] <= (rule["threshold"] if rule["threshold"] is not None else -1.0)
    assert rule["calibration_coverage"] == pytest.approx(accepted.mean())


def test_the_unusual_image_rule_and_the_vcdr_interval(miniature_dag, models, calibration):
    val, val_out = _split(miniature_dag, models, "val")
    calib, calib_out = _split(miniature_dag, models, "calib")

    def features(split: ref.Split, out: dict[str, np.ndarray]) -> np.ndarray:
        images = split.images.astype(np.float64) / 255.0
        gray = images.mean(axis=3)
        return np.stack([gray.mean((1, 2)), gray.std((1, 2)), (images.max(3) - images.min(3)).mean((1, 2)),
                         [ref.immerkaer_noise(g) for g in gray], out["seg_uncertainty"][:, 0].mean((1, 2))], axis=1)

    rule = calibration["unusual"]
    assert rule["statistics"] == ["brightness", "contrast", "colourfulness", "noise", "mean_pixel_uncertainty"]
    reference = features(val, val_out)
    center = np.median(reference, axis=0)
    np.testing.assert_allclose(rule["center"], center, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rule["scale"], 1.4826 * np.median(np.abs(reference - center), axis=0), rtol=1e-3, atol=1e-6)
    scores = np.abs((features(calib, calib_out) - rule["center"]) / rule["scale"]).max(axis=1)
    # The conformal quantile at 1 - 0.1 of 12 scores: the ceil(13 * 0.9) = 12th smallest, the largest.
    assert rule["alpha"] == 0.1 and rule["threshold"] == pytest.approx(np.sort(scores)[11], rel=1e-3)

    predicted = np.array([ref.vertical_cdr(m) for m in calib_out["seg_prob"].argmax(1)])
    truth = np.array([ref.vertical_cdr(m) for m in calib.masks])
    classes = np.array(["non-glaucoma", "glaucoma"])[calib_out["class_prob"].argmax(1)]
    interval = calibration["vcdr_interval"]

    def quantile(chosen: np.ndarray) -> float | None:
        residual = np.sort(np.abs(predicted - truth)[chosen & np.isfinite(predicted)])
        rank = math.ceil((residual.size + 1) * interval["coverage"])
        return float(residual[rank - 1]) if rank <= residual.size else None

    assert interval["halfwidth"] == (pytest.approx(quantile(np.ones(12, bool))) if quantile(np.ones(12, bool)) else None)
    assert set(interval["by_class"]) == set(classes)  # one per class the classifier predicted
    for name in set(classes):
        expected = quantile(classes == name)
        assert interval["by_class"][name] == (pytest.approx(expected) if expected is not None else None), name


def test_what_evaluate_reports_of_the_calibration(miniature_dag, models, calibration, written):
    test, out = _split(miniature_dag, models, "test")
    labels = test.labels
    prob, raw = out["class_prob"].astype(np.float64), out["class_prob_raw"].astype(np.float64)
    error = prob.argmax(1) != labels
    assert written["cls/nll"] == pytest.approx(ref.nll(labels, prob), abs=1e-6)
    assert written["raw/cls/nll"] == pytest.approx(ref.nll(labels, raw), abs=1e-6)
    assert written["cls/brier"] == pytest.approx(((prob - np.eye(2)[labels]) ** 2).sum(1).mean(), abs=1e-6)
    # The temperature keeps the argmax and, with two classes, the order: the same decisions and AUC.
    assert written["cls/acc"] == written["raw/cls/acc"] and written["cls/auc"] == pytest.approx(written["raw/cls/auc"], abs=1e-9)
    assert written["sel/aurc_calibrated"] == pytest.approx(ref.aurc(out["class_uncertainty"][:, 0], error), abs=1e-6)
    assert written["sel/aurc_raw_uncertainty"] == pytest.approx(ref.aurc(out["class_uncertainty_raw"][:, 0], error), abs=1e-6)
    assert written["raw/unc/error_auroc"] == pytest.approx(roc_auc_score(error, out["class_uncertainty_raw"][:, 0])
                                                           if 0 < error.sum() < len(error) else None)
    threshold = calibration["referral"]["threshold"]
    accepted = out["class_uncertainty"][:, 0] <= (threshold if threshold is not None else -1.0)
    assert written["refer/coverage"] == pytest.approx(accepted.mean())
    assert written["refer/risk"] == (pytest.approx(error[accepted].mean()) if accepted.any() else None)

    pred = out["seg_prob"].argmax(1)
    band = np.stack([ref.contour_band(p, float(TINY.get("evaluate.contour_band_px", 3.0))) for p in pred])
    pixel_error = pred != test.masks
    for key, name in (("unc/pixel_error_auroc_band", "seg_uncertainty"), ("raw/unc/pixel_error_auroc_band", "seg_uncertainty_raw")):
        # 12 small images: every band pixel is in the sample.
        assert written[key] == pytest.approx(roc_auc_score(pixel_error[band], out[name][:, 0][band]), abs=1e-6), key

    interval = calibration["vcdr_interval"]
    names = np.array(["non-glaucoma", "glaucoma"])[prob.argmax(1)]
    halfwidth = np.array([np.nan if (h := interval["by_class"].get(n, interval["halfwidth"])) is None else h for n in names])
    predicted = np.array([ref.vertical_cdr(m) for m in pred])
    truth = np.array([ref.vertical_cdr(m) for m in test.masks])
    defined = np.isfinite(predicted) & np.isfinite(halfwidth)
    if defined.any():
        covered = np.abs(predicted - truth) <= halfwidth
        assert written["clinical/vcdr_interval_halfwidth"] == pytest.approx(halfwidth[defined].mean())
        assert written["clinical/vcdr_interval_coverage"] == pytest.approx(covered[defined].mean())
        for k, name in enumerate(["non-glaucoma", "glaucoma"]):
            chosen = defined & (labels == k)
            assert written[f"clinical/vcdr_interval_coverage_{name}"] == (
                pytest.approx(covered[chosen].mean()) if chosen.any() else None)


def test_the_model_card_carries_the_numbers_of_metrics_json(miniature_dag, written):
    card = (miniature_dag.data / "reports" / "model_card.md").read_text()
    rows = [line.split("|") for line in card.splitlines() if line.startswith("| ") and "`metrics.json` key" not in line
            and "`" in line]
    checked = 0
    for row in rows:
        key = row[2].strip().strip("`")
        cell = row[3].strip()
        if written.get(key) is None:
            assert cell == "n/a", key
            continue
        value = float(cell.split()[0])
        assert value == pytest.approx(written[key], abs=5e-5), key
        if f"{key}_ci95_low" in written and written[f"{key}_ci95_low"] is not None:
            low, high = (float(x) for x in cell.split("[")[1].rstrip("]").split(","))
            assert (low, high) == (pytest.approx(written[f"{key}_ci95_low"], abs=5e-5),
                                   pytest.approx(written[f"{key}_ci95_high"], abs=5e-5)), key
        checked += 1
    assert checked >= 20
