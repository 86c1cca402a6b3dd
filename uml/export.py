"""The ``export`` stage: ``model.pt`` -> one self-contained ``model.onnx`` + ``metadata.json``.

The ONNX graph takes ``image`` float32 (B, 3, H, W) in [0, 1] with a dynamic batch and returns, by
name, the calibrated deployment outputs ``class_prob``, ``class_uncertainty``, ``seg_prob``,
``seg_uncertainty`` and the paper's raw outputs ``class_prob_raw`` (alpha/S),
``class_uncertainty_raw`` (K/S) and ``seg_uncertainty_raw`` (the mutual map U); see
:func:`uml.models.uml_net.deployment_outputs`. The temperatures come from the calibrate stage's
``calibration.json``, which must have been fitted for this ``model.pt`` (its SHA-256), and are
constants of the graph. The single-task ablations export only the outputs they have. The stage
checks the graph with ``onnx.checker``, runs it in onnxruntime against torch on validation
images and random inputs, and fails if they differ by more than ``export.parity_atol``.

``metadata.json`` is an :class:`uml.onnx_model.ExportMetadata` (the contract every reader parses).
It records the SHA-256 of ``model.onnx`` (``onnx_sha256``), which every reader
checks, so the two files are used as one unit: a pair from different exports (an export killed
between its two renames, a file copied from elsewhere) is refused instead of run with the wrong
class names or preprocessing. ``hashes`` records the data content hash, the params hash and the
fingerprint of the code that trained the model.
"""

from __future__ import annotations

import logging
import platform
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from uml.calibration import Calibration
from uml.config import Params, Paths
from uml.data.store import PreparedData, load_split, open_prepared
from uml.errors import ModelFileError, UMLError
from uml.image_io import PIXEL_MAX
from uml.models import UMLNet, load_model
from uml.models import read_model_file
from uml.onnx_model import (
    INPUT_NAME,
    METADATA_FORMAT,
    OUTPUT_ORDER,
    ExportMetadata,
    ExportRecord,
    Hashes,
    InputSpec,
    OutputSpec,
    Preprocessing,
    TrainingRecord,
    file_sha256,
)

log = logging.getLogger(__name__)
# The evaluate stage writes the model card here, relative to metadata.json (data/models -> data/reports).
MODEL_CARD_FROM_METADATA = "../reports/model_card.md"
# protobuf's hard limit on one serialised message; beyond it ONNX needs external data files.
PROTOBUF_LIMIT = 2 * 1024**3


class DeploymentGraph(nn.Module):
    """``UMLNet.infer`` with fixed post-hoc settings (temperatures, error-map width) as a tuple in a fixed order, which is what ONNX
    export traces."""

    def __init__(self, model: UMLNet, class_temperature: float = 1.0, seg_temperature: float = 1.0,
                 error_map_sigma: float = 0.0, class_power: float = 1.0):
        super().__init__()
        self.model = model
        self.settings = (float(class_temperature), float(seg_temperature), float(error_map_sigma), float(class_power))
        with torch.no_grad():
            probe = model.infer(torch.zeros(1, 3, model.cfg.image_size, model.cfg.image_size))
        self.output_names = [name for name in OUTPUT_ORDER if name in probe]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.infer(image, *self.settings)
        return tuple(out[name] for name in self.output_names)


