"""Every config file composes; every model, data, trainer and logger option instantiates; experiments train."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, REPO, compose_train
from omegaconf import OmegaConf

from ldmlab.fit import build, instantiate_group
from ldmlab.machine import resolve_machine

GROUPS = ["model", "data", "trainer", "speed", "optimizer", "lr_scheduler", "logger", "callbacks", "paths",
          "experiment", "debug", "hydra"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# options that need a GPU or remote data get CPU/demo stand-ins when instantiated here
CPU_STANDINS = {"trainer": ["trainer.accelerator=cpu"],
                "data": ["data.train_urls='/nonexistent/shard-{000000..000001}.tar'"]}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group: str, option: str, tmp_path: Path) -> None:
    override = f"{group}={option}" if group != "hydra" else f"hydra={option}"
    cfg = compose_train([override], tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.model._target_ and cfg.trainer._target_ and cfg.data._target_


def model_standins(option: str, assets: dict[str, Path]) -> list[str]:
    """Overrides pointing a model config's weight files at random stand-ins made by the test session."""
    if option.startswith("vae"):
        return ["model.lpips.backbone=random"]
    if option.startswith("classifier"):  # trains on cached latents: reads no weights
        return []
    overrides = [f"model.vae.path={assets['vae']}"]
    if option == "unet_sd15":
        overrides.append(f"model.conditioner.path={assets['clip768']}")
    return overrides


@pytest.mark.parametrize("option", options("model"))
def test_models_instantiate(option: str, tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    cfg = compose_train([f"model={option}", *model_standins(option, tiny_assets)], tmp_path)
    module = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))
    assert isinstance(module, pl.LightningModule)
    if option.startswith("unet"):  # the run's seed seeds the training noise (model.training.seed)
        assert module.train_cfg.seed == cfg.seed and "seed" not in cfg.model
    if option == "unet_sd15":
        assert sum(p.numel() for p in module.unet.parameters()) == 859_520_964


def test_unet_channel_mult_from_command_line(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    cfg = compose_train(["model=unet_small", "model.unet.channel_mult=[1,2,2]", "model/diffusion/noise_schedule=cosine",
                         "model/diffusion/prediction=v", "model/diffusion/sampler=dpmpp_2m", *model_standins("unet_small", tiny_assets)],
                        tmp_path)
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert module.unet.config["channel_mult"] == [1, 2, 2] and module.diffusion.prediction.name == "v"
    assert module.diffusion.noise_schedule.name.startswith("cosine")


@pytest.mark.parametrize("option", options("data"))
def test_data_instantiates(option: str, tmp_path: Path) -> None:
    cfg = compose_train([f"data={option}", *(CPU_STANDINS["data"] if option == "wds" else [])], tmp_path)
    assert isinstance(hydra.utils.instantiate(cfg.data), pl.LightningDataModule)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainers_instantiate(option: str, tmp_path: Path) -> None:
    cfg = resolve_machine(compose_train([f"trainer={option}", *CPU_STANDINS["trainer"]], tmp_path))
    if option == "fsdp" and not torch.cuda.is_available():
        # Lightning builds FSDP only on GPUs: check the strategy object the config describes instead
        strategy = hydra.utils.instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, pl.strategies.FSDPStrategy)
        return
    assert isinstance(hydra.utils.instantiate(cfg.trainer), pl.Trainer)


