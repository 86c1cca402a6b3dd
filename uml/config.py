"""Typed, validated view of ``params.yaml``.

Every stage reads its parameters through :func:`load_params`. Unknown keys, wrong types and
out-of-range values stop with a :class:`ConfigError` that names the file and the dotted key, so a
typo in ``params.yaml`` never silently falls back to a default. Types are strict (``true`` is not
an int, ``"5"`` is not a number, ``"yes"`` is not a bool); an int is accepted where a float is
expected. A file that is not UTF-8, not YAML or not a mapping of sections is a ``ConfigError``
naming the file.

Defaults are defined here once: each field's default is the CPU default run, which ``params.yaml``
writes out in full (DVC reads every tracked key from it). A params file may leave keys out; they
take these defaults, which is how ``configs/paper-gpu.yaml`` lists only the published recipe's
differences. :func:`dump_params` (``uml params``) writes a resolved file with every key.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator,
                      model_validator)

from uml.errors import ConfigError
from uml.fundus import FUNDUS_MASK_CLASSES
from uml.objectstore import check_uri, is_uri, join

DEFAULT_PARAMS = "params.yaml"

# Where onnxruntime runs an exported model (evaluate.provider, `uml predict --provider`): auto
# (CUDA when onnxruntime has it and a GPU is visible, else the CPU), cpu, cuda.
InferenceProvider = Literal["auto", "cpu", "cuda"]

log = logging.getLogger(__name__)


class _Section(BaseModel):
    # extra="forbid" is what turns a misspelt key into an error instead of a silent default.
    # strict: no coercion, so `epochs: true` (YAML's bool), `epochs: "5"` and `use_tuned: "yes"`
    # are errors instead of 1, 5 and true. An int is still accepted for a float field, and YAML
    # lists and mappings still validate into list/dict fields and nested sections.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# --------------------------------------------------------------------------------------- data
class SyntheticParams(_Section):
    num_images: int = Field(2100, ge=4)
    # Expected share of glaucoma labels (after label noise); the vCDR population is shifted to
    # reach it exactly in expectation. REFUGE: 0.1.
    positive_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # Probability that a label is flipped after it is drawn from the cup-to-disc ratio.
    label_noise: float = Field(0.02, ge=0.0, lt=0.5)
    # Vertical cup-to-disc ratio at which glaucoma becomes more likely than not, and the width
    # of the soft (logistic) boundary around it.
    vcdr_threshold: float = Field(0.6, gt=0.0, lt=1.0)
    vcdr_softness: float = Field(0.02, gt=0.0)
    # Standard deviation of the drawn vCDR population (wider: fewer images near the threshold).
    vcdr_spread: float = Field(0.15, gt=0.0, le=0.5)
    # Size of the generated photographs before they are resized to ``data.image_size``.
    render_size: int = Field(256, ge=32)

    @model_validator(mode="after")
    def _reachable_positive_fraction(self) -> "SyntheticParams":
        # Flips alone make a share of label_noise positives (and negatives), whatever the vCDR.
        if not self.label_noise < self.positive_fraction < 1.0 - self.label_noise:
            raise ValueError(
                f"positive_fraction ({self.positive_fraction}) must lie strictly between label_noise and "
                f"1 - label_noise ({self.label_noise}, {1.0 - self.label_noise}): label flips alone give that share"
            )
        return self


class AffineParams(_Section):
    p: float = Field(0.5, ge=0.0, le=1.0)
    scale: float = Field(0.1, ge=0.0, lt=1.0)
    translate: float = Field(0.05, ge=0.0, lt=0.5)
    rotate: float = Field(15.0, ge=0.0, le=180.0)


class ColorParams(_Section):
    p: float = Field(0.5, ge=0.0, le=1.0)
    brightness: float = Field(0.2, ge=0.0, le=1.0)
    contrast: float = Field(0.2, ge=0.0, le=1.0)
    saturation: float = Field(0.2, ge=0.0, le=1.0)
    hue: float = Field(0.02, ge=0.0, le=0.5)


class AugmentParams(_Section):
    enabled: bool = True
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    affine: AffineParams = AffineParams()
    color: ColorParams = ColorParams()


class SplitParams(_Section):
    """How the images are split into train, val, test and calib.

    ``method``: ``given`` takes the split the data set defines itself: REFUGE's challenge
    folders (Training -> train, Test -> test, and val and calib drawn from Validation, stratified
    and seeded, in the ratio ``val : calib``), or the ``split`` column of a folder source's
    ``labels.csv``; it is an error when the data set defines none. ``random`` draws a stratified,
    seeded split with the shares below (a given split is ignored). ``auto`` is ``given`` when the
    data set defines a split, else ``random``.

    ``val``, ``test`` and ``calib`` are shares of all images in each held-out split of a random
    split (rounded to whole images); train is the rest. ``calib`` is the calibration split of the
    ``calibrate`` stage: the temperatures, the referral threshold and the vCDR interval are fitted
    there, so it must stay out of training, model selection and testing for their guarantees to
    hold."""

    # given: the data set's own split (REFUGE's Training, Validation and Test folders, val and calib
    # drawn from Validation; a split column in a folder source's labels.csv), an error when it has
    # none; random: drawn with the shares below, stratified and seeded; auto: given when the data
    # set defines a split, else random.
    method: Literal["auto", "given", "random"] = "auto"
    val: float = Field(0.05, gt=0.0, lt=1.0)
    test: float = Field(0.33, gt=0.0, lt=1.0)
    calib: float = Field(0.33, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "SplitParams":
        if self.val + self.test + self.calib >= 1.0:
            raise ValueError(f"val + test + calib must be < 1 so that a training split remains, got "
                             f"{self.val} + {self.test} + {self.calib}")
        return self


class DataParams(_Section):
    source: Literal["synthetic", "refuge", "folder"] = "synthetic"
    # Raw data set root for the refuge and folder importers, relative to the repository (where
    # DVC runs the stages) or absolute. dvc.yaml makes it a dependency of the prepare stage, so
    # `dvc status` sees an added, removed or edited file under it; data/raw/ is the place for
    # data brought in with `dvc add` or `dvc import` (data/raw/README.md).
    path: str = "data/raw"
    # Where every stage reads and writes: a local or mounted folder. Relative paths resolve
    # against the working directory (refused inside `ray job submit`); on a multi-node cluster it
    # must be storage every node mounts at the same path. Or object storage, s3://bucket/prefix
    # (an S3-compatible server through ?endpoint_override=host:port&scheme=http): prepare then
    # also writes the store there, the nodes read it from there, Ray's run storage defaults to
    # <data.root>/ray, and the stages' own files go to data.local_root.
    root: str = "data"
    # With data.root on object storage: the local folder of the stages' own files (the store's
    # local copy that DVC versions, sweep results, models, reports, plots), the data/ that
    # dvc.yaml names. Not used when data.root is a folder.
    local_root: str = "data"
    image_size: int = Field(128, ge=32, le=2048)
    seed: int = 0
    split: SplitParams = SplitParams()
    # Folder importer: class names in label-index order (null: sorted unique CSV labels).
    class_names: list[str] | None = None
    # The class the binary metrics (sensitivity, F1, AUC) score, by name. Folder importer: null
    # means the last of class_names, or the largest integer label (text labels must declare it);
    # the fundus sources declare glaucoma themselves.
    positive_class: str | None = None
    mask_classes: list[str] = list(FUNDUS_MASK_CLASSES)
    # Folder importer: pixel value -> mask class index (null: pixel values are the class indices).
    mask_values: dict[int, int] | None = None
    synthetic: SyntheticParams = SyntheticParams()
    augment: AugmentParams = AugmentParams()
    # Processes that decode, resize and write the images in prepare, a whole shard file each (the
    # shards depend on the data only, so the store and its content hash do not depend on this).
    # null: one per CPU this process may use, at most 8, and at most one per 64 images (a small
    # data set stays in one process, where starting others would cost more than they save). 1:
    # no other process.
    prepare_workers: int | None = Field(None, ge=1)

    @field_validator("root")
    @classmethod
    def _a_path_or_object_storage(cls, v: str) -> str:
        # Path.resolve() would turn an unchecked s3://bucket/x into <cwd>/s3:/bucket/x and write there.
        return check_uri(v) if is_uri(v) else v

    @field_validator("local_root")
    @classmethod
    def _a_local_folder(cls, v: str) -> str:
        if is_uri(v):
            raise ValueError(f"must be a local folder, got the URI {v!r} (data.root is where object storage goes)")
        return v

    @field_validator("mask_classes")
    @classmethod
    def _two_or_more_classes(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError(f"needs at least two distinct mask classes, got {v}")
        return v

    @field_validator("class_names")
    @classmethod
    def _distinct_class_names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError(f"needs at least two distinct class names, got {v}")
        return v


# -------------------------------------------------------------------------------------- model
class ModelParams(_Section):
    # "paper": the published configuration (GPU); "small": the same architecture, narrower.
    preset: Literal["paper", "small"] = "small"
    # false: the joint-learning ablation (softmax heads, no navigator gating, no instructor).
    uncertainty: bool = True
    # Single-task baselines: [cls] or [seg].
    tasks: list[Literal["cls", "seg"]] = ["cls", "seg"]
    # Encoders start from timm's ImageNet weights (downloaded once by timm into its cache; the
    # published recipe). false: random initialisation. A local file below takes precedence.
    pretrained: bool = False
    # Local weight files (a timm state dict of the full backbone).
    cls_weights: str | None = None
    seg_weights: str | None = None
    # Anything below overrides the preset when set (null keeps the preset's value).
    cls_encoder: str | None = None
    seg_encoder: str | None = None
    feature_strides: list[int] | None = None
    mixer_width: int | None = Field(None, ge=1)
    mixer_widths: list[int] | None = None
    decoder_widths: list[int] | None = None
    mutual_head_width: int | None = Field(None, ge=1)
    instructor_widths: list[int] | None = None
    instructor_dilation: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    # Frozen encoder BatchNorm (statistics and affine fixed), as published with pretrained encoders.
    frozen_encoder_bn: bool | None = None
    # The navigator's logit heads: kaiming_fan_out (published) or fan_in (PyTorch's default).
    navigator_head_init: Literal["kaiming_fan_out", "fan_in"] | None = None

    @field_validator("tasks")
    @classmethod
    def _known_distinct_tasks(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be a non-empty list of distinct tasks from [cls, seg], got {v}")
        return v

    @field_validator("feature_strides", "mixer_widths", "decoder_widths", "instructor_widths")
    @classmethod
    def _four_levels(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 4 or any(x < 1 for x in v)):
            raise ValueError(f"must list four positive values (one per feature level), got {v}")
        return v

    def overrides(self) -> dict[str, Any]:
        """The architecture overrides for :func:`uml.models.build_model` (unset keys dropped)."""
        return {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}


# --------------------------------------------------------------------------------------- loss
class LossParams(_Section):
    cls_weight: float = Field(0.5, ge=0.0)
    seg_weight: float = Field(0.4, ge=0.0)
    mut_weight: float = Field(0.1, ge=0.0)
    # lambda_t = min(1, epoch / kl_annealing_epochs), epoch counted from 0.
    kl_annealing_epochs: int = Field(5, ge=1)


# -------------------------------------------------------------------------------------- train
class TrainParams(_Section):
    epochs: int = Field(10, ge=1)
    # Optimizer steps per epoch (the tune stage's trials too). An integer: that many global
    # batches per epoch, drawn from a stream of seeded passes over the training split that
    # reshuffles when a pass ends (nnU-Net style), so a small data set trains as long as a large
    # one. null: one pass over the training split per epoch (the published meaning of an epoch).
    # 75 is about one pass over the default synthetic set's 609 training images at a batch of 8.
    steps_per_epoch: int | None = Field(75, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    # Constant learning rate for this many epochs, then poly decay to min_lr.
    constant_epochs: int = Field(2, ge=0)
    poly_power: float = Field(0.9, gt=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    # Autocast precision: "bf16" on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX; others
    # fall back to fp32), "fp16" on GPUs only, "fp32" everywhere (the published recipe).
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Convolutions in channels-last memory layout (faster on CPU and GPU; same results up to rounding).
    channels_last: bool = True
    # On GPUs, let cuDNN time its convolution algorithms at the first step of each input shape and
    # keep the fastest (torch.backends.cudnn.benchmark): measured 1.07x fp32 and 1.04x bf16 training
    # throughput on an H200 (docs/benchmarks.md). The same convolutions, computed by other kernels:
    # results differ by float rounding only, so it does not name the run. No effect on CPUs.
    cudnn_benchmark: bool = True
    seed: int = 0
    # Use data/tune/best_params.yaml (written by the tune stage) instead of the loss: defaults.
    use_tuned: bool = True
    # DataLoader processes per training worker, for training and (a second set) for validation;
    # they persist across epochs. benchmarks/loader.py measures the samples/s each delivers
    # (docs/benchmarks.md: how many a GPU needs).
    loader_workers: int = Field(0, ge=0)
    # Validate every epoch on at most this many images (null: the whole validation split).
    max_val_images: int | None = Field(None, ge=1)
    # Checkpoint (weights, optimiser state, history) every this many epochs; the last epoch always
    # is. A resume restarts after the last checkpoint, and the best model is chosen among the
    # checkpointed epochs.
    checkpoint_every: int = Field(1, ge=1)
    # "async": Ray Train uploads each checkpoint to ray.storage_path in a background thread while
    # training continues (CheckpointUploadMode.ASYNC); "sync": the epoch waits for the upload.
    checkpoint_upload: Literal["sync", "async"] = "sync"

    @model_validator(mode="after")
    def _sane_schedule(self) -> "TrainParams":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


# ---------------------------------------------------------------------------------------- ray
class RayParams(_Section):
    # null: RAY_ADDRESS if set, else a local Ray instance started by the stage.
    address: str | None = None
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    # Resources per training worker, e.g. {CPU: 1} or {CPU: 8, GPU: 1}.
    resources_per_worker: dict[str, float] = {"CPU": 1}
    # Checkpoints and run state. null: <data.root>/ray. A URI (s3://, gs://, ...) is handed to
    # Ray's pyarrow filesystems as is. On a multi-node cluster a folder must be shared storage:
    # the preflight checks that every node sees it.
    storage_path: str | None = None
    max_failures: int = Field(2, ge=-1)
    # The local instance's dashboard and services listen here.
    host: str = "127.0.0.1"
    # Ray's state API (used by Ray Train to watch its controller) needs the dashboard process.
    include_dashboard: bool = True
    # Seconds a training worker waits in a collective (all-reduce, barrier) or at the process
    # group's rendezvous before it fails (Ray Train's TorchConfig timeout_s): a hung or lost peer
    # ends the run after this long, which ray.max_failures may then restart. Ray's default, 1800.
    collective_timeout_s: int = Field(1800, ge=1)

    @field_validator("resources_per_worker")
    @classmethod
    def _positive_resources(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if x <= 0}
        if bad:
            raise ValueError(f"resources must be positive, got {bad}")
        return v

    @model_validator(mode="after")
    def _warn_when_reachable(self) -> "RayParams":
        # Only a local instance (no ray.address) listens on ray.host. Params are validated again
        # in every worker and for every override, so each host is warned about once per process.
        if self.address is None and not is_loopback_host(self.host) and self.host not in _WARNED_HOSTS:
            _WARNED_HOSTS.add(self.host)
            log.warning(
                "ray.host is %s, not a loopback address: a local run's Ray services (GCS, raylet, object "
                "manager, worker gRPC ports), its dashboard and job API (port 8265, which runs submitted code) "
                "and the training processes' DDP rendezvous store and gloo sockets will accept connections from "
                "every network that reaches %s. Keep 127.0.0.1 unless other machines must join.", self.host,
                "this machine" if self.host in ("0.0.0.0", "::") else self.host)
        return self


_WARNED_HOSTS: set[str] = set()


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:  # a host name: it may resolve to any interface
        return False
    # An IPv6 socket serving IPv4 reports ::ffff:127.0.0.1, which is loopback too.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


# --------------------------------------------------------------------------------------- tune
class _Distribution(_Section):
    """One entry of ``tune.search_space``: a mapping with a single key, the distribution's name
    (``{uniform: [0.2, 0.8]}``), whose value is its arguments."""

    @property
    def name(self) -> str:
        return next(iter(type(self).model_fields))

    @property
    def args(self) -> list[Any]:
        return getattr(self, self.name)

    def extremes(self) -> list[Any]:
        """The most extreme values the distribution can draw (each must be a valid params value)."""
        return list(self.args)


class _Range(_Distribution):
    """``[low, high]`` numbers with ``low < high``."""

    @model_validator(mode="after")
    def _ordered_numbers(self) -> "_Range":
        # Checked here rather than typed as float, so that the bounds stay as written.
        numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in self.args)
        if not numbers:
            raise ValueError(f"{self.name} needs [low, high] numbers, got {self.args}")
        low, high = self.args
        if not low < high:
            raise ValueError(f"{self.name} needs low < high, got [{low}, {high}]")
        return self


class UniformDistribution(_Range):
    """Floats drawn uniformly from ``[low, high)``."""

    uniform: list[Any] = Field(min_length=2, max_length=2)


class LogUniformDistribution(_Range):
    """Floats whose logarithm is uniform in ``[log low, log high)``; ``low > 0``."""

    loguniform: list[Any] = Field(min_length=2, max_length=2)

    @model_validator(mode="after")
    def _positive_low(self) -> "LogUniformDistribution":
        if self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self


class RandIntDistribution(_Range):
    """Integers in ``[low, high)``, as Ray's ``randint``."""

    randint: list[Any] = Field(min_length=2, max_length=2)

    @model_validator(mode="after")
    def _integer_bounds(self) -> "RandIntDistribution":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in self.randint):
            raise ValueError(f"randint needs integer bounds, got {self.randint}")
        return self

    def extremes(self) -> list[Any]:
        return [self.randint[0], self.randint[1] - 1]


