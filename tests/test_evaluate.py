"""uml.evaluate with a tiny exported ONNX model whose every output is predictable (tests/toy_onnx.py).

Controlled model on purpose: the values asserted here (accuracy 0.9, AUC 0.99, Dice 1, the
direction of each noise's effect on uncertainty) are known only because the toy's behaviour is.
The real exported model is evaluated in tests/dag/ (test_metrics.py, test_predict_evaluate.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from tests.toy_onnx import FLIPPED, RATIOS, ToyUML, export_toy, fundus_set, move_model_away_once_shipped
from tests.toy_onnx import imperfect_set as _imperfect_set
from tests.toy_onnx import write_toy_root as _prepared_root
import uml.evaluate
from uml import metrics
from uml.config import EvaluateParams, Paths, parse_params
from uml.errors import ConfigError, ModelFileError
from uml.evaluate import ArraySplit, evaluate, evaluate_arrays, run_pass
from uml.onnx_model import OnnxModel

# Few noise levels keep the module fast; the keys for each are still all checked.
CFG = EvaluateParams(batch_size=8, gaussian_sigmas=[0.05, 0.2], salt_pepper_amounts=[0.1], num_panels=3)
ROBUST = ["gaussian_0.05", "gaussian_0.2", "salt_pepper_0.1"]
# The metrics that get bootstrap intervals (a joint fundus model has them all).
INTERVAL_KEYS = ["cls/auc", "cls/acc", "cls/f1", "cls/sensitivity", "cls/ece", "seg/dice_disc", "seg/dice_cup",
                 "unc/error_auroc", "unc/pixel_error_auroc", "clinical/vcdr_auc", "reference/vcdr_auc"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    # Controlled model (toy): see the module docstring.
    return export_toy(tmp_path_factory.mktemp("toy") / "models").parent


@pytest.fixture(scope="module")
def data():
    return fundus_set()


@pytest.fixture(scope="module")
def evaluated(toy_dir, data, tmp_path_factory):
    plots_dir = tmp_path_factory.mktemp("plots")
    images, masks, labels = data
    return evaluate_arrays(OnnxModel(toy_dir / "model.onnx"), images, masks, labels, CFG, plots_dir=plots_dir), plots_dir


def test_metric_values_on_the_toy_model(evaluated, data):
    result, _ = evaluated
    _, masks, labels = data
    # The two images nearest the 0.5 ratio threshold carry flipped labels: 18 / 20 correct,
    # one false negative and one false positive among 10 + 10.
    assert result["cls/acc"] == pytest.approx(0.9)
    assert result["cls/sensitivity"] == pytest.approx(0.9)
    assert result["cls/specificity"] == pytest.approx(0.9)
    assert result["cls/f1"] == pytest.approx(0.9)
    assert result["cls/kappa"] == pytest.approx(0.8)
    # The toy's probability is monotonic in the ratio: the flipped pair is the one discordant pair.
    assert result["cls/auc"] == pytest.approx(0.99)
    assert 0.0 < result["cls/ece"] < 0.5
    # Perfect segmentation of noise-free images.
    for s in ("disc", "cup"):
        assert result[f"seg/dice_{s}"] == 1.0
        assert result[f"seg/assd_{s}"] == 0.0
        assert result[f"seg/hd95_{s}"] == 0.0
        assert result[f"seg/dist_undefined_{s}"] == 0.0
    assert result["clinical/vcdr_mae"] == 0.0
    gt_vcdr = [metrics.vertical_cdr(m) for m in masks]
    assert result["clinical/vcdr_auc"] == pytest.approx(roc_auc_score(labels, gt_vcdr))
    # The mistakes are the most uncertain images: uncertainty finds them all, referral removes them.
    assert result["unc/error_auroc"] == 1.0
    for pct in (10, 20, 30):
        assert result[f"unc/referral_acc_{pct}"] == 1.0
    assert 0.0 < result["unc/mean_class_uncertainty"] < 1.0
    assert 0.0 < result["unc/mean_pixel_uncertainty"] < 0.2
    # No pixel errors at all: the pixel AUROC is undefined, not invented.
    assert np.isnan(result["unc/pixel_error_auroc"])


def test_reference_keys_on_the_toy_model(evaluated):
    result, _ = evaluated
    assert result["reference/positive_fraction"] == 0.5  # 10 of the 20 labels
    # Ground-truth vCDR as the score, 10 x 10 pairs: the flipped pair (ratio 0.48, label 1, vCDR 0.50;
    # ratio 0.53, label 0, vCDR 0.55) is ordered wrong, and ratio 0.57 (label 1) rounds to the same
    # 0.55 rows as 0.53: a tie, half a pair. (100 - 1 - 0.5) / 100.
    assert result["reference/vcdr_auc"] == pytest.approx(0.985)
    assert result["clinical/vcdr_auc"] == pytest.approx(0.985)  # the toy segments perfectly


def test_bootstrap_intervals_on_the_toy_model(evaluated):
    result, _ = evaluated
    for key in INTERVAL_KEYS:
        low, high = result[f"{key}_ci95_low"], result[f"{key}_ci95_high"]
        if key == "unc/pixel_error_auroc":
            assert np.isnan(low) and np.isnan(high)  # no pixel errors: undefined in every resample
        else:
            assert low <= result[key] <= high, key
    # 18 of 20 correct: a resample's accuracy is Binomial(20, 0.9) / 20, whose 2.5 % and 97.5 %
    # quantiles are 15/20 (P(X <= 14) = 0.011, P(X <= 15) = 0.043) and 20/20 (P(X = 20) = 0.12).
    assert (result["cls/acc_ci95_low"], result["cls/acc_ci95_high"]) == (0.75, 1.0)
    # Every image has Dice 1, and the two mistakes are always the most uncertain images.
    for key in ("seg/dice_disc", "seg/dice_cup", "unc/error_auroc"):
        assert (result[f"{key}_ci95_low"], result[f"{key}_ci95_high"]) == (1.0, 1.0), key
    # Each interval sits right after its metric.
    keys = list(result)
    position = keys.index("cls/auc")
    assert keys[position + 1 : position + 3] == ["cls/auc_ci95_low", "cls/auc_ci95_high"]


def test_noise_detection_auroc(toy_dir, data, evaluated):
    result, _ = evaluated
    images, masks, _ = data
    for level in ROBUST:
        assert f"unc/noise_auroc_{level}" in result and f"unc/pixel_noise_auroc_{level}" in result
    # The toy's pixel uncertainty grows as brightness nears its thresholds (0.45, 0.75). Gaussian
    # noise pushes pixels of every image towards them: each corrupted copy is more uncertain than
    # any clean image. Salt (1.0) and pepper (0.0) move pixels away from them: each copy is less.
    assert result["unc/pixel_noise_auroc_gaussian_0.2"] == 1.0
    assert result["unc/pixel_noise_auroc_salt_pepper_0.1"] == 0.0
    # The image-level value is the AUROC of the clean and corrupted passes' class uncertainties.
    model = OnnxModel(toy_dir / "model.onnx")
    split = ArraySplit(images, masks, data[2])
    clean = run_pass(model, split, 8, seed=CFG.seed).class_uncertainty
    noisy = run_pass(model, split, 8, noise=("gaussian", 0.2), seed=CFG.seed).class_uncertainty
    expected = roc_auc_score(np.r_[np.zeros(20), np.ones(20)], np.r_[clean, noisy])
    assert result["unc/noise_auroc_gaussian_0.2"] == pytest.approx(expected)
    assert 0.5 < expected < 1.0


def test_noise_that_changes_nothing_is_not_detected(toy_dir, data):
    # sigma 1e-9 is below float32 resolution at these brightnesses: the copies equal the clean
    # images, every (clean, copy) pair is tied, the AUROC is 1/2.
    cfg = CFG.model_copy(update={"gaussian_sigmas": [1e-9], "salt_pepper_amounts": [], "num_panels": 0,
                                 "bootstrap_samples": 0})
    result = evaluate_arrays(OnnxModel(toy_dir / "model.onnx"), *data, cfg)
    assert result["unc/noise_auroc_gaussian_1e-09"] == pytest.approx(0.5)
    assert result["unc/pixel_noise_auroc_gaussian_1e-09"] == pytest.approx(0.5)
    assert not any("_ci95_" in key for key in result)  # bootstrap_samples: 0 turns the intervals off


def test_bootstrap_samples_param_is_checked():
    with pytest.raises(ConfigError, match=r"evaluate\.bootstrap_samples: .*at least 100.*got 50"):
        parse_params({"evaluate": {"bootstrap_samples": 50}})
    assert parse_params({"evaluate": {"bootstrap_samples": 0}}).evaluate.bootstrap_samples == 0


def test_robustness_keys_and_trends(evaluated):
    result, _ = evaluated
    for level in ROBUST:
        for key in ("cls/acc", "cls/auc", "seg/dice_disc", "seg/dice_cup", "unc/mean_class_uncertainty", "unc/mean_pixel_uncertainty"):
            assert f"robust/{level}/{key}" in result
    # Strong noise hurts the cup (whose brightness margin is smallest) and raises uncertainty.
    assert result["robust/gaussian_0.2/seg/dice_cup"] < result["robust/gaussian_0.05/seg/dice_cup"] <= 1.0
    assert result["robust/gaussian_0.2/seg/dice_cup"] < 0.95
    assert result["robust/gaussian_0.2/unc/mean_pixel_uncertainty"] > result["unc/mean_pixel_uncertainty"]
    assert result["robust/gaussian_0.2/unc/mean_class_uncertainty"] > result["unc/mean_class_uncertainty"]
    assert result["robust/salt_pepper_0.1/seg/dice_cup"] < 0.95


def test_noise_is_deterministic_and_independent_of_batch_size(toy_dir, data, evaluated):
    result, _ = evaluated
    cfg = CFG.model_copy(update={"batch_size": 3, "num_panels": 0})
    again = evaluate_arrays(OnnxModel(toy_dir / "model.onnx"), *data, cfg)
    assert again.keys() == result.keys()
    for key, value in result.items():
        assert again[key] == pytest.approx(value, nan_ok=True), key
    other_seed = evaluate_arrays(OnnxModel(toy_dir / "model.onnx"), *data, cfg.model_copy(update={"seed": 1}))
    assert other_seed["robust/gaussian_0.2/seg/dice_cup"] != result["robust/gaussian_0.2/seg/dice_cup"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_plot_files(evaluated, data):
    result, plots_dir = evaluated
    names = {"roc.csv", "roc.png", "reliability.csv", "reliability.png", "referral.csv", "referral.png",
             "robustness_gaussian.csv", "robustness_salt_pepper.csv", "robustness.png"}
    for name in names:
        assert (plots_dir / name).stat().st_size > 100, name
    assert sorted(p.name for p in (plots_dir / "panels").iterdir()) == ["case_000.png", "case_010.png", "case_019.png"]

    roc = _read_csv(plots_dir / "roc.csv")
    fpr, tpr = np.array([float(r["fpr"]) for r in roc]), np.array([float(r["tpr"]) for r in roc])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    # Each point is the rate of positives and of negatives whose glaucoma probability (from the toy
    # model in torch, not through onnxruntime) reaches its threshold; the area is the hand-counted 0.99.
    images, _, labels = data
    with torch.no_grad():
        score = ToyUML()(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0))[0][:, 1].numpy()
    for row in roc:
        threshold = float(row["threshold"])
        assert float(row["tpr"]) == pytest.approx(np.mean(score[labels == 1] >= threshold - 1e-6)), row
        assert float(row["fpr"]) == pytest.approx(np.mean(score[labels == 0] >= threshold - 1e-6)), row
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.99)

    reliability = _read_csv(plots_dir / "reliability.csv")
    assert sum(int(r["count"]) for r in reliability) == len(RATIOS)

    referral = _read_csv(plots_dir / "referral.csv")
    assert float(referral[0]["referred_fraction"]) == 0.0
    assert float(referral[0]["accuracy"]) == pytest.approx(result["cls/acc"])

    gaussian = _read_csv(plots_dir / "robustness_gaussian.csv")
    assert [float(r["level"]) for r in gaussian] == [0.0, 0.05, 0.2]
    assert float(gaussian[-1]["seg_dice_cup"]) == pytest.approx(result["robust/gaussian_0.2/seg/dice_cup"])
    assert set(gaussian[0]) == {"level", "cls_acc", "cls_auc", "seg_dice_disc", "seg_dice_cup",
                                "unc_mean_class_uncertainty", "unc_mean_pixel_uncertainty"}


def test_pixel_uncertainty_flags_boundary_errors(toy_dir, data):
    # Blurring makes boundary pixels ambiguous: some are misclassified, and exactly those are uncertain.
    images, masks, labels = data
    blurred = np.stack([ndimage.gaussian_filter(im.astype(np.float32), sigma=(1.2, 1.2, 0)) for im in images])
    cfg = CFG.model_copy(update={"gaussian_sigmas": [], "salt_pepper_amounts": [], "num_panels": 0})
    result = evaluate_arrays(OnnxModel(toy_dir / "model.onnx"), blurred.round().astype(np.uint8), masks, labels, cfg)
    assert result["unc/pixel_error_auroc"] > 0.9
    # Resampling images (and pooling their pixels) gives an interval around it.
    assert result["unc/pixel_error_auroc_ci95_low"] < result["unc/pixel_error_auroc"] < result["unc/pixel_error_auroc_ci95_high"]
    assert 0.9 < result["seg/dice_disc"] < 1.0
    assert 0.5 <= result["seg/hd95_disc"] <= 2.0  # boundaries move by about a pixel
    assert not any(k.startswith("robust/") for k in result)


@pytest.mark.parametrize("tasks", [("seg",), ("cls",)])
def test_single_task_models_get_the_metrics_they_allow(tasks, data, tmp_path):
    # Controlled models (toy): single-task exports in a second, without another training run.
    model = OnnxModel(export_toy(tmp_path / "models", tasks=tasks))
    result = evaluate_arrays(model, *data, CFG, plots_dir=tmp_path / "plots")
    has_cls = any(k.startswith("cls/") for k in result)
    has_seg = any(k.startswith("seg/") for k in result)
    assert (has_cls, has_seg) == ("cls" in tasks, "seg" in tasks)
    assert ("clinical/vcdr_mae" in result) == ("seg" in tasks)
    assert ("unc/error_auroc" in result) == ("cls" in tasks)
    assert ("unc/mean_pixel_uncertainty" in result) == ("seg" in tasks)
    assert ("robust/gaussian_0.2/cls/acc" in result) == ("cls" in tasks)
    assert ("robust/gaussian_0.2/seg/dice_cup" in result) == ("seg" in tasks)
    # The ceiling needs only the fundus masks and labels, whatever the model predicts.
    assert "reference/vcdr_auc_ci95_low" in result and "reference/positive_fraction" in result
    assert ("cls/f1_ci95_high" in result) == ("unc/noise_auroc_gaussian_0.2" in result) == ("cls" in tasks)
    assert ("seg/dice_cup_ci95_low" in result) == ("unc/pixel_noise_auroc_gaussian_0.2" in result) == ("seg" in tasks)
    assert (tmp_path / "plots" / "roc.csv").exists() == ("cls" in tasks)
    assert (tmp_path / "plots" / "robustness_gaussian.csv").exists()
    assert len(list((tmp_path / "plots" / "panels").glob("*.png"))) == 3


# ---------------------------------------------------------------------------------- stage
def test_stage_writes_flat_metrics_json_and_plots(tmp_path, toy_dir, data):
    # Controlled model (toy): the stage's values on its test split follow from the toy's behaviour.
    root = _prepared_root(tmp_path, toy_dir, data)
    params = parse_params({"data": {"root": str(root)}, "evaluate": {"batch_size": 4, "gaussian_sigmas": [0.1],
                                                                    "salt_pepper_amounts": [0.05], "num_panels": 2}})
    paths = Paths(params)
    paths.plots.mkdir(parents=True)
    (paths.plots / "stale.csv").write_text("x\n1\n")

    evaluate(params)
    written = json.loads(paths.metrics.read_text())
    assert all(isinstance(k, str) and (v is None or isinstance(v, float)) for k, v in written.items())
    # The stage evaluated the store's test split: values the toy's behaviour fixes for those images
    # (it is right except on the two flipped labels, and segments perfectly).
    import zarr

    group = zarr.open_group(paths.dataset, mode="r")
    test_ids = [group.attrs["ids"][i] for i in group["splits/test"][:]]
    ratios = [RATIOS[int(image_id.split("-")[1])] for image_id in test_ids]
    labels = np.asarray(group["labels"][:])[group["splits/test"][:]]
    assert written["cls/acc"] == pytest.approx(1 - sum(r in FLIPPED for r in ratios) / len(ratios))
    assert written["reference/positive_fraction"] == pytest.approx(labels.mean())
    assert written["unc/pixel_error_auroc"] is None  # nan -> null
    assert written["seg/dice_disc"] == 1.0
    assert "robust/gaussian_0.1/cls/acc" in written and "robust/salt_pepper_0.05/seg/dice_cup" in written
    new_keys = ["reference/vcdr_auc", "reference/positive_fraction", "unc/noise_auroc_gaussian_0.1",
                "unc/pixel_noise_auroc_gaussian_0.1", "unc/noise_auroc_salt_pepper_0.05",
                "unc/pixel_noise_auroc_salt_pepper_0.05"]
    new_keys += [f"{key}_ci95_{end}" for key in INTERVAL_KEYS for end in ("low", "high")]
    assert [key for key in new_keys if key not in written] == []
    assert written["unc/pixel_error_auroc_ci95_low"] is None  # undefined interval -> null
    assert not (paths.plots / "stale.csv").exists()
    assert (paths.plots / "roc.csv").exists() and len(list((paths.plots / "panels").glob("*.png"))) == 2


def test_stage_entry_point_reports_a_missing_model(tmp_path, toy_dir, data, capsys):
    # The model is deleted below: the toy export only provides the store-and-model layout quickly.
    from pipeline.evaluate import evaluate as stage_fn
    from uml.stage import run_stage

    root = _prepared_root(tmp_path, toy_dir, data)
    (root / "models" / "model.onnx").unlink()
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"data:\n  root: {root}\n")
    assert run_stage("evaluate", "test", stage_fn, ["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert "evaluate: error:" in err and str(root / "models" / "model.onnx") in err


def test_stage_refuses_a_model_whose_positive_class_is_not_the_data_sets(tmp_path, toy_dir, data):
    # The metadata is edited below: the toy export only provides the store-and-model layout quickly.
    root = _prepared_root(tmp_path, toy_dir, data)  # the store declares class 1 ("glaucoma")
    meta_path = root / "models" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["positive_class"] = 0
    meta_path.write_text(json.dumps(meta))
    params = parse_params({"data": {"root": str(root)}})
    with pytest.raises(ModelFileError, match=r"positive class 0 differs from the data set's 1"):
        evaluate(params)
    assert not Paths(params).metrics.exists()


# ------------------------------------------------------------------------------ streaming
def test_the_stage_streams_the_store_and_writes_the_metrics_of_the_whole_split_at_once(tmp_path, toy_dir, monkeypatch):
    """metrics.json of the stage, which reads the test split from the store a batch at a time,
    equals byte for byte that of the whole split loaded into memory and run as one batch (the
    toy's outputs do not depend on the batch size: checked here on the clean pass)."""
    from uml.data import store
    from uml.evaluate import write_metrics

    root = _prepared_root(tmp_path, toy_dir, _imperfect_set())
    params = parse_params({"data": {"root": str(root)},
                           "evaluate": {"batch_size": 5, "gaussian_sigmas": [0.1], "salt_pepper_amounts": [0.05],
                                        "num_panels": 3, "bootstrap_samples": 200}})
    paths = Paths(params)
    images, masks, labels, ids = store.load_split(paths.dataset, "test")
    n = len(ids)
    assert n == 12  # three batches of 5, 5 and 2

    reads: list[int] = []
    real_read = store.SplitReader.read

    def recording_read(self, start, stop):
        reads.append(stop - start)
        return real_read(self, start, stop)

    def no_whole_split(*args, **kwargs):
        raise AssertionError("the stage loaded the whole split")

    monkeypatch.setattr(store.SplitReader, "read", recording_read)
    monkeypatch.setattr(store, "load_split", no_whole_split)
    monkeypatch.setattr(uml.evaluate, "IN_MEMORY_BYTES", 0)  # a split too large to read once (the default's reads it once)
    evaluate(params)
    assert reads == [5, 5, 2] * 3  # the clean pass and two noisy ones, a batch at a time

    model = OnnxModel(paths.model_onnx)
    one_batch = params.evaluate.model_copy(update={"batch_size": n})
    in_batches = run_pass(model, ArraySplit(images, masks, labels, ids), 5, seed=0)
    at_once = run_pass(model, ArraySplit(images, masks, labels, ids), n, seed=0)
    assert np.array_equal(in_batches.class_prob, at_once.class_prob)  # the premise, on this onnxruntime
    reference = evaluate_arrays(model, images, masks, labels, one_batch, plots_dir=tmp_path / "reference", ids=ids)
    write_metrics(tmp_path / "reference.json", reference)
    assert paths.metrics.read_text() == (tmp_path / "reference.json").read_text()
    assert json.loads(paths.metrics.read_text())["seg/hd95_disc"] > 0  # the comparison covers real distances
    for csv_file in (tmp_path / "reference").glob("*.csv"):
        assert (paths.plots / csv_file.name).read_text() == csv_file.read_text(), csv_file.name
    assert sorted(p.name for p in (paths.plots / "panels").iterdir()) == ["case_000.png", "case_006.png", "case_011.png"]


def test_a_pass_keeps_per_image_summaries_and_the_panels_only(toy_dir):
    images, masks, labels = _imperfect_set(20)
    model = OnnxModel(toy_dir / "model.onnx")
    out = run_pass(model, ArraySplit(images, masks, labels), 6, distances=True, pixels=True, vcdr=True,
                   panel_positions=[3], pixel_budget=400)
    kept = {name: value for name, value in vars(out).items() if isinstance(value, np.ndarray)}
    kept.update({f"seg/{name}": value for name, value in out.seg.items()})
    assert {"class_prob", "gt_vcdr", "pred_vcdr", "mean_pixel_uncertainty", "seg/hd95_cup"} <= set(kept)
    assert all(len(value) == 20 for value in kept.values())
    # A few numbers per image: far less than one mask (64 x 64 bytes) per image.
    assert sum(value.nbytes for value in kept.values()) < 20 * 1024
    assert all(value.size <= 400 for value in out.pixels.values())  # the pixel budget bounds the sample
    assert list(out.panels) == [3]
    assert np.array_equal(out.panels[3].image, images[3]) and np.array_equal(out.panels[3].mask, masks[3])


def test_shard_ranges_cover_the_split_in_whole_batches():
    from uml.evaluate import shard_ranges

    # Hand-computed: 23 images in batches of 5 are 5 batches; 2 shards take 3 and 2 of them.
    assert shard_ranges(23, 5, 2) == [(0, 15), (15, 23)]
    assert shard_ranges(23, 5, 10) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]  # at most one shard per batch
    assert shard_ranges(4, 16, 3) == [(0, 4)]
    assert shard_ranges(0, 16, 3) == []


