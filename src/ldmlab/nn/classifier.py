"""A small image classifier (plain torch) that judges generated samples: does a sample look like its class?"""

from __future__ import annotations

import itertools

from torch import Tensor, nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 conv + BatchNorm + ReLU layers, then 2× max-pooling: (B, c_in, H, W) → (B, c_out, H/2, W/2)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """VGG-style CNN: `depth` conv blocks (width doubling), global average pooling, dropout, linear head.

    Global pooling makes it resolution-agnostic, so the same class serves 32 px CPU crops and 128 px GPU crops.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, depth: int = 3,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 2 or width < 1 or depth < 1:
            raise ValueError(f"SmallCNN(num_classes={num_classes}, width={width}, depth={depth}): "
                             "need num_classes >= 2, width >= 1, depth >= 1")
        chans = [in_channels] + [width * 2**i for i in range(depth)]
        self.features = nn.Sequential(*(conv_block(a, b) for a, b in itertools.pairwise(chans)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(chans[-1], num_classes))
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "width": width, "depth": depth,
                       "dropout": dropout}

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] → (B, num_classes) logits."""
        return self.head(self.features(x))
