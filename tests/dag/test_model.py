"""The miniature DAG's model: ``model.pt`` loads through the public API and is the trained best
epoch, ``model.onnx`` computes what the torch model computes on the store's images, and
``metadata.json`` describes the file beside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from tests.dag.miniature import MiniDag
from tests.dag.reference import STRUCTURES, dice, onnx_outputs, read_split
from uml.models import UMLNet, load_model

OUTPUTS = ["class_prob", "class_uncertainty", "class_prob_raw", "class_uncertainty_raw", "seg_prob", "seg_uncertainty",
           "seg_uncertainty_raw"]


@pytest.fixture(scope="module")
def models(miniature_dag: MiniDag) -> Path:
    return miniature_dag.data / "models"


@pytest.fixture(scope="module")
def model(models: Path) -> UMLNet:
    return load_model(models / "model.pt")


@pytest.fixture(scope="module")
def store(miniature_dag: MiniDag) -> Path:
    return miniature_dag.data / "prepared" / "dataset.zarr"


def _history(train_dir: Path, key: str) -> list[float]:
    """One metric per epoch from the dvclive log the train stage writes (data/train/plots)."""
    lines = (train_dir / "plots" / "metrics" / f"{key}.tsv").read_text().splitlines()
    return [float(line.split("\t")[1]) for line in lines[1:]]


def _torch_outputs(model: UMLNet, images: np.ndarray, temperatures: tuple[float, ...] = (1.0, 1.0, 0.0)) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model.infer(torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)),
                          *temperatures)
    return {k: v.numpy() for k, v in out.items()}


def _temperatures(models: Path) -> tuple[float, float, float]:
    """The calibrate stage's temperatures and error-map width, as the export baked them into the graph."""
    fitted = json.loads((models / "calibration.json").read_text())
    return (fitted["class_temperature"]["temperature"], fitted["seg_temperature"]["temperature"],
            fitted["seg_error_map"]["sigma"])


def test_the_stages_import_the_copy_of_the_code(miniature_dag):
    # In the stages' environment, PYTHONPATH and the working directory put the copy before the
    # editable install of the checkout the tests run from.
    assert Path(miniature_dag.code_origin).is_relative_to(miniature_dag.root), miniature_dag.code_origin


def test_model_pt_loads_and_holds_the_best_epoch_of_the_logged_run(miniature_dag, model, store):
    import zarr

    assert isinstance(model, UMLNet) and not model.training  # load_model returns it in eval mode
    raw = torch.load(miniature_dag.data / "models" / "model.pt", weights_only=True)  # docs/explanation/security.md: weights_only loads it
    assert raw["format"] == "uml-model/2"
    assert (model.cfg.image_size, model.cfg.num_classes, model.cfg.num_mask_classes) == (64, 2, 3)
    attrs = zarr.open_group(store, mode="r").attrs
    assert model.extra["class_names"] == attrs["class_names"] and model.extra["mask_classes"] == attrs["mask_classes"]
    assert model.extra["data_hash"] == attrs["content_hash"]
    # The best epoch is the one with the highest validation score in the run's own log.
    scores = _history(miniature_dag.data / "train", "val/score")
    assert len(scores) == 6  # train.epochs of TINY_DAG
    assert model.extra["best_epoch"] == int(np.argmax(scores))
    assert model.extra["best_metrics"]["val/score"] == pytest.approx(max(scores))
    # It trained with what the sweep chose (train.use_tuned), and the sweep recorded its choice.
    chosen = yaml.safe_load((miniature_dag.data / "tune" / "best_params.yaml").read_text())
    for key, value in chosen["loss"].items():
        assert model.extra["loss"][key] == pytest.approx(value), key
    assert chosen["selection"]["chosen"] == "baseline" and chosen["selection"]["trials"] == 2  # tune.min_improvement=1


def test_the_trained_model_segments_and_its_initialisation_does_not(model, store):
    """What a train stage that saved untrained or wrong weights would fail: the test split's disc
    Dice and pixel NLL of the trained model against the same architecture at initialisation."""
    test = read_split(store, "test")

    def scores(net: UMLNet) -> tuple[float, float]:
        prob = _torch_outputs(net, test.images)["seg_prob"]
        nll = float(-np.log(np.take_along_axis(prob, test.masks[:, None].astype(np.int64), axis=1)).mean())
        pred = prob.argmax(axis=1)
        disc = float(np.mean([dice(STRUCTURES["disc"](p), STRUCTURES["disc"](g)) for p, g in zip(pred, test.masks)]))
        return disc, nll

    trained_dice, trained_nll = scores(model)
    torch.manual_seed(0)  # train.seed: the initialisation the run started from
    untrained_dice, untrained_nll = scores(UMLNet(model.cfg).eval())
    # At initialisation the disc Dice is that of guessing (~0.06: the disc is 3 % of the image);
    # measured after the 6 tiny epochs: ~0.8, and a pixel NLL of ~0.13 against ~1.1.
    assert untrained_dice < 0.25 and trained_dice > 0.5, (trained_dice, untrained_dice)
    assert trained_nll < 0.5 * untrained_nll, (trained_nll, untrained_nll)


