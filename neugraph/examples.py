"""Small built-in models for the CLI, the README and the tests, with their example inputs and,
where it is known independently of the compiler, the size of their symmetry group."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class FM16(nn.Module):
    """The NiNo paper's FM/16 network (Fashion-MNIST, 16 base channels), parameters under ``fc``."""

    def __init__(self, channels: int = 16, num_classes: int = 10):
        super().__init__()
        c = channels
        self.fc = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding="same"), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding="same"), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, widths=(8, 16), num_classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, stride=1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TinyDenseNet(nn.Module):
    """DenseNet-style: each layer sees the concatenation of all earlier feature maps."""

    def __init__(self, in_ch: int = 3, growth: int = 4, layers: int = 3, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, 2 * growth, 3, padding=1)
        c = 2 * growth
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(torch.cat(feats, 1).mean((2, 3)))


class MobileBlockNet(nn.Module):
    """Depthwise-separable convolutions (depthwise groups = channels)."""

    def __init__(self, in_ch: int = 3, c: int = 8, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, 2 * c, 1)
        self.head = nn.Linear(2 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.dw(F.relu(self.stem(x)))))
        return self.head(F.relu(self.pw(x)).mean((2, 3)))


def mlp(sizes=(784, 64, 32, 10)) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


EXAMPLES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], dict | None]] = {
    "fm16": (FM16, lambda: (torch.randn(2, 1, 28, 28),), {"free_spaces": [16, 32, 32], "lane_groups": []}),
    "mlp": (mlp, lambda: (torch.randn(2, 784),), {"free_spaces": [32, 64], "lane_groups": []}),
    "resnet": (TinyResNet, lambda: (torch.randn(2, 3, 16, 16),), {"free_spaces": [8, 8, 16, 16], "lane_groups": []}),
    "densenet": (TinyDenseNet, lambda: (torch.randn(2, 3, 8, 8),), {"free_spaces": [4, 4, 4, 8], "lane_groups": []}),
    "mobilenet": (MobileBlockNet, lambda: (torch.randn(2, 3, 8, 8),), {"free_spaces": [16], "lane_groups": [8]}),
}


def get(name: str) -> tuple[nn.Module, tuple, dict | None]:
    """(module, example inputs, known group or None) for a built-in example."""
    if name not in EXAMPLES:
        raise KeyError(f"unknown example {name!r}; choose one of {sorted(EXAMPLES)}")
    make, inputs, known = EXAMPLES[name]
    torch.manual_seed(0)
    return make(), inputs(), known
