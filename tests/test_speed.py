"""The speed switches (ldmlab.accel, GPUSpeed, the speed config group) on the CPU: same numbers as the plain
model, the config wiring of trainer=gpu, and a bf16 training run that follows the fp32 one.

The GPU timings themselves are benchmarks (python -m ldmlab.bench.gpu → docs/BENCHMARKS.md), not tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train
from hydra.utils import instantiate
from torch import nn

from ldmlab import accel
from ldmlab.callbacks.speed import GPUSpeed, StepTimer, resolve_compile
from ldmlab.data.synthetic import SyntheticDataModule
from ldmlab.diffusion import Diffusion, EpsPrediction, ddim_sample, scaled_linear
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.lit.vae import VAEModule
from ldmlab.nn.attention import SpatialTransformer
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.autoencoder_blocks import AttnBlock, ResnetBlock
from ldmlab.nn.unet import UNetModel
from ldmlab.nn.unet_blocks import ResBlock


def tiny_unet(**kw) -> UNetModel:
    torch.manual_seed(0)
    config = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
              "num_heads": 4, "context_dim": 16, "norm_groups": 8}
    return UNetModel(**{**config, **kw})


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 16, generator=g)


def test_channels_last_gives_the_same_prediction() -> None:
    plain = tiny_unet()
    torch.nn.init.normal_(plain.out[2].weight, std=0.02)  # zero-initialised output convs would hide differences
    for block in plain.modules():
        if isinstance(block, ResBlock):
            torch.nn.init.normal_(block.out_layers[3].weight, std=0.02)
    fast = tiny_unet()
    fast.load_state_dict(plain.state_dict())
    accel.to_channels_last(fast)
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, t, c = unet_inputs()
    torch.testing.assert_close(fast(x, t, context=c), plain(x, t, context=c), rtol=1e-5, atol=1e-5)


def test_vae_attention_is_the_same_in_both_layouts() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = vae.decode(vae.encode(x).mean)
    accel.to_channels_last(vae)
    torch.testing.assert_close(vae.decode(vae.encode(x).mean), expected, rtol=1e-5, atol=1e-5)


def test_matmul_weights_cast_ahead_give_autocasts_numbers() -> None:
    """sample.py on a GPU stores the conv and linear weights in bf16 once instead of letting autocast cast them on
    every U-Net call: the kernels see the same operands, so the outputs are bit-identical (CPU autocast here)."""
    unet = tiny_unet()
    torch.nn.init.normal_(unet.out[2].weight, std=0.02)  # a zero-initialised output conv would hide differences
    vae = AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    x, t, c = unet_inputs()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = unet(x, t, context=c), vae.decode(z)
        layers = accel.cast_matmul_weights(unet) + accel.cast_matmul_weights(vae)
        got = unet(x, t, context=c), vae.decode(z)
    matmuls = [m for m in (*unet.modules(), *vae.modules()) if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert layers == len(matmuls) and all(p.dtype == torch.bfloat16 for m in matmuls for p in m.parameters())
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # autocast: fp32 ops
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_sample_py_compiles_on_the_gpu_only_by_default() -> None:
    """prepare_for_sampling (sample.py): compile=auto compiles nothing on the CPU and leaves the weights fp32;
    an explicit scope compiles the U-Net and the VAE (their first call would trace; not run here)."""
    from ldmlab.sample import prepare_for_sampling

    module = ldm_with_vae()
    prepare_for_sampling(module, bf16=True, compile="auto")
    assert module.unet._compiled_call_impl is None and "trunk" not in vars(module.vae.decoder)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # the CPU runs without autocast
    module = ldm_with_vae()
    prepare_for_sampling(module, bf16=True, compile="full")
    assert module.unet._compiled_call_impl is not None and module.vae.encoder._compiled_call_impl is not None
    assert "trunk" in vars(module.vae.decoder)  # accel.WHOLE: the decoder's trunk, compiled, in the method's place


def test_compile_targets_regional_and_full() -> None:
    """The policy's tables by network type (accel.REPEATED_BLOCKS, accel.WHOLE) pick the compiled modules."""
    unet = tiny_unet()
    assert accel.repeated_block_types(unet) == (ResBlock, SpatialTransformer)
    blocks = [m for m in unet.modules() if isinstance(m, accel.repeated_block_types(unet))]
    # ResBlocks: in 1+1, middle 2, out 2+2; transformers (level 1 and middle): in 1, middle 1, out 2
    assert len(blocks) == 8 + 4
    assert accel.compile_model(unet, "regional") == len(blocks)
    assert all(b._compiled_call_impl is not None for b in blocks) and unet._compiled_call_impl is None
    whole = tiny_unet()
    assert accel.compile_model(whole, "full") == 1 and whole._compiled_call_impl is not None
    vae = AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    assert accel.repeated_block_types(vae) == (ResnetBlock, AttnBlock)
    # ResnetBlocks: encoder 1+1, middle 2; decoder 2+2, middle 2; AttnBlocks: one middle each
    assert accel.compile_model(vae, "regional") == 10 + 2
    module = ldm_with_vae()  # the LDM's U-Net and its frozen VAE, each whole; the conditioner is no network
    assert accel.networks(module) == [module.unet, module.vae]
    assert accel.compile_model(module, "full") == 1 + 2
    assert accel.compile_model(tiny_unet(), "none") == 0
    with pytest.raises(ValueError, match="compile='fast': valid are none, regional, full"):
        accel.compile_model(tiny_unet(), "fast")  # type: ignore[arg-type]


