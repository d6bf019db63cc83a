"""A network written in plain PyTorch, for `model: {kind: python, factory: ...}`."""

from torch import nn


class SmallNet(nn.Module):
    """Conv, pool, two dense layers and a classifier (which growth replaces by its heads)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(width * 16, 64), nn.ReLU())
        self.classifier = nn.Linear(64, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def small_net(width: int = 16) -> nn.Module:
    return SmallNet(width)
