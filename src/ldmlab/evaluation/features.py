"""Feature networks for sample-quality metrics, built by name from local weights (nothing is downloaded).

| name         | network                                                | features | logits |
| inception    | FID Inception-v3 (Heusel et al. 2017), pool3           | 2048     | 1008   |
| clip         | CLIP image tower (Radford et al. 2021), projection     | D        | —      |
| vae          | the run's VAE encoder: pooled mid block + latent stats | C + 2z   | —      |
| classifier   | the demo's SmallCNN judge, pooled penultimate layer    | C        | classes|

Every network takes (B, 3, H, W) float images in [-1, 1], resizes and normalises them itself, and returns float32.
Its `name` keys feature caches and is printed next to every number, so a report says which network made it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.classifier import SmallCNN
from ldmlab.nn.inception import FIDInceptionV3
from ldmlab.nn.safe_load import load_weights_only

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE = (f"download {INCEPTION_FILE} from github.com/mseitzer/pytorch-fid/releases (tag fid_weights: "
                    "TensorFlow's 2015-12-05 Inception graph, the network torch-fidelity uses too) on a machine "
                    "with internet")


@runtime_checkable
class FeatureNetwork(Protocol):
    """What a metric needs from a feature network (frozen, eval mode; keep it out of the LightningModule)."""

    name: str
    num_features: int
    has_logits: bool

    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] → (B, num_features) float32."""
        ...

    def logits(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] → (B, C) class logits (only when has_logits)."""
        ...


def no_logits(name: str) -> ValueError:
    """The one-line error of `logits` on a network without a classifier head."""
    return ValueError(f"feature network {name} has no class logits: the Inception Score needs "
                      "features.name=inception (or classifier on the demo)")


def fit_resolution(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (antialiased when shrinking) resize of (B, 3, H, W) to `size`; unchanged if already that size."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images have shape {tuple(images.shape)}: expected (B, 3, H, W) in [-1, 1]")
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def weights_fingerprint(module: nn.Module) -> str:
    """First 8 hex digits of the SHA-256 of a module's tensors: a cache key that changes with the weights."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:8]


class VAEEncoderFeatures(nn.Module):
    """A KL-VAE encoder as a feature network: spatial means of the mid block and of the posterior mean and std.

    The posterior mean alone is `embed_dim` (4) channels, too few numbers for a Fréchet distance to tell image
    sets apart; the mid block (after the last down level: 512 channels for SD's kl-f8) is the encoder's widest,
    most abstract layer, pooled over space as Inception's pool3 is. The mean and standard deviation over space of
    each latent channel of the posterior mean are appended (they track colour and contrast shifts). Features:
    (B, C_mid + 2·embed_dim). The autoencoder is shared, not copied (an LDM run's VAE is frozen already).
    """

    has_logits = False

    def __init__(self, autoencoder: AutoencoderKL, resolution: int | None = None) -> None:
        super().__init__()
        f = autoencoder.downsample_factor
        if resolution is not None and (resolution < f or resolution % f):
            raise ValueError(f"features.resolution={resolution} is not a positive multiple of the VAE's "
                             f"downsample factor {f}")
        self.autoencoder, self.resolution = autoencoder, resolution
        mid_channels = autoencoder.encoder.norm_out.num_channels
        self.num_features = mid_channels + 2 * autoencoder.embed_dim
        self.name = f"vae-encoder:{weights_fingerprint(autoencoder.encoder)}"

    def train(self, mode: bool = True) -> VAEEncoderFeatures:
        """Always eval (a feature network is frozen)."""
        return super().train(False)

    def _size(self, images: Tensor) -> tuple[int, int]:
        """`resolution`², or (H, W) rounded down to multiples of the downsample factor."""
        if self.resolution is not None:
            return self.resolution, self.resolution
        f = self.autoencoder.downsample_factor
        h, w = images.shape[-2:]
        return max(f, h // f * f), max(f, w // f * f)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, C_mid + 2·embed_dim) float32."""
        x = fit_resolution(images, self._size(images)).to(self.autoencoder.encoder.conv_in.weight.dtype)
        captured: list[Tensor] = []
        hook = self.autoencoder.encoder.mid.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            mean = self.autoencoder.encode(x).mode()  # (B, embed_dim, H/f, W/f)
        finally:
            hook.remove()
        mid = captured[0].mean(dim=(2, 3))  # (B, C_mid)
        return torch.cat([mid, mean.mean(dim=(2, 3)), mean.std(dim=(2, 3))], dim=1).float()

    def logits(self, images: Tensor) -> Tensor:
        """A VAE encoder has no class logits."""
        raise no_logits(self.name)


class ClassifierFeatures(nn.Module):
    """The demo's SmallCNN judge: globally pooled last conv block (B, C) and its class logits (B, num_classes)."""

    has_logits = True

    def __init__(self, classifier: SmallCNN, name: str, resolution: int | None = None) -> None:
        super().__init__()
        self.classifier, self.name, self.resolution = classifier, name, resolution
        linear = classifier.head[-1]
        assert isinstance(linear, nn.Linear), "SmallCNN's head ends in its linear classifier"
        self.num_features, self.num_classes = linear.in_features, linear.out_features

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Always eval (a feature network is frozen; BatchNorm keeps its statistics)."""
        return super().train(False)

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] → (B, C) pooled features and (B, num_classes) logits, from one pass."""
        size = (self.resolution, self.resolution) if self.resolution else (images.shape[-2], images.shape[-1])
        x = fit_resolution(images, size).to(next(self.classifier.parameters()).dtype)
        pool, flatten, dropout, linear = self.classifier.head  # SmallCNN's head, dropout inactive in eval
        features = flatten(pool(self.classifier.features(x)))
        return features.float(), linear(dropout(features)).float()

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, C) float32 pooled penultimate features."""
        return self.features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, num_classes) float32 class logits."""
        return self.features_and_logits(images)[1]


