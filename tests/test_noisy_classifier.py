"""ADM's noise-aware classifier (Dhariwal & Nichol 2021, sec. 4): the U-Net's own encoder half with a pooled head,
its LightningModule and `experiment=classifier_demo` (a real Trainer fit lowers its loss), its safetensors export,
and `sample.py classifier=... classifier_scale=...` on tiny random weights, with its one-line refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, compose_train, make_tiny_vae_export
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from test_unet import randomized

from ldmlab.lit.noisy_classifier import NoisyClassifierModule, classifier_metadata, load_classifier
from ldmlab.nn.noisy_classifier import NoisyClassifier
from ldmlab.nn.unet import UNetEncoder, UNetModel
from ldmlab.sample import sample
from ldmlab.validate import check_config, sample_problems

pytestmark = pytest.mark.usefixtures("one_thread")
ENCODER = {"in_channels": 4, "model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": [1, 2],
           "attention_levels": (1,), "num_heads": 2, "norm_groups": 8, "resnet_time_scale_shift": "scale_shift",
           "resblock_updown": True}
TINY_CLASSIFIER = ["model.classifier.model_channels=32", "model.classifier.head_dim=16", "model.classifier.norm_groups=8"]
TINY_LDM = ["model=unet_small", "model.unet.model_channels=32", "model.unet.channel_mult=[1,2]",
            "model.unet.attention_levels=[1]", "model.unet.norm_groups=8", "model.diffusion.sampler.num_steps=3"]


def trainer(tmp_path: Path, steps: int, **kw: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.fixture(scope="module")
def sharp_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random f4 VAE export whose posterior is nearly its mean (logvar bias −12): latents keep the crops apart."""
    path = make_tiny_vae_export(tmp_path_factory.mktemp("vae") / "vae.safetensors")
    from safetensors import safe_open

    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    sd["quant_conv.bias"][4:] = -12.0
    save_file(sd, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- the network


def test_classifier_is_the_unet_encoder_half() -> None:
    """The classifier's encoder is UNetEncoder: a U-Net's time_embed/input_blocks/middle_block weights load into it
    strictly and give the U-Net's middle-block output; the head pools any latent size to K logits."""
    clf = NoisyClassifier(5, **ENCODER)
    assert isinstance(clf.encoder, UNetEncoder) and not isinstance(clf.encoder, UNetModel)
    unet = randomized(UNetModel(**ENCODER, context_dim=None))
    half = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in ("time_embed", "input_blocks",
                                                                            "middle_block")}
    clf.encoder.load_state_dict(half, strict=True)
    seen: dict[str, torch.Tensor] = {}
    unet.middle_block.register_forward_hook(lambda m, i, out: seen.setdefault("h", out))
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([3, 800])
    with torch.no_grad():
        unet(x, t)
        assert torch.equal(clf.encoder(x, t), seen["h"])
        assert clf(x, t).shape == (2, 5) and clf(torch.randn(1, 4, 16, 16), torch.tensor([1])).shape == (1, 5)
    assert clf.config == {"num_classes": 5, **{k: list(v) if isinstance(v, tuple) else v for k, v in ENCODER.items()},
                          "head_dim": None, "transformer_depth": 1, "dropout": 0.0, "use_linear_projection": False,
                          "noise_level_embed": False}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_classes": 1}, r"^num_classes=1 must be an integer >= 2"),
    ({"num_classes": 3, "context_dim": 77}, r"^context_dim=77 is not a classifier argument"),
    ({"num_classes": 3, "head_dim": 5, "num_heads": None}, r"^head_dim=5 does not divide the attention width 32"),
])
def test_bad_classifier_arguments_are_one_line(kwargs: dict[str, Any], match: str) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=match) as info:
        NoisyClassifier(**{**ENCODER, **kwargs})
    assert "\n" not in str(info.value)


def test_classifier_config_is_checked_at_config_time(tmp_path: Path, sharp_vae: Path) -> None:
    base = ["experiment=classifier_demo", "data=demo", "data.root=null",
            f"model.vae={{_target_:ldmlab.convert.load.load_vae,path:{sharp_vae}}}"]
    assert check_config(compose_train(base, tmp_path)) == []
    found = check_config(compose_train([*base, "model.classifier.head_dim=48"], tmp_path))
    assert found == [("model.classifier: head_dim=48 does not divide the attention width 128 (model_channels x "
                     "channel_mult[1]): choose head_dim dividing it, e.g. 8")]
    found = check_config(compose_train([*base, "model.classifier.in_channels=3"], tmp_path))
    assert found == [(f"model.classifier.in_channels=3 but the VAE at model.vae.path={sharp_vae} has 4-channel "
                     "latents: set model.classifier.in_channels=4")]
    found = check_config(compose_train([*base, "model.classifier.channel_mult=[1,1,1,1,1]",
                                        "model.classifier.attention_levels=[1]"], tmp_path))
    assert len(found) == 1 and found[0].startswith("model.classifier.channel_mult=[1, 1, 1, 1, 1] downsamples H and W "
                                                   "by 16, but the latent side (data.source.crop_size=32 / VAE factor "
                                                   "4) is 8")


