"""The export -> inference contract: ``metadata.json`` as one typed model, and the onnxruntime
wrapper that checks an exported model against it.

The export stage (:mod:`uml.export`) builds an :class:`ExportMetadata` and writes it next to
``model.onnx``; every reader (:mod:`uml.evaluate`, ``uml predict``) opens the pair through
:class:`OnnxModel`, which parses the file with :func:`read_metadata` and checks that the graph
honours the contract: input ``image`` (B, 3, S, S) float32 in [0, 1]; the calibrated deployment
outputs ``class_prob``, ``class_uncertainty``, ``seg_prob``, ``seg_uncertainty`` and the paper's raw
outputs ``class_prob_raw``, ``class_uncertainty_raw``, ``seg_uncertainty_raw`` (a single-task model
has only its own task's). Anything else is a :class:`~uml.errors.ModelFileError` that names the
file. ``metadata.json`` also carries what the ``calibrate`` stage fitted (:class:`uml.calibration.Calibration`:
temperatures, the referral rule, the unusual-image rule, the vCDR interval), which
:meth:`OnnxModel.unusual_features` and the readers apply.

Where the session runs (:func:`choose_providers`): onnxruntime's CUDA execution provider when the
installed onnxruntime has it (the ``onnxruntime-gpu`` package) and a GPU is visible
(:func:`gpu_visible`), else the CPU, with a log line that says why. ``provider="cuda"`` or
``"cpu"`` forces one; ``"cuda"`` where it cannot run is a :class:`~uml.errors.ConfigError`.

``format`` versions the file layout (:data:`METADATA_FORMAT`); a reader refuses another version.
The ONNX file must be the one its metadata describes: ``onnx_sha256`` is checked against the file,
so a model and metadata of different exports are refused instead of run with the wrong class
names or preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from uml.calibration import Calibration
from uml.config import InferenceProvider
from uml.errors import ConfigError, ModelFileError
from uml.image_io import PIXEL_MAX, ResizeMethod
from uml.quality import unusual_features

METADATA_FORMAT = "uml-onnx/2"
INPUT_NAME = "image"
CLASS_OUTPUTS = ("class_prob", "class_uncertainty", "class_prob_raw", "class_uncertainty_raw")
SEG_OUTPUTS = ("seg_prob", "seg_uncertainty", "seg_uncertainty_raw")
# The order in which the export traces the outputs (a single-task model has a subset).
OUTPUT_ORDER = CLASS_OUTPUTS + SEG_OUTPUTS
METADATA_SHA256_KEY = "onnx_sha256"

log = logging.getLogger(__name__)

PROVIDERS: tuple[str, ...] = get_args(InferenceProvider)
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class _Part(BaseModel):
    # Readers ignore keys they do not know, so a file from a newer export of the same format
    # still opens; the writer only ever sets the declared fields.
    model_config = ConfigDict(extra="ignore")


class InputSpec(_Part):
    name: str
    dtype: str = "float32"
    shape: list[int | str]
    range: list[float] = [0.0, 1.0]


class OutputSpec(_Part):
    dtype: str = "float32"
    shape: list[int | str]
    range: list[float] = [0.0, 1.0]
    meaning: str | None = None


class Preprocessing(_Part):
    image_size: int = Field(gt=0)
    channels: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    dtype: str = "float32"
    scale: float = 1.0 / PIXEL_MAX
    resize: ResizeMethod = "area"
    note: str | None = None


class TrainingRecord(_Part):
    """What the training stage recorded about the exported weights (provenance, not used to run)."""

    config: dict[str, Any]
    run: str | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, Any] | None = None
    loss: dict[str, Any] | None = None


class Hashes(_Part):
    data: str | None = None
    params: str | None = None
    code: str | None = None


class ExportRecord(_Part):
    opset: int
    parity_max_abs_diff: dict[str, float]
    parity_atol: float


class ExportMetadata(_Part):
    """The content of ``metadata.json``: what a reader needs to run the graph, plus provenance.

    ``positive_class`` is the index (into ``class_names``) of the class that the binary metrics
    score (sensitivity, F1, AUC); the export copies it from the prepared data set, where the data
    source declares it. ``model``, ``hashes``, ``export`` and ``versions`` are provenance: the
    export always writes them, readers do not need them.
    """

    format: Literal["uml-onnx/2"]
    # Optional only so that the reader can say what is wrong with a file of an older export.
    onnx_sha256: str | None = None
    input: InputSpec
    outputs: dict[str, OutputSpec]
    class_names: list[str] = []
    mask_classes: list[str] = []
    positive_class: int = Field(ge=0)
    tasks: list[Literal["cls", "seg"]]
    uncertainty: bool
    preprocessing: Preprocessing
    # What the calibrate stage fitted on the calibration split; the temperatures are already in the graph.
    calibration: Calibration
    # Where the evaluate stage writes the model card, relative to this file.
    model_card: str | None = None
    model: TrainingRecord | None = None
    hashes: Hashes | None = None
    export: ExportRecord | None = None
    versions: dict[str, str | None] | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def read_metadata(path: str | Path) -> ExportMetadata:
    """Parse ``metadata.json``; a :class:`ModelFileError` names the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: metadata file not found (the export stage writes it next to model.onnx)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    if raw.get("format") == "uml-onnx/1":
        raise ModelFileError(f"{path}: written by an older export (format uml-onnx/1, without calibrated outputs); run "
                             "`python -m pipeline.calibrate` and `python -m pipeline.export` (or `dvc repro`)")
    try:
        return ExportMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
                             for err in exc.errors())
        raise ModelFileError(f"{path}: does not follow the {METADATA_FORMAT} metadata format: {problems}") from None


