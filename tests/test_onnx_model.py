"""uml.onnx_model: metadata.json as a typed model, and the reader's contract checks on exports
that break it (controlled models from tests/toy_onnx.py, built to be wrong on purpose)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

import numpy as np
import onnxruntime
import pytest

from tests.toy_onnx import export_toy
from uml.errors import ConfigError, ModelFileError
from uml.image_io import RESAMPLING, ResizeMethod
from uml.onnx_model import METADATA_FORMAT, ExportMetadata, OnnxModel, model_files, open_model_files, read_metadata

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


# ------------------------------------------------------------------------ execution providers
class _RecordingSession:
    """Stands in for ``onnxruntime.InferenceSession``: records the providers it was asked for and
    reports them as its own (a CUDA session cannot be made on this machine), while a real CPU
    session does the work."""

    created: list[list[str]] = []

    def __init__(self, path, sess_options=None, providers=None, **kwargs):
        type(self).created.append(list(providers))
        self._providers = list(providers)
        self._real = _REAL_SESSION(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self) -> list[str]:
        return self._providers

    def __getattr__(self, name):
        return getattr(self._real, name)


_REAL_SESSION = onnxruntime.InferenceSession


@pytest.fixture
def hardware(monkeypatch):
    """Set what onnxruntime reports as installed providers and whether a GPU is visible."""
    from uml import onnx_model

    _RecordingSession.created = []

    def set_hardware(cuda_installed: bool, gpu: bool, fake_session: bool = True) -> None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_installed else ["CPUExecutionProvider"]
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
        monkeypatch.setattr(onnx_model, "gpu_visible", lambda: gpu)
        if fake_session:
            monkeypatch.setattr(onnxruntime, "InferenceSession", _RecordingSession)

    return set_hardware


@pytest.mark.parametrize(("cuda_installed", "gpu", "provider", "session", "device", "level", "why"), [
    (True, True, "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", "INFO", "the GPU (CUDAExecutionProvider"),
    (False, False, "auto", ["CPUExecutionProvider"], "cpu", "INFO", "has no CUDAExecutionProvider"),
    (True, False, "auto", ["CPUExecutionProvider"], "cpu", "INFO", "no GPU is visible"),
    # A GPU left unused because the CPU-only onnxruntime is installed: worth a warning.
    (False, True, "auto", ["CPUExecutionProvider"], "cpu", "WARNING", "a GPU is visible, but onnxruntime"),
    (True, True, "cpu", ["CPUExecutionProvider"], "cpu", "INFO", "the CPU (provider: cpu)"),
    (True, True, "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", "INFO", "the GPU"),
])
def test_the_session_runs_where_the_hardware_and_the_setting_say(toy_dir, hardware, caplog, cuda_installed, gpu,
                                                                 provider, session, device, level, why):
    hardware(cuda_installed, gpu)
    with caplog.at_level("INFO", logger="uml.onnx_model"):
        model = OnnxModel(toy_dir / "model.onnx", provider=provider)
    assert _RecordingSession.created == [session]
    assert (model.device, list(model.providers)) == (device, session)
    [record] = [r for r in caplog.records if r.name == "uml.onnx_model"]
    assert record.levelname == level and why in record.getMessage() and "model.onnx" in record.getMessage()
    assert why in model.placement


@pytest.mark.parametrize(("cuda_installed", "gpu", "why"), [
    (False, True, "has no CUDAExecutionProvider"),
    (True, False, "no GPU is visible"),
])
def test_forcing_cuda_where_it_cannot_run_is_a_clear_error(toy_dir, hardware, cuda_installed, gpu, why):
    hardware(cuda_installed, gpu)
    with pytest.raises(ConfigError, match=rf"evaluate\.provider: 'cuda', but .*{why}"):
        OnnxModel(toy_dir / "model.onnx", provider="cuda", setting="evaluate.provider")
    assert _RecordingSession.created == []  # refused before any session was opened


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_cuda_session_onnxruntime_cannot_make_falls_back_to_the_cpu_or_fails_when_forced(toy_dir, hardware, caplog):
    # The real onnxruntime here has no CUDA: told that it has one, it drops the provider from the
    # session (as it does when the CUDA libraries fail to load), which the reader notices.
    hardware(cuda_installed=True, gpu=True, fake_session=False)
    with caplog.at_level("INFO", logger="uml.onnx_model"):
        model = OnnxModel(toy_dir / "model.onnx")
    assert model.device == "cpu" and model.providers == ("CPUExecutionProvider",)
    [record] = [r for r in caplog.records if r.name == "uml.onnx_model"]
    assert record.levelname == "WARNING" and "on the CPU" in record.getMessage()
    with pytest.raises(ConfigError, match=r"--provider: 'cuda', but onnxruntime left CUDAExecutionProvider out"):
        OnnxModel(toy_dir / "model.onnx", provider="cuda", setting="--provider")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_broken_model_file_is_a_model_error_whatever_the_provider(tmp_path, toy_dir, hardware):
    hardware(cuda_installed=True, gpu=True, fake_session=False)
    broken = _with_metadata(tmp_path, toy_dir, "broken", lambda m: None)
    (broken / "model.onnx").write_text("not a model")
    for provider in ("auto", "cuda", "cpu"):
        with pytest.raises(ModelFileError, match="not a loadable ONNX model"):
            OnnxModel(broken / "model.onnx", provider=provider)


def test_gpu_visibility_reads_the_device_files_and_cuda_visible_devices(tmp_path, monkeypatch):
    from uml.onnx_model import gpu_visible

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "nvidiactl").touch()  # the control device alone is no GPU
    assert not gpu_visible(tmp_path)
    (tmp_path / "nvidia0").touch()
    assert gpu_visible(tmp_path)
    for hidden in ("", "-1", "-1,0", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not gpu_visible(tmp_path), hidden
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_visible(tmp_path)


def test_the_evaluate_stage_and_predict_pass_their_setting_on(tmp_path, toy_dir, hardware, capsys):
    from uml.cli import main
    from uml.config import parse_params
    from uml.evaluate import evaluate

    hardware(cuda_installed=False, gpu=False)
    root = tmp_path / "data"
    shutil.copytree(toy_dir, root / "models")
    # The model is opened before the data set is read: the setting's error comes first.
    with pytest.raises(ConfigError, match=r"^evaluate\.provider: 'cuda', but onnxruntime .* has no CUDAExecutionProvider"):
        evaluate(parse_params({"data": {"root": str(root)}, "evaluate": {"provider": "cuda"}}))
    with pytest.raises(ConfigError, match=r"evaluate\.provider"):
        parse_params({"evaluate": {"provider": "gpu"}})

    args = ["predict", "nothing.png", "--model", str(root / "models" / "model.onnx"), "--out", str(tmp_path / "out")]
    assert main([*args, "--provider", "cuda"]) == 1
    assert "uml predict: error: --provider: 'cuda', but onnxruntime" in capsys.readouterr().err
    assert main([*args, "--provider", "cpu"]) == 1  # the model opens; the image does not exist
    err = capsys.readouterr().err
    assert "uml predict: onnxruntime runs on the CPU (--provider: cpu)" in err and "nothing.png" in err
    assert _RecordingSession.created == [["CPUExecutionProvider"]]


def test_a_model_shipped_as_bytes_opens_without_its_folder_and_answers_alike(toy_dir):
    # What a Ray task gets: the two files' bytes. The model opened from them runs after its
    # temporary folder is gone, and answers a batch exactly as the model opened at its path.
    at_path = OnnxModel(toy_dir / "model.onnx", threads=1)
    shipped = open_model_files(model_files(at_path), threads=1)
    assert not shipped.path.exists() and not shipped.metadata_path.exists()
    assert shipped.metadata == at_path.metadata
    batch = np.random.default_rng(0).random((2, 3, at_path.image_size, at_path.image_size), dtype=np.float32)
    expected, got = at_path.run(batch), shipped.run(batch)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_shipped_bytes_of_another_export_are_refused(toy_dir):
    # A model file and a metadata.json that are not a pair (the metadata of an export whose model
    # hashed otherwise) fail the same hash check as on disk.
    onnx_bytes, metadata_bytes = model_files(OnnxModel(toy_dir / "model.onnx", threads=1))
    other = json.loads(metadata_bytes)
    other["onnx_sha256"] = "0" * 64
    with pytest.raises(ModelFileError, match="come from different exports"):
        open_model_files((onnx_bytes, json.dumps(other).encode()), threads=1)
