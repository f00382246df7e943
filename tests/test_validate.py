"""Configs are checked before anything heavy: one line per problem, naming the config field and a fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, make_tiny_vae_export
from omegaconf import OmegaConf

from ldmlab.validate import (
    ConfigError,
    check_config,
    override_problems,
    sample_problems,
    validate_config,
)


@pytest.fixture(scope="module")
def vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random f4 VAE export with 4-channel latents (safetensors, config in the metadata)."""
    return make_tiny_vae_export(tmp_path_factory.mktemp("vae") / "vae.safetensors")


def problems(overrides: list[str], tmp_path: Path) -> list[str]:
    return check_config(compose_train(overrides, tmp_path))


def one(found: list[str], *needles: str) -> str:
    """The single problem line that mentions every needle (and is one line)."""
    hits = [p for p in found if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem with {needles}, got {found}"
    assert "\n" not in hits[0]
    return hits[0]


# ---------------------------------------------------------------- presets are fine


def test_shipped_presets_pass(tmp_path: Path, vae: Path) -> None:
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")  # only its presence is checked before the run
    for overrides in ([], ["experiment=vae_demo"], ["model=unet_small", f"model.vae.path={vae}"],
                      ["model=unet_sd15", f"model.vae.path={vae}", f"model.conditioner.path={clip}"],
                      ["experiment=vae_kl_f8", "trainer=cpu", "data=demo", "model.lpips.backbone=random"]):
        assert problems(overrides, tmp_path) == [], overrides


# ---------------------------------------------------------------- shapes


def test_unet_levels_against_latent_side(tmp_path: Path, vae: Path) -> None:
    # demo crops of 32 px through an f4 VAE: 8x8 latents; five levels would need a multiple of 16
    found = problems(["model=unet_small", f"model.vae.path={vae}", "model.unet.channel_mult=[1,1,1,1,1]"], tmp_path)
    line = one(found, "model.unet.channel_mult has 5 levels")
    assert "data.crop_size=32 / VAE factor 4" in line and "not a multiple of 16" in line


def test_unet_attention_level_out_of_range(tmp_path: Path, vae: Path) -> None:
    found = problems(["model=unet_small", f"model.vae.path={vae}", "model.unet.attention_levels=[2]"], tmp_path)
    assert "use level indices 0..1" in one(found, "model.unet.attention_levels=[2]")


def test_unet_heads_and_head_dim(tmp_path: Path, vae: Path) -> None:
    base = ["model=unet_small", f"model.vae.path={vae}"]
    assert "[128]" in one(problems([*base, "model.unet.num_heads=3"], tmp_path), "model.unet.num_heads=3")
    assert "attention widths [128]" in one(problems([*base, "+model.unet.head_dim=48"], tmp_path),
                                           "model.unet.head_dim=48")


def test_norm_groups_unet_and_vae(tmp_path: Path, vae: Path) -> None:
    found = problems(["model=unet_small", f"model.vae.path={vae}", "model.unet.norm_groups=24"], tmp_path)
    assert "model.unet.model_channels" in one(found, "model.unet.norm_groups=24", "[64, 128]")
    found = problems(["model.autoencoder.norm_groups=12"], tmp_path)  # vae_tiny: widths 32, 64
    one(found, "model.autoencoder.norm_groups=12", "[32, 64]")


def test_vae_levels_against_image_size(tmp_path: Path) -> None:
    found = problems(["model=vae_tiny", "data.crop_size=30"], tmp_path)
    assert "set data.crop_size to a multiple of 4" in one(found, "model.autoencoder.channel_mult has 3 levels",
                                                           "data.crop_size is 30")
    assert "model.autoencoder.attn_levels=[3]" in one(problems(["model.autoencoder.attn_levels=[3]"], tmp_path),
                                                      "attn_levels")


def _vae_files(root: Path) -> dict[str, Path]:
    """The same 8-channel VAE in each layout load_vae accepts, to read its latent channels without loading it."""
    export = make_tiny_vae_export(root / "export" / "vae.safetensors", embed_dim=8)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(export))
    save_file({f"first_stage_model.{k}": v for k, v in sd.items()}, str(root / "sd.safetensors"))
    torch.save({"state_dict": {f"autoencoder.{k}": v for k, v in sd.items()}}, root / "lightning.ckpt")
    (root / "diffusers").mkdir()
    (root / "diffusers" / "config.json").write_text(json.dumps({"latent_channels": 8,
                                                                "block_out_channels": [16, 32, 32]}))
    return {"export": export, "sd": root / "sd.safetensors", "ckpt": root / "lightning.ckpt",
            "diffusers": root / "diffusers"}


