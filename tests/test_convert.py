"""Weight converters: SD-original names, lossless round trips, SD checkpoints, diffusers dirs, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_unet import SMALL, assert_close_rel, conditioning, diffusers_out, diffusers_twin, randomized

from ldmlab.convert import checkpoint as ckpt
from ldmlab.convert.__main__ import main
from ldmlab.convert.unet import (
    diffusers_unet_config,
    infer_unet_config,
    ldmlab_unet_config,
    unet_diffusers_to_ldmlab,
    unet_ldmlab_to_diffusers,
)
from ldmlab.convert.vae import diffusers_to_ldmlab as vae_diffusers_to_ldmlab
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.unet import UNetModel

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
# 3 levels, attention at levels 0 and 2 only: the Upsample sits at output_blocks index 1 and 2
NAMES_CONFIG: dict[str, Any] = {
    **SMALL,
    "attention_levels": (0, 2),
    "num_res_blocks": 2,
    "context_dim": 24,
    "num_classes": 5,
}
# the CPU-trainable config: class-conditional, self-attention only
SMALL_CPU: dict[str, Any] = {
    "model_channels": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_levels": (1,),
    "num_heads": 4,
    "context_dim": None,
    "num_classes": 10,
}


def equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in b.items():
        assert a[key].shape == value.shape and torch.equal(a[key], value), key


def tiny_vae(**kw: Any) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), **kw)
    with torch.no_grad():  # GroupNorm affines default to (1, 0): perturb so every mapping is exercised
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


def test_names_are_sd_original() -> None:
    """diffusers' own SD-checkpoint converter, fed our tensors as `model.diffusion_model.*`, agrees."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = randomized(UNetModel(**NAMES_CONFIG))
    sd = ours.state_dict()
    assert {"output_blocks.2.2.conv.weight", "output_blocks.5.1.conv.weight", "label_emb.weight"} <= sd.keys()
    prefixed = ckpt.join_sd_checkpoint(unet=sd)
    converted = convert_ldm_unet_checkpoint(prefixed, diffusers_unet_config(ours.config))
    equal_dicts(converted, unet_ldmlab_to_diffusers(sd, ours.config))


@pytest.mark.parametrize(
    "kw",
    [NAMES_CONFIG, SMALL_CPU, {**SMALL, "use_linear_projection": True, "num_heads": None, "head_dim": 8}],
    ids=["cross-class", "self-attention-class", "linear-head-dim"],
)
def test_round_trip_is_lossless(kw: dict[str, Any]) -> None:
    ours = randomized(UNetModel(**kw))
    sd = ours.state_dict()
    theirs = unet_ldmlab_to_diffusers(sd, ours.config)
    back = unet_diffusers_to_ldmlab(theirs, ours.config)
    assert list(back) == list(sd)
    equal_dicts(back, sd)
    # the diffusers config alone (as a foreign tool would write it) maps back to an equivalent architecture
    foreign = {k: v for k, v in diffusers_unet_config(ours.config).items() if k != "_ldmlab_config"}
    rebuilt = UNetModel(**ldmlab_unet_config(foreign))
    rebuilt.load_state_dict(unet_diffusers_to_ldmlab(theirs, rebuilt.config), strict=True)


def test_config_inference_for_sd_checkpoints() -> None:
    """SD1.5 / SD2-style diffusers configs and SD-original state-dict shapes give our constructor args."""
    with torch.device("meta"):
        sd15 = UNetModel()
        sd2 = UNetModel(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)
    sd15_diffusers = _sd15_diffusers_config()
    assert ldmlab_unet_config(sd15_diffusers) == sd15.config
    sd2_diffusers = {
        **sd15_diffusers,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
    }
    assert ldmlab_unet_config(sd2_diffusers) == sd2.config
    assert infer_unet_config(sd15.state_dict()) == sd15.config
    assert infer_unet_config(sd2.state_dict(), head_dim=64) == sd2.config
    small_cpu = UNetModel(**SMALL_CPU)
    assert infer_unet_config(small_cpu.state_dict(), num_heads=4) == small_cpu.config


