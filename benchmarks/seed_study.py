"""Seed study: UML and its softmax variant trained with the published loss weights (no sweep) over
several seeds, calibrated, exported and evaluated, plus each variant's seeds averaged as a deep
ensemble; one table with the raw and calibrated outputs side by side.

    python benchmarks/seed_study.py --out benchmarks/results/seeds                 # 2 variants x 5 seeds
    python benchmarks/seed_study.py --out /tmp/s --seeds 2 --set train.epochs=4    # a quicker look
    python benchmarks/seed_study.py --out benchmarks/results/seeds --collect-only  # the tables again
    python benchmarks/seed_study.py --out benchmarks/results/seeds --reevaluate    # post-training stages again
    python benchmarks/seed_study.py --out benchmarks/results/seeds --reevaluate uml-s0  # ... of one run

Every run is the repository's own stages (``python -m pipeline.<stage> --params <run>/params.yaml``:
train, calibrate, export, evaluate) with ``params.yaml`` as it is, ``train.use_tuned: false`` (the
published loss weights: without it, each seed would train with the weights its own sweep chose,
and the seed spread would mix the two), ``train.seed`` and, for ``softmax``,
``model.uncertainty: false``. The data set is prepared once and shared. Each run lives in
``<work>/<variant>-s<seed>/`` and is skipped when its record is there for the same params (an
interrupted study resumes, and a run interrupted after training keeps its model; so does a run whose
params differ only in the calibrate, export or evaluate sections); ``--reevaluate`` runs calibrate, export and evaluate of the finished
runs again (after a change to those stages: the trained models stay).

Writes ``<out>/runs/<variant>-s<seed>.json`` (metrics, params overrides, wall time per stage),
``<out>/ensemble-<variant>.json``, and ``<out>/seeds.md`` / ``seeds.csv``: per metric the mean
over seeds with the standard deviation and the range, the mean of the runs' 95 % intervals, and
the ensemble; then, per UML seed, the checks that calibration left AUC, ACC and F1 unchanged and
lowered NLL and Brier, the debiased ECE and the pixel error AUROC.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from _machine import command_line, cpu_name  # noqa: E402

VARIANTS = {"uml": [], "softmax": ["model.uncertainty=false"]}
STAGES = ("train", "calibrate", "export", "evaluate")
# (metrics.json key, column title, higher is better); the calibrated (deployment) output first,
# the paper's raw output under raw/.
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("cls/auc", "AUC", True),
    ("cls/acc", "ACC", True),
    ("cls/f1", "F1", True),
    ("seg/dice_disc", "Dice disc", True),
    ("seg/dice_cup", "Dice cup", True),
    ("cls/nll", "NLL", False),
    ("cls/brier", "Brier", False),
    ("cls/ece", "ECE", False),
    ("cls/ece_debiased", "debiased ECE", False),
    ("unc/error_auroc", "error AUROC", True),
    ("sel/aurc_calibrated", "AURC", False),
    ("unc/pixel_error_auroc", "pixel error AUROC", True),
    ("unc/pixel_error_auroc_band", "pixel AUROC near contours", True),
    ("refer/coverage", "referral coverage", True),
    ("refer/risk", "referral risk", False),
    ("unusual/noise_auroc_gaussian_0.2", "unusual-image noise AUROC (sigma 0.2)", True),
    ("clinical/vcdr_interval_coverage", "vCDR interval coverage", True),
)
# The same columns for the paper's raw outputs (those that differ from the calibrated ones).
RAW_KEYS = {"cls/nll": "raw/cls/nll", "cls/brier": "raw/cls/brier", "cls/ece": "raw/cls/ece",
            "cls/ece_debiased": "raw/cls/ece_debiased", "unc/error_auroc": "raw/unc/error_auroc",
            "sel/aurc_calibrated": "sel/aurc_raw_uncertainty", "unc/pixel_error_auroc": "raw/unc/pixel_error_auroc",
            "unc/pixel_error_auroc_band": "raw/unc/pixel_error_auroc_band"}


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def run_params(base: dict[str, Any], variant: str, seed: int, extra: list[str], root: Path) -> dict[str, Any]:
    from tests.dag.miniature import apply_overrides

    raw = json.loads(json.dumps(base))
    apply_overrides(raw, ["train.use_tuned=false", f"train.seed={seed}", *VARIANTS[variant], *extra])
    raw["data"]["root"] = str(root / "data")
    return raw


def stage(name: str, params_file: Path, log_file: Path) -> float:
    """Run one stage in its own process (its own local Ray instance); its output goes to ``log_file``."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    with log_file.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", f"pipeline.{name}", "--params", str(params_file)], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see {log_file}")
    return time.perf_counter() - start


