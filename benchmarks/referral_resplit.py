"""How often the calibrate stage's promises break: the referral rule, the unusual-image flag and the
vCDR interval refitted on many random calibration sets and checked on the images left out.

    python benchmarks/referral_resplit.py --root data --out benchmarks/results/referral
    python benchmarks/referral_resplit.py --root data --pool 0 --resplits 200 --out /tmp/r   # store only

The exported model (``<root>/models/model.onnx`` with its ``metadata.json``) runs once over two
sets of images that took no part in training or model selection:

- ``store``: the prepared store's calibration and test splits together (1386 images by default),
  split at random into a calibration half and a test half ``--resplits`` times;
- ``pool``: ``--pool`` fresh synthetic images (the default data set's generator with another
  seed), from which each resplit draws a calibration set of the calibration split's size and
  keeps the rest, thousands of images, as a close estimate of the population.

Each resplit refits, with the stage's own functions and settings (``metadata.json``'s epsilon,
delta, alpha and coverage), the Learn-then-Test threshold on the calibration part and measures
the error rate among the accepted cases of the rest: the promise "at most epsilon" must fail in
at most a delta share of the resplits. It also refits the unusual-image threshold (the share of
ordinary images it flags must average at most alpha) and the vCDR half-width (its coverage must
average at least the promised one). Writes ``referral.md`` and ``referral.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from _machine import command_line, cpu_name  # noqa: E402


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def model_outputs(model, images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: the calibrated class uncertainty, whether the class is wrong, the unusual-image
    features, and the predicted and true vCDR."""
    from uml import metrics

    parts: dict[str, list[np.ndarray]] = {"uncertainty": [], "error": [], "features": [], "vcdr": [], "predicted": []}
    for start in range(0, len(images), 32):
        scaled = model.scale_images(images[start:start + 32])
        out = model.run(model.to_input(scaled))
        parts["uncertainty"].append(out["class_uncertainty"][:, 0].astype(np.float64))
        parts["error"].append(out["class_prob"].argmax(axis=1) != labels[start:start + 32])
        parts["predicted"].append(np.array(model.class_names)[out["class_prob"].argmax(axis=1)])
        parts["features"].append(model.unusual_features(scaled, out.get("seg_uncertainty")))
        parts["vcdr"].append(np.array([metrics.vertical_cdr(m) for m in out["seg_prob"].argmax(axis=1)]))
    result = {key: np.concatenate(values) for key, values in parts.items()}
    result["vcdr_true"] = np.array([metrics.vertical_cdr(m) for m in masks])
    return result