def export_onnx(model: UMLNet, path: str | Path, opset: int = 18, class_temperature: float = 1.0,
                seg_temperature: float = 1.0, error_map_sigma: float = 0.0, class_power: float = 1.0) -> list[str]:
    """Write ``model`` (eval mode) with these post-hoc settings as a single ONNX file; returns the output names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    graph = DeploymentGraph(model, class_temperature, seg_temperature, error_map_sigma, class_power).eval()
    size = model.cfg.image_size
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = param_bytes > PROTOBUF_LIMIT * 0.9
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; it is the one that traces this
        # model (dynamic batch through reshape/bmm in the attention) into a single plain file.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.rand(2, 3, size, size),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=graph.output_names,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in graph.output_names}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    if external:
        onnx.save_model(onnx.load(str(tmp)), str(tmp), save_as_external_data=True, location=path.name + ".data")
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)
    return graph.output_names


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def parity(model: UMLNet, onnx_path: str | Path, images: np.ndarray, class_temperature: float = 1.0,
           seg_temperature: float = 1.0, error_map_sigma: float = 0.0, class_power: float = 1.0) -> dict[str, float]:
    """Max absolute difference per output between onnxruntime and eager torch on ``images``
    (float32, (N, 3, H, W) in [0, 1]), run with the batch size of the input."""
    sess = session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    ort_out = dict(zip(names, sess.run(names, {INPUT_NAME: images.astype(np.float32)})))
    with torch.no_grad():
        torch_out = model.eval().infer(torch.from_numpy(images.astype(np.float32)), class_temperature, seg_temperature,
                                       error_map_sigma, class_power)
    return {name: float(np.abs(ort_out[name] - torch_out[name].numpy()).max()) for name in names}


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def output_meanings(cfg: Any, calibration: Calibration) -> dict[str, str]:
    """What each output is, in words, for ``metadata.json``."""
    evidential = cfg.uncertainty
    mutual = evidential and "cls" in cfg.tasks
    t_cls, t_seg, sigma, power = calibration.deployment_settings
    score = "log alpha" if evidential else "logits"
    return {
        "class_prob": (f"calibrated class probability: softmax({score} / {t_cls:.4g})"
                       + (", the mean of the tempered Dirichlet alpha^(1/T)" if evidential else "")
                       if power == 1.0 else
                       f"calibrated class probability: softmax(sign(z) |z|^{power:.4g} / {t_cls:.4g}), z = {score} "
                       "centred on its mean over the classes (an odd, increasing map: the argmax and, for two "
                       "classes, the order of the probabilities are those of the raw output)"),
        "class_uncertainty": "calibrated probability that the predicted class is wrong: 1 - max_k class_prob (the referral score)",
        "class_prob_raw": "the paper's class probability alpha/S (uncalibrated)" if evidential else "softmax probability (uncalibrated)",
        "class_uncertainty_raw": "the paper's image uncertainty K/S (1 = no evidence)" if evidential
        else "normalised entropy of the uncalibrated softmax",
        "seg_prob": f"calibrated per-pixel class probability softmax(S_0 / {t_seg:.4g}); its argmax is the delivered mask",
        "seg_uncertainty": (f"normalised entropy of seg_prob smoothed by a Gaussian of {sigma:g} px: the uncertainty of the "
                            "delivered mask (its error map)"),
        "seg_uncertainty_raw": ("the paper's pixel uncertainty U = C/S of the mutual branch (the map that steers the navigator)"
                                if mutual else "normalised entropy of the mutual branch's softmax" if "cls" in cfg.tasks
                                else "normalised entropy of the uncalibrated softmax(S_0)"),
    }


def build_metadata(model: UMLNet, extra: dict[str, Any], outputs: list[str], params: Params,
                   parity_diff: dict[str, float], opset: int, onnx_sha256: str, positive_class: int,
                   calibration: Calibration) -> ExportMetadata:
    """The metadata of an export; ``positive_class`` is the prepared data set's."""
    cfg = model.cfg
    size = cfg.image_size
    k, c = cfg.num_classes, cfg.num_mask_classes
    shapes = {
        "class_prob": ["batch", k], "class_uncertainty": ["batch", 1],
        "class_prob_raw": ["batch", k], "class_uncertainty_raw": ["batch", 1],
        "seg_prob": ["batch", c, size, size], "seg_uncertainty": ["batch", 1, size, size],
        "seg_uncertainty_raw": ["batch", 1, size, size],
    }
    ranges = {name: [0.0, 1.0] for name in shapes}
    ranges["class_uncertainty"] = [0.0, 1.0 - 1.0 / k]
    meaning = output_meanings(cfg, calibration)
    return ExportMetadata(
        format=METADATA_FORMAT,
        # Readers (uml.onnx_model.OnnxModel, hence evaluate and predict) refuse a model.onnx with another hash.
        onnx_sha256=onnx_sha256,
        input=InputSpec(name=INPUT_NAME, dtype="float32", shape=["batch", 3, size, size], range=[0.0, 1.0]),
        outputs={name: OutputSpec(dtype="float32", shape=shapes[name], range=ranges[name], meaning=meaning[name])
                 for name in outputs},
        class_names=list(extra.get("class_names") or [f"class_{k}" for k in range(cfg.num_classes)]),
        mask_classes=list(extra.get("mask_classes") or [f"class_{c}" for c in range(cfg.num_mask_classes)]),
        positive_class=positive_class,
        tasks=list(cfg.tasks),
        uncertainty=cfg.uncertainty,
        preprocessing=Preprocessing(
            image_size=size, channels="RGB", layout="NCHW", dtype="float32", scale=1.0 / PIXEL_MAX, resize="area",
            note="RGB uint8 image resized to image_size x image_size (area when shrinking, linear when enlarging), divided by 255",
        ),
        calibration=calibration,
        model_card=MODEL_CARD_FROM_METADATA,
        model=TrainingRecord(config=cfg.to_dict(), run=extra.get("run"), best_epoch=extra.get("best_epoch"),
                             best_metrics=extra.get("best_metrics"), loss=extra.get("loss")),
        hashes=Hashes(data=extra.get("data_hash"), params=params.section_hash("model", "loss", "train"),
                      code=extra.get("code_fingerprint")),
        export=ExportRecord(opset=opset, parity_max_abs_diff=parity_diff, parity_atol=params.export.parity_atol),
        versions={"uml": _version("uml"), "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": ort.__version__, "timm": _version("timm"), "python": platform.python_version()},
    )


