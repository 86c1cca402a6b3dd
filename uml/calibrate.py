"""The ``calibrate`` stage: ``model.pt`` + the calibration split -> ``data/models/calibration.json``.

It runs the trained model (torch, in this process) over the store's ``calib`` split, which no
other stage reads, and the ``val`` split, and fits what :mod:`uml.calibration` describes: the
class and segmentation temperatures, the referral threshold with its guarantee, the
unusual-image rule and the vCDR interval. The export stage bakes the temperatures into the ONNX
graph and copies everything into ``metadata.json``; ``calibration.json`` records the SHA-256 of
the ``model.pt`` it was fitted for, and the export refuses a calibration of another model.

It also draws ``data/calibrate/reliability.png``: the class output's reliability on the
calibration split before and after the temperature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from uml import metrics, plots
from uml.atomic import write_text_replacing
from uml.calibration import (
    TEMPERATURE_BOUNDS,
    Calibration,
    ErrorMapFit,
    deployment_settings,
    fit_power_temperature,
    fit_referral_rule,
    fit_temperature,
    fit_unusual_rule,
    fit_vcdr_interval,
)
from uml.config import Params, Paths
from uml.data.store import load_split, open_prepared
from uml.errors import ModelFileError
from uml.fundus import FUNDUS_MASK_CLASSES
from uml.image_io import PIXEL_MAX
from uml.models import UMLNet, load_model
from uml.models.uml_net import deployment_outputs, gaussian_blur
from uml.onnx_model import file_sha256
from uml.quality import unusual_features

log = logging.getLogger(__name__)

# The segmentation temperature (and the error map's width) are fitted on at most this many
# calibration pixels, drawn uniformly with a fixed seed: one number needs far fewer than the 11M
# pixels of the default 693 images at 128 px, and each evaluation of the search costs time in proportion.
SEG_TEMPERATURE_PIXELS = 1_000_000
# The error map's Gaussian widths tried, in pixels (0: the entropy as it is).
ERROR_MAP_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass
class SplitScores:
    """The model's scores (:meth:`UMLNet.scores`) on one split, on the CPU, and its ground truth."""

    images: np.ndarray  # uint8 (n, S, S, 3)
    masks: np.ndarray  # uint8 (n, S, S)
    labels: np.ndarray  # int64 (n,)
    scores: dict[str, torch.Tensor]


