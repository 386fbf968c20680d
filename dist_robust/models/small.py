"""CPU-sized backbones for 28x28 (MNIST-like) images; both also run at 32x32.

Each backbone maps [B, C, H, W] to a flat [B, out_features] vector and ends in global average
pooling, so it does not depend on the image size. Its top-level children with parameters are its
"blocks" (see ``dist_robust.models.block_names``).
"""
from __future__ import annotations

from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BN that follows has its own shift.
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNN3(nn.Module):
    """conv3x3(c,w)-BN-ReLU-maxpool, conv3x3(w,2w)-BN-ReLU-maxpool, conv3x3(2w,4w)-BN-ReLU, GAP.

    With the default width 32 this is 32/64/128 channels and 128 features, the size the adversarial
    demo budget was measured for: do not change the default.
    """

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        w = width
        self.stage1 = nn.Sequential(*conv_bn_relu(in_channels, w), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*conv_bn_relu(w, 2 * w), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*conv_bn_relu(2 * w, 4 * w))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = 4 * w

    def forward(self, x):
        return self.pool(self.stage3(self.stage2(self.stage1(x))))


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al. 2016a): two 3x3 convs, 1x1 projection shortcut
    when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """3x3 stem (16) then one BasicBlock per stage at 16/32/64 channels, strides 1/2/2, GAP -> 64
    features (28x28 -> 28, 14, 7)."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, w1))
        self.stage1 = BasicBlock(w1, w1, 1)
        self.stage2 = BasicBlock(w1, w2, 2)
        self.stage3 = BasicBlock(w2, w3, 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = w3

    def forward(self, x):
        return self.pool(self.stage3(self.stage2(self.stage1(self.stem(x)))))