def file_sha256(path: str | Path) -> str:
    with Path(path).open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def check_model_hash(model_path: Path, metadata: ExportMetadata, metadata_path: Path) -> None:
    """Raise :class:`ModelFileError` unless ``metadata`` records ``model_path``'s SHA-256: the export
    stage writes the pair together, and a pair from different exports (an interrupted export, a
    file copied from elsewhere) would otherwise run with the wrong names or preprocessing."""
    recorded = metadata.onnx_sha256
    if recorded is None:
        raise ModelFileError(f"{metadata_path}: has no '{METADATA_SHA256_KEY}' (written by an older export); "
                             "re-run the export stage so that the model and its metadata are checked as a pair")
    actual = file_sha256(model_path)
    if actual != recorded:
        raise ModelFileError(f"{model_path}: its SHA-256 {actual[:16]}... is not the {recorded[:16]}... that "
                             f"{metadata_path} describes: the two files come from different exports (an interrupted "
                             "export?); re-run the export stage")


def gpu_visible(dev: Path = Path("/dev")) -> bool:
    """Whether this process can see an NVIDIA GPU: the driver's device files (``nvidia0``, ...
    under ``dev``) exist and ``CUDA_VISIBLE_DEVICES``, when set, does not hide every device (an empty value,
    or ``-1`` first, as Ray sets it for a task without GPUs). It imports no CUDA library, so it
    is cheap enough for the CLI."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        if first in ("", "-1", "NoDevFiles"):
            return False
    return any(dev.glob("nvidia[0-9]*"))


@dataclass(frozen=True)
class ProviderChoice:
    """The execution providers to open a session with, and the sentence the log gives for them."""

    providers: tuple[str, ...]  # in onnxruntime's order of precedence
    device: Literal["cuda", "cpu"]
    reason: str
    # A warning when a visible GPU goes unused (onnxruntime without CUDA on a GPU machine).
    level: int = logging.INFO


def choose_providers(provider: str = "auto", setting: str = "provider") -> ProviderChoice:
    """The execution providers for ``provider`` (one of :data:`PROVIDERS`).

    ``auto``: CUDA (with the CPU for any operator CUDA lacks) when onnxruntime has the CUDA
    provider and :func:`gpu_visible`, else the CPU. ``cuda`` where either is missing is a
    :class:`ConfigError` that names ``setting`` (the params key or flag that asked for it).
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"{setting}: expected one of {list(PROVIDERS)}, got {provider!r}")
    if provider == "cpu":
        return ProviderChoice((CPU_PROVIDER,), "cpu", f"the CPU ({setting}: cpu)")
    available = list(ort.get_available_providers())
    installed, visible = CUDA_PROVIDER in available, gpu_visible()
    if installed and visible:
        return ProviderChoice((CUDA_PROVIDER, CPU_PROVIDER), "cuda", f"the GPU ({CUDA_PROVIDER}, {setting}: {provider})")
    if not installed:
        why = (f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (its providers: {available}; the "
               "onnxruntime-gpu package has it)")
        if visible:
            why = f"a GPU is visible, but {why}"
    else:
        why = (f"no GPU is visible (no /dev/nvidia* device, or CUDA_VISIBLE_DEVICES="
               f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r} hides them)")
    if provider == "cuda":
        raise ConfigError(f"{setting}: 'cuda', but {why}; use 'auto' or 'cpu' to run on the CPU")
    return ProviderChoice((CPU_PROVIDER,), "cpu", f"the CPU: {why}", logging.WARNING if visible else logging.INFO)


def _default_threads() -> int:
    # The machine is shared; two intra-op threads is what one stage may take.
    return max(1, min(2, os.cpu_count() or 1))


