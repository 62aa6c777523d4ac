"""A plain 2-D U-Net: the reference network that makes the whole path work before the paper networks.

Encoder of double 3x3 conv blocks (BN, ReLU) with max-pool downsampling, transposed-conv decoder with
skip concatenation, 1x1 head. ``small`` has features (16, 32, 64, 128, 256), about 1.9 M parameters
like MONAI's ``BasicUNet`` baseline; ``full`` doubles the width.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.blocks import SegmentationNet
from medseg.models.registry import ModelCard, register

CONFIGS = {"small": (16, 32, 64, 128, 256), "full": (32, 64, 128, 256, 512)}


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(SegmentationNet):
    stride_multiple = 16
    min_side = 16

    def __init__(self, in_channels: int = 3, num_classes: int = 2, features: tuple[int, ...] = CONFIGS["small"]) -> None:
        super().__init__(in_channels, num_classes)
        self.downs = nn.ModuleList()
        cin = 3
        for f in features:
            self.downs.append(_double_conv(cin, f))
            cin = f
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for f in reversed(features[:-1]):
            self.ups.append(nn.ConvTranspose2d(cin, f, 2, stride=2))
            self.up_convs.append(_double_conv(2 * f, f))
            cin = f
        self.head = nn.Conv2d(cin, num_classes, 1)
        self.stride_multiple = 2 ** (len(features) - 1)
        self.min_side = self.stride_multiple

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.ups, self.up_convs):
            x = up(x)
            x = conv(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


@register(
    ModelCard(
        name="unet",
        title="U-Net",
        task="2-D semantic segmentation",
        paper="Ronneberger, Fischer, Brox, 'U-Net: Convolutional Networks for Biomedical Image Segmentation', MICCAI 2015",
        notes="Reference network; not one of the seed papers.",
    )
)
def build_unet(in_channels: int = 3, num_classes: int = 2, config: str = "small") -> UNet:
    return UNet(in_channels, num_classes, CONFIGS[config])
