"""The UML network (Ren et al., MICCAI 2023), read top to bottom, wired as the authors' 2023 code
wires it (docs/explanation/method.md).

::

    image ─┬─ cls encoder ─ f_c[0..3] ─┐
           └─ seg encoder ─ f_s[0..3] ─┼─ feature mixer ─ f_m[0..3]
                                       │        │
                                       │  mutual decoder ─ pixel evidence e_m, uncertainty U
                                       │        │
       navigator(f_s, f_m[3], e_m, U): bottom gated by exp(-U↓), bottom reliable mask,
                                       U-Net decoder ─ S_3, S_2, S_1, S_0; top reliable mask ─ eta
       instructor(f_c[3], f_m[3], eta): h + h * eta' ─ pool ─ linear ─ class evidence

Levels are indexed 0..3 from fine to coarse (strides ``feature_strides``, published 1, 2, 4, 8).
``S_0`` is the navigator's full-resolution output and ``S_3..S_1`` its side outputs at levels
3..1; all four are plain logits (softmax segmentation). Only the mutual decoder (per pixel) and
the classifier (per image) are evidential. Reliable masks ``R = (S + e_m↓) * exp(-U↓)`` exist at
two levels: the bottom one feeds the decoder; the top one is built from ``S_0`` after it is
produced and feeds only ``eta``.

Ablations switch wiring off rather than adding loss tricks:

- ``uncertainty=False``: softmax heads. The navigator is not gated (``exp(-U)`` becomes 1) and
  its bottom reliable mask uses the mutual softmax probability in place of evidence. There is no
  instructor (no ``eta``, no top reliable mask): the classifier pools ``h`` alone.
- ``tasks=("seg",)``: segmentation encoder and navigator only. No mutual branch, so no gating
  and no reliable masks: a U-Net decoder with deep supervision.
- ``tasks=("cls",)``: classification encoder and the instructor's head over ``f_c`` only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uml.evidential import dirichlet, evidence_from_logits, normalized_entropy
from uml.models.blocks import (DoubleConv, FeatureMixer, ReliableMask, SeparableConvBNReLU, UpBlock, conv1x1,
                               resize)
from uml.models.config import ModelConfig
from uml.models.encoders import TimmEncoder


class MutualDecoder(nn.Module):
    """U-Net decoder over the mutual features -> pixel logits at level-0 resolution.

    Each up block doubles the resolution, convolves to the next finer mixer width and appends
    that level's ``f_m``; two plain 1x1 convolutions make the logits.
    """

    def __init__(self, widths: list[int], head_width: int, num_classes: int, dropout: float):
        super().__init__()
        # Channels entering level l's up block: f_m[3] at the bottom, then (f_m[l+1] + up output).
        self.ups = nn.ModuleList(UpBlock(widths[3] if i == 2 else 2 * widths[i + 1], widths[i], dropout) for i in range(3))
        self.head = nn.Sequential(conv1x1(2 * widths[0], head_width), conv1x1(head_width, num_classes))

    def forward(self, f_m: list[torch.Tensor]) -> torch.Tensor:
        x = f_m[3]
        for level in (2, 1, 0):
            x = self.ups[level](x, f_m[level])
        return self.head(x)


class UncertaintyNavigator(nn.Module):
    """Segmentation decoder steered by the mutual branch (see the module docstring).

    Bottom: ``[f_s[3]; f_m[3]] * exp(-U↓)`` -> 1x1 -> side output ``S_3``; the bottom reliable
    mask from ``S_3`` is fused into the feature. Then three up blocks with the segmentation
    encoder's skips, a side output after each (``S_2``, ``S_1``, and ``S_0`` at level 0). With
    ``with_eta``, the top reliable mask from ``S_0`` is fused into the top feature, which,
    resized to the coarsest level, is ``eta``.
    """

    def __init__(self, cfg: ModelConfig, seg_channels: list[int], mutual_width: int | None, with_eta: bool):
        super().__init__()
        self.mutual = mutual_width is not None
        w, num_classes, drop = cfg.decoder_widths, cfg.num_mask_classes, cfg.dropout
        self.bottom = conv1x1(seg_channels[3] + (mutual_width or 0), w[3])
        # Channels after each level: w[3] at the bottom; w[l] + seg_channels[l] after level l's up block.
        after = [w[l] + seg_channels[l] for l in range(3)] + [w[3]]
        self.ups = nn.ModuleList(UpBlock(after[i + 1], w[i], drop) for i in range(3))
        self.sides = nn.ModuleList(conv1x1(after[i], num_classes) for i in range(4))
        self.bottom_mask = ReliableMask(num_classes, w[3], drop) if self.mutual else None
        self.top_mask = ReliableMask(num_classes, after[0], drop) if self.mutual and with_eta else None
        self.out_channels = after[0]

    def forward(self, f_s: list[torch.Tensor], f_m_bottom: torch.Tensor | None, mutual: torch.Tensor | None,
                uncertainty: torch.Tensor | None) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        """``mutual`` (evidence, or softmax probability in the ablation) and ``uncertainty`` (U, or
        None: no gating) are at level-0 resolution. Returns ``s0``, ``sides`` ([S_3, S_2, S_1]),
        ``eta`` (None without the top mask) and the reliable masks ``bottom_mask``/``top_mask``."""
        bottom_size = f_s[3].shape[-2:]
        x = torch.cat([f_s[3], f_m_bottom], dim=1) if self.mutual else f_s[3]
        gate_bottom = torch.exp(-resize(uncertainty, bottom_size)) if uncertainty is not None else None
        if gate_bottom is not None:
            x = x * gate_bottom
        x = self.bottom(x)
        sides = [self.sides[3](x)]
        bottom_mask = top_mask = eta = None
        if self.bottom_mask is not None:
            x, bottom_mask = self.bottom_mask(x, sides[0], resize(mutual, bottom_size), gate_bottom)
        for level in (2, 1, 0):
            x = self.ups[level](x, f_s[level])
            sides.append(self.sides[level](x))
        s0 = sides.pop()
        if self.top_mask is not None:
            gate_top = torch.exp(-uncertainty) if uncertainty is not None else None
            top, top_mask = self.top_mask(x, s0, resize(mutual, x.shape[-2:]), gate_top)
            eta = resize(top, bottom_size)
        return {"s0": s0, "sides": sides, "eta": eta, "bottom_mask": bottom_mask, "top_mask": top_mask}


class UncertaintyInstructor(nn.Module):
    """Classification head: four separable dilated 3x3 convs (BN-ReLU) over ``[f_c[3]; f_m[3]]``
    -> ``h``; ``eta' = doubleconv(eta)`` to ``h``'s width; ``f = h + h * eta'``; global average
    pool; bias-free linear."""

    def __init__(self, cfg: ModelConfig, cls_channels: int, mutual_width: int, eta_channels: int | None):
        super().__init__()
        widths, layers, cin = cfg.instructor_widths, [], cls_channels + mutual_width
        for width in widths:
            layers.append(SeparableConvBNReLU(cin, width, cfg.instructor_dilation))
            cin = width
        self.head = nn.Sequential(*layers)
        self.eta_conv = DoubleConv(eta_channels, widths[-1], cfg.dropout) if eta_channels is not None else None
        self.classifier = nn.Linear(widths[-1], cfg.num_classes, bias=False)

    def forward(self, f_c: torch.Tensor, f_m: torch.Tensor | None, eta: torch.Tensor | None) -> torch.Tensor:
        h = self.head(torch.cat([f_c, f_m], dim=1) if f_m is not None else f_c)
        if self.eta_conv is not None:
            h = h + h * self.eta_conv(eta)
        return self.classifier(h.mean(dim=(2, 3)))


class UMLNet(nn.Module):
    """Joint classification + segmentation with evidential uncertainty; see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        strides = cfg.feature_strides
        self.has_cls, self.has_seg = "cls" in cfg.tasks, "seg" in cfg.tasks
        self.joint = self.has_cls and self.has_seg
        self.evidential = cfg.uncertainty
        # The encoders are built first only to learn their channel counts; they keep their own
        # (or pretrained) initialisation, the rest is initialised below, as published.
        encoder_args = dict(pretrained=cfg.pretrained, frozen_bn=cfg.frozen_encoder_bn)
        self.cls_encoder = (TimmEncoder(cfg.cls_encoder, strides, cfg.cls_weights, weights_key="model.cls_weights", **encoder_args)
                            if self.has_cls else None)
        self.seg_encoder = (TimmEncoder(cfg.seg_encoder, strides, cfg.seg_weights, weights_key="model.seg_weights", **encoder_args)
                            if self.has_seg else None)
        # The instructor (and with it eta and the top reliable mask) exists only where
        # uncertainty and segmentation both do.
        with_eta = self.joint and self.evidential
        if self.joint:
            self.mixers = nn.ModuleList(
                FeatureMixer(c, s, cfg.mixer_width, w)
                for c, s, w in zip(self.cls_encoder.channels, self.seg_encoder.channels, cfg.mixer_widths)
            )
            self.mutual_decoder = MutualDecoder(cfg.mixer_widths, cfg.mutual_head_width, cfg.num_mask_classes, cfg.dropout)
        if self.has_seg:
            self.navigator = UncertaintyNavigator(cfg, self.seg_encoder.channels, cfg.mixer_widths[3] if self.joint else None,
                                                  with_eta)
        if self.has_cls:
            self.instructor = UncertaintyInstructor(cfg, self.cls_encoder.channels[3], cfg.mixer_widths[3] if self.joint else 0,
                                                    self.navigator.out_channels if with_eta else None)
        self._init_weights()

    def _init_weights(self) -> None:
        """Every non-encoder conv Kaiming-normal (fan_out, ReLU gain), every BN weight 1 and bias
        0; linear layers and conv biases keep PyTorch's defaults (the authors' code). With
        ``navigator_head_init: fan_in`` the navigator's logit heads keep PyTorch's default conv
        initialisation instead."""
        skip = {id(m) for enc in (self.cls_encoder, self.seg_encoder) if enc is not None for m in enc.modules()}
        if self.has_seg and self.cfg.navigator_head_init == "fan_in":
            skip |= {id(m) for m in self.navigator.sides}
        for module in self.modules():
            if id(module) in skip:
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def navigate(self, f_s: list[torch.Tensor], f_m: list[torch.Tensor] | None, mutual: torch.Tensor | None,
                 uncertainty: torch.Tensor | None) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        """The navigator on level-0-resolution mutual evidence (softmax probability in the
        ablation) and uncertainty map U (None: no gating); a method so that tests can drive it
        with a chosen U. See :meth:`UncertaintyNavigator.forward` for the result."""
        return self.navigator(f_s, f_m[3] if f_m is not None else None, mutual, uncertainty)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits of every head (``class_logits``; ``seg_logits`` = S_0 at input size,
        ``side_logits`` = [S_3, S_2, S_1] at their levels; ``mutual_logits`` at input size) and,
        for evidential models, ``class_evidence``, ``mutual_evidence`` and ``uncertainty_map`` U."""
        size = tuple(image.shape[-2:])
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        f_c = self.cls_encoder(image) if self.has_cls else None
        f_s = self.seg_encoder(image) if self.has_seg else None
        f_m = mutual = uncertainty = eta = None
        if self.joint:
            f_m = [mix(c, s) for mix, c, s in zip(self.mixers, f_c, f_s)]
            mutual_logits = self.mutual_decoder(f_m)  # level-0 resolution
            out["mutual_logits"] = resize(mutual_logits, size)
            if self.evidential:
                mutual = evidence_from_logits(mutual_logits)
                uncertainty = dirichlet(mutual, dim=1)[2]
            else:
                mutual = torch.softmax(mutual_logits, dim=1)
        if self.has_seg:
            nav = self.navigate(f_s, f_m, mutual, uncertainty)
            out["seg_logits"], out["side_logits"], eta = resize(nav["s0"], size), nav["sides"], nav["eta"]
        if self.has_cls:
            out["class_logits"] = self.instructor(f_c[3], f_m[3] if self.joint else None, eta)
        if self.evidential:
            if "class_logits" in out:
                out["class_evidence"] = evidence_from_logits(out["class_logits"])
            if "mutual_logits" in out:
                out["mutual_evidence"] = evidence_from_logits(out["mutual_logits"])
                out["uncertainty_map"] = dirichlet(out["mutual_evidence"], dim=1)[2]
        return out

    def scores(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the deployment outputs are computed from, for whichever heads exist:

        - ``class_log_score`` (B,K): ``log alpha`` of an evidential head, the logits of a softmax
          head. ``softmax(class_log_score)`` is the class probability ``alpha / S`` (resp. the
          softmax), and dividing it by a temperature is the post-hoc calibration.
        - ``class_uncertainty_raw`` (B,1): the paper's image uncertainty ``K / S`` (the normalised
          entropy of the softmax for a softmax head).
        - ``seg_logits`` (B,C,H,W): the navigator's ``S_0``, whose softmax is the delivered mask.
        - ``seg_uncertainty_raw`` (B,1,H,W): the paper's pixel uncertainty, the mutual branch's map
          ``U = C / S`` (the normalised entropy of the mutual softmax in the softmax ablation, of
          ``softmax(S_0)`` without a mutual branch).
        """
        out = self.forward(image)
        result: dict[str, torch.Tensor] = {}
        if "class_logits" in out:
            if self.evidential:
                result["class_log_score"] = torch.log1p(out["class_evidence"])  # log(alpha), alpha = e + 1
                result["class_uncertainty_raw"] = dirichlet(out["class_evidence"], dim=1)[2]
            else:
                result["class_log_score"] = out["class_logits"]
                result["class_uncertainty_raw"] = normalized_entropy(torch.softmax(out["class_logits"], dim=1), dim=1)
        if "seg_logits" in out:
            result["seg_logits"] = out["seg_logits"]
            if "uncertainty_map" in out:
                result["seg_uncertainty_raw"] = out["uncertainty_map"]
            elif "mutual_logits" in out:
                result["seg_uncertainty_raw"] = normalized_entropy(torch.softmax(out["mutual_logits"], dim=1), dim=1)
            else:
                result["seg_uncertainty_raw"] = normalized_entropy(torch.softmax(out["seg_logits"], dim=1), dim=1)
        return result

    def infer(self, image: torch.Tensor, class_temperature: float = 1.0, seg_temperature: float = 1.0,
              error_map_sigma: float = 0.0, class_power: float = 1.0) -> dict[str, torch.Tensor]:
        """The deployment outputs (what the ONNX model exposes): :func:`deployment_outputs` of
        :meth:`scores` with the given post-hoc settings (the defaults: uncalibrated, as during
        training)."""
        return deployment_outputs(self.scores(image), class_temperature, seg_temperature, error_map_sigma, class_power)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) maps smoothed by a Gaussian of standard deviation ``sigma`` pixels, truncated at
    ``int(3 sigma + 0.5)`` pixels and mirrored at the border (``scipy.ndimage.gaussian_filter`` with
    ``mode="mirror"``, ``truncate=3``); two 1-D convolutions. ``sigma <= 0``: the maps as they are."""
    if sigma <= 0:
        return maps
    radius = int(3.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def class_power_map(log_score: torch.Tensor, power: float) -> torch.Tensor:
    """(B, K) class log-scores centred on their mean over the classes, each raised to ``power``
    with its sign kept (``power == 1``: the scores as they are, which the softmax cannot tell from
    the centred ones). Odd and strictly increasing, so it keeps the argmax and, for K = 2, the
    order of the positive-class probability. The calibrate stage fits ``power`` with
    :func:`uml.calibration.fit_power_temperature` (its numpy twin: :func:`uml.calibration.power_map`)."""
    if power == 1.0:
        return log_score
    centred = log_score - log_score.mean(dim=1, keepdim=True)
    return torch.sign(centred) * centred.abs().pow(power)


def deployment_outputs(scores: dict[str, torch.Tensor], class_temperature: float = 1.0,
                       seg_temperature: float = 1.0, error_map_sigma: float = 0.0,
                       class_power: float = 1.0) -> dict[str, torch.Tensor]:
    """The outputs a user acts on, from :meth:`UMLNet.scores`, with post-hoc temperatures and the
    error map's smoothing:

    - ``class_prob`` = ``softmax(class_power_map(class_log_score, class_power) /
      class_temperature)``. With ``class_power`` 1 and an evidential head this is the mean of the
      tempered Dirichlet ``alpha_k ** (1 / T)``; with K = 2 it is in any case a strictly
      increasing function of ``alpha / S`` with the same argmax, so accuracy, F1 and AUC do not
      change, only how sure the probability says the model is.
    - ``class_uncertainty`` = ``1 - max_k class_prob``: the calibrated probability that the
      predicted class is wrong, the score the referral rule thresholds.
    - ``class_prob_raw`` = ``softmax(class_log_score)`` (``alpha / S``) and ``class_uncertainty_raw``
      (``K / S``): the paper's outputs, as trained.
    - ``seg_prob`` = ``softmax(S_0 / seg_temperature)``: the same argmax (the delivered mask) as
      ``softmax(S_0)``.
    - ``seg_uncertainty``: the normalised entropy of ``seg_prob``, the uncertainty of the mask
      actually delivered (its error map), smoothed by a Gaussian of ``error_map_sigma`` pixels
      (:func:`gaussian_blur`). ``S_0`` is trained with a Dice loss alone, which makes its
      probabilities nearly 0 or 1 everywhere but on the predicted boundary itself, while the wrong
      pixels lie in a band a few pixels wide around it: smoothing spreads the boundary's
      uncertainty over that band (the calibrate stage picks the width on the calibration split).
    - ``seg_uncertainty_raw``: the paper's pixel uncertainty (the mutual map ``U``), which belongs
      to the mutual branch, not to the delivered mask.
    """
    result: dict[str, torch.Tensor] = {}
    if "class_log_score" in scores:
        log_score = scores["class_log_score"]
        result["class_prob"] = torch.softmax(class_power_map(log_score, class_power) / class_temperature, dim=1)
        result["class_uncertainty"] = 1.0 - result["class_prob"].amax(dim=1, keepdim=True)
        result["class_prob_raw"] = torch.softmax(log_score, dim=1)
        result["class_uncertainty_raw"] = scores["class_uncertainty_raw"]
    if "seg_logits" in scores:
        # From log-probabilities: p * log(p) of a pixel's unlikely classes stays exact where the
        # log of a rounded probability would not (onnxruntime and torch then agree to ~1e-6).
        log_prob = torch.log_softmax(scores["seg_logits"] / seg_temperature, dim=1)
        result["seg_prob"] = log_prob.exp()
        num_classes = log_prob.shape[1]
        entropy = -(result["seg_prob"] * log_prob).sum(dim=1, keepdim=True) / math.log(num_classes)
        result["seg_uncertainty"] = gaussian_blur(entropy, error_map_sigma)
        result["seg_uncertainty_raw"] = scores["seg_uncertainty_raw"]
    return result
