"""Building blocks of the UML network, as the authors' 2023 code wires them (docs/explanation/method.md): the
decoder units, the feature mixer with polarized self-attention, the navigator's reliable-mask
unit and the instructor's separable dilated convolutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uml.models.config import FEATURE_MIXER_SHUFFLE_GROUP


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resampling with aligned corners, the interpolation the published model uses for
    every up- and downsampling (decoder upsampling, ``U↓``/``e_m↓``, side outputs, ``eta``)."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    """A plain bias-free 1x1 convolution: the published model's projections and output heads
    have no normalisation or activation."""
    return nn.Conv2d(cin, cout, 1, bias=False)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, dropout: float = 0.0):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU-Dropout2d layers: the U-Net decoder unit."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.1):
        super().__init__(ConvBNReLU(cin, cout, 3, dropout), ConvBNReLU(cout, cout, 3, dropout))


class UpBlock(nn.Module):
    """Upsample x2, DoubleConv to ``cout`` channels, then concatenate the skip feature: the
    output has ``cout + skip`` channels. (The published decoder convolves before it
    concatenates, so the skip feature enters the next level unchanged.)"""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.conv = DoubleConv(cin, cout, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, self.conv(resize(x, skip.shape[-2:]))], dim=1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view the channels as ``groups`` x ``C / groups`` and
    transpose, so that output channel ``j * groups + g`` is input channel ``g * C / groups + j``.

    The result keeps the input's memory layout. A channels-last input (``train.channels_last``) is
    shuffled along the innermost axis of its (B, H, W, C) view: written for the (B, C, H, W) view,
    the shuffle returned a contiguous tensor, which every convolution after it copied back to
    channels-last, forward and backward: 13 % of a training step of the small preset on a 2-core
    CPU (``benchmarks/step_time.py``). The values are the same either way, bit for bit. (torch's
    ``F.channel_shuffle`` keeps the layout too, but the ONNX exporter does not support it.)
    """
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)
        return nhwc.reshape(b, h, w, groups, c // groups).transpose(3, 4).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention in the published sequential form.

    Channel branch: a softmax over positions pools a (C/2)-dim value vector; a 1x1 conv,
    LayerNorm over channels and a sigmoid make one weight per channel; ``x_c = w_c * x``.
    Spatial branch, on ``x_c``: the average-pooled (C/2)-dim query (no softmax) weights the
    (C/2) value channels at every position; a sigmoid makes one weight per position ``w_s``.
    Output ``x_c + w_s * x_c``.
    """

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.ch_query = nn.Conv2d(channels, 1, 1)
        self.ch_value = nn.Conv2d(channels, inner, 1)
        self.ch_out = nn.Conv2d(inner, channels, 1)
        self.ch_norm = nn.LayerNorm(channels)
        self.sp_query = nn.Conv2d(channels, inner, 1)
        self.sp_value = nn.Conv2d(channels, inner, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Channel-only: (B, C/2, HW) @ softmax over positions (B, HW, 1) -> (B, C/2) -> per-channel gate.
        query = torch.softmax(self.ch_query(x).reshape(b, h * w, 1), dim=1)
        pooled = torch.bmm(self.ch_value(x).reshape(b, -1, h * w), query).reshape(b, -1, 1, 1)
        channel_gate = torch.sigmoid(self.ch_norm(self.ch_out(pooled).reshape(b, c))).reshape(b, c, 1, 1)
        x_c = channel_gate * x
        # Spatial-only, on the channel-gated feature: pooled query (B, 1, C/2) @ values (B, C/2, HW).
        sp_query = F.adaptive_avg_pool2d(self.sp_query(x_c), 1).reshape(b, 1, -1)
        spatial = torch.bmm(sp_query, self.sp_value(x_c).reshape(b, -1, h * w))
        spatial_gate = torch.sigmoid(spatial.reshape(b, 1, h, w))
        return x_c + spatial_gate * x_c


class FeatureMixer(nn.Module):
    """One level of the mutual feature: plain 1x1 projections of both encoders' features to
    ``width`` channels each, concatenation, channel shuffle (groups of four channels, as
    published), polarized self-attention over the ``2 * width`` channels, and a plain 1x1
    projection to ``out_width`` (none when ``out_width == 2 * width``: the published coarsest
    level keeps the attention's output)."""

    def __init__(self, cls_channels: int, seg_channels: int, width: int, out_width: int):
        super().__init__()
        self.cls_proj = conv1x1(cls_channels, width)
        self.seg_proj = conv1x1(seg_channels, width)
        self.attention = PolarizedSelfAttention(2 * width)
        self.out = nn.Identity() if out_width == 2 * width else conv1x1(2 * width, out_width)

    def forward(self, f_cls: torch.Tensor, f_seg: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.cls_proj(f_cls), self.seg_proj(f_seg)], dim=1)
        mixed = channel_shuffle(mixed, mixed.shape[1] // FEATURE_MIXER_SHUFFLE_GROUP)
        return self.out(self.attention(mixed))


class ReliableMask(nn.Module):
    """The navigator's reliable-mask unit: ``R = (S + e_m) * g`` (``g = exp(-U)``, or 1 without
    gating) is embedded by a 1x1 conv-BN-ReLU-Dropout to the feature's width, concatenated with
    the feature and projected back by a plain 1x1 conv. Returns the new feature and ``R``."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.embed = ConvBNReLU(num_classes, width, kernel=1, dropout=dropout)
        self.fuse = conv1x1(2 * width, width)

    def forward(self, feature: torch.Tensor, side: torch.Tensor, mutual: torch.Tensor,
                gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        reliable = side + mutual
        if gate is not None:
            reliable = reliable * gate
        return self.fuse(torch.cat([feature, self.embed(reliable)], dim=1)), reliable


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise dilated 3x3 + pointwise 1x1, then BN-ReLU: one layer of the instructor's head."""

    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
