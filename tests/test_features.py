"""Feature networks for the metrics: random weights saved and reloaded (nothing can be downloaded here).

The FID Inception-v3 is pinned to pytorch-fid 0.3.0's own numbers: its `InceptionV3([3])` (torchvision's Inception3
patched by `fid_inception_v3`) was run in float64 on the seeded weights and image below, outside this suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldmlab.evaluation.clip import clip_name
from ldmlab.evaluation.features import FeatureNetwork, build_feature_network
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.classifier import SmallCNN
from ldmlab.nn.inception import FIDInceptionV3
from ldmlab.utils.stand_ins import make_tiny_clip

# pytorch-fid's `pool3` features [:, :4], their means, and fc-weight-only logits [:, :3] for `seeded_inception`
# weights and a seeded (2, 3, 64, 48) image in [0, 1] (resized to 299 inside, as with resize_input=True)
REF_FEATURES = [[5.959245754814711, 8.812931288801364, 0.5163109296322009, 0.1387102840226779],
                [6.264062982802936, 8.947425869342045, 0.6368304625057986, 0.16960872878696243]]
REF_FEATURE_MEAN = [5.23173730832384, 5.273641992593436]
REF_LOGITS = [[27.837851054065084, 85.1813909870065, -74.2985219317326],
              [26.759253841408512, 85.49113893251032, -74.32037857151133]]
# keys and shapes of pt_inception-2015-12-05-6726825d.pth (torchvision Inception3, aux_logits=False, 1008 classes)
REF_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_mean": (192,),
            "Mixed_5b.branch_pool.bn.running_var": (32,), "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
            "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
            "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3), "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
            "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1), "Mixed_7c.branch_pool.bn.bias": (192,),
            "fc.weight": (1008, 2048), "fc.bias": (1008,)}
REF_PARAMS = 23_850_960  # torchvision's inception_v3 (27,161,264) - AuxLogits (3,326,696) + 8 more fc outputs (16,392)
REF_BASIC_CONVS = 94  # BasicConv2d modules: 6 state entries each (conv.weight, bn.{weight,bias,running_*,num_batches})


def seeded_inception() -> dict[str, torch.Tensor]:
    """Deterministic He-scaled conv weights and non-trivial BatchNorm statistics, in state-dict order."""
    g, state = torch.Generator().manual_seed(0), {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
            continue
        if key.endswith("conv.weight"):
            t = torch.randn(value.shape, generator=g, dtype=torch.float64) * (2 / value[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            t = torch.rand(value.shape, generator=g, dtype=torch.float64) + 0.5
        else:
            t = torch.randn(value.shape, generator=g, dtype=torch.float64) * 0.1
        state[key] = t.float()
    return state


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(seeded_inception(), path)
    return path


def one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"


def check_frozen(net: torch.nn.Module, num_features: int, images: torch.Tensor) -> torch.Tensor:
    """The FeatureNetwork contract: eval, frozen, (B, num_features) float32, deterministic."""
    assert isinstance(net, FeatureNetwork) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training, "a feature network stays in eval mode"
    out = net(images)
    assert out.shape == (len(images), num_features) == (len(images), net.num_features) and out.dtype == torch.float32
    assert torch.equal(out, net(images))
    return out


def test_inception_state_dict_is_pytorch_fids() -> None:
    state = FIDInceptionV3().state_dict()
    assert {k: tuple(state[k].shape) for k in REF_KEYS} == REF_KEYS
    assert len(state) == 6 * REF_BASIC_CONVS + 2
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == REF_PARAMS


def test_inception_matches_pytorch_fid(inception_file: Path) -> None:
    net = build_feature_network("inception", str(inception_file))
    assert net.name == "inception-v3-fid" and net.has_logits
    x01 = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    images = (2 * x01 - 1).float()
    features, logits = net.features_and_logits(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and logits.dtype == torch.float32
    torch.testing.assert_close(features[:, :4], torch.tensor(REF_FEATURES).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features.mean(1), torch.tensor(REF_FEATURE_MEAN).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:, :3], torch.tensor(REF_LOGITS).float(), rtol=1e-4, atol=1e-3)
    # IS logits leave fc's bias out (Salimans et al. 2016's code; torch-fidelity's `logits_unbiased`)
    torch.testing.assert_close(net.logits(images), features @ net.fc.weight.T)
    assert net.fc.bias.abs().sum() > 0
    torch.testing.assert_close(check_frozen(net, 2048, images[:1]), features[:1], rtol=1e-5, atol=1e-5)


def test_inception_resizing(inception_file: Path) -> None:
    net = build_feature_network("inception", str(inception_file))
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    assert torch.equal(net.preprocess(x), x), "299 px passes through unchanged"
    for x01 in (torch.rand(1, 3, 40, 72), torch.rand(1, 3, 400, 320)):  # enlarge, shrink
        # pytorch-fid: bilinear without antialiasing on [0, 1], then 2x - 1: the input that resizing [-1, 1] gives
        ref = 2 * F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) - 1
        torch.testing.assert_close(net.preprocess(2 * x01 - 1), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError) as error:
        net(torch.zeros(1, 1, 32, 32))
    one_line(error, "(B, 3, H, W)")


def test_inception_checkpoint_variants(tmp_path: Path, inception_file: Path) -> None:
    state = torch.load(inception_file, weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-1.0 torch files
    torch.save(old, tmp_path / "old.pth")
    build_feature_network("inception", str(tmp_path / "old.pth"))
    save_file(old, str(tmp_path / "inception.safetensors"))
    build_feature_network("inception", str(tmp_path / "inception.safetensors"))
    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as error:
        build_feature_network("inception", str(tmp_path / "other.pth"))
    one_line(error, "features.path=", "not the FID Inception weights", "missing keys")


@pytest.mark.parametrize(("name", "needles"), [
    ("inception", ["pt_inception-2015-12-05-6726825d.pth", "github.com/mseitzer/pytorch-fid/releases",
                   "torch-fidelity"]),
    ("clip", ['CLIPModel.from_pretrained("openai/clip-vit-large-patch14").save_pretrained(DIR)']),
    ("classifier", ["classifier.safetensors", "classifier stage"]),
    ("vae", ["model.vae=null"]),
])
def test_missing_weights_one_line(tmp_path: Path, name: str, needles: list[str]) -> None:
    with pytest.raises(FileNotFoundError) as error:
        build_feature_network(name)
    one_line(error, "features.path", f"features.name={name}", *needles)
    with pytest.raises(FileNotFoundError) as error:
        build_feature_network(name, str(tmp_path / "absent.pth"))
    one_line(error, f"features.path={tmp_path / 'absent.pth'}", "not found", *needles)


def test_unknown_name_one_line() -> None:
    with pytest.raises(ValueError) as error:
        build_feature_network("dino")
    one_line(error, "features.name='dino'", "classifier, clip, inception, vae")


VAE_CONFIG = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "embed_dim": 3,
              "norm_groups": 8, "attn_levels": [], "mid_attention": True}


def test_vae_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    net = build_feature_network("vae", autoencoder=vae)
    assert net.name.startswith("vae-encoder:") and not net.has_logits
    images = torch.rand(3, 3, 16, 20) * 2 - 1
    features = check_frozen(net, 32 + 2 * 3, images)  # mid block width 32, mean and std of 3 latent channels
    mean = vae.encode(images).mode()
    torch.testing.assert_close(features[:, 32:], torch.cat([mean.mean((2, 3)), mean.std((2, 3))], 1))
    assert net(torch.rand(2, 3, 17, 15) * 2 - 1).shape == (2, 38), "sizes not divisible by f are resized"
    export = tmp_path / "vae.safetensors"  # an ldmlab export: architecture in the metadata
    save_file(vae.state_dict(), str(export), metadata={"config": json.dumps(vae.config)})
    reloaded = build_feature_network("vae", str(export))
    assert reloaded.name == net.name
    torch.testing.assert_close(reloaded(images), features)
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.01)
    assert build_feature_network("vae", autoencoder=vae).name != net.name, "the name follows the weights"
    with pytest.raises(ValueError) as error:
        net.logits(images)
    one_line(error, net.name, "no class logits")


def test_classifier_features(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    cnn = SmallCNN(num_classes=3, width=8, depth=2).eval()
    path = tmp_path / "classifier.safetensors"  # as the demo pipeline's classifier stage writes it
    save_file(cnn.state_dict(), str(path), metadata={"config": OmegaConf.to_yaml(OmegaConf.create(cnn.config))})
    net = build_feature_network("classifier", str(path))
    assert net.name == "classifier:classifier" and net.has_logits
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    check_frozen(net, 16, images)
    torch.testing.assert_close(net.logits(images), cnn(images))
    sized = build_feature_network("classifier", str(path), resolution=8)
    torch.testing.assert_close(sized.logits(images), cnn(F.interpolate(images, size=(8, 8), mode="bilinear",
                                                                       antialias=True)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel + tokenizer + 32 px image processor, saved as `save_pretrained` does."""
    from transformers import CLIPConfig, CLIPModel

    path = make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")  # tokenizer (and a text model, replaced)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**tower, "vocab_size": 23, "max_position_embeddings": 77, "bos_token_id": 21, "eos_token_id": 22,
            "pad_token_id": 22}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8},
                         projection_dim=16)).save_pretrained(str(path))
    pil_processor()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    return path


