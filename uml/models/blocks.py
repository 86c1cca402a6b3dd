"""Building blocks of the UML network: convolutions, the feature mixer with polarized
self-attention, and the separable dilated head of the Uncertainty Instructor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` stacked groups (ShuffleNet), so that the following
    attention sees classification and segmentation channels side by side."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention, parallel layout: a channel-only branch and a spatial-only branch,
    each a sigmoid gate on the input, summed.

    Channel branch: a softmax over positions pools a (C/2)-dim value vector, which a 1x1 conv,
    LayerNorm and sigmoid turn into one weight per channel. Spatial branch: a softmax over the
    globally pooled query channels weights the (C/2) value channels at every position, and a
    sigmoid turns that into one weight per position.
    """

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        # No bias: a constant shift before the softmax over positions cancels out.
        self.ch_query = nn.Conv2d(channels, 1, 1, bias=False)
        self.ch_value = nn.Conv2d(channels, inner, 1)
        self.ch_out = nn.Conv2d(inner, channels, 1)
        self.ch_norm = nn.LayerNorm(channels)
        self.sp_query = nn.Conv2d(channels, inner, 1)
        self.sp_value = nn.Conv2d(channels, inner, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Channel-only: (B, C/2, HW) @ softmax(B, HW, 1) -> (B, C/2, 1, 1) -> per-channel gate.
        query = torch.softmax(self.ch_query(x).reshape(b, h * w, 1), dim=1)
        pooled = torch.bmm(self.ch_value(x).reshape(b, -1, h * w), query).reshape(b, -1, 1, 1)
        channel_gate = torch.sigmoid(self.ch_norm(self.ch_out(pooled).reshape(b, c))).reshape(b, c, 1, 1)
        # Spatial-only: softmax over pooled query channels (B, 1, C/2) @ values (B, C/2, HW).
        sp_query = torch.softmax(F.adaptive_avg_pool2d(self.sp_query(x), 1).reshape(b, 1, -1), dim=-1)
        spatial = torch.bmm(sp_query, self.sp_value(x).reshape(b, -1, h * w))
        spatial_gate = torch.sigmoid(spatial.reshape(b, 1, h, w))
        return x * channel_gate + x * spatial_gate


class FeatureMixer(nn.Module):
    """One level of the mutual feature: project both encoders' features to a common width,
    concatenate, shuffle channels, polarized self-attention, 1x1 projection -> ``f_m``."""

    def __init__(self, cls_channels: int, seg_channels: int, width: int):
        super().__init__()
        self.cls_proj = nn.Conv2d(cls_channels, width, 1)
        self.seg_proj = nn.Conv2d(seg_channels, width, 1)
        self.attention = PolarizedSelfAttention(2 * width)
        self.out = nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, f_cls: torch.Tensor, f_seg: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.cls_proj(f_cls), self.seg_proj(f_seg)], dim=1)
        return self.out(self.attention(channel_shuffle(mixed, 2)))


class SeparableConv(nn.Sequential):
    """Depthwise dilated 3x3 + pointwise 1x1 + BN-ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip feature, DoubleConv."""

    def __init__(self, cin: int, skip: int, cout: int, dropout: float):
        super().__init__()
        self.conv = DoubleConv(cin + skip, cout, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))
