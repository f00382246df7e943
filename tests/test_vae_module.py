"""VAEModule under a real Lightning Trainer: GAN gating, step counting, LPIPS wiring, checkpoint contents."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from ldmlab.lit.vae import VAEModule
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.discriminator import NLayerDiscriminator
from ldmlab.nn.lpips import LPIPS
from ldmlab.optim import warmup_cosine


class ImageDicts(Dataset):
    """Fixed random 16×16 images as batch dicts (the layout the WebDataset pipeline yields)."""

    def __init__(self, n: int = 32) -> None:
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": torch.tensor(0)}


def tiny_module(**kwargs) -> VAEModule:
    torch.manual_seed(0)
    args = {"autoencoder": AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
                "discriminator": NLayerDiscriminator(base_channels=8, n_layers=2),
                "lpips": partial(LPIPS, backbone="random"), "loss": {"perceptual_weight": 0.1},
                "optimizer": partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9)), "gan": {"disc_start": 3}}
    return VAEModule(**{**args, **kwargs})


class ParamTrace(pl.Callback):
    """Records, after every training batch, whether G and D parameters changed and the global step."""

    def __init__(self) -> None:
        self.changed: list[tuple[bool, bool]] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = ([p.clone() for p in module.autoencoder.parameters()],
                       [p.clone() for p in module.discriminator.parameters()])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        g_before, d_before = self.before
        g_changed = any(not torch.equal(a, b) for a, b in zip(g_before, module.autoencoder.parameters()))
        d_changed = any(not torch.equal(a, b) for a, b in zip(d_before, module.discriminator.parameters()))
        self.changed.append((g_changed, d_changed))
        self.steps.append(trainer.global_step)


def fit(module: VAEModule, tmp_path: Path, max_steps: int, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                         limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, DataLoader(ImageDicts(), batch_size=4))
    return trainer


def test_discriminator_steps_only_from_disc_start(tmp_path: Path) -> None:
    trace = ParamTrace()
    fit(tiny_module(gan={"disc_start": 3}), tmp_path, max_steps=6, callbacks=[trace])
    assert trace.changed == [(True, False)] * 3 + [(True, True)] * 3
    # global_step counts iterations, not optimizer steps (D is stepped but not counted)
    assert trace.steps == [1, 2, 3, 4, 5, 6]


def test_discriminator_optimizer_state_only_after_start(tmp_path: Path) -> None:
    module = tiny_module(gan={"disc_start": 100})
    trainer = fit(module, tmp_path, max_steps=3)
    opt_g, opt_d = trainer.optimizers
    assert len(opt_g.state) > 0 and len(opt_d.state) == 0


def test_gan_logs_after_start(tmp_path: Path) -> None:
    module = tiny_module(gan={"disc_start": 1})
    trainer = fit(module, tmp_path, max_steps=2)
    logged = set(trainer.callback_metrics)
    for key in ["train/rec_loss", "train/kl", "train/perceptual", "train/g_loss", "train/d_loss",
                "train/d_weight", "train/logits_real", "train/logits_fake"]:
        assert key in logged, f"{key} not logged: {sorted(logged)}"
    assert "rec_loss" in trainer.progress_bar_metrics  # the name the device path shows too
    assert 0 <= float(trainer.callback_metrics["train/d_weight"]) <= 0.5 * 1e4


def test_lr_schedule_is_stepped_per_iteration(tmp_path: Path) -> None:
    module = tiny_module(lr_scheduler=partial(warmup_cosine, warmup_steps=4), gan={"disc_start": 0})
    trainer = fit(module, tmp_path, max_steps=2)
    for opt in trainer.optimizers:  # two iterations of a 4-step warm-up: factor 3/4
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)


def test_perceptual_weight_zero_skips_lpips_and_missing_backbone(tmp_path: Path) -> None:
    module = tiny_module(lpips=partial(LPIPS, backbone=tmp_path / "absent.pth"), loss={"perceptual_weight": 0.0})
    assert module.lpips is None
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        tiny_module(lpips=partial(LPIPS, backbone=tmp_path / "absent.pth"), loss={"perceptual_weight": 1.0})


def test_checkpoint_omits_lpips_and_reloads(tmp_path: Path) -> None:
    module = tiny_module(gan={"disc_start": 1})
    trainer = fit(module, tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert not any(k.startswith("lpips.") for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"]) == 2
    fresh = tiny_module()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    for a, b in zip(fresh.autoencoder.parameters(), module.autoencoder.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_weights_rebuild_the_autoencoder(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open

    module = tiny_module()
    (path,) = module.export_weights(tmp_path / "export")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    rebuilt = AutoencoderKL(**config)
    rebuilt.load_state_dict(load_file(str(path)))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(rebuilt.encode(x).mean, module.autoencoder.encode(x).mean)


def test_grouped_settings_fail_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^model.loss.kl_weigth is unknown: valid are rec_loss, kl_weight, "):
        tiny_module(loss={"kl_weigth": 1e-6})
    with pytest.raises(ValueError, match=r"^model.loss.rec_loss='l3': valid are l1, l2$"):
        tiny_module(loss={"rec_loss": "l3"})
    with pytest.raises(ValueError, match=r"^model.gan.disc_loss='wgan': valid are hinge, vanilla$"):
        tiny_module(gan={"disc_loss": "wgan"})
    with pytest.raises(ValueError, match=r"^model.gan.disc_strat is unknown: valid are disc_start, "):
        tiny_module(gan={"disc_strat": 0})


def test_checkpoint_with_flat_hyperparameters_loads(tmp_path: Path) -> None:
    """A checkpoint from before model.loss and model.gan stores those settings flat: they are regrouped."""
    loss = {"rec_loss": "l2", "kl_weight": 1e-5, "perceptual_weight": 0.2, "logvar_init": 0.5, "learn_logvar": True}
    gan = {"disc_start": 1, "disc_weight": 0.3, "disc_factor": 0.7, "disc_loss": "vanilla"}
    trained = tiny_module(loss=loss, gan=gan, grad_clip=1.0, sample_posterior=False)
    fit(trained, tmp_path, max_steps=2).save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"] == {"loss": loss, "gan": gan, "grad_clip": 1.0, "scale_lr": False,
                                        "sample_posterior": False}
    ckpt["hyper_parameters"] = {**loss, **gan, "grad_clip": 1.0, "scale_lr": False, "sample_posterior": False}
    torch.save(ckpt, tmp_path / "old.ckpt")
    networks = lambda: {"autoencoder": AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                                     norm_groups=8),
                        "discriminator": NLayerDiscriminator(base_channels=8, n_layers=2),
                        "lpips": partial(LPIPS, backbone="random")}
    for name in ("old.ckpt", "new.ckpt"):
        module = VAEModule.load_from_checkpoint(tmp_path / name, **networks())
        assert (module.loss_cfg, module.gan_cfg) == (trained.loss_cfg, trained.gan_cfg), name
        assert module.hparams.loss == loss and module.hparams.gan == gan and module.hparams.grad_clip == 1.0
        assert module.logvar.requires_grad and module.lpips is not None
        weights = {k: v for k, v in trained.state_dict().items() if not k.startswith("lpips.")}
        assert weights.keys() <= module.state_dict().keys()
        for key, value in weights.items():
            torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    given = VAEModule.load_from_checkpoint(tmp_path / "old.ckpt", **networks(), gan={"disc_start": 7})
    assert given.gan_cfg.disc_start == 7 and given.gan_cfg.disc_loss == "hinge"  # a given group replaces the stored