def test_a_pass_cut_into_shards_and_joined_equals_the_whole_pass(toy_dir):
    """What each Ray task computes (run_pass on start:stop) joins into exactly the whole pass:
    per-image values, the pixel samples (budget and positions of the whole split) and panels."""
    from uml.evaluate import join_passes, shard_ranges

    images, masks, labels = _imperfect_set(23)
    model = OnnxModel(toy_dir / "model.onnx")
    split = ArraySplit(images, masks, labels, ids=np.arange(100, 123))
    args = dict(seed=3, distances=True, pixels=True, vcdr=True, panel_positions=[2, 17], pixel_budget=500,
                noise=("gaussian", 0.1))
    whole = run_pass(model, split, 5, **args)
    ranges = shard_ranges(len(split), 5, 2)
    joined = join_passes([run_pass(model, split, 5, start=a, stop=b, progress=False, **args) for a, b in ranges])
    for name, value in vars(whole).items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(getattr(joined, name), value), name
    for group in ("seg", "pixels", "band"):
        expected, got = getattr(whole, group), getattr(joined, group)
        assert sorted(got) == sorted(expected) and expected
        for key in expected:
            assert np.array_equal(got[key], expected[key], equal_nan=True), (group, key)
    assert sorted(joined.panels) == [2, 17]
    assert np.array_equal(joined.panels[17].maps["uncertainty"], whole.panels[17].maps["uncertainty"])
    # What a shard must not do: run as a pass of its own images, which would sample 500 // 8
    # pixels per image (not 500 // 23) and number the images from 0.
    alone = run_pass(model, ArraySplit(images[15:], masks[15:], labels[15:], ids=np.arange(115, 123)), 5, **args)
    assert alone.pixels["image"].max() == 7 and joined.pixels["image"].max() == 22
    assert alone.pixels["error"].size > 2 * np.count_nonzero(joined.pixels["image"] >= 15)


