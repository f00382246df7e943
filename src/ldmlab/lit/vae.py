"""VAEModule: the KL-autoencoder first stage, trained with L1 + KL + LPIPS + a PatchGAN discriminator.

The loss is LDM's `LPIPSWithDiscriminator` (contperceptual.py) written out as a generator step and a
discriminator step with Lightning 2 manual optimisation; the networks and loss functions are plain torch
(`ldmlab.nn`, `ldmlab.losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldmlab.lit.contract import TrainingModule
from ldmlab.lit.settings import GAN, VAE_GROUPS, VAELoss, settings, stored_groups
from ldmlab.lit.weights import save_weights
from ldmlab.losses import vae as losses
from ldmlab.nn.autoencoder import AutoencoderKL

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]
G_LOSS, D_LOSS = "generator loss train/total_loss", "discriminator loss train/d_loss"  # as NonFiniteGuard names them


def _to_unit(x: Tensor) -> Tensor:
    """[-1, 1] → [0, 1] for PSNR/SSIM with data_range 1."""
    return ((x.clamp(-1, 1) + 1) / 2).float()


class VAEModule(TrainingModule):
    """KL-VAE with LPIPS and PatchGAN losses; `trainer.global_step` counts training iterations (batches)."""

    loss_names = (G_LOSS, D_LOSS)
    progress_name = "rec_loss"

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        discriminator: nn.Module,
        lpips: Callable[[], nn.Module] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        loss: dict[str, Any] | None = None,
        gan: dict[str, Any] | None = None,
        grad_clip: float | None = None,
        scale_lr: bool = False,
        sample_posterior: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # explicit G and D steps (STYLE 12)
        self.save_hyperparameters(ignore=["autoencoder", "discriminator", "lpips", "optimizer", "lr_scheduler"])
        self.loss_cfg: VAELoss = settings(VAELoss, loss, "loss")  # a bad or unknown key fails here, in one line
        self.gan_cfg: GAN = settings(GAN, gan, "gan")
        self.autoencoder, self.discriminator, hp = autoencoder, discriminator, self.loss_cfg
        # LPIPS is built only when used, so a missing VGG16 file only matters when perceptual_weight > 0
        self.lpips = lpips() if (lpips is not None and hp.perceptual_weight > 0) else None
        # LDM's learned log-variance of the Laplace likelihood; LDM never optimises it (learn_logvar=False)
        self.logvar = nn.Parameter(torch.full((), float(hp.logvar_init)), requires_grad=hp.learn_logvar)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=4.5e-6, betas=(0.5, 0.9), fused=True)
        self.scheduler_factory = lr_scheduler
        self.d_loss_fn = losses.get_d_loss(self.gan_cfg.disc_loss)
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's (give autoencoder=, discriminator=); older checkpoints' flat hyper-parameters regrouped."""
        groups = stored_groups(checkpoint_path, VAE_GROUPS, kwargs.get("weights_only"))
        return super().load_from_checkpoint(checkpoint_path, *args, **{**groups, **kwargs})

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """One G step, then (from disc_start) one D step on the detached reconstruction; a non-finite G loss
        leaves both updates out, a non-finite D loss the D update (lit.nonfinite)."""
        x = batch["image"]
        opt_g, opt_d = self.optimizers()
        gan_active = losses.disc_factor(self.global_step, self.gan_cfg.disc_start, self.gan_cfg.disc_factor) > 0
        with self.toggled_optimizer(opt_g):
            rec, posterior = self.autoencoder(x, sample_posterior=self.hparams.sample_posterior)
            g_total, logs = self._generator_loss(x, rec, posterior, gan_active)
            self._step(opt_g, g_total, counted=True)
        if gan_active:  # before disc_start the discriminator never runs nor steps
            with self.toggled_optimizer(opt_d):
                d_total, d_logs = self._discriminator_loss(x, rec.detach())
                self._step(opt_d, d_total, counted=False)
            logs.update(d_logs)
        self.skips.show(logs["train/rec_loss"])
        self.log_dict(logs)  # NaN too: the row of a skipped step shows its loss, not an earlier one
        for scheduler in self._schedulers()[:2 if gan_active else 1]:
            scheduler.step()  # left out once per update skipped (lit.nonfinite.SkipAwareLR)

    def _generator_loss(self, x: Tensor, rec: Tensor, posterior: Any, gan_active: bool) -> tuple[Tensor, dict]:
        """LDM contperceptual, optimizer_idx 0: nll + kl_weight·KL + d_weight·disc_factor·g_loss."""
        hp, gan = self.loss_cfg, self.gan_cfg
        perceptual = self.lpips(x, rec) if self.lpips is not None else None
        rec_elem = losses.reconstruction_loss(x, rec, perceptual, hp.perceptual_weight, hp.rec_loss)
        nll = losses.nll_with_learned_logvar(rec_elem, self.logvar)
        kl = losses.kl_loss(posterior.kl())
        total = nll + hp.kl_weight * kl
        logs = {"train/rec_loss": losses.get_pixel_loss(hp.rec_loss)(x, rec).mean().detach(),
                "train/nll": nll.detach(), "train/kl": kl.detach(), "train/logvar": self.logvar.detach()}
        if perceptual is not None:
            logs["train/perceptual"] = perceptual.mean().detach()
        if gan_active:
            logits_fake = self.discriminator(rec)
            g_loss = losses.generator_loss(logits_fake)
            # VQGAN eq. 7: balance the GAN gradient against the reconstruction gradient at the last layer
            d_weight = losses.adaptive_weight(nll, g_loss, self.autoencoder.last_layer) * gan.disc_weight
            total = total + d_weight * gan.disc_factor * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/d_weight": d_weight})
        logs["train/total_loss"] = total.detach()
        return total, logs

    def _discriminator_loss(self, x: Tensor, rec: Tensor) -> tuple[Tensor, dict]:
        """LDM contperceptual, optimizer_idx 1: disc_factor·d_loss(D(x), D(x̂))."""
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(rec)
        d_loss = self.gan_cfg.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        logs = {"train/d_loss": d_loss.detach(), "train/logits_real": logits_real.mean().detach(),
                "train/logits_fake": logits_fake.mean().detach()}
        return d_loss, logs

    def _step(self, opt: Any, loss: Tensor, counted: bool) -> None:
        """zero_grad → backward → clip → step (the wrapper leaves it out for a NaN/Inf loss, lit.nonfinite).

        Lightning 2 counts every LightningOptimizer.step as a global step in manual optimisation, which
        would make one G+D iteration count twice; the D step goes through the strategy directly (same
        precision plugin and hooks, not counted) so max_steps and disc_start mean iterations, as in LDM."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)  # NaN too: every rank runs its backward, DDP's all-reduce stays in step
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        if counted:
            opt.step()
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None, model=self)

    def _schedulers(self) -> list[Any]:
        """The G and D LR schedulers, in that order ([] without any)."""
        scheds = self.lr_schedulers()
        return [] if scheds is None else list(scheds) if isinstance(scheds, list) else [scheds]

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction through the posterior mode."""
        return self.autoencoder.decode(self.autoencoder.encode(x).mode())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["image"]
        posterior = self.autoencoder.encode(x)
        rec = self.autoencoder.decode(posterior.mode())
        self.val_psnr(_to_unit(rec), _to_unit(x))
        self.val_ssim(_to_unit(rec), _to_unit(x))
        # torchmetrics objects reduce across ranks themselves; plain tensors need sync_dist
        self.log_dict({"val/psnr": self.val_psnr, "val/ssim": self.val_ssim}, prog_bar=True, batch_size=len(x))
        metrics = {"val/rec_loss": losses.get_pixel_loss(self.loss_cfg.rec_loss)(x, rec).mean(),
                   "val/kl": losses.kl_loss(posterior.kl())}
        if self.lpips is not None:
            metrics["val/lpips"] = self.lpips(x, rec).mean()
        self.log_dict(metrics, sync_dist=True, batch_size=len(x))

    def log_images(self, batch: dict[str, Tensor], num_images: int = 8) -> dict[str, Tensor]:
        """One grid for the ImageGrids callback: inputs in the first row, their reconstructions below."""
        x = batch["image"][:num_images]
        return {"reconstructions": torch.cat([x, self.reconstruct(x)])}

    # ------------------------------------------------------------------ optimisers, checkpoints, export

    def configure_optimizers(self) -> Any:
        g_params = list(self.autoencoder.parameters()) + ([self.logvar] if self.loss_cfg.learn_logvar else [])
        opt_g, opt_d = self.optimizer_factory(g_params), self.optimizer_factory(list(self.discriminator.parameters()))
        if self.hparams.scale_lr:  # before the schedulers record each group's initial_lr
            self._scale_lr(opt_g, opt_d)
        (opt_g, sched_g), (opt_d, sched_d) = (self.skipping(name, opt, self.scheduler_factory)
                                              for name, opt in ((G_LOSS, opt_g), (D_LOSS, opt_d)))
        if self.scheduler_factory is None:
            return [opt_g, opt_d]
        return [opt_g, opt_d], [{"scheduler": s, "interval": "step"} for s in (sched_g, sched_d)]

    def _scale_lr(self, *optimizers: Optimizer) -> None:
        """LDM main.py: lr = base_lr × batch_size × world_size (manual optimisation has no accumulation)."""
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if batch_size is None:
            raise ValueError("model.scale_lr=true needs a datamodule with a `batch_size` attribute; "
                             "set model.scale_lr=false and give optimizer.lr directly")
        factor = batch_size * self.trainer.world_size
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] *= factor
        rank_zero_info(f"scale_lr: lr = base × batch {batch_size} × world {self.trainer.world_size} "
                       f"= {optimizers[0].param_groups[0]['lr']:.3g}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # the architecture travels with the weights so ldmlab.convert.load.load_vae can rebuild it
        checkpoint["autoencoder_config"] = dict(self.autoencoder.config)
        # the frozen LPIPS network is rebuilt from its own files: keep its 58 MB out of every checkpoint
        for key in [k for k in checkpoint["state_dict"] if k.startswith("lpips.")]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.lpips is not None:
            checkpoint["state_dict"].update({f"lpips.{k}": v for k, v in self.lpips.state_dict().items()})

    def export_weights(self, dirpath: str | Path, ema: dict[str, dict[str, Tensor]] | None = None) -> list[Path]:
        """Write the autoencoder (its EMA if one was kept) as `vae.safetensors` (SD's `first_stage_model` names)."""
        weights = (ema or {}).get("autoencoder")
        weights = weights if weights is not None else self.autoencoder.state_dict()
        return [save_weights(Path(dirpath) / "vae.safetensors", weights, self.autoencoder.config, "vae")]
