"""The UML network (Ren et al., MICCAI 2023), read top to bottom.

::

    image ─┬─ cls encoder ─ f_c[0..3] ─┐
           └─ seg encoder ─ f_s[0..3] ─┼─ feature mixer ─ f_m[0..3]
                                       │        │
                                       │  mutual decoder ─ pixel evidence e_m, uncertainty U
                                       │        │
               navigator(f_s, f_m, e_m, U): gated by exp(-U), reliable masks ─ S_4..S_1, S_0, eta
               instructor(f_c, f_m, eta):  h + h * eta' ─ pool ─ linear ─ class evidence

Levels are indexed 0..3 from fine to coarse (strides ``feature_strides``, published 1, 2, 4, 8).
The side outputs ``S_4..S_1`` of the paper are the navigator's outputs at levels 3..0, and
``S_0`` is the final segmentation at full resolution.

Ablations switch wiring off rather than adding loss tricks:

- ``uncertainty=False``: softmax heads. The navigator is not gated (``exp(-U)`` becomes 1) and
  its reliable masks use the mutual softmax probability in place of evidence. There is no
  instructor: the classifier pools ``h`` alone.
- ``tasks=("seg",)``: segmentation encoder and navigator only. No mutual branch, so no gating
  and no reliable masks: a U-Net decoder with deep supervision.
- ``tasks=("cls",)``: classification encoder and the instructor's head over ``f_c`` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uml.evidential import dirichlet, evidence_from_logits, normalized_entropy
from uml.models.blocks import ConvBNReLU, DoubleConv, FeatureMixer, SeparableConv, UpBlock
from uml.models.config import ModelConfig
from uml.models.encoders import TimmEncoder


def _downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a level-0 map down to a coarser level (U↓, e_m↓)."""
    return x if factor == 1 else F.avg_pool2d(x, kernel_size=factor, stride=factor)


def _upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MutualDecoder(nn.Module):
    """U-Net decoder over the mutual features -> pixel logits at level-0 resolution."""

    def __init__(self, widths: list[int], num_classes: int, dropout: float):
        super().__init__()
        self.ups = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i], dropout) for i in range(3))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, f_m: list[torch.Tensor]) -> torch.Tensor:
        x = f_m[3]
        for level in (2, 1, 0):
            x = self.ups[level](x, f_m[level])
        return self.head(x)


