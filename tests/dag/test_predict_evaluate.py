"""``uml predict`` and ``uml.evaluate.evaluate_arrays`` on the model the miniature DAG exported,
checked against onnxruntime run directly and metrics written out from their definitions
(tests/dag/reference.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from tests.dag import reference as ref
from tests.dag.miniature import MiniDag
from uml.config import EvaluateParams
from uml.evaluate import evaluate_arrays
from uml.onnx_model import OnnxModel


@pytest.fixture(scope="module")
def model_path(miniature_dag: MiniDag) -> Path:
    return miniature_dag.data / "models" / "model.onnx"


@pytest.fixture(scope="module")
def everything(miniature_dag: MiniDag) -> ref.Split:
    return ref.read_split(miniature_dag.data / "prepared" / "dataset.zarr", None)


def _uml_cli() -> str:
    found = shutil.which("uml", path=str(Path(sys.executable).parent))
    assert found, f"no `uml` console script next to {sys.executable}: is the project installed (pip install -e .)?"
    return found


def test_uml_predict_reports_what_onnxruntime_computes(miniature_dag, model_path, tmp_path):
    test = ref.read_split(miniature_dag.data / "prepared" / "dataset.zarr", "test")
    images = test.images[:3]
    files = []
    for i, image in zip(test.index, images):
        files.append(tmp_path / f"eye{i:02d}.png")
        Image.fromarray(image).save(files[-1])  # PNG: lossless, the file decodes to the store's pixels
    # The first image again at twice the size, each pixel a 2x2 block: area resizing to the
    # model's 64 px averages four equal values, so it must predict exactly as the original.
    Image.fromarray(np.repeat(np.repeat(images[0], 2, axis=0), 2, axis=1)).save(tmp_path / "large.png")
    out = tmp_path / "out"
    run = subprocess.run([_uml_cli(), "predict", *map(str, files), str(tmp_path / "large.png"), "--model", str(model_path),
                          "--out", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    expected = ref.onnx_outputs(model_path, images)
    meta = json.loads((model_path.parent / "metadata.json").read_text())
    for j, path in enumerate(files):
        record = json.loads((out / f"{path.stem}.json").read_text())
        prob = expected["class_prob"][j]
        mask = expected["seg_prob"][j].argmax(axis=0)
        assert record["image"] == str(path) and record["size"] == [64, 64] and record["model_resolution"] == 64
        assert record["probabilities"] == pytest.approx(dict(zip(meta["class_names"], prob.tolist())), abs=1e-6)
        assert record["class"] == meta["class_names"][int(prob.argmax())] and record["class_index"] == int(prob.argmax())
        assert record["probability"] == pytest.approx(float(prob.max()), abs=1e-6)
        assert record["class_uncertainty"] == pytest.approx(float(expected["class_uncertainty"][j, 0]), abs=1e-6)
        assert record["disc_area_pixels"] == int((mask >= 1).sum()) and record["cup_area_pixels"] == int((mask == 2).sum())
        assert record["disc_area_fraction"] == pytest.approx((mask >= 1).mean())
        vcdr = ref.vertical_cdr(mask)
        assert record["vcdr"] == (None if math.isnan(vcdr) else pytest.approx(vcdr)), path
        assert record["mean_pixel_uncertainty"] == pytest.approx(float(expected["seg_uncertainty"][j].mean()), abs=1e-6)
        with Image.open(out / f"{path.stem}_overlay.png") as overlay:
            assert overlay.format == "PNG"
    large, original = (json.loads((out / f"{stem}.json").read_text()) for stem in ("large", files[0].stem))
    assert large["size"] == [128, 128]
    assert large["probabilities"] == pytest.approx(original["probabilities"], abs=1e-6)
    assert (large["disc_area_pixels"], large["cup_area_pixels"]) == (original["disc_area_pixels"], original["cup_area_pixels"])


@pytest.fixture(scope="module")
def evaluated(model_path, everything) -> dict[str, float]:
    # All 48 images (not the stage's test split), no noise passes or intervals: the metrics of a
    # set the evaluate stage never saw, on the real model.
    cfg = EvaluateParams(batch_size=16, gaussian_sigmas=[], salt_pepper_amounts=[], num_panels=0, bootstrap_samples=0)
    return evaluate_arrays(OnnxModel(model_path), everything.images, everything.masks, everything.labels, cfg)


def test_evaluate_arrays_on_the_real_model_matches_independent_values(evaluated, model_path, everything):
    out = ref.onnx_outputs(model_path, everything.images)
    labels, prob = everything.labels, out["class_prob"].astype(np.float64)
    pred, correct = prob.argmax(axis=1), prob.argmax(axis=1) == labels
    assert evaluated["cls/acc"] == pytest.approx(correct.mean())
    assert evaluated["cls/auc"] == pytest.approx(ref.rank_auc(prob[:, 1], labels == 1))
    assert evaluated["cls/ece"] == pytest.approx(ref.ece(labels, prob))
    assert evaluated["unc/error_auroc"] == pytest.approx(ref.rank_auc(out["class_uncertainty"][:, 0], ~correct))
    masks = out["seg_prob"].argmax(axis=1)
    for name, select in ref.STRUCTURES.items():
        expected = np.mean([ref.dice(select(p), select(g)) for p, g in zip(masks, everything.masks)])
        assert evaluated[f"seg/dice_{name}"] == pytest.approx(expected), name
    disc = [ref.assd_hd95(p >= 1, g >= 1) for p, g in zip(masks, everything.masks)]
    assert evaluated["seg/hd95_disc"] == pytest.approx(np.nanmean([d[1] for d in disc]))
    gt_vcdr = np.array([ref.vertical_cdr(m) for m in everything.masks])
    assert evaluated["reference/vcdr_auc"] == pytest.approx(roc_auc_score(labels, gt_vcdr))
    assert evaluated["reference/positive_fraction"] == pytest.approx(labels.mean())
    pixel_error = masks != everything.masks
    assert evaluated["unc/pixel_error_auroc"] == pytest.approx(roc_auc_score(pixel_error.ravel(), out["seg_uncertainty"].ravel()))
    assert not any(key.startswith("robust/") or "_ci95_" in key for key in evaluated)


def test_evaluate_arrays_sees_deliberately_broken_ground_truth(evaluated, model_path, everything):
    """Inputs whose effect is known exactly: flipped labels turn the AUC into 1 - AUC and the
    accuracy into 1 - accuracy; masks paired with the wrong images lose most of their Dice; an
    all-background ground truth makes the disc Dice that of a model that predicted no disc."""
    cfg = EvaluateParams(batch_size=16, gaussian_sigmas=[], salt_pepper_amounts=[], num_panels=0, bootstrap_samples=0)
    model = OnnxModel(model_path)
    flipped = evaluate_arrays(model, everything.images, everything.masks, 1 - everything.labels, cfg)
    assert flipped["cls/auc"] == pytest.approx(1 - evaluated["cls/auc"])
    assert flipped["cls/acc"] == pytest.approx(1 - evaluated["cls/acc"])
    assert flipped["reference/vcdr_auc"] == pytest.approx(1 - evaluated["reference/vcdr_auc"])
    shuffled = evaluate_arrays(model, everything.images, np.roll(everything.masks, 1, axis=0), everything.labels, cfg)
    assert shuffled["seg/dice_disc"] < evaluated["seg/dice_disc"] - 0.1, (shuffled["seg/dice_disc"], evaluated["seg/dice_disc"])
    empty = evaluate_arrays(model, everything.images, np.zeros_like(everything.masks), everything.labels, cfg)
    predicted_disc = ref.onnx_outputs(model_path, everything.images)["seg_prob"].argmax(axis=1) >= 1
    assert empty["seg/dice_disc"] == pytest.approx(np.mean([0.0 if p.any() else 1.0 for p in predicted_disc]))
    assert empty["seg/dist_undefined_disc"] == float(predicted_disc.reshape(len(predicted_disc), -1).any(axis=1).sum())
