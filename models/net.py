"""SCS-Net-style network: a small 2D U-shaped encoder-decoder built from lightweight
feature-extraction modules (LFEM).

LFEM (one block): depthwise 3x3 -> BN -> pointwise 1x1 -> BN -> ReLU, twice, then a
squeeze-and-excitation channel gate, plus a residual connection (1x1 projection when the
channel count changes). Depthwise-separable convolutions keep it light for CPU inference.

Input ``[N, 1, H, W]`` (normalised b0 on the model grid, any H and W), output ``[N, 9, H, W]``
logits. The input is zero-padded (0 = the median after ``normalise``) on the far side to a
multiple of ``2 ** depth`` and the logits are cropped back, so ONNX dynamic spatial sizes work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.labels import N_CLASSES

DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64, 128, 256, 384)
"""Channels per level. Few at full resolution, where a 96 x 96 px crop costs most, many at the
coarse levels, where the cord's shape is inferred; five down-samplings, so the deepest level
sees a 96 px crop as 3 x 3. Half the training step time of (24, 48, 72, 96, 128); the fifth
level adds 6 % to the step of (16, 32, 64, 128, 256) and lifts held-out Dice from 0.810 to
0.815 in the same 110 min (see models/scsnet/MODEL_CARD.md)."""


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w


class LFEM(nn.Module):
    """Lightweight feature-extraction module (depthwise-separable convs + SE + residual)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, groups=c_out, bias=False),
            nn.BatchNorm2d(c_out),
            nn.Conv2d(c_out, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.se = SqueezeExcite(c_out)
        self.skip: nn.Module = (
            nn.Identity() if c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.se(self.body(x)) + self.skip(x))


class SCSNet(nn.Module):
    """U-shaped LFEM network; ``depth = len(widths) - 1`` down-samplings."""

    def __init__(self, widths: tuple[int, ...] = DEFAULT_WIDTHS, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.depth = len(widths) - 1
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        self.enc = nn.ModuleList([LFEM(widths[0], widths[0])])
        self.enc.extend(LFEM(widths[i], widths[i + 1]) for i in range(self.depth))
        self.dec = nn.ModuleList(LFEM(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(self.depth)))
        self.head = nn.Conv2d(widths[0], n_classes, 1)

    @property
    def pad_multiple(self) -> int:
        return 2**self.depth

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        m = self.pad_multiple
        ph = (m - h % m) % m
        pw = (m - w % m) % m
        x = F.pad(x, (0, pw, 0, ph))
        x = self.enc[0](self.stem(x))
        skips = [x]
        for block in self.enc[1:]:
            x = block(F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.dec:
            skip = skips.pop()
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        return logits[:, :, :h, :w]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