# ---------------------------------------------------------------- training and export


def test_experiment_fit_on_the_demo_crops_lowers_the_loss(tmp_path: Path, sharp_vae: Path) -> None:
    """`experiment=classifier_demo` (here on the demo crops through a VAE, a low-noise schedule so 40 steps show):
    Hydra composition, a real Lightning fit; val/loss at fixed noise falls; the export rebuilds the classifier."""
    cfg = compose_train(["experiment=classifier_demo", "data=demo", "data.root=null", "data.num_workers=0",
                         f"model.vae={{_target_:ldmlab.convert.load.load_vae,path:{sharp_vae}}}", *TINY_CLASSIFIER,
                         "data.batch_size=32", "optimizer.lr=2e-3", "lr_scheduler.warmup_steps=1",
                         "model.diffusion.noise_schedule.beta_start=1e-5", "model.diffusion.noise_schedule.beta_end=1e-4"], tmp_path)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer),
                                     lr_scheduler=hydra.utils.instantiate(cfg.lr_scheduler))
    data = hydra.utils.instantiate(cfg.data, _convert_="all")
    fit = trainer(tmp_path, 40, limit_val_batches=4, val_check_interval=40, num_sanity_val_steps=0)
    before = fit.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    fit.fit(module, datamodule=data)
    after = float(fit.callback_metrics["val/loss"])
    assert after < before - 0.1, (before, after)
    assert "train/acc" in fit.callback_metrics and 0 <= float(fit.callback_metrics["val/acc"]) <= 1
    [path] = module.export_weights(tmp_path / "export")
    meta = classifier_metadata(path)
    assert path.name == "classifier.safetensors" and meta["config"] == module.classifier.config
    assert meta["latent_shape"] == (4, 8, 8) and meta["noise_path"] == "scaled_linear/T=1000"
    assert meta["latent_scale"] == pytest.approx(float(module.latent_scale))
    loaded, x, t = load_classifier(path), torch.randn(2, 4, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), module.classifier.eval()(x, t))
    assert not any(p.requires_grad for p in loaded.parameters())


# ---------------------------------------------------------------- sample.py classifier=


class _Latents(torch.utils.data.Dataset):
    def __init__(self, side: int = 8, classes: int = 10) -> None:
        self.side, self.classes = side, classes

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"latent": torch.randn(4, self.side, self.side, generator=torch.Generator().manual_seed(i)),
                "label": i % self.classes}


def _export_classifier(tmp_path: Path, name: str, extra: list[str], side: int = 8, classes: int = 10) -> Path:
    """A tiny classifier fitted one step on random latents (its latent shape and scale recorded), exported."""
    cfg = compose_train(["experiment=classifier_demo", *TINY_CLASSIFIER, *extra], tmp_path)
    torch.manual_seed(1)
    module = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))
    trainer(tmp_path, 1, limit_val_batches=0).fit(module, torch.utils.data.DataLoader(_Latents(side, classes), batch_size=8))
    return module.export_weights(tmp_path / name)[0]


