"""uml.onnx_model: metadata.json as a typed model, and the reader's contract checks on exports
that break it (controlled models from tests/toy_onnx.py, built to be wrong on purpose)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

import pytest

from tests.toy_onnx import export_toy
from uml.errors import ModelFileError
from uml.image_io import RESAMPLING, ResizeMethod
from uml.onnx_model import METADATA_FORMAT, ExportMetadata, OnnxModel, read_metadata

# The top-level keys of metadata.json as the export writes them (format uml-onnx/2); renaming one
# would break every reader of an existing export.
EXPORTED_KEYS = ["format", "onnx_sha256", "input", "outputs", "class_names", "mask_classes", "positive_class", "tasks",
                 "uncertainty", "preprocessing", "calibration", "model_card", "model", "hashes", "export", "versions"]
CALIBRATION = {"num_images": 10, "model_sha256": "0" * 64, "min_image_side": 8,
               "unusual": {"statistics": ["brightness"], "center": [0.5], "scale": [0.1], "threshold": 3.0, "alpha": 0.1,
                           "calibration_images": 10}}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return export_toy(tmp_path_factory.mktemp("toy") / "models").parent


def _model_error(folder: Path) -> str:
    with pytest.raises(ModelFileError) as info:
        OnnxModel(folder / "model.onnx")
    return str(info.value)


def _with_metadata(tmp_path: Path, toy_dir: Path, name: str, edit) -> Path:
    """A copy of the toy export whose metadata.json is changed by ``edit(dict)``."""
    folder = tmp_path / name
    shutil.copytree(toy_dir, folder)
    meta = json.loads((folder / "metadata.json").read_text())
    edit(meta)
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_the_typed_model_writes_the_keys_of_the_file_format():
    meta = ExportMetadata.model_validate({
        "format": METADATA_FORMAT, "onnx_sha256": "0" * 64,
        "input": {"name": "image", "shape": ["batch", 3, 8, 8]},
        "outputs": {"class_prob": {"shape": ["batch", 2]}},
        "class_names": ["a", "b"], "mask_classes": [], "positive_class": 0, "tasks": ["cls"], "uncertainty": True,
        "preprocessing": {"image_size": 8}, "calibration": CALIBRATION,
        "model": {"config": {}}, "hashes": {}, "export": {"opset": 18, "parity_max_abs_diff": {}, "parity_atol": 1e-4},
        "versions": {"uml": None},
    })
    written = json.loads(meta.to_json())
    assert list(written) == EXPORTED_KEYS
    assert written["preprocessing"] == {"image_size": 8, "channels": "RGB", "layout": "NCHW", "dtype": "float32",
                                        "scale": 1.0 / 255.0, "resize": "area", "note": None}
    assert written["input"] == {"name": "image", "dtype": "float32", "shape": ["batch", 3, 8, 8], "range": [0.0, 1.0]}


def test_reader_refuses_another_format_and_names_the_key(tmp_path, toy_dir):
    folder = _with_metadata(tmp_path, toy_dir, "v3", lambda m: m.update(format="uml-onnx/3"))
    message = _model_error(folder)
    assert str(folder / "metadata.json") in message and "format" in message and "uml-onnx/2" in message
    # An export from before calibration is named as such, with what to re-run.
    folder = _with_metadata(tmp_path, toy_dir, "v1", lambda m: m.update(format="uml-onnx/1"))
    message = _model_error(folder)
    assert "older export" in message and "pipeline.calibrate" in message and "pipeline.export" in message
    folder = _with_metadata(tmp_path, toy_dir, "no_calibration", lambda m: m.pop("calibration"))
    assert "calibration" in _model_error(folder)
    folder = _with_metadata(tmp_path, toy_dir, "no_size", lambda m: m["preprocessing"].pop("image_size"))
    assert "preprocessing.image_size" in _model_error(folder)
    folder = _with_metadata(tmp_path, toy_dir, "bad_resize", lambda m: m["preprocessing"].update(resize="lanczos"))
    assert "preprocessing.resize" in _model_error(folder)


def test_the_positive_class_is_never_guessed(tmp_path, toy_dir):
    # The reader used to fall back to class 1 when the key was missing.
    folder = _with_metadata(tmp_path, toy_dir, "no_positive", lambda m: m.pop("positive_class"))
    assert "positive_class" in _model_error(folder)
    folder = _with_metadata(tmp_path, toy_dir, "positive_out_of_range", lambda m: m.update(positive_class=2))
    assert "positive_class 2 is not a class index" in _model_error(folder)
    # The model file is unchanged, so the pair still matches: the reader reports the declared class.
    folder = _with_metadata(tmp_path, toy_dir, "positive_0", lambda m: m.update(positive_class=0))
    assert OnnxModel(folder / "model.onnx").positive_class == 0
    assert read_metadata(folder / "metadata.json").positive_class == 0


def test_model_file_errors(tmp_path, toy_dir):
    # Controlled models (toy): exports that break the contract on purpose (input and output names).
    assert "model file not found" in _model_error(tmp_path / "nothing")

    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    shutil.copy(toy_dir / "model.onnx", no_meta / "model.onnx")
    message = _model_error(no_meta)
    assert "metadata.json" in message and "not found" in message

    not_json = _with_metadata(tmp_path, toy_dir, "not_json", lambda m: None)
    (not_json / "metadata.json").write_text("{")
    assert "not valid JSON" in _model_error(not_json)

    text = tmp_path / "text"
    text.mkdir()
    (text / "model.onnx").write_text("not a model")
    shutil.copy(toy_dir / "metadata.json", text / "metadata.json")
    message = _model_error(text)
    assert str(text / "model.onnx") in message and "not a loadable ONNX model" in message

    wrong_input = tmp_path / "wrong_input"
    export_toy(wrong_input, input_name="input")
    assert "expected one input named 'image'" in _model_error(wrong_input)

    wrong_outputs = tmp_path / "wrong_outputs"
    export_toy(wrong_outputs, names=["logits", "u", "seg", "seg_u"])
    assert "neither 'class_prob' nor 'seg_prob'" in _model_error(wrong_outputs)

    meta_mismatch = tmp_path / "meta_mismatch"
    export_toy(meta_mismatch, tasks=("seg",))
    meta = json.loads((toy_dir / "metadata.json").read_text())
    (meta_mismatch / "metadata.json").write_text(json.dumps(meta))  # declares class outputs too
    assert "class_prob" in _model_error(meta_mismatch)

    wrong_size = tmp_path / "wrong_size"
    export_toy(wrong_size)
    meta["preprocessing"]["image_size"] = 128
    (wrong_size / "metadata.json").write_text(json.dumps(meta))
    # The export fixes H and W, so a metadata size that disagrees is caught.
    assert "image_size 128" in _model_error(wrong_size)


def test_every_resize_method_the_metadata_allows_can_be_applied():
    assert set(get_args(ResizeMethod)) == set(RESAMPLING)