def test_unet_channels_against_vae_latents_in_every_layout(tmp_path: Path) -> None:
    for layout, path in _vae_files(tmp_path).items():
        found = problems(["model=unet_small", f"model.vae.path={path}"], tmp_path)
        line = one(found, "model.unet.in_channels=4", "8-channel latents")
        assert "set model.unet.in_channels=8 model.unet.out_channels=8" in line, layout
        one(found, "model.unet.out_channels=4")
        assert problems(["model=unet_small", f"model.vae.path={path}", "model.unet.in_channels=8",
                         "model.unet.out_channels=8"], tmp_path) == [], layout


def test_unet_channels_against_latent_cache(tmp_path: Path, vae: Path) -> None:
    root = tmp_path / "latents"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"latent_shape": [4, 6, 6], "counts": {"train-000000.tar": 64}}))
    found = problems(["model=unet_small", f"model.vae.path={vae}", "data=wds_latents", f"data.root={root}",
                      "model.unet.channel_mult=[1,2,2]"], tmp_path)
    assert "is 6, not a multiple of 4" in one(found, "cached latent side")


# ---------------------------------------------------------------- files and mandatory values


def test_mandatory_value_names_field_and_override(tmp_path: Path) -> None:
    line = one(problems(["model=unet_small"], tmp_path), "model.vae.path is mandatory (???)")
    assert "python train.py model.vae.path=<value>" in line


@pytest.mark.parametrize("overrides,needle", [
    (["data=wds", "data.root=/nonexistent/shards"], "data.root=/nonexistent/shards not found"),
    (["data=wds", "data.train_urls='/nonexistent/train-{000000..000003}.tar'"], "data.train_urls: no shards match"),
    (["data=wds"], "data.train_urls and data.root are both null"),
    (["data=folder"], "data.src is null"),
    (["model=unet_small", "model.vae.path=/nonexistent/vae.safetensors"], "model.vae.path=/nonexistent/vae"),
    (["model=unet_small", "model.vae.path=/nonexistent/v.ckpt", "model.unet_init=/nonexistent/unet.safetensors"],
     "model.unet_init=/nonexistent/unet.safetensors not found"),
    (["model=unet_sd15", "model.conditioner.path=/nonexistent/clip"], "model.conditioner.path=/nonexistent/clip"),
    (["model=vae_kl_f8", "model.lpips.backbone=/nonexistent/vgg.pth"], "model.lpips.backbone=/nonexistent/vgg.pth"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt not found"),
])
def test_missing_files(overrides: list[str], needle: str, tmp_path: Path) -> None:
    one(problems(overrides, tmp_path), needle)


def test_root_without_manifest(tmp_path: Path) -> None:
    one(problems(["data=wds", f"data.root={tmp_path}"], tmp_path), "has no manifest.json")


# ---------------------------------------------------------------- guidance, batches


def test_guidance_needs_condition_dropout(tmp_path: Path, vae: Path) -> None:
    base = ["model=unet_small", f"model.vae.path={vae}", "model.p_uncond=0"]
    assert "model.p_uncond=0.1" in one(problems(base, tmp_path), "model.guidance_scales=[1.0, 3.0]")
    assert problems([*base, "model.guidance_scales=[1.0]"], tmp_path) == []


def test_batch_must_fit_the_epoch_on_every_rank(tmp_path: Path) -> None:
    # demo: 10 photos x 500 crops = 5000 samples; 4 devices x 2 nodes x 1000 = 8000 per step
    line = one(problems(["trainer.devices=4", "trainer.num_nodes=2", "data.batch_size=1000"], tmp_path),
               "data.batch_size=1000 x 8 ranks")
    assert "data.batch_size<=625" in line
    assert problems(["trainer.devices=4", "trainer.num_nodes=2", "data.batch_size=625"], tmp_path) == []
    one(problems(["data.samples_per_epoch=64", "trainer.devices=2", "data.batch_size=64"], tmp_path), "128")
    one(problems(["data.batch_size=0"], tmp_path), "data.batch_size=0 must be a positive integer")


def test_validate_config_raises_all_lines(tmp_path: Path) -> None:
    cfg = compose_train(["data.batch_size=0", "model.autoencoder.norm_groups=12"], tmp_path)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert isinstance(info.value, ValueError) and len(info.value.problems) == 2
    assert str(info.value).count("\n") == 1


# ---------------------------------------------------------------- command line and sample.py


def test_unknown_group_option_lists_valid_ones() -> None:
    found = override_problems(["model=unet_foo", "model/noise_schedule=cosine,bogus", "data.batch_size=3",
                               "experiment=null", "hydra/launcher=basic", "+debug=limit", "trainer=ddp"])
    schedules = options("model/noise_schedule")
    assert found == [f"model=unet_foo: no such option in conf/model/; valid: {options('model')}",
                     f"model/noise_schedule=bogus: no such option in conf/model/noise_schedule/; valid: {schedules}"]
    assert "unet_sd15, unet_small" in found[0] and "cosine, ddpm_linear, scaled_linear" in found[1]
    assert override_problems(["-cn", "other", "model=unet_foo"]) == []  # another config tree: Hydra decides


def options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))