class UncertaintyNavigator(nn.Module):
    """Segmentation decoder steered by the mutual branch.

    At the bottom, ``[f_s[3]; f_m[3]] * exp(-U↓)`` gives the first side output. Going up, every
    level embeds a reliable mask ``R = (S + e_m↓) * exp(-U↓)`` into the features before
    upsampling with the segmentation encoder's skip feature. The top feature gives ``S_0``. Pooled
    to the coarsest level, it is ``eta``, handed to the instructor.
    """

    def __init__(self, cfg: ModelConfig, seg_channels: list[int], mutual_widths: list[int] | None):
        super().__init__()
        self.mutual = mutual_widths is not None
        widths, num_classes, drop = cfg.decoder_widths, cfg.num_mask_classes, cfg.dropout
        embed = cfg.embed_width if self.mutual else 0
        bottom_in = seg_channels[3] + (mutual_widths[3] if self.mutual else 0)
        self.bottom = DoubleConv(bottom_in, widths[3], drop)
        # embeds[l] turns the reliable mask at level l into `embed` channels.
        self.embeds = nn.ModuleList(
            ConvBNReLU(num_classes, embed, kernel=1, dropout=drop) if self.mutual else nn.Identity() for _ in range(4)
        )
        self.ups = nn.ModuleList(UpBlock(widths[i + 1] + embed, seg_channels[i], widths[i], drop) for i in range(3))
        self.sides = nn.ModuleList(nn.Conv2d(widths[i], num_classes, 1) for i in range(4))
        self.top = ConvBNReLU(widths[0] + embed, widths[0], kernel=3, dropout=drop)
        self.final = nn.Conv2d(widths[0], num_classes, 1)
        self.out_channels = widths[0]

    def _with_reliable_mask(self, level: int, feature: torch.Tensor, side: torch.Tensor,
                            mutual_down: list[torch.Tensor] | None, gates: list[torch.Tensor] | None) -> torch.Tensor:
        if not self.mutual:
            return feature
        reliable = side + mutual_down[level]
        if gates is not None:
            reliable = reliable * gates[level]
        return torch.cat([feature, self.embeds[level](reliable)], dim=1)

    def forward(self, f_s: list[torch.Tensor], f_m: list[torch.Tensor] | None, mutual_down: list[torch.Tensor] | None,
                gates: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Returns ``(S_0 logits at level 0, [S_4, S_3, S_2, S_1] logits, top feature)``."""
        x = torch.cat([f_s[3], f_m[3]], dim=1) if self.mutual else f_s[3]
        if gates is not None:
            x = x * gates[3]
        x = self.bottom(x)
        sides = [self.sides[3](x)]
        for level in (2, 1, 0):
            x = self._with_reliable_mask(level + 1, x, sides[-1], mutual_down, gates)
            x = self.ups[level](x, f_s[level])
            sides.append(self.sides[level](x))
        top = self.top(self._with_reliable_mask(0, x, sides[-1], mutual_down, gates))
        return self.final(top), sides, top


class UncertaintyInstructor(nn.Module):
    """Classification head: separable dilated convs over ``[f_c[3]; f_m[3]]`` -> ``h``;
    ``eta' = doubleconv(eta)``; ``f = h + h * eta'``; global average pool; bias-free linear."""

    def __init__(self, cfg: ModelConfig, cls_channels: int, mutual_width: int, eta_channels: int | None):
        super().__init__()
        width = cfg.instructor_width
        dilations = cfg.instructor_dilations
        layers = [SeparableConv(cls_channels + mutual_width, width, dilations[0])]
        layers += [SeparableConv(width, width, d) for d in dilations[1:]]
        self.head = nn.Sequential(*layers)
        self.eta_conv = DoubleConv(eta_channels, width, cfg.dropout) if eta_channels is not None else None
        self.classifier = nn.Linear(width, cfg.num_classes, bias=False)

    def forward(self, f_c: torch.Tensor, f_m: torch.Tensor | None, eta: torch.Tensor | None) -> torch.Tensor:
        h = self.head(torch.cat([f_c, f_m], dim=1) if f_m is not None else f_c)
        if self.eta_conv is not None:
            h = h + h * self.eta_conv(eta)
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))


class UMLNet(nn.Module):
    """Joint classification + segmentation with evidential uncertainty; see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        strides = cfg.feature_strides
        self.has_cls, self.has_seg = "cls" in cfg.tasks, "seg" in cfg.tasks
        self.joint = self.has_cls and self.has_seg
        self.evidential = cfg.uncertainty
        self.cls_encoder = TimmEncoder(cfg.cls_encoder, strides, cfg.cls_weights) if self.has_cls else None
        self.seg_encoder = TimmEncoder(cfg.seg_encoder, strides, cfg.seg_weights) if self.has_seg else None
        if self.joint:
            self.mixers = nn.ModuleList(
                FeatureMixer(c, s, w) for c, s, w in zip(self.cls_encoder.channels, self.seg_encoder.channels, cfg.mixer_widths)
            )
            self.mutual_decoder = MutualDecoder(cfg.mixer_widths, cfg.num_mask_classes, cfg.dropout)
        if self.has_seg:
            self.navigator = UncertaintyNavigator(cfg, self.seg_encoder.channels, cfg.mixer_widths if self.joint else None)
        if self.has_cls:
            # The instructor exists only where uncertainty and segmentation both do.
            eta_channels = self.navigator.out_channels if (self.joint and self.evidential) else None
            self.instructor = UncertaintyInstructor(
                cfg, self.cls_encoder.channels[3], cfg.mixer_widths[3] if self.joint else 0, eta_channels
            )

    # The navigator is a separate method so that tests can drive it with a chosen U.
    def navigate(self, f_s: list[torch.Tensor], f_m: list[torch.Tensor] | None, mutual: torch.Tensor | None,
                 uncertainty: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Run the navigator on level-0-resolution mutual evidence (softmax probability in the
        ablation) and uncertainty map U (None: no gating). Returns ``(S_0, [S_4..S_1], eta)``."""
        factors = [s // self.cfg.feature_strides[0] for s in self.cfg.feature_strides]
        mutual_down = [_downsample(mutual, f) for f in factors] if mutual is not None else None
        gates = [torch.exp(-_downsample(uncertainty, f)) for f in factors] if uncertainty is not None else None
        s0, sides, top = self.navigator(f_s, f_m, mutual_down, gates)
        eta = _downsample(top, factors[3])
        return s0, sides, eta

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        size = tuple(image.shape[-2:])
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        f_c = self.cls_encoder(image) if self.has_cls else None
        f_s = self.seg_encoder(image) if self.has_seg else None
        f_m = mutual = uncertainty = eta = None
        if self.joint:
            f_m = [mix(c, s) for mix, c, s in zip(self.mixers, f_c, f_s)]
            mutual_logits = self.mutual_decoder(f_m)  # level-0 resolution
            out["mutual_logits"] = _upsample_to(mutual_logits, size)
            if self.evidential:
                mutual = evidence_from_logits(mutual_logits)
                uncertainty = dirichlet(mutual, dim=1)[2]
            else:
                mutual = torch.softmax(mutual_logits, dim=1)
        if self.has_seg:
            s0, sides, eta = self.navigate(f_s, f_m, mutual, uncertainty)
            out["seg_logits"], out["side_logits"] = _upsample_to(s0, size), sides
        if self.has_cls:
            out["class_logits"] = self.instructor(f_c[3], f_m[3] if self.joint else None, eta)
        if self.evidential:
            for name in ("class", "seg", "mutual"):
                if f"{name}_logits" in out:
                    out[f"{name}_evidence"] = evidence_from_logits(out[f"{name}_logits"])
            if "mutual_evidence" in out:
                out["uncertainty_map"] = dirichlet(out["mutual_evidence"], dim=1)[2]
        return out

    def infer(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The deployment outputs (what the ONNX model exposes), for whichever heads exist:
        ``class_prob`` (B,K), ``class_uncertainty`` (B,1), ``seg_prob`` (B,C,H,W) and
        ``seg_uncertainty`` (B,1,H,W).

        Evidential heads give ``alpha / S`` and ``K / S``. The pixel uncertainty is the mutual
        map U that steers the navigator, or the segmentation's own ``C / S`` without a mutual
        branch. Softmax heads give the softmax and its normalised entropy.
        """
        out = self.forward(image)
        result: dict[str, torch.Tensor] = {}
        for name, key in (("class", "class"), ("seg", "seg")):
            if f"{key}_logits" not in out:
                continue
            if self.evidential:
                _, prob, unc = dirichlet(out[f"{key}_evidence"], dim=1)
            else:
                prob = torch.softmax(out[f"{key}_logits"], dim=1)
                unc = normalized_entropy(prob, dim=1)
            result[f"{name}_prob"], result[f"{name}_uncertainty"] = prob, unc
        if "uncertainty_map" in out:
            result["seg_uncertainty"] = out["uncertainty_map"]
        return result