def read_calibration(path: Path, model_pt: Path) -> Calibration:
    """``calibration.json``, checked to be the calibration of ``model_pt``."""
    if not path.is_file():
        raise ModelFileError(f"{path}: calibration not found; run `python -m pipeline.calibrate` after training")
    try:
        calibration = Calibration.model_validate_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not a calibration file of this uml version ({exc}); re-run the calibrate stage") from None
    if calibration.model_sha256 != file_sha256(model_pt):
        raise ModelFileError(f"{path}: was fitted for another model.pt than {model_pt} (SHA-256 differs): re-run "
                             "`python -m pipeline.calibrate`")
    return calibration


def _positive_class(prepared: PreparedData, extra: dict[str, Any], model_pt: Path) -> int:
    """The data set's positive class, after checking that the model was trained on its classes."""
    trained_on = extra.get("class_names")
    if trained_on is not None and list(trained_on) != prepared.class_names:
        raise ModelFileError(f"{model_pt} was trained on the classes {list(trained_on)}, the data set {prepared.path} "
                             f"has {prepared.class_names}: retrain on this data set")
    return prepared.positive_class


def export(params: Params) -> Path:
    """The ``export`` stage: write ``model.onnx`` and ``metadata.json``; return the ONNX path."""
    paths = Paths(params)
    extra = read_model_file(paths.model_pt).get("extra", {})
    model = load_model(paths.model_pt)
    calibration = read_calibration(paths.calibration, paths.model_pt)
    settings = calibration.deployment_settings
    prepared = open_prepared(paths.dataset)
    positive_class = _positive_class(prepared, extra, paths.model_pt)
    opset = params.export.opset
    log.info("exporting %s (%s, %d px) to ONNX opset %d", paths.model_pt, "+".join(model.cfg.tasks), model.cfg.image_size, opset)
    # Export under a staging name: model.onnx appears only once it has passed the parity check.
    staging = paths.model_onnx.with_name(paths.model_onnx.name + ".partial")
    outputs = export_onnx(model, staging, opset, *settings)
    images, _, _, _ = load_split(prepared, "val", limit=params.export.parity_images)
    if images.shape[1] != model.cfg.image_size:
        staging.unlink(missing_ok=True)
        raise ModelFileError(f"{paths.model_pt} expects {model.cfg.image_size} px images but {paths.dataset} holds "
                             f"{images.shape[1]} px: retrain after changing data.image_size")
    data = images.transpose(0, 3, 1, 2).astype(np.float32) / PIXEL_MAX
    rng = np.random.default_rng(0)
    random_inputs = rng.random((3, 3, model.cfg.image_size, model.cfg.image_size), dtype=np.float32)
    diffs = [parity(model, staging, batch, *settings) for batch in (data, data[:1], random_inputs)]
    worst = {name: max(d[name] for d in diffs) for name in outputs}
    log.info("onnxruntime vs torch, max |diff| over %d validation + 3 random images: %s", len(data),
             ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    if max(worst.values()) > params.export.parity_atol:
        # Neither the new graph nor an older model.onnx/metadata.json pair, which would not match model.pt.
        for stale in (staging, paths.model_onnx, paths.metadata):
            stale.unlink(missing_ok=True)
        raise UMLError(f"ONNX parity check failed: max |onnxruntime - torch| = {max(worst.values()):.3e} > "
                       f"export.parity_atol {params.export.parity_atol:g} ({worst}); no model.onnx was written")
    meta = build_metadata(model, extra, outputs, params, worst, opset, onnx_sha256=file_sha256(staging),
                          positive_class=positive_class, calibration=calibration)
    tmp = paths.metadata.with_name(paths.metadata.name + ".tmp")
    tmp.write_text(meta.to_json())
    # Two renames cannot be one atomic step: a kill between them leaves a new metadata.json beside
    # the old model.onnx, which every reader refuses because the recorded SHA-256 differs.
    tmp.replace(paths.metadata)
    staging.replace(paths.model_onnx)
    log.info("wrote %s (%.1f MB) and %s", paths.model_onnx, paths.model_onnx.stat().st_size / 1e6, paths.metadata)
    return paths.model_onnx
