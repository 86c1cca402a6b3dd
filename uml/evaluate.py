"""The evaluation stage: the exported ONNX model, in onnxruntime, on the test split.

:func:`evaluate` reads ``data/models/model.onnx`` + ``metadata.json`` and the test split of the
prepared store, and writes ``data/reports/metrics.json`` (flat keys, ``null`` for undefined values)
and the plots under ``data/reports/plots/``. :func:`evaluate_arrays` is the same evaluation on
numpy arrays and an :class:`~uml.onnx_model.OnnxModel`.

Keys (each only when the model has the outputs it needs; ``<s>`` is a structure of
:func:`uml.metrics.structures`, ``disc`` and ``cup`` for fundus masks):

- ``cls/acc``, ``cls/auc``, ``cls/kappa``, ``cls/sensitivity``, ``cls/specificity``, ``cls/f1``,
  ``cls/ece``, ``cls/nll``, ``cls/brier``, ``cls/ece_debiased``, ``cls/ece_equal_mass`` (all of
  :data:`uml.metrics.CLASSIFICATION_METRICS`), the ``seg/`` keys below and the two mean uncertainties:
  :func:`uml.metrics.task_metrics`, the function that validation uses too (the predicted class is
  the argmax of ``class_prob``; the positive class is the model metadata's ``positive_class``,
  copied from the prepared data set)
- ``seg/dice_<s>``, ``seg/assd_<s>``, ``seg/hd95_<s>``: per-image values averaged over the test
  images (distances in pixels at model resolution); ``seg/dist_undefined_<s>``: how many images
  were left out of the distance means because exactly one of prediction and ground truth is empty
- ``clinical/vcdr_mae``, ``clinical/vcdr_auc`` (fundus masks only): the vCDR of the predicted
  masks against that of the ground truth, and as a glaucoma score
- ``reference/vcdr_auc`` (fundus masks only, any model): the AUC of the ground-truth masks' vCDR
  for the label, i.e. the ceiling of a vCDR-based classifier on this test split (on the synthetic
  data the label is drawn from the vCDR, so it is close to the best possible ``cls/auc``);
  ``reference/positive_fraction``: the share of the positive class among the test labels
- ``unc/error_auroc``, ``unc/referral_acc_<pct>`` (one per ``evaluate.referral_fractions``),
  ``unc/mean_class_uncertainty``, ``unc/pixel_error_auroc``, ``unc/mean_pixel_uncertainty``
- ``unc/noise_auroc_<kind>_<level>`` and ``unc/pixel_noise_auroc_<kind>_<level>`` (``<kind>`` is
  ``gaussian`` or ``salt_pepper``, one per level): the AUROC of the image's class uncertainty,
  respectively its mean pixel uncertainty, separating the corrupted copies from the clean images
  (1: every corrupted copy is more uncertain; 0.5: uncertainty ignores the noise)
- ``robust/gaussian_<sigma>/...`` and ``robust/salt_pepper_<amount>/...``: ``cls/acc``,
  ``cls/auc``, ``seg/dice_<s>``, ``unc/mean_class_uncertainty``, ``unc/mean_pixel_uncertainty``
  on corrupted copies of the test images.
- ``<key>_ci95_low`` and ``<key>_ci95_high`` beside each of ``cls/auc``, ``cls/acc``, ``cls/f1``,
  ``cls/sensitivity``, ``cls/ece``, ``seg/dice_<s>``, ``unc/error_auroc``,
  ``unc/pixel_error_auroc``, ``clinical/vcdr_auc`` and ``reference/vcdr_auc`` that is present: the
  95 % percentile bootstrap interval over ``evaluate.bootstrap_samples`` resamples of the test
  images (0 disables them), seeded by ``evaluate.seed`` and shared by all metrics (paired). The
  pixel AUROC resamples images and pools their sampled pixels. See :func:`uml.metrics.bootstrap_ci`.

Noise is drawn per image from a generator seeded by ``(evaluate.seed, noise kind, level, image
index)``: the corrupted images do not depend on the batch size or on which other levels run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve
from tqdm.auto import tqdm

from uml import metrics, plots
from uml.atomic import write_text_replacing
from uml.config import EvaluateParams, Params, Paths
from uml.errors import DataError, ModelFileError
from uml.fundus import FUNDUS_MASK_CLASSES
from uml.noise import gaussian_noise, salt_and_pepper
from uml.onnx_model import OnnxModel

log = logging.getLogger(__name__)

NOISE_KINDS: dict[str, tuple[int, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]]] = {
    # name -> (code mixed into the noise seed, corruption)
    "gaussian": (1, gaussian_noise),
    "salt_pepper": (2, salt_and_pepper),
}
# Referred fractions of the referral curve plot (the metrics use evaluate.referral_fractions).
REFERRAL_PLOT_FRACTIONS = tuple(np.round(np.arange(0.0, 0.91, 0.05), 2))


def level_name(level: float) -> str:
    """The noise level as it appears in metric keys: ``0.1`` -> ``"0.1"``."""
    return f"{level:g}"


def referral_key(fraction: float) -> str:
    """``0.1`` -> ``"unc/referral_acc_10"``."""
    return f"unc/referral_acc_{fraction * 100:g}"


# ------------------------------------------------------------------------ model passes
@dataclass
class PassOutputs:
    """What one pass over the test images keeps (``None`` where the model lacks the output)."""

    class_prob: np.ndarray | None = None  # (n, K)
    class_uncertainty: np.ndarray | None = None  # (n,)
    pred_masks: np.ndarray | None = None  # (n, S, S) uint8
    mean_pixel_uncertainty: np.ndarray | None = None  # (n,)
    pixel_uncertainty_sample: np.ndarray | None = None  # subsample for the pixel-error AUROC
    pixel_error_sample: np.ndarray | None = None
    pixel_sample_image: np.ndarray | None = None  # position of each sampled pixel's image
    panel_uncertainty: dict[int, np.ndarray] = field(default_factory=dict)  # position -> (S, S)


def _noise_rng(seed: int, kind: str, level: float, image_id: int) -> np.random.Generator:
    # Micro-units keep the level an integer for SeedSequence while telling 0.05 from 0.050001.
    return np.random.default_rng([seed, NOISE_KINDS[kind][0], int(round(level * 1e6)), int(image_id)])


def run_pass(
    model: OnnxModel,
    images: np.ndarray,
    batch_size: int,
    *,
    noise: tuple[str, float] | None = None,
    seed: int = 0,
    ids: np.ndarray | None = None,
    gt_masks: np.ndarray | None = None,
    panel_positions: Sequence[int] = (),
    pixel_budget: int = metrics.PIXEL_AUROC_MAX_PIXELS,
    desc: str = "clean",
) -> PassOutputs:
    """Run the model over uint8 images (N, S, S, 3) in batches, optionally corrupted by ``noise``
    (``(kind, level)``, kind in :data:`NOISE_KINDS`).

    With ``gt_masks`` a deterministic sample of at most ``pixel_budget`` pixels (spread evenly
    over the images) keeps each pixel's uncertainty and whether its predicted class is wrong;
    ``panel_positions`` keep those images' full uncertainty maps.
    """
    n = len(images)
    ids = np.arange(n) if ids is None else np.asarray(ids)
    out = PassOutputs()
    probs, class_unc, masks, pix_mean, pix_unc, pix_err, pix_image = [], [], [], [], [], [], []
    panel_set = set(int(p) for p in panel_positions)
    per_image_pixels = max(1, pixel_budget // max(n, 1))
    with tqdm(total=n, desc=f"evaluate [{desc}]", unit="img", leave=False, mininterval=1.0) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = _corrupted(model.scale_images(images[start:stop]), noise, seed, ids[start:stop])
            result = model.run(model.to_input(batch))
            if model.has_cls:
                probs.append(result["class_prob"].astype(np.float64))
            if model.has_class_uncertainty:
                class_unc.append(result["class_uncertainty"].reshape(stop - start).astype(np.float64))
            if model.has_seg:
                pred = result["seg_prob"].argmax(axis=1).astype(np.uint8)
                masks.append(pred)
            if model.has_seg_uncertainty:
                unc = result["seg_uncertainty"][:, 0].astype(np.float32)
                pix_mean.append(unc.reshape(stop - start, -1).mean(axis=1, dtype=np.float64))
                for j in range(stop - start):
                    position = start + j
                    if position in panel_set:
                        out.panel_uncertainty[position] = unc[j].copy()
                    if gt_masks is not None:
                        flat_unc, flat_err = metrics.sample_pixels(unc[j], pred[j] != gt_masks[position], per_image_pixels,
                                                                   np.random.default_rng([seed, 0, int(ids[position])]))
                        pix_unc.append(flat_unc)
                        pix_err.append(flat_err)
                        pix_image.append(np.full(flat_unc.size, position))
            bar.update(stop - start)
    out.class_prob, out.class_uncertainty, out.pred_masks = _joined(probs), _joined(class_unc), _joined(masks)
    out.mean_pixel_uncertainty = _joined(pix_mean)
    out.pixel_uncertainty_sample, out.pixel_error_sample = _joined(pix_unc), _joined(pix_err)
    out.pixel_sample_image = _joined(pix_image)
    return out


def _corrupted(batch: np.ndarray, noise: tuple[str, float] | None, seed: int, ids: np.ndarray) -> np.ndarray:
    """The scaled batch, each image corrupted by ``noise`` with its own generator (none: as is)."""
    if noise is None:
        return batch
    kind, level = noise
    corrupt = NOISE_KINDS[kind][1]
    return np.stack([corrupt(img, level, _noise_rng(seed, kind, level, image_id)) for img, image_id in zip(batch, ids)])


def _joined(parts: list[np.ndarray]) -> np.ndarray | None:
    # None for an output the model does not have (no batch added to it).
    return np.concatenate(parts) if parts else None


# ------------------------------------------------------------------------------ metrics
def _robust_metrics(model: OnnxModel, outputs: PassOutputs, labels: np.ndarray, gt_masks: np.ndarray) -> dict[str, float]:
    seg = (metrics.segmentation_per_image(outputs.pred_masks, gt_masks, model.mask_classes, distances=False)
           if outputs.pred_masks is not None else None)
    return metrics.task_metrics(labels, outputs.class_prob, seg, positive=model.positive_class, classification=("acc", "auc"),
                                class_uncertainty=outputs.class_uncertainty, pixel_uncertainty=outputs.mean_pixel_uncertainty)


def _panel_positions(n: int, count: int) -> list[int]:
    # Evenly spread over the split, so the panels are not all from one end of it.
    if count <= 0 or n == 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))


def evaluate_arrays(
    model: OnnxModel,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    cfg: EvaluateParams,
    plots_dir: str | Path | None = None,
    ids: np.ndarray | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on uint8 images (N, S, S, 3), label masks (N, S, S) and labels (N,).

    Returns the flat metrics (``nan`` where undefined). With ``plots_dir``, also writes the plot
    data files and figures there (see :func:`write_plots`).
    """
    images, masks, labels = np.asarray(images), np.asarray(masks), np.asarray(labels)
    n = len(images)
    if n == 0:
        raise DataError("the test split is empty")
    if not (len(masks) == len(labels) == n):
        raise DataError(f"images, masks and labels differ in length: {n}, {len(masks)}, {len(labels)}")
    size = model.image_size
    if images.shape[1:] != (size, size, 3) or masks.shape[1:] != (size, size):
        raise DataError(
            f"the model expects {size}x{size} RGB images, the test split has images {images.shape[1:]} and masks "
            f"{masks.shape[1:]}: re-run prepare and export with the same data.image_size"
        )
    if model.has_cls and (labels.min() < 0 or labels.max() >= len(model.class_names)):
        raise DataError(f"test labels span [{labels.min()}, {labels.max()}] but the model has {len(model.class_names)} classes")
    if model.has_seg and masks.max() >= len(model.mask_classes):
        raise DataError(f"test masks hold class {masks.max()} but the model has {len(model.mask_classes)} mask classes")

    fundus = tuple(model.mask_classes) == FUNDUS_MASK_CLASSES
    panels = _panel_positions(n, cfg.num_panels) if plots_dir is not None else []
    clean = run_pass(model, images, cfg.batch_size, seed=cfg.seed, ids=ids, gt_masks=masks, panel_positions=panels)

    seg = metrics.segmentation_per_image(clean.pred_masks, masks, model.mask_classes) if clean.pred_masks is not None else None
    result = metrics.task_metrics(labels, clean.class_prob, seg, positive=model.positive_class, bins=cfg.calibration_bins,
                                  class_uncertainty=clean.class_uncertainty, pixel_uncertainty=clean.mean_pixel_uncertainty)
    gt_vcdr = np.array([metrics.vertical_cdr(m) for m in masks]) if fundus else None
    pred_vcdr = None
    if clean.pred_masks is not None:
        if fundus:
            pred_vcdr = np.array([metrics.vertical_cdr(m) for m in clean.pred_masks])
            result["clinical/vcdr_mae"] = metrics.vcdr_mae(pred_vcdr, gt_vcdr)
            result["clinical/vcdr_auc"] = metrics.vcdr_auc(labels, pred_vcdr, model.positive_class)
    if gt_vcdr is not None:
        result["reference/vcdr_auc"] = metrics.vcdr_auc(labels, gt_vcdr, model.positive_class)
    result["reference/positive_fraction"] = float(np.mean(labels == model.positive_class))
    if clean.class_uncertainty is not None and clean.class_prob is not None:
        correct = metrics.predicted_class(clean.class_prob) == labels
        result["unc/error_auroc"] = metrics.error_auroc(clean.class_uncertainty, ~correct)
        for fraction in cfg.referral_fractions:
            result[referral_key(fraction)] = metrics.referral_acc(correct, clean.class_uncertainty, fraction)
    if clean.pixel_uncertainty_sample is not None:
        result["unc/pixel_error_auroc"] = metrics.error_auroc(clean.pixel_uncertainty_sample, clean.pixel_error_sample)

    robust_tables: dict[str, list[dict[str, float]]] = {}
    clean_robust = _robust_metrics(model, clean, labels, masks)
    for kind, levels in (("gaussian", cfg.gaussian_sigmas), ("salt_pepper", cfg.salt_pepper_amounts)):
        table = [{"level": 0.0, **_columns(clean_robust)}]
        for level in levels:
            noisy = run_pass(model, images, cfg.batch_size, noise=(kind, level), seed=cfg.seed, ids=ids,
                             desc=f"{kind} {level_name(level)}")
            values = _robust_metrics(model, noisy, labels, masks)
            result.update({f"robust/{kind}_{level_name(level)}/{k}": v for k, v in values.items()})
            result.update(_noise_detection(clean, noisy, f"{kind}_{level_name(level)}"))
            table.append({"level": float(level), **_columns(values)})
        robust_tables[kind] = table

    if cfg.bootstrap_samples:
        intervals = _bootstrap_intervals(model, clean, masks, labels, gt_vcdr, pred_vcdr, cfg)
        result = _with_intervals(result, intervals)
    if plots_dir is not None:
        write_plots(Path(plots_dir), model, clean, images, masks, labels, cfg, panels, robust_tables)
    return result