@torch.no_grad()
def score_split(model: UMLNet, images: np.ndarray, batch_size: int, desc: str) -> dict[str, torch.Tensor]:
    """:meth:`UMLNet.scores` over uint8 images (n, S, S, 3) in batches, joined on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=len(images), desc=f"calibrate [{desc}]", unit="img", mininterval=1.0) as bar:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float().div_(PIXEL_MAX)
            for key, value in model.scores(batch).items():
                parts.setdefault(key, []).append(value.float())
            bar.update(len(batch))
    return {key: torch.cat(values) for key, values in parts.items()}


def calibrate(params: Params) -> Path:
    """The ``calibrate`` stage: write ``calibration.json`` (and the reliability figure); returns its path."""
    paths, cp = Paths(params), params.calibrate
    model = load_model(paths.model_pt)
    prepared = open_prepared(paths.dataset)
    if prepared.image_size != model.cfg.image_size:
        raise ModelFileError(f"{paths.model_pt} expects {model.cfg.image_size} px images but {paths.dataset} holds "
                             f"{prepared.image_size} px: retrain after changing data.image_size")
    splits = {}
    for name in ("calib", "val"):
        images, masks, labels, _ = load_split(prepared, name)
        splits[name] = SplitScores(images, masks, labels, score_split(model, images, cp.batch_size, name))
    calib, val = splits["calib"], splits["val"]
    log.info("calibrating %s on %d calibration images (%d validation images for the unusual-image reference)",
             paths.model_pt, len(calib.labels), len(val.labels))

    class_fit = seg_fit = referral = vcdr = None
    if "class_log_score" in calib.scores:
        fit_class = fit_power_temperature if cp.class_power else fit_temperature
        class_fit = fit_class(calib.scores["class_log_score"].double().numpy(), calib.labels)
        log.info("class temperature %.3f, power %.3f: calibration NLL %.4f -> %.4f", class_fit.temperature,
                 class_fit.power, class_fit.nll_before, class_fit.nll_after)
    if "seg_logits" in calib.scores:
        logits = calib.scores["seg_logits"]
        pixels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        truth = calib.masks.reshape(-1)
        keep = np.arange(len(truth))
        if len(truth) > SEG_TEMPERATURE_PIXELS:
            keep = np.sort(np.random.default_rng(0).choice(len(truth), SEG_TEMPERATURE_PIXELS, replace=False))
        seg_fit = fit_temperature(pixels[torch.from_numpy(keep)].double().numpy(), truth[keep])
        log.info("segmentation temperature %.3f: calibration pixel NLL %.4f -> %.4f", seg_fit.temperature,
                 seg_fit.nll_before, seg_fit.nll_after)
    for name, fit in (("class", class_fit), ("segmentation", seg_fit)):
        if fit is not None and fit.at_bound:
            log.warning("the %s temperature stopped at %g, a bound of its search %s: the output carries almost no "
                        "information on the calibration split (a high bound) or is wildly overconfident (a low one)",
                        name, fit.temperature, TEMPERATURE_BOUNDS)
    error_map = fit_error_map(calib, seg_fit.temperature, keep) if seg_fit is not None else None
    settings = deployment_settings(class_fit, seg_fit, error_map)
    outputs = {name: deployment_outputs(split.scores, *settings) for name, split in splits.items()}

    if class_fit is not None:
        prob = outputs["calib"]["class_prob"].double().numpy()
        error = metrics.predicted_class(prob) != calib.labels
        referral = fit_referral_rule(outputs["calib"]["class_uncertainty"].double().numpy()[:, 0], error,
                                     num_classes=prob.shape[1], risk=cp.risk, delta=cp.delta)
        if referral.threshold is None:
            log.warning("no threshold certifies an error rate <= %g among accepted cases with probability >= %g on %d "
                        "calibration images: the referral rule refers every case", cp.risk, 1 - cp.delta, len(error))
        else:
            log.info("referral: accept when class_uncertainty <= %.3f (calibration coverage %.1f %%, error rate %.3f; "
                     "promise: <= %g with probability >= %g)", referral.threshold, 100 * referral.calibration_coverage,
                     referral.calibration_risk, cp.risk, 1 - cp.delta)
        write_reliability(paths, calib, outputs["calib"], params)

    features = {}
    for name, split in splits.items():
        seg_uncertainty = outputs[name].get("seg_uncertainty")
        features[name], names = unusual_features(split.images.astype(np.float32) / PIXEL_MAX,
                                                 seg_uncertainty.numpy() if seg_uncertainty is not None else None)
    reference, held_out = features["val"], features["calib"]
    unusual = fit_unusual_rule(reference, held_out, names, cp.unusual_alpha)
    if unusual.threshold is None:
        log.warning("%d calibration images are too few to flag unusual images at unusual_alpha %g: nothing will be "
                    "flagged", len(held_out), cp.unusual_alpha)
    else:
        log.info("unusual images: max |z| over %s above %.2f (at most %g of ordinary images flagged)", ", ".join(names),
                 unusual.threshold, cp.unusual_alpha)

    if "seg_prob" in outputs["calib"] and tuple(prepared.mask_classes) == FUNDUS_MASK_CLASSES:
        predicted = outputs["calib"]["seg_prob"].argmax(dim=1).numpy().astype(np.uint8)
        classes = None
        if "class_prob" in outputs["calib"]:
            classes = np.array(prepared.class_names)[outputs["calib"]["class_prob"].argmax(dim=1).numpy()]
        vcdr = fit_vcdr_interval(np.array([metrics.vertical_cdr(m) for m in predicted]),
                                 np.array([metrics.vertical_cdr(m) for m in calib.masks]), cp.vcdr_coverage, classes)
        log.info("vCDR interval at %g %% coverage: +- %s over %d calibration images; per predicted class %s",
                 100 * cp.vcdr_coverage, f"{vcdr.halfwidth:.3f}" if vcdr.halfwidth is not None else "undefined",
                 vcdr.calibration_images, {k: None if v is None else round(v, 3) for k, v in vcdr.by_class.items()})

    result = Calibration(num_images=len(calib.labels), model_sha256=file_sha256(paths.model_pt),
                         class_temperature=class_fit, seg_temperature=seg_fit, seg_error_map=error_map,
                         referral=referral, unusual=unusual,
                         vcdr_interval=vcdr, min_image_side=cp.min_image_side)
    write_text_replacing(paths.calibration, result.model_dump_json(indent=2) + "\n")
    log.info("wrote %s", paths.calibration)
    return paths.calibration


def fit_error_map(calib: SplitScores, seg_temperature: float, pixels: np.ndarray) -> ErrorMapFit:
    """The Gaussian width (:data:`ERROR_MAP_SIGMAS`) whose smoothed entropy map ranks the
    delivered mask's wrong calibration pixels best (the pixel-error AUROC at the ``pixels``
    positions of the flattened maps); the smallest width among equals."""
    logits = calib.scores["seg_logits"]
    with torch.no_grad():
        entropy = deployment_outputs({"seg_logits": logits, "seg_uncertainty_raw": logits[:, :1]},
                                     seg_temperature=seg_temperature)["seg_uncertainty"]
    error = (logits.argmax(dim=1).numpy() != calib.masks).reshape(-1)[pixels]
    auroc = {}
    for sigma in ERROR_MAP_SIGMAS:
        smoothed = gaussian_blur(entropy, sigma).numpy().reshape(-1)[pixels]
        auroc[f"{sigma:g}"] = metrics.error_auroc(smoothed, error)
    best = max(ERROR_MAP_SIGMAS, key=lambda s: (auroc[f"{s:g}"], -s))
    log.info("error map: Gaussian width %g px (pixel-error AUROC on the calibration split by width: %s)", best,
             ", ".join(f"{k} {v:.4f}" for k, v in auroc.items()))
    return ErrorMapFit(sigma=best, auroc_by_sigma=auroc, pixels=int(len(pixels)))


def write_reliability(paths: Paths, calib: SplitScores, calibrated: dict[str, torch.Tensor], params: Params) -> Path:
    """``data/calibrate/reliability.png``: the calibration split's reliability before and after."""
    bins = params.evaluate.calibration_bins
    raw = calibrated["class_prob_raw"].double().numpy()
    tempered = calibrated["class_prob"].double().numpy()
    return plots.reliability_comparison_figure(
        paths.calibrate_dir / "reliability.png",
        {"raw": (metrics.reliability_diagram(calib.labels, raw, bins), metrics.ece(calib.labels, raw, bins)),
         "calibrated": (metrics.reliability_diagram(calib.labels, tempered, bins),
                        metrics.ece(calib.labels, tempered, bins))},
        title=f"calibration split ({len(calib.labels)} images)")