@pytest.fixture(scope="module")
def guided_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny class-conditional LDM checkpoint and classifiers that fit it or not, all on random weights."""
    tmp = tmp_path_factory.mktemp("guided")
    vae = make_tiny_vae_export(tmp / "vae.safetensors")
    cfg = compose_train([*TINY_LDM, f"model.vae.path={vae}"], tmp)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))
    module.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # as ldmlab.fit.build stores it
    fit = trainer(tmp, 1, limit_val_batches=0)
    fit.fit(module, torch.utils.data.DataLoader(_Latents(), batch_size=8))
    fit.save_checkpoint(tmp / "last.ckpt")
    return {"ckpt": tmp / "last.ckpt", "fits": _export_classifier(tmp, "fits", []),
            "five": _export_classifier(tmp, "five", ["model.classifier.num_classes=5"], classes=5),
            "big": _export_classifier(tmp, "big", [], side=16),
            "cosine": _export_classifier(tmp, "cosine", ["model/diffusion/noise_schedule=cosine"]),
            "scaled": _export_classifier(tmp, "scaled", ["model.latent_scale=3.0"])}


def _sample_cfg(ckpt: Path, out: Path, **extra: object) -> Any:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"out={out}", "n=2", "steps=3", "device=cpu",
                                            *[f"{k}={v}" for k, v in extra.items()]])


def test_sample_py_with_a_classifier(guided_setup: dict[str, Path], tmp_path: Path) -> None:
    """classifier_scale=0 draws exactly the unguided images; a large scale changes them; CFG composes."""
    ckpt, clf = guided_setup["ckpt"], guided_setup["fits"]
    assert sample_problems(_sample_cfg(ckpt, tmp_path / "x.png", classifier=clf, classifier_scale=4)) == []

    def draw(name: str, **extra: object) -> np.ndarray:
        return np.asarray(Image.open(sample(_sample_cfg(ckpt, tmp_path / f"{name}.png", **extra))))

    plain = draw("plain", guidance=2)
    assert np.array_equal(draw("zero", guidance=2, classifier=clf, classifier_scale=0), plain)
    guided = draw("guided", guidance=2, classifier=clf, classifier_scale=500, label=3)
    assert guided.shape == plain.shape and not np.array_equal(guided, plain)


def test_sample_py_refuses_a_classifier_that_does_not_fit(guided_setup: dict[str, Path], tmp_path: Path) -> None:
    ckpt, out = guided_setup["ckpt"], tmp_path / "x.png"

    def problems(**extra: object) -> list[str]:
        return sample_problems(_sample_cfg(ckpt, out, **extra))

    assert problems(classifier=tmp_path / "nothere.safetensors") == [
        (f"classifier={tmp_path / 'nothere.safetensors'} not found: give a classifier run's "
         "export/classifier.safetensors (python train.py experiment=classifier_demo)")]
    assert problems(classifier=guided_setup["five"]) == [
        (f"classifier={guided_setup['five']} has 5 classes but {ckpt} has model.conditioner.num_classes=10: train "
         "the classifier on the LDM's classes (model.classifier.num_classes=10)")]
    assert problems(classifier=guided_setup["big"]) == [
        (f"classifier={guided_setup['big']} was trained on (4, 16, 16) latents but {ckpt} samples (4, 8, 8): train "
         "the classifier on latents of this shape")]
    assert problems(classifier=guided_setup["cosine"]) == [
        (f"classifier={guided_setup['cosine']} was trained on noise path cosine/T=1000 but {ckpt} samples "
         "scaled_linear/T=1000: train it with the LDM's model/diffusion/noise_schedule and model/diffusion/prediction")]
    [line] = problems(classifier=guided_setup["scaled"])
    assert line.startswith(f"classifier={guided_setup['scaled']} saw latents scaled by 3.00000 but {ckpt} uses ")
    assert problems(classifier=guided_setup["fits"], classifier_scale=-1) == [
        "classifier_scale=-1 must be a number >= 0 (ADM: 1 to 10; 0 = no guidance)"]
    ldm_line = (f"label=12 is not a class of {ckpt}: give label=<0..9> (model.conditioner.num_classes=10), or "
                "label=null to cycle through them")
    assert problems(classifier=guided_setup["fits"], label=12) == [
        ldm_line, f"label=12 is not a class of classifier={guided_setup['fits']}: give label=<0..9>"]


def test_sample_py_needs_a_label_to_guide_a_text_model(guided_setup: dict[str, Path], tmp_path: Path,
                                                        tiny_assets: dict[str, Path]) -> None:
    """A text-conditioned LDM has no class label of its own: label= names the classifier's class, else one line."""
    stored = compose_train(["model=unet_sd15", "data=demo", f"model.vae.path={tiny_assets['vae']}",
                            f"model.conditioner.path={tiny_assets['clip768']}"], tmp_path)
    ckpt = tmp_path / "text.ckpt"
    torch.save({"ldmlab_config": OmegaConf.to_yaml(stored, resolve=True), "latent_shape": [4, 8, 8],
                "state_dict": {}}, ckpt)
    clf, out = guided_setup["fits"], tmp_path / "x.png"
    assert sample_problems(_sample_cfg(ckpt, out, classifier=clf, prompt="'a cat'")) == [
        (f"classifier={clf} guides towards a class label, but {ckpt} is text-conditional: give label=<0..9> (the "
         "classifier's class for every image)")]
    assert sample_problems(_sample_cfg(ckpt, out, classifier=clf, prompt="'a cat'", label=4)) == []
    assert sample_problems(_sample_cfg(ckpt, out, prompt="'a cat'", label=4))[0].startswith("label=4 but")


def test_module_refuses_labels_outside_its_classes(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=classifier_demo", *TINY_CLASSIFIER, "model.classifier.num_classes=3"], tmp_path)
    module: NoisyClassifierModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    batch = {"latent": torch.randn(2, 4, 8, 8), "label": torch.tensor([0, 7])}
    with pytest.raises(ValueError, match=r"^batch labels \[0, 7\] outside \[0, 3\): set model.classifier.num_classes"):
        module.classification(batch, torch.Generator().manual_seed(0))
