"""LatentDiffusionModule: a U-Net trained on the latents of a frozen KL-VAE (LDM, Rombach et al. 2022).

encode (or read cached latents) → scale → drop the condition (CFG) → noise at random t → weighted MSE.
Schedule, objective (ε, v, x0 or flow matching), variance (fixed, or learned with L_hybrid) and sampler are one
`ldmlab.diffusion.Diffusion` (`model.diffusion`, config groups `model/diffusion/{noise_schedule,prediction,
variance,sampler}`); how the U-Net is trained is `model.training` (`Training`: from which weights, with which loss
weighting), how validation grids are drawn `model.sampling` (`Sampling`), which weights train `model.finetune`
(`lit.finetune`). An image condition (super-resolution, inpainting: `lit.image_condition`) adds U-Net input channels
to the same `cond` dict.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmlab.diffusion import Diffusion, classifier_free_guidance
from ldmlab.lit.conditioning import TextConditioner
from ldmlab.lit.finetune import FineTune
from ldmlab.lit.image_condition import ImageCondition
from ldmlab.lit.latents import LatentModule
from ldmlab.lit.settings import Sampling, Training, settings
from ldmlab.lit.weights import load_unet_init, save_weights
from ldmlab.nn.autoencoder import AutoencoderKL

Sampler = Callable[..., Tensor]
Denoise = Callable[[Tensor, Tensor], Tensor]


class LatentDiffusionModule(LatentModule):
    """Latent diffusion on a frozen VAE; `latent_scale=None` estimates 1/std of the first batch's latents."""

    def __init__(
        self,
        unet: nn.Module,
        diffusion: Diffusion,
        vae: AutoencoderKL | None = None,
        conditioner: nn.Module | None = None,
        image_condition: ImageCondition | None = None,
        latent_scale: float | None = 0.18215,
        training: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        finetune: FineTune | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["unet", "diffusion", "vae", "conditioner", "image_condition", "finetune",
                                          "optimizer", "lr_scheduler"])
        self.train_cfg: Training = settings(Training, training, "training")
        self.sample_cfg: Sampling = settings(Sampling, sampling, "sampling")
        unet_in, unet_out = (getattr(unet, "config", {}).get(k) for k in ("in_channels", "out_channels"))
        extra = image_condition.channels(vae.embed_dim) if image_condition is not None and vae is not None else 0
        if vae is not None and unet_in is not None and unet_in != vae.embed_dim + extra:
            raise ValueError(f"model.unet.in_channels={unet_in} but the VAE's latents have {vae.embed_dim} channels "
                             f"(+ {extra} of model.image_condition): set model.unet.in_channels={vae.embed_dim + extra}")
        if unet_in and unet_out and (problem := diffusion.variance.channels_problem(unet_in - extra, unet_out)):
            raise ValueError(problem)  # out_channels = the latent's, or 2 × with a learned variance
        if self.train_cfg.unet_init is not None:  # a fine-tune keeps the latent scale its base trained with
            stored_scale = load_unet_init(unet, self.train_cfg.unet_init)
            latent_scale = latent_scale or stored_scale
        if finetune is not None:  # after the base weights: LoRA wraps them, TI adds tokens (conf/finetune/)
            finetune.apply(unet, conditioner)
        self.finetune = finetune
        self.unet, self.diffusion = unet, diffusion
        self.set_latent_source(vae, latent_scale)  # lit.latents: the frozen VAE, the scale (estimated if None)
        self.conditioner, self.image_condition = conditioner, image_condition
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.scheduler_factory = lr_scheduler


    # ------------------------------------------------------------------ training

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator, p_uncond: float) -> Tensor:
        """The weighted denoising loss of one batch (DDPM eq. 14, or flow matching, with the chosen weighting)."""
        return self.loss_terms(batch, generator, p_uncond)[0]

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator,
                   p_uncond: float) -> tuple[Tensor, dict[str, Tensor]]:
        """`diffusion_loss` (+ λ·L_vlb with a learned variance, model/diffusion/variance) and its named parts to log."""
        cfg, z = self.train_cfg, self.latents(batch, generator)
        cond = self.conditioner(batch) if self.conditioner is not None else {}
        if cond and p_uncond > 0:
            cond = self.conditioner.drop(cond, p_uncond, generator)
        if self.image_condition is not None:  # extra input channels (SR3's low-res image, SD-inpainting's mask)
            cond |= self.image_condition.inputs(batch, z.shape[-2:], self.encode_condition, generator, self.training)
        gamma = cfg.min_snr_gamma if cfg.loss_weighting == "min_snr" else None  # None: the simple loss
        # t, x_t, target and weight come from the objective (ε/v/x0 on the schedule, or flow matching)
        x_t, t, target, weight = self.diffusion.training_inputs(z, generator, cfg.offset_noise,
                                                                cfg.input_perturbation, gamma)
        return self.diffusion.loss(self.unet(x_t, t, **cond), target, weight, z, x_t, t)

    @torch.no_grad()
    def encode_condition(self, pixels: Tensor) -> Tensor:
        """Scaled posterior mean of condition pixels (the masked image): one latent per image, whatever the seed."""
        return self.vae.encode(pixels).mode() * self.latent_scale

    def prepare_data(self) -> None:
        if self.finetune is not None:  # DreamBooth's class images, drawn by the base model
            self.finetune.prepare(self)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # noise seeded by (model.training.seed, step, rank): reproducible and resume-exact
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.train_cfg.seed, self.global_step, self.global_rank, 0)) % (2**63))
        if "prior" in batch:  # data=dreambooth: L_instance + λ L_prior in one step (DreamBooth eq. 2)
            (loss, parts), (prior, _) = (self.loss_terms(batch[k], g, self.train_cfg.p_uncond)
                                         for k in ("instance", "prior"))
            self.log("train/prior_loss", prior.detach(), batch_size=self._batch_size(batch["prior"]))
            loss, batch = loss + self.finetune.prior_weight * prior, batch["instance"]
        else:
            loss, parts = self.loss_terms(batch, g, self.train_cfg.p_uncond)
        self.log("train/loss", loss.detach(), batch_size=self._batch_size(batch))  # NaN too: no stale value
        for name, value in parts.items():  # a learned variance's train/loss_simple, train/loss_vlb
            self.log(f"train/{name}", value, batch_size=self._batch_size(batch))
        # NaN/Inf too: every rank runs its backward (DDP's all-reduce stays in step); lit.nonfinite skips the update
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(self.sample_cfg.sample_seed + batch_idx)
        loss, parts = self.loss_terms(batch, g, p_uncond=0.0)  # fixed noise: comparable across validations
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=self._batch_size(batch))
        for name, value in parts.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=self._batch_size(batch))

    @staticmethod
    def _batch_size(batch: dict[str, Any]) -> int:
        return len(batch["latent"] if "latent" in batch else batch["image"])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # the U-Net's, and a fine-tune's text parts
        opt, scheduler = self.skipping("train/loss", self.optimizer_factory(params), self.scheduler_factory)
        if scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, cond_values: list[Any] | None, n: int, guidance_scale: float = 1.0, seed: int = 0,
               latent_shape: tuple[int, int, int] | None = None, sampler: Sampler | None = None,
               callback: Callable | None = None, guide: Callable[[Denoise], Denoise] | None = None,
               images: dict[str, Tensor] | None = None) -> Tensor:
        """Generate n images (or latents when there is no VAE) for labels/prompts `cond_values` (None = unconditional)
        and, for an image-conditioned model, the n rows of `images` ("low_res", or "image" and "mask"); `guide`
        wraps the (CFG) denoiser, e.g. classifier guidance (diffusion.guidance.classifier_guidance)."""
        shape = latent_shape or self.latent_shape
        g = torch.Generator(device="cpu").manual_seed(seed)
        x_T = torch.randn((n, *shape), generator=g).to(self.device)
        cond, uncond = {}, None
        if self.conditioner is not None and cond_values is not None:
            cond = self.conditioner.from_values(cond_values, self.device)
            uncond = self.conditioner.unconditional(n, self.device)
        if self.image_condition is not None:
            extra = self.image_condition.inputs(images or {}, shape[-2:], self.encode_condition, g)
            cond, uncond = self.image_condition.guided(cond, uncond, extra)
        denoise = classifier_free_guidance(lambda x, t, c: self.unet(x, t, **c), cond, uncond or cond,
                                           guidance_scale if uncond is not None else 1.0)
        if guide is not None:
            denoise = guide(denoise)
        z0 = self.diffusion.sample(denoise, x_T, sampler, generator=g, callback=callback)
        return z0 if self.vae is None else self.vae.decode(z0 / self.latent_scale).clamp(-1, 1)

    def log_images(self, batch: dict[str, Any], num_images: int = 8) -> dict[str, Tensor]:
        """Fixed-seed samples at every guidance scale, for the ImageGrids callback (EMA weights if swapped in)."""
        if self.vae is None:  # latents alone are not pictures
            return {}
        condition, images = self.image_condition, None
        if condition is not None:  # condition | sample | ground truth, from the batch's first rows (its own size)
            num_images = min(num_images, self._batch_size(batch))
            images = {k: v[:num_images] for k, v in batch.items() if isinstance(v, Tensor)}
        # labels 0…K−1 cycled (class models) or the batch's prompts (text models)
        values = None if self.conditioner is None else self.conditioner.grid_values(batch, num_images)
        scales = self.sample_cfg.guidance_scales if values is not None else (1.0,)
        shapes = self.sample_cfg.grid_shapes(self.vae.embed_dim, self.vae.downsample_factor) if images is None else {
            "": None}
        grids = {f"samples_cfg{s:g}{suffix}": self.sample(values, num_images, s, self.sample_cfg.sample_seed, shape,
                                                           images=images) for suffix, shape in shapes.items() for s in scales}
        return grids if condition is None else {k: condition.triptych(images, v) for k, v in grids.items()}

    # ------------------------------------------------------------------ checkpoints, export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # lit.latents: vae_config, latent_shape
        checkpoint["unet_config"] = dict(getattr(self.unet, "config", {}))
        if isinstance(self.conditioner, TextConditioner):
            # the frozen text encoder is reloaded from its own directory: keep only what a fine-tune trains
            trained = {f"conditioner.{k}" for k, p in self.conditioner.named_parameters() if p.requires_grad}
            for key in [k for k in checkpoint["state_dict"] if k.startswith("conditioner.") and k not in trained]:
                del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.conditioner is not None:
            for k, v in self.conditioner.state_dict().items():  # the frozen parts; trained ones are stored
                checkpoint["state_dict"].setdefault(f"conditioner.{k}", v)

    def export_weights(self, dirpath: str | Path, ema: dict[str, dict[str, Tensor]] | None = None) -> list[Path]:
        """`unet.safetensors` (EMA weights when given) and `vae.safetensors`, ldmlab names + config metadata;
        a fine-tune with its own export (LoRA: the adapters alone) writes that instead of the U-Net."""
        ema_unet = (ema or {}).get("unet")
        # the trained size travels as diffusers' sample_size (latent side; image side for the VAE): convert reads it
        side = {} if self._latent_shape is None else {"sample_size": str(self._latent_shape[-1])}
        paths = self.finetune.export(Path(dirpath), self.unet, self.conditioner, ema_unet) if self.finetune else None
        if paths is None:
            paths = [save_weights(Path(dirpath) / "unet.safetensors",
                                  ema_unet if ema_unet is not None else self.unet.state_dict(),
                                  getattr(self.unet, "config", {}), "unet", latent_scale=str(float(self.latent_scale)),
                                  ema=str(ema_unet is not None), **side)]
        if self.vae is not None:
            image = {k: str(int(v) * self.vae.downsample_factor) for k, v in side.items()}
            paths.append(save_weights(Path(dirpath) / "vae.safetensors", self.vae.state_dict(), self.vae.config, "vae",
                                      **image))
        return paths
