"""Models: an MLP and a small CNN for 28×28 images, ResNet18/34 with a CIFAR-style stem for
32×32.

The small CNN has no normalisation layers, so a micro-batch's gradient depends on that
micro-batch alone. The ResNets use BatchNorm as in the paper; their running statistics are
updated by every micro-batch's forward pass, whatever the filter decides.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

MODELS: tuple[str, ...] = ("mlp", "small_cnn", "resnet18", "resnet34")


class MLP(nn.Module):
    """in_features → hidden → classes with a ReLU; images are flattened first.

    The studies' model (hidden 96: fast enough on a CPU for grids of hundreds of runs)."""

    def __init__(self, hidden: int, classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class SmallCNN(nn.Module):
    """A small CNN for 1×28×28 (or C×H×W) inputs, built to train fast on a CPU.

    conv3×3(w)-ReLU-maxpool2 → conv3×3 stride 2 (2w)-ReLU → fc(hidden)-ReLU → fc(K).
    The second convolution strides instead of pooling: it runs at a quarter of the cost of
    a stride-1 convolution followed by a pool, which is where such a net spends its time
    on a CPU. With w = 16, hidden = 128 it has about 207k parameters, enough to memorise
    thousands of noisy labels.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        side = (image_size // 2 + 1) // 2
        self.fc1 = nn.Linear(2 * width * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stride-1 stem, no max-pool, four stages, global pool."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10,
                 in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        for i, n in enumerate(blocks):
            stages.append(self._make_stage(width * 2**i, n, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(width * 8, num_classes)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width)


def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                width: int | None = None) -> nn.Module:
    """Model by name (``width``: first-layer channels, None for the default); ValueError
    naming the known models for anything else."""
    key = str(name).strip().lower().replace("-", "_")
    if key == "mlp":
        return MLP(width or 96, num_classes, in_channels * image_size * image_size)
    if key in ("small_cnn", "cnn"):
        return SmallCNN(in_channels, num_classes, image_size, **({"width": width} if width else {}))
    if key == "resnet18":
        return resnet18(num_classes, in_channels, width or 64)
    if key == "resnet34":
        return resnet34(num_classes, in_channels, width or 64)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
