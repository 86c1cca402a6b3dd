"""timm backbones as four-level feature encoders, aligned by stride rather than by index.

timm reports each feature level's ``reduction`` (its stride). VGG's levels start at stride 1,
ResNet/Res2Net's at stride 2. The published model takes both encoders' features at strides
1, 2, 4, 8, with a Res2Net whose deep stem keeps stride 1. So we select levels by stride. When an
encoder's finest level is coarser than the finest requested stride, we set its stem's first
stride-2 convolution to stride 1, which halves every level's stride.

Weights, in order of precedence:

- a local file (``model.cls_weights`` / ``model.seg_weights``: a timm state dict of the full
  model), loaded by timm without consulting any hub;
- ``model.pretrained: true``: timm's ImageNet weights through timm's own download and cache
  (Hugging Face hub; nothing is fetched when the cache already holds them);
- otherwise random initialisation.

``frozen_bn`` turns every BatchNorm of the encoder into timm's/torchvision's ``FrozenBatchNorm2d``
after the weights are loaded: statistics and affine parameters stay fixed, as in the published
model, whose encoders are ImageNet-pretrained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from uml._compat import import_timm
from uml.errors import ConfigError

timm = import_timm()
from timm.layers.norm_act import freeze_batch_norm_2d  # noqa: E402  (after the torchvision shim)


def _first_strided_conv(model: nn.Module) -> nn.Conv2d | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and tuple(module.stride) == (2, 2):
            return module
    return None


class TimmEncoder(nn.Module):
    """Features of a timm backbone at exactly ``strides`` (four increasing powers of two)."""

    def __init__(self, name: str, strides: list[int], weights: str | None = None, *, pretrained: bool = False,
                 frozen_bn: bool = False, weights_key: str = "model.cls_weights"):
        super().__init__()
        if name not in timm.list_models():
            raise ConfigError(f"model encoder '{name}' is not a timm model name (see timm.list_models())")
        probe = timm.create_model(name, features_only=True, pretrained=False)
        reductions = list(probe.feature_info.reduction())
        del probe
        # A stride-1 stem halves every reduction: take it when the finest level is too coarse.
        stem_factor = 2 if min(strides) < min(reductions) else 1
        wanted = [s * stem_factor for s in strides]
        missing = [s for s, w in zip(strides, wanted) if w not in reductions]
        if missing:
            available = sorted({r // stem_factor for r in reductions} | set(reductions))
            raise ConfigError(
                f"encoder '{name}' has no feature level at stride(s) {missing}; its levels are at strides {reductions} "
                f"(or {[r // 2 for r in reductions]} with a stride-1 stem); pick model.feature_strides from {available}"
            )
        out_indices = [reductions.index(w) for w in wanted]
        self.body = self._create(name, out_indices, weights, pretrained, weights_key)
        if stem_factor == 2:
            conv = _first_strided_conv(self.body)
            if conv is None:
                raise ConfigError(f"encoder '{name}': no stride-2 stem convolution to make stride 1 for stride {min(strides)}")
            conv.stride = (1, 1)
        if frozen_bn:
            self.body = freeze_batch_norm_2d(self.body)
        self.name = name
        self.strides = list(strides)
        self.channels = list(self.body.feature_info.channels())
        self._check_strides()

    @staticmethod
    def _create(name: str, out_indices: list[int], weights: str | None, pretrained: bool, weights_key: str) -> nn.Module:
        kwargs: dict = {"features_only": True, "out_indices": out_indices}
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ConfigError(f"{weights_key}: encoder weights file not found: {path}")
            # pretrained_cfg_overlay(file=...) makes timm load the local file (remapping keys for
            # the feature wrapper) instead of consulting any hub.
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        if not pretrained:
            return timm.create_model(name, pretrained=False, **kwargs)
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # hub, network and cache errors come in many types
            raise ConfigError(
                f"model.pretrained: could not load timm's ImageNet weights for encoder '{name}' "
                f"({type(exc).__name__}: {exc}). timm downloads them once into its cache (Hugging Face hub), "
                f"which needs the network: run once on a machine that is online, or download the weights and set "
                f"{weights_key} to the local state dict file, or set model.pretrained: false"
            ) from None

    @torch.no_grad()
    def _check_strides(self) -> None:
        """Run a small probe once so a mismatch fails at build time, not mid-training."""
        size = 4 * max(self.strides)
        was_training = self.body.training
        self.body.eval()
        feats = self.body(torch.zeros(1, 3, size, size))
        self.body.train(was_training)
        got = [size // f.shape[-1] for f in feats]
        if got != self.strides:
            raise ConfigError(f"encoder '{self.name}' produced strides {got}, expected {self.strides}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))