class OnnxModel:
    """An exported model in onnxruntime, checked against its ``metadata.json``.

    Attributes: ``path``, ``metadata_path``, ``metadata`` (the :class:`ExportMetadata`),
    ``outputs`` (the present output names, in session order), ``image_size``, ``resize``,
    ``scale``, ``bgr``, ``class_names``, ``mask_classes``, ``positive_class``, ``has_cls``,
    ``has_seg``, ``calibration`` (what the calibrate stage fitted, from the metadata),
    ``device`` (``"cuda"`` or ``"cpu"``: where the session runs), ``providers`` (the session's
    execution providers, as onnxruntime reports them) and ``placement`` (where it runs and why,
    the sentence the log gives).

    ``provider`` chooses where it runs (:func:`choose_providers`; ``setting`` is the params key
    or flag that set it, for the messages). A CUDA session that onnxruntime cannot create (a
    driver or CUDA library problem) falls back to the CPU with a warning under ``auto`` and is a
    :class:`ConfigError` under ``cuda``.
    """

    def __init__(self, path: str | Path, metadata_path: str | Path | None = None, threads: int | None = None,
                 provider: str = "auto", setting: str = "provider"):
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata_path = Path(metadata_path) if metadata_path is not None else self.path.with_name("metadata.json")
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: model file not found (run the export stage, or pass --model)")
        self.metadata = read_metadata(self.metadata_path)

        choice = choose_providers(provider, setting)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: onnxruntime's warnings are not actionable here
        self.session = self._open_session(options, choice, provider, setting)
        self.providers = tuple(self.session.get_providers())
        self.device: Literal["cuda", "cpu"] = "cuda" if CUDA_PROVIDER in self.providers else "cpu"
        self._check_contract()
        check_model_hash(self.path, self.metadata, self.metadata_path)

    def _open_session(self, options: Any, choice: ProviderChoice, provider: str, setting: str) -> Any:
        """The session on ``choice``'s providers. onnxruntime's own fallback (which prints to stdout
        and would also move a failing run to the CPU unnoticed) is off: a CUDA session it cannot
        create is handled here, and the log says where the session runs."""
        import onnxruntime as ort

        def create(providers: tuple[str, ...]) -> Any:
            try:
                return ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers),
                                            enable_fallback=0)
            except Exception as exc:  # onnxruntime raises its own exception types for every load failure
                if providers == (CPU_PROVIDER,):
                    raise ModelFileError(f"{self.path}: not a loadable ONNX model: {exc}") from None
                raise

        if choice.device == "cpu":
            session = create(choice.providers)
            self.placement = choice.reason
            log.log(choice.level, "onnxruntime runs %s on %s", self.path.name, self.placement)
            return session
        try:
            session = create(choice.providers)
            failure = None if CUDA_PROVIDER in session.get_providers() else (
                f"onnxruntime left {CUDA_PROVIDER} out of the session (its providers: {session.get_providers()})")
        except Exception as exc:
            session, failure = None, f"onnxruntime could not create a CUDA session: {exc}"
        if failure is None:
            self.placement = choice.reason
            log.info("onnxruntime runs %s on %s", self.path.name, self.placement)
            return session
        cpu_session = session if session is not None else create((CPU_PROVIDER,))  # a broken file stops here
        if provider == "cuda":
            raise ConfigError(f"{setting}: 'cuda', but {failure}; use 'auto' or 'cpu' to run on the CPU")
        self.placement = f"the CPU: {failure}"
        log.warning("onnxruntime runs %s on %s", self.path.name, self.placement)
        return cpu_session

    # ------------------------------------------------------------------ contract checks
    def _check_contract(self) -> None:
        where, meta = f"{self.path}", self.metadata
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            names = [i.name for i in inputs]
            raise ModelFileError(f"{where}: expected one input named '{INPUT_NAME}', the model has {names}")
        shape = inputs[0].shape
        if inputs[0].type != "tensor(float)" or len(shape) != 4 or shape[1] not in (3, "3"):
            raise ModelFileError(f"{where}: input '{INPUT_NAME}' must be float32 (batch, 3, H, W), got {inputs[0].type} {shape}")
        if meta.input.name != INPUT_NAME:
            raise ModelFileError(f"{self.metadata_path}: input.name must be '{INPUT_NAME}', got {meta.input.name!r}")

        self.image_size = meta.preprocessing.image_size
        for dim in shape[2:]:
            if isinstance(dim, int) and dim != self.image_size:
                raise ModelFileError(f"{where}: input is {shape[2]}x{shape[3]} but metadata says image_size {self.image_size}")
        self.resize = meta.preprocessing.resize
        self.scale = meta.preprocessing.scale
        self.bgr = meta.preprocessing.channels == "BGR"

        session_outputs = {o.name: o for o in self.session.get_outputs()}
        self.outputs = tuple(name for name in session_outputs if name in OUTPUT_ORDER)
        if "class_prob" not in session_outputs and "seg_prob" not in session_outputs:
            raise ModelFileError(
                f"{where}: has neither 'class_prob' nor 'seg_prob' among its outputs {list(session_outputs)}; "
                "not a model exported by uml"
            )
        missing = sorted(set(meta.outputs) - set(session_outputs))
        if missing:
            raise ModelFileError(f"{self.metadata_path}: lists outputs {missing} that {self.path.name} does not have")

        self.has_cls = "class_prob" in session_outputs
        self.has_seg = "seg_prob" in session_outputs
        for task, names in ((self.has_cls, CLASS_OUTPUTS), (self.has_seg, SEG_OUTPUTS)):
            absent = [name for name in names if name not in session_outputs]
            if task and absent:
                raise ModelFileError(f"{where}: lacks the outputs {absent} (has {list(session_outputs)}); re-run the export stage")
        self.calibration = meta.calibration
        self.class_names = list(meta.class_names)
        self.mask_classes = list(meta.mask_classes)
        self.positive_class = meta.positive_class
        if self.has_cls:
            self._check_classes("class_prob", 1, self.class_names, "class_names", session_outputs)
            if not 0 <= self.positive_class < len(self.class_names):
                raise ModelFileError(f"{self.metadata_path}: positive_class {self.positive_class} is not a class index")
        if self.has_seg:
            self._check_classes("seg_prob", 1, self.mask_classes, "mask_classes", session_outputs)

    def _check_classes(self, output: str, axis: int, names: list[str], key: str, session_outputs: dict[str, Any]) -> None:
        if not names:
            raise ModelFileError(f"{self.metadata_path}: '{key}' is missing or empty, but the model has '{output}'")
        size = session_outputs[output].shape[axis] if len(session_outputs[output].shape) > axis else None
        if isinstance(size, int) and size != len(names):
            raise ModelFileError(f"{self.path}: '{output}' has {size} classes but metadata {key} lists {len(names)}")

    # ------------------------------------------------------------------------ inference
    def scale_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images (N, S, S, 3) at model resolution -> float32 NHWC in the model's value range."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected uint8 images (N, {self.image_size}, {self.image_size}, 3), got {images.shape}")
        return images.astype(np.float32) * np.float32(self.scale)

    def to_input(self, images: np.ndarray) -> np.ndarray:
        """Scaled float NHWC RGB images (from :meth:`scale_images`, possibly corrupted) -> the NCHW model input."""
        batch = np.asarray(images, dtype=np.float32)
        if self.bgr:
            batch = batch[..., ::-1]
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images (N, S, S, 3) at model resolution -> the float32 NCHW input."""
        return self.to_input(self.scale_images(images))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One forward pass of a float32 (B, 3, S, S) batch; returns the present outputs by name."""
        values = self.session.run(list(self.outputs), {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.outputs, values))

    def unusual_features(self, images: np.ndarray, seg_uncertainty: np.ndarray | None) -> np.ndarray:
        """The features of the unusual-image rule (:func:`uml.quality.unusual_features`, in
        ``calibration.unusual.statistics`` order) of float NHWC images in [0, 1] at model
        resolution (possibly corrupted) and their ``seg_uncertainty`` maps (B, 1, S, S)."""
        features, names = unusual_features(images, seg_uncertainty)
        if names != self.calibration.unusual.statistics:
            raise ModelFileError(f"{self.metadata_path}: the unusual-image rule was fitted on {self.calibration.unusual.statistics}, "
                                 f"this model gives {names}; re-run the calibrate and export stages")
        return features


# ------------------------------------------------------------------ shipping a model to Ray tasks
# model.onnx and metadata.json as bytes: what a Ray task gets through the object store, so that no
# node needs the driver's folder to open the model.
ModelFiles = tuple[bytes, bytes]


def model_files(model: OnnxModel) -> ModelFiles:
    """``model``'s two files as bytes (put them into Ray's object store once per job)."""
    return model.path.read_bytes(), model.metadata_path.read_bytes()


def open_model_files(files: ModelFiles, threads: int | None = None, provider: str = "auto",
                     setting: str = "provider") -> OnnxModel:
    """An :class:`OnnxModel` of :func:`model_files`, opened in the process that received them: the
    bytes are written to a temporary folder and opened there (the hash check compares the copy's
    sha256 with the metadata's, so the files arrived whole and as a pair). The folder is gone once
    the session holds the model, so the model's ``path`` names no file afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="uml-model-") as tmp:
        model_path, metadata_path = Path(tmp) / "model.onnx", Path(tmp) / "metadata.json"
        model_path.write_bytes(files[0])
        metadata_path.write_bytes(files[1])
        return OnnxModel(model_path, metadata_path, threads=threads, provider=provider, setting=setting)
