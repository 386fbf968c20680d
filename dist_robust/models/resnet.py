"""The backbones of the robustness literature: PreAct ResNet-18, WRN-34-10, ResNet-50.

Each maps [B, C, H, W] to a flat [B, out_features] vector (the classifier layer is the model's
``head``, not part of these) and ends in global average pooling rather than a fixed 4x4 / 8x8 pool,
so 28x28 inputs work too; at 32x32 this is identical to the papers' fixed pooling. Submodule names
follow the reference code (Rice et al.'s PreActResNet, TRADES' WideResNet, torchvision), so their
checkpoints map onto ``features.*`` by adding a prefix and dropping the classifier.

Each also lists its ``blocks``: the submodule names of its residual units in forward order, then its
final BN(-ReLU) if it has one, the units of partial fine-tuning and CARTL as CARTL's code counts them
(``dist_robust.models.block_names`` adds the head).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


def _gap(x):
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


# --- PreAct ResNet-18 (He et al. 2016b, CIFAR variant as in Rice et al. 2020) -----------------------

class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # The projection shortcut takes the pre-activated input, the identity one the raw input.
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """3x3 stem (64), four stages of two PreActBlocks (64/128/256/512, strides 1/2/2/2), final
    BN-ReLU (pre-activation nets need it before pooling), GAP -> 512 features."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        cin, stages = 64, []
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.out_features = 512
        # The final BN-ReLU is a block, as in CARTL's pre-activation WRN (their ResNet-18 has none).
        self.blocks = tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)) + ("bn",)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return _gap(F.relu(self.bn(out)))


# --- WideResNet-34-10 (Zagoruyko & Komodakis 2016, as in the TRADES / Madry PyTorch code) -----------

class WideBasicBlock(nn.Module):
    # Names (bn1, relu1, convShortcut, ...) kept from the TRADES code so its checkpoints map 1:1.
    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = cin == cout and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            shortcut = x
        else:
            # As in TRADES: when the shape changes, both paths start from the pre-activated input.
            x = self.relu1(self.bn1(x))
            out, shortcut = x, self.convShortcut(x)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: 3x3 stem (16), three stages of (depth-4)/6 blocks at 16k/32k/64k channels
    (strides 1/2/2), final BN-ReLU, GAP -> 64k features. WRN-34-10: 5 blocks per stage, 640 features.

    TRADES' file also builds an unused ``sub_block1``; it is left out (it is dead weight, and DDP
    rejects parameters that get no gradient).
    """

    def __init__(self, in_channels: int, depth: int = 34, widen: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, w[1], w[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, w[2], w[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU(inplace=True)
        self.out_features = w[3]
        # CARTL's WRNBlocks: the 3n units in order, then the final BN-ReLU (then the FC: 3n + 2 blocks).
        self.blocks = tuple(f"block{g}.layer.{i}" for g in range(1, 4) for i in range(n)) + ("bn1",)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return _gap(self.relu(self.bn1(out)))


def wrn34_10(in_channels: int) -> WideResNet:
    return WideResNet(in_channels, depth=34, widen=10, drop_rate=0.0)


# --- ResNet-50 (torchvision) -------------------------------------------------------------------------

def resnet50(in_channels: int) -> nn.Module:
    """torchvision's ResNet-50 (random init, no download) without its classifier: 2048 features.

    The ImageNet-style stem (7x7 stride-2 conv + max-pool) is kept on purpose, even for 32x32 inputs
    (layer4 then sees 1x1 maps): TWINS feeds 32x32 images straight into the ImageNet network, and
    keeping torchvision's modules and names lets ImageNet checkpoints load as ``features.*``.
    """
    # Imported here: torchvision's import pulls in torch._dynamo (1.4 s per process), which every rank
    # of every run would pay at start-up for a model few runs build.
    from torchvision.models import resnet50 as torchvision_resnet50
    net = torchvision_resnet50(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()  # the classifier is the model's head
    net.out_features = 2048
    # Every bottleneck, as CARTL's Resnet18Block counts every basic block: post-activation, no final BN.
    net.blocks = tuple(f"{layer}.{i}" for layer in ("layer1", "layer2", "layer3", "layer4")
                       for i in range(len(getattr(net, layer))))
    return net
