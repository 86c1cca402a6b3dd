"""The model card the evaluate stage writes next to ``metrics.json`` (``data/reports/model_card.md``).

Every number in it is read from the same metrics the stage writes to ``metrics.json`` (through
:func:`model_card`) or from the model's ``metadata.json``; the tables name each metric by its
``metrics.json`` key, so a reader (and a test) can check one against the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from uml.onnx_model import ExportMetadata

# (metrics.json key, what it measures) per table, in the card's order; keys a model lacks are left out.
HEADLINE: tuple[tuple[str, str], ...] = (
    ("cls/auc", "AUC of the positive class"),
    ("cls/acc", "accuracy"),
    ("cls/f1", "F1 of the positive class"),
    ("cls/sensitivity", "sensitivity"),
    ("seg/dice_disc", "Dice, optic disc"),
    ("seg/dice_cup", "Dice, optic cup"),
    ("clinical/vcdr_mae", "vCDR mean absolute error"),
    ("clinical/vcdr_auc", "AUC of the predicted vCDR"),
    ("reference/vcdr_auc", "AUC of the true vCDR (the data's ceiling)"),
)
CALIBRATION: tuple[tuple[str, str], ...] = (
    ("cls/nll", "class NLL, calibrated"),
    ("raw/cls/nll", "class NLL, raw alpha/S"),
    ("cls/brier", "Brier score, calibrated"),
    ("raw/cls/brier", "Brier score, raw"),
    ("cls/ece_debiased", "debiased calibration error, calibrated"),
    ("raw/cls/ece_debiased", "debiased calibration error, raw"),
    ("cls/ece_debiased_null95", "what a perfectly calibrated model would measure here (95th percentile)"),
    ("cls/ece_debiased_p_value", "consistency p-value of the calibrated error (small: real miscalibration)"),
    ("unc/error_auroc", "AUROC of the class uncertainty for errors, calibrated"),
    ("raw/unc/error_auroc", "the same for the paper's u = K/S"),
    ("unc/pixel_error_auroc", "AUROC of the delivered mask's error map for wrong pixels"),
    ("raw/unc/pixel_error_auroc", "the same for the paper's U"),
    ("unc/pixel_error_auroc_band", "error map AUROC near the predicted contours"),
    ("raw/unc/pixel_error_auroc_band", "the same for the paper's U"),
)
REFERRAL: tuple[tuple[str, str], ...] = (
    ("refer/coverage", "share of test cases the referral rule accepts"),
    ("refer/risk", "error rate among them"),
    ("refer/combined_coverage", "share accepted when unusual images are referred too"),
    ("refer/combined_risk", "error rate among them"),
    ("unusual/flagged", "share of clean test images flagged unusual"),
    ("unusual/noise_auroc_gaussian_0.2", "AUROC of the unusual-image score for Gaussian noise 0.2"),
    ("clinical/vcdr_interval_coverage", "share of test images whose vCDR interval holds the true vCDR"),
)


def format_value(values: Mapping[str, Any], key: str) -> str:
    """``value [low, high]`` with four decimals, or ``n/a`` for a null (undefined) metric."""
    value = values.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.4f}"
    low, high = values.get(f"{key}_ci95_low"), values.get(f"{key}_ci95_high")
    if low is not None and high is not None:
        text += f" [{low:.4f}, {high:.4f}]"
    return text


def _table(values: Mapping[str, Any], rows: Sequence[tuple[str, str]]) -> list[str]:
    lines = ["| metric | `metrics.json` key | value [95 % interval] |", "|---|---|---|"]
    lines += [f"| {what} | `{key}` | {format_value(values, key)} |" for key, what in rows if key in values]
    return lines


def model_card(values: Mapping[str, Any], meta: ExportMetadata, data: Mapping[str, Any]) -> str:
    """The card in Markdown: ``values`` are the metrics as written to ``metrics.json``, ``meta`` the
    exported model's metadata, ``data`` the prepared store's attributes."""
    cal = meta.calibration
    sizes = data.get("split_sizes", {})
    lines = [
        "# Model card",
        "",
        "Written by the evaluate stage from the same numbers as `metrics.json`, on the test split.",
        "",
        "## Intended use",
        "",
        "Research use only; not a medical device and not for clinical decisions. The model classifies a "
        f"fundus-like image ({' / '.join(meta.class_names)}) and segments {', '.join(meta.mask_classes[1:])}, "
        "with calibrated probabilities, an error map of the delivered mask, a referral rule with a "
        "finite-sample promise and a flag for unusual images. It was trained and evaluated only on the "
        "data below; on other data (another camera, population or disease mix) its numbers, calibration "
        "and promises do not carry over until it is recalibrated and re-evaluated there.",
        "",
        "## Model",
        "",
        f"- Tasks {meta.tasks}, evidential heads: {meta.uncertainty}; encoders "
        f"`{(meta.model.config if meta.model else {}).get('cls_encoder', 'n/a')}` (classification) and "
        f"`{(meta.model.config if meta.model else {}).get('seg_encoder', 'n/a')}` (segmentation), "
        f"input {meta.preprocessing.image_size} x {meta.preprocessing.image_size} RGB in [0, 1].",
        f"- Training run `{meta.model.run if meta.model else 'n/a'}`, best epoch {meta.model.best_epoch if meta.model else 'n/a'}; "
        f"data hash `{(meta.hashes.data or '')[:12] if meta.hashes else ''}`.",
        "",
        "## Data",
        "",
        f"- Source `{data.get('source')}`, {data.get('num_images')} images at {data.get('image_size')} px; split "
        + ", ".join(f"{name} {size}" for name, size in sizes.items()) + ".",
        f"- Classes {data.get('fingerprint', {}).get('class_counts')}; positive class `{meta.class_names[meta.positive_class]}`"
        if meta.class_names else "- No class labels.",
        "",
        "## Results on the test split",
        "",
        *_table(values, HEADLINE),
        "",
        "## Calibration and uncertainty",
        "",
        f"Fitted on the calibration split ({cal.num_images} images), which neither training nor model "
        "selection nor testing used.",
        "",
    ]
    for name, fit in (("class", cal.class_temperature), ("segmentation", cal.seg_temperature)):
        if fit is not None:
            power = f", power {fit.power:.4f}" if fit.power != 1.0 else ""
            lines.append(f"- {name} temperature {fit.temperature:.4f}{power}: calibration NLL {fit.nll_before:.4f} -> "
                         f"{fit.nll_after:.4f}")
    lines += ["", *_table(values, CALIBRATION), "", "## Referral", ""]
    if cal.referral is not None:
        rule = cal.referral
        threshold = "every case is referred (no threshold could be certified)" if rule.threshold is None else \
            f"accept when `class_uncertainty` <= {rule.threshold:.4f}"
        lines += [f"- Rule: {threshold}. Promise: the error rate among accepted cases is at most {rule.risk:g}, "
                  f"with probability at least {1 - rule.delta:g} over the draw of the calibration split ({rule.method}).",
                  f"- On the calibration split it accepted {rule.calibration_coverage:.4f} of the cases."]
    lines += [f"- Unusual images: `max |z|` over {cal.unusual.statistics} above "
              f"{'n/a' if cal.unusual.threshold is None else f'{cal.unusual.threshold:.3f}'} is referred; at most "
              f"{cal.unusual.alpha:g} of images like the calibration split are flagged. Images with a side below "
              f"{cal.min_image_side} px are refused."]
    if cal.vcdr_interval is not None and cal.vcdr_interval.halfwidth is not None:
        per_class = ", ".join(f"{name} +- {half:.4f}" if half is not None else f"{name} n/a"
                              for name, half in cal.vcdr_interval.by_class.items())
        lines.append(f"- vCDR interval at {100 * cal.vcdr_interval.coverage:g} % coverage (split conformal per predicted "
                     f"class): {per_class or f'+- {cal.vcdr_interval.halfwidth:.4f}'}.")
    lines += ["", *_table(values, REFERRAL), "", "## Known limitations", "",
              "- The promises assume new images are drawn like the calibration split; they say nothing about "
              "another population or device.",
              "- The referral promise bounds the error rate among accepted cases on average over images, not for "
              "any single image or subgroup; the vCDR interval's coverage holds per predicted class, per true "
              "class it can differ (see `clinical/vcdr_interval_coverage_<class>` in `metrics.json`).",
              "- Unusual-image detection uses simple image statistics and the model's own uncertainty: it catches "
              "noise, blank or grayscale pictures, not every kind of shift.",
              ""]
    return "\n".join(lines)
