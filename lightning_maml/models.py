"""The networks of Finn et al. 2017, written to be vmap-friendly (no running statistics)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from lightning_maml.functional import is_differentiated_twice

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

    Each block pools before its ReLU: the two commute (``relu(max(x)) = max(relu(x))``, and
    their gradients agree), and the ReLU then runs on a quarter of the elements. On a CPU, a
    forward pass outside ``torch.func`` transforms and ``torch.compile`` (the per-task path
    that ``task_chunk_size="auto"`` takes there for conv nets) runs channels-last, which the
    CPU's max-pooling and convolutions are much faster in; it stays NCHW under ``vmap``,
    ``torch.compile``, on accelerators, and in the passes whose gradient is differentiated
    again (:func:`~lightning_maml.functional.differentiated_twice`: MAML's inner steps), where
    BatchNorm's double backward is slower channels-last. Outputs and gradients do not depend
    on the layout beyond rounding.

    Args:
        in_channels: Image channels (1 for Omniglot, 3 for mini-ImageNet / CIFAR).
        ways: Number of output classes per task.
        hidden: Filters per block (64 for Omniglot, 32 for mini-ImageNet).
        image_size: Height and width of the (square) input images.
        blocks: Number of conv blocks.
        channels_last: Allow the channels-last layout where it is faster, as above (``False``:
            always NCHW).
    """

    def __init__(
        self,
        in_channels: int = 1,
        ways: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        blocks: int = 4,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if min(in_channels, ways, hidden, image_size, blocks) < 1:
            raise ValueError("ConvNet sizes must all be >= 1.")
        if image_size < 2**blocks:
            raise ValueError(
                f"image_size={image_size} is too small for {blocks} blocks that each halve the "
                f"image; use image_size >= {2**blocks} or fewer blocks."
            )
        self.channels_last = channels_last
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            # The parameters keep the names of the conv - BatchNorm - ReLU - pool order.
            layers += [
                nn.Conv2d(channels, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            channels = hidden
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            size = self.features(torch.zeros(2, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Linear(size, ways)

    def uses_channels_last(self, x: Tensor) -> bool:
        """Whether this forward pass of ``x`` runs channels-last (see the class docstring)."""
        return (
            self.channels_last
            and x.device.type == "cpu"
            and x.dim() == 4
            and not torch.compiler.is_compiling()
            # Under vmap the batched convolutions fold the tasks into the batch, NCHW.
            and not torch._C._are_functorch_transforms_active()
            # BatchNorm's double backward is slower channels-last (MAML's inner steps).
            and not is_differentiated_twice()
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_channels_last(x):
            # clone, not contiguous: a one-channel image is contiguous in both layouts already,
            # and the convolutions follow the input's strides, which must say channels-last.
            x = x.clone(memory_format=torch.channels_last)
        return self.classifier(self.features(x))