def fresh_pool(params, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` new synthetic images from the default generator with another seed."""
    from uml.data.synthetic import SyntheticSource

    synthetic = params.data.synthetic.model_copy(update={"num_images": count})
    source = SyntheticSource(synthetic, params.data.image_size, seed=seed)
    images, masks, labels = [], [], []
    for record in source:
        images.append(record.image)
        masks.append(record.mask)
        labels.append(record.label)
    return np.stack(images), np.stack(masks), np.array(labels)


def resplit(outputs: dict[str, np.ndarray], calibration, n_calib: int, resplits: int, seed: int,
            pool: bool) -> dict[str, float]:
    """Refit the three rules on ``resplits`` random calibration sets of ``n_calib`` images and check each
    on the images left out (all of them; for the store, an equal half)."""
    from uml.calibration import conformal_quantile, fit_referral_rule, fit_vcdr_interval

    rule, unusual, interval = calibration.referral, calibration.unusual, calibration.vcdr_interval
    rng = np.random.default_rng(seed)
    n = len(outputs["error"])
    scores = unusual.score(outputs["features"])
    risks, coverages, violations, flagged, vcdr_coverage, uncertified = [], [], 0, [], [], 0
    for _ in range(resplits):
        order = rng.permutation(n)
        calib, rest = order[:n_calib], order[n_calib:] if pool else order[n_calib:2 * n_calib]
        fitted = fit_referral_rule(outputs["uncertainty"][calib], outputs["error"][calib], num_classes=2,
                                   risk=rule.risk, delta=rule.delta)
        if fitted.threshold is None:
            uncertified += 1
        else:
            accepted = outputs["uncertainty"][rest] <= fitted.threshold
            risk = float(outputs["error"][rest][accepted].mean()) if accepted.any() else 0.0
            risks.append(risk)
            coverages.append(float(accepted.mean()))
            violations += risk > rule.risk
        threshold = conformal_quantile(scores[calib], 1.0 - unusual.alpha)
        if threshold is not None:
            flagged.append(float((scores[rest] > threshold).mean()))
        fitted_interval = fit_vcdr_interval(outputs["vcdr"][calib], outputs["vcdr_true"][calib], interval.coverage,
                                            outputs["predicted"][calib])
        half = np.array([np.nan if (h := fitted_interval.halfwidth_for(c)) is None else h for c in outputs["predicted"][rest]])
        defined = np.isfinite(outputs["vcdr"][rest]) & np.isfinite(half)
        if defined.any():
            error = np.abs(outputs["vcdr"][rest] - outputs["vcdr_true"][rest])
            vcdr_coverage.append(float((error[defined] <= half[defined]).mean()))
    certified = resplits - uncertified
    return {
        "resplits": resplits, "calibration_images": n_calib, "checked_images": int(n - n_calib if pool else n_calib),
        "risk_promised": rule.risk, "delta": rule.delta, "certified": certified,
        "violations": int(violations), "violation_rate": violations / resplits,
        "mean_risk": float(np.mean(risks)) if risks else math.nan,
        "risk_p95": float(np.percentile(risks, 95)) if risks else math.nan,
        "mean_coverage": float(np.mean(coverages)) if coverages else math.nan,
        "unusual_alpha": unusual.alpha, "unusual_mean_flagged": float(np.mean(flagged)) if flagged else math.nan,
        "vcdr_coverage_promised": interval.coverage,
        "vcdr_mean_coverage": float(np.mean(vcdr_coverage)) if vcdr_coverage else math.nan,
        "vcdr_coverage_p05": float(np.percentile(vcdr_coverage, 5)) if vcdr_coverage else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    from uml.config import load_params
    from uml.data.store import load_split, open_prepared
    from uml.onnx_model import OnnxModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data"), help="data.root of a finished run (default: %(default)s)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params of the fresh pool's generator")
    parser.add_argument("--pool", type=int, default=4000, help="fresh synthetic images (0: the store's images only)")
    parser.add_argument("--resplits", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    model = OnnxModel(args.root / "models" / "model.onnx")
    prepared = open_prepared(args.root / "prepared" / "dataset.zarr")
    held_out = [load_split(prepared, name) for name in ("calib", "test")]
    images, masks, labels = (np.concatenate([part[i] for part in held_out]) for i in range(3))
    n_calib = len(held_out[0][2])
    log(f"running {model.path} on the store's calibration and test splits ({len(labels)} images)")
    results = {"store": resplit(model_outputs(model, images, masks, labels), model.calibration, n_calib,
                                args.resplits, args.seed, pool=False)}
    if args.pool:
        params = load_params(args.params)
        log(f"rendering {args.pool} fresh synthetic images (generator seed {params.data.seed + 1000})")
        images, masks, labels = fresh_pool(params, args.pool, params.data.seed + 1000)
        log("running the model on them")
        results["pool"] = resplit(model_outputs(model, images, masks, labels), model.calibration, n_calib,
                                  args.resplits, args.seed, pool=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "referral.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Referral, unusual-image and vCDR promises under resplitting ({dt.date.today().isoformat()})", "",
             f"Command: `{command_line()}`; model {model.path} (run `{model.metadata.model.run if model.metadata.model else ''}`); "
             f"{cpu_name()}.", "",
             "| images | resplits | calibration / checked images | promised risk (delta) | resplits with a certified threshold | "
             "violations (share) | mean risk (95th pct) | mean coverage | unusual flagged (alpha) | vCDR coverage mean (5th pct; promised) |",
             "|---|---:|---|---|---:|---:|---|---:|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['resplits']} | {r['calibration_images']} / {r['checked_images']} | {r['risk_promised']:g} "
                     f"({r['delta']:g}) | {r['certified']} | {r['violations']} ({r['violation_rate']:.3f}) | "
                     f"{r['mean_risk']:.3f} ({r['risk_p95']:.3f}) | {r['mean_coverage']:.3f} | "
                     f"{r['unusual_mean_flagged']:.4f} ({r['unusual_alpha']:g}) | {r['vcdr_mean_coverage']:.3f} "
                     f"({r['vcdr_coverage_p05']:.3f}; {r['vcdr_coverage_promised']:g}) |")
    (args.out / "referral.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
