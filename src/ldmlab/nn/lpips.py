"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), VGG16 variant.

Re-implemented without torchvision or the `lpips` package (neither can be installed here, see
ENVIRONMENT.md). The backbone reads torchvision's `vgg16-397923af.pth` (keys `features.N.*`); the v0.1 linear
heads are the ones torchmetrics ships (`lpips_models/vgg.pth`, byte-identical to the lpips package's).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmlab.nn.safe_load import load_weights_only

# torchvision's VGG16 "D" config (Simonyan & Zisserman 2015, Table 1); "M" = 2×2 max-pool.
_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Indices in torchvision's `vgg16().features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# (the lpips package's slice boundaries 4, 9, 16, 23, 30, minus one).
_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

# ImageNet statistics re-expressed for inputs in [-1, 1] (lpips `ScalingLayer`).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_random_warned = False


def torchmetrics_heads_path() -> Path:
    """Path of the LPIPS v0.1 VGG linear heads shipped inside torchmetrics (found without importing it)."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LPIPS heads: torchmetrics is not installed; pass heads=<path to vgg.pth>")
    return Path(spec.submodule_search_locations[0]) / "functional" / "image" / "lpips_models" / "vgg.pth"


def _load_state(path: Path, what: str, hint: str) -> dict[str, Tensor]:
    """torch.load a plain tensor dict with weights_only=True (never runs pickled code)."""
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS {what} '{path}' not found: {hint}")
    return load_weights_only(path)  # a pickle that would run code: one-line UnsafeCheckpointError


class VGG16Features(nn.Module):
    """VGG16 conv stack with torchvision's `features` indices, returning relu1_2 … relu5_3 activations."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # Not in-place (torchvision uses inplace=True): the tapped activations must stay intact.
                layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU()]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)  # indices 0..29: truncated after relu5_3, final pool dropped
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init as torchvision's VGG (kaiming-normal fan_out, zero bias)."""
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)  # type: ignore[arg-type]  # our convs all have a bias

    def load_torchvision(self, path: str | Path) -> None:
        """Load the `features.*` keys of a torchvision VGG16 file (strict for those; `classifier.*` ignored)."""
        path = Path(path)
        hint = (f"download torchvision's vgg16-397923af.pth ({VGG16_URL}) and set "
                f"model.lpips.backbone=<path>, or set model.lpips.backbone=random / model.loss.perceptual_weight=0")
        state = _load_state(path, "backbone", hint)
        prefix = "features."
        feats = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.features.load_state_dict(feats, strict=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B,3,H,W) ImageNet-normalised → [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]."""
        out: list[Tensor] = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out


def normalize_channels(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise each spatial feature vector over channels (lpips `normalize_tensor`, eps outside sqrt)."""
    norm = torch.sqrt(torch.sum(feat * feat, dim=1, keepdim=True))
    return feat / (norm + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance: inputs in [-1, 1], (B,3,H,W) × 2 → (B,) (Zhang et al. 2018, Eq. 1)."""

    shift: Tensor
    scale: Tensor

    def __init__(self, backbone: str | Path = "random", heads: str | Path | None = None) -> None:
        super().__init__()
        self.net = VGG16Features()
        if str(backbone) == "random":
            _warn_random_once()
        else:
            self.net.load_torchvision(backbone)
        # 1×1 convs without bias = lpips `NetLinLayer` (its dropout is a no-op in eval and omitted).
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self._load_heads(torchmetrics_heads_path() if heads is None else Path(heads))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _load_heads(self, path: Path) -> None:
        """Map lpips keys `lin{i}.model.1.weight` to `heads.{i}.weight`."""
        state = _load_state(path, "heads", "pass heads=<lpips v0.1 vgg.pth> or install torchmetrics")
        mapped = {f"{i}.weight": state[f"lin{i}.model.1.weight"] for i in range(len(LPIPS_CHANNELS))}
        self.heads.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode: LPIPS is a fixed metric, never trained (a parent's .train() must not change it)."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample LPIPS distance, shape (B,); gradients flow to the inputs, not the parameters."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        dist = x.new_zeros(x.shape[0])
        for head, a, b in zip(self.heads, fx, fy):
            diff = (normalize_channels(a) - normalize_channels(b)) ** 2
            dist = dist + head(diff).mean(dim=(1, 2, 3))  # spatial average of the 1-channel map
        return dist


def _warn_random_once() -> None:
    """Warn (once per process) that a random backbone gives non-perceptual distances."""
    global _random_warned
    if not _random_warned:
        _random_warned = True
        warnings.warn("LPIPS backbone='random': distances are not perceptual (tests / CPU demo only); "
                      f"use torchvision's vgg16-397923af.pth ({VGG16_URL}) for real training", stacklevel=3)
