"""``data/reports/metrics.json`` of the miniature DAG: every contracted key, and the values
recomputed from the ONNX model's outputs on the store's test split with the references of
tests/dag/reference.py (hand-written definitions, scikit-learn, scipy), not with uml.metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.dag import reference as ref
from tests.dag.miniature import MiniDag

NOISES = ["gaussian_0.1", "salt_pepper_0.05"]  # evaluate.gaussian_sigmas / salt_pepper_amounts of TINY_DAG
INTERVALS = ["cls/auc", "cls/acc", "cls/f1", "cls/sensitivity", "cls/ece", "cls/nll", "cls/brier", "cls/ece_debiased",
             "raw/cls/ece", "raw/cls/nll", "raw/cls/brier", "raw/cls/ece_debiased", "seg/dice_disc", "seg/dice_cup",
             "unc/error_auroc", "raw/unc/error_auroc", "unc/pixel_error_auroc", "raw/unc/pixel_error_auroc",
             "unc/pixel_error_auroc_band", "raw/unc/pixel_error_auroc_band", "sel/aurc_calibrated", "sel/augrc_calibrated",
             "sel/aurc_raw_maxprob", "sel/augrc_raw_maxprob", "sel/aurc_raw_uncertainty", "sel/augrc_raw_uncertainty",
             "refer/coverage", "refer/risk", "refer/combined_coverage", "refer/combined_risk",
             "clinical/vcdr_auc", "clinical/vcdr_interval_coverage", "reference/vcdr_auc"]


@pytest.fixture(scope="module")
def written(miniature_dag: MiniDag) -> dict[str, float | None]:
    return json.loads((miniature_dag.data / "reports" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def test_split(miniature_dag: MiniDag) -> ref.Split:
    return ref.read_split(miniature_dag.data / "prepared" / "dataset.zarr", "test")


@pytest.fixture(scope="module")
def outputs(miniature_dag: MiniDag, test_split: ref.Split) -> dict[str, np.ndarray]:
    return ref.onnx_outputs(miniature_dag.data / "models" / "model.onnx", test_split.images)


def matches(written_value: float | None, expected: float) -> bool:
    """metrics.json writes an undefined value (nan) as null."""
    if math.isnan(expected):
        return written_value is None
    return written_value == pytest.approx(expected)


def expected_keys() -> list[str]:
    cls_names = ["acc", "auc", "kappa", "sensitivity", "specificity", "f1", "ece", "nll", "brier", "ece_debiased",
                 "ece_equal_mass"]
    keys = [f"cls/{k}" for k in cls_names] + [f"raw/cls/{k}" for k in cls_names]
    # The debiased ECE's noise check (the null's 95th percentile and the consistency p-value).
    keys += [f"{prefix}cls/ece_debiased_{k}" for prefix in ("", "raw/") for k in ("null95", "p_value")]
    keys += ["clinical/vcdr_mae", "clinical/vcdr_auc", "clinical/vcdr_interval_halfwidth", "clinical/vcdr_interval_coverage",
             "clinical/vcdr_interval_coverage_non-glaucoma", "clinical/vcdr_interval_coverage_glaucoma",
             "reference/vcdr_auc", "reference/positive_fraction",
             "unc/error_auroc", "raw/unc/error_auroc", "unc/referral_acc_10", "unc/referral_acc_20", "unc/referral_acc_30",
             "unc/mean_class_uncertainty", "raw/unc/mean_class_uncertainty", "unc/mean_pixel_uncertainty",
             "raw/unc/mean_pixel_uncertainty", "unc/pixel_error_auroc", "raw/unc/pixel_error_auroc",
             "unc/pixel_error_auroc_band", "raw/unc/pixel_error_auroc_band",
             "refer/coverage", "refer/risk", "refer/combined_coverage", "refer/combined_risk", "unusual/flagged"]
    for score in ("calibrated", "raw_maxprob", "raw_uncertainty"):
        keys += [f"sel/{k}_{score}" for k in ("aurc", "eaurc", "augrc", "coverage_at_risk")]
    for s in ("disc", "cup"):
        keys += [f"seg/dice_{s}", f"seg/assd_{s}", f"seg/hd95_{s}", f"seg/dist_undefined_{s}"]
    for noise in NOISES:
        keys += [f"{prefix}unc/{k}_{noise}" for prefix in ("", "raw/") for k in ("noise_auroc", "pixel_noise_auroc")]
        keys += [f"unusual/noise_auroc_{noise}", f"unusual/flagged_{noise}"]
        keys += [f"robust/{noise}/{k}" for k in ("cls/acc", "cls/auc", "seg/dice_disc", "seg/dice_cup",
                                                 "unc/mean_class_uncertainty", "unc/mean_pixel_uncertainty")]
    keys += [f"{k}_ci95_{end}" for k in INTERVALS for end in ("low", "high")]
    return keys


def test_every_contracted_key_is_written_and_nothing_else(written):
    assert sorted(written) == sorted(expected_keys())
    assert all(v is None or isinstance(v, float) for v in written.values())


def test_classification_metrics_recomputed(written, test_split, outputs):
    labels, prob = test_split.labels, outputs["class_prob"].astype(np.float64)
    pred = prob.argmax(axis=1)
    tp, tn = int(((pred == 1) & (labels == 1)).sum()), int(((pred == 0) & (labels == 0)).sum())
    fp, fn = int(((pred == 1) & (labels == 0)).sum()), int(((pred == 0) & (labels == 1)).sum())
    assert written["cls/acc"] == pytest.approx((tp + tn) / len(labels))
    assert written["cls/sensitivity"] == pytest.approx(tp / (tp + fn))
    assert written["cls/specificity"] == pytest.approx(tn / (tn + fp))
    assert written["cls/f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert written["cls/kappa"] == pytest.approx(ref.cohen_kappa(labels, pred), abs=1e-12)
    assert written["cls/auc"] == pytest.approx(ref.rank_auc(prob[:, 1], labels == 1))
    assert written["cls/ece"] == pytest.approx(ref.ece(labels, prob))


def test_segmentation_metrics_recomputed(written, test_split, outputs):
    pred = outputs["seg_prob"].argmax(axis=1)
    for name, select in ref.STRUCTURES.items():
        pairs = [(select(p), select(g)) for p, g in zip(pred, test_split.masks)]
        assert written[f"seg/dice_{name}"] == pytest.approx(np.mean([ref.dice(p, g) for p, g in pairs])), name
        distances = np.array([ref.assd_hd95(p, g) for p, g in pairs])
        defined = np.isfinite(distances[:, 0])
        assert written[f"seg/dist_undefined_{name}"] == float((~defined).sum())
        mean = distances[defined].mean(axis=0) if defined.any() else (math.nan, math.nan)  # none defined: null
        assert matches(written[f"seg/assd_{name}"], mean[0]) and matches(written[f"seg/hd95_{name}"], mean[1]), name
    # Trained on 24 images for 6 epochs, the disc is found (an untrained model scores ~0.06).
    assert written["seg/dice_disc"] > 0.5


def test_clinical_and_reference_metrics_recomputed(written, test_split, outputs):
    labels = test_split.labels
    gt = np.array([ref.vertical_cdr(m) for m in test_split.masks])
    assert np.isfinite(gt).all()  # every synthetic fundus has a disc
    # The ceiling: the true vCDR as the glaucoma score, with scikit-learn's AUC.
    assert written["reference/vcdr_auc"] == pytest.approx(roc_auc_score(labels, gt))
    assert written["reference/positive_fraction"] == pytest.approx(labels.mean())
    predicted = np.array([ref.vertical_cdr(m) for m in outputs["seg_prob"].argmax(axis=1)])
    both = np.isfinite(predicted)
    assert written["clinical/vcdr_mae"] == pytest.approx(np.abs(predicted[both] - gt[both]).mean())
    expected_auc = roc_auc_score(labels[both], predicted[both]) if len(set(labels[both])) == 2 else None
    assert written["clinical/vcdr_auc"] == (pytest.approx(expected_auc) if expected_auc is not None else None)


def test_uncertainty_metrics_recomputed(written, test_split, outputs):
    labels, prob = test_split.labels, outputs["class_prob"]
    uncertainty = outputs["class_uncertainty"][:, 0].astype(np.float64)
    correct = prob.argmax(axis=1) == labels
    assert written["unc/mean_class_uncertainty"] == pytest.approx(uncertainty.mean())
    assert written["unc/error_auroc"] == pytest.approx(ref.rank_auc(uncertainty, ~correct))
    for pct in (10, 20, 30):  # refer round(pct % of n) most uncertain images, ties by position
        kept = np.argsort(uncertainty, kind="stable")[: len(labels) - round(pct / 100 * len(labels))]
        assert written[f"unc/referral_acc_{pct}"] == pytest.approx(correct[kept].mean()), pct
    pixel_unc = outputs["seg_uncertainty"][:, 0]
    pixel_error = outputs["seg_prob"].argmax(axis=1) != test_split.masks
    assert written["unc/mean_pixel_uncertainty"] == pytest.approx(pixel_unc.mean(dtype=np.float64))
    # 12 x 64 x 64 pixels is under the subsampling budget: the AUROC is over every pixel.
    assert written["unc/pixel_error_auroc"] == pytest.approx(roc_auc_score(pixel_error.ravel(), pixel_unc.ravel()))


def test_robustness_metrics_come_from_corrupted_images(written):
    """The noise passes really ran on changed images: a stage that evaluated the clean images
    again would write the clean values and noise AUROCs of exactly 1/2."""
    for noise in NOISES:
        robust = {k: written[f"robust/{noise}/{k}"] for k in ("seg/dice_disc", "unc/mean_pixel_uncertainty")}
        assert robust["seg/dice_disc"] != written["seg/dice_disc"], noise
        assert robust["unc/mean_pixel_uncertainty"] != written["unc/mean_pixel_uncertainty"], noise
        assert written[f"unc/pixel_noise_auroc_{noise}"] != 0.5, noise


def test_intervals_surround_their_value(written):
    for key in INTERVALS:
        low, value, high = written[f"{key}_ci95_low"], written[key], written[f"{key}_ci95_high"]
        if value is None:
            assert low is None and high is None, key
            continue
        assert low is not None and high is not None and low <= value + 1e-12 and value <= high + 1e-12, (key, low, value, high)
    # 12 test images: the resampled AUC and disc Dice vary, so their intervals have a width.
    assert written["reference/vcdr_auc_ci95_low"] < written["reference/vcdr_auc_ci95_high"]
    assert written["seg/dice_disc_ci95_low"] < written["seg/dice_disc_ci95_high"]
    # Each interval follows its metric in the file (the ablation table reads them that way).
    keys = list(written)
    for key in INTERVALS:
        position = keys.index(key)
        assert keys[position + 1 : position + 3] == [f"{key}_ci95_low", f"{key}_ci95_high"]


def test_plots_are_written_for_dvc(miniature_dag):
    plots = miniature_dag.data / "reports" / "plots"
    for name in ("roc.csv", "roc.png", "reliability.csv", "reliability.png", "referral.csv", "referral.png",
                 "robustness_gaussian.csv", "robustness_salt_pepper.csv", "robustness.png"):
        assert (plots / name).stat().st_size > 100, name
    assert len(list((plots / "panels").glob("*.png"))) == 1  # evaluate.num_panels
    assert (miniature_dag.data / "train" / "progress.png").stat().st_size > 10_000
    assert (miniature_dag.data / "tune" / "scores.png").stat().st_size > 5_000
