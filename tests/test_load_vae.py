"""load_vae rebuilds the same autoencoder from every layout a user may bring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldmlab.convert.load import infer_vae_config, load_vae
from ldmlab.convert.vae import ldmlab_to_diffusers
from ldmlab.nn.autoencoder import AutoencoderKL

CONFIG = {"in_channels": 3, "out_channels": 3, "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
              "z_channels": 4, "embed_dim": 3, "attn_levels": [1], "mid_attention": True, "dropout": 0.0, "norm_groups": 8}


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**CONFIG).eval()


def assert_same(a: AutoencoderKL, b: AutoencoderKL) -> None:
    assert a.config == b.config
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_infer_config_from_shapes(vae: AutoencoderKL) -> None:
    assert infer_vae_config(vae.state_dict(), norm_groups=8) == CONFIG


def test_ldmlab_export(vae: AutoencoderKL, tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    save_file(vae.state_dict(), str(path), metadata={"format": "ldmlab.vae", "config": json.dumps(vae.config)})
    assert_same(load_vae(path), vae)


def test_lightning_checkpoint(vae: AutoencoderKL, tmp_path: Path) -> None:
    state = {f"autoencoder.{k}": v for k, v in vae.state_dict().items()}
    state["discriminator.main.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": state, "autoencoder_config": vae.config, "global_step": 3}, tmp_path / "m.ckpt")
    assert_same(load_vae(tmp_path / "m.ckpt"), vae)


def test_sd_original_checkpoint(vae: AutoencoderKL, tmp_path: Path) -> None:
    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    state["model.diffusion_model.out.2.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "sd.ckpt")
    assert_same(load_vae(tmp_path / "sd.ckpt", config=vae.config), vae)
    save_file(state, str(tmp_path / "sd.safetensors"))
    loaded = load_vae(tmp_path / "sd.safetensors", config=vae.config)
    assert_same(loaded, vae)


def test_diffusers_directory(vae: AutoencoderKL, tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    save_file(ldmlab_to_diffusers(vae.state_dict()), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"norm_num_groups": 8}))
    assert_same(load_vae(tmp_path / "vae"), vae)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_vae(tmp_path / "nope.ckpt")
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="no autoencoder weights"):
        load_vae(tmp_path / "x.safetensors")