def _sd15_diffusers_config() -> dict[str, Any]:
    """The SD1.x U-Net config as diffusers holds it (its defaults + cross_attention_dim 768)."""
    with torch.device("meta"):
        return dict(diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768).config)


def test_converters_reject_foreign_keys_and_weights() -> None:
    config = UNetModel(**SMALL_CPU).config
    with pytest.raises(ValueError, match="model.diffusion_model"):
        unet_ldmlab_to_diffusers({"model.diffusion_model.out.2.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="unexpected key 'down_blocks.0.attentions.0.norm.weight'"):
        unet_diffusers_to_ldmlab({"down_blocks.0.attentions.0.norm.weight": torch.zeros(1)}, config)
    theirs = unet_ldmlab_to_diffusers(randomized(UNetModel(**SMALL_CPU)).state_dict(), config)
    key = next(k for k in theirs if k.endswith("attn2.to_out.0.weight"))
    theirs[key] = torch.ones_like(theirs[key])
    with pytest.raises(ValueError, match="non-zero but config context_dim=None"):
        unet_diffusers_to_ldmlab(theirs, config)


def test_sd_checkpoint_from_diffusers_models_loads() -> None:
    """diffusers U-Net + VAE -> one SD-original-layout checkpoint -> split -> strict loads, same outputs."""
    torch.manual_seed(0)
    theirs_unet = diffusers_twin(randomized(UNetModel(**NAMES_CONFIG)))
    theirs_vae = diffusers.AutoencoderKL.from_config(ckpt.diffusers_vae_config(tiny_vae().config)).eval()
    vae_config: dict[str, Any] = tiny_vae().config
    unet, vae = UNetModel(**NAMES_CONFIG).eval(), AutoencoderKL(**vae_config).eval()
    full = ckpt.join_sd_checkpoint(
        unet_diffusers_to_ldmlab(theirs_unet.state_dict(), unet.config),
        vae_diffusers_to_ldmlab(theirs_vae.state_dict()),
    )
    full["cond_stage_model.transformer.dummy"] = torch.zeros(1)  # other SD parts are ignored
    full.update({ckpt._sd_ema_key(k): v + 1 for k, v in full.items() if k.startswith(ckpt.SD_UNET_PREFIX)})
    unet_sd, vae_sd = ckpt.split_sd_checkpoint({"state_dict": full})
    unet.load_state_dict(unet_sd, strict=True)
    vae.load_state_dict(vae_sd, strict=True)
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([4, 600]), conditioning(unet, 2)
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(unet(x, t, **cond), diffusers_out(theirs_unet, x, t, cond))
        assert_close_rel(vae.encode(img).mean, theirs_vae.encode(img).latent_dist.mean)
    ema_sd, _ = ckpt.split_sd_checkpoint(full, ema=True)
    assert all(torch.equal(ema_sd[k], unet_sd[k] + 1) for k in unet_sd)


@pytest.mark.parametrize("kw", [NAMES_CONFIG, SMALL_CPU], ids=["cross-class", "self-attention-class"])
def test_save_diffusers_unet_loads_with_from_pretrained(
    kw: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = randomized(UNetModel(**kw))
    ckpt.save_diffusers_unet(ours, tmp_path / "unet")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([0, 999]), conditioning(ours, 2)
    with torch.no_grad():
        assert_close_rel(ours(x, t, **cond), diffusers_out(theirs, x, t, cond))
    sd, cfg = ckpt.read_diffusers_dir(tmp_path / "unet")
    assert ldmlab_unet_config(cfg) == ours.config
    equal_dicts(unet_diffusers_to_ldmlab(sd, ours.config), ours.state_dict())


def test_save_diffusers_vae_loads_with_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = tiny_vae()
    ckpt.save_diffusers_vae(ours, tmp_path / "vae", scaling_factor=0.5)
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == 0.5
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(ours.encode(img).mean, theirs.encode(img).latent_dist.mean)
        z = torch.randn(1, 4, 16, 16)
        assert_close_rel(ours.decode(z), theirs.decode(z).sample)
    foreign = {
        k: v
        for k, v in json.loads((tmp_path / "vae/config.json").read_text()).items()
        if k != "_ldmlab_config"
    }
    assert ckpt.ldmlab_vae_config(foreign) == ours.config
    with pytest.raises(ValueError, match="embed_dim=8 != z_channels=4"):
        ckpt.diffusers_vae_config(AutoencoderKL(embed_dim=8).config)


def _ldmlab_files(tmp_path: Path) -> tuple[UNetModel, AutoencoderKL, Path]:
    """Small random U-Net and VAE written as ldmlab exports in tmp_path/in."""
    unet, vae = randomized(UNetModel(**SMALL_CPU)), tiny_vae()
    ckpt.save_ldmlab(unet.state_dict(), unet.config, tmp_path / "in/unet.safetensors", "unet")
    ckpt.save_ldmlab(vae.state_dict(), vae.config, tmp_path / "in/vae.safetensors", "vae")
    return unet, vae, tmp_path / "in"


def test_cli_round_trip(tmp_path: Path) -> None:
    """ldmlab -> diffusers (a subprocess) -> sd -> ldmlab gives back the same tensors and configs."""
    unet, vae, src = _ldmlab_files(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "ldmlab.convert",
        "--from",
        "ldmlab",
        "--to",
        "diffusers",
        "--unet",
        str(src / "unet.safetensors"),
        "--vae",
        str(src / "vae.safetensors"),
        "--out",
        str(tmp_path / "d"),
    ]
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "d/unet/config.json").exists() and "wrote" in proc.stdout
    main(
        [
            "--from",
            "diffusers",
            "--to",
            "sd",
            "--unet",
            str(tmp_path / "d/unet"),
            "--vae",
            str(tmp_path / "d/vae"),
            "--out",
            str(tmp_path / "sd.safetensors"),
        ]
    )
    sd_file = str(tmp_path / "sd.safetensors")
    main(
        [
            "--from",
            "sd",
            "--to",
            "ldmlab",
            "--unet",
            sd_file,
            "--vae",
            sd_file,
            "--out",
            str(tmp_path / "back"),
        ]
    )
    for kind, model in (("unet", unet), ("vae", vae)):
        sd, config = ckpt.load_ldmlab(tmp_path / f"back/{kind}.safetensors", kind)
        assert config == model.config
        equal_dicts(sd, model.state_dict())


def test_cli_sd_input_without_metadata(tmp_path: Path) -> None:
    """A plain SD-original file (no ldmlab metadata) converts with the head count given on the CLI."""
    unet, vae, _ = _ldmlab_files(tmp_path)
    plain_sd = ckpt.standalone_tensors(ckpt.join_sd_checkpoint(unet.state_dict(), vae.state_dict()))
    save_file(plain_sd, str(tmp_path / "plain.safetensors"))
    plain = str(tmp_path / "plain.safetensors")
    main(
        [
            "--from",
            "sd",
            "--to",
            "ldmlab",
            "--unet",
            plain,
            "--vae",
            plain,
            "--num-heads",
            "4",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    sd, config = ckpt.load_ldmlab(tmp_path / "out/unet.safetensors", "unet")
    assert config == unet.config
    equal_dicts(sd, unet.state_dict())
    with pytest.raises(SystemExit):
        main(
            ["--from", "ldmlab", "--to", "sd", "--unet", plain, "--out", str(tmp_path / "x")]
        )  # not a .safetensors
    with pytest.raises(ValueError, match="expected 'ldmlab.unet'"):
        main(["--from", "ldmlab", "--to", "ldmlab", "--unet", plain, "--out", str(tmp_path / "y")])


def written_sizes(out: Path) -> tuple[int, int]:
    """sample_size of the written diffusers U-Net and VAE configs."""
    return tuple(json.loads((out / f"{kind}/config.json").read_text())["sample_size"] for kind in ("unet", "vae"))


def test_sample_size_survives_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The trained-at sizes (latent 16, image 32) go ldmlab -> diffusers -> sd -> diffusers -> ldmlab unchanged;
    an input that does not record them gets --*-sample-size, else SD's with a warning naming the flag."""
    unet, vae = randomized(UNetModel(**SMALL_CPU)), tiny_vae()
    ckpt.save_ldmlab(unet.state_dict(), unet.config, tmp_path / "in/unet.safetensors", "unet", sample_size=16)
    ckpt.save_ldmlab(vae.state_dict(), vae.config, tmp_path / "in/vae.safetensors", "vae", sample_size=32)
    both = ["--unet", str(tmp_path / "in/unet.safetensors"), "--vae", str(tmp_path / "in/vae.safetensors")]
    main(["--from", "ldmlab", "--to", "diffusers", *both, "--out", str(tmp_path / "d")])
    assert written_sizes(tmp_path / "d") == (16, 32)
    diff = ["--unet", str(tmp_path / "d/unet"), "--vae", str(tmp_path / "d/vae")]
    main(["--from", "diffusers", "--to", "sd", *diff, "--out", str(tmp_path / "sd.safetensors")])
    sd = ["--unet", str(tmp_path / "sd.safetensors"), "--vae", str(tmp_path / "sd.safetensors")]
    main(["--from", "sd", "--to", "diffusers", *sd, "--out", str(tmp_path / "d2")])
    assert written_sizes(tmp_path / "d2") == (16, 32)
    main(["--from", "sd", "--to", "ldmlab", *sd, "--out", str(tmp_path / "back")])
    assert ckpt.ldmlab_sample_size(tmp_path / "back/unet.safetensors") == 16
    assert "warning" not in capsys.readouterr().err

    _, _, plain = _ldmlab_files(tmp_path / "plain")  # exports that predate the field
    old = ["--unet", str(plain / "unet.safetensors"), "--vae", str(plain / "vae.safetensors")]
    main(["--from", "ldmlab", "--to", "diffusers", *old, "--unet-sample-size", "16", "--out", str(tmp_path / "d3")])
    assert written_sizes(tmp_path / "d3") == (16, 512)
    assert "pass --vae-sample-size N" in capsys.readouterr().err


@pytest.mark.slow
def test_a_trained_ldm_converts_at_the_size_it_was_trained_at(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """A 1-step `train.py model=unet_small` on 32 px crops with an f4 VAE: its last.ckpt converts to diffusers
    configs with the U-Net's sample_size 8 (the latent side) and the VAE's 32 (the image side), not 64 / 512."""
    from conftest import run_train

    run = tmp_path / "run"
    run_train(["model=unet_small", f"model.vae.path={tiny_assets['vae']}", "model.diffusion.sampler.num_steps=2",
               "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=1", "trainer.num_sanity_val_steps=0",
               "callbacks.image_grids=null", f"hydra.run.dir={run}"], cwd=tmp_path)
    last = str(run / "checkpoints/last.ckpt")
    main(["--from", "ldmlab", "--to", "diffusers", "--unet", last, "--vae", last, "--ema", "--out",
          str(tmp_path / "d")])
    assert written_sizes(tmp_path / "d") == (8, 32)
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "d/unet")
    assert loaded.config.sample_size == 8


def test_a_vae_training_checkpoint_converts(tmp_path: Path) -> None:
    """A VAE run's checkpoint (`autoencoder.*`, autoencoder_config) converts; it records no image size, so
    --vae-sample-size gives it; asking it for a U-Net names the field it lacks."""
    vae = tiny_vae()
    path = tmp_path / "vae_run.ckpt"
    torch.save({"state_dict": {f"autoencoder.{k}": v for k, v in vae.state_dict().items()},
                "autoencoder_config": vae.config, "global_step": 3}, path)
    main(["--from", "ldmlab", "--to", "ldmlab", "--vae", str(path), "--out", str(tmp_path / "l")])
    sd, config = ckpt.load_ldmlab(tmp_path / "l/vae.safetensors", "vae")
    assert config == vae.config
    equal_dicts(sd, vae.state_dict())
    main(["--from", "ldmlab", "--to", "diffusers", "--vae", str(path), "--vae-sample-size", "32", "--out",
          str(tmp_path / "d")])
    assert json.loads((tmp_path / "d/vae/config.json").read_text())["sample_size"] == 32
    with pytest.raises(ValueError, match="has no 'unet_config'"):
        main(["--from", "ldmlab", "--to", "ldmlab", "--unet", str(path), "--out", str(tmp_path / "x")])