def _noise_detection(clean: PassOutputs, noisy: PassOutputs, noise: str) -> dict[str, float]:
    """``unc/noise_auroc_<noise>`` and ``unc/pixel_noise_auroc_<noise>``: do the corrupted copies
    carry more (image, mean pixel) uncertainty than the clean images?"""
    result: dict[str, float] = {}
    if clean.class_uncertainty is not None:
        result[f"unc/noise_auroc_{noise}"] = metrics.noise_auroc(clean.class_uncertainty, noisy.class_uncertainty)
    if clean.mean_pixel_uncertainty is not None:
        result[f"unc/pixel_noise_auroc_{noise}"] = metrics.noise_auroc(clean.mean_pixel_uncertainty,
                                                                       noisy.mean_pixel_uncertainty)
    return result


def _bootstrap_intervals(
    model: OnnxModel,
    clean: PassOutputs,
    masks: np.ndarray,
    labels: np.ndarray,
    gt_vcdr: np.ndarray | None,
    pred_vcdr: np.ndarray | None,
    cfg: EvaluateParams,
) -> dict[str, tuple[float, float]]:
    """Metric key -> 95 % bootstrap interval, for the headline metrics the model has (see the module docstring)."""
    n = len(labels)
    every_image = np.ones(n)
    positive = labels == model.positive_class
    statistics: dict[str, metrics.ResampledStatistic] = {}
    if clean.class_prob is not None:
        pred = metrics.predicted_class(clean.class_prob)
        correct = pred == labels
        statistics["cls/auc"] = metrics.resampled_class_auc(labels, clean.class_prob, model.positive_class)
        statistics["cls/acc"] = metrics.resampled_ratio(correct, every_image)
        statistics["cls/f1"] = metrics.resampled_f1(labels, pred, model.positive_class, clean.class_prob.shape[1])
        statistics["cls/sensitivity"] = metrics.resampled_ratio(positive & correct, positive)
        statistics["cls/ece"] = metrics.resampled_ece(labels, clean.class_prob, cfg.calibration_bins)
        if clean.class_uncertainty is not None:
            statistics["unc/error_auroc"] = metrics.resampled_auc(clean.class_uncertainty, ~correct)
    if clean.pred_masks is not None:
        for name, dice in metrics.dice_per_image(clean.pred_masks, masks, model.mask_classes).items():
            statistics[f"seg/dice_{name}"] = metrics.resampled_ratio(dice, every_image)
    if clean.pixel_uncertainty_sample is not None:
        statistics["unc/pixel_error_auroc"] = metrics.resampled_auc(
            clean.pixel_uncertainty_sample, clean.pixel_error_sample, group=clean.pixel_sample_image, n_groups=n)
    if pred_vcdr is not None:
        statistics["clinical/vcdr_auc"] = metrics.resampled_auc(pred_vcdr, positive)
    if gt_vcdr is not None:
        statistics["reference/vcdr_auc"] = metrics.resampled_auc(gt_vcdr, positive)
    return {key: metrics.bootstrap_ci(statistic, n, cfg.bootstrap_samples, cfg.seed, confidence=0.95)
            for key, statistic in statistics.items()}