@pytest.mark.parametrize("option", ["csv", "tensorboard", "wandb", "many"])
def test_loggers_instantiate(option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B must fall back to offline
    cfg = compose_train([f"logger={option}"], tmp_path)
    loggers = instantiate_group(cfg.logger)
    assert loggers and all(isinstance(lg, pl.loggers.Logger) for lg in loggers)
    for lg in loggers:
        if isinstance(lg, pl.loggers.WandbLogger):
            assert lg._offline


def test_sd_vae_config_is_sd(tmp_path: Path) -> None:
    """`model=vae_kl_f8 trainer=gpu` is SD's first stage: kl-f8 shapes and parameter counts, bf16 on a GPU."""
    cfg = compose_train(["model=vae_kl_f8", "trainer=gpu"], tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    ae = hydra.utils.instantiate(cfg.model.autoencoder)
    assert sum(p.numel() for p in ae.encoder.parameters()) == 34_163_592
    assert sum(p.numel() for p in ae.decoder.parameters()) == 49_490_179
    assert ae.downsample_factor == 8 and ae.embed_dim == 4
    assert cfg.model.loss.kl_weight == 1e-6 and cfg.model.gan.disc_start == 50001
    assert cfg.model.gan.disc_weight == 0.5 and cfg.model.gan.disc_loss == "hinge"
    assert list(cfg.optimizer.betas) == [0.5, 0.9] and cfg.optimizer.lr == 4.5e-6


def test_missing_lpips_backbone_stops_before_training(tmp_path: Path) -> None:
    cfg = compose_train(["model=vae_kl_f8"], tmp_path)
    with pytest.raises(Exception, match="vgg16-397923af.pth"):
        build(cfg)


def test_command_line_overrides_model_optimizer_default(tmp_path: Path) -> None:
    cfg = compose_train(["optimizer=adamw", "optimizer.lr=3e-4", "model.autoencoder.channel_mult=[1,2]"], tmp_path)
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 3e-4
    assert list(cfg.model.autoencoder.channel_mult) == [1, 2]


def experiment_standins(option: str, assets: dict[str, Path], tmp_path: Path) -> list[str]:
    """What an experiment reads from disk, pointed at stand-ins: the noise-aware classifier's latent cache (the demo
    crops through a random VAE instead); VAE presets train on the demo crops with a random LPIPS; LDM presets keep
    their data (demo-based) and read the session's random VAE."""
    if option.startswith("classifier"):
        return ["data=demo", "data.decoder.image_size=32", "data.root=null",
                f"model.vae={{_target_:ldmlab.convert.load.load_vae,path:{assets['vae']}}}"]
    if compose_train([f"experiment={option}"], tmp_path).model.get("vae") is None:
        return ["data=demo", "model.lpips.backbone=random", "model.scale_lr=false", "data.decoder.image_size=32"]
    return [f"model.vae.path={assets['vae']}", "model.diffusion.sampler.num_steps=2", "data.num_workers=0"]


@pytest.mark.slow
@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_trains_one_step(option: str, tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """STYLE 7: every experiment preset is smoke-trained for one step on the CPU (demo data stands in)."""
    from ldmlab.run import train

    cfg = compose_train([f"experiment={option}", "trainer=cpu", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                         "trainer.val_check_interval=1", "data.batch_size=2", "trainer.precision=32-true",
                         "trainer.num_sanity_val_steps=0", *experiment_standins(option, tiny_assets, tmp_path)],
                        tmp_path)
    assert train(cfg) is not None
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# the latent U-Nets small enough for a CPU step (unet_sd15's 859 M parameters only instantiate, above)
SMALL_UNETS = [o for o in options("model") if o.startswith("unet") and o != "unet_sd15"]


@pytest.mark.slow
@pytest.mark.parametrize("option", SMALL_UNETS)
def test_every_small_unet_trains_one_step(option: str, tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """STYLE 7 for the U-Net presets (unet_adm: every ADM option on): one CPU step on the demo crops through a
    random f4 VAE, through ldmlab.run.train (the config check included)."""
    from ldmlab.run import train

    cfg = compose_train([f"model={option}", *model_standins(option, tiny_assets), "trainer=cpu", "data=demo",
                         "trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.val_check_interval=1",
                         "data.batch_size=2", "trainer.precision=32-true", "trainer.num_sanity_val_steps=0",
                         "model.sampling.guidance_scales=[1.0]", "++model.diffusion.sampler.num_steps=2"], tmp_path)
    assert train(cfg) is not None
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_help_lists_every_group() -> None:
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    for group in ["model", "data", "trainer", "optimizer", "lr_scheduler", "logger", "callbacks", "paths",
                  "experiment", "debug"]:
        assert f"\n{group}: " in out.stdout, f"--help does not list {group}"
