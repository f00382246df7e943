"""LatentDiffusionModule in-process: text conditioning through a saved/reloaded random CLIP, precomputed
embeddings, latents from the batch, configuration errors."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldmlab.convert.load import load_vae
from ldmlab.diffusion import Diffusion, EpsPrediction, VPrediction, ddim_sample, scaled_linear
from ldmlab.lit.conditioning import ClassConditioner, TextConditioner
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.nn.unet import UNetModel

PROMPTS = ["lower", "newer wider", "lowest", ""]


class Batches(Dataset):
    """Images with prompts and labels, or raw latents (the wds_latents contract)."""

    def __init__(self, kind: str, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.kind, self.images = kind, torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.latents = torch.randn(n, 4, 4, 4, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"label": i % 3, "text": PROMPTS[i % len(PROMPTS)]}
        item.update({"latent": self.latents[i]} if self.kind == "latent" else {"image": self.images[i]})
        return item


def small_unet(**kw) -> UNetModel:
    torch.manual_seed(0)
    config = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
              "num_heads": 4, "context_dim": None}
    return UNetModel(**{**config, **kw})


def module(conditioner, unet, vae=None, **kw) -> LatentDiffusionModule:
    diffusion = Diffusion(EpsPrediction(), scaled_linear(), sampler=partial(ddim_sample, num_steps=4))
    return LatentDiffusionModule(unet=unet, diffusion=diffusion, vae=vae, conditioner=conditioner,
                                 sampling={"guidance_scales": (1.0, 2.0)}, **{"latent_scale": None, **kw})


def fit(m: LatentDiffusionModule, data: Dataset, tmp_path: Path, steps: int = 3) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                         enable_model_summary=False)
    trainer.fit(m, DataLoader(data, batch_size=4))
    return trainer


def test_text_conditioning_trains_and_samples(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    text = TextConditioner(tiny_assets["clip32"])
    assert text.from_values(["lower"], torch.device("cpu"))["context"].shape == (1, 77, 32)
    m = module(text, small_unet(context_dim=32), vae=load_vae(tiny_assets["vae"]))
    before = [p.clone() for p in m.unet.parameters()]
    clip_before = [p.clone() for p in text.encoder.parameters()]
    fit(m, Batches("image"), tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.unet.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(clip_before, text.encoder.parameters()))  # frozen
    images = m.sample(["lower", "newer"], 2, guidance_scale=2.0, seed=1)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_precomputed_context_is_used_as_is(tiny_assets: dict[str, Path]) -> None:
    text = TextConditioner(tiny_assets["clip32"])
    ctx = torch.randn(2, 77, 32)
    assert text({"context": ctx, "text": ["x", "y"]})["context"] is ctx


def test_missing_text_encoder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="clip-missing"):
        TextConditioner(tmp_path / "clip-missing")


def test_trains_from_cached_latents_without_a_vae(tmp_path: Path) -> None:
    m = module(ClassConditioner(3), small_unet(num_classes=3))
    fit(m, Batches("latent"), tmp_path)
    latents = Batches("latent").latents[:4]
    assert float(m.latent_scale) == pytest.approx(1 / latents.std(unbiased=False).item(), rel=1e-4)
    assert m.log_images({}, 2) == {}  # no VAE: nothing to draw


def test_unet_and_vae_channels_must_agree(tiny_assets: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="in_channels=3"):
        module(None, small_unet(in_channels=3, out_channels=3), vae=load_vae(tiny_assets["vae"]))


def test_v_prediction_and_min_snr_run(tmp_path: Path) -> None:
    diffusion = Diffusion(VPrediction(), scaled_linear(zero_terminal_snr=True),
                          sampler=partial(ddim_sample, num_steps=4, spacing="trailing"))
    m = LatentDiffusionModule(unet=small_unet(num_classes=3), diffusion=diffusion, conditioner=ClassConditioner(3),
                              training={"loss_weighting": "min_snr"})
    trainer = fit(m, Batches("latent"), tmp_path, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_unet_init_loads_exported_weights(tmp_path: Path) -> None:
    from ldmlab.convert.checkpoint import save_ldmlab

    source = small_unet(num_classes=3)
    torch.nn.init.normal_(source.out[2].weight)  # not the zero init of a fresh U-Net
    path = save_ldmlab(source.state_dict(), source.config, tmp_path / "unet.safetensors", "unet")
    m = module(ClassConditioner(3), small_unet(num_classes=3), training={"unet_init": str(path)})
    for a, b in zip(m.unet.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model_channels"):
        module(ClassConditioner(3), small_unet(num_classes=3, model_channels=64), training={"unet_init": str(path)})
    with pytest.raises(FileNotFoundError, match="nothere"):
        module(ClassConditioner(3), small_unet(num_classes=3), training={"unet_init": str(tmp_path / "nothere.safetensors")})


def test_export_callback_finds_the_ema_by_type(tmp_path: Path) -> None:
    """ExportWeights hands the EMA callback's average to export_weights: unet.safetensors holds the shadow."""
    from safetensors import safe_open

    from ldmlab.callbacks.ema import EMA
    from ldmlab.callbacks.export import ExportWeights

    m, ema = module(ClassConditioner(3), small_unet(num_classes=3)), EMA(decay=0.5, warmup=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                         enable_model_summary=False, callbacks=[ema, ExportWeights(tmp_path / "export")])
    trainer.fit(m, DataLoader(Batches("latent"), batch_size=4))
    with safe_open(str(tmp_path / "export" / "unet.safetensors"), "pt") as f:
        assert f.metadata()["ema"] == "True"
        for name, shadow in ema.shadow.items():
            assert torch.equal(f.get_tensor(name), shadow)
    assert not torch.equal(ema.shadow["out.2.weight"], m.unet.state_dict()["out.2.weight"])