def prepare_shared(base: dict[str, Any], extra: list[str], work: Path) -> Path:
    """Prepare the data set once; each run links it into its own data root."""
    from tests.dag.miniature import apply_overrides

    raw = json.loads(json.dumps(base))
    apply_overrides(raw, [item for item in extra if item.startswith("data.")])
    raw["data"]["root"] = str(work / "shared" / "data")
    params_file = work / "shared" / "params.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    store = work / "shared" / "data" / "prepared" / "dataset.zarr"
    if not store.exists():
        log("preparing the shared data set")
        stage("prepare", params_file, work / "shared" / "prepare.log")
    return store


# Sections that only the stages after training read: a change there keeps a run's trained model.
POST_TRAINING_SECTIONS = ("calibrate", "export", "evaluate")


def training_params(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's params without the sections only the post-training stages read."""
    return {section: values for section, values in raw.items() if section not in POST_TRAINING_SECTIONS}


def run_one(base: dict[str, Any], variant: str, seed: int, extra: list[str], work: Path, store: Path, out: Path,
            reevaluate: bool = False) -> dict:
    name = f"{variant}-s{seed}"
    root = work / name
    raw = run_params(base, variant, seed, extra, root)
    record_path = out / "runs" / f"{name}.json"
    stages = STAGES
    params_file = root / "params.yaml"
    trained = (root / "data" / "models" / "model.pt").exists()
    record: dict = {"seconds": {}}
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("params") == raw and not reevaluate:
            log(f"{name}: done already ({record_path})")
            return record
        if training_params(record.get("params", {})) == training_params(raw) and trained:
            stages = STAGES[1:]  # the trained model stays; the stages after training run again
    elif trained and params_file.exists() and training_params(yaml.safe_load(params_file.read_text())) == training_params(raw):
        stages = STAGES[1:]  # interrupted after training: the finished model is kept
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    if not (prepared / "dataset.zarr").exists():
        (prepared / "dataset.zarr").symlink_to(store)
    seconds = dict(record.get("seconds", {})) if stages != STAGES else {}
    for name_ in stages:
        log(f"{name}: {name_}")
        seconds[name_] = stage(name_, params_file, root / "stages.log")
    metrics = json.loads((root / "data" / "reports" / "metrics.json").read_text())
    record = {"run": name, "variant": variant, "seed": seed, "params": raw, "seconds": seconds, "metrics": metrics,
              "finished": dt.datetime.now().isoformat(timespec="seconds")}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    log(f"{name}: done in {sum(seconds.values()):.0f} s (AUC {metrics.get('cls/auc')}, debiased ECE "
        f"{metrics.get('cls/ece_debiased')}, pixel error AUROC {metrics.get('unc/pixel_error_auroc')})")
    return record


def ensemble(variant: str, records: list[dict], work: Path, store: Path, pixel_budget: int = 1_000_000) -> dict[str, float]:
    """The seeds' exported models averaged (class_prob_raw and seg_prob) on the test split."""
    from uml import metrics
    from uml.data.store import load_split
    from uml.onnx_model import OnnxModel

    images, masks, labels, indices = load_split(store, "test")
    class_prob, seg_prob = 0.0, 0.0
    for record in records:
        model = OnnxModel(work / record["run"] / "data" / "models" / "model.onnx")
        parts: dict[str, list[np.ndarray]] = {"class_prob_raw": [], "seg_prob": []}
        for start in range(0, len(images), 16):
            out = model.run(model.preprocess(images[start:start + 16]))
            for key in parts:
                parts[key].append(out[key].astype(np.float64))
        class_prob = class_prob + np.concatenate(parts["class_prob_raw"]) / len(records)
        seg_prob = seg_prob + np.concatenate(parts["seg_prob"]) / len(records)
    positive = model.positive_class
    result = {f"cls/{k}": v for k, v in metrics.classification_metrics(labels, class_prob, positive).items()}
    error = metrics.predicted_class(class_prob) != labels
    uncertainty = 1.0 - class_prob.max(axis=1)
    result["unc/error_auroc"] = metrics.error_auroc(uncertainty, error)
    result["sel/aurc_calibrated"] = metrics.aurc(uncertainty, error)
    pred = seg_prob.argmax(axis=1).astype(np.uint8)
    for key, value in metrics.summarise_segmentation(metrics.segmentation_per_image(pred, masks, model.mask_classes,
                                                                                    distances=False)).items():
        result[f"seg/{key}"] = value
    entropy = -(seg_prob * np.log(np.clip(seg_prob, 1e-12, None))).sum(axis=1) / math.log(seg_prob.shape[1])
    per_image = max(1, pixel_budget // len(images))
    samples = {"uncertainty": [], "error": []}
    band_samples = {"uncertainty": [], "error": []}
    for j, index in enumerate(indices):
        rng = np.random.default_rng([0, 0, int(index)])
        maps = {"uncertainty": entropy[j], "error": pred[j] != masks[j]}
        for key, values in metrics.sample_pixels(per_image, rng, **maps).items():
            samples[key].append(values)
        near = metrics.contour_band(pred[j], model.mask_classes, 3.0)
        for key, values in metrics.sample_pixels(per_image, rng, where=near, **maps).items():
            band_samples[key].append(values)
    result["unc/pixel_error_auroc"] = metrics.error_auroc(np.concatenate(samples["uncertainty"]), np.concatenate(samples["error"]))
    result["unc/pixel_error_auroc_band"] = metrics.error_auroc(np.concatenate(band_samples["uncertainty"]),
                                                               np.concatenate(band_samples["error"]))
    log(f"ensemble of {len(records)} {variant} models: AUC {result['cls/auc']:.3f}, ECE {result['cls/ece']:.3f}, "
        f"pixel error AUROC {result['unc/pixel_error_auroc']:.3f}")
    return result


def number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def summary(records: list[dict], key: str) -> str:
    values = [v for v in (number(r["metrics"].get(key)) for r in records) if v is not None]
    if not values:
        return "n/a"
    text = f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f} ({min(values):.3f}–{max(values):.3f})"
    lows = [number(r["metrics"].get(f"{key}_ci95_low")) for r in records]
    highs = [number(r["metrics"].get(f"{key}_ci95_high")) for r in records]
    if all(v is not None for v in lows + highs):
        text += f" [{np.mean(lows):.2f}, {np.mean(highs):.2f}]"
    return text


def write_tables(runs: dict[str, list[dict]], ensembles: dict[str, dict[str, float]], out: Path, command: str) -> None:
    rows = []
    for variant, records in runs.items():
        rows.append((f"`{variant}` calibrated", {key: summary(records, key) for key, _, _ in COLUMNS}))
        rows.append((f"`{variant}` raw", {key: summary(records, RAW_KEYS.get(key, key)) if key in RAW_KEYS else "(same)"
                                          for key, _, _ in COLUMNS}))
        if variant in ensembles:
            rows.append((f"`{variant}` ensemble of {len(records)}",
                         {key: f"{ensembles[variant][key]:.3f}" if key in ensembles[variant] and number(ensembles[variant][key]) is not None
                          else "–" for key, _, _ in COLUMNS}))
    lines = [f"# Seed study ({dt.date.today().isoformat()})", "",
             f"Command: `{command}`. Machine: {cpu_name()}, {os.cpu_count()} CPUs. Each cell: mean ± standard deviation "
             "over seeds (range), and in brackets the mean of the runs' 95 % bootstrap intervals over the test images. "
             "\"raw\" is the paper's output (alpha/S, u = K/S, U); \"(same)\" where calibration cannot change the value. "
             "The ensemble averages the seeds' raw class probabilities and their segmentation probabilities.", ""]
    header = "| run | " + " | ".join(f"{title} {'↑' if higher else '↓'}" for _, title, higher in COLUMNS) + " |"
    lines += [header, "|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + name + " | " + " | ".join(cells[key] for key, _, _ in COLUMNS) + " |" for name, cells in rows]
    lines += ["", "## Per UML seed", "", "| seed | AUC raw → cal | ACC raw → cal | F1 raw → cal | NLL raw → cal | "
              "Brier raw → cal | debiased ECE cal (null 95th pct, p-value) | pixel error AUROC (map / U) |", "|---|---|---|---|---|---|---|---|"]
    for record in runs.get("uml", []):
        m = record["metrics"]

        def pair(key: str, raw_key: str) -> str:
            return f"{m[raw_key]:.4f} → {m[key]:.4f}" if number(m.get(key)) is not None and number(m.get(raw_key)) is not None else "n/a"

        lines.append(f"| {record['seed']} | {pair('cls/auc', 'raw/cls/auc')} | {pair('cls/acc', 'raw/cls/acc')} | "
                     f"{pair('cls/f1', 'raw/cls/f1')} | {pair('cls/nll', 'raw/cls/nll')} | {pair('cls/brier', 'raw/cls/brier')} | "
                     f"{m['cls/ece_debiased']:.4f} ({noise(m)}) | {m['unc/pixel_error_auroc']:.4f} / {m['raw/unc/pixel_error_auroc']:.4f} |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    with (out / "seeds.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["run", "variant", "seed", *[key for key, _, _ in COLUMNS], *RAW_KEYS.values()])
        for variant, records in runs.items():
            for record in records:
                writer.writerow([record["run"], variant, record["seed"],
                                 *[record["metrics"].get(key) for key, _, _ in COLUMNS],
                                 *[record["metrics"].get(key) for key in RAW_KEYS.values()]])
    log(f"wrote {out / 'seeds.md'} and {out / 'seeds.csv'}")


def noise(m: dict) -> str:
    """The debiased ECE's noise check of one run: the null's 95th percentile and the p-value."""
    null95, p_value = number(m.get("cls/ece_debiased_null95")), number(m.get("cls/ece_debiased_p_value"))
    return "n/a" if null95 is None or p_value is None else f"{null95:.3f}, p = {p_value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the tables and run records go")
    parser.add_argument("--work", type=Path, default=Path("/tmp/uml-seed-study"), help="run folders (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides for every run")
    parser.add_argument("--collect-only", action="store_true", help="rebuild the tables from finished runs")
    parser.add_argument("--reevaluate", nargs="*", metavar="RUN", default=None,
                        help="run calibrate, export and evaluate of finished runs again (the named runs, e.g. uml-s0, or all)")
    args = parser.parse_args(argv)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.work / "shared" / "data" / "prepared" / "dataset.zarr"
    if not args.collect_only:
        store = prepare_shared(base, args.set, args.work)
    runs: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in range(args.seeds):
            if args.collect_only:
                path = args.out / "runs" / f"{variant}-s{seed}.json"
                if path.exists():
                    runs.setdefault(variant, []).append(json.loads(path.read_text()))
                continue
            again = args.reevaluate is not None and (not args.reevaluate or f"{variant}-s{seed}" in args.reevaluate)
            runs.setdefault(variant, []).append(run_one(base, variant, seed, args.set, args.work, store, args.out, again))
    ensembles = {}
    for variant, records in runs.items():
        path = args.out / f"ensemble-{variant}.json"
        if len(records) > 1 and all((args.work / r["run"] / "data" / "models" / "model.onnx").exists() for r in records):
            ensembles[variant] = ensemble(variant, records, args.work, store)
            path.write_text(json.dumps(ensembles[variant], indent=1))
        elif path.exists():
            ensembles[variant] = json.loads(path.read_text())
    write_tables(runs, ensembles, args.out, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