def test_full_compile_of_the_vae_leaves_the_last_layer_outside() -> None:
    """compile=full compiles the encoder and the decoder's trunk; the output conv, whose weight the GAN's adaptive
    weight differentiates twice a step, stays an eager autograd node after the compiled one (a whole compiled
    decoder would be one node, whose backward runs in full for each of those gradients). The reconstruction
    and that gradient are unchanged. `aot_eager` traces as the GPU path does, without inductor."""
    torch.manual_seed(0)
    vae = AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def reconstruct() -> tuple[torch.Tensor, torch.Tensor]:
        rec = vae.decode(vae.encode(x).mean)
        return rec, torch.autograd.grad(rec.abs().mean(), vae.last_layer, retain_graph=True)[0]

    expected = reconstruct()
    assert accel.compile_model(vae, "full", backend="aot_eager") == 2  # a GPU run compiles with inductor
    assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is None
    rec, grad = reconstruct()
    assert rec.grad_fn.name() == "ConvolutionBackward0"
    assert rec.grad_fn.next_functions[0][0].name() == "CompiledFunctionBackward"
    torch.testing.assert_close((rec, grad), expected)


def test_sdpa_order_names_unknown_backends() -> None:
    before = torch._C._get_sdp_priority_order()
    try:
        accel.set_sdpa_order(["cudnn", "flash"])
        order = torch._C._get_sdp_priority_order()
        assert order[:2] == [3, 1] and sorted(order) == sorted(before)  # every backend stays available
        with pytest.raises(ValueError, match=r"unknown \['fa3'\]; valid are"):
            accel.set_sdpa_order(["fa3"])
    finally:
        torch._C._set_sdp_priority_order(before)


def test_trainer_gpu_turns_the_speed_switches_on(tmp_path: Path) -> None:
    on = compose_train(["trainer=gpu"], tmp_path)
    assert on.callbacks.speed._target_ == "ldmlab.callbacks.speed.GPUSpeed"
    speed = instantiate(on.callbacks.speed)
    assert (speed.compile, speed.channels_last, speed.sdpa_backends[0]) == ("auto", True, "cudnn")
    for overrides in (["trainer=gpu", "speed=none"], ["trainer=cpu"], []):
        assert "_target_" not in compose_train(overrides, tmp_path).callbacks.speed, overrides
    assert "_target_" in compose_train(["trainer=ddp"], tmp_path).callbacks.speed


def test_compile_auto_follows_the_policy_table(tmp_path: Path) -> None:
    """trainer=gpu's `compile: auto` / `compile_mode: auto` resolve by what the module is (callbacks.speed.AUTO):
    the LDM whole, with CUDA graphs (reduce-overhead) only in a one-process run; the VAE block by block in
    torch's default mode at every world size; any other module whole in the default mode. Explicit settings win."""
    speed = instantiate(compose_train(["trainer=gpu"], tmp_path).callbacks.speed)
    assert (speed.compile, speed.compile_mode) == ("auto", "auto")
    vae = VAEModule(AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
                    torch.nn.Identity())
    other = pl.LightningModule()
    for module, one, many in [(ldm(), ("full", "reduce-overhead"), ("full", None)),
                              (vae, ("regional", None), ("regional", None)),
                              (other, ("full", None), ("full", None))]:
        assert speed.resolve(module, world_size=1) == one, type(module)
        for world_size in (2, 8):  # DDP, FSDP
            assert speed.resolve(module, world_size) == many, (type(module), world_size)
    assert resolve_compile("auto", None, ldm(), 1) == ("full", None)  # compile_mode: null is torch's default
    assert resolve_compile("regional", "auto", ldm(), 1) == ("regional", "reduce-overhead")
    assert resolve_compile("full", "max-autotune", vae, 4) == ("full", "max-autotune")
    assert resolve_compile("none", "auto", vae, 1) == ("none", None)
    with pytest.raises(ValueError, match="compile_mode='fast': valid are auto, null"):
        GPUSpeed(compile_mode="fast")
    with pytest.raises(ValueError, match="callbacks.speed.compile='fast': valid are auto, none, regional, full"):
        GPUSpeed(compile="fast")


