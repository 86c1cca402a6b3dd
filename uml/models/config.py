"""Architecture presets and the resolved configuration a model is built from (and saved with)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from uml.config import ModelParams, check_model_keys
from uml.errors import ConfigError


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored as plain types inside ``model.pt``.

    Widths follow the authors' 2023 code (docs/explanation/method.md): each encoder feature is projected to
    ``mixer_width`` channels, the mixer's outputs ``f_m`` have ``mixer_widths`` channels (fine to
    coarse), the navigator's decoder ``decoder_widths``, the mutual decoder's 1x1 head
    ``mutual_head_width`` and the instructor's four separable convolutions ``instructor_widths``
    (all with dilation ``instructor_dilation``).
    """

    cls_encoder: str
    seg_encoder: str
    feature_strides: list[int]
    mixer_width: int
    mixer_widths: list[int]
    decoder_widths: list[int]
    mutual_head_width: int
    instructor_widths: list[int]
    instructor_dilation: int = 2
    dropout: float = 0.1
    frozen_encoder_bn: bool = True
    # Initialisation of the navigator's four 1x1 logit heads (S_0..S_3): "kaiming_fan_out" as
    # published (like every other non-encoder conv), or "fan_in" (PyTorch's default conv init).
    navigator_head_init: str = "kaiming_fan_out"
    uncertainty: bool = True
    tasks: list[str] = field(default_factory=lambda: ["cls", "seg"])
    num_classes: int = 2
    num_mask_classes: int = 3
    image_size: int = 256
    # Where the encoders' initial weights come from (only used when a model is first built).
    pretrained: bool = False
    cls_weights: str | None = None
    seg_weights: str | None = None

    def __post_init__(self) -> None:
        self.tasks = sorted(set(self.tasks))
        # The keys params.yaml's model: section also has follow its rules (uml.config.ModelParams);
        # what only the resolved architecture can violate is checked below.
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name in ModelParams.model_fields}
        for name, value in check_model_keys(shared, source="model config").items():
            # params.yaml's null means "the preset's value"; a resolved config has a value.
            if value is None and next(f for f in fields(self) if f.name == name).default is not None:
                raise ConfigError(f"model config: model.{name} needs a value, got None")
            setattr(self, name, value)
        if (2 * self.mixer_width) % FEATURE_MIXER_SHUFFLE_GROUP:
            raise ConfigError(f"model.mixer_width must make 2 * mixer_width divisible by {FEATURE_MIXER_SHUFFLE_GROUP} "
                              f"(channel shuffle), got {self.mixer_width}")
        s = self.feature_strides
        if any(b != 2 * a for a, b in zip(s, s[1:])) or s[0] & (s[0] - 1):
            raise ConfigError(f"model.feature_strides must be four doubling powers of two (e.g. [1, 2, 4, 8]), got {s}")
        if self.image_size % s[3]:
            raise ConfigError(f"image size {self.image_size} must be divisible by the coarsest feature stride {s[3]}")
        if self.num_classes < 2 or self.num_mask_classes < 2:
            raise ConfigError(f"need >= 2 classes and mask classes, got {self.num_classes} and {self.num_mask_classes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


# The channel shuffle of the published mixer works on groups of four channels.
FEATURE_MIXER_SHUFFLE_GROUP = 4

PRESETS: dict[str, dict[str, Any]] = {
    # The published configuration (authors' 2023 code): Res2Net-50 v1b 26w x 4s (deep stem kept
    # at stride 1, layer4 unused; timm res2net50d) and VGG16-BN (conv1_2..conv4_3), four levels at
    # strides 1, 2, 4, 8, frozen encoder BatchNorm, 256 x 256 inputs.
    "paper": dict(
        cls_encoder="res2net50d",
        seg_encoder="vgg16_bn",
        feature_strides=[1, 2, 4, 8],
        mixer_width=256,
        mixer_widths=[64, 128, 256, 512],
        decoder_widths=[64, 128, 256, 512],
        mutual_head_width=32,
        instructor_widths=[1024, 512, 512, 1024],
        instructor_dilation=2,
        dropout=0.1,
        frozen_encoder_bn=True,
        navigator_head_init="kaiming_fan_out",
        image_size=256,
    ),
    # The same architecture for CPU runs: two lighter encoders with levels at strides 2..16 and a
    # narrower mixer, decoders and instructor. ResNet-18 replaces VGG as the segmentation encoder
    # because VGG's full-resolution first block alone halves CPU training throughput (docs/benchmarks.md).
    # Encoders trained from scratch keep learnable BatchNorm: frozen statistics of a randomly
    # initialised encoder would be an identity, i.e. no normalisation at all. The navigator's
    # logit heads start at PyTorch's fan-in scale: with Kaiming fan-out (gain sqrt(2 / C) for a
    # C-class 1x1 conv) S_0 starts saturated and its Dice-only loss leaves it stuck (docs/explanation/method.md, Deviations).
    "small": dict(
        cls_encoder="resnet18",
        seg_encoder="resnet18",
        feature_strides=[2, 4, 8, 16],
        mixer_width=32,
        mixer_widths=[16, 32, 64, 64],
        decoder_widths=[16, 32, 64, 128],
        mutual_head_width=8,
        instructor_widths=[128, 64, 64, 128],
        instructor_dilation=2,
        dropout=0.1,
        frozen_encoder_bn=False,
        navigator_head_init="fan_in",
        image_size=128,
    ),
}


def resolve_config(preset: str = "paper", **overrides: Any) -> ModelConfig:
    """Preset values updated by ``overrides`` (``None`` values keep the preset's)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'; choose one of {sorted(PRESETS)}")
    raw = dict(PRESETS[preset])
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown model override(s) {unknown}; known: {sorted(known)}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**raw)
