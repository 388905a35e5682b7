"""The networks of Finn et al. 2017, written to be vmap-friendly (no running statistics)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ConvNet"]


class MLP(nn.Sequential):
    """Finn et al.'s regression network: ``in -> hidden -> hidden -> out`` with ReLU.

    Args:
        in_features: Input size (1 for sinusoids).
        out_features: Output size (1 for sinusoids).
        hidden: Width of each hidden layer (40 in Finn et al.).
        depth: Number of hidden layers (2 in Finn et al.).
    """

    def __init__(
        self, in_features: int = 1, out_features: int = 1, hidden: int = 40, depth: int = 2
    ) -> None:
        if min(in_features, out_features, hidden, depth) < 1:
            raise ValueError("MLP sizes must all be >= 1.")
        widths = [in_features] + [hidden] * depth
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers, nn.Linear(widths[-1], out_features))


class ConvNet(nn.Module):
    """Finn et al.'s 4-block conv net: ``[conv3x3 - BatchNorm - ReLU - maxpool2] x 4 - linear``.

    BatchNorm uses the statistics of each batch (``track_running_stats=False``), as in MAML's
    reference code, so the forward pass is a pure function of parameters and input.

    Args:
        in_channels: Image channels (1 for Omniglot, 3 for mini-ImageNet / CIFAR).
        ways: Number of output classes per task.
        hidden: Filters per block (64 for Omniglot, 32 for mini-ImageNet).
        image_size: Height and width of the (square) input images.
        blocks: Number of conv blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ways: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        blocks: int = 4,
    ) -> None:
        super().__init__()
        if min(in_channels, ways, hidden, image_size, blocks) < 1:
            raise ValueError("ConvNet sizes must all be >= 1.")
        if image_size < 2**blocks:
            raise ValueError(
                f"image_size={image_size} is too small for {blocks} blocks that each halve the "
                f"image; use image_size >= {2**blocks} or fewer blocks."
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = hidden
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            size = self.features(torch.zeros(2, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Linear(size, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
