"""The image problems' networks: torchvision's ResNet-50 for ImageNet, and a ResNet-18 for
small images (Fashion-MNIST) with a configurable width.

The small-image ResNet-18 keeps ResNet-18's four stages of two torchvision ``BasicBlock``s
but replaces the ImageNet stem (7x7 convolution at stride 2, then a 3x3 max-pool: a 28x28
image would be 7x7 before the first block) with one 3x3 convolution at stride 1 and no
pool, the usual adaptation for CIFAR-sized inputs. ``width`` is the first stage's channel
count (64 in ResNet-18; the stages have width, 2, 4 and 8 times it), so that the CPU study
can shrink the network without changing its shape.
"""

from __future__ import annotations

import torch
from torch import nn


def resnet50(num_classes: int, *, channels_last: bool = False) -> nn.Module:
    """torchvision's ResNet-50, randomly initialised (``weights=None``: nothing downloaded)."""
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class SmallImageResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool, stages of
    ``width * (1, 2, 4, 8)`` channels (strides 1, 2, 2, 2), global average pool, linear."""

    STAGES = ((1, 1), (2, 2), (4, 2), (8, 2))  # (channel multiple of width, first stride)
    BLOCKS_PER_STAGE = 2

    def __init__(self, num_classes: int, *, width: int = 64, in_channels: int = 3):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = width
        for multiple, stride in self.STAGES:
            planes = width * multiple
            blocks = []
            for index in range(self.BLOCKS_PER_STAGE):
                block_stride = stride if index == 0 else 1
                downsample = None
                if block_stride != 1 or channels != planes:  # the shortcut must match the block's output
                    downsample = nn.Sequential(
                        nn.Conv2d(channels, planes, kernel_size=1, stride=block_stride, bias=False),
                        nn.BatchNorm2d(planes),
                    )
                blocks.append(BasicBlock(channels, planes, stride=block_stride, downsample=downsample))
                channels = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        # torchvision's ResNet initialisation, so that both problems start alike.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stages(self.stem(images)))
        return self.fc(torch.flatten(features, 1))


def small_resnet18(num_classes: int, *, width: int = 64, channels_last: bool = False) -> nn.Module:
    model = SmallImageResNet18(num_classes, width=width)
    return model.to(memory_format=torch.channels_last) if channels_last else model
