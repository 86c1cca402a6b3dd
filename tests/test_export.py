"""ONNX export: contract (names, dynamic batch, ranges), parity with torch, the stage's metadata
and its refusal to keep a model that does not match."""

import json

import numpy as np
import onnx
from scipy import ndimage
import onnxruntime as ort
import pytest
import torch

from uml.calibrate import calibrate
from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.data.store import load_split
from uml.errors import UMLError
from uml.export import INPUT_NAME, export, export_onnx, parity, session
from uml.models import build_model, save_model
from uml.onnx_model import OnnxModel

from tests.train.tiny import write_tiny_params


CLASS_OUTPUTS = ["class_prob", "class_uncertainty", "class_prob_raw", "class_uncertainty_raw"]
SEG_OUTPUTS = ["seg_prob", "seg_uncertainty", "seg_uncertainty_raw"]
TEMPERATURES = (0.5, 2.0, 1.5, 1.3)  # class and segmentation temperatures, error-map width, class power: none a no-op


@pytest.mark.parametrize("overrides, outputs", [
    ({}, CLASS_OUTPUTS + SEG_OUTPUTS),
    ({"uncertainty": False}, CLASS_OUTPUTS + SEG_OUTPUTS),
    ({"tasks": ["seg"]}, SEG_OUTPUTS),
    ({"tasks": ["cls"]}, CLASS_OUTPUTS),
])
def test_export_contract_and_parity_on_random_inputs(tmp_path, overrides, outputs):
    model = build_model("small", image_size=64, **overrides).eval()
    path = tmp_path / "model.onnx"
    assert export_onnx(model, path, 18, *TEMPERATURES) == outputs
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == [INPUT_NAME] and [o.name for o in graph.graph.output] == outputs
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    rng = np.random.default_rng(0)
    for batch in (1, 3):  # dynamic batch
        images = rng.random((batch, 3, 64, 64), dtype=np.float32)
        measured = _max_abs_diff(model, path, images, TEMPERATURES)
        assert set(measured) == set(outputs) and max(measured.values()) < 1e-4
        # uml.export.parity reports what is measured here.
        assert parity(model, path, images, *TEMPERATURES) == pytest.approx(measured, abs=1e-7)
    out = dict(zip(outputs, session(path).run(None, {INPUT_NAME: rng.random((2, 3, 64, 64), dtype=np.float32)})))
    for name, value in out.items():
        assert value.shape[0] == 2 and value.min() >= 0.0 and value.max() <= 1.0 + 1e-6
    if "class_prob" in out:
        np.testing.assert_allclose(out["class_prob"].sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(out["class_uncertainty"][:, 0], 1.0 - out["class_prob"].max(1), atol=1e-6)
    if "seg_prob" in out:
        np.testing.assert_allclose(out["seg_prob"].sum(1), 1.0, atol=1e-5)


def test_the_graph_applies_the_temperatures_to_the_raw_scores(tmp_path):
    """The calibrated outputs, recomputed by hand from the network's own heads: class_prob is
    softmax(sign(z) |z|^c / T_cls), z = log(alpha) centred over the classes, alpha = softplus(logits) + 1, seg_prob softmax(S_0 / T_seg),
    seg_uncertainty the normalised entropy of seg_prob; the raw outputs are alpha/S, K/S and U."""
    torch.manual_seed(3)
    model = build_model("small", image_size=64).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, path, 18, *TEMPERATURES)
    images = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    sess = session(path)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {INPUT_NAME: images})))
    with torch.no_grad():
        heads = model(torch.from_numpy(images))
    alpha = torch.nn.functional.softplus(heads["class_logits"]).double().numpy() + 1.0
    # log(alpha) centred over the classes, raised to the class power with its sign, then tempered.
    centred = np.log(alpha) - np.log(alpha).mean(1, keepdims=True)
    mapped = np.exp(np.sign(centred) * np.abs(centred) ** TEMPERATURES[3] / TEMPERATURES[0])
    np.testing.assert_allclose(out["class_prob"], mapped / mapped.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(out["class_prob_raw"], alpha / alpha.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(out["class_uncertainty_raw"][:, 0], 2.0 / alpha.sum(1), atol=1e-5)
    logits = heads["seg_logits"].double().numpy() / TEMPERATURES[1]
    seg = np.exp(logits - logits.max(1, keepdims=True))
    seg /= seg.sum(1, keepdims=True)
    np.testing.assert_allclose(out["seg_prob"], seg, atol=1e-5)
    entropy = -(seg * np.log(seg)).sum(1) / np.log(3.0)
    smoothed = np.stack([ndimage.gaussian_filter(e, TEMPERATURES[2], mode="mirror", truncate=3.0) for e in entropy])
    np.testing.assert_allclose(out["seg_uncertainty"][:, 0], smoothed, atol=1e-4)
    mutual = torch.nn.functional.softplus(heads["mutual_logits"]).double().numpy() + 1.0
    np.testing.assert_allclose(out["seg_uncertainty_raw"][:, 0], 3.0 / mutual.sum(1), atol=1e-5)
    # Calibration leaves every decision as it was: the same class and the same mask.
    assert np.array_equal(out["class_prob"].argmax(1), out["class_prob_raw"].argmax(1))
    assert np.array_equal(out["seg_prob"].argmax(1), heads["seg_logits"].numpy().argmax(1))


def _max_abs_diff(model, path, images: np.ndarray, temperatures: tuple[float, ...] = (1.0, 1.0, 0.0)) -> dict[str, float]:
    """Max |onnxruntime - torch| per output, measured in a plain session (not uml.export.parity)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ours = dict(zip(names, sess.run(names, {"image": images})))
    with torch.no_grad():
        theirs = model.eval().infer(torch.from_numpy(images), *temperatures)
    return {name: float(np.abs(ours[name] - theirs[name].numpy()).max()) for name in names}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    params = load_params(write_tiny_params(root))
    prepare(params)
    paths = Paths(params)
    torch.manual_seed(0)
    model = build_model("small", image_size=64).eval()
    save_model(model, paths.model_pt, extra={"class_names": ["non-glaucoma", "glaucoma"],
                                             "mask_classes": ["background", "disc", "cup"], "data_hash": "abc", "run": "r"})
    calibrate(params)
    export(params)
    return params, model


def _temperatures(paths: Paths) -> tuple[float, float, float]:
    fitted = json.loads(paths.calibration.read_text())
    return (fitted["class_temperature"]["temperature"], fitted["seg_temperature"]["temperature"],
            fitted["seg_error_map"]["sigma"])


def test_stage_refuses_a_missing_calibration_or_one_of_another_model(exported, tmp_path):
    params, model = exported
    paths = Paths(params)
    kept = paths.calibration.read_text()
    paths.calibration.unlink()
    with pytest.raises(UMLError, match="calibration.json: calibration not found; run `python -m pipeline.calibrate`"):
        export(params)
    fitted = json.loads(kept)
    fitted["model_sha256"] = "0" * 64  # fitted for another model.pt
    paths.calibration.write_text(json.dumps(fitted))
    with pytest.raises(UMLError, match="fitted for another model.pt"):
        export(params)
    paths.calibration.write_text(kept)


def test_stage_writes_metadata_that_predict_accepts(exported):
    params, model = exported
    paths = Paths(params)
    meta = json.loads(paths.metadata.read_text())
    assert meta["input"] == {"name": "image", "dtype": "float32", "shape": ["batch", 3, 64, 64], "range": [0.0, 1.0]}
    assert meta["outputs"]["seg_prob"]["shape"] == ["batch", 3, 64, 64]
    assert meta["outputs"]["class_uncertainty"]["shape"] == ["batch", 1]
    assert meta["class_names"] == ["non-glaucoma", "glaucoma"] and meta["positive_class"] == 1
    assert meta["preprocessing"]["image_size"] == 64 and meta["hashes"]["data"] == "abc"
    # The recorded parity is a measurement, not a placeholder: the stage measured the first
    # export.parity_images validation images among others, so this test's own measurement on them
    # is not (much) larger. (That it is below export.parity_atol cannot fail: the stage raises above.)
    images, _, _, _ = load_split(paths.dataset, "val", limit=params.export.parity_images)
    measured = _max_abs_diff(model, paths.model_onnx, images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0,
                             _temperatures(paths))
    for name, value in measured.items():
        assert value <= 2 * meta["export"]["parity_max_abs_diff"][name] + 1e-7, (name, value, meta["export"])
    assert meta["versions"]["onnxruntime"] and meta["versions"]["torch"]
    onnx_model = OnnxModel(paths.model_onnx)  # the deployment reader's contract checks pass
    assert onnx_model.image_size == 64 and onnx_model.has_cls and onnx_model.has_seg
    # The calibration is the calibrate stage's, copied whole; the card pointer leads to data/reports.
    assert meta["calibration"] == json.loads(paths.calibration.read_text())
    assert (paths.metadata.parent / meta["model_card"]).resolve() == paths.model_card


def test_parity_on_data_set_images(exported):
    params, model = exported
    images, _, _, _ = load_split(Paths(params).dataset, "test")
    batch = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    assert max(_max_abs_diff(model, Paths(params).model_onnx, batch, _temperatures(Paths(params))).values()) < 1e-4


def test_parity_reports_a_model_that_does_not_match_the_file(exported):
    """A deliberately wrong pair: the stage's ONNX file checked against another model."""
    params, model = exported
    torch.manual_seed(1)
    other = build_model("small", image_size=64).eval()
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    temperatures = _temperatures(Paths(params))
    assert max(parity(other, Paths(params).model_onnx, images, *temperatures).values()) > 1e-2
    assert max(parity(model, Paths(params).model_onnx, images, *temperatures).values()) < 1e-4


def test_stage_fails_and_removes_the_model_when_parity_is_off(exported):
    params, _ = exported
    strict = params.with_overrides({"export.parity_atol": 1e-12})
    with pytest.raises(UMLError, match="parity check failed"):
        export(strict)
    assert not Paths(params).model_onnx.exists() and not Paths(params).metadata.exists()
    assert not list(Paths(params).models_dir.glob("*.partial"))
    export(params)  # restore for other tests
    assert Paths(params).model_onnx.exists()


def test_metadata_carries_the_onnx_sha256_so_a_half_published_pair_is_refused(exported, monkeypatch):
    import hashlib
    from pathlib import Path

    from uml.errors import ModelFileError

    params, model = exported
    paths = Paths(params)
    meta = json.loads(paths.metadata.read_text())
    assert meta["onnx_sha256"] == hashlib.sha256(paths.model_onnx.read_bytes()).hexdigest()
    old_onnx = paths.model_onnx.read_bytes()

    # A retrained model.pt whose export is killed between its two renames.
    torch.manual_seed(1)
    save_model(build_model("small", image_size=64).eval(), paths.model_pt,
               extra={"class_names": ["non-glaucoma", "glaucoma"], "mask_classes": ["background", "disc", "cup"],
                      "data_hash": "abc", "run": "r2", "code_fingerprint": "f" * 64})
    calibrate(params)
    real_replace = Path.replace

    def killed_before_the_model(self, target):
        if Path(target) == paths.model_onnx:
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_before_the_model)
    with pytest.raises(KeyboardInterrupt):
        export(params)
    monkeypatch.undo()
    assert paths.model_onnx.read_bytes() == old_onnx  # the old model beside the new metadata
    assert json.loads(paths.metadata.read_text())["hashes"]["code"] == "f" * 64
    with pytest.raises(ModelFileError, match="come from different exports"):
        OnnxModel(paths.model_onnx)

    save_model(model, paths.model_pt, extra={"class_names": ["non-glaucoma", "glaucoma"],
                                             "mask_classes": ["background", "disc", "cup"], "data_hash": "abc", "run": "r"})
    calibrate(params)
    export(params)  # restore for other tests
    OnnxModel(paths.model_onnx)