def test_gpu_speed_resolves_with_the_trainers_world_size(tmp_path: Path) -> None:
    """The world size GPUSpeed passes to the policy is the real Trainer's (1 process, or 2 DDP ranks)."""
    speed = GPUSpeed(compile_mode="auto")
    one = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    two = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=tmp_path)
    assert [speed.resolve(ldm(), t.world_size) for t in (one, two)] == [("full", "reduce-overhead"), ("full", None)]


def test_inductor_settings_are_named_and_checked(tmp_path: Path) -> None:
    """`callbacks.speed.inductor` passes torch._inductor.config settings; a misspelt one fails at construction."""
    from torch._inductor import config

    cfg = compose_train(["trainer=gpu", "+callbacks.speed.inductor.conv_1x1_as_mm=true"], tmp_path)
    assert instantiate(cfg.callbacks.speed).inductor == {"conv_1x1_as_mm": True}
    with pytest.raises(ValueError, match=r"callbacks.speed.inductor: \['conv_1x1_as_nm'\] are not torch._inductor"):
        GPUSpeed(inductor={"conv_1x1_as_nm": True})
    assert accel.inductor_settings(["cl", "c1x1", "cdt"]) == {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True}
    with config.patch({"conv_1x1_as_mm": False}):  # set_inductor writes the process-wide config: restored
        accel.set_inductor({"conv_1x1_as_mm": True})
        assert config.conv_1x1_as_mm


def ldm(precision_seed: int = 0) -> LatentDiffusionModule:
    return LatentDiffusionModule(unet=tiny_unet(context_dim=None),
                                 diffusion=Diffusion(EpsPrediction(), scaled_linear(), sampler=ddim_sample),
                                 latent_scale=1.0,
                                 training={"seed": precision_seed},
                                 optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))


def ldm_with_vae() -> LatentDiffusionModule:
    vae = AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    return LatentDiffusionModule(tiny_unet(context_dim=None), Diffusion(EpsPrediction(), scaled_linear(), sampler=ddim_sample),
                                 vae=vae)


def train_losses(precision: str, callbacks: list[pl.Callback], tmp_path: Path, steps: int = 40,
                 channels_last: bool = False, profiler: object = None) -> list[float]:
    """Per-step training loss of a tiny LDM on a fixed pool of 8×8 latents."""
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    pl.seed_everything(0)
    module = ldm()
    if channels_last:  # what GPUSpeed applies on a GPU (on the CPU it leaves the model alone)
        accel.to_channels_last(module)
    data = SyntheticDataModule(kind="latent", shape=(4, 8, 8), batch_size=8, num_workers=0, pool=32,
                               pin_memory=False)
    trainer = pl.Trainer(accelerator="cpu", precision=precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0, callbacks=[Record(), *callbacks],
                         profiler=profiler)
    trainer.fit(module, datamodule=data)
    return losses


def test_bf16_channels_last_training_follows_fp32(tmp_path: Path) -> None:
    """Same seed, same data: bf16 autocast + channels_last (the GPU path's numerics, compile aside) against
    fp32. Stated tolerance: the mean loss over each block of 10 steps within 5 % of fp32's, and both fall."""
    timer = StepTimer(skip=5)
    fp32 = train_losses("32-true", [], tmp_path)
    speed = GPUSpeed(compile="full", channels_last=True)
    bf16 = train_losses("bf16-mixed", [speed, timer], tmp_path, channels_last=True)
    assert speed._applied  # it ran, and on the CPU compiled nothing (a compile would take minutes here)
    assert len(fp32) == len(bf16) == 40
    for i in range(0, 40, 10):
        ref, got = sum(fp32[i:i + 10]) / 10, sum(bf16[i:i + 10]) / 10
        assert abs(got - ref) <= 0.05 * ref, (i, ref, got)
    assert sum(bf16[-10:]) < 0.8 * sum(bf16[:10])  # it learns
    assert timer.seconds_per_step > 0


