"""`python train.py model=unet_small model/diffusion/variance=learned`: one override doubles the U-Net's out_channels, passes
the config check, trains with L_hybrid through a real Lightning Trainer (train/loss_vlb logged), samples with DDPM
(strided) and DDIM η > 0, and sample.py draws from its checkpoint; mismatches are refused in one line."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, compose_train, make_tiny_vae_export
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldmlab.diffusion import FixedVariance, LearnedVariance, ddim_sample, ddpm_sample
from ldmlab.sample import sample
from ldmlab.validate import check_config

pytestmark = pytest.mark.usefixtures("one_thread")
LEARNED = ["model=unet_small", "model/diffusion/variance=learned"]
TINY = ["model.unet.model_channels=32", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[1]",
        "model.unet.norm_groups=8", "model.diffusion.sampler.num_steps=3"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae_export(tmp_path_factory.mktemp("vae") / "vae.safetensors")


def test_variance_group_files() -> None:
    assert sorted(p.stem for p in (CONF / "model" / "diffusion" / "variance").glob("*.yaml")) == ["fixed", "learned"]


@pytest.mark.parametrize("model", ["unet_small", "unet_sd15", "unet_demo_gpu"])
def test_one_override_doubles_out_channels(model: str, tmp_path: Path) -> None:
    fixed, learned = (compose_train([f"model={model}", *extra], tmp_path)
                      for extra in ([], ["model/diffusion/variance=learned"]))
    assert fixed.model.unet.out_channels == fixed.model.unet.in_channels == 4  # the default is unchanged
    assert learned.model.unet.out_channels == 8
    assert isinstance(hydra.utils.instantiate(fixed.model.diffusion.variance), FixedVariance)
    variance = hydra.utils.instantiate(learned.model.diffusion.variance)
    assert isinstance(variance, LearnedVariance) and variance.vlb_weight == 0.001
    in_8 = compose_train([f"model={model}", "model/diffusion/variance=learned", "model.unet.in_channels=8"], tmp_path)
    assert in_8.model.unet.out_channels == 16  # follows in_channels, not a fixed 8


@pytest.mark.parametrize("overrides, needle, fix", [
    (["model.unet.out_channels=4"], "model.unet.out_channels=4 but model/diffusion/variance=learned needs 2 x",
     "set model.unet.out_channels=8"),
    (["model/diffusion/variance=fixed", "model.unet.out_channels=8"], "model.unet.out_channels=8 but model/diffusion/variance=fixed",
     "set model.unet.out_channels=4"),
    (["model/diffusion/prediction=flow", "model/diffusion/sampler=flow_euler"],
     "model/diffusion/variance=learned cannot train with model/diffusion/prediction=flow",
     "use model/diffusion/variance=fixed, or model/diffusion/prediction=eps|v|x0"),
    (["model.diffusion.variance.vlb_weight=0"], "model.diffusion.variance: model.diffusion.variance.vlb_weight=0 must be > 0",
     "model/diffusion/variance=fixed"),
])
def test_mismatches_are_one_line(overrides, needle, fix, tmp_path: Path, vae: Path) -> None:
    assert check_config(compose_train([*LEARNED, f"model.vae.path={vae}"], tmp_path)) == []
    found = check_config(compose_train([*LEARNED, *overrides, f"model.vae.path={vae}"], tmp_path))
    assert len(found) == 1 and needle in found[0] and fix in found[0], found


class _Latents(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"latent": torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)), "label": i % 10}


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory: pytest.TempPathFactory, vae: Path) -> tuple[pl.LightningModule, Path]:
    """A tiny learned-variance LDM trained 2 steps by a real Trainer (validation too), and its checkpoint."""
    tmp = tmp_path_factory.mktemp("learned")
    cfg = compose_train([*LEARNED, f"model.vae.path={vae}", *TINY], tmp)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))
    module.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # as ldmlab.fit.build stores it
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, default_root_dir=tmp)
    loader = partial(torch.utils.data.DataLoader, _Latents(), batch_size=4)
    trainer.fit(module, loader(), loader())
    module.metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    trainer.save_checkpoint(tmp / "last.ckpt")
    return module, tmp / "last.ckpt"


def test_trainer_fit_logs_the_hybrid_loss(learned_run: tuple[pl.LightningModule, Path]) -> None:
    module, _ = learned_run
    m = module.metrics
    assert module.unet.config["out_channels"] == 8 and isinstance(module.diffusion.variance, LearnedVariance)
    for key in ("train/loss", "train/loss_simple", "train/loss_vlb", "val/loss", "val/loss_simple", "val/loss_vlb"):
        assert key in m and torch.isfinite(torch.tensor(m[key])), key
    assert m["train/loss"] == pytest.approx(m["train/loss_simple"] + 0.001 * m["train/loss_vlb"], rel=1e-5)
    assert m["val/loss"] == pytest.approx(m["val/loss_simple"] + 0.001 * m["val/loss_vlb"], rel=1e-5)


def test_module_samples_with_the_learned_variance(learned_run: tuple[pl.LightningModule, Path]) -> None:
    module, _ = learned_run
    for sampler in (partial(ddpm_sample, num_steps=4), partial(ddim_sample, num_steps=3, eta=1.0)):
        images = module.sample([1, 2], 2, guidance_scale=3.0, seed=0, sampler=sampler)
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and images.abs().max() <= 1


def test_sample_py_draws_from_the_checkpoint(learned_run: tuple[pl.LightningModule, Path], tmp_path: Path) -> None:
    _, ckpt = learned_run
    grids = []
    for sampler, steps in (("ddpm", 4), ("ddim", 3)):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("sample", overrides=[f"ckpt={ckpt}", f"out={tmp_path / sampler}.png", "n=2", "batch_size=2",
                                               f"sampler={sampler}", f"steps={steps}", "guidance=2", "device=cpu"])
        grids.append(sample(cfg).read_bytes())
    assert grids[0] != grids[1]