def test_onnx_matches_torch_on_store_images_within_the_export_tolerance(models, model, store):
    """Parity measured here, in a plain onnxruntime session against eager torch, on the test split
    (images the export stage never saw; its own check uses validation images and raises above
    the tolerance, so what it records cannot exceed it)."""
    atol = json.loads((models / "metadata.json").read_text())["export"]["parity_atol"]
    assert atol == 1e-4  # export.parity_atol of params.yaml
    test = read_split(store, "test")
    for images in (test.images, test.images[:1]):  # the batch dimension is dynamic
        ours, theirs = onnx_outputs(models / "model.onnx", images), _torch_outputs(model, images, _temperatures(models))
        assert list(ours) == OUTPUTS
        for name in OUTPUTS:
            assert ours[name].shape == theirs[name].shape
            np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=atol, err_msg=name)


def test_metadata_describes_the_onnx_file_beside_it(miniature_dag, models, model, store):
    import zarr

    path = models / "model.onnx"
    meta = json.loads((models / "metadata.json").read_text())
    assert meta["onnx_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert not list(models.glob("*.data"))  # one self-contained file
    assert graph.opset_import[0].version == 18  # export.opset

    # Names, shapes and dtypes: what the graph declares, what metadata.json says, and docs/reference/onnx.md.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert (graph_input.name, graph_input.type) == ("image", "tensor(float)")
    assert graph_input.shape[1:] == [3, 64, 64] and isinstance(graph_input.shape[0], str)
    assert meta["input"] == {"name": "image", "dtype": "float32", "shape": ["batch", 3, 64, 64], "range": [0.0, 1.0]}
    expected = {"class_prob": ["batch", 2], "class_uncertainty": ["batch", 1], "class_prob_raw": ["batch", 2],
                "class_uncertainty_raw": ["batch", 1], "seg_prob": ["batch", 3, 64, 64],
                "seg_uncertainty": ["batch", 1, 64, 64], "seg_uncertainty_raw": ["batch", 1, 64, 64]}
    assert [o.name for o in session.get_outputs()] == list(meta["outputs"]) == OUTPUTS
    # The graph leaves some output dims symbolic; the shapes it returns are the contract.
    returned = dict(zip(OUTPUTS, session.run(OUTPUTS, {"image": np.zeros((2, 3, 64, 64), np.float32)})))
    for out in session.get_outputs():
        assert out.type == "tensor(float)" and returned[out.name].dtype == np.float32, out.name
        assert list(returned[out.name].shape) == [2, *expected[out.name][1:]], out.name
        assert meta["outputs"][out.name]["shape"] == expected[out.name]
        value_range = [0.0, 0.5] if out.name == "class_uncertainty" else [0.0, 1.0]  # 1 - max p of two classes
        assert meta["outputs"][out.name]["dtype"] == "float32" and meta["outputs"][out.name]["range"] == value_range

    attrs = zarr.open_group(store, mode="r").attrs
    assert meta["class_names"] == attrs["class_names"] and meta["mask_classes"] == attrs["mask_classes"]
    assert meta["positive_class"] == 1 and meta["tasks"] == ["cls", "seg"] and meta["uncertainty"] is True
    assert meta["preprocessing"]["image_size"] == 64 and meta["preprocessing"]["scale"] == pytest.approx(1 / 255)
    assert meta["hashes"]["data"] == attrs["content_hash"]
    assert meta["hashes"]["code"] == model.extra["code_fingerprint"] and meta["model"]["run"] == model.extra["run"]
    assert meta["versions"]["onnxruntime"] == ort.__version__ and meta["versions"]["torch"] == torch.__version__

    # The recorded parity is the export's measurement, not a placeholder: the first
    # export.parity_images (4) validation images are among what it measured, so what this test
    # measures on them cannot be (much) larger.
    val = read_split(store, "val")
    ours, theirs = onnx_outputs(path, val.images[:4]), _torch_outputs(model, val.images[:4], _temperatures(models))
    assert meta["calibration"] == json.loads((models / "calibration.json").read_text())
    for name in OUTPUTS:
        measured = float(np.abs(ours[name] - theirs[name]).max())
        assert measured <= 2 * meta["export"]["parity_max_abs_diff"][name] + 1e-6, (name, measured, meta["export"])
