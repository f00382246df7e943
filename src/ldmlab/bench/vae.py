"""SD's kl-f8 VAE: encode and decode throughput, ours against diffusers' AutoencoderKL (same config and
weights), and our full VAE training step (L1 + KL + LPIPS + PatchGAN, G and D steps) through Lightning."""

from __future__ import annotations

import time
from typing import Any

import torch

from ldmlab import accel
from ldmlab.bench.common import cuda_seconds, peak_gib, timed_warmup
from ldmlab.nn.autoencoder import AutoencoderKL


def build_vae(impl: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model, encode(x) → latent mean, decode(z) → image) for `ours` or `diffusers`, same weights."""
    torch.manual_seed(0)
    ours = AutoencoderKL()
    if impl == "ours":
        return ours, lambda m, x: m.encode(x).mean, lambda m, z: m.decode(z)
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldmlab.convert.checkpoint import diffusers_vae_config
    from ldmlab.convert.vae import ldmlab_to_diffusers

    config = {k: v for k, v in diffusers_vae_config(ours.config).items() if not k.startswith("_")}
    model = DiffusersVAE(**config)
    model.load_state_dict(ldmlab_to_diffusers(ours.state_dict()))
    return model, lambda m, x: m.encode(x).latent_dist.mean, lambda m, z: m.decode(z).sample


def time_vae(variant: str, pixels: int, batch: int, iters: int) -> dict[str, float]:
    """Encode and decode img/s (bf16 autocast, no grad) of `impl[+cl][+regional|+compile]`."""
    impl, *features = variant.split("+")
    model, encode, decode = build_vae(impl)
    model = model.cuda().eval()
    if "cl" in features:
        accel.to_channels_last(model)
    if "regional" in features:
        accel.compile_model(model, "regional")
    if "compile" in features:
        model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)
    x = torch.rand(batch, 3, pixels, pixels, device="cuda") * 2 - 1
    z = torch.randn(batch, 4, pixels // 8, pixels // 8, device="cuda")

    def run(fn: Any, arg: torch.Tensor) -> Any:
        def call() -> None:
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                fn(model, arg)
        return call

    warmup = timed_warmup(run(encode, x)) + timed_warmup(run(decode, z))
    return {"encode_img_s": batch / cuda_seconds(run(encode, x), iters),
            "decode_img_s": batch / cuda_seconds(run(decode, z), iters),
            "peak_gib": peak_gib(), "warmup_s": warmup}


def time_vae_training(pixels: int, batch: int, steps: int, scope: str = "regional",
                      fused: bool = True) -> dict[str, float]:
    """img/s of VAEModule's real training step (G + D with LPIPS, GAN active) under a Lightning Trainer with
    trainer=gpu's settings (`scope`: callbacks.speed.compile); "syncs" lists the host syncs of steps 4-8
    (bench.train_path.SyncReport). `fused`: Adam's fused kernels, which skip non-finite steps on the device;
    False: foreach Adam, whose skips are decided on the host (one sync per loss)."""
    import tempfile
    from functools import partial

    import pytorch_lightning as pl

    from ldmlab.bench.train_path import SyncReport
    from ldmlab.callbacks.speed import GPUSpeed, StepTimer
    from ldmlab.data.synthetic import SyntheticDataModule
    from ldmlab.lit.vae import VAEModule
    from ldmlab.nn.discriminator import NLayerDiscriminator
    from ldmlab.nn.lpips import LPIPS

    torch.manual_seed(0)
    module = VAEModule(AutoencoderKL(), NLayerDiscriminator(), lpips=lambda: LPIPS(backbone="random"),
                       optimizer=partial(torch.optim.Adam, lr=4.5e-6, betas=(0.5, 0.9), fused=fused),
                       gan={"disc_start": 0})  # random VGG: same cost as the real weights, which cannot be loaded here
    data = SyntheticDataModule(kind="image", shape=(3, pixels, pixels), batch_size=batch, num_workers=2)
    timer = StepTimer(skip=10)
    with tempfile.TemporaryDirectory() as tmp:
        syncs = SyncReport(f"{tmp}/syncs.txt")
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps,
                             benchmark=True, callbacks=[GPUSpeed(compile=scope), timer, syncs],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             limit_val_batches=0, enable_model_summary=False)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=data)
        listed = syncs.out.read_text() if syncs.out.exists() else ""
    return {"img_s": batch / timer.seconds_per_step, "peak_gib": peak_gib(),
            "warmup_s": timer.warmup_seconds(t0), "syncs": listed}