def test_the_stage_with_ray_workers_writes_the_metrics_of_the_single_process_run(tmp_path, toy_dir, caplog,
                                                                                  monkeypatch):
    """evaluate.workers=2: the passes cut into shards of whole batches, run as tasks of a local Ray
    instance (other processes) and joined on the driver; metrics.json and the plot data are byte
    for byte those of the run in this process. The driver moves the model's folder away as soon as
    it has read the files to ship, so the tasks must open what came through Ray's object store."""
    import uml.evaluate
    root = _prepared_root(tmp_path, toy_dir, _imperfect_set())
    settings = {"batch_size": 4, "gaussian_sigmas": [0.1], "salt_pepper_amounts": [0.05], "num_panels": 3,
                "bootstrap_samples": 200}
    single = parse_params({"data": {"root": str(root)}, "evaluate": settings})
    paths = Paths(single)
    evaluate(single)
    reference = paths.metrics.read_text()
    reference_plots = {p.name: p.read_text() for p in paths.plots.glob("*.csv")}
    assert json.loads(reference)["seg/hd95_disc"] > 0 and reference_plots

    sharded = parse_params({"data": {"root": str(root)}, "evaluate": {**settings, "workers": 2}})
    models, hidden = paths.model_onnx.parent, tmp_path / "hidden-models"
    move_model_away_once_shipped(monkeypatch, uml.evaluate, models, hidden)
    with caplog.at_level("INFO", logger="uml.evaluate"):
        evaluate(sharded)
    assert hidden.is_dir() and not models.exists()
    # 12 test images in batches of 4: shards 0:8 and 8:12, for each of the 3 passes.
    assert "evaluating 3 passes as 6 Ray tasks (2 shards of at most 8 images each)" in caplog.text
    assert paths.metrics.read_text() == reference
    assert {p.name: p.read_text() for p in paths.plots.glob("*.csv")} == reference_plots
    assert sorted(p.name for p in (paths.plots / "panels").iterdir()) == ["case_000.png", "case_006.png", "case_011.png"]