def _with_intervals(result: dict[str, float], intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    # Each interval right after its metric, so that metrics.json reads "value, low, high".
    out: dict[str, float] = {}
    for key, value in result.items():
        out[key] = value
        if key in intervals:
            out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = intervals[key]
    return out


def _columns(values: dict[str, float]) -> dict[str, float]:
    # CSV column names for dvc plots: "cls/acc" -> "cls_acc", "unc/mean_class_uncertainty" -> "unc_mean_class_uncertainty".
    return {k.replace("/", "_"): v for k, v in values.items()}


# -------------------------------------------------------------------------------- plots
def write_plots(
    plots_dir: Path,
    model: OnnxModel,
    clean: PassOutputs,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    cfg: EvaluateParams,
    panels: Sequence[int],
    robust_tables: dict[str, list[dict[str, float]]],
) -> list[Path]:
    """Write the plot data files (CSV, for ``dvc plots``) and PNG figures; returns the paths written.

    ``roc`` (positive class vs rest), ``reliability`` and ``referral`` need the class outputs;
    ``robustness_<kind>.csv`` always; ``panels/case_<position>.png`` per panel.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if clean.class_prob is not None:
        positive = (labels == model.positive_class).astype(int)
        score = clean.class_prob[:, model.positive_class]
        if 0 < positive.sum() < len(positive):
            fpr, tpr, thresholds = roc_curve(positive, score)
            # The first threshold is +inf ("predict nothing positive"); scores are probabilities,
            # so 1.0 is the same cut for the plot and keeps the file valid CSV/JSON numbers.
            thresholds = np.minimum(thresholds, 1.0)
            rows = [{"fpr": f, "tpr": t, "threshold": th} for f, t, th in zip(fpr, tpr, thresholds)]
            written.append(plots.write_csv(plots_dir / "roc.csv", rows))
            written.append(plots.roc_figure(plots_dir / "roc.png", fpr, tpr, metrics.auc(labels, clean.class_prob, model.positive_class),
                                            title=f"ROC ({model.class_names[model.positive_class]} vs rest)"))
        else:
            log.warning("the test split holds one class only: no ROC curve")
        stats = metrics.reliability_diagram(labels, clean.class_prob, cfg.calibration_bins)
        filled = stats["count"] > 0
        rows = [
            {"bin_lower": lo, "bin_upper": hi, "confidence": c, "accuracy": a, "count": k}
            for lo, hi, c, a, k in zip(*(stats[key][filled] for key in ("lower", "upper", "confidence", "accuracy", "count")))
        ]
        written.append(plots.write_csv(plots_dir / "reliability.csv", rows))
        written.append(plots.reliability_figure(plots_dir / "reliability.png", stats, metrics.ece(labels, clean.class_prob, cfg.calibration_bins)))
        if clean.class_uncertainty is not None:
            correct = metrics.predicted_class(clean.class_prob) == labels
            curve = metrics.referral_curve(correct, clean.class_uncertainty, REFERRAL_PLOT_FRACTIONS)
            rows = [{"referred_fraction": f, "accuracy": a, "retained": r} for f, a, r in zip(curve["fraction"], curve["accuracy"], curve["retained"])]
            written.append(plots.write_csv(plots_dir / "referral.csv", rows))
            written.append(plots.referral_figure(plots_dir / "referral.png", curve))
    for kind, table in robust_tables.items():
        written.append(plots.write_csv(plots_dir / f"robustness_{kind}.csv", table))
    written.append(plots.robustness_figure(plots_dir / "robustness.png", robust_tables,
                                           {"gaussian": "Gaussian noise sigma", "salt_pepper": "salt-and-pepper amount"}))
    for position in panels:
        written.append(plots.panel_figure(
            plots_dir / "panels" / f"case_{position:03d}.png",
            images[position],
            masks[position],
            clean.pred_masks[position] if clean.pred_masks is not None else None,
            clean.panel_uncertainty.get(position),
            model.mask_classes,
            _panel_title(model, clean, labels, position),
        ))
    return written


def _panel_title(model: OnnxModel, clean: PassOutputs, labels: np.ndarray, position: int) -> str:
    names = model.class_names or [str(i) for i in range(int(labels.max()) + 1)]
    parts = [f"#{position}  label: {names[labels[position]]}"]
    if clean.class_prob is not None:
        k = int(clean.class_prob[position].argmax())
        parts.append(f"pred: {names[k]} p={clean.class_prob[position, k]:.2f}")
    if clean.class_uncertainty is not None:
        parts.append(f"u={clean.class_uncertainty[position]:.2f}")
    return "   ".join(parts)


# -------------------------------------------------------------------------------- stage
def to_json_ready(values: dict[str, float]) -> dict[str, float | None]:
    """Plain floats in key order; ``nan``/``inf`` become ``None`` (JSON ``null``)."""
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in values.items()}


def write_metrics(path: str | Path, values: dict[str, float]) -> dict[str, float | None]:
    """Write the flat metrics JSON atomically (a reader never sees half a file)."""
    ready = to_json_ready(values)
    write_text_replacing(path, json.dumps(ready, indent=2, allow_nan=False) + "\n")
    return ready


def evaluate(params: Params) -> dict[str, float | None]:
    """The ``evaluate`` stage: metrics.json and plots for the exported model on the test split."""
    from uml.data.store import load_split, open_prepared

    paths = Paths(params)
    model = OnnxModel(paths.model_onnx, paths.metadata)
    if not paths.dataset.exists():
        raise DataError(f"{paths.dataset}: prepared data set not found (run the prepare stage)")
    prepared = open_prepared(paths.dataset)
    if model.has_cls and len(prepared.class_names) != len(model.class_names):
        raise ModelFileError(
            f"{paths.metadata}: the model has {len(model.class_names)} classes {model.class_names}, "
            f"the data set {paths.dataset} has {len(prepared.class_names)} {list(prepared.class_names)}"
        )
    if model.has_cls and prepared.positive_class != model.positive_class:
        raise ModelFileError(
            f"{paths.metadata}: positive class {model.positive_class} differs from the data set's "
            f"{prepared.positive_class} ({paths.dataset}): re-run the export stage"
        )
    if model.has_seg and list(prepared.mask_classes) != model.mask_classes:
        raise ModelFileError(
            f"{paths.metadata}: mask classes {model.mask_classes} differ from the data set's {list(prepared.mask_classes)}"
        )
    images, masks, labels, indices = load_split(prepared, "test")  # verified once, above
    log.info("evaluating %s on %d test images (%s)", paths.model_onnx, len(images), ", ".join(model.outputs))

    # Both outputs are built under staging names and replace the old ones only once both are
    # complete: a failure keeps the previous metrics.json and plots/ together. The new plots
    # folder replaces the old one whole, dropping files of an earlier model (e.g. an ROC curve
    # that a segmentation-only model does not produce).
    staging_plots = paths.plots.with_name(f".{paths.plots.name}.partial")
    staging_metrics = paths.metrics.with_name(f".{paths.metrics.name}.partial")
    old_plots = paths.plots.with_name(f".{paths.plots.name}.old")
    for stale in (staging_plots, old_plots):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        values = evaluate_arrays(model, images, masks, labels, params.evaluate, plots_dir=staging_plots, ids=indices)
        ready = write_metrics(staging_metrics, values)
    except BaseException:
        shutil.rmtree(staging_plots, ignore_errors=True)
        staging_metrics.unlink(missing_ok=True)
        raise
    if paths.plots.exists():
        paths.plots.rename(old_plots)
    staging_plots.rename(paths.plots)
    os.replace(staging_metrics, paths.metrics)
    shutil.rmtree(old_plots, ignore_errors=True)
    for key in ("cls/acc", "cls/auc", "seg/dice_disc", "seg/dice_cup", "unc/error_auroc"):
        if key in ready:
            log.info("%s = %s", key, ready[key])
    log.info("wrote %s and %s", paths.metrics, paths.plots)
    return ready