def test_step_timer_counts_from_the_fits_first_step_and_writes_json(tmp_path: Path) -> None:
    """A fit resumed at step 100 still times its steps after `skip` of its own (the warm-up recurs on a resume);
    `path` gets seconds per step, the count and the warm-up as JSON (what pipeline=variants_gpu reads for img/s)."""
    timer = StepTimer(skip=2, path=str(tmp_path / "timing" / "step_time.json"))
    trainer = SimpleNamespace(global_step=100, max_steps=106, is_global_zero=True)
    module = SimpleNamespace(device=torch.device("cpu"))
    timer.on_fit_start(trainer, module)
    for step in range(100, 106):
        trainer.global_step = step
        timer.on_train_batch_start(trainer, module, None, 0)
        time.sleep(0.02)
        trainer.global_step = step + 1
        timer.on_train_batch_end(trainer, module, None, None, 0)
    timer.on_train_end(trainer, module)
    written = json.loads((tmp_path / "timing" / "step_time.json").read_text())
    assert written["steps"] == 4 and written["skip"] == 2  # steps 102-105
    assert written["seconds_per_step"] == pytest.approx(timer.seconds_per_step) and written["seconds_per_step"] >= 0.02
    assert written["warmup_seconds"] >= 2 * 0.02
    untimed = StepTimer(skip=50, path=str(tmp_path / "none.json"))  # stopped before its first timed step
    untimed.on_fit_start(trainer, module)
    untimed.on_train_end(trainer, module)
    assert json.loads((tmp_path / "none.json").read_text())["seconds_per_step"] is None


def test_step_profile_writes_kernel_and_host_tables(tmp_path: Path) -> None:
    """The profiler behind `bench.gpu --parts train_profile`, around real Lightning steps (CPU here: the GPU
    kernel table is then empty, the host table names Lightning's and our ranges)."""
    from ldmlab.bench.train_path import HookRanges, StepProfile

    out = tmp_path / "profile.md"
    train_losses("32-true", [StepProfile(str(out), skip=3, steps=2)], tmp_path, steps=8, profiler=HookRanges())
    text = out.read_text()
    assert "#### Profile: train.py, steps 3-5" in text and "Wall " in text
    host = text[text.index("| host range"):]
    assert "run_training_batch" in host and "optimizer_step" in host, host


def test_sync_report_lists_call_sites_and_says_when_there_is_no_gpu(tmp_path: Path) -> None:
    """The sync lister behind `bench.gpu --parts train` (torch's CUDA sync debug mode needs a GPU: on the CPU
    the real run writes that it has none to list; the stack formatting is fed a warning as torch words it)."""
    from ldmlab.bench.train_path import SyncReport

    out = tmp_path / "syncs.txt"
    train_losses("32-true", [SyncReport(str(out), skip=2, steps=2)], tmp_path, steps=5)
    assert out.read_text() == "cpu run: no CUDA syncs to list\n"
    report = SyncReport(str(tmp_path / "unused.txt"), frames=2)
    for _ in range(2):
        report._record("called a synchronizing CUDA operation", UserWarning, __file__, 1)
    report._record("an unrelated warning", UserWarning, __file__, 1)

    def set_sync_debug_mode() -> None:  # torch warns from here when the mode is switched on: that is no sync
        report._record("synchronizing calls will now warn", UserWarning, __file__, 1)

    set_sync_debug_mode()
    (stack, count), = report.sites.items()
    assert count == 2 and "test_speed.py" in stack and len(stack.splitlines()) == 2


def test_step_timer_stops_before_the_final_checkpoint(tmp_path: Path) -> None:
    """The final step's checkpoint (LastCheckpoint writes one when max_steps ends the run) is not a training step:
    StepTimer's clock stops at the last batch's end, before the checkpoint callbacks that run after it."""
    import time

    class SlowSave(pl.Callback):  # stands in for a multi-GB checkpoint written at the end
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step >= trainer.max_steps:
                time.sleep(2.0)

        def on_train_end(self, *args) -> None:
            time.sleep(2.0)

    timer = StepTimer(skip=5)
    start = time.perf_counter()
    train_losses("32-true", [timer, SlowSave()], tmp_path, steps=12)
    total = time.perf_counter() - start
    assert timer._steps == 7 and timer.seconds_per_step * timer._steps < total - 3.9


def test_compile_dynamic_setting_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """callbacks.speed.dynamic → accel.compile_model → each compiled module's torch.compile(dynamic=...): False (one
    graph per bucket shape) by default, True (one symbolic graph) or None (torch's automatic choice) when asked."""
    seen: list[object] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: seen.append(kw["dynamic"]))
    for dynamic in (False, True, None):
        accel.compile_model(tiny_unet(), "full", dynamic=dynamic)
    accel.compile_model(tiny_unet(), "full")
    assert seen == [False, True, None, False]
    assert GPUSpeed().dynamic is False and GPUSpeed(dynamic=True).dynamic is True
