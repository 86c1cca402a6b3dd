"""Validation (``uml.train.worker.validate``) and evaluation (``uml.evaluate``) compute their
metrics on one path: for the same model on the same images, both give the scikit-learn / hand
computed values, with the data set's declared positive class (here a non-default one, 0).

Controlled model on purpose (tests/toy_onnx.py): the same toy network runs in torch for validation
and as ONNX for evaluation, so the two paths see the same predictions. No Ray is started:
``validate`` runs in this process as a single worker.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from tests.toy_onnx import CLASS_NAMES, FLIPPED, MASK_CLASSES, RATIOS, ToyUML, export_toy, fundus_set
from uml.config import EvaluateParams
from uml.data.records import Record
from uml.data.store import write_dataset
from uml.evaluate import evaluate_arrays
from uml.onnx_model import OnnxModel
from uml.train.worker import validate, validation_loader

POSITIVE = 0  # "non-glaucoma": not the class index 1 that validation used to assume
# Binary F1 is 2 TP / (2 TP + errors): it tells the classes apart only when their true positives
# differ, so one correctly classified image of class 0 is left out as well as one flipped label.
KEPT = np.array([i for i, ratio in enumerate(RATIOS) if ratio not in (FLIPPED[1], RATIOS[0])])


class ToyNet(torch.nn.Module):
    """The toy graph with UMLNet's ``infer`` interface (outputs by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.toy = ToyUML()

    def infer(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        class_prob, class_unc, seg_prob, seg_unc = self.toy(images)
        return {"class_prob": class_prob, "class_uncertainty": class_unc, "seg_prob": seg_prob, "seg_uncertainty": seg_unc}


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = pred.sum() + gt.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(pred, gt).sum() / total


def _loader(store) -> torch.utils.data.DataLoader:
    return validation_loader(str(store), KEPT, rank=0, world=1, batch_size=8, workers=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    images, masks, labels = fundus_set()
    # The toy segments its own drawings perfectly; ground truth shifted by 3 px makes Dice informative.
    masks = np.roll(masks, 3, axis=2)
    store = tmp_path_factory.mktemp("store") / "dataset.zarr"
    records = [Record(id=f"toy-{i:02d}", image=im, mask=m, label=int(y), origin=f"toy #{i}")
               for i, (im, m, y) in enumerate(zip(images, masks, labels))]
    write_dataset(records, store, class_names=CLASS_NAMES, mask_classes=MASK_CLASSES, positive_class=POSITIVE,
                  source="toy", image_size=64, split={"val": 0.2, "test": 0.5}, seed=0)
    model_dir = tmp_path_factory.mktemp("toy") / "models"
    export_toy(model_dir)
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta["positive_class"] = POSITIVE  # as the export copies it from the data set
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    return store, model_dir / "model.onnx", images[KEPT], masks[KEPT], labels[KEPT]


@pytest.fixture(scope="module")
def reference(case):
    """The metrics by scikit-learn and by hand, on the toy's own predictions."""
    _, _, images, masks, labels = case
    with torch.no_grad():
        out = ToyNet().infer(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0))
    prob = out["class_prob"].numpy().astype(np.float64)
    pred = prob.argmax(1)
    seg = out["seg_prob"].numpy().argmax(1)
    ref = {
        "cls/acc": accuracy_score(labels, pred),
        "cls/auc": roc_auc_score(labels == POSITIVE, prob[:, POSITIVE]),
        "cls/f1": f1_score(labels, pred, pos_label=POSITIVE),
        "seg/dice_disc": np.mean([_dice(p >= 1, g >= 1) for p, g in zip(seg, masks)]),
        "seg/dice_cup": np.mean([_dice(p == 2, g == 2) for p, g in zip(seg, masks)]),
    }
    # The case tells the positive classes apart: a path that scored class 1 would give another F1.
    assert ref["cls/f1"] != pytest.approx(f1_score(labels, pred, pos_label=1))
    assert ref["cls/acc"] < 1.0 and 0.5 < ref["seg/dice_cup"] < 0.99 and 0.5 < ref["seg/dice_disc"] < 0.99
    return ref


def test_validation_metrics_use_the_declared_positive_class(case, reference):
    store, _, _, _, _ = case
    got = validate(ToyNet(), _loader(store), MASK_CLASSES, device=torch.device("cpu"))
    for key, expected in reference.items():
        assert got[key] == pytest.approx(expected, abs=1e-6), key


def test_evaluation_gives_validations_numbers(case, reference):
    store, model_path, images, masks, labels = case
    cfg = EvaluateParams(batch_size=8, gaussian_sigmas=[], salt_pepper_amounts=[], num_panels=0, bootstrap_samples=0)
    got = evaluate_arrays(OnnxModel(model_path), images, masks, labels, cfg)
    val = validate(ToyNet(), _loader(store), MASK_CLASSES, device=torch.device("cpu"))
    for key, expected in reference.items():
        assert got[key] == pytest.approx(expected, abs=1e-6), key
        assert got[key] == pytest.approx(val[key], abs=1e-6), key
    assert got["reference/positive_fraction"] == pytest.approx(np.mean(labels == POSITIVE))