def _require(path: str | Path | None, name: str, expected: str, source: str) -> Path:
    """`path` as a Path if it exists; otherwise one line naming features.path, the expected file and its source."""
    if path is None:
        raise FileNotFoundError(f"features.name={name} needs features.path: {expected}; {source}")
    if not Path(path).exists():
        raise FileNotFoundError(f"features.path={path} not found: features.name={name} expects {expected}; {source}")
    return Path(path)


def build_inception(path: str | Path | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 with pytorch-fid's weights file, loaded strictly (weights-only unpickling)."""
    path = _require(path, "inception", f"the file {INCEPTION_FILE}", INCEPTION_SOURCE)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_weights_only(path)
    net = FIDInceptionV3()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"features.path={path} is not the FID Inception weights ({INCEPTION_FILE}): "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    return net


def build_vae(path: str | Path | None = None, autoencoder: AutoencoderKL | None = None,
              resolution: int | None = None) -> VAEEncoderFeatures:
    """Encoder features of the run's VAE (`autoencoder`), or of the VAE at `path` (any layout load_vae reads)."""
    if autoencoder is None:
        from ldmlab.convert.load import load_vae

        expected = "a VAE (VAEModule .ckpt, exported vae.safetensors, SD checkpoint or diffusers directory)"
        source = ("a run without a VAE (model.vae=null, trained on cached latents) must name the VAE that made "
                  "its latents")
        autoencoder = load_vae(_require(path, "vae", expected, source))
    return VAEEncoderFeatures(autoencoder, resolution)


def build_classifier(path: str | Path | None = None, resolution: int | None = None) -> ClassifierFeatures:
    """The demo judge from the classifier stage's classifier.safetensors (architecture in its metadata)."""
    from omegaconf import OmegaConf
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _require(path, "classifier", "a SmallCNN classifier.safetensors",
                    "the demo pipeline's classifier stage writes it into its output directory")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"features.path={path} has no SmallCNN config in its metadata: give the "
                         "classifier.safetensors written by the demo pipeline's classifier stage")
    config: Any = OmegaConf.to_container(OmegaConf.create(metadata["config"]))
    cnn = SmallCNN(**config)
    cnn.load_state_dict(load_file(str(path)))
    return ClassifierFeatures(cnn, f"classifier:{path.stem}", resolution)


def build_clip(path: str | Path | None = None) -> nn.Module:
    """CLIP towers from a local transformers CLIPModel directory (see ldmlab.evaluation.clip)."""
    from ldmlab.evaluation.clip import CLIP_SOURCE, ClipTowers

    directory = _require(path, "clip", "a transformers CLIPModel directory (config.json + weights)", CLIP_SOURCE)
    return ClipTowers.from_pretrained(directory)


FEATURE_NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "inception": build_inception, "clip": build_clip, "vae": build_vae, "classifier": build_classifier,
}


def build_feature_network(name: str, path: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """A frozen, eval-mode feature network by registry name; kwargs go to its builder (autoencoder, resolution)."""
    if name not in FEATURE_NETWORKS:
        raise ValueError(f"features.name={name!r} is not a feature network: choose one of "
                         f"{', '.join(sorted(FEATURE_NETWORKS))}")
    return FEATURE_NETWORKS[name](path, **kwargs).eval().requires_grad_(False)