def pil_processor() -> type:
    """transformers' PIL CLIP image processor (CLIPImageProcessorPil in v5, CLIPImageProcessor before)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def test_clip_towers(clip_dir: Path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    net = build_feature_network("clip", str(clip_dir))
    assert net.name == "clip-vit-w32-8-32px:tiny-clip" and not net.has_logits
    large = SimpleNamespace(hidden_size=1024, patch_size=14, image_size=224)  # openai/clip-vit-large-patch14
    assert clip_name(large, clip_dir.parent / "clip-l") == "clip-vit-l14:clip-l"
    pixels = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    check_frozen(net, 16, images)
    texts = ["lower newer", "wider lowest low"]
    ref = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tokens = CLIPTokenizer.from_pretrained(str(clip_dir))(texts, padding=True, return_tensors="pt")
    inputs = pil_processor().from_pretrained(str(clip_dir))(images=list(pixels), return_tensors="pt")
    with torch.no_grad():
        out = ref(**tokens, pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(net.text_embeds(texts), out.text_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.image_embeds(images), out.image_embeds, rtol=0, atol=0.02)  # PIL's uint8
    assert torch.allclose(net.image_embeds(images).norm(dim=-1), torch.ones(2))


def test_clip_preprocessing_equals_transformers() -> None:
    from skimage import data

    from ldmlab.evaluation.clip import ClipPreprocess

    processor, preprocess = pil_processor()(), ClipPreprocess()  # OpenAI's: 224 px, bicubic, center crop
    chelsea, astronaut = data.chelsea(), data.astronaut()
    for pixels in (chelsea, chelsea[::6, ::6], astronaut[:301, :257]):  # shrink, enlarge, odd crop offsets
        ref = torch.from_numpy(np.asarray(processor(images=pixels, return_tensors="np")["pixel_values"][0]))
        mine = preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
        assert mine.shape == ref.shape == (3, 224, 224)
        # one uint8 level is 1/255/std ≈ 0.015: PIL rounds the resized image, this keeps floats
        assert (mine - ref).abs().max() < 0.02 and (mine - ref).abs().mean() < 0.006


def test_clip_without_tokenizer(tmp_path: Path, clip_dir: Path) -> None:
    for file in ("config.json", "model.safetensors"):
        (tmp_path / file).write_bytes((clip_dir / file).read_bytes())
    net = build_feature_network("clip", str(tmp_path))  # image features need no tokenizer or processor file
    assert net.preprocess.crop == (32, 32) and net(torch.zeros(1, 3, 64, 64)).shape == (1, 16)
    with pytest.raises(FileNotFoundError) as error:
        net.text_embeds(["low"])
    one_line(error, "no tokenizer", "CLIPProcessor")
    with pytest.raises(FileNotFoundError) as error:
        build_feature_network("clip", str(tmp_path / "model.safetensors"))
    one_line(error, "features.path=", "no config.json", "openai/clip-vit-large-patch14")