class ChoiceDistribution(_Distribution):
    """One of the listed values."""

    choice: list[Any] = Field(min_length=1)


DISTRIBUTIONS: dict[str, type[_Distribution]] = {
    "uniform": UniformDistribution, "loguniform": LogUniformDistribution,
    "randint": RandIntDistribution, "choice": ChoiceDistribution,
}


def _distribution_name(raw: Any) -> str | None:
    if isinstance(raw, _Distribution):
        return raw.name
    return next(iter(raw)) if isinstance(raw, dict) and len(raw) == 1 else None


SearchDistribution = Annotated[
    Annotated[UniformDistribution, Tag("uniform")] | Annotated[LogUniformDistribution, Tag("loguniform")]
    | Annotated[RandIntDistribution, Tag("randint")] | Annotated[ChoiceDistribution, Tag("choice")],
    Discriminator(_distribution_name),
]


class TuneParams(_Section):
    # Trials per sweep, the baseline (the values this file gives the searched keys) included.
    num_samples: int = Field(2, ge=2)
    # Epochs per trial (a short proxy of the full training run).
    epochs: int = Field(1, ge=1)
    # Optimizer steps of a trial's epoch (null: train.steps_per_epoch). The default sweep's two
    # trials only pick between the baseline and one sample (tune.min_improvement guards the
    # baseline), so they run a shorter epoch than training; the published recipe sets null.
    steps_per_epoch: int | None = Field(30, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    workers_per_trial: int = Field(1, ge=1)
    # null: as many trials at once as the cluster's CPUs (or GPUs) allow.
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int = 0
    # A sampled trial replaces the baseline only when its validation score is higher by more
    # than this (a short trial's score is noisy: a lucky trial must not displace the baseline).
    min_improvement: float = Field(0.02, ge=0.0)
    # Dotted params key -> {distribution: arguments}; see uml.train.sweep for the grammar. Which
    # keys can be searched, and whether every value drawn is valid, is checked when the sweep starts.
    search_space: dict[str, SearchDistribution] = {
        "loss.cls_weight": UniformDistribution(uniform=[0.3, 0.7]),
        "loss.seg_weight": UniformDistribution(uniform=[0.2, 0.6]),
        "loss.mut_weight": LogUniformDistribution(loguniform=[0.05, 0.3]),
    }

    @field_validator("search_space", mode="before")
    @classmethod
    def _one_known_distribution_each(cls, v: Any) -> Any:
        # Before the typed validation, so that the error names the key and what is wrong with it.
        for key, spec in (v.items() if isinstance(v, dict) else ()):
            if isinstance(spec, _Distribution):
                continue
            if not isinstance(spec, dict) or len(spec) != 1:
                raise ValueError(f"{key}: expected one distribution like {{uniform: [0.1, 0.9]}}, got {spec!r}")
            (name,) = spec
            if name not in DISTRIBUTIONS:
                raise ValueError(f"{key}: unknown distribution '{name}'; use one of {list(DISTRIBUTIONS)}")
        return v


# ---------------------------------------------------------------------------------- calibrate
class CalibrateParams(_Section):
    """The post-hoc ``calibrate`` stage, fitted on the calibration split (``data.split.calib``)."""

    # epsilon: the referral rule accepts a case only when the error rate among accepted cases stays
    # at most this ...
    risk: float = Field(0.1, gt=0.0, lt=1.0)
    # ... with probability at least 1 - delta over the draw of the calibration split.
    delta: float = Field(0.1, gt=0.0, lt=1.0)
    # Share of ordinary images (like the calibration split) that the unusual-image flag may refer.
    unusual_alpha: float = Field(0.01, gt=0.0, lt=1.0)
    # Fit a power of the centred class log-scores beside the class temperature (false: the
    # temperature alone). A temperature stretches every log-evidence ratio by one factor; on the
    # synthetic set that left a calibration error of 0.035-0.05 on fresh images in two of five seeds,
    # which the power removes. Both keep the argmax and, for two classes, AUC.
    class_power: bool = True
    # Coverage of the per-image vCDR interval (split conformal).
    vcdr_coverage: float = Field(0.9, gt=0.0, lt=1.0)
    # Images whose shorter side is below this many pixels are refused (too small to hold a fundus).
    min_image_side: int = Field(64, ge=1)
    # Images per forward pass while scoring the calibration and validation splits.
    batch_size: int = Field(16, ge=1)


# ------------------------------------------------------------------------------------- export
class ExportParams(_Section):
    opset: int = Field(18, ge=13)
    # The stage fails when onnxruntime and torch differ by more than this.
    parity_atol: float = Field(1e-4, gt=0.0)
    parity_images: int = Field(8, ge=1)


# ----------------------------------------------------------------------------------- evaluate
class EvaluateParams(_Section):
    batch_size: int = Field(16, ge=1)
    # Standard deviations of the Gaussian noise (images in [0, 1]); each level of either kind is
    # one more pass over the test split (about 12 s for the default's 693 images on 2 cores, where
    # the whole default DAG takes about 9 minutes), so the default runs one level per kind; add
    # levels (e.g. [0.1, 0.2]) for robustness curves with more points.
    gaussian_sigmas: list[float] = [0.2]
    salt_pepper_amounts: list[float] = [0.1]
    referral_fractions: list[float] = [0.1, 0.2, 0.3]
    calibration_bins: int = Field(10, ge=2)
    num_panels: int = Field(6, ge=0)
    # Seeds the corruptions, the pixel sample of the pixel AUROC and the bootstrap resamples.
    seed: int = 0
    # Resamples of the test images for the 95 % intervals of the headline metrics (0: none).
    bootstrap_samples: int = Field(1000, ge=0)
    # Half-width in pixels of the band around the predicted contours where the pixel-error AUROC
    # is measured a second time (background far from any contour cannot inflate it there).
    contour_band_px: float = Field(3.0, gt=0.0)
    # Where onnxruntime runs the model: auto (its CUDA provider when the onnxruntime-gpu package is
    # installed and a GPU is visible, else the CPU; the log says which and why), cpu, or cuda (an
    # error where CUDA cannot run). GPU and CPU results agree up to float rounding.
    provider: InferenceProvider = "auto"
    # Ray tasks each pass over the test split is cut into (0: every pass runs in this process).
    # The tasks run on the cluster that ray.address / RAY_ADDRESS names, else on a local Ray instance
    # on ray.host; each takes one CPU, and the metrics equal those of the single-process run. The
    # prepared store must be readable at the same path on every node (or be on object storage);
    # the model travels through Ray's object store.
    workers: int = Field(0, ge=0)
    # GPUs each of those tasks asks Ray for (e.g. 0.25: four tasks share a GPU). Ray hides the GPUs
    # from a task that asks for none, so 0 runs the tasks on the nodes' CPUs.
    gpus_per_worker: float = Field(0.0, ge=0.0)

    @field_validator("bootstrap_samples")
    @classmethod
    def _enough_resamples(cls, v: int) -> int:
        if 0 < v < 100:
            raise ValueError(f"must be 0 (no intervals) or at least 100 to place the 2.5 % and 97.5 % percentiles, got {v}")
        return v

    @field_validator("gaussian_sigmas")
    @classmethod
    def _positive_sigmas(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError(f"noise levels must be positive, got {v}")
        return v

    @field_validator("salt_pepper_amounts", "referral_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in v):
            raise ValueError(f"must be fractions in (0, 1), got {v}")
        return v


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    loss: LossParams = LossParams()
    train: TrainParams = TrainParams()
    ray: RayParams = RayParams()
    tune: TuneParams = TuneParams()
    calibrate: CalibrateParams = CalibrateParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()

    # Where the params came from, for error messages (not a params key).
    _source: str = PrivateAttr("<defaults>")

    def with_overrides(self, overrides: dict[str, Any], source: str = "<overrides>") -> "Params":
        """A validated copy with dotted-key overrides applied, e.g. ``{"loss.cls_weight": 0.3}``."""
        raw = self.model_dump()
        for dotted, value in overrides.items():
            set_dotted(raw, dotted, value, source=source)
        return parse_params(raw, source=source)

    def resolved(self) -> "Params":
        """A copy with ``data.root`` and a local ``ray.storage_path`` made absolute against the
        current directory, for shipping to Ray workers (Tune runs trials in their own directories)."""
        overrides: dict[str, Any] = {"data.local_root": str(Path(self.data.local_root).expanduser().resolve())}
        if not is_uri(self.data.root):
            overrides["data.root"] = str(Path(self.data.root).expanduser().resolve())
        if self.ray.storage_path and "://" not in self.ray.storage_path:
            overrides["ray.storage_path"] = str(Path(self.ray.storage_path).expanduser().resolve())
        return self.with_overrides(overrides, source=self._source)

    def section_hash(self, *sections: str, extra: Any = None) -> str:
        """A short, stable hash of some sections (and any extra JSON-able value)."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        payload["_extra"] = extra
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _key_path(loc: tuple[Any, ...]) -> str:
    # A search-space distribution's tag and its only field have the same name: say it once.
    parts = [str(p) for i, p in enumerate(loc) if i == 0 or p != loc[i - 1]]
    return ".".join(parts)


def _yaml_number_hint(error_type: str, got: Any) -> str:
    """Why a number-looking string was not a number, and how to write it."""
    if error_type not in ("float_type", "int_type") or not isinstance(got, str):
        return ""
    try:
        float(got)
    except ValueError:
        return ""
    mantissa = got.lower().split("e")[0]
    if "e" in got.lower() and "." not in mantissa:
        # YAML 1.1 (PyYAML) wants a dot in the mantissa of an exponent number.
        return f"; YAML reads {got} as text: write {mantissa}.0e{got.lower().split('e')[1]}"
    return "; quoted values are text: write the number without quotes"


def parse_params(raw: dict[str, Any] | None, source: str = "<params>") -> Params:
    """Validate a raw mapping into :class:`Params`, naming the offending key on error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, source) from None
    params._source = source
    return params


def _config_error(exc: ValidationError, source: str, prefix: tuple[str, ...] = ()) -> ConfigError:
    """One line per validation error, naming the source, the dotted key and the value."""
    lines = []
    for err in exc.errors():
        key = _key_path(prefix + tuple(err["loc"])) or "<top level>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = err.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {err['msg']}{got_text}{_yaml_number_hint(err['type'], got)}")
    return ConfigError("\n".join(lines))


def check_model_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` (keys of the ``model:`` section) checked by :class:`ModelParams`' rules, the one
    definition of what each key accepts; returns them normalised (tuples to lists, numpy scalars
    to Python numbers). Lax, unlike params files: the values come from code or a saved model."""
    try:
        checked = ModelParams.model_validate(values, strict=False)
    except ValidationError as exc:
        raise _config_error(exc, source, prefix=("model",)) from None
    return {key: getattr(checked, key) for key in values}


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file (``params.yaml`` by default)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          "save the params file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the params file: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, source=str(path))


def dump_params(params: Params, header: str | None = None) -> str:
    """``params`` as YAML with every key, in the schema's order: a file :func:`load_params`
    reads back to equal params (a ``# header`` comment first, when given)."""
    # Python mode, not JSON mode: JSON would turn data.mask_values' integer keys into text.
    text = yaml.safe_dump(params.model_dump(), sort_keys=False, default_flow_style=None, width=100)
    return (f"# {header}\n" if header else "") + text


def _leaves(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every params key below a section; a mapping-valued key (e.g.
    ``tune.search_space``, ``ray.resources_per_worker``) is one leaf, as is a list."""
    leaves: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, _Section):
            leaves.update(_leaves(value, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = model.model_dump()[name]
    return leaves


_HYDRA_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_HYDRA_PLAIN_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")


def _hydra_value(value: Any, key: str) -> str:
    """``value`` in the override grammar of ``dvc exp run -S`` (Hydra's)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _HYDRA_PLAIN_STRING.fullmatch(value) and value.lower() not in ("true", "false", "null", "nan", "inf"):
            return value  # e.g. fp32, kaiming_fan_out, data/raw/scans: no quotes to read
        # Hydra reads a backslash literally except in a run before a quote or the closing quote.
        escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
        return f"'{escaped}'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_hydra_value(v, key) for v in value) + "]"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not (isinstance(k, int) and not isinstance(k, bool)) and not _HYDRA_PLAIN_KEY.fullmatch(str(k)):
                raise ConfigError(f"{key}: the mapping key {k!r} cannot be written as a `dvc exp run -S` override; "
                                  "write the params file in full instead (uml params FILE --out params.yaml)")
            items.append(f"{k}: {_hydra_value(v, key)}")
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"{key}: cannot write {value!r} as a `dvc exp run -S` override")


def dvc_set_overrides(params: Params, base: Params | None = None) -> list[str]:
    """The ``dvc exp run -S`` overrides that turn ``base`` (default: the schema's defaults, which
    params.yaml holds as committed) into ``params``: ``key=value`` for each key whose value
    differs, in the schema's order. A mapping-valued key is replaced as a whole (``~key`` then
    ``+key=value``): DVC would merge a mapping into the one there, keeping entries ``params``
    does not have (e.g. a search space's other keys). Each override is checked by applying them
    all with DVC's own code to ``base`` written out, which must give ``params`` back; a value the
    override grammar cannot carry is a :class:`ConfigError`."""
    base = base if base is not None else Params()
    old, new = _leaves(base), _leaves(params)
    overrides: list[str] = []
    for key, value in new.items():
        if value == old[key]:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            overrides += [f"~{key}", f"+{key}={_hydra_value(value, key)}"]
        else:
            overrides.append(f"{key}={_hydra_value(value, key)}")
    _check_dvc_applies(overrides, base, params)
    return overrides


def _check_dvc_applies(overrides: list[str], base: Params, params: Params) -> None:
    """Apply ``overrides`` to ``base`` written out, as ``dvc exp run -S`` does, and compare."""
    import tempfile

    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory(prefix="uml-params-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(dump_params(base))
        try:
            apply_overrides(path, overrides)
        except InvalidArgumentError as exc:
            raise ConfigError(f"dvc refuses the overrides {overrides}: {exc.__cause__ or exc}") from None
        applied = load_params(path)
    differing = [key for key, value in _leaves(params).items() if _leaves(applied)[key] != value]
    if differing:
        raise ConfigError(f"`dvc exp run -S` would not reproduce {differing}; write the params file in full "
                          "instead (uml params FILE --out params.yaml)")


def get_dotted(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str = "<overrides>") -> None:
    """Set ``raw[a][b][c] = value`` for ``"a.b.c"``; the path must already exist in the schema."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"{source}: unknown params key '{dotted}' ('{'.'.join(parts[: i + 1])}' is not a section)")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"{source}: unknown params key '{dotted}'")
    node[parts[-1]] = copy.deepcopy(value)


def resolve_path(params: Params, *parts: str) -> Path:
    """An absolute local path under ``data.root``, or under ``data.local_root`` when ``data.root``
    is on object storage."""
    local = params.data.local_root if is_uri(params.data.root) else params.data.root
    return Path(local).expanduser().resolve().joinpath(*parts)


class Paths:
    """The named outputs of every stage, the same every run (nnU-Net style)."""

    def __init__(self, params: Params):
        root = resolve_path(params)
        self.root = root
        self.dataset = root / "prepared" / "dataset.zarr"
        self.tune_dir = root / "tune"
        self.best_params = root / "tune" / "best_params.yaml"
        self.tune_results = root / "tune" / "results.csv"
        self.train_dir = root / "train"
        self.models_dir = root / "models"
        self.model_pt = root / "models" / "model.pt"
        self.model_onnx = root / "models" / "model.onnx"
        self.metadata = root / "models" / "metadata.json"
        self.calibration = root / "models" / "calibration.json"
        self.calibrate_dir = root / "calibrate"
        self.reports = root / "reports"
        self.metrics = root / "reports" / "metrics.json"
        self.model_card = root / "reports" / "model_card.md"
        self.plots = root / "reports" / "plots"
        # data.root on object storage: the store the nodes read (prepare publishes the local
        # copy there) and, unless ray.storage_path says otherwise, Ray's run storage.
        self.root_uri = params.data.root if is_uri(params.data.root) else None
        self.shared_dataset = join(self.root_uri, "prepared", "dataset.zarr") if self.root_uri else str(self.dataset)
        self.ray_storage = (
            Path(params.ray.storage_path).expanduser().resolve()
            if params.ray.storage_path and "://" not in params.ray.storage_path
            else root / "ray"
        )
        # A URI (s3://, gs://, ...) is handed to Ray as is.
        self.ray_storage_uri = (params.ray.storage_path if params.ray.storage_path and "://" in params.ray.storage_path
                                else join(self.root_uri, "ray") if self.root_uri and not params.ray.storage_path else None)

    @property
    def storage(self) -> str:
        return self.ray_storage_uri or str(self.ray_storage)
