"""Architecture presets and the resolved configuration a model is built from (and saved with)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from uml.errors import ConfigError


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored as plain types inside ``model.pt``."""

    cls_encoder: str
    seg_encoder: str
    feature_strides: list[int]
    mixer_widths: list[int]
    decoder_widths: list[int]
    instructor_width: int
    instructor_dilations: list[int]
    embed_width: int
    dropout: float = 0.1
    uncertainty: bool = True
    tasks: list[str] = field(default_factory=lambda: ["cls", "seg"])
    num_classes: int = 2
    num_mask_classes: int = 3
    image_size: int = 256
    cls_weights: str | None = None
    seg_weights: str | None = None

    def __post_init__(self) -> None:
        self.tasks = sorted(set(self.tasks))
        if not self.tasks or any(t not in ("cls", "seg") for t in self.tasks):
            raise ConfigError(f"model.tasks must be a non-empty subset of [cls, seg], got {self.tasks}")
        for name in ("feature_strides", "mixer_widths", "decoder_widths"):
            value = list(getattr(self, name))
            if len(value) != 4 or any(int(v) < 1 for v in value):
                raise ConfigError(f"model.{name} must list four positive values, got {value}")
            setattr(self, name, [int(v) for v in value])
        s = self.feature_strides
        if any(b != 2 * a for a, b in zip(s, s[1:])) or s[0] & (s[0] - 1):
            raise ConfigError(f"model.feature_strides must be four doubling powers of two (e.g. [1, 2, 4, 8]), got {s}")
        if self.image_size % s[3]:
            raise ConfigError(f"image size {self.image_size} must be divisible by the coarsest feature stride {s[3]}")
        if self.num_classes < 2 or self.num_mask_classes < 2:
            raise ConfigError(f"need >= 2 classes and mask classes, got {self.num_classes} and {self.num_mask_classes}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


PRESETS: dict[str, dict[str, Any]] = {
    # The published configuration: Res2Net-50 26w x 4s (stride-1 stem, layer4 unused) and
    # VGG16-BN (conv1_2..conv4_3), four levels at strides 1, 2, 4, 8, 256 x 256 inputs.
    "paper": dict(
        cls_encoder="res2net50_26w_4s",
        seg_encoder="vgg16_bn",
        feature_strides=[1, 2, 4, 8],
        mixer_widths=[64, 128, 256, 512],
        decoder_widths=[64, 128, 256, 512],
        instructor_width=512,
        instructor_dilations=[2, 4],
        embed_width=32,
        dropout=0.1,
        image_size=256,
    ),
    # The same architecture for CPU runs: two lighter encoders with levels at strides 2..16 and a
    # narrower mixer and decoders. ResNet-18 replaces VGG as the segmentation encoder because
    # VGG's full-resolution first block alone halves CPU training throughput (README).
    "small": dict(
        cls_encoder="resnet18",
        seg_encoder="resnet18",
        feature_strides=[2, 4, 8, 16],
        mixer_widths=[16, 32, 64, 128],
        decoder_widths=[16, 32, 64, 128],
        instructor_width=128,
        instructor_dilations=[2, 4],
        embed_width=8,
        dropout=0.1,
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
