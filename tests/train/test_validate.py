"""Validation (``uml.train.worker.validate``) and evaluation (``uml.evaluate``) compute their
metrics on one path: for the same model on the same images, both give the scikit-learn / hand
computed values, with the data set's declared positive class (here a non-default one, 0).

Controlled model on purpose (tests/toy_onnx.py): the same toy network runs in torch for validation
and as ONNX for evaluation, so the two paths see the same predictions. No Ray is started:
``validate`` runs in this process as a single worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from tests.toy_onnx import CLASS_NAMES, FLIPPED, MASK_CLASSES, RATIOS, ToyUML, export_toy, fundus_set, output_names
from uml.config import EvaluateParams
from uml.data.records import Record
from uml.data.store import write_dataset
from uml.evaluate import evaluate_arrays
from uml.onnx_model import OnnxModel
from uml.train.worker import validate, validation_loader, validation_share

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
        return dict(zip(output_names(self.toy.tasks), self.toy(images)))


@pytest.fixture(autouse=True)
def _every_validation_pixel(monkeypatch):
    # 64 x 64 images: validation's pixel sample is then every pixel, as evaluation's is.
    from uml.train import worker

    monkeypatch.setattr(worker, "VALIDATION_PIXELS_PER_IMAGE", 64 * 64)


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
                  source="toy", image_size=64, split={"val": 0.2, "test": 0.5, "calib": 0.1}, seed=0)
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
    error, pixel_error = pred != labels, (seg != masks).ravel()
    one_hot = np.eye(2)[labels]
    ref = {
        "cls/acc": accuracy_score(labels, pred),
        "cls/auc": roc_auc_score(labels == POSITIVE, prob[:, POSITIVE]),
        "cls/f1": f1_score(labels, pred, pos_label=POSITIVE),
        "cls/nll": log_loss(labels, prob, labels=[0, 1]),
        "cls/brier": float(((prob - one_hot) ** 2).sum(1).mean()),
        "seg/dice_disc": np.mean([_dice(p >= 1, g >= 1) for p, g in zip(seg, masks)]),
        "seg/dice_cup": np.mean([_dice(p == 2, g == 2) for p, g in zip(seg, masks)]),
        # Equal-sized images: the mean of the per-image mean pixel uncertainties is the global mean.
        "unc/mean_class_uncertainty": out["class_uncertainty"].numpy().astype(np.float64).mean(),
        "unc/mean_pixel_uncertainty": out["seg_uncertainty"].numpy().astype(np.float64).mean(),
        "raw/unc/mean_class_uncertainty": out["class_uncertainty_raw"].numpy().astype(np.float64).mean(),
        "raw/unc/mean_pixel_uncertainty": out["seg_uncertainty_raw"].numpy().astype(np.float64).mean(),
        "unc/error_auroc": roc_auc_score(error, out["class_uncertainty"].numpy()[:, 0]),
        "raw/unc/error_auroc": roc_auc_score(error, out["class_uncertainty_raw"].numpy()[:, 0]),
        "unc/pixel_error_auroc": roc_auc_score(pixel_error, out["seg_uncertainty"].numpy()[:, 0].ravel()),
        "raw/unc/pixel_error_auroc": roc_auc_score(pixel_error, out["seg_uncertainty_raw"].numpy()[:, 0].ravel()),
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


INDEX_SETS = {"whole set": KEPT, "uneven shares": KEPT[:-1], "one rank empty": KEPT[:1]}


def _validate_as_rank(rank: int, world: int, init_file: str, store: str, out_dir: str) -> None:
    from uml.train import worker

    worker.VALIDATION_PIXELS_PER_IMAGE = 64 * 64  # as the parent's fixture sets it
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, indices in INDEX_SETS.items():
            loader = validation_loader(store, indices, rank, world, batch_size=4, workers=0, device=torch.device("cpu"))
            got = validate(ToyNet(), loader, MASK_CLASSES, device=torch.device("cpu"))
            (Path(out_dir) / f"{name}-rank{rank}.json").write_text(json.dumps(got))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_report_the_single_process_metrics(case, reference, tmp_path):
    # Each rank validates its own share and only per-image values are gathered: every rank must
    # still report the metrics of the whole set, also when one rank's share is empty.
    store = str(case[0])
    assert len(validation_share(KEPT[:-1], 0, 2)) != len(validation_share(KEPT[:-1], 1, 2))
    assert len(validation_share(KEPT[:1], 1, 2)) == 0
    torch.multiprocessing.spawn(_validate_as_rank, args=(2, str(tmp_path / "init"), store, str(tmp_path)), nprocs=2, join=True)
    for name, indices in INDEX_SETS.items():
        ranks = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in range(2)]
        single = validate(ToyNet(), validation_loader(store, indices, 0, 1, batch_size=4, workers=0, device=torch.device("cpu")),
                          MASK_CLASSES, device=torch.device("cpu"))
        assert ranks[0] == ranks[1], name
        assert list(ranks[0]) == list(single), name
        for key, value in single.items():
            assert ranks[0][key] == pytest.approx(value, abs=1e-9, nan_ok=True), (name, key)
    whole = json.loads((tmp_path / "whole set-rank0.json").read_text())
    for key, expected in reference.items():
        assert whole[key] == pytest.approx(expected, abs=1e-6), key


def test_a_metric_added_in_one_table_reaches_evaluation_and_validation(case, monkeypatch):
    # ARCHITECTURE.md, "A new metric": the metric's entry in metrics.CLASSIFICATION_METRICS alone
    # puts it in evaluation's metrics.json keys; naming it in VALIDATION_CLASSIFICATION_METRICS
    # also logs it per epoch. Checked against scikit-learn on the toy's own predictions.
    from sklearn.metrics import balanced_accuracy_score

    from uml import metrics
    from uml.train import worker

    store, model_path, images, masks, labels = case
    monkeypatch.setitem(metrics.CLASSIFICATION_METRICS, "balanced_acc",
                        lambda labels, prob, pred, positive, bins: float(balanced_accuracy_score(labels, pred)))
    monkeypatch.setattr(worker, "VALIDATION_CLASSIFICATION_METRICS", (*worker.VALIDATION_CLASSIFICATION_METRICS, "balanced_acc"))
    with torch.no_grad():
        prob = ToyNet().infer(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0))["class_prob"]
    expected = balanced_accuracy_score(labels, prob.numpy().argmax(1))
    assert expected != pytest.approx(accuracy_score(labels, prob.numpy().argmax(1)))  # a metric of its own
    cfg = EvaluateParams(batch_size=8, gaussian_sigmas=[], salt_pepper_amounts=[], num_panels=0, bootstrap_samples=0)
    assert evaluate_arrays(OnnxModel(model_path), images, masks, labels, cfg)["cls/balanced_acc"] == pytest.approx(expected)
    assert validate(ToyNet(), _loader(store), MASK_CLASSES, device=torch.device("cpu"))["cls/balanced_acc"] == pytest.approx(expected)