def test_unknown_grouped_setting_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"model.training.p_uncnd is unknown: valid are unet_init, p_uncond"):
        module(None, small_unet(), training={"p_uncnd": 0.1})
    with pytest.raises(ValueError, match=r"model.training.p_uncond=1.5 must be in \[0, 1\)"):
        module(None, small_unet(), training={"p_uncond": 1.5})


def test_flat_keys_of_older_checkpoints_are_regrouped() -> None:
    """sample.py rebuilds a model from a checkpoint's stored config; before model.training and model.sampling
    those keys (and the training noise's seed) sat flat under model."""
    from omegaconf import OmegaConf

    from ldmlab.lit.settings import regroup

    old = OmegaConf.create({"_target_": "x", "p_uncond": 0.2, "loss_weighting": "min_snr", "guidance_scales": [1.0, 3.0],
                            "sample_seed": 4, "seed": 7, "latent_scale": None})
    assert OmegaConf.to_container(regroup(old)) == {
        "_target_": "x", "latent_scale": None, "training": {"p_uncond": 0.2, "loss_weighting": "min_snr", "seed": 7},
        "sampling": {"guidance_scales": [1.0, 3.0], "sample_seed": 4}}


def test_a_checkpoint_from_before_model_diffusion_rebuilds() -> None:
    """Checkpoints written before model.diffusion kept schedule, prediction, variance and sampler flat under model,
    and the fine-tune's initial weights as model.unet_init: `upgrade` moves them, and the result instantiates."""
    import hydra
    from omegaconf import OmegaConf

    from ldmlab.lit.settings import upgrade

    old = OmegaConf.create({
        "_target_": "ldmlab.lit.ldm.LatentDiffusionModule", "unet_init": None, "latent_scale": 1.0,
        "unet": {"_target_": "ldmlab.nn.unet.UNetModel", "model_channels": 32, "channel_mult": [1, 2],
                 "num_res_blocks": 1, "attention_levels": [1], "num_heads": 4, "context_dim": None},
        "noise_schedule": {"_target_": "ldmlab.diffusion.scaled_linear"},
        "prediction": {"_target_": "ldmlab.diffusion.VPrediction"},
        "sampler": {"_target_": "ldmlab.diffusion.ddim_sample", "_partial_": True, "num_steps": 3}})
    new = upgrade(old)
    assert set(new) == {"_target_", "latent_scale", "unet", "diffusion", "training"}
    assert new.training == {"unet_init": None} and new.diffusion._target_ == "ldmlab.diffusion.Diffusion"
    module = hydra.utils.instantiate(new)
    assert module.diffusion.prediction.name == "v" and module.diffusion.sampler.keywords == {"num_steps": 3}
    clf = upgrade(OmegaConf.create({"_target_": "ldmlab.lit.noisy_classifier.NoisyClassifierModule", "seed": 3,
                                    "prediction": {"_target_": "ldmlab.diffusion.EpsPrediction"}}))
    assert clf.seed == 3 and list(clf.diffusion) == ["_target_", "prediction"]  # a classifier's seed stays put


def test_a_fine_tune_keeps_its_base_runs_latent_scale(tmp_path: Path) -> None:
    """model.training.unet_init from an export: with latent_scale=null the file's scale is used, not one re-estimated
    from the (few) fine-tuning images; an explicit scale still wins."""
    from ldmlab.lit.weights import save_weights

    base = small_unet(num_classes=3)
    path = save_weights(tmp_path / "unet.safetensors", base.state_dict(), dict(base.config), "unet",
                        latent_scale="0.4321")
    tuned = module(ClassConditioner(3), small_unet(num_classes=3), training={"unet_init": str(path)})
    assert float(tuned.latent_scale) == pytest.approx(0.4321)
    assert all(torch.equal(a, b) for a, b in zip(tuned.unet.state_dict().values(), base.state_dict().values()))
    assert float(module(ClassConditioner(3), small_unet(num_classes=3), latent_scale=0.5,
                        training={"unet_init": str(path)}).latent_scale) == 0.5