def _fake_ldm_ckpt(path: Path, p_uncond: float) -> Path:
    torch.save({"ldmlab_config": OmegaConf.to_yaml({"model": {"p_uncond": p_uncond}}), "state_dict": {}}, path)
    return path


def test_sample_guidance_needs_a_model_trained_with_dropout(tmp_path: Path) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.ckpt, cfg.guidance = str(_fake_ldm_ckpt(tmp_path / "no_drop.ckpt", 0.0)), 5.0
    assert "sample with guidance=1" in one(sample_problems(cfg), "guidance=5.0", "model.p_uncond=0")
    cfg.guidance = 1.0
    assert sample_problems(cfg) == []
    cfg.ckpt, cfg.guidance = str(_fake_ldm_ckpt(tmp_path / "drop.ckpt", 0.1)), 5.0
    assert sample_problems(cfg) == []


def test_sample_mandatory_ckpt_sampler_and_compile(tmp_path: Path) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "sample.yaml")
    cfg.sampler, cfg.compile = "bogus", "fast"
    found = sample_problems(cfg)
    assert "python sample.py ckpt=<value>" in one(found, "ckpt is mandatory (???)")
    assert "ddim" in one(found, "sampler=bogus is unknown")
    assert "valid are auto, none, regional, full" in one(found, "compile=fast is unknown")


# ---------------------------------------------------------------- the real train.py


def train_py_fails(args: list[str], cwd: Path) -> tuple[str, float]:
    """Run train.py expecting a config error; its stderr and how long it took."""
    data = cwd / "data"  # fresh: shows whether the demo shards were built
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={cwd}", f"paths.data_dir={data}", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(cwd.rglob("*.ckpt")) and not list(data.rglob("*.tar")), "work started before the check"
    return proc.stderr, time.monotonic() - start


@pytest.mark.slow
def test_train_py_unknown_option_one_line(tmp_path: Path) -> None:
    stderr, _ = train_py_fails(["model=unet_foo"], tmp_path)
    assert stderr.strip() == f"model=unet_foo: no such option in conf/model/; valid: {options('model')}"


@pytest.mark.slow
def test_train_py_reports_config_problems_before_building(tmp_path: Path, vae: Path) -> None:
    stderr, seconds = train_py_fails(["model=unet_small", f"model.vae.path={vae}", "model.unet.num_heads=3",
                                      "model.p_uncond=0"], tmp_path)
    lines = stderr.splitlines()
    assert any(line.startswith("model.unet.num_heads=3 does not divide") for line in lines), stderr
    assert any(line.startswith("model.guidance_scales=[1.0, 3.0] has scales > 1") for line in lines), stderr
    assert seconds < 120  # imports only: no shard build, no model, no trainer


@pytest.mark.slow
def test_train_py_mandatory_value(tmp_path: Path) -> None:
    stderr, _ = train_py_fails(["model=unet_small"], tmp_path)
    assert ("model.vae.path is mandatory (???) and unset: give it on the command line, e.g. python train.py "
            "model.vae.path=<value>") in stderr.splitlines()


def test_fsdp_on_the_cpu_and_ema_under_fsdp_on_several_ranks_are_refused(tmp_path: Path) -> None:
    """Each rank's EMA would copy only its parameter shard: refused before anything is built, and by the callback
    itself for Trainers made in Python; one rank, or DDP, is fine."""
    from types import SimpleNamespace

    from pytorch_lightning.strategies import FSDPStrategy

    from ldmlab.callbacks.ema import EMA
    from ldmlab.validate import check_config

    base = ["model=unet_sd15", "model.vae=null", "model.conditioner=null", "model.unet.context_dim=null"]
    problems = check_config(compose_train([*base, "trainer=fsdp", "trainer.devices=8"], tmp_path))
    assert [p for p in problems if p.startswith("callbacks.ema with trainer=fsdp on trainer.devices x "
                                                "trainer.num_nodes = 8 ranks")], problems
    for ok in (["trainer=fsdp", "trainer.devices=1"], ["trainer=ddp", "trainer.devices=8"],
               ["trainer=fsdp", "trainer.devices=8", "callbacks.ema=null"]):
        assert not [p for p in check_config(compose_train([*base, *ok], tmp_path)) if "callbacks.ema" in p], ok
    cpu = check_config(compose_train([*base, "trainer=fsdp", "trainer.devices=1", "trainer.accelerator=cpu"], tmp_path))
    assert [p for p in cpu if p.startswith("trainer=fsdp with trainer.accelerator=cpu")], cpu
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(ValueError, match="callbacks.ema with trainer=fsdp on 2 ranks"):
        EMA().on_fit_start(trainer, None)
