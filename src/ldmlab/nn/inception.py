"""The FID Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture"), plain torch.

This is the network of TensorFlow's `inception-2015-12-05` graph that Heusel et al. 2017 used for FID, as ported
by pytorch-fid (`FIDInceptionV3`, weights `pt_inception-2015-12-05-6726825d.pth`) and used by torch-fidelity.
Module names and shapes follow torchvision's `Inception3(aux_logits=False, num_classes=1008)`, so that file
loads strictly. It differs from torchvision's network in three places (pytorch-fid's `FIDInception*` patches):
- the pool branches of Mixed_5b-5d (A), Mixed_6b-6e (C) and Mixed_7b (E_1) average with count_include_pad=False
  (TensorFlow's average pool ignores the zero padding);
- Mixed_7c (E_2) max-pools in its pool branch (a quirk of that TF graph, kept for comparable numbers);
- fc has 1008 outputs (the graph's 1000 ImageNet classes plus 8 unused ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FID_INPUT_SIZE = 299  # the graph's input resolution


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3, TF's epsilon) + ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, H, W) → (B, c_out, H', W')."""
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: Tensor) -> Tensor:
    """3×3 stride-1 average pool that, like TensorFlow's, leaves the zero padding out of the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block (Mixed_5b-5d): 1×1, 5×5, double-3×3 and pool branches → 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 35, 35) → (B, 224 + pool_features, 35, 35)."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35→17 (Mixed_6a): strided 3×3, strided double-3×3 and max-pool branches."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 35, 35) → (B, 480 + c_in, 17, 17)."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17×17 block (Mixed_6b-6e) with factorised 1×7 / 7×1 convolutions → 768 channels."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 768, 17, 17) → (B, 768, 17, 17)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17→8 (Mixed_7a): strided 3×3, 7×7-then-strided-3×3 and max-pool branches."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 768, 17, 17) → (B, 1280, 8, 8)."""
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8×8 block (Mixed_7b/7c) with split 1×3 + 3×1 outputs → 2048 channels; `pool` is "avg" (7b) or "max" (7c)."""

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool={pool!r}: choose 'avg' or 'max'")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, c_in, 8, 8) → (B, 2048, 8, 8)."""
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Images in [-1, 1] → 2048-d pool3 features (FID, KID, precision/recall) and 1008-way logits (IS)."""

    name = "inception-v3-fid"
    num_features = 2048
    num_classes = 1008
    has_logits = True

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, self.num_classes)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Always eval: the BatchNorm statistics are the TF graph's, and training mode would overwrite them."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 3, 299, 299), as pytorch-fid's resize_input=normalize_input=True.

        pytorch-fid resizes [0, 1] images bilinearly (align_corners=False, no antialiasing) and then maps them to
        [-1, 1]; bilinear weights sum to one, so resizing images already in [-1, 1] gives the same input.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {tuple(images.shape)}: expected (B, 3, H, W) in [-1, 1]")
        x = images.to(self.fc.weight.dtype)  # float32, or float64 when the network was cast for precision
        if x.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    def pool3(self, x: Tensor) -> Tensor:
        """Preprocessed (B, 3, 299, 299) → (B, 2048): global average of Mixed_7c (the graph's `pool_3`)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,  # → (B, 768, 17, 17)
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):  # → (B, 2048, 8, 8)
            x = block(x)
        return x.mean(dim=(2, 3))

    def unbiased_logits(self, features: Tensor) -> Tensor:
        """pool3 features (B, 2048) → (B, 1008) logits without fc's bias.

        The Inception Score reference code (Salimans et al. 2016) multiplies pool_3 by the softmax layer's weight
        matrix only; torch-fidelity keeps this as `logits_unbiased`, its default feature for IS.
        """
        return features @ self.fc.weight.T

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] → (B, 2048) float32 pool3 features."""
        return self.pool3(self.preprocess(images)).float()

    def logits(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] → (B, 1008) unbiased logits for the Inception Score."""
        return self.unbiased_logits(self(images)).float()

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Both outputs from one pass: (B, 2048) features and (B, 1008) unbiased logits."""
        features = self(images)
        return features, self.unbiased_logits(features).float()
